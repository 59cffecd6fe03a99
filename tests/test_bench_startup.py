"""benchmarks/bench_startup.py: every contender timed; nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_startup_bench_times_every_contender_and_cleans_up(tmp_path):
    pytest.importorskip("llama_cpp")
    out, scratch = tmp_path / "s.json", tmp_path / "scratch"
    scratch.mkdir()
    subprocess.run([sys.executable, str(BENCH / "bench_startup.py"), "--rounds", "1", "--json", str(out)], check=True,
                   capture_output=True, cwd=BENCH, env={**os.environ, "TMPDIR": str(scratch)})
    r = json.loads(out.read_text())
    assert r["model_bytes"] > 10 << 20 and r["rounds"] == 1
    assert r["tiblocal quantize"]["over"] == "bare bindings quantize" and "llama-quantize" not in r
    assert all(r[k]["median_ms"] > 0 for k in ("python -c pass", "tiblocal --help", "tiblocal verify --help",
                                              "tiblocal chat --help", "bare bindings quantize"))
    assert list(scratch.iterdir()) == []  # its scratch folder (model and outputs) is gone
