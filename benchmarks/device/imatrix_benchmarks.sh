#!/usr/bin/env bash
# Importance matrices at 7B scale on the GPU host, after `STAGE=prepare KEEP_BASE=1 SKIP=merge cpu_benchmarks.sh ...`
# (which leaves the random 7B-shaped HF folder in /tmp/bench/base, its f16 GGUF /tmp/bench/ours.gguf and llama-quantize).
# Usage: [ROUNDS=1] [BUDGET=300] [DTYPE=f32] [ROTATE="0"] imatrix_benchmarks.sh OUTDIR quantize|make
#   make:     bench_imatrix.py: `tiblocal imatrix` (100 windows of 512 on the GPU) against a bare forward pass, ABBA;
#             once per entry of ROTATE ("-": as converted; a seed: `tiblocal imatrix --rotate SEED`), default "-".
#             Without /tmp/bench/base it writes one first (random, 7B-shaped, f16, the bundled 56,000-piece tokenizer).
#   quantize: `tiblocal imatrix` once (timed), then bench_quantize.py Q4_K_M with that matrix against
#             `llama-quantize --imatrix`, 16 threads, ABBA rounds within BUDGET seconds
set -uo pipefail
out=$(realpath "$1"); what=$2
here=$(cd "$(dirname "$0")/.." && pwd)
work=/tmp/bench; lq=$(ls -d /tmp/src/llama_cpp_python-* 2>/dev/null)/vendor/llama.cpp/build/bin/llama-quantize
cd $here
if [ "$what" = make ]; then
  mkdir -p $work
  [ -f $work/base/config.json ] || python3 -c "
from pathlib import Path
from tiblocal.models import DATA_DIR
from tiblocal.synthetic import LlamaShape, write_llama_checkpoint
s = LlamaShape(vocab_size=56000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
write_llama_checkpoint(Path('$work/base'), s, DATA_DIR / 'tokenizer' / 'tokenizer.model', dtype='float16',
                       max_shard_bytes=10 * 2**30)
"
  for r in ${ROTATE:--}; do
    rot=(); [ "$r" = - ] || rot=(--rotate "$r")
    python3 bench_imatrix.py $work/base --device cuda --chunks 100 --rounds "${ROUNDS:-1}" --dtype "${DTYPE:-f32}" \
      "${rot[@]}" --work $work --json $out/imatrix${rot:+-rotate$r}.json
  done
else
  /usr/bin/time -f "imatrix: %e s, peak RSS %M KiB" python3 -m tiblocal imatrix $work/base --out $work/im.gguf --chunks 100 \
    --device cuda --force --json 2>&1 | tail -2 | tee $out/imatrix_once.txt
  python3 bench_quantize.py $work/ours.gguf --llama-quantize $lq --threads "$(nproc)" --types Q4_K_M \
    --imatrix $work/im.gguf --rounds "${ROUNDS:-1}" --budget "${BUDGET:-300}" --json $out/quantize_imatrix.json
fi
