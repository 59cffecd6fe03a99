"""benchmarks/bench_quantize.py (the interval for the median, --budget, --pool, a whole run against a stand-in binary),
bench_atomic_write.py, bench_startup.py, bench_imatrix.py, bench_release.py and bench_sha256sums.py."""

from __future__ import annotations

import json
import random
import os
import shutil
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


def test_sha256sums_bench_agrees_with_coreutils(tmp_path):
    folder, out = tmp_path / "f", tmp_path / "s.json"
    (folder / "sub").mkdir(parents=True)
    for i, size in enumerate((3 << 20, 1 << 20, 0)):
        (folder / f"{i}.bin").write_bytes(os.urandom(size))
    (folder / "sub" / "x.txt").write_text("x")
    subprocess.run([sys.executable, str(BENCH / "bench_sha256sums.py"), str(folder), "--rounds", "1", "--json",
                    str(out)], check=True, capture_output=True, cwd=BENCH)
    r = json.loads(out.read_text())
    assert r["files"] == 4 and all(len(v) == 2 for v in r["runs"].values())
    assert set(r["runs"]) == {"tiblocal", "one_after_another"} | ({"sha256sum"} if shutil.which("sha256sum") else set())
