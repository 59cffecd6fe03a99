#!/usr/bin/env bash
# A shipped LoRA recipe as a user runs it (`tiblocal pretrain|sft RECIPE`) on one GPU, from a random model of the
# recipe's shape (no weights can be fetched on the GPU machine): its LoRA, trained embeddings, bundled tokenizer,
# batch 32 in micro-batches of 4, compile (and, for 13B, gradient checkpointing); a few steps, then the warm tokens/s
# out of metrics.jsonl and the GPU's peak memory. SIZE=7b-sft runs the instruction-tuning recipe
# (tibetan-alpaca-7b-sft) on the instruction set built from SHARED_DATA: examples of every length up to 1024 in
# batches grouped by length, so the compiled layers meet many shapes.
# Usage: [SIZE=7b|13b|7b-sft] [EXTRA="key=value ..."] recipe_gpu.sh SHARED_DATA OUTDIR [STEPS]
#   SHARED_DATA: the shared data folder (corpus/, eval/); needs tiblocal installed with [train].
set -euo pipefail
data=$(realpath "$1"); out=$(realpath "$2"); steps=${3:-12}; size=${SIZE:-7b}
shape7="hidden_size: 4096, intermediate_size: 11008, num_hidden_layers: 32, num_attention_heads: 32"
stage=pretrain; files="train_files=[../shared/data/corpus/train/esukhia_nanhai_written.txt.xz]"
case $size in
  7b) recipe=tibetan-llama2-7b-pretrain; shape=$shape7 ;;
  13b) recipe=tibetan-llama2-13b-pretrain; shape="hidden_size: 5120, intermediate_size: 13824, num_hidden_layers: 40, num_attention_heads: 40" ;;
  7b-sft) recipe=tibetan-alpaca-7b-sft; shape=$shape7; stage=sft; files="train_files=[data/instructions/train.jsonl]" ;;
  *) echo "SIZE must be 7b, 13b or 7b-sft"; exit 2 ;;
esac
export PYTHONUNBUFFERED=1
w=/tmp/recipe-$size; mkdir -p $w/shared $w/w "$out"; ln -sfn "$data" $w/shared/data; cd $w/w
[ $stage = sft ] && python3 -m tiblocal.finetune.instructions --data ../shared/data --out data/instructions > /dev/null
t0=$(date +%s)
python3 -m tiblocal $stage $recipe base_model=scratch "model_config={$shape, max_position_embeddings: 4096}" \
  "$files" output_dir=$w/run max_steps="$steps" warmup_steps=2 log_every=1 eval_every=100000 save_every=100000 \
  ${EXTRA:-} --json > "$out/recipe_$size.json" &
pid=$!
peak=0  # the GPU's memory in use, sampled every second (the run is the only process on it)
while kill -0 $pid 2>/dev/null; do
  m=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1); [ "$m" -gt "$peak" ] && peak=$m; sleep 1
done
wait $pid
echo "whole run: $(( $(date +%s) - t0 )) s; peak GPU memory in use: $peak MiB"
cp $w/run/metrics.jsonl "$out/recipe_${size}_metrics.jsonl"
python3 - "$out/recipe_${size}_metrics.jsonl" <<'PY'
import json, sys
m = [json.loads(line) for line in open(sys.argv[1])]
a, b = m[2], m[-2]  # after step 3 (compiled, warm) to the step before the last (the last one also evaluates)
# the metrics' tokens/s counts every token since the start (SFT: padding left out); the warm rate is the difference
tokens = b["tokens_per_s"] * b["seconds"] - a["tokens_per_s"] * a["seconds"]
print(json.dumps({"steps": [a["step"], b["step"]], "warm_tokens_per_s": round(tokens / (b["seconds"] - a["seconds"])),
                  "loss": [m[0]["loss"], m[-1]["loss"]], "eval_loss": m[-1].get("eval_loss")}))
PY
