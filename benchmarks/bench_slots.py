"""The decode loop of `tiblocal serve` alone, without HTTP: N slots answering at once, in steady state.

Puts N equal jobs on the Scheduler, evaluates their prompts, then times the steps in which all N decode side by side
(one llama_decode of N tokens, N samplers), and reports ms per step and tokens/s. With ``--batched-bench BIN`` it also
runs llama-batched-bench on the same model (-npp PROMPT -ntg TOKENS) and prints the ratio to its S_TG, which is the
same quantity: the decode speed of N sequences together, here with tiblocal's sampling included.

    python benchmarks/bench_slots.py --slots 1,4,16
    python benchmarks/bench_slots.py MODEL.gguf --slots 1,8,16 --n-gpu-layers -1 --flash-attn on \\
        --batched-bench build/bin/llama-batched-bench --batched-bench-args "-ngl 99 -fa on"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tiblocal.engine import Engine, EngineConfig, Sampling
from tiblocal.models import resolve_model
from tiblocal.serve.slots import Job, Scheduler

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import SEED_TEXT, batched_bench  # noqa: E402


def steady_state(model: Path, slots: int, prompt_tokens: int, tokens: int, args) -> tuple[float, float]:
    """(ms per step, tokens/s) of ``slots`` jobs decoding together, after their prompts."""
    with Engine(model, EngineConfig(ctx=prompt_tokens + tokens + 64, parallel=slots, threads=args.threads,
                                    n_gpu_layers=args.n_gpu_layers, flash_attn=args.flash_attn,
                                    backend_sampling=args.backend_sampling)) as e:
        prompt = e.tokenize(SEED_TEXT * (1 + prompt_tokens // 20))[:prompt_tokens]
        sch = Scheduler(e)
        try:
            sampling = Sampling(max_tokens=tokens, ignore_eos=True, seed=1, temperature=args.temperature)
            for _ in range(slots):
                sch.submit(Job(prompt=prompt, sampling=sampling, sink=lambda event: None))
            sch.turn()
            while any(s.pending for s in sch.slots):  # the prompts, and each slot's first token
                sch.turn()
            t0, steps = time.perf_counter(), 0
            while all(s.job is not None for s in sch.slots):
                sch.turn()
                steps += 1
            dt = time.perf_counter() - t0
        finally:
            sch.stop()
    return dt / steps * 1000, slots * steps / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", type=Path, default=None, help="a .gguf (default: the bundled model)")
    ap.add_argument("--slots", default="1,4,16", help="slot counts (default 1,4,16)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=128, help="tokens each slot generates")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--flash-attn", default="auto")
    ap.add_argument("--backend-sampling", action="store_true", help="tiblocal serve's --backend-sampling")
    ap.add_argument("--batched-bench", default=None, metavar="BIN")
    ap.add_argument("--batched-bench-args", default="")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    model = resolve_model(a.model)
    counts = [int(n) for n in a.slots.split(",")]
    rows = []
    for n in counts:
        ms, tps = steady_state(model, n, a.prompt_tokens, a.tokens, a)
        rows.append({"slots": n, "ms_per_step": ms, "tokens_per_s": tps})
    reference = batched_bench(a.batched_bench, str(model), counts, a.prompt_tokens, a.tokens,
                              a.batched_bench_args.split()) if a.batched_bench else {}
    print(f"{'slots':>5} {'ms/step':>8} {'tokens/s':>9}" + ("  batched-bench S_TG  ratio" if reference else ""))
    for r in rows:
        ref = reference.get(r["slots"])
        if ref:
            r.update(batched_bench_s_tg=ref, ratio=r["tokens_per_s"] / ref)
        print(f"{r['slots']:>5} {r['ms_per_step']:>8.2f} {r['tokens_per_s']:>9.1f}"
              + (f"  {ref:>18.1f}  {r['ratio']:.2f}" if ref else ""))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(a).items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
