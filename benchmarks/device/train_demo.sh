#!/usr/bin/env bash
# Trains the bundled demo model (issue 7) on one GPU: the Tibetan instruction set, demo-pretrain (from scratch),
# demo-sft; then writes the final model in bf16 (with its tokenizer and generation_config.json) as
# DIR/demo-model.tar split into 15 MB parts (cat DIR/demo-model.tar.* | tar x), or use /tmp/demo/w/runs/demo-sft/model.
# Usage: train_demo.sh SHARED_DATA OUTDIR [SECONDS]
#   SHARED_DATA: the shared data folder (corpus/, eval/); SECONDS: the pretraining time budget (default 300):
#   a 15-step probe measures tokens/s and max_steps is set to what fits (at most 2400).
# Needs tiblocal installed with [train]; runs in a scratch folder (the recipes' paths are ../shared/data/...).
set -euo pipefail
data=$(realpath "$1"); out=$(realpath "$2"); budget=${3:-300}
export PYTHONUNBUFFERED=1
work=/tmp/demo/w; mkdir -p /tmp/demo/shared $work $out; ln -sfn "$data" /tmp/demo/shared/data; cd $work
python3 -m tiblocal.finetune.instructions --data ../shared/data --out runs/instructions
t0=$(date +%s)
python3 -m tiblocal pretrain demo-pretrain output_dir=/tmp/demo/probe max_steps=15 log_every=1 eval_every=1000 \
  "train_files=[../shared/data/corpus/train/esukhia_nanhai_written.txt.xz]" "train_weights={}" --json > /tmp/demo/probe.json
steps=$(python3 -c "
import json; m = [json.loads(l) for l in open('/tmp/demo/probe/metrics.jsonl')]
a, b = m[4], m[13]   # steps 5 and 14: the warm rate (step 15 also evaluates)
tps = (b['step'] - a['step']) * 64 * 1024 / (b['seconds'] - a['seconds'])
print(min(2400, int($budget * tps / (64 * 1024))))
")
echo "probe: $(( $(date +%s) - t0 )) s; pretraining steps: $steps"
python3 -m tiblocal pretrain demo-pretrain max_steps=$steps --json | tee $out/pretrain.json
python3 -m tiblocal sft demo-sft --json | tee $out/sft.json
python3 - <<'PY'
import torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained("runs/demo-sft/model", dtype=torch.bfloat16)
m.save_pretrained("/tmp/demo/export/model")
PY
cp runs/demo-sft/model/{tokenizer.model,tokenizer.json,tokenizer_config.json,special_tokens_map.json,tiblocal_vocab.json} \
  runs/demo-sft/model/generation_config.json /tmp/demo/export/model/
cp runs/demo-pretrain/metrics.jsonl /tmp/demo/export/pretrain-metrics.jsonl
cp runs/demo-sft/metrics.jsonl /tmp/demo/export/sft-metrics.jsonl
cp runs/demo-pretrain/run_config.yaml /tmp/demo/export/pretrain-run_config.yaml
cp runs/demo-sft/run_config.yaml /tmp/demo/export/sft-run_config.yaml
tar cf - -C /tmp/demo export | split -b 15M - $out/demo-model.tar.
ls -la $out
