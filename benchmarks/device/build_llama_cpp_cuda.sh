#!/usr/bin/env bash
# Build llama-cpp-python with CUDA for Hopper (sm_90) from a local sdist, as a wheel in $2.
# Usage: build_llama_cpp_cuda.sh llama_cpp_python-X.tar.gz OUTDIR
# The sdist can be repacked without vendor/llama.cpp/{models,docs,media,tests,benches,examples}
# (not needed to build). FlashAttention kernels are left out to halve the compile time.
set -euo pipefail
sdist=$1; out=$2
export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF ${EXTRA_CMAKE_ARGS:-}"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
python3 -m pip wheel --no-build-isolation --no-deps -w "$out" "$sdist"
