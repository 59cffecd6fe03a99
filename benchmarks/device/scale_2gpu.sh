#!/usr/bin/env bash
# Scaling of `tiblocal pretrain` from 1 to 2 GPUs of one host (issue 6): the demo-pretrain recipe (full-parameter,
# 28M parameters) on modern Tibetan text for STEPS steps, once on one GPU, then under accelerate launch with
# data parallelism (DDP) and with FSDP on two. Each process takes batch_size blocks a step, so the global batch
# doubles on two GPUs (weak scaling); tokens/s comes from the metrics between two logged steps after warm-up.
# Usage: scale_2gpu.sh SHARED_DATA OUTDIR [STEPS]
set -uo pipefail
data=$(realpath "$1"); out=$(realpath "$2"); steps=${3:-80}
repo=$(cd "$(dirname "$0")/../.." && pwd)
export PYTHONUNBUFFERED=1
mkdir -p /tmp/scale/shared /tmp/scale/w; ln -sfn "$data" /tmp/scale/shared/data; cd /tmp/scale/w
args=(demo-pretrain "max_steps=$steps" log_every=10 eval_every=100000 save_every=100000 "train_weights={}"
      "train_files=[../shared/data/corpus/train/esukhia_nanhai_written.txt.xz,../shared/data/corpus/train/tibnlp_modern_tibettimes_news.txt.xz]")
launch=(python3 -m accelerate.commands.launch)
python3 -m tiblocal pretrain "${args[@]}" output_dir=/tmp/scale/gpu1 --json > $out/gpu1.json 2> /tmp/scale/gpu1.err
"${launch[@]}" --config_file $repo/finetune/configs/accelerate/ddp-2gpu.yaml -m tiblocal pretrain "${args[@]}" \
  output_dir=/tmp/scale/ddp2 --json > $out/ddp2.json 2> /tmp/scale/ddp2.err
"${launch[@]}" --config_file $repo/finetune/configs/accelerate/fsdp-2gpu.yaml -m tiblocal pretrain "${args[@]}" \
  output_dir=/tmp/scale/fsdp2 --json > $out/fsdp2.json 2> /tmp/scale/fsdp2.err
for r in gpu1 ddp2 fsdp2; do
  cp /tmp/scale/$r/metrics.jsonl $out/$r-metrics.jsonl 2>/dev/null
  echo "== $r"; grep -v "Writing model\|Loading weights" /tmp/scale/$r.err | tail -8
done > $out/errors.txt
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1]); rates = {}
for r in ("gpu1", "ddp2", "fsdp2"):
    p = out / f"{r}-metrics.jsonl"
    if not p.is_file():
        continue
    m = [json.loads(l) for l in p.read_text().splitlines()]
    a, b = m[1], m[-2]  # steps 20 and the last logged before the final step
    per_step = 64 * 1024 * (1 if r == "gpu1" else 2)
    rates[r] = round((b["step"] - a["step"]) * per_step / (b["seconds"] - a["seconds"]))
    print(r, rates[r], "tokens/s", "final loss", m[-1]["loss"])
if "gpu1" in rates:
    print({k: round(v / rates["gpu1"], 3) for k, v in rates.items()})
PY
