"""Where the time of one `tiblocal release` goes: each stage timed from the release's own progress messages.

    python benchmarks/bench_release.py HF_DIR --types Q4_K_M,Q8_0 --make-imatrix --imatrix-dtype bf16 --device cuda \
        --work /tmp/w --json release.json

Runs ``tiblocal.pipelines.release.release`` once in a child process, which stamps each progress message with the time since
the call began: the checks, the f16 conversion, the importance matrix (when made), each quantization, GPTQ and the
measurements (when asked), and the model card, Modelfile and ``SHA256SUMS`` over every file with the rename into place. Reports
the seconds of each stage, the whole call and the child process, its peak resident memory, the GPU memory torch
held at most (when the matrix is made on a GPU), and the size of each file written. The release folder is removed
afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_convert_merge import emit
from tiblocal.quantize.imatrix import DTYPES

CHILD = """
import json, resource, sys, time
from pathlib import Path
from tiblocal.pipelines.release import ReleaseOptions, release
kw = json.loads(sys.argv[3])
stamps = []
t0 = time.perf_counter()


def stamp(message):
    stamps.append((round(time.perf_counter() - t0, 3), message))
    print(f"[{stamps[-1][0]:8.1f} s] {message}", file=sys.stderr, flush=True)  # where a crash stopped it


r = release(ReleaseOptions(hf_dir=Path(sys.argv[1]), out=Path(sys.argv[2]), **kw), progress=stamp)
total = time.perf_counter() - t0
gpu = None
if "torch" in sys.modules:
    import torch
    if torch.cuda.is_available():
        gpu = torch.cuda.max_memory_allocated()
files = {p.name: p.stat().st_size for p in r.out.iterdir() if p.is_file()}
print(json.dumps({"stamps": stamps, "release_s": round(total, 3), "files": files, "gpu_peak_bytes": gpu, "rows": r.rows,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def stage_of(message: str) -> str:
    """The stage a progress message opens or continues (the matrix reports each window: one stage)."""
    prefixes = {"converting ": "convert_f16", "importance matrix": "imatrix", "GPTQ": "gptq", "measuring ": "measure",
                "writing the model card": "card_and_sums"}
    if message.startswith("quantizing to "):
        return "quantize_" + message.removeprefix("quantizing to ")
    return next((stage for prefix, stage in prefixes.items() if message.startswith(prefix)), message)


def stages(stamps: list[tuple[float, str]], total: float) -> dict[str, float]:
    """Seconds of each stage, from its first message to the next stage's first one (the last: to the end of the
    call, the rename into place included); ``setup`` is what came before the first message (the checks)."""
    opened: list[tuple[str, float]] = []
    for t, message in stamps:
        name = stage_of(message)
        if not opened or opened[-1][0] != name:
            opened.append((name, t))
    out = {"setup": round(opened[0][1] if opened else total, 3)}
    for (name, start), (_, end) in zip(opened, [*opened[1:], ("", total)]):
        out[name] = round(out.get(name, 0.0) + end - start, 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path, help="a merged Hugging Face Llama folder with tokenizer.model")
    ap.add_argument("--types", default="Q4_K_M,Q8_0")
    ap.add_argument("--make-imatrix", action="store_true")
    ap.add_argument("--imatrix-dtype", default="f32", choices=list(DTYPES))
    ap.add_argument("--imatrix-chunks", type=int, default=100)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--eval-text", nargs="*", type=Path, default=[])
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="for the --eval-text measurements")
    ap.add_argument("--work", type=Path, default=None, help="where the release folder is written (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the release folder")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.work))
    out = work / "release"
    kw = {"types": args.types.split(","), "make_imatrix": args.make_imatrix, "imatrix_dtype": args.imatrix_dtype,
          "imatrix_chunks": args.imatrix_chunks, "device": args.device, "threads": args.threads,
          "eval_text": [str(p.resolve()) for p in args.eval_text], "max_windows": args.max_windows,
          "n_gpu_layers": args.n_gpu_layers}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, str(args.hf_dir.resolve()), str(out), json.dumps(kw)],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        lines = [line for line in p.stderr.replace("\r", "\n").splitlines() if "Loading weights" not in line]
        sys.stderr.write("\n".join(lines[-40:]) + f"\nthe release exited with code {p.returncode}"
                         + (" (killed by a signal)" if p.returncode < 0 else "") + "\n")
        shutil.rmtree(work, ignore_errors=True)  # with what a killed release left half-written
        return 1
    child = json.loads(p.stdout.strip().splitlines()[-1])
    result = {
        "model": str(args.hf_dir), "options": kw, "process_s": round(wall, 3), "release_s": child["release_s"],
        "stages_s": stages([tuple(s) for s in child["stamps"]], child["release_s"]),
        "peak_rss_gib": round(child["peak_rss_kib"] / 2**20, 2),
        "gpu_peak_gib": round(child["gpu_peak_bytes"] / 2**30, 2) if child["gpu_peak_bytes"] else None,
        "files_gib": {k: round(v / 2**30, 3) for k, v in sorted(child["files"].items())},
        "rows": child["rows"],
    }
    if args.keep:
        result["kept"] = str(out)
    else:
        shutil.rmtree(work)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
