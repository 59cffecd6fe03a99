"""benchmarks/bench_atomic_write.py: both ways of writing, and convert timed both ways; nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_atomic_write_bench_runs_both_ways_and_cleans_up(tmp_path):
    out = tmp_path / "w.json"
    subprocess.run([sys.executable, str(BENCH / "bench_atomic_write.py"), "--dir", str(tmp_path), "--gb", "0.02",
                    "--rounds", "1", "--json", str(out)], check=True, capture_output=True)
    r = json.loads(out.read_text())
    assert len(r["precreated"]) == len(r["writer"]) == 2 and r["bytes"] == 16 << 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json"]  # outputs and temporary names removed


def test_atomic_write_bench_times_convert_both_ways(tiny_hf, tmp_path):
    out = tmp_path / "c.json"
    subprocess.run([sys.executable, str(BENCH / "bench_atomic_write.py"), "--dir", str(tmp_path), "--hf-dir",
                    str(tiny_hf), "--rounds", "1", "--json", str(out)], check=True, capture_output=True)
    r = json.loads(out.read_text())
    assert len(r["precreated"]) == len(r["writer"]) == 2 and r["bytes"] > 0 and "median_close_s" not in r
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]
