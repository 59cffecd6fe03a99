"""benchmarks/bench_imatrix.py: both implementations timed; nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_imatrix_bench_times_both_and_cleans_up(tiny256, tmp_path):
    hf, _ = tiny256
    out, scratch = tmp_path / "i.json", tmp_path / "scratch"
    scratch.mkdir()
    subprocess.run([sys.executable, str(BENCH / "bench_imatrix.py"), str(hf), "--device", "cpu", "--chunks", "2",
                    "--ctx", "32", "--text", str(Path(__file__).parent / "data" / "tibetan_sample.txt"), "--work",
                    str(scratch), "--json", str(out)], check=True, capture_output=True, cwd=BENCH)
    r = json.loads(out.read_text())
    assert len(r["runs"]["tiblocal"]) == len(r["runs"]["bare_forward"]) == 2 and r["pairs"] == 2
    assert all(x["forward_s"] > 0 and x["load_s"] > 0 for x in r["runs"]["bare_forward"])
    assert r["entries"] == 15  # 2 layers × 7 matrices, and the output
    assert list(scratch.iterdir()) == []
