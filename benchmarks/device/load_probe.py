"""Load one GGUF through tiblocal's Engine after the given imports, for gpu_import_order.sh.

Usage: load_probe.py MODEL.gguf [--load-first] [--pre MOD,MOD...] [--torch-cuda] [--n-gpu-layers N] [--verbose]
Before the load it prints which copies of the CUDA, C++ and OpenMP runtimes the process has mapped (so that a crash
can be tied to the copy a module imported first brought in); after it, "OK" and the vocabulary size. A crash shows
as the exit status the caller reads (139 in the shell for a segfault, 134 for an abort).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

RUNTIMES = re.compile(r"lib(cudart|cublas|cublasLt|cuda|stdc\+\+|gomp|ggml-cuda|ggml-base|llama)[-.]")


def mapped_runtimes() -> list[str]:
    """The shared runtimes this process has mapped, one path each, in address order."""
    seen: dict[str, None] = {}
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1] if "/" in line else ""
            if RUNTIMES.search(path.rsplit("/", 1)[-1]):
                seen.setdefault(path)
    return list(seen)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--load-first", action="store_true", help="load llama.cpp (tiblocal.bindings) before the --pre imports")
    p.add_argument("--pre", default="", help="modules imported first, in this order")
    p.add_argument("--torch-cuda", action="store_true", help="also start torch's CUDA context before the load")
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args()
    from tiblocal import bindings  # imports nothing of llama.cpp's until load()

    if a.load_first:
        bindings.load(a.verbose)
    for name in filter(None, a.pre.split(",")):
        importlib.import_module(name)
    if a.torch_cuda:
        import torch

        torch.zeros(1, device="cuda")
    bindings.load(a.verbose)
    print("mapped before the load:", " ".join(mapped_runtimes()) or "none", flush=True)
    from tiblocal.engine import Engine, EngineConfig

    with Engine(a.model, EngineConfig(ctx=64, n_gpu_layers=a.n_gpu_layers, verbose=a.verbose)) as e:
        print("OK", e.n_vocab, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
