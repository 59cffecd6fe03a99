"""tiblocal's engine against llama.cpp's own llama-bench, on one llama.cpp build, in one run, alternating.

llama-bench's tg128 (128 tokens from an empty context) and pp512 (one 512-token prompt) are the reference. tiblocal's
figures come from its Engine as `tiblocal generate` runs it: tg, 128 tokens sampled with the model's suggested
settings (else tiblocal's defaults: temperature 0.2, top-k 40, top-p 0.9, repeat penalty 1.1) and ``ignore_eos``, after
the BOS token; pp, the same 512 random tokens decoded in batches of the context's n_batch; each after a warm-up run,
as llama-bench makes. Both sides load the same libllama: the script finds llama-bench (``--llama-bench``) or builds
it from the llama.cpp that the installed llama-cpp-python vendors (``--build DIR``: pip downloads its sdist, CMake
builds llama-bench and libllama), and runs its own measurements with ``LLAMA_CPP_LIB_PATH`` pointing at that build,
so flags and kernels are the same.

    python benchmarks/bench_engine.py --build ~/.cache/tiblocal-llama.cpp --threads 2 --rounds 3
    python benchmarks/bench_engine.py MODEL.gguf --llama-bench build/bin/llama-bench --n-gpu-layers -1 --flash-attn on
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path


def build_llama_bench(root: Path) -> Path:
    """llama-bench (and libllama beside it) from the installed llama-cpp-python's vendored llama.cpp, built once."""
    return build_llama_tool(root, "llama-bench")


def build_llama_tool(root: Path, tool: str) -> Path:
    """One of llama.cpp's tools (llama-bench, llama-quantize), with libllama beside it, built once under ``root`` from
    the llama.cpp that the installed llama-cpp-python vendors (its sdist, which pip downloads)."""
    version = metadata.version("llama-cpp-python")
    src = root / f"llama.cpp-{version}"
    binary = src / "build" / "bin" / tool
    if binary.is_file():
        return binary
    if not (src / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory() as dl:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q", "-d", dl,
                            f"llama-cpp-python=={version}"], check=True)
            sdist = next(Path(dl).glob("*.tar.gz"))
            prefix = sdist.name[: -len(".tar.gz")] + "/vendor/llama.cpp/"
            with tarfile.open(sdist) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(prefix) and len(m.name) > len(prefix)]
                for m in members:
                    m.name = m.name[len(prefix):]
                src.mkdir(parents=True, exist_ok=True)
                tar.extractall(src, members=members, filter="data")
    cuda = os.environ.get("TIBLOCAL_BENCH_CUDA") == "1"
    subprocess.run(["cmake", "-B", "build", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_BUILD_APP=OFF", "-DCMAKE_BUILD_TYPE=Release", f"-DGGML_CUDA={'ON' if cuda else 'OFF'}"],
                   cwd=src, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", "build", "-j", str(os.cpu_count() or 2), "--target", "llama", tool],
                   cwd=src, check=True, stdout=subprocess.DEVNULL)
    return binary


def llama_bench(binary: Path, model: Path, a) -> dict[str, float]:
    cmd = [str(binary), "-m", str(model), "-p", "512", "-n", "128", "-r", "1", "-o", "json", "-t", str(a.threads),
           "-ngl", str(99 if a.n_gpu_layers < 0 else a.n_gpu_layers), "-fa", a.flash_attn]
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in rows}


def tiblocal_side(model: Path, a) -> dict[str, float]:
    from tiblocal import engine as engine_module
    from tiblocal.engine import Engine, EngineConfig, Generation, Sampling

    with Engine(model, EngineConfig(ctx=1024, threads=a.threads, n_gpu_layers=a.n_gpu_layers,
                                    flash_attn=a.flash_attn, backend_sampling=a.backend_sampling)) as e:
        rng = random.Random(0)
        prompt = [rng.randrange(3, e.n_vocab) for _ in range(512)]
        sampling = Sampling.for_metadata(e.info.metadata, max_tokens=128, ignore_eos=True, seed=1)
        # a warm-up run of each test first, as llama-bench makes (its --no-warmup leaves it out)
        e._prefill(prompt)
        for _ in e.generate_tokens([e.bos_id], Sampling.for_metadata(e.info.metadata, max_tokens=4, ignore_eos=True),
                                   Generation()):
            pass
        e.reset()
        t0 = time.perf_counter()
        e._prefill(prompt)
        engine_module._llama_cpp.llama_synchronize(e._ctx)  # llama_decode returns before a GPU has finished
        pp = 512 / (time.perf_counter() - t0)
        e.reset()
        g = Generation()
        for _ in e.generate_tokens([e.bos_id], sampling, g):
            pass
        return {"pp": pp, "tg": g.tokens_per_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", type=Path, default=None, help="a .gguf (default: the bundled model)")
    ap.add_argument("--llama-bench", type=Path, default=None, help="a llama-bench built from the bindings' llama.cpp")
    ap.add_argument("--build", type=Path, default=None, metavar="DIR",
                    help="build llama-bench there from the installed llama-cpp-python's sdist (CUDA with "
                         "TIBLOCAL_BENCH_CUDA=1), or reuse what an earlier run built")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--backend-sampling", action="store_true", help="tiblocal's --backend-sampling")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are compared (default 3)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiblocal-side", action="store_true", help=argparse.SUPPRESS)  # the re-executed measurement
    a = ap.parse_args()
    from tiblocal.models import resolve_model

    model = resolve_model(a.model)
    if a.tiblocal_side:
        print(json.dumps(tiblocal_side(model, a)))
        return 0
    binary = a.llama_bench or (build_llama_bench(a.build) if a.build else None)
    if binary is None:
        ap.error("give --llama-bench BIN or --build DIR")
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(binary.parent))  # tiblocal on llama-bench's own libllama
    side = [sys.executable, __file__, str(model), "--tiblocal-side", "--threads", str(a.threads),
            "--n-gpu-layers", str(a.n_gpu_layers), "--flash-attn", a.flash_attn]
    side += ["--backend-sampling"] if a.backend_sampling else []
    ref, ours = [], []
    for _ in range(a.rounds):
        ref.append(llama_bench(binary, model, a))
        ours.append(json.loads(subprocess.run(side, capture_output=True, text=True, check=True, env=env).stdout))
    result = {"model": str(model), "threads": a.threads, "n_gpu_layers": a.n_gpu_layers, "flash_attn": a.flash_attn,
              "backend_sampling": a.backend_sampling,
              "llama_bench": ref, "tiblocal": ours}
    print(f"{'test':>6} {'llama-bench t/s':>16} {'tiblocal t/s':>13} {'ratio':>6}")
    for test, name in (("tg", "tg128"), ("pp", "pp512")):
        r, o = statistics.median(x[test] for x in ref), statistics.median(x[test] for x in ours)
        result[f"{name}_ratio"] = o / r
        print(f"{name:>6} {r:>16.1f} {o:>13.1f} {o / r:>6.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
