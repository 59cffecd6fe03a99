"""Time of the SHA-256 digests behind SHA256SUMS (release, merge, verify) against one file after another.

    python benchmarks/bench_sha256sums.py FOLDER --rounds 3 --json sha.json

Alternates (A B C, then C B A, ``--rounds`` times) over every file below FOLDER, after one untimed pass that brings
them into the page cache (a release hashes the files it has just written): tiblocal's ``sha256_files`` (several
files at a time), the same ``sha256_file`` one file after another in one thread (what it replaced), and coreutils'
``sha256sum`` over the same files. All three must give the same digests. Reports the medians and the run-by-run
ratios of tiblocal against each reference.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_convert_merge import emit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-coreutils", action="store_true", help="leave sha256sum out (slow where it lacks SHA-NI)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from tiblocal.verify import _files, sha256_file, sha256_files

    paths = [args.folder / name for name in _files(args.folder)]
    if not paths:
        sys.exit(f"{args.folder}: no files to hash")

    def coreutils() -> list[str]:
        out = subprocess.run(["sha256sum", *map(str, paths)], capture_output=True, text=True, check=True).stdout
        return [line.split()[0] for line in out.splitlines()]

    who = {"tiblocal": lambda: sha256_files(paths), "one_after_another": lambda: [sha256_file(p) for p in paths]}
    if shutil.which("sha256sum") and not args.no_coreutils:
        who["sha256sum"] = coreutils
    expected = who["tiblocal"]()  # the untimed pass that fills the page cache
    seconds: dict[str, list[float]] = {name: [] for name in who}
    order = list(who) + list(who)[::-1]
    for _ in range(args.rounds):
        for name in order:
            t0 = time.perf_counter()
            digests = who[name]()
            seconds[name].append(time.perf_counter() - t0)
            if digests != expected:
                sys.exit(f"{name} gave other digests than tiblocal")
    total = sum(p.stat().st_size for p in paths)
    result = {
        "folder": str(args.folder), "files": len(paths), "gib": round(total / 2**30, 3),
        "largest_gib": round(max(p.stat().st_size for p in paths) / 2**30, 3),
        "median_seconds": {name: round(statistics.median(s), 3) for name, s in seconds.items()},
        "ratio_median": {f"tiblocal/{name}": round(statistics.median(a / b for a, b in zip(seconds["tiblocal"], s)), 3)
                         for name, s in seconds.items() if name != "tiblocal"},
        "runs": {name: [round(x, 3) for x in s] for name, s in seconds.items()},
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
