"""What `tiblocal quantize --rotate` does to Q8_0's cost on a trained model, over several rotations.

    python benchmarks/bench_q8_rotate.py --text DEV1.txt.xz DEV2.txt.xz --max-windows 100 --seeds 10 --trials 8 --work DIR

The model (default: the bundled demo GGUF) is the reference; a quantized model is first written out dequantized to
f16 (matrices f16, the rest f32: the quantized file's values, rounded to f16), so the bundled model can be measured
without its original f16 file. Then, each against that reference on the same ids and windows (`eval compare`):
Q8_0 without rotation, Q8_0 with each rotation seed 0..N-1, and with --trials K the file `--rotate-trials K` keeps
(ranked on the bundled calibration text, which is drawn from the training split, never on --text). Prints one JSON
line per file and a Markdown table; it spreads over the seeds because at this size the sign and size of ΔPPL depend
on which way the 8-bit rounding falls (KL does not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np


def dequantized_copy(src: Path, dst: Path) -> None:
    """``src`` with every tensor dequantized: matrices F16 (the values rounded to f16), vectors F32; the same
    metadata, file type F16."""
    import gguf
    from gguf import LlamaFileType

    from tiblocal.gguf_file import copy_metadata

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, "llama")
    # the matrix the quantized file was made with does not describe the f16 copy
    copy_metadata(r, w, skip=lambda key: key.startswith("quantize.imatrix."),
                  values={"general.file_type": int(LlamaFileType.MOSTLY_F16)})
    for t in r.tensors:
        a = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        a = a.reshape([int(x) for x in reversed(t.shape)])
        w.add_tensor(t.name, a.astype(np.float16) if a.ndim == 2 else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> int:
    from tiblocal.gguf_file import read_gguf
    from tiblocal.models import DATA_DIR
    from tiblocal.quantize.evaluate import GGUFSource, compare, read_text
    from tiblocal.quantize.gguf_quant import quantize_gguf
    from tiblocal.quantize.rotated_quant import quantize_rotated

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DATA_DIR / "tiblocal-demo.gguf")
    ap.add_argument("--text", type=Path, nargs="+", required=True)
    ap.add_argument("--max-windows", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=10, help="rotations 0..N-1, each measured")
    ap.add_argument("--trials", type=int, default=0, help="also the file --rotate-trials K keeps")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", type=Path, required=True)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    ref_path = a.model
    if read_gguf(a.model, with_tokens=False).file_type not in ("F16", "ALL_F32", "BF16"):
        ref_path = a.work / "reference-f16.gguf"
        dequantized_copy(a.model, ref_path)
    text = read_text(a.text)
    ref = GGUFSource(ref_path, 512, a.threads, 0)
    rows = []

    def measure(label: str, path: Path, seed: int | None) -> None:
        q = GGUFSource(path, 512, a.threads, 0)
        r = compare(ref, q, text, 512, max_windows=a.max_windows)
        q.close()
        row = {"file": label, "seed": seed, "size_mib": path.stat().st_size / 2**20, "delta_ppl_pct": r.delta_ppl_pct,
               "delta_ppl_pct_se": r.delta_ppl_pct_se, "mean_kl": r.mean_kl, "top1": r.top1_agreement}
        rows.append(row)
        print(json.dumps(row), flush=True)
        path.unlink()

    (plain,) = quantize_gguf(ref_path, a.work / "plain-Q8_0.gguf", ["Q8_0"], threads=a.threads, force=True)
    measure("Q8_0", plain.path, None)
    for s in range(a.seeds):
        (r,), _, _ = quantize_rotated(ref_path, a.work / f"rot{s}-Q8_0.gguf", ["Q8_0"], seed=s, threads=a.threads,
                                      force=True)
        measure("Q8_0 --rotate", r.path, s)
    if a.trials > 1:
        (r,), seeds, _ = quantize_rotated(ref_path, a.work / "trials-Q8_0.gguf", ["Q8_0"], trials=a.trials,
                                          threads=a.threads, force=True)
        measure(f"Q8_0 --rotate --rotate-trials {a.trials}", r.path, seeds["Q8_0"])
    ref.close()
    rot = [r for r in rows if r["file"] == "Q8_0 --rotate"]
    print("\n| file | seed | MiB | ΔPPL | mean KL | top-1 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {'' if r['seed'] is None else r['seed']} | {r['size_mib']:.1f} | "
              f"{r['delta_ppl_pct']:+.3f}% ± {r['delta_ppl_pct_se']:.3f}% | {r['mean_kl']:.6f} | {100 * r['top1']:.2f}% |")
    if rot:
        d = [r["delta_ppl_pct"] for r in rot]
        print(f"\nrotations: ΔPPL median {statistics.median(d):+.3f}%, mean {statistics.mean(d):+.3f}%, range "
              f"{min(d):+.3f}% to {max(d):+.3f}%, {sum(x <= 0.1 for x in d)} of {len(d)} at most +0.1%; mean KL "
              f"{min(r['mean_kl'] for r in rot):.6f} to {max(r['mean_kl'] for r in rot):.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
