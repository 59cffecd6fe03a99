"""What closing a large output costs, by how its temporary file came to be (the cause of a Q8_0 quantize gap on disk).

    python benchmarks/bench_atomic_write.py --dir /data --gb 3 --rounds 3

Two ways to hand a writer a temporary name, each followed by a C-style writer that opens the name with
O_CREAT|O_TRUNC, writes ``--gb`` GB and closes it (what llama.cpp's quantizer does with its output):
``precreated`` makes the file empty first (``tempfile.mkstemp``, what tiblocal's ``atomic_path`` did), ``writer``
leaves the name unused (``tiblocal.fsutil.atomic_path`` now). On ext4 (auto_da_alloc, the default) truncating a
file that exists marks it to be flushed on close, so ``precreated`` pays a writeback of the whole file inside
``close``; ``writer`` does not. A sync before each run starts both with no dirty pages.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from tiblocal.fsutil import atomic_path


def write_through(name: Path, n_bytes: int, chunk: bytes) -> tuple[float, float]:
    """The writer: open(O_CREAT|O_TRUNC), write, close; seconds writing and seconds closing."""
    t0 = time.perf_counter()
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(n_bytes // len(chunk)):
        os.write(fd, chunk)
    t1 = time.perf_counter()
    os.close(fd)
    return t1 - t0, time.perf_counter() - t1


def one_run(how: str, folder: Path, n_bytes: int, chunk: bytes) -> dict:
    out = folder / f"{how}.bin"
    out.unlink(missing_ok=True)
    os.sync()
    t0 = time.perf_counter()
    if how == "precreated":
        fd, tmp = tempfile.mkstemp(prefix=".out.", suffix=".partial", dir=folder)
        os.close(fd)
        write, close = write_through(Path(tmp), n_bytes, chunk)
        os.replace(tmp, out)
    else:
        with atomic_path(out) as tmp:
            write, close = write_through(tmp, n_bytes, chunk)
    return {"seconds": round(time.perf_counter() - t0, 3), "write_s": round(write, 3), "close_s": round(close, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="a folder on the disk to test (files are removed after)")
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3, help="ABBA rounds")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    chunk = b"\x01" * (16 << 20)
    n_bytes = max(1, int(args.gb * 1e9) // len(chunk)) * len(chunk)
    runs: dict[str, list[dict]] = {"precreated": [], "writer": []}
    for _ in range(args.rounds):
        for how in ("precreated", "writer", "writer", "precreated"):
            runs[how].append(one_run(how, args.dir, n_bytes, chunk))
    for how in runs:
        (args.dir / f"{how}.bin").unlink(missing_ok=True)
    result = {"dir": str(args.dir), "bytes": n_bytes, **runs,
              "median_close_s": {h: statistics.median(r["close_s"] for r in rs) for h, rs in runs.items()},
              "median_seconds": {h: statistics.median(r["seconds"] for r in rs) for h, rs in runs.items()}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
