"""benchmarks/bench_sha256sums.py: agrees with coreutils."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_sha256sums_bench_agrees_with_coreutils(tmp_path):
    folder, out = tmp_path / "f", tmp_path / "s.json"
    (folder / "sub").mkdir(parents=True)
    for i, size in enumerate((3 << 20, 1 << 20, 0)):
        (folder / f"{i}.bin").write_bytes(os.urandom(size))
    (folder / "sub" / "x.txt").write_text("x")
    subprocess.run([sys.executable, str(BENCH / "bench_sha256sums.py"), str(folder), "--rounds", "1", "--json",
                    str(out)], check=True, capture_output=True, cwd=BENCH)
    r = json.loads(out.read_text())
    assert r["files"] == 4 and all(len(v) == 2 for v in r["runs"].values())
    assert set(r["runs"]) == {"tiblocal", "one_after_another"} | ({"sha256sum"} if shutil.which("sha256sum") else set())
