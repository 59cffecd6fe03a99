"""Start-up cost of the `tiblocal` command: help, and `tiblocal quantize` of a tiny model beside the same C call.

    python benchmarks/bench_startup.py [--llama-quantize build/bin/llama-quantize] [--rounds 9] [--json OUT]

A quantize job of a 7B model spends 15-20 s in llama.cpp's C code, the same in every contender; what `tiblocal
quantize` adds is a fixed cost: the Python process, its imports, the checks. A tiny f16 model (the bundled
tokenizer's 56,000-token vocabulary, hidden 64, 2 layers: 16 MB) makes that cost the whole measurement. The
contenders run one after another in each round, in a new order every round (seeded), and the table gives each one's
median and best wall time over the rounds and the median of its run-by-run difference to the reference (the bare
bindings call for `tiblocal quantize`, ``python -c pass`` for the rest).
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_convert_merge import emit
from bench_quantize import BARE


def tiny_f16(folder: Path) -> Path:
    from tiblocal.convert.hf_to_gguf import hf_to_gguf
    from tiblocal.synthetic import LlamaShape, write_llama_checkpoint
    from tiblocal.vocab import tokenizer_dir

    tok = tokenizer_dir("bundled") / "tokenizer.model"
    shape = LlamaShape(vocab_size=56000, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    hf = write_llama_checkpoint(folder / "hf", shape, tok, dtype="float16")
    out = folder / "tiny-f16.gguf"
    hf_to_gguf(hf, out, outtype="f16")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-quantize", type=Path, help="also time llama.cpp's binary on the same model")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    py, tib = sys.executable, [sys.executable, "-m", "tiblocal"]
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        model, out = tiny_f16(work), work / "out.gguf"
        model_bytes = model.stat().st_size
        q = [str(model), str(out), "Q8_0", str(args.threads)]
        cmds = {
            "python -c pass": ([py, "-c", "pass"], None),
            "tiblocal --help": ([*tib, "--help"], "python -c pass"),
            "tiblocal verify --help": ([*tib, "verify", "--help"], "python -c pass"),
            "tiblocal chat --help": ([*tib, "chat", "--help"], "python -c pass"),
            "bare bindings quantize": ([py, "-c", BARE, *q], "python -c pass"),
            "tiblocal quantize": ([*tib, "quantize", str(model), "--type", "Q8_0", "--out", str(out),
                                   "--threads", str(args.threads), "--force"], "bare bindings quantize"),
        }
        if args.llama_quantize:
            cmds["llama-quantize"] = ([str(args.llama_quantize.resolve()), *q], "python -c pass")  # runs in work
        times: dict[str, list[float]] = {k: [] for k in cmds}
        rng = random.Random(0)
        for _ in range(args.rounds):
            names = list(cmds)
            rng.shuffle(names)
            for name in names:
                out.unlink(missing_ok=True)
                t0 = time.perf_counter()  # not bench_convert_merge.measure: it polls every 0.1 s, too coarse here
                # cwd: from a source checkout's root, python -m tiblocal would import the tree, not the install
                subprocess.run(cmds[name][0], check=True, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - t0)
    result: dict = {"rounds": args.rounds, "model_bytes": model_bytes}
    for name, (_, ref) in cmds.items():
        row = {"median_ms": round(statistics.median(times[name]) * 1000, 1), "best_ms": round(min(times[name]) * 1000, 1)}
        if ref:
            row["over"] = ref
            row["median_difference_ms"] = round(statistics.median(a - b for a, b in zip(times[name], times[ref])) * 1000, 1)
        result[name] = row
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
