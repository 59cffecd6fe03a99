"""Where Q8_0's quality cost comes from: the rounded weights, or llama.cpp's 8-bit activations.

llama.cpp's Q8_0 matrix products round each activation row to 8 bits too (the CPU's vec_dot_q8_0_q8_0, CUDA's
MMQ), so `eval compare` of a Q8_0 GGUF measures both. This script builds a third file holding exactly the Q8_0
file's weights, dequantized to f32, which llama.cpp multiplies with f32 activations, and compares all against the
f16 GGUF on the same ids and windows:

    python benchmarks/bench_q8_split.py HF_DIR --text DEV1.txt.xz DEV2.txt.xz --max-windows 100 --work DIR

rows: f32 (control: the f16 file's precision alone), Q8_0 weights in f32 (the weights' share), Q8_0 (what users
run). It checks that the rounded file's tensors equal the Q8_0 file's, dequantized, bit for bit. Needs torch (the
model's bf16 tensors) and llama-cpp-python.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np


def rounded_copy(src: Path, dst: Path) -> None:
    """The HF folder with every matrix rounded through Q8_0 (from its f16 value, as the f16 GGUF holds it), in f32."""
    import gguf
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copyfile(f, dst / f.name)
    out = {}
    for shard in sorted(src.glob("*.safetensors")):
        for name, t in load_file(shard).items():
            a = t.to(torch.float16).float().numpy()
            if a.ndim == 2:
                q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
                a = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(a.shape)
            out[name] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text(encoding="utf-8"))
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def same_weights(q8: Path, rounded: Path) -> tuple[int, float]:
    """(matrices compared, largest difference) between the Q8_0 file dequantized and the rounded f32 file."""
    import gguf

    a = {t.name: t for t in gguf.GGUFReader(q8).tensors}
    n, worst = 0, 0.0
    for t in gguf.GGUFReader(rounded).tensors:
        qt = a[t.name]
        if qt.tensor_type != gguf.GGMLQuantizationType.Q8_0:
            continue
        x = gguf.quants.dequantize(qt.data, qt.tensor_type).reshape(-1)
        worst = max(worst, float(np.abs(x - np.asarray(t.data, dtype=np.float32).reshape(-1)).max()))
        n += 1
    return n, worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("hf_dir", type=Path)
    p.add_argument("--text", type=Path, nargs="+", required=True)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", type=Path, required=True, help="folder for the four GGUFs (about 4.5 × the f16 size)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()

    from tiblocal.convert.hf_to_gguf import hf_to_gguf
    from tiblocal.quantize.evaluate import compare, open_source, read_text
    from tiblocal.quantize.gguf_quant import quantize_gguf

    w = a.work
    w.mkdir(parents=True, exist_ok=True)
    f16, f32, q8, r32 = w / "f16.gguf", w / "f32.gguf", w / "q8_0.gguf", w / "q8_0-weights-f32.gguf"
    hf_to_gguf(a.hf_dir, f16, outtype="f16", force=True)
    hf_to_gguf(a.hf_dir, f32, outtype="f32", force=True)
    quantize_gguf(f16, q8, ["Q8_0"], threads=a.threads, force=True)
    rounded_copy(a.hf_dir, w / "rounded-hf")
    hf_to_gguf(w / "rounded-hf", r32, outtype="f32", force=True)
    n, worst = same_weights(q8, r32)
    print(f"rounded file against the Q8_0 file: {n} matrices, largest difference {worst}", file=sys.stderr)
    if n == 0 or worst != 0.0:
        print("the rounded weights are not the Q8_0 file's; the split below would mean nothing", file=sys.stderr)
        return 1

    text = read_text(a.text)
    ref = open_source(f16, ctx=a.ctx, threads=a.threads)
    rows = []
    for label, path in (("f32 (control)", f32), ("Q8_0 weights, f32 activations", r32), ("Q8_0", q8)):
        quant = open_source(path, ctx=a.ctx, threads=a.threads)
        r = compare(ref, quant, text, a.ctx, max_windows=a.max_windows)
        quant.close()
        row = {"file": label, "delta_ppl_pct": round(r.delta_ppl_pct, 4), "se_pct": round(r.delta_ppl_pct_se, 4),
               "mean_kl": round(r.mean_kl, 6), "top1": round(r.top1_agreement, 4), "ppl_ref": round(r.ppl_ref, 3),
               "ppl": round(r.ppl_quant, 3), "tokens": r.tokens_scored}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    ref.close()
    result = {"model": str(a.hf_dir), "text": [str(t) for t in a.text], "ctx": a.ctx, "windows": a.max_windows,
              "rows": rows}
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
