"""Quantization time of `tiblocal quantize` against llama.cpp's `llama-quantize` binary, same input, same threads.

    python benchmarks/bench_quantize.py MODEL-f16.gguf --llama-quantize build/bin/llama-quantize --threads 16

Both run as child processes, alternating, and each output's tensors are compared (same C code, so the
files should hold the same bytes).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench_convert_merge import measure, same_tensors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="an f16 GGUF")
    ap.add_argument("--llama-quantize", type=Path, required=True)
    ap.add_argument("--types", default="Q4_K_M,Q8_0")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: beside the model)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.model = args.model.resolve()
    work = Path(tempfile.mkdtemp(dir=args.work or args.model.parent))
    result: dict = {"model": str(args.model), "model_bytes": args.model.stat().st_size, "threads": args.threads}
    for qtype in args.types.split(","):
        ref, ours = work / f"ref-{qtype}.gguf", work / f"ours-{qtype}.gguf"
        r = measure([str(args.llama_quantize), str(args.model), str(ref), qtype, str(args.threads)], cwd=work)
        o = measure([sys.executable, "-m", "tiblocal", "quantize", str(args.model), "--type", qtype, "--out", str(ours),
                     "--threads", str(args.threads)], cwd=work)
        result[qtype] = {"llama_quantize": r, "tiblocal": o, "ratio": round(o["seconds"] / r["seconds"], 3),
                         "identical_tensors": same_tensors(ours, ref), "bytes": ours.stat().st_size}
        ref.unlink()
        ours.unlink()
    work.rmdir()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
