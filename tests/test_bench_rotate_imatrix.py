"""benchmarks/bench_rotate_imatrix.py runs through: every type plain and with its matrix, each seed rotated with and
without the matrix of its rotation, and it leaves only the reference behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import DATA

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_rotate_imatrix.py"


def test_the_bench_runs(tiny_hf, tmp_path):
    p = subprocess.run([sys.executable, str(BENCH), str(tiny_hf), "--text", str(DATA / "tibetan_sample.txt"), "--types",
                        "Q4_0,Q4_K_M:Q5_0", "--seeds", "1", "--imatrix-chunks", "2", "--max-windows", "2",
                        "--threads", "2", "--work", str(tmp_path / "w")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"type"')]
    assert [(r["type"], r["file"], r["seed"]) for r in rows] == [
        (t, how, seed) for t in ("Q4_0", "Q4_K_M:Q5_0")
        for how, seed in (("plain", None), ("imatrix", None), ("--rotate", 0), ("--rotate + its imatrix", 0))]
    assert all(r["mean_kl"] > 0 for r in rows)
    assert sorted(x.name for x in (tmp_path / "w").iterdir()) == ["reference-f16.gguf"]
