"""benchmarks/bench_engine.py: tiblocal's side of the comparison with llama-bench runs on any model (llama-bench itself
is built or found by the script, which the test does not do: it takes minutes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engine.py"


def test_tiblocal_side_measures_pp512_and_tg128(tiny_gguf) -> None:
    p = subprocess.run([sys.executable, str(BENCH), str(tiny_gguf), "--tiblocal-side", "--threads", "1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    figures = json.loads(p.stdout)
    assert set(figures) == {"pp", "tg"} and figures["pp"] > 0 and figures["tg"] > 0


def test_it_needs_llama_bench_or_a_build_folder() -> None:
    p = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "give --llama-bench BIN or --build DIR" in p.stderr
