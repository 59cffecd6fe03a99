"""bench_demo.py runs end to end on the tiny model: one row per prompt of the demo test, its summary drawn from them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_bench_demo_reports_each_prompt_and_the_longest_phrase_run(tiny_gguf, tmp_path, monkeypatch) -> None:
    import bench_demo
    from test_demo import PROMPTS

    out = tmp_path / "demo.json"
    monkeypatch.setattr(sys, "argv", ["bench_demo.py", "--model", str(tiny_gguf), "--threads", "1", "--tokens", "8",
                                      "--out", str(out)])
    bench_demo.main()
    result = json.loads(out.read_text())
    rows, summary = result["rows"], result["summary"]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(1 <= r["tokens"] <= 8 and r["phrase_run"] >= 0 for r in rows)
    assert summary["longest_phrase_run"] == max(r["phrase_run"] for r in rows)
    assert summary["prompts"] == 8 and summary["first_token_ms_max"] >= summary["first_token_ms_median"] > 0
