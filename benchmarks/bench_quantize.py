"""Quantization time of `tiblocal quantize` against llama.cpp's `llama-quantize` binary, same input, same threads.

    python benchmarks/bench_quantize.py MODEL-f16.gguf --llama-quantize build/bin/llama-quantize --threads 16

Both run as child processes, alternating (A B B A, ``--rounds`` times), and each output's tensors are compared
(same C code, so the files should hold the same bytes). ``--bare`` adds a third contender: the same C call through
llama-cpp-python from a bare ``python -c`` (no tiblocal), which splits a gap into the bindings' share and tiblocal's.
``--lib-dir DIR`` (the bindings' ``llama_cpp/lib``) crosses the two: the binary run against the bindings' shared
libraries (``LD_LIBRARY_PATH``) and, with ``--bare``, the bare call run against the binary's own libraries
(``LLAMA_CPP_LIB_PATH``), which splits the bindings' share into their build of llama.cpp and the Python process.
The JSON is rewritten after every run, so a run cut short still leaves what it measured; ``--budget SECONDS`` ends
the runs before a round that would not fit (judged by the slowest round so far) and still writes the summary.
``--imatrix FILE`` gives both the same importance matrix (``llama-quantize --imatrix``; not with ``--bare``).
``--pool JSON...`` summarises runs from several such files (each file's runs paired within it), cut short or not:

    python benchmarks/bench_quantize.py --pool q1.json q2.json q3.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_convert_merge import emit, measure, same_tensors

from tiblocal.fsutil import atomic_write_text

BARE = """
import sys, llama_cpp as L
inp, out, qtype, threads = sys.argv[1:]
p = L.llama_model_quantize_default_params()
p.ftype = getattr(L, "LLAMA_FTYPE_MOSTLY_" + qtype)
p.nthread = int(threads)
sys.exit(L.llama_model_quantize(inp.encode(), out.encode(), p))
"""


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median: the order statistics a binomial(n, 1/2) count puts it between."""
    xs, n = sorted(values), len(values)
    k = 0  # the largest k with P(Binomial(n, 1/2) < k) <= (1 - level) / 2; the interval is [x_(k), x_(n-k+1)]
    while sum(math.comb(n, i) for i in range(k + 1)) / 2**n <= (1 - level) / 2:
        k += 1
    if k == 0:  # too few runs for this level: the whole range
        return xs[0], xs[-1]
    return xs[k - 1], xs[n - k]


def paired(runs: dict[str, list[dict]], who: str, prefix: str) -> dict:
    """The i-th run of ``who`` over the i-th run of the binary (neighbours in the ABBA order, so slow spells of the
    machine hit both): the median of those ratios and its 95% interval, beside the best and median ratios."""
    ratios = [a["seconds"] / b["seconds"] for a, b in zip(runs[who], runs["llama_quantize"])]
    lo, hi = median_ci(ratios)
    return {f"{prefix}paired_ratio_median": round(statistics.median(ratios), 3),
            f"{prefix}paired_ratio_ci95": [round(lo, 3), round(hi, 3)], f"{prefix}pairs": len(ratios)}


def summary(runs: dict[str, list[dict]]) -> dict:
    """Each contender's best and median seconds, and tiblocal's ratios to the binary: of best runs, of medians, paired."""
    best = {who: min(r["seconds"] for r in rs) for who, rs in runs.items()}
    median = {who: round(statistics.median(r["seconds"] for r in rs), 3) for who, rs in runs.items()}
    return {"best_seconds": best, "median_seconds": median,
            "ratio": round(best["tiblocal"] / best["llama_quantize"], 3),
            "ratio_of_medians": round(median["tiblocal"] / median["llama_quantize"], 3),
            **paired(runs, "tiblocal", "")}


def pool(files: list[Path]) -> dict:
    """Runs of several result files, each file's runs paired within it, summarised together for each type."""
    pooled: dict[str, dict[str, list]] = {}
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"{f}: not a bench_quantize.py result ({e}); give the files its --json wrote")
        types = {k: v for k, v in data.items() if isinstance(v, dict) and "llama_quantize" in v}
        if not types:
            raise SystemExit(f"{f}: no runs in it (no type with llama_quantize runs); give the files its --json wrote")
        for qtype, runs in types.items():
            acc = pooled.setdefault(qtype, {"tiblocal": [], "llama_quantize": [], "files": []})
            ours, ref = runs.get("tiblocal", []), runs["llama_quantize"]
            n = min(len(ours), len(ref))  # a run cut short leaves one run without its neighbour
            acc["tiblocal"] += ours[:n]  # equal lengths from each file, so the i-th runs stay neighbours
            acc["llama_quantize"] += ref[:n]
            acc["files"].append(str(f))
    result = {}
    for qtype, acc in pooled.items():
        files = acc.pop("files")
        if not acc["tiblocal"]:
            raise SystemExit(f"{qtype}: no pair of runs in {', '.join(files)}")
        diffs = [a["seconds"] - b["seconds"] for a, b in zip(acc["tiblocal"], acc["llama_quantize"])]
        result[qtype] = {"files": files, **summary(acc), "median_difference_s": round(statistics.median(diffs), 3)}
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, nargs="?", help="an f16 GGUF")
    ap.add_argument("--pool", type=Path, nargs="+", metavar="JSON", help="summarise these result files instead")
    ap.add_argument("--llama-quantize", type=Path)
    ap.add_argument("--types", default="Q4_K_M,Q8_0")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--repeats", type=int, default=2, help="1: one run each; 2: ABBA")
    ap.add_argument("--rounds", type=int, default=1, help="ABBA rounds (with --repeats 2)")
    ap.add_argument("--bare", action="store_true", help="also time a bare python -c call of llama_model_quantize")
    ap.add_argument("--lib-dir", type=Path, help="also time the binary against this folder's libllama/libggml")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: beside the model)")
    ap.add_argument("--budget", type=float,
                    help="seconds: start no round that would end after this (each type runs at least one)")
    ap.add_argument("--imatrix", type=Path, help="an importance matrix both tools quantize with")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.pool:
        emit(pool(args.pool), args.json)
        return 0
    if args.model is None or args.llama_quantize is None or args.threads is None:
        ap.error("MODEL, --llama-quantize and --threads are needed (or --pool JSON...)")
    if args.imatrix and (args.bare or args.lib_dir):
        ap.error("--imatrix times the binary and tiblocal only; leave out --bare and --lib-dir")
    im_bin = ["--imatrix", str(args.imatrix.resolve())] if args.imatrix else []
    started = time.monotonic()
    args.model = args.model.resolve()
    work = Path(tempfile.mkdtemp(dir=args.work or args.model.parent))
    result: dict = {"model": str(args.model), "model_bytes": args.model.stat().st_size, "threads": args.threads,
                    "imatrix": str(args.imatrix) if args.imatrix else None}
    lib_env = {"LD_LIBRARY_PATH": str(args.lib_dir.resolve())} if args.lib_dir else None
    if lib_env:  # which libraries the binary loads each way, so the comparison is known to be the one intended
        for key, env in (("ldd_own", None), ("ldd_lib_dir", lib_env)):
            out = subprocess.run(["ldd", str(args.llama_quantize)], env={**os.environ, **(env or {})},
                                 capture_output=True, text=True).stdout
            result[key] = [ln.strip() for ln in out.splitlines() if "llama" in ln or "ggml" in ln]
    for qtype in args.types.split(","):
        ref, ours, bare = work / f"ref-{qtype}.gguf", work / f"ours-{qtype}.gguf", work / f"bare-{qtype}.gguf"
        libs, bare_bin = work / f"libs-{qtype}.gguf", work / f"bare-bin-{qtype}.gguf"
        who_all = (["llama_quantize", "tiblocal"] + (["bare_python"] if args.bare else [])
                   + (["llama_quantize_lib_dir"] if lib_env else [])
                   + (["bare_python_binary_libs"] if lib_env and args.bare else []))
        runs = {w: [] for w in who_all}
        result[qtype] = runs
        outs = {"llama_quantize": ref, "tiblocal": ours, "bare_python": bare, "llama_quantize_lib_dir": libs,
                "bare_python_binary_libs": bare_bin}
        cmds = {
            "llama_quantize": lambda out: [str(args.llama_quantize), *im_bin, str(args.model), str(out), qtype,
                                           str(args.threads)],
            "tiblocal": lambda out: [sys.executable, "-m", "tiblocal", "quantize", str(args.model), "--type", qtype,
                                     "--out", str(out), "--threads", str(args.threads), "--force", *im_bin],
            "bare_python": lambda out: [sys.executable, "-c", BARE, str(args.model), str(out), qtype, str(args.threads)],
        }
        # the crossed contenders run the same commands against the other side's libraries
        cmds["llama_quantize_lib_dir"], cmds["bare_python_binary_libs"] = cmds["llama_quantize"], cmds["bare_python"]
        envs = {"llama_quantize_lib_dir": lib_env,
                "bare_python_binary_libs": {"LLAMA_CPP_LIB_PATH": str(args.llama_quantize.resolve().parent)}}
        # ABBA order, each run writing a new file (its previous output is deleted first, outside the timing: a
        # truncate or unlink of GBs is not quantization) and starting with no dirty pages from the one before
        order = who_all + who_all[::-1] if args.repeats > 1 else who_all
        slowest = 0.0
        for i in range(args.rounds if args.repeats > 1 else 1):
            if i and args.budget is not None and time.monotonic() - started + slowest > args.budget:
                print(f"{qtype}: {i} rounds; another would end past --budget {args.budget:g} s", file=sys.stderr)
                break
            t0 = time.monotonic()
            for who in order:
                outs[who].unlink(missing_ok=True)
                os.sync()
                runs[who].append(measure(cmds[who](outs[who]), env=envs.get(who), cwd=work))
                if args.json:  # the results so far, replacing the file whole
                    with atomic_write_text(args.json) as f:
                        json.dump(result, f, indent=2)
            slowest = max(slowest, time.monotonic() - t0)
        summed = summary(runs)
        best, median = summed["best_seconds"], summed["median_seconds"]
        result[qtype] = {**runs, **summed, "identical_tensors": same_tensors(ours, ref), "bytes": ours.stat().st_size}
        for who, out in (("bare_python", bare), ("llama_quantize_lib_dir", libs), ("bare_python_binary_libs", bare_bin)):
            if who in runs:
                result[qtype][f"{who}_ratio"] = round(best[who] / best["llama_quantize"], 3)
                result[qtype][f"{who}_ratio_of_medians"] = round(median[who] / median["llama_quantize"], 3)
                result[qtype][f"{who}_identical_tensors"] = same_tensors(out, ref)
                result[qtype].update(paired(runs, who, f"{who}_"))
        for f in (ref, ours, bare, libs, bare_bin):
            f.unlink(missing_ok=True)
    work.rmdir()
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
