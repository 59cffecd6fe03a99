"""Time of `tiblocal imatrix` against a bare transformers forward pass over the same windows, same model and device.

    python benchmarks/bench_imatrix.py HF_DIR --device cuda --chunks 100 --rounds 2 [--rotate SEED] --json imatrix.json

Both run as child processes, alternating (A B B A, ``--rounds`` times): ``tiblocal imatrix HF_DIR --chunks N``
(load, the hooks on every matrix product, the GGUF written) and a bare script that loads the model the same way
(transformers, ``--dtype``, straight onto the device) and runs the same windows (cut by tiblocal's ``calibration_windows``, as
the command cuts them) with no hooks. The ratio is what collecting the importance matrix adds to the forward
passes it needs; the bare run also reports its own load and forward seconds. ``--rotate SEED`` times
``tiblocal imatrix --rotate SEED`` instead (the matrix in a rotated model's basis: each norm's input normalised and
turned, each head's slice of attn_output's input turned).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench_convert_merge import emit, measure
from bench_quantize import median_ci
from tiblocal.quantize.imatrix import DTYPES

BARE = """
import json, sys, time
from pathlib import Path
import torch, transformers
from tiblocal.quantize.calibration import calibration_texts, calibration_windows
from tiblocal.quantize.imatrix import DTYPES
hf, chunks, ctx, device, split = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5])
dtype = getattr(torch, DTYPES[sys.argv[6]])
texts = calibration_texts([Path(p) for p in sys.argv[7:]], "--text")
t0 = time.perf_counter()
windows = calibration_windows(hf, texts, chunks, ctx)
model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=dtype, device_map=device).eval()
if device == "cuda":
    torch.cuda.synchronize()
t1 = time.perf_counter()
with torch.inference_mode():
    for w in windows:
        model(input_ids=torch.tensor([w["input_ids"]], device=device))
if device == "cuda":
    torch.cuda.synchronize()
t2 = time.perf_counter()
split.write_text(json.dumps({"load_s": round(t1 - t0, 3), "forward_s": round(t2 - t1, 3)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path, help="a Hugging Face Llama folder with tokenizer.model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--dtype", default="f32", choices=list(DTYPES))
    ap.add_argument("--text", nargs="+", type=Path, default=[], help="default: the bundled calibration excerpt")
    ap.add_argument("--rounds", type=int, default=1, help="ABBA rounds")
    ap.add_argument("--rotate", type=int, default=None, metavar="SEED", help="time tiblocal imatrix --rotate SEED")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    hf = args.hf_dir.resolve()
    texts = [str(t.resolve()) for t in args.text]
    work = Path(tempfile.mkdtemp(dir=args.work))
    out, split = work / "imatrix.gguf", work / "split.json"
    cmds = {
        "tiblocal": [sys.executable, "-m", "tiblocal", "imatrix", str(hf), "--out", str(out), "--chunks", str(args.chunks),
                     "--ctx", str(args.ctx), "--device", args.device, "--dtype", args.dtype, "--force",
                     *(["--text", *texts] if texts else []), *(["--rotate", str(args.rotate)] if args.rotate is not None else [])],
        "bare_forward": [sys.executable, "-c", BARE, str(hf), str(args.chunks), str(args.ctx), args.device, str(split),
                         args.dtype, *texts],
    }
    runs: dict[str, list[dict]] = {who: [] for who in cmds}
    result: dict = {"model": str(hf), "device": args.device, "dtype": args.dtype, "chunks": args.chunks, "ctx": args.ctx,
                    "rotate": args.rotate, "runs": runs}
    order = list(cmds) + list(cmds)[::-1]
    for _ in range(args.rounds):
        for who in order:
            r = measure(cmds[who], cwd=work)
            if who == "bare_forward":  # its own split of load and forward time
                r.update(json.loads(split.read_text()))
            runs[who].append(r)
    ratios = [a["seconds"] / b["seconds"] for a, b in zip(runs["tiblocal"], runs["bare_forward"])]
    lo, hi = median_ci(ratios)
    result.update({
        "median_seconds": {who: round(statistics.median(r["seconds"] for r in rs), 3) for who, rs in runs.items()},
        "paired_ratio_median": round(statistics.median(ratios), 3), "paired_ratio_ci95": [round(lo, 3), round(hi, 3)],
        "pairs": len(ratios),
    })
    from tiblocal.quantize.imatrix import load_imatrix

    result["entries"] = len(load_imatrix(out).entries)
    out.unlink()
    split.unlink()
    work.rmdir()
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
