"""Time and peak memory of `tiblocal convert` (against llama.cpp's convert_hf_to_gguf.py) and `tiblocal merge`.

Builds a random 7B-shaped Llama (f16, 55,296-token vocabulary) and a rank-64 LoRA adapter on all seven
projections with trained embed_tokens / lm_head, then runs each tool as a child process and reads its peak
resident memory from wait4(2). The two GGUFs are compared tensor by tensor.

    python benchmarks/bench_convert_merge.py --llama-cpp DIR --tokenizer tokenizer.model --work /tmp/bench
DIR holds convert_hf_to_gguf.py, conversion/ and gguf-py/ (from the llama-cpp-python sdist, vendor/llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tiblocal.synthetic import LlamaShape, write_llama_checkpoint, write_lora_adapter


def measure(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd``; wall time and the peak RSS of that one process (wait4 gives it per child).

    Children run in ``cwd`` (the scratch folder): from a source checkout's root, ``python -m tiblocal``
    would import the source tree instead of the installed package.
    """
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Also sample anonymous and file-backed resident memory: mapped file pages count in ru_maxrss on
    # some kernels even though the page cache can drop them at any time.
    peaks = {"RssAnon": 0, "RssFile": 0}
    status_path = f"/proc/{p.pid}/status"
    # waitid with WNOWAIT sees the exit without reaping, so wait4 can still read the child's rusage
    while os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        try:
            with open(status_path) as f:
                for line in f:
                    key = line.split(":", 1)[0]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        time.sleep(0.1)
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"{cmd[:3]} failed ({rc}):\n{err[-3000:]}")
    return {
        "seconds": round(dt, 3),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
        "peak_anon_gb": round(peaks["RssAnon"] * 1024 / 1e9, 2),
        "peak_file_gb": round(peaks["RssFile"] * 1024 / 1e9, 2),
    }


def emit(result: dict, path: Path | None) -> None:
    """Print the result as JSON, and write it to ``path`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.write_text(text)


def same_tensors(a: Path, b: Path) -> bool:
    import gguf
    import numpy as np

    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ta = {t.name: t for t in ra.tensors}
    for t in rb.tensors:
        u = ta.get(t.name)
        if u is None or u.tensor_type != t.tensor_type or not np.array_equal(np.asarray(u.data), np.asarray(t.data)):
            return False
    return len(ta) == len(rb.tensors)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="folder with convert_hf_to_gguf.py, conversion/, gguf-py/")
    ap.add_argument("--tokenizer", type=Path, required=True, help="a 55,296-piece tokenizer.model (Chinese-LLaMA-2's)")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (needs about 45 GB for 7B)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=55296)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--skip", nargs="*", default=[], choices=["convert", "reference", "merge"])
    ap.add_argument("--keep", action="store_true", help="keep the base folder and tiblocal's f16 GGUF (ours.gguf)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.tokenizer, args.llama_cpp = args.tokenizer.resolve(), args.llama_cpp.resolve()
    shape = LlamaShape(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=4096,
    )
    result: dict = {"shape": shape.__dict__, "cpus": os.cpu_count()}
    t0 = time.perf_counter()
    hf = work / "base"
    if not (hf / "config.json").is_file():  # reuse a base left by --keep
        write_llama_checkpoint(hf, shape, args.tokenizer, dtype="float16", max_shard_bytes=10 * 2**30)
        result["build_base_seconds"] = round(time.perf_counter() - t0, 1)
    result["base_bytes"] = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    py = sys.executable

    if "convert" not in args.skip:
        ours = work / "ours.gguf"
        result["tiblocal_convert_f16"] = measure([py, "-m", "tiblocal", "convert", str(hf), "--out", str(ours), "--outtype", "f16"], cwd=work)
        if "reference" not in args.skip:
            ref = work / "ref.gguf"
            env = {"PYTHONPATH": f"{args.llama_cpp / 'gguf-py'}:{args.llama_cpp}", "NO_LOCAL_GGUF": ""}
            result["llama_cpp_convert_f16"] = measure(
                [py, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(hf), "--outfile", str(ref), "--outtype", "f16"], env, cwd=work
            )
            result["identical_tensors"] = same_tensors(ours, ref)
            r, o = result["llama_cpp_convert_f16"], result["tiblocal_convert_f16"]
            result["convert_time_ratio"] = round(o["seconds"] / r["seconds"], 3)
            result["convert_rss_ratio"] = round(o["peak_rss_gb"] / r["peak_rss_gb"], 3)
            ref.unlink()
        if not args.keep:
            ours.unlink()

    if "merge" not in args.skip:
        t0 = time.perf_counter()
        ad = write_lora_adapter(work / "adapter", shape, r=args.rank, alpha=2 * args.rank, n_vocab=args.vocab,
                                tokenizer_model=args.tokenizer, dtype="float16")
        result["build_adapter_seconds"] = round(time.perf_counter() - t0, 1)
        result["adapter_bytes"] = (ad / "adapter_model.safetensors").stat().st_size
        out = work / "merged"
        result["tiblocal_merge_f16"] = measure([py, "-m", "tiblocal", "merge", str(hf), str(ad), "--out", str(out), "--dtype", "f16"], cwd=work)
        shutil.rmtree(out)
    if not args.keep:
        shutil.rmtree(work / "base", ignore_errors=True)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
