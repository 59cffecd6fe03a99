#!/usr/bin/env bash
# The 7B-scale CPU benchmarks of convert, merge and quantize, as run on the 16-core H100 host.
# Usage: [SKIP=merge] [QTYPES=Q8_0] [QARGS="--rounds 2 --bare"] [STAGE=prepare|quantize] [KEEP_BASE=1] cpu_benchmarks.sh SDIST TOKENIZER OUTDIR [convert-reference]
#   STAGE splits the work into two calls on the same machine (each under the GPU tool's 10 minutes): prepare (builds,
#   random checkpoint, convert and merge benchmarks), then quantize (the quantize benchmark on what prepare left in /tmp).
#   SDIST: llama-cpp-python sdist (its vendor/llama.cpp gives llama-quantize and convert_hf_to_gguf.py)
#   TOKENIZER: a 55,296-piece tokenizer.model (Chinese-LLaMA-2's); OUTDIR: where the JSON results go.
# Needs tiblocal (and gguf, diskcache) importable; builds llama-quantize and a CPU llama-cpp-python while the
# random 7B checkpoint is written (single-threaded), and measures only after the builds are done.
set -uo pipefail
sdist=$(realpath "$1"); tok=$(realpath "$2"); out=$(realpath "$3"); mode=${4:-}
here=$(cd "$(dirname "$0")/.." && pwd)
src=/tmp/src; work=/tmp/bench; mkdir -p $src $work
stage=${STAGE:-all}
if [ "$stage" = quantize ]; then
  lc=$(ls -d $src/llama_cpp_python-*)
  python3 $here/bench_quantize.py $work/ours.gguf --llama-quantize $lc/vendor/llama.cpp/build/bin/llama-quantize \
    --threads "$(nproc)" --types "${QTYPES:-Q4_K_M,Q8_0}" ${QARGS:-} --json $out/quantize.json
  exit
fi
tar xzf "$sdist" -C $src && lc=$(ls -d $src/llama_cpp_python-*)
( cd $lc/vendor/llama.cpp && cmake -B build -DGGML_CUDA=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF > /tmp/lq.log 2>&1 \
  && nice -n 19 cmake --build build --target llama-quantize -j 8 >> /tmp/lq.log 2>&1 ) & b1=$!
( CMAKE_ARGS="-DGGML_CUDA=OFF -DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=8 nice -n 19 \
  python3 -m pip wheel -q --no-build-isolation --no-deps -w /tmp/whc $lc > /tmp/lcp.log 2>&1 ) & b2=$!
(cd $work && python3 -c "
from pathlib import Path
from tiblocal.synthetic import LlamaShape, write_llama_checkpoint
s = LlamaShape(vocab_size=55296, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
if not Path('base/config.json').is_file():
    write_llama_checkpoint(Path('base'), s, Path('$tok'), dtype='float16', max_shard_bytes=10 * 2**30)
")
wait $b1; echo "llama-quantize build: $?"; wait $b2; echo "llama-cpp-python build: $?"
python3 -m pip install -q --no-deps --no-compile --target /tmp/site /tmp/whc/*.whl
# --no-compile (here and where tiblocal was installed) leaves no bytecode; compile it as a plain pip install does, so
# no timed Python run compiles its imports (each run would, where PYTHONDONTWRITEBYTECODE is set: 0.2 s more for
# llama_cpp and gguf alone on the 2-core machine)
python3 -m compileall -q /tmp/site > /dev/null
echo "PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-unset}; $(find /tmp/site -name '*.pyc' | wc -l) .pyc files in /tmp/site"
mkdir -p /tmp/lc && cp -r $lc/vendor/llama.cpp/{convert_hf_to_gguf.py,conversion,gguf-py} /tmp/lc/
skip="--skip reference ${SKIP:-}"; [ "$mode" = convert-reference ] && skip="--skip ${SKIP:-}"
python3 $here/bench_convert_merge.py --llama-cpp /tmp/lc --tokenizer "$tok" --work $work --keep $skip \
  --json $out/convert_merge.json
# the f16 GGUF stays for STAGE=quantize; KEEP_BASE=1 keeps the HF folder too (imatrix_benchmarks.sh runs it)
[ "$stage" = prepare ] && { [ -n "${KEEP_BASE:-}" ] || rm -rf $work/base; exit; }
python3 $here/bench_quantize.py $work/ours.gguf --llama-quantize $lc/vendor/llama.cpp/build/bin/llama-quantize \
  --threads "$(nproc)" --types "${QTYPES:-Q4_K_M,Q8_0}" ${QARGS:-} --json $out/quantize.json
