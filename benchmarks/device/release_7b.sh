#!/usr/bin/env bash
# One `tiblocal release` of a 7B-shaped model on the GPU host, stage by stage (bench_release.py): the f16 GGUF, an
# importance matrix made on the GPU, Q4_K_M and Q8_0 with it on every core, the model card and SHA256SUMS.
# Run it after `STAGE=prepare KEEP_BASE=1 SKIP="merge convert" cpu_benchmarks.sh ...`, which leaves the random
# 7B-shaped HF folder in /tmp/bench/base and builds the CPU llama-cpp-python into /tmp/site.
# Usage: [TYPES=Q4_K_M,Q8_0] [DTYPE=bf16] release_7b.sh OUTDIR
set -euo pipefail
out=$(realpath "$1"); here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
python3 bench_release.py /tmp/bench/base --types "${TYPES:-Q4_K_M,Q8_0}" --make-imatrix --imatrix-dtype "${DTYPE:-bf16}" \
  --device cuda --threads "$(nproc)" --work /tmp/bench --json "$out/release.json"
