"""benchmarks/bench_quantize.py: the interval for the median, and a whole run against a stand-in binary."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_median_ci_order_statistics_and_coverage():
    from bench_quantize import median_ci

    assert median_ci([float(i) for i in range(1, 11)]) == (2.0, 9.0)  # n = 10: x(2), x(9), 97.9%
    assert median_ci([float(i) for i in range(20, 0, -1)]) == (6.0, 15.0)  # unsorted input; n = 20: x(6), x(15)
    assert median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few runs for 95%: the whole range
    rng = random.Random(0)
    hits = sum(lo <= 0.0 <= hi for lo, hi in (median_ci([rng.gauss(0, 1) for _ in range(12)]) for _ in range(2000)))
    assert 0.93 <= hits / 2000 <= 0.99


def test_paired_ratios():
    from bench_quantize import paired

    runs = {"llama_quantize": [{"seconds": s} for s in (10.0, 20.0, 10.0, 10.0)],
            "tiblocal": [{"seconds": s} for s in (11.0, 21.0, 10.5, 12.0)]}
    out = paired(runs, "tiblocal", "")
    assert out["pairs"] == 4 and out["paired_ratio_median"] == pytest.approx((1.05 + 1.1) / 2, abs=1e-3)
    assert out["paired_ratio_ci95"] == [1.05, 1.2]


def test_whole_run_against_a_stand_in_binary(tiny_gguf, tmp_path):
    """llama-quantize's command line served by the bindings: same bytes, so the run reports identical tensors."""
    pytest.importorskip("llama_cpp")
    from bench_quantize import BARE

    fake = tmp_path / "llama-quantize"  # the bare contender's script takes llama-quantize's arguments
    fake.write_text(f"#!{sys.executable}\n" + BARE)
    fake.chmod(0o755)
    res = tmp_path / "q.json"
    subprocess.run([sys.executable, str(BENCH / "bench_quantize.py"), str(tiny_gguf), "--llama-quantize", str(fake),
                    "--threads", "2", "--types", "Q8_0", "--rounds", "2", "--bare", "--work", str(tmp_path),
                    "--json", str(res)], check=True, capture_output=True, cwd=BENCH)
    q = json.loads(res.read_text())["Q8_0"]
    assert len(q["llama_quantize"]) == len(q["tiblocal"]) == len(q["bare_python"]) == 4
    assert q["identical_tensors"] and q["bare_python_identical_tensors"]
    assert q["pairs"] == q["bare_python_pairs"] == 4
    lo, hi = q["paired_ratio_ci95"]
    assert lo <= q["paired_ratio_median"] <= hi


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
