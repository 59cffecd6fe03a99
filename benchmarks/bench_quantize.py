"""Quantization time of `tiblocal quantize` against llama.cpp's `llama-quantize` binary, same input, same threads.

    python benchmarks/bench_quantize.py MODEL-f16.gguf --llama-quantize build/bin/llama-quantize --threads 16

Both run as child processes, alternating, and each output's tensors are compared (same C code, so the
files should hold the same bytes).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from bench_convert_merge import emit, measure, same_tensors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="an f16 GGUF")
    ap.add_argument("--llama-quantize", type=Path, required=True)
    ap.add_argument("--types", default="Q4_K_M,Q8_0")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=2, help="1: one run each; 2: ABBA")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: beside the model)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.model = args.model.resolve()
    work = Path(tempfile.mkdtemp(dir=args.work or args.model.parent))
    result: dict = {"model": str(args.model), "model_bytes": args.model.stat().st_size, "threads": args.threads}
    for qtype in args.types.split(","):
        ref, ours = work / f"ref-{qtype}.gguf", work / f"ours-{qtype}.gguf"
        runs = {"llama_quantize": [], "tiblocal": []}
        cmds = {
            "llama_quantize": lambda out: [str(args.llama_quantize), str(args.model), str(out), qtype, str(args.threads)],
            "tiblocal": lambda out: [sys.executable, "-m", "tiblocal", "quantize", str(args.model), "--type", qtype,
                                     "--out", str(out), "--threads", str(args.threads), "--force"],
        }
        # ABBA order, each run starting with no dirty pages from the one before (the outputs are GBs)
        for who in ("llama_quantize", "tiblocal", "tiblocal", "llama_quantize")[: 4 if args.repeats > 1 else 2]:
            os.sync()
            runs[who].append(measure(cmds[who](ref if who == "llama_quantize" else ours), cwd=work))
        best = {who: min(r["seconds"] for r in rs) for who, rs in runs.items()}
        result[qtype] = {**runs, "best_seconds": best, "ratio": round(best["tiblocal"] / best["llama_quantize"], 3),
                         "identical_tensors": same_tensors(ours, ref), "bytes": ours.stat().st_size}
        ref.unlink()
        ours.unlink()
    work.rmdir()
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
