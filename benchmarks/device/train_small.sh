#!/usr/bin/env bash
# Makes the bundled model's second version (issue 28) on one GPU host, from the checkout alone: the tokenizer
# (`tiblocal vocab extend --no-split-whitespace`, issue 3's best recipe), the Tibetan instruction set, small-pretrain
# (from scratch, for a time budget), small-sft, then `tiblocal release` (f16 GGUF, an importance matrix made on
# Tibetan text, Q4_K_M and Q8_0, their cost against f16 on dev news and written text). Perplexity per syllable on the
# dev split's modern files is measured after each stage (the first run measured it only on the final file: 49.8 on
# news, no better than the first model, while its pretraining dev loss was 0.6 nats lower than the first model's), and
# the held-out tense and QA rows and TLUE (0-shot) are scored on the Q4_K_M file.
#
# Usage, from the repository root, in calls of the device tool (each under its 10 minutes; the run goes on between them):
#   STAGE=prep  benchmarks/device/train_small.sh DIR OUT             # optional, here before the lease: the tokenizer
#                                                                    # and instruction set into DIR/prep.tar.xz (35 s
#                                                                    # here; about 90 s of device time saved)
#   STAGE=start benchmarks/device/train_small.sh DIR OUT [SECONDS]   # starts the run detached, then waits as below
#   STAGE=wait  benchmarks/device/train_small.sh DIR OUT             # waits up to 9 minutes; when the run is done,
#                                                                    # OUT holds the results
# DIR holds what travels with the call: data/ (the shared data's corpus/ and eval/), lcp-src.tar.gz or .tar.xz (llama-cpp-python's
# sdist, built here for the CPU: release quantizes and evaluates through it) and whl/ (gguf). SECONDS is the
# pretraining time budget (default 720): a 15-step probe measures tokens/s and max_steps is set to what fits.
# A trial run on any machine: DIR without lcp-src.tar.* uses the llama-cpp-python already installed, and
# EXTRA="key=value ..." is added to both stages' overrides (e.g. model_config.hidden_size=64 batch_size=2), and
# SAMPLE_CHARS (default 49000000) is the tokenizer's training sample.
# OUT receives small-Q4_K_M.gguf.part-* (cat them back together), results.tar (the release's table, model card,
# importance matrix, both stages' metrics and resolved recipes, generation_config.json, the perplexities and task
# scores) and run.log; from every wait, finished or not, whatever the run has made so far.
set -uo pipefail
dir=$(realpath "$1"); out=$(realpath "$2"); budget=${3:-720}; here=$(cd "$(dirname "$0")/../.." && pwd)
root=/tmp/small; work=$root/w; src=/tmp/lcp
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 EXTRA=${EXTRA:-}
lcp=$(ls "$dir"/lcp-src.tar.* 2>/dev/null | head -1)   # .tar.gz as pip downloads it, or .tar.xz (smaller)
[ -n "$lcp" ] && export LLAMA_CPP_LIB_PATH=$src/vendor/llama.cpp/build/bin
mkdir -p "$out"

# the tokenizer and the instruction set (CPU work: 35 s on the 2-core machine, 86 s for the tokenizer on the host), into
# runs/ of the current folder
prep() {
  python3 -m tiblocal vocab extend --base ../shared/data/tokenizers/llama2/tokenizer.model \
    --corpus ../shared/data/corpus/train/*.txt.xz --weight derge_kangyur=0.3 --add 24000 --sample-chars ${SAMPLE_CHARS:-49000000} \
    --no-split-whitespace --out runs/tokenizer --json > $root/tokenizer.json
  python3 -m tiblocal.finetune.instructions --data ../shared/data --out runs/instructions
}

pipeline() {
  set -e
  cd $work
  modern="../shared/data/corpus/dev/tibnlp_modern_tibettimes_news.txt.xz ../shared/data/corpus/dev/tibnlp_modern_tibetcm.txt.xz ../shared/data/corpus/dev/esukhia_nanhai_written.txt.xz"
  mkdir -p runs
  if [ -f "$dir/prep.tar.xz" ]; then   # made beforehand by STAGE=prep, on any machine
    tar xJf "$dir/prep.tar.xz" -C runs && mv runs/tokenizer.json $root/
  else
    prep
  fi
  EXTRA="tokenizer=runs/tokenizer $EXTRA"
  # the probe: 15 steps on one file, compiled as the run is; a failed compile falls back to eager layers
  compile=true
  python3 -m tiblocal pretrain small-pretrain output_dir=$root/probe max_steps=15 log_every=1 eval_every=1000 $EXTRA \
    "train_files=[../shared/data/corpus/train/esukhia_nanhai_written.txt.xz]" "train_weights={}" "holdout={}" keep_best=false --json \
    > $root/probe.json 2> $root/probe.err || {
      tail -5 $root/probe.err; compile=false; rm -rf $root/probe
      python3 -m tiblocal pretrain small-pretrain output_dir=$root/probe max_steps=15 log_every=1 eval_every=1000 \
        compile=false $EXTRA "train_files=[../shared/data/corpus/train/esukhia_nanhai_written.txt.xz]" "train_weights={}" "holdout={}" keep_best=false \
        --json > $root/probe.json 2> $root/probe.err; }
  steps=$(python3 -c "
import json; m = [json.loads(l) for l in open('$root/probe/metrics.jsonl')]
a, b = m[4], m[13]   # steps 5 and 14: the warm rate (step 15 also evaluates)
tps = (b['step'] - a['step']) * 64 * 1024 / (b['seconds'] - a['seconds'])
print(min(6000, int($budget * tps / (64 * 1024))), round(tps), file=open('$root/steps', 'w'))
")
  read steps tps < $root/steps
  echo "probe: $tps tokens/s, compile=$compile; pretraining steps: $steps"
  python3 -m tiblocal pretrain small-pretrain max_steps=$steps compile=$compile $EXTRA --json 2> $root/pretrain.err
  for f in $modern; do python3 -m tiblocal eval ppl runs/small-pretrain/model --per-syllable --ctx 1024 --text $f --json; done \
    > $root/ppl-pretrain.jsonl 2> $root/ppl.err
  echo "pretrained, per syllable (news, essays, written): $(grep -o '"ppl_syllable": [0-9.]*' $root/ppl-pretrain.jsonl | tr '\n' ' ')"
  python3 -m tiblocal sft small-sft compile=$compile $EXTRA --json 2> $root/sft.err
  for f in $modern; do python3 -m tiblocal eval ppl runs/small-sft/model --per-syllable --ctx 1024 --text $f --json; done \
    > $root/ppl-sft.jsonl 2>> $root/ppl.err
  echo "tuned, per syllable (news, essays, written): $(grep -o '"ppl_syllable": [0-9.]*' $root/ppl-sft.jsonl | tr '\n' ' ')"
  for _ in $(seq 120); do [ -f $root/build.rc ] && break; sleep 5; done
  [ "$(cat $root/build.rc)" = 0 ] || { echo "llama.cpp build failed"; tail -20 $root/build.log; exit 1; }
  python3 -m tiblocal release runs/small-sft/model --name tiblocal-small --out release --types Q4_K_M,Q8_0 \
    --make-imatrix --eval-text ../shared/data/corpus/dev/tibnlp_modern_tibettimes_news.txt.xz \
    ../shared/data/corpus/dev/esukhia_nanhai_written.txt.xz --max-windows 100 --threads 16 \
    --notes "$here/finetune/small/model-notes.md" --json 2> $root/release.err
  for t in tense qa; do python3 -m tiblocal eval tasks release/tiblocal-small-Q4_K_M.gguf --task $t \
    --data runs/instructions/heldout_$t.jsonl --threads 16 --json > $root/task-$t.json 2>> $root/tasks.err; done
  python3 -m tiblocal eval mcq release/tiblocal-small-Q4_K_M.gguf --data ../shared/data/eval/tlue_mcq.jsonl.xz \
    --threads 16 --json > $root/task-mcq.json 2>> $root/tasks.err
}

# what the run has made so far, into OUT (results.tar, the Q4_K_M file in parts): also from a run still going or failed
collect() {
  rm -rf $root/res && mkdir -p $root/res && cd $work || return
  if [ -f "$dir/prep.tar.xz" ]; then md5sum runs/tokenizer/tokenizer.model > $root/res/tokenizer.md5   # DIR has it
  else mkdir -p $root/res/tokenizer && cp runs/tokenizer/* $root/res/tokenizer/; fi 2>/dev/null
  cp $root/ppl-*.jsonl $root/task-*.json $root/tokenizer.json $root/probe.json $root/steps $root/*.err $root/res/ 2>/dev/null
  for stage in pretrain sft; do
    cp runs/small-$stage/metrics.jsonl $root/res/$stage-metrics.jsonl 2>/dev/null
    cp runs/small-$stage/run_config.yaml $root/res/$stage-run_config.yaml 2>/dev/null
  done
  cp runs/small-sft/model/generation_config.json runs/small-sft/model/config.json runs/instructions/heldout_*.jsonl \
    release/*.md release/*.json release/*.imatrix.gguf release/SHA256SUMS $root/res/ 2>/dev/null
  ls -la release > $root/res/release-files.txt 2>/dev/null
  tar cf "$out/results.tar" -C $root res
  [ -f release/tiblocal-small-Q4_K_M.gguf ] && split -b 15M release/tiblocal-small-Q4_K_M.gguf "$out/small-Q4_K_M.gguf.part-"
  return 0
}

case "${STAGE:?STAGE=prep|start|wait}" in
prep)
  # here, before the lease: DIR/prep.tar.xz then travels with DIR and the run starts at the probe
  [ -d "$dir/data/corpus" ] || { echo "$dir/data/corpus is missing: DIR holds the shared data's corpus/ and eval/"; exit 1; }
  set -e; root=$(mktemp -d); mkdir -p $root/shared $root/w/runs && ln -sfn "$dir/data" $root/shared/data && cd $root/w
  (export PYTHONPATH=; prep)
  mv $root/tokenizer.json runs/ && tar cJf "$dir/prep.tar.xz.part" -C runs tokenizer instructions tokenizer.json
  mv "$dir/prep.tar.xz.part" "$dir/prep.tar.xz" && rm -rf $root && ls -la "$dir/prep.tar.xz" ;;
start)
  rm -rf $root && mkdir -p $root/shared $work && ln -sfn "$dir/data" $root/shared/data
  mkdir -p /tmp/site && [ -d "$dir/whl" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site "$dir"/whl/*.whl
  # tiblocal as it installs (the stage folders are tiblocal.convert, tiblocal.quantize, tiblocal.finetune)
  mkdir -p /tmp/pkg && cp -r "$here/tiblocal" /tmp/pkg/ && for s in convert quantize finetune pipelines; do
    [ -d "$here/$s" ] && ln -sfn "$here/$s" /tmp/pkg/tiblocal/$s; done
  # llama.cpp for the CPU (release quantizes with its quantizer and measures with it), on 6 of the 16 cores
  [ -n "$lcp" ] || echo 0 > $root/build.rc
  [ -n "$lcp" ] && mkdir -p $src && tar xf "$lcp" -C $src && cp -r $src/llama_cpp /tmp/site/ && \
  setsid bash -c "cd $src/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF \
      -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
      -DLLAMA_BUILD_APP=OFF -DCMAKE_BUILD_TYPE=Release > $root/build.log 2>&1 \
    && cmake --build build -j 6 --target llama >> $root/build.log 2>&1; echo \$? > $root/build.rc" \
    < /dev/null > /dev/null 2>&1 &
  export -f pipeline prep; export root work budget here dir
  setsid bash -c "(pipeline) > $root/run.log 2>&1; echo \$? > $root/run.rc" < /dev/null > /dev/null 2>&1 &
  sleep 2; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc
  STAGE=wait exec "$0" "$@" ;;
wait)
  # the device tool gives an idle machine back after about 30 s: on a fresh one, say so at once
  [ -f $root/run.log ] || { echo "STAGE=wait finds no run on this machine (a fresh one: the last was given back)"; exit 1; }
  for _ in $(seq 108); do [ -f $root/run.rc ] && break; sleep 5; done
  grep -v "it/s\]\|^$" $root/run.log | tail -c 3000
  if [ -f $root/run.rc ]; then
    echo "run: exit $(cat $root/run.rc)"
    for f in probe pretrain sft release; do [ -s $root/$f.err ] && { echo "--- $f.err"; grep -v "it/s\]\|torchao\|W12" $root/$f.err | tail -5; }; done
  else
    echo "still running: $(tail -c 300 $root/pretrain.err 2>/dev/null | tr '\r' '\n' | tail -2)"
  fi
  cp $root/run.log "$out/"; collect; ls -la "$out" ;;
esac
