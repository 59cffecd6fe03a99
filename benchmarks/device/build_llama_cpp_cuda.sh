#!/usr/bin/env bash
# Build llama-cpp-python with CUDA for Hopper (sm_90) from a local sdist, as a wheel in $2.
# Usage: build_llama_cpp_cuda.sh llama_cpp_python-X.tar.gz OUTDIR
# The sdist can be repacked without vendor/llama.cpp/{models,docs,media,tests,benches,examples}
# (not needed to build). The flash attention kernels are built (GGML_CUDA_FA, on by default): leaving them out halves
# the compile time but costs 14% of decode speed at Q4_K_M on the H200, and `tiblocal serve --flash-attn on` needs them.
# --exclude-libs,ALL: the H100 host's g++ links its static libstdc++.a into libggml-cuda.so, which then exports a
# second copy of the C++ runtime; linked this way it keeps that copy to itself, and the bindings load next to torch in
# any import order (gpu_import_order.sh). EXTRA_CMAKE_ARGS=-DCMAKE_SHARED_LINKER_FLAGS= builds without it.
set -euo pipefail
sdist=$1; out=$2
export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL ${EXTRA_CMAKE_ARGS:-}"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
python3 -m pip wheel --no-build-isolation --no-deps -w "$out" "$sdist"
