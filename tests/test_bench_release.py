"""benchmarks/bench_release.py: every stage timed; nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_release_bench_times_every_stage_and_cleans_up(tiny256, tmp_path):
    from bench_release import stages

    stamps = [(0.5, "converting x"), (1.0, "importance matrix: 2 windows"), (1.5, "importance matrix: window 1/2"),
              (2.0, "quantizing to Q4_K_M"), (4.0, "quantizing to Q8_0"), (5.0, "writing the model card, Modelfile and SHA256SUMS")]
    assert stages(stamps, 6.0) == {"setup": 0.5, "convert_f16": 0.5, "imatrix": 1.0, "quantize_Q4_K_M": 2.0,
                                   "quantize_Q8_0": 1.0, "card_and_sums": 1.0}
    hf, _ = tiny256
    out, scratch = tmp_path / "r.json", tmp_path / "scratch"
    scratch.mkdir()
    subprocess.run([sys.executable, str(BENCH / "bench_release.py"), str(hf), "--types", "Q4_K_M", "--make-imatrix",
                    "--imatrix-chunks", "1", "--device", "cpu", "--work", str(scratch), "--json", str(out)], check=True,
                   capture_output=True, cwd=BENCH)
    r = json.loads(out.read_text())
    assert list(r["stages_s"]) == ["setup", "convert_f16", "imatrix", "quantize_Q4_K_M", "card_and_sums"]
    assert sum(r["stages_s"].values()) == pytest.approx(r["release_s"], abs=0.01) and r["peak_rss_gib"] > 0
    assert {"SHA256SUMS", "README.md", f"{hf.name}-Q4_K_M.gguf", f"{hf.name}.imatrix.gguf"} <= set(r["files_gib"])
    assert list(scratch.iterdir()) == []
