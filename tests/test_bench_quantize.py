"""benchmarks/bench_quantize.py: the interval for the median, --budget, --pool, a whole run against a stand-in binary, the importance matrix reaching both tools."""

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


def test_budget_ends_after_the_round_that_fits_and_still_summarises(tiny_gguf, tmp_path):
    pytest.importorskip("llama_cpp")
    from bench_quantize import BARE

    fake = tmp_path / "llama-quantize"
    fake.write_text(f"#!{sys.executable}\n" + BARE)
    fake.chmod(0o755)
    res = tmp_path / "q.json"
    out = subprocess.run([sys.executable, str(BENCH / "bench_quantize.py"), str(tiny_gguf), "--llama-quantize", str(fake),
                          "--threads", "2", "--types", "Q8_0", "--rounds", "5", "--budget", "0", "--work", str(tmp_path),
                          "--json", str(res)], check=True, capture_output=True, text=True, cwd=BENCH)
    q = json.loads(res.read_text())["Q8_0"]
    assert len(q["llama_quantize"]) == len(q["tiblocal"]) == 2 and q["pairs"] == 2  # the first round always runs
    assert q["identical_tensors"] and "1 rounds; another would end past --budget 0 s" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-quantize", "q.json"]


def _runs(*seconds: float) -> list[dict]:
    return [{"seconds": s} for s in seconds]


def test_pool_pairs_within_each_file_and_drops_an_unpaired_run(tmp_path):
    from bench_quantize import pool

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"threads": 16, "Q8_0": {"llama_quantize": _runs(10, 20, 20, 10),
                                                     "tiblocal": _runs(11, 22, 20, 10), "ratio": 1.0}}))
    # cut short: the last tiblocal run has no neighbour yet
    b.write_text(json.dumps({"Q8_0": {"llama_quantize": _runs(10), "tiblocal": _runs(12, 99)}}))
    q = pool([a, b])["Q8_0"]
    assert q["pairs"] == 5 and q["paired_ratio_median"] == 1.1  # ratios 1.1, 1.1, 1.0, 1.0, 1.2
    assert q["best_seconds"] == {"tiblocal": 10, "llama_quantize": 10} and q["ratio_of_medians"] == 1.2  # 12 s over 10 s
    assert q["median_difference_s"] == 1.0 and q["files"] == [str(a), str(b)]


def test_pool_refuses_a_file_that_is_not_a_result(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"cpus": 16, "tiblocal_convert_f16": {"seconds": 8.8}}))
    run = subprocess.run([sys.executable, str(BENCH / "bench_quantize.py"), "--pool", str(bad)], capture_output=True,
                         text=True, cwd=BENCH)
    assert run.returncode != 0 and f"{bad}: no runs in it" in run.stderr
    run = subprocess.run([sys.executable, str(BENCH / "bench_quantize.py"), str(bad)], capture_output=True, text=True,
                         cwd=BENCH)
    assert run.returncode == 2 and "--llama-quantize and --threads are needed" in run.stderr


STAND_IN_WITH_IMATRIX = """
import sys
from tiblocal.quantize.gguf_quant import quantize_gguf
args = sys.argv[1:]
imatrix = None
if args[0] == "--imatrix":
    imatrix, args = args[1], args[2:]
inp, out, qtype, threads = args
quantize_gguf(inp, out, [qtype], threads=int(threads), imatrix=imatrix)
"""


def test_imatrix_reaches_both_tools(tiny256, tmp_path):
    """--imatrix goes to the binary as llama-quantize takes it and to tiblocal; IQ2_XXS runs only with one."""
    from tiblocal.quantize.imatrix import compute_imatrix, write_imatrix

    hf, model = tiny256
    im, counts = compute_imatrix(hf, [Path(__file__).parent / "data" / "tibetan_sample.txt"], chunks=1, ctx=32)
    write_imatrix(tmp_path / "im.gguf", im, counts, 32)
    fake = tmp_path / "llama-quantize"  # llama-quantize's command line, [--imatrix FILE] IN OUT TYPE THREADS
    fake.write_text(f"#!{sys.executable}\n" + STAND_IN_WITH_IMATRIX)
    fake.chmod(0o755)
    res = tmp_path / "q.json"
    cmd = [sys.executable, str(BENCH / "bench_quantize.py"), str(model), "--llama-quantize", str(fake), "--threads", "2",
           "--types", "IQ2_XXS", "--imatrix", str(tmp_path / "im.gguf"), "--work", str(tmp_path), "--json", str(res)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=BENCH)
    r = json.loads(res.read_text())
    assert r["imatrix"] == str(tmp_path / "im.gguf") and r["IQ2_XXS"]["identical_tensors"] and r["IQ2_XXS"]["pairs"] == 2
    bad = subprocess.run([*cmd, "--bare"], capture_output=True, text=True, cwd=BENCH)
    assert bad.returncode == 2 and "--imatrix times the binary and tiblocal only" in bad.stderr
