#!/usr/bin/env bash
# Diagnosis of an open problem: with llama-cpp-python 0.3.36 built for CUDA (build_llama_cpp_cuda.sh) on the H100
# host, every tiblocal command that loads a model segfaulted in llama_model_load_from_file (CPU or GPU layers), while
# a process that imported llama_cpp before anything else loaded the same file through tiblocal's Engine. This builds
# the CUDA bindings, writes a tiny model and loads it in fresh processes with the imports in different orders; each
# line says whether that order loads (rc 0, OK) or crashes (rc 139).
# Usage: gpu_import_order.sh SDIST TOKENIZER   (needs tiblocal, gguf and diskcache importable, e.g. PYTHONPATH=/tmp/site)
set -uo pipefail
sdist=$(realpath "$1"); tok=$(realpath "$2"); here=$(cd "$(dirname "$0")" && pwd)
export PYTHONFAULTHANDLER=1
w=/tmp/import-order; mkdir -p $w && cd $w
python3 - "$tok" <<'PY'
import sys
from pathlib import Path
from tiblocal.synthetic import LlamaShape, write_llama_checkpoint
write_llama_checkpoint(Path("tiny"), LlamaShape(vocab_size=55296, hidden_size=256, intermediate_size=512,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096),
    Path(sys.argv[1]), dtype="float16")
PY
python3 -m tiblocal convert tiny --out tiny.gguf --outtype f16 --force --json | tail -1
bash "$here/build_llama_cpp_cuda.sh" "$sdist" $w/whl > $w/build.log 2>&1 || { tail -20 $w/build.log; exit 1; }
python3 -m pip install -q --no-deps --no-compile --target $w/site $w/whl/*.whl
export PYTHONPATH=$w/site:${PYTHONPATH:-}
lib=$w/site/llama_cpp/lib/libllama.so
run() { timeout 60 python3 -c "$2" > $w/v.out 2>&1; echo "$1: rc=$? $(grep -m1 -o 'OK.*' $w/v.out)"; }
E="from tiblocal.engine import Engine, EngineConfig; print('OK', Engine('tiny.gguf', EngineConfig(ctx=64)).n_vocab)"
run "tiblocal's Engine alone" "$E"
run "llama_cpp, numpy, then Engine" "import llama_cpp, numpy; $E"
run "numpy, llama_cpp, then Engine" "import numpy, llama_cpp; $E"
run "numpy, then llama_cpp.Llama" "import numpy, llama_cpp; m = llama_cpp.Llama('tiny.gguf', verbose=False); print('OK')"
run "libllama loaded (ctypes.CDLL), numpy, then Engine" "import ctypes; ctypes.CDLL('$lib'); import numpy; $E"
run "numpy, libllama loaded, then Engine" "import numpy, ctypes; ctypes.CDLL('$lib'); $E"
