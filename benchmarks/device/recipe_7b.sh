#!/usr/bin/env bash
# The 7B pretraining recipe as a user runs it (`tiblocal pretrain tibetan-llama2-7b-pretrain`) on one GPU, from a
# random Llama-2-7B-shaped model (no weights can be fetched on the GPU machine): its LoRA, trained embeddings, bundled
# tokenizer, batch 32 in micro-batches of 4, compile; a few steps, then the warm tokens/s out of metrics.jsonl.
# Usage: recipe_7b.sh SHARED_DATA OUTDIR [STEPS]
#   SHARED_DATA: the shared data folder (corpus/); needs tiblocal installed with [train].
set -euo pipefail
data=$(realpath "$1"); out=$(realpath "$2"); steps=${3:-12}
export PYTHONUNBUFFERED=1
mkdir -p /tmp/r7/shared /tmp/r7/w "$out"; ln -sfn "$data" /tmp/r7/shared/data; cd /tmp/r7/w
t0=$(date +%s)
python3 -m tiblocal pretrain tibetan-llama2-7b-pretrain base_model=scratch \
  "model_config={hidden_size: 4096, intermediate_size: 11008, num_hidden_layers: 32, num_attention_heads: 32, num_key_value_heads: 32, max_position_embeddings: 4096}" \
  "train_files=[../shared/data/corpus/train/esukhia_nanhai_written.txt.xz]" output_dir=/tmp/r7/run \
  max_steps="$steps" warmup_steps=2 log_every=1 eval_every=100000 save_every=100000 --json > "$out/recipe_7b.json"
echo "whole run: $(( $(date +%s) - t0 )) s"
cp /tmp/r7/run/metrics.jsonl "$out/recipe_7b_metrics.jsonl"
python3 - "$out/recipe_7b_metrics.jsonl" <<'PY'
import json, sys
m = [json.loads(line) for line in open(sys.argv[1])]
a, b = m[2], m[-2]  # after step 3 (compiled, warm) to the step before the last (the last one also evaluates)
tokens = (b["step"] - a["step"]) * 32 * 1024
print(json.dumps({"steps": [a["step"], b["step"]], "warm_tokens_per_s": round(tokens / (b["seconds"] - a["seconds"])),
                  "loss": [m[0]["loss"], m[-1]["loss"]], "eval_loss": m[-1].get("eval_loss")}))
PY
