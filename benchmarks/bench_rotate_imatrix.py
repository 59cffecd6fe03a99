"""What an importance matrix adds to `tiblocal quantize --rotate` at 4 bits, on a trained model.

    python benchmarks/bench_rotate_imatrix.py HF_DIR --text DEV1.txt.xz DEV2.txt.xz --types Q4_0,Q4_K_M:Q5_0 \
        --seeds 3 --max-windows 100 --work DIR

HF_DIR (a merged Hugging Face model) is converted to f16, the reference. The importance matrices are measured in
one pass over the calibration text (default: the bundled Tibetan excerpt, 100 windows of 512, as `tiblocal
imatrix`): the model as converted, and the model as each rotation seed turns it (`tiblocal imatrix --rotate S`).
Then per type (TYPE or TYPE:OUTPUT_TYPE, as release's --types), each against the reference on the same windows
(`eval compare`): without a matrix, with the matrix, and per seed rotated without a matrix and rotated with that
rotation's matrix. Prints one JSON line per file and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    from tiblocal.convert.hf_to_gguf import hf_to_gguf
    from tiblocal.quantize.evaluate import GGUFSource, compare, read_text
    from tiblocal.quantize.gguf_quant import quantize_gguf
    from tiblocal.quantize.calibration import calibration_texts
    from tiblocal.quantize.imatrix import IMATRIX_CTX, compute_imatrices
    from tiblocal.quantize.rotated_quant import quantize_rotated

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--text", type=Path, nargs="+", required=True, help="evaluation text (never the calibration text)")
    ap.add_argument("--types", default="Q4_0,Q4_K_M", help="TYPE or TYPE:OUTPUT_TYPE, comma-separated")
    ap.add_argument("--seeds", type=int, default=3, help="rotations 0..N-1")
    ap.add_argument("--imatrix-text", type=Path, nargs="+", default=[])
    ap.add_argument("--imatrix-chunks", type=int, default=100)
    ap.add_argument("--max-windows", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", type=Path, required=True)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    ref_path = a.work / "reference-f16.gguf"
    hf_to_gguf(a.hf_dir, ref_path, outtype="f16")
    seeds = list(range(a.seeds))
    t0 = time.perf_counter()
    measured = compute_imatrices(a.hf_dir, calibration_texts(a.imatrix_text, "--imatrix-text"), [None, *seeds],
                                 chunks=a.imatrix_chunks, ctx=IMATRIX_CTX, device="cpu")
    print(json.dumps({"imatrices": 1 + len(seeds), "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    plain_im, rotated_im = measured[0][0], {s: m[0] for s, m in zip(seeds, measured[1:])}
    text = read_text(a.text)
    ref = GGUFSource(ref_path, 512, a.threads, 0)
    rows = []

    def measure(qtype: str, how: str, seed: int | None, path: Path) -> None:
        q = GGUFSource(path, 512, a.threads, 0)
        r = compare(ref, q, text, 512, max_windows=a.max_windows)
        q.close()
        row = {"type": qtype, "file": how, "seed": seed, "size_mib": path.stat().st_size / 2**20,
               "delta_ppl_pct": r.delta_ppl_pct, "delta_ppl_pct_se": r.delta_ppl_pct_se, "mean_kl": r.mean_kl,
               "top1": r.top1_agreement}
        rows.append(row)
        print(json.dumps(row), flush=True)
        path.unlink()

    for spec in a.types.split(","):
        qtype, _, out_type = spec.partition(":")
        opts = {"output_tensor_type": out_type or None, "threads": a.threads}
        for how, im in (("plain", None), ("imatrix", plain_im)):
            (r,) = quantize_gguf(ref_path, a.work / f"{how}-{qtype}.gguf", [qtype], imatrix=im, force=True, **opts)
            measure(spec, how, None, r.path)
        for s in seeds:
            for how, im in (("--rotate", None), ("--rotate + its imatrix", rotated_im[s])):
                (r,), _, _ = quantize_rotated(ref_path, a.work / f"rot{s}-{qtype}.gguf", [qtype], seed=s, imatrix=im,
                                              force=True, **opts)
                measure(spec, how, s, r.path)
    ref.close()
    print("\n| type | file | seed | MiB | ΔPPL | mean KL | top-1 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['file']} | {'' if r['seed'] is None else r['seed']} | {r['size_mib']:.1f} | "
              f"{r['delta_ppl_pct']:+.3f}% ± {r['delta_ppl_pct_se']:.3f}% | {r['mean_kl']:.6f} | {100 * r['top1']:.2f}% |")
    print()
    for spec in dict.fromkeys(r["type"] for r in rows):
        for how in ("--rotate", "--rotate + its imatrix"):
            sel = [r for r in rows if r["type"] == spec and r["file"] == how]
            if sel:
                kl = [r["mean_kl"] for r in sel]
                d = [r["delta_ppl_pct"] for r in sel]
                print(f"{spec} {how}: mean KL median {statistics.median(kl):.6f} ({min(kl):.6f}-{max(kl):.6f}), "
                      f"ΔPPL median {statistics.median(d):+.3f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
