#!/usr/bin/env bash
# `tiblocal serve` on the GPU host against llama-batched-bench, both on one llama.cpp build and one 7B-shaped Q4_K_M model
# (random weights, the 55,296-piece vocabulary), all layers on the GPU, flash attention on.
#
# Usage, in three calls of the device tool (each under its 10 minutes), from the repository root:
#   STAGE=start benchmarks/device/serve_gpu.sh DIR OUT   # starts the CUDA build and the model's making, detached
#   STAGE=wait  benchmarks/device/serve_gpu.sh DIR OUT   # waits (up to 9 minutes) and reports how far they got
#   STAGE=bench benchmarks/device/serve_gpu.sh DIR OUT   # llama-batched-bench and bench_serve.py, side by side
#   STAGE=engine benchmarks/device/serve_gpu.sh DIR OUT  # issue 26's host-CPU figures: bench_engine.py on the same
#                                                        # Q4_K_M against llama-bench, both on a CPU-only build (built
#                                                        # after the CUDA one, in build-cpu/), 16 threads
#   STAGE=overlap benchmarks/device/serve_gpu.sh DIR OUT # the decode loop's text-while-decoding (2026-12-05) against
#                                                        # the loop before it (serve_overlap.patch reversed on a copy),
#                                                        # 8 and 16 clients, in alternating pairs
# DIR holds what travels with the call: lcp-src.tar.gz (llama-cpp-python's sdist: llama_cpp/ and vendor/llama.cpp,
# without models, docs and examples), whl/ (starlette, uvicorn, pydantic and its parts, gguf: what the host lacks) and
# a 55,296-piece tokenizer.model as cl2-tokenizer.model. OUT is where the logs and JSON go.
#
# One build serves both sides: llama.cpp with CUDA for sm_90 and flash attention (-DGGML_CUDA_FA=ON, the default),
# shared libraries; llama-cpp-python's own Python layer loads that libllama.so (LLAMA_CPP_LIB_PATH), so tiblocal and
# llama-batched-bench run the same kernels.
set -uo pipefail
dir=$(realpath "$1"); out=$(realpath "$2"); here=$(cd "$(dirname "$0")/../.." && pwd)
src=/tmp/lcp; work=/tmp/serve7b; mkdir -p "$out" $work
export PYTHONPATH=/tmp/pkg:/tmp/site LLAMA_CPP_LIB_PATH=$src/vendor/llama.cpp/build/bin
# The device tool gives an idle machine back after about 30 s: a later stage that lands on a fresh machine says so at
# once instead of waiting its 9 minutes for a run that is not there.
[ "${STAGE:-}" = start ] || [ -f $work/started ] || {
  echo "STAGE=${STAGE:-} finds no run on this machine (a fresh one: the last was given back); begin with STAGE=start"; exit 1; }
case "${STAGE:?STAGE=start|wait|bench|engine|overlap}" in
start)
  touch $work/started
  mkdir -p $src && tar xzf "$dir/lcp-src.tar.gz" -C $src
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$dir"/whl/*.whl
  cp -r $src/llama_cpp /tmp/site/
  # tiblocal as it installs (the stage folders are tiblocal.convert, tiblocal.quantize, tiblocal.finetune)
  mkdir -p /tmp/pkg && cp -r "$here/tiblocal" /tmp/pkg/ && for s in convert quantize finetune pipelines; do ln -sfn "$here/$s" /tmp/pkg/tiblocal/$s; done
  setsid bash -c "cd $src/vendor/llama.cpp && cmake -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=ON \
      -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DCMAKE_BUILD_TYPE=Release > $out/build.log 2>&1 \
    && cmake --build build -j 14 --target llama llama-batched-bench llama-bench llama-quantize >> $out/build.log 2>&1; \
    echo \$? > $work/build.rc; \
    cmake -B build-cpu -DGGML_CUDA=OFF -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
      -DCMAKE_BUILD_TYPE=Release > $out/build-cpu.log 2>&1 \
    && cmake --build build-cpu -j 14 --target llama llama-bench >> $out/build-cpu.log 2>&1; \
    echo \$? > $work/build-cpu.rc" < /dev/null > /dev/null 2>&1 &
  # the model, meanwhile, on the remaining cores: a random f16 checkpoint, converted by tiblocal
  setsid bash -c "cd $work && python3 -c \"
from pathlib import Path
from tiblocal.synthetic import LlamaShape, write_llama_checkpoint
from tiblocal.convert.hf_to_gguf import hf_to_gguf
s = LlamaShape(vocab_size=55296, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
write_llama_checkpoint(Path('base'), s, Path('$dir/cl2-tokenizer.model'), dtype='float16', max_shard_bytes=10 * 2**30)
hf_to_gguf(Path('base'), Path('f16.gguf'), outtype='f16', template='alpaca')
\" > $out/model.log 2>&1; echo \$? > $work/model.rc; rm -rf $work/base" < /dev/null > /dev/null 2>&1 &
  sleep 5; echo started; nproc; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader ;;
wait)
  for _ in $(seq 108); do [ -f $work/build.rc ] && [ -f $work/model.rc ] && break; sleep 5; done
  echo "build: $(cat $work/build.rc 2>/dev/null || echo running)  model: $(cat $work/model.rc 2>/dev/null || echo running)" \
       " CPU build: $(cat $work/build-cpu.rc 2>/dev/null || echo running)"
  tail -3 $out/build.log; tail -3 $out/model.log; ls -la $work ;;
bench)
  bin=$src/vendor/llama.cpp/build/bin
  [ -f $work/q4km.gguf ] || $bin/llama-quantize $work/f16.gguf $work/q4km.gguf Q4_K_M 16 > $out/quantize.log 2>&1 \
    || { tail -5 $out/quantize.log; exit 1; }
  ls -la $work
  cd "$here" && PYTHONUNBUFFERED=1 python3 benchmarks/bench_serve.py $work/q4km.gguf --clients 1,2,4,8,16 --requests 4 \
    --prompt-tokens 128 --max-tokens 128 --no-chaos --batched-bench $bin/llama-batched-bench \
    --batched-bench-args "-ngl 99 -fa on" --json "$out/serve_gpu.json" \
    -- --parallel 16 --n-gpu-layers -1 --flash-attn on --threads 16 2>&1 | tee "$out/serve_gpu.log"
  # the decode loop alone in steady state (no HTTP), against the same S_TG
  PYTHONUNBUFFERED=1 python3 benchmarks/bench_slots.py $work/q4km.gguf --slots 1,8,16 --n-gpu-layers -1 --flash-attn on \
    --threads 16 --batched-bench $bin/llama-batched-bench --batched-bench-args "-ngl 99 -fa on" \
    --json "$out/slots_gpu.json" 2>&1 | tail -4 | tee "$out/slots_gpu.log"
  # the same load with hostile requests mixed in (correctness under load on the GPU build)
  PYTHONUNBUFFERED=1 python3 benchmarks/bench_serve.py $work/q4km.gguf --clients 16 --requests 6 \
    --prompt-tokens 128 --max-tokens 128 --json "$out/serve_gpu_chaos.json" \
    -- --parallel 16 --n-gpu-layers -1 --flash-attn on --threads 16 2>&1 | tail -4 | tee "$out/serve_gpu_chaos.log" ;;
engine)
  for _ in $(seq 60); do [ -f $work/build-cpu.rc ] && break; sleep 5; done
  [ "$(cat $work/build-cpu.rc 2>/dev/null)" = 0 ] || { echo "CPU build: $(cat $work/build-cpu.rc 2>/dev/null || echo running)"; tail -5 $out/build-cpu.log; exit 1; }
  [ -f $work/q4km.gguf ] || $src/vendor/llama.cpp/build/bin/llama-quantize $work/f16.gguf $work/q4km.gguf Q4_K_M 16 \
    > $out/quantize.log 2>&1 || { tail -5 $out/quantize.log; exit 1; }
  # tiblocal's side loads llama-bench's own libllama (bench_engine.py sets LLAMA_CPP_LIB_PATH to the binary's folder)
  cd "$here" && PYTHONUNBUFFERED=1 python3 benchmarks/bench_engine.py $work/q4km.gguf \
    --llama-bench $src/vendor/llama.cpp/build-cpu/bin/llama-bench --threads 16 --rounds 3 \
    --json "$out/engine_cpu.json" 2>&1 | tee "$out/engine_cpu.log" ;;
overlap)
  bin=$src/vendor/llama.cpp/build/bin
  rm -rf /tmp/pkg-before && cp -rL /tmp/pkg /tmp/pkg-before
  patch -R -p1 -d /tmp/pkg-before < "$here/benchmarks/device/serve_overlap.patch" > $out/patch.log 2>&1 \
    || (cd /tmp/pkg-before && git apply -R "$here/benchmarks/device/serve_overlap.patch") >> $out/patch.log 2>&1 \
    || { echo "the patch did not reverse:"; cat $out/patch.log; exit 1; }
  for i in 1 2; do
    for side in before after; do
      # the server runs from the package folder, whose tiblocal comes first on its path (python -m puts the cwd first)
      pkg=/tmp/pkg; [ $side = before ] && pkg=/tmp/pkg-before
      (cd $pkg && PYTHONPATH=$pkg:/tmp/site PYTHONUNBUFFERED=1 python3 "$here/benchmarks/bench_serve.py" $work/q4km.gguf \
        --clients 8,16 --requests 4 --prompt-tokens 128 --max-tokens 128 --no-chaos --repeat 1 \
        --json "$out/overlap_${side}_$i.json" -- --parallel 16 --n-gpu-layers -1 --flash-attn on --threads 16 2>&1 \
        | tail -3 | sed "s/^/$side $i: /")
    done
  done ;;
esac
