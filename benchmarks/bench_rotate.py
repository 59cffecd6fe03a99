"""What `tiblocal quantize --rotate` adds before llama.cpp quantizes: the rotation of an f16 GGUF, against copying it.

    python benchmarks/bench_rotate.py --shape 7b --work DIR        # a random Llama-2-7B-shaped f16 GGUF, made once
    python benchmarks/bench_rotate.py --model MODEL-f16.gguf --work DIR

Each rotation runs in its own process (its peak memory is its own: peak RSS, which counts the input's pages
mapped from disk, and peak anonymous memory, sampled every 50 ms; the time is the whole process, and the
rotation alone inside it is reported beside); the reference is a plain copy of the same file
in the same run (what any GGUF-to-GGUF step costs at least: reading and writing every byte). Prints JSON: seconds
per run, the ratio of medians, peak RSS, and a check that the rotated embedding rows kept their lengths (an
orthogonal change of basis keeps every length). Needs numpy and gguf only, no llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = {  # hidden, ffn, layers, heads, kv heads, vocab
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "small": (512, 1024, 4, 8, 8, 8000),
}


def write_random(path: Path, shape: str, seed: int = 0) -> None:
    """A random llama GGUF in f16 (norms f32, about 1), streamed tensor by tensor."""
    import gguf

    d, f, n_layer, n_head, n_kv, n_vocab = SHAPES[shape]
    hd = d // n_head
    tensors = [("token_embd.weight", (n_vocab, d)), ("output_norm.weight", (d,)), ("output.weight", (n_vocab, d))]
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", (d,)), (p + "attn_q.weight", (d, d)), (p + "attn_k.weight", (n_kv * hd, d)),
                    (p + "attn_v.weight", (n_kv * hd, d)), (p + "attn_output.weight", (d, d)),
                    (p + "ffn_norm.weight", (d,)), (p + "ffn_gate.weight", (f, d)), (p + "ffn_up.weight", (f, d)),
                    (p + "ffn_down.weight", (d, f))]
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(n_layer)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_context_length(4096)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for name, shp in tensors:
        dt = np.float16 if len(shp) == 2 else np.float32
        w.add_tensor_info(name, shp, np.dtype(dt), int(np.prod(shp)) * np.dtype(dt).itemsize)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    rng = np.random.default_rng(seed)
    for name, shp in tensors:
        if len(shp) == 1:
            a = (1.0 + 0.1 * rng.standard_normal(shp, dtype=np.float32))
        else:
            a = (0.02 * rng.standard_normal(shp, dtype=np.float32)).astype(np.float16)
        w.write_padding(fout, fout.tell())
        a.tofile(fout)
        w.write_padding(fout, a.nbytes)
    w.close()


def _rss_anon() -> int:
    """Resident memory of this process that is not a mapped file (the input GGUF's pages are), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _child(inp: str, out: str) -> None:
    import threading

    from tiblocal.quantize.rotate import rotate_gguf

    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], _rss_anon())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    rotate_gguf(Path(inp), Path(out), seed=0, force=True)
    dt = time.perf_counter() - t0
    done.set()
    sampler.join()
    print(json.dumps({"seconds": dt, "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "max_rss_anon_gib": max(peak[0], _rss_anon()) / 2**30}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="an f16/f32 llama GGUF (default: a random one of --shape in --work)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _child(*a.child)
        return 0
    import gguf

    a.work.mkdir(parents=True, exist_ok=True)
    model = a.model
    made = None
    if model is None:
        model = a.work / f"random-{a.shape}-f16.gguf"
        if not model.exists():
            t0 = time.perf_counter()
            write_random(model, a.shape)
            made = time.perf_counter() - t0
    out, copy = a.work / "rotated.gguf", a.work / "copy.gguf"
    rot, ref, rss, anon, inner = [], [], [], [], []
    for _ in range(a.rounds):
        os.sync()
        t0 = time.perf_counter()
        shutil.copyfile(model, copy)
        os.sync()
        ref.append(time.perf_counter() - t0)
        copy.unlink()
        os.sync()
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--work", str(a.work), "--child", str(model), str(out)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            sys.stderr.write(p.stderr)
            return 1
        os.sync()
        rot.append(time.perf_counter() - t0)
        child = json.loads(p.stdout.strip().splitlines()[-1])
        rss.append(child["max_rss_gib"])
        anon.append(child["max_rss_anon_gib"])
        inner.append(child["seconds"])
    src = {t.name: t for t in gguf.GGUFReader(model).tensors}["token_embd.weight"]
    dst = {t.name: t for t in gguf.GGUFReader(out).tensors}["token_embd.weight"]
    rows = slice(0, 256)
    n_src = np.linalg.norm(np.asarray(src.data[rows], dtype=np.float32), axis=1)
    n_dst = np.linalg.norm(np.asarray(dst.data[rows], dtype=np.float32), axis=1)
    print(json.dumps({
        "model": str(model), "model_bytes": model.stat().st_size, "rotated_bytes": out.stat().st_size,
        "made_seconds": made, "rotate_seconds": rot, "rotate_seconds_in_process": inner, "copy_seconds": ref,
        "ratio_of_medians": statistics.median(rot) / statistics.median(ref), "rotate_max_rss_gib": rss, "rotate_max_rss_anon_gib": anon,
        "embedding_row_lengths_max_rel_diff": float(np.max(np.abs(n_dst - n_src) / n_src)),
        "cpus": os.cpu_count(),
    }, indent=2))
    out.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
