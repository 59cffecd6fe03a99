"""What closing a large output costs, by how its temporary file came to be (the cause of a Q8_0 quantize gap on disk).

    python benchmarks/bench_atomic_write.py --dir /data --gb 3 --rounds 3

Two ways to hand a writer a temporary name, each followed by a C-style writer that opens the name with
O_CREAT|O_TRUNC, writes ``--gb`` GB and closes it (what llama.cpp's quantizer does with its output):
``precreated`` makes the file empty first (``tempfile.mkstemp``, what tiblocal's ``atomic_path`` did), ``writer``
leaves the name unused (``tiblocal.fsutil.atomic_path`` now). On ext4 (auto_da_alloc, the default) truncating a
file that exists marks it to be flushed on close, so ``precreated`` pays a writeback of the whole file inside
``close``; ``writer`` does not. A sync before each run starts both with no dirty pages.

    python benchmarks/bench_atomic_write.py --dir /data --hf-dir MODEL --rounds 3

does the same with `tiblocal convert`'s whole job (MODEL to an f16 GGUF in DIR) instead of a bare write: gguf's
writer also reopens the temporary name with O_TRUNC.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench_convert_merge import emit

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


@contextlib.contextmanager
def precreated_path(path: Path, **_):
    """tiblocal's atomic_path before the fix: ``mkstemp`` makes the temporary file, empty, before the writer runs."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def one_run(how: str, folder: Path, n_bytes: int, chunk: bytes, hf_dir: Path | None = None) -> dict:
    out = folder / f"{how}.bin"
    out.unlink(missing_ok=True)
    os.sync()
    opener = precreated_path if how == "precreated" else atomic_path
    t0 = time.perf_counter()
    if hf_dir is not None:
        import tiblocal.convert.hf_to_gguf as convert

        convert.atomic_path = opener  # the one name the converter writes through
        try:
            convert.hf_to_gguf(hf_dir, out, outtype="f16")
        finally:
            convert.atomic_path = atomic_path
        return {"seconds": round(time.perf_counter() - t0, 3)}
    with opener(out) as tmp:
        write, close = write_through(tmp, n_bytes, chunk)
    return {"seconds": round(time.perf_counter() - t0, 3), "write_s": round(write, 3), "close_s": round(close, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="a folder on the disk to test (files are removed after)")
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3, help="ABBA rounds")
    ap.add_argument("--hf-dir", type=Path, help="time `tiblocal convert` of this model instead of a bare write")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    chunk = b"\x01" * (16 << 20)
    n_bytes = max(1, int(args.gb * 1e9) // len(chunk)) * len(chunk)
    if args.hf_dir is not None:
        import tiblocal.convert.hf_to_gguf  # noqa: F401  (imported before the first timed run, not inside it)
    runs: dict[str, list[dict]] = {"precreated": [], "writer": []}
    for _ in range(args.rounds):
        for how in ("precreated", "writer", "writer", "precreated"):
            runs[how].append(one_run(how, args.dir, n_bytes, chunk, args.hf_dir))
    size = (args.dir / "writer.bin").stat().st_size
    for how in runs:
        (args.dir / f"{how}.bin").unlink(missing_ok=True)
    result = {"dir": str(args.dir), "bytes": size, **runs,
              "median_seconds": {h: statistics.median(r["seconds"] for r in rs) for h, rs in runs.items()}}
    if args.hf_dir is None:
        result["median_close_s"] = {h: statistics.median(r["close_s"] for r in rs) for h, rs in runs.items()}
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
