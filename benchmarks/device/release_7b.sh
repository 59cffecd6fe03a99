#!/usr/bin/env bash
# One `tiblocal release` of a 7B-shaped model on the GPU host, stage by stage (bench_release.py): the f16 GGUF, an
# importance matrix made on the GPU, Q4_K_M and Q8_0 with it on every core, the model card and SHA256SUMS; then
# bench_sha256sums.py on the folder it wrote (the digests several files at a time against one after another).
# With EVAL=FILE the release also measures each file on that text (MAXW windows of 512, default 50), all layers on
# the GPU (a CUDA build of llama-cpp-python, build_llama_cpp_cuda.sh, must be the one importable).
# Run it after `STAGE=prepare KEEP_BASE=1 SKIP="merge convert" cpu_benchmarks.sh ...`, which leaves the random
# 7B-shaped HF folder in /tmp/bench/base and builds the CPU llama-cpp-python into /tmp/site.
# Usage: [TYPES=Q4_K_M,Q8_0] [DTYPE=bf16] [SHA_ROUNDS=2] [EVAL=FILE [MAXW=50]] release_7b.sh OUTDIR
set -euo pipefail
out=$(realpath "$1"); here=$(cd "$(dirname "$0")/.." && pwd)
evalargs=()
[ -n "${EVAL:-}" ] && evalargs=(--eval-text "$(realpath "$EVAL")" --max-windows "${MAXW:-50}" --n-gpu-layers -1)
cd "$here"
python3 bench_release.py /tmp/bench/base --types "${TYPES:-Q4_K_M,Q8_0}" --make-imatrix --imatrix-dtype "${DTYPE:-bf16}" \
  --device cuda --threads "$(nproc)" --work /tmp/bench --keep "${evalargs[@]}" --json "$out/release.json"
rel=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['kept'])" "$out/release.json")
[ "${SHA_ROUNDS:-2}" = 0 ] || python3 bench_sha256sums.py "$rel" --rounds "${SHA_ROUNDS:-2}" --no-coreutils --json "$out/sha256sums.json"
