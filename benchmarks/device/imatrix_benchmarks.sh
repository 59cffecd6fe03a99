#!/usr/bin/env bash
# Importance matrices at 7B scale on the GPU host, after `STAGE=prepare KEEP_BASE=1 SKIP=merge cpu_benchmarks.sh ...`
# (which leaves the random 7B-shaped HF folder in /tmp/bench/base, its f16 GGUF /tmp/bench/ours.gguf and llama-quantize).
# Usage: [ROUNDS=1] [BUDGET=300] imatrix_benchmarks.sh OUTDIR quantize|make
#   make:     bench_imatrix.py: `tiblocal imatrix` (100 windows of 512 on the GPU) against a bare forward pass, ABBA
#   quantize: `tiblocal imatrix` once (timed), then bench_quantize.py Q4_K_M with that matrix against
#             `llama-quantize --imatrix`, 16 threads, ABBA rounds within BUDGET seconds
set -uo pipefail
out=$(realpath "$1"); what=$2
here=$(cd "$(dirname "$0")/.." && pwd)
work=/tmp/bench; lq=$(ls -d /tmp/src/llama_cpp_python-*)/vendor/llama.cpp/build/bin/llama-quantize
cd $here
if [ "$what" = make ]; then
  python3 bench_imatrix.py $work/base --device cuda --chunks 100 --rounds "${ROUNDS:-1}" --work $work --json $out/imatrix.json
else
  /usr/bin/time -f "imatrix: %e s, peak RSS %M KiB" python3 -m tiblocal imatrix $work/base --out $work/im.gguf --chunks 100 \
    --device cuda --force --json 2>&1 | tail -2 | tee $out/imatrix_once.txt
  python3 bench_quantize.py $work/ours.gguf --llama-quantize $lq --threads "$(nproc)" --types Q4_K_M \
    --imatrix $work/im.gguf --rounds "${ROUNDS:-1}" --budget "${BUDGET:-300}" --json $out/quantize_imatrix.json
fi
