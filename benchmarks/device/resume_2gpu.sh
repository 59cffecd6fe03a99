#!/usr/bin/env bash
# Exact resume under accelerate on 2 GPUs (issue 6): with DDP and with FSDP, each tiny recipe (tiny-pretrain:
# full-parameter; tiny-sft: LoRA with dropout and trained embed_tokens/lm_head) runs 8 steps straight, and 4 steps
# then 4 more resumed from its checkpoint; the losses of steps 5-8 and the final eval loss must agree.
# Usage (from the repository root: the tiny recipes read tests/data): [ENGINES=fsdp] resume_2gpu.sh OUTDIR
set -uo pipefail
out=$(realpath "$1"); repo=$(pwd); export PYTHONUNBUFFERED=1
launch=(python3 -m accelerate.commands.launch)
w=/tmp/resume; rm -rf $w; mkdir -p $w "$out"
cd $w && ln -s "$repo/tests" tests  # run outside the checkout (its tiblocal/ would shadow the installed package)
python3 -m tiblocal pretrain tiny-pretrain output_dir=$w/base --json > /dev/null 2> $w/base.err || { tail -5 $w/base.err; exit 1; }
for eng in ${ENGINES:-ddp fsdp}; do
  for stage in pretrain sft; do
    if [ $stage = pretrain ]; then args=(pretrain tiny-pretrain); else args=(sft tiny-sft "base_model=$w/base/model"); fi
    r=$w/$eng-$stage
    for run in "straight 8" "resumed 4" "resumed 8"; do
      set -- $run
      "${launch[@]}" --config_file "$repo/finetune/configs/accelerate/$eng-2gpu.yaml" -m tiblocal "${args[@]}" \
        "output_dir=$r-$1" "max_steps=$2" --json > "$r-$1-$2.json" 2> "$r-$1-$2.err" || { echo "$eng $stage $run failed"; tail -5 "$r-$1-$2.err"; }
    done
  done
done
python3 - $w "$out" "${ENGINES:-ddp fsdp}" <<'PY'
import json, sys
from pathlib import Path
w, out = Path(sys.argv[1]), Path(sys.argv[2])
report = {}
for eng in sys.argv[3].split():
    for stage in ("pretrain", "sft"):
        m = {}
        for run in ("straight", "resumed"):
            f = w / f"{eng}-{stage}-{run}" / "metrics.jsonl"
            m[run] = [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []
        late = lambda rows: {r["step"]: r["loss"] for r in rows if r["step"] > 4}
        a, b = late(m["straight"]), late(m["resumed"])
        res = json.loads((w / f"{eng}-{stage}-resumed-8.json").read_text() or "{}") if (w / f"{eng}-{stage}-resumed-8.json").stat().st_size else {}
        ref = json.loads((w / f"{eng}-{stage}-straight-8.json").read_text() or "{}") if (w / f"{eng}-{stage}-straight-8.json").stat().st_size else {}
        report[f"{eng}-{stage}"] = {
            "steps_compared": sorted(set(a) & set(b)), "resumed_from": res.get("resumed_from"),
            "max_loss_diff_steps_5_8": max((abs(a[s] - b[s]) for s in set(a) & set(b)), default=None),
            "eval_loss": [ref.get("eval_loss"), res.get("eval_loss")],
            "loss_straight": [a.get(s) for s in sorted(a)], "loss_resumed": [b.get(s) for s in sorted(b)],
        }
text = json.dumps(report, indent=1)
print(text)
(out / "resume_2gpu.json").write_text(text)
PY
