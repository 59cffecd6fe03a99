"""Decode speed of `tiblocal generate` against a raw llama.cpp loop, same GGUF, same threads, one run.

The reference is the loop a C program would run through llama-cpp-python's low-level bindings:
``llama_decode`` one token, ``llama_sampler_sample``, repeat, with the plain sampler chain of the same settings and
seed (tiblocal cuts to the top k + repeat_last_n before the penalties: the same tokens, tested in test_engine.py).
tiblocal's figure is what ``tiblocal generate`` reports (``generate_one``: template, tokenize,
stream with UTF-8 reassembly and stop strings). Runs alternate (raw, tiblocal, raw, ...) and the
median of each side is compared.

    python benchmarks/bench_generate.py                       # builds a random 55,296-token model
    python benchmarks/bench_generate.py --model m.gguf --n-gpu-layers -1 --tokens 256
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp

from bench_convert_merge import emit

from tiblocal.engine import Engine, EngineConfig, Sampling
from tiblocal.generate import PromptItem, generate_one
from tiblocal.templates import get_template

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizers" / "chinese-llama2" / "tokenizer.model"
PROMPT = "བོད་ཀྱི་ལོ་རྒྱུས་སྐོར་ལ་ཚིག་ཐུང་ཞིག་འབྲི་རོགས།"


def build_model(args, workdir: Path) -> Path:
    from tiblocal.convert.hf_to_gguf import hf_to_gguf
    from tiblocal.synthetic import LlamaShape, write_llama_checkpoint

    shape = LlamaShape(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=4096,
    )
    hf = write_llama_checkpoint(workdir / "hf", shape, args.tokenizer, seed=0, dtype="float16")
    out = workdir / "model.gguf"
    hf_to_gguf(hf, out, outtype=args.outtype)
    return out


def raw_decode(model: Path, prompt: str, n_tokens: int, threads: int, n_gpu_layers: int, s: Sampling) -> float:
    """Tokens/s of the bare llama.cpp loop (sampling + decode of each new token)."""
    lib = llama_cpp
    mp = lib.llama_model_default_params()
    mp.n_gpu_layers = 2**31 - 1 if n_gpu_layers < 0 else n_gpu_layers
    model_p = lib.llama_model_load_from_file(str(model).encode(), mp)
    cp = lib.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 2048, 512, 512
    cp.n_threads = cp.n_threads_batch = threads
    cp.no_perf = True
    ctx = lib.llama_init_from_model(model_p, cp)
    vocab = lib.llama_model_get_vocab(model_p)
    data = prompt.encode()
    buf = (lib.llama_token * (len(data) + 8))()
    n = lib.llama_tokenize(vocab, data, len(data), buf, len(buf), True, True)
    assert lib.llama_decode(ctx, lib.llama_batch_get_one(buf, n)) == 0
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_penalties(lib.llama_vocab_n_tokens(vocab), s.repeat_last_n, s.repeat_penalty, 0.0, 0.0))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(s.top_k))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(s.top_p, 1))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(s.temperature))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(s.seed))
    one = (lib.llama_token * 1)()
    t0 = time.perf_counter()
    produced = 0
    for _ in range(n_tokens):
        tok = lib.llama_sampler_sample(chain, ctx, -1)
        produced += 1
        if lib.llama_vocab_is_eog(vocab, tok):
            break
        one[0] = tok
        assert lib.llama_decode(ctx, lib.llama_batch_get_one(one, 1)) == 0
    dt = time.perf_counter() - t0
    lib.llama_sampler_free(chain)
    lib.llama_free(ctx)
    lib.llama_model_free(model_p)
    return produced / dt


def tiblocal_decode(model: Path, prompt: str, n_tokens: int, threads: int, n_gpu_layers: int, s: Sampling) -> tuple[float, dict]:
    with Engine(model, EngineConfig(threads=threads, ctx=2048, n_gpu_layers=n_gpu_layers)) as engine:
        rec = generate_one(engine, get_template("raw"), PromptItem(0, prompt), s, None)
    return rec["tokens_per_s"], rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a GGUF to measure (default: build a random one of the shape below)")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="tokenizer.model for the random model")
    ap.add_argument("--vocab", type=int, default=55296)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--outtype", default="f16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)  # llama.cpp's load log

    from tiblocal.engine import default_threads

    threads = args.threads or default_threads()
    s = Sampling(temperature=0.8, top_k=40, top_p=0.9, repeat_penalty=1.1, max_tokens=args.tokens, seed=1234)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_model(args, Path(tmp))
        raw, ours, recs = [], [], []
        for _ in range(args.repeats):
            raw.append(raw_decode(model, PROMPT, args.tokens, threads, args.n_gpu_layers, s))
            tps, rec = tiblocal_decode(model, PROMPT, args.tokens, threads, args.n_gpu_layers, s)
            ours.append(tps)
            recs.append(rec)
        size = model.stat().st_size
    result = {
        "model": str(args.model) if args.model else f"random llama h{args.hidden} l{args.layers} v{args.vocab} {args.outtype}",
        "model_bytes": size,
        "threads": threads,
        "n_gpu_layers": args.n_gpu_layers,
        "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
        "tokens": args.tokens,
        "raw_tokens_per_s": [round(x, 2) for x in raw],
        "tiblocal_tokens_per_s": [round(x, 2) for x in ours],
        "tiblocal_completion_tokens": [r["completion_tokens"] for r in recs],
        "raw_median": round(statistics.median(raw), 2),
        "tiblocal_median": round(statistics.median(ours), 2),
        "ratio": round(statistics.median(ours) / statistics.median(raw), 4),
        "goal": ">= 0.95",
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
