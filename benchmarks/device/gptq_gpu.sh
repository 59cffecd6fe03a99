#!/usr/bin/env bash
# GPTQ of a 7B-shaped model on one GPU, as a release engineer runs it: `tiblocal gptq BASE --bits 4` (group 128,
# the bundled Tibetan calibration text, 128 windows of 512 tokens, lm_head kept). The model is random (no weights can
# be fetched on the GPU machine): Llama-2 7B's shape with the bundled 56,000-piece tokenizer, f16 safetensors.
# GPTQ's work does not depend on the values, so the time is that of a trained 7B. A tiny model goes first, so a
# broken install fails in seconds, not after the 7B checkpoint is written.
# Usage: [BITS=4] [GROUP=128] [SAMPLES=128] [RUNS=tiblocal] [TINY=1] [DEVICE=cuda] gptq_gpu.sh OUTDIR
#   RUNS: the timed contenders in order, e.g. tiblocal,bare (tiblocal: the CLI; bare: gptqmodel's API alone, on the
#   same windows); TINY=0 skips the tiny check; DEVICE=cpu for a try-out on a small BASE left in /tmp/gptq-gpu/base.
#   Needs tiblocal and gptqmodel importable (on the GPU machine: the wheels carried, PYTHONPATH set).
set -euo pipefail
out=$(realpath "$1"); bits=${BITS:-4}; group=${GROUP:-128}; samples=${SAMPLES:-128}; device=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1
w=/tmp/gptq-gpu; mkdir -p $w "$out"; cd $w
if [ "${TINY:-1}" = 1 ]; then
  python3 - <<'PY'
from pathlib import Path
from tiblocal.synthetic import LlamaShape, write_llama_checkpoint
from tiblocal.vocab import BUNDLED_DIR
tok = BUNDLED_DIR / "tokenizer.model"
write_llama_checkpoint(Path("tiny"), LlamaShape(vocab_size=56000, hidden_size=256, intermediate_size=512,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=4096), tok, dtype="float16")
PY
  python3 -m tiblocal gptq tiny --bits "$bits" --group-size "$group" --samples 8 --out tiny-q --force --json --device "$device"
fi
t0=$EPOCHREALTIME
python3 - <<'PY'
from pathlib import Path
from tiblocal.synthetic import LlamaShape, write_llama_checkpoint
from tiblocal.vocab import BUNDLED_DIR
s = LlamaShape(vocab_size=56000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
if not Path("base/config.json").is_file():
    write_llama_checkpoint(Path("base"), s, BUNDLED_DIR / "tokenizer.model", dtype="float16",
                           max_shard_bytes=10 * 2**30)
PY
echo "random 7B checkpoint: $(awk "BEGIN{printf \"%.1f\", $EPOCHREALTIME - $t0}") s"
# The contenders, whole commands (Python's start and imports included), in the order RUNS gives: "tiblocal" is the
# CLI; "bare" is the same work through gptqmodel's API with no tiblocal in the timed path but the same calibration
# windows (cut beforehand with tiblocal's SentencePiece code, outside the timing).
python3 - "$samples" <<'PY'
import json, sys
from pathlib import Path
from tiblocal.quantize.gptq import calibration_windows, default_calibration
w = calibration_windows(Path("base"), [default_calibration()], int(sys.argv[1]), 512)
Path("windows.json").write_text(json.dumps(w))
PY
cat > bare.py <<PY
import contextlib, json, sys, time
t0 = time.perf_counter()
with contextlib.redirect_stdout(sys.stderr):  # gptqmodel's banner and tables
    from gptqmodel import GPTQModel, QuantizeConfig
    windows = json.load(open("windows.json"))
    model = GPTQModel.load("base", QuantizeConfig(bits=$bits, group_size=$group), device="$device")
    model.quantize(windows, batch_size=4)
    model.save("q")
print(json.dumps({"out": "q", "seconds": round(time.perf_counter() - t0, 1)}))
PY
n=0
IFS=, read -ra runs <<< "${RUNS:-tiblocal}"
for who in "${runs[@]}"; do
  n=$((n + 1)); rm -rf q
  case $who in
    tiblocal) cmd=(python3 -m tiblocal gptq base --bits "$bits" --group-size "$group" --samples "$samples" --out q --json --device "$device") ;;
    bare) cmd=(python3 bare.py) ;;
    *) echo "RUNS: tiblocal or bare, not $who"; exit 2 ;;
  esac
  t0=$EPOCHREALTIME
  "${cmd[@]}" > "$out/gptq_7b_${n}_$who.json" 2> "$out/gptq_7b_${n}_$who.log" &
  pid=$!
  peak=0  # the GPU's memory in use, sampled every second (the job is the only process on it)
  while kill -0 $pid 2>/dev/null; do
    m=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1); [ "$m" -gt "$peak" ] && peak=$m; sleep 1
  done
  wait $pid || { tail -30 "$out/gptq_7b_${n}_$who.log"; exit 1; }
  echo "run $n, $who: $(awk "BEGIN{printf \"%.1f\", $EPOCHREALTIME - $t0}") s for the whole command; peak GPU memory in use: $peak MiB; $(du -sh q | cut -f1) written"
  cat "$out/gptq_7b_${n}_$who.json"
done
