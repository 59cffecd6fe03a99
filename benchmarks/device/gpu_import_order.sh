#!/usr/bin/env bash
# Which import orders load a model through a CUDA build of llama-cpp-python (build_llama_cpp_cuda.sh). Built without
# --exclude-libs (EXTRA_CMAKE_ARGS=-DCMAKE_SHARED_LINKER_FLAGS=), the H100 host's libggml-cuda.so carries and exports
# a copy of libstdc++ (its g++ links libstdc++.a into it); before tiblocal.bindings shared the process's libstdc++
# (share_cxx_runtime), every load after sentencepiece or torch segfaulted in llama_model_load_from_file, and torch
# aborted when imported after llama.cpp. This builds the bindings (unless WHEEL_DIR already holds the wheel), writes a
# tiny model and loads it in fresh processes after different imports (load_probe.py); each line gives the exit status
# (0 loads, 139 a segfault, 134 an abort) and the runtimes mapped before the load. The last order (llama-cpp-python's
# own `import llama_cpp`, then torch) bypasses tiblocal: it aborts with the build above and loads with the build
# script's default link (--exclude-libs,ALL), with which libggml-cuda.so exports no libstdc++ symbols.
# Usage: [WHEEL_DIR=DIR] gpu_import_order.sh SDIST TOKENIZER   (needs tiblocal, gguf and diskcache importable,
#        e.g. PYTHONPATH=/tmp/site; the wheel is left in WHEEL_DIR, default /tmp/import-order/whl)
set -uo pipefail
sdist=$(realpath "$1"); tok=$(realpath "$2"); here=$(cd "$(dirname "$0")" && pwd)
export PYTHONFAULTHANDLER=1
w=/tmp/import-order; whl=${WHEEL_DIR:-$w/whl}; mkdir -p $w && cd $w
python3 - "$tok" <<'PY'
import sys
from pathlib import Path
from tiblocal.synthetic import LlamaShape, write_llama_checkpoint
write_llama_checkpoint(Path("tiny"), LlamaShape(vocab_size=55296, hidden_size=256, intermediate_size=512,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096),
    Path(sys.argv[1]), dtype="float16")
PY
python3 -m tiblocal convert tiny --out tiny.gguf --outtype f16 --force --json | tail -1
if ! ls $whl/*.whl > /dev/null 2>&1; then
  t=$(date +%s)
  bash "$here/build_llama_cpp_cuda.sh" "$sdist" $whl > $w/build.log 2>&1 || { tail -20 $w/build.log; exit 1; }
  echo "CUDA build: $(( $(date +%s) - t )) s, $(du -h $whl/*.whl | cut -f1)"
fi
python3 -m pip install -q --no-deps --no-compile --target $w/site $whl/*.whl
export PYTHONPATH=$w/site:${PYTHONPATH:-}
echo "nvcc: $(nvcc --version | grep -o 'release [0-9.]*'); torch: $(python3 -c 'import torch; print(torch.__version__, torch.version.cuda)')"
echo "libggml-cuda.so links: $(ldd $w/site/llama_cpp/lib/libggml-cuda.so | grep -o 'lib\(cudart\|cublas\|cublasLt\|cuda\)\.so[^ ]* => [^ ]*' | tr '\n' ';')"
probe() {  # LABEL ARGS...
  local label=$1; shift
  timeout 120 python3 "$here/load_probe.py" tiny.gguf "$@" > $w/p.out 2>&1; local rc=$?
  echo "$label: rc=$rc $(grep -m1 -o '^OK.*' $w/p.out)"
  echo "    $(grep -m1 '^mapped before' $w/p.out)"
  [ $rc = 0 ] || grep -m3 'File "\|error\|Error' $w/p.out | sed 's/^/    /'
}
probe "Engine, llama.cpp loaded first" --n-gpu-layers -1
probe "Engine after sentencepiece" --pre sentencepiece
probe "Engine, 0 layers, after torch with its CUDA context" --pre torch --torch-cuda
probe "Engine, all layers, after torch with its CUDA context" --pre torch --torch-cuda --n-gpu-layers -1
probe "llama.cpp loaded first, then torch with its CUDA context, then Engine on all layers" --load-first --pre torch --torch-cuda --n-gpu-layers -1
probe "llama_cpp imported first (llama-cpp-python's own load), then torch" --pre llama_cpp,torch
