"""The serving benchmarks run end to end on the tiny model: every check of bench_serve.py passes (hostile requests
mixed in), and bench_slots.py measures each slot count."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytest.importorskip("httpx")


def test_bench_serve_passes_its_own_checks(tiny_gguf, tmp_path) -> None:
    import bench_serve

    out = tmp_path / "serve.json"
    rc = bench_serve.main([str(tiny_gguf), "--clients", "1,3", "--requests", "8", "--max-tokens", "12",
                           "--prompt-tokens", "20", "--seed", "3", "--repeat", "2", "--json", str(out), "--", "--parallel", "3"])
    result = json.loads(out.read_text())
    assert rc == 0, result["failures"]
    rows = result["rows"]
    assert [r["clients"] for r in rows] == [1, 3, 3, 3]  # the largest count again, --repeat 2 times
    assert sum(r["hostile"] for r in rows) > 0  # the seed mixes in gone, oversized and invalid requests
    for r in rows:
        assert r["served"] + r["hostile"] == r["requests"] == 8 * r["clients"]
        assert r["decode_tokens_per_s"] > 0 and r["wave_tokens_per_s"] > 0 and r["ttft_p95_ms"] >= r["ttft_p50_ms"] > 0


def test_bench_slots_measures_each_count(tiny_gguf, tmp_path, monkeypatch) -> None:
    import bench_slots

    out = tmp_path / "slots.json"
    monkeypatch.setattr(sys, "argv", ["bench_slots.py", str(tiny_gguf), "--slots", "1,2", "--tokens", "8",
                                      "--prompt-tokens", "16", "--json", str(out)])
    assert bench_slots.main() == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["slots"] for r in rows] == [1, 2] and all(r["tokens_per_s"] > 0 for r in rows)
