"""The `tiblocal` command: one table maps each verb to the function that runs it.

Exit status: 0 on success, 1 on a user or data error (one line on stderr, no traceback), 2 on a
usage error (argparse), 130 when interrupted. Stage verbs import their stage only when they run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import TiblocalError

def _int_at_least(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value}: expected a whole number of at least {least}")
        return value

    return parse


positive_int = _int_at_least(1)  # counts of windows, samples, questions
nonnegative_int = _int_at_least(0)


IMATRIX_DTYPES = ("f32", "bf16", "f16")  # quantize.imatrix.DTYPES, named here so the CLI starts without that stage
WIDE = 200  # the width of tables written to a pipe or a file


def _engine_args(p: argparse.ArgumentParser) -> None:
    from .engine import CACHE_TYPES, FLASH_ATTN, ROPE_SCALING

    g = p.add_argument_group("engine")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available cores)")
    g.add_argument("--ctx", type=int, default=None,
                   help="context window in tokens (default: 2048, or the context the model was trained on if shorter)")
    g.add_argument(
        "--n-gpu-layers", type=int, default=0, metavar="N",
        help="layers to offload to the GPU; -1 for all (needs a CUDA/Metal build of llama-cpp-python)",
    )
    g.add_argument("--flash-attn", choices=list(FLASH_ATTN), default="auto",
                   help="llama.cpp's flash attention (default auto: on where the backend supports it)")
    g.add_argument("--rope-scaling", choices=ROPE_SCALING, default=None,
                   help="RoPE scaling for a context beyond the trained one (default: the model's)")
    g.add_argument("--rope-scale", type=float, default=None, metavar="F",
                   help="stretch the trained positions F times, e.g. 2 to run a 4K model at 8K (default: the model's)")
    g.add_argument("--rope-freq-base", type=float, default=None, metavar="F", help="RoPE base frequency (default: the model's)")
    g.add_argument("--yarn-orig-ctx", type=int, default=None, metavar="N",
                   help="with --rope-scaling yarn: the context the model was trained on (default: the model's)")
    g.add_argument("--cache-type-k", choices=CACHE_TYPES, default="f16",
                   help="type of the cached keys (default f16; q8_0 halves their memory)")
    g.add_argument("--cache-type-v", choices=CACHE_TYPES, default="f16",
                   help="type of the cached values (default f16; a quantized type needs flash attention)")
    g.add_argument("--backend-sampling", action="store_true",
                   help="cut each token's candidates to the top-k inside llama.cpp's graph, on the GPU with the output "
                        "layer, so that a hundred candidates instead of the whole vocabulary come back to the CPU "
                        "(llama.cpp's --backend-sampling; the same choices; not with a grammar, top-k 0, or penalties "
                        "below 1)")
    g.add_argument("--verbose", action="store_true", help="show llama.cpp's own log")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    from .engine import Sampling

    d = Sampling()
    g = p.add_argument_group(
        "sampling (default: the model's suggested settings (general.sampling.* in the GGUF), else Chinese-Alpaca's)"
    )
    g.add_argument("--temp", type=float, default=None, help=f"temperature; 0 is greedy (default {d.temperature})")
    g.add_argument("--top-k", type=int, default=None, help=f"top-k; 0 disables it (default {d.top_k})")
    g.add_argument("--top-p", type=float, default=None, help=f"top-p (default {d.top_p})")
    g.add_argument("--repeat-penalty", type=float, default=None, help=f"repetition penalty (default {d.repeat_penalty})")
    g.add_argument("--repeat-last-n", type=int, default=None, help=f"tokens the penalty looks back (default {d.repeat_last_n})")
    g.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"most tokens per answer (default {d.max_tokens})")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed; -1 for a new one each time (default -1)")


def _template_args(p: argparse.ArgumentParser) -> None:
    from .templates import TEMPLATES

    p.add_argument(
        "--template", choices=list(TEMPLATES), default=None,
        help="chat template (default: the GGUF's own tokenizer.chat_template, else alpaca)",
    )
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")


def _engine_config(a: argparse.Namespace, **more):
    from .engine import EngineConfig

    return EngineConfig(threads=a.threads, ctx=a.ctx, n_gpu_layers=a.n_gpu_layers, verbose=a.verbose,
                        flash_attn=a.flash_attn, rope_scaling=a.rope_scaling, rope_scale=a.rope_scale,
                        rope_freq_base=a.rope_freq_base, yarn_orig_ctx=a.yarn_orig_ctx, cache_type_k=a.cache_type_k,
                        cache_type_v=a.cache_type_v, backend_sampling=a.backend_sampling, **more)


def _sampling(a: argparse.Namespace) -> dict:
    """The settings given on the command line (checked now); the runtime puts them over the model's suggested
    ones (GGUF general.sampling.*), which are over ours."""
    from .engine import Sampling

    given = {
        "temperature": a.temp, "top_k": a.top_k, "top_p": a.top_p, "repeat_penalty": a.repeat_penalty,
        "repeat_last_n": a.repeat_last_n, "max_tokens": a.max_tokens, "seed": a.seed,
    }
    if getattr(a, "ignore_eos", False):
        given["ignore_eos"] = True
    given = {k: v for k, v in given.items() if v is not None}
    Sampling(**given)  # an invalid value fails here, before the model loads
    return given


# --- verbs ---------------------------------------------------------------------------------------


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", type=Path, help="a .gguf model (default: the bundled model, if installed)")
    _template_args(p)
    _engine_args(p)
    _sampling_args(p)


def _chat(a: argparse.Namespace) -> int:
    from .chat import run_chat

    return run_chat(a.model, template=a.template, system=a.system, engine_config=_engine_config(a), sampling=_sampling(a))


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", type=Path, help="a .gguf model (default: the bundled model, if installed)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--file", type=Path, help="prompts: .txt (one a line) or .jsonl ({\"instruction\"|\"prompt\": ...}); - for stdin")
    p.add_argument("--out", type=Path, help="write the results here as JSON lines (default: stdout)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--json", dest="as_json", action="store_true", help="print JSON (with --prompt; files always give JSON lines)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at the end-of-text token: always --max-tokens tokens (for speed measurements)")
    _template_args(p)
    _engine_args(p)
    _sampling_args(p)


def _generate(a: argparse.Namespace) -> int:
    from .generate import run_generate

    return run_generate(
        a.model, prompt=a.prompt, file=a.file, out=a.out, template=a.template, system=a.system,
        as_json=a.as_json, force=a.force, engine_config=_engine_config(a), sampling=_sampling(a),
    )


def _serve_args(p: argparse.ArgumentParser) -> None:
    from .templates import TEMPLATES

    p.add_argument("model", nargs="?", type=Path, help="a .gguf model (default: the bundled model, if installed)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--parallel", type=int, default=4, metavar="N",
                   help="requests answered at once, batched in one context; each has --ctx tokens (default 4)")
    p.add_argument("--queue", type=int, default=64, metavar="N",
                   help="requests that may wait for a slot; beyond it the answer is 503 with Retry-After (default 64)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on the API (default: $TIBLOCAL_API_KEY, else none)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let pages from ORIGIN (e.g. http://localhost:3000, or *) call the API (repeatable; default none)")
    p.add_argument("--max-body", type=int, default=4 * 2**20, metavar="BYTES",
                   help="largest request body (default 4 MiB); larger ones get 413")
    p.add_argument("--template", choices=list(TEMPLATES), default=None,
                   help="chat template (default: the GGUF's own tokenizer.chat_template, else alpaca)")
    _engine_args(p)


def _serve(a: argparse.Namespace) -> int:
    from .serve.run import run_serve

    return run_serve(
        a.model, host=a.host, port=a.port, engine_config=_engine_config(a, parallel=a.parallel), template=a.template,
        api_key=a.api_key, queue=a.queue, max_body=a.max_body, cors_origins=a.cors_origin,
    )


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a .gguf file (a model or an importance matrix), a legacy .dat matrix or a Hugging Face model folder")
    p.add_argument("--json", dest="as_json", action="store_true", help="print JSON")


def _inspect(a: argparse.Namespace) -> int:
    from .inspect_model import run_inspect

    return run_inspect(a.path, as_json=a.as_json)


def _convert_args(p: argparse.ArgumentParser) -> None:
    from .templates import TEMPLATES

    p.add_argument("model_dir", type=Path, help="Hugging Face model folder (config.json, *.safetensors, tokenizer.model)")
    p.add_argument("--out", type=Path, required=True, help="output .gguf file")
    p.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default="f16", help="tensor type (default f16)")
    p.add_argument("--vocab-only", action="store_true", help="write only the tokenizer (for tokenizer tests)")
    p.add_argument(
        "--template", choices=[*TEMPLATES, "none"], default="alpaca",
        help="chat template written as tokenizer.chat_template (default alpaca; none writes no template)",
    )
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--json", dest="as_json", action="store_true", help="print the result as JSON")


def _convert(a: argparse.Namespace) -> int:
    from .convert.run import run_convert  # the conversion stage, loaded only for this verb

    return run_convert(
        a.model_dir, a.out, outtype=a.outtype, vocab_only=a.vocab_only,
        template=None if a.template == "none" else a.template, force=a.force, as_json=a.as_json,
    )


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", type=Path, help="base Hugging Face model folder")
    p.add_argument("adapters", type=Path, nargs="+", metavar="ADAPTER", help="peft LoRA adapter folders, applied in order")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--dtype", choices=["f16", "bf16", "f32"], default="f16", help="tensor type written (default f16)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", dest="as_json", action="store_true", help="print the result as JSON")


def _merge(a: argparse.Namespace) -> int:
    from .convert.run import run_merge

    return run_merge(a.base, a.adapters, a.out, dtype=a.dtype, force=a.force, as_json=a.as_json)


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="an f32/f16/bf16 .gguf")
    p.add_argument("--type", dest="types", required=True, help="Q4_K_M, Q8_0, ... or several: Q4_K_M,Q5_K_M,Q8_0")
    p.add_argument("--out", type=Path, required=True, help="output .gguf; with several types a folder or a name with {type}")
    p.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--output-tensor-type", default=None, metavar="T", help="type of output.weight (e.g. Q8_0, F16)")
    p.add_argument("--token-embedding-type", default=None, metavar="T", help="type of token_embd.weight")
    p.add_argument(
        "--imatrix", type=Path, default=None, metavar="FILE",
        help="importance matrix from tiblocal imatrix or llama.cpp's llama-imatrix (GGUF or .dat); IQ1/IQ2/IQ3_XXS types "
             "and Q2_K_S need one; with --rotate SEED, the one from tiblocal imatrix --rotate SEED",
    )
    p.add_argument("--allow-requantize", action="store_true", help="accept an input that is already quantized")
    p.add_argument(
        "--rotate", type=int, nargs="?", const=0, default=None, metavar="SEED",
        help="turn the model's hidden basis by a random orthogonal matrix (seed SEED, default 0) before quantizing: the "
             "same model, with outlier channels spread so 8-bit activations and weights lose less (a tied output "
             "matrix is written as its own tensor)",
    )
    p.add_argument("--rotate-trials", type=int, default=None, metavar="K",
                   help="with --rotate: try K rotations (seeds SEED..SEED+K-1) and keep, per type, the one with the "
                        "lowest perplexity on the calibration text (default 1)")
    p.add_argument("--calib", nargs="+", type=Path, default=[], metavar="FILE",
                   help="with --rotate-trials: calibration text, plain or .xz (default: the bundled Tibetan excerpt)")
    p.add_argument("--calib-windows", type=int, default=None, metavar="N",
                   help="with --rotate-trials: windows of 512 tokens scored per trial (default 32)")
    p.add_argument("--n-gpu-layers", type=int, default=None, metavar="N",
                   help="with --rotate-trials: layers on the GPU while scoring (-1: all; default 0)")
    p.add_argument("--force", action="store_true", help="overwrite outputs that exist")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's own log (one line per tensor)")
    p.add_argument("--json", dest="as_json", action="store_true", help="print the results as JSON")


def _quantize(a: argparse.Namespace) -> int:
    from .quantize.run import run_quantize

    return run_quantize(
        a.input, a.out, types=a.types, threads=a.threads, output_tensor_type=a.output_tensor_type,
        token_embedding_type=a.token_embedding_type, imatrix=a.imatrix, allow_requantize=a.allow_requantize,
        force=a.force, verbose=a.verbose, as_json=a.as_json, rotate=a.rotate, rotate_trials=a.rotate_trials,
        calib=a.calib, calib_windows=a.calib_windows, n_gpu_layers=a.n_gpu_layers,
    )


def _imatrix_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", type=Path, help="the merged Hugging Face model folder the GGUF was converted from")
    p.add_argument("--out", type=Path, required=True, help="the importance matrix to write (GGUF, as llama-imatrix)")
    p.add_argument("--text", nargs="+", type=Path, default=[], metavar="FILE",
                   help="text, plain or .xz (default: the Tibetan calibration excerpt bundled in the package)")
    p.add_argument("--chunks", type=int, default=100, help="windows of text to run (default 100)")
    p.add_argument("--ctx", type=int, default=512, help="tokens a window (default 512, as llama-imatrix)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when torch sees a GPU)")
    p.add_argument("--dtype", choices=IMATRIX_DTYPES, default="f32",
                   help="what the model runs in (default f32; bf16 halves the GPU memory: 7B takes about 14 GB)")
    p.add_argument("--no-output", dest="output", action="store_false",
                   help="leave out the output product (lm_head, or the tied embedding), as llama-imatrix does without "
                        "--process-output")
    p.add_argument("--rotate", type=int, nargs="?", const=0, default=None, metavar="SEED",
                   help="measure the model as `tiblocal quantize --rotate SEED` turns it (seed default 0), for "
                        "quantize --rotate SEED --imatrix")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--json", dest="as_json", action="store_true", help="print the result as JSON")


def _imatrix(a: argparse.Namespace) -> int:
    from .quantize.imatrix import run_imatrix

    return run_imatrix(a.hf_dir, a.out, texts=a.text, chunks=a.chunks, ctx=a.ctx, device=a.device, force=a.force,
                       as_json=a.as_json, output=a.output, dtype=a.dtype, rotate=a.rotate)


def _gptq_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", type=Path, help="a merged Hugging Face model folder")
    p.add_argument("--bits", type=int, choices=[4, 8], required=True, help="bits a weight: 4 or 8")
    p.add_argument("--out", type=Path, required=True, help="the GPTQ model folder to write")
    p.add_argument("--group-size", type=int, default=128, help="columns sharing a scale (default 128; -1: one group a row)")
    p.add_argument("--calib", nargs="+", type=Path, default=[], metavar="FILE",
                   help="calibration text, plain or .xz (default: the Tibetan excerpt bundled in the package)")
    p.add_argument("--samples", type=positive_int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens a window (default 512)")
    p.add_argument("--desc-act", action="store_true", help="quantize columns in order of decreasing activation")
    p.add_argument("--quantize-lm-head", action="store_true", help="quantize lm_head too (kept unquantized by default)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when torch sees a GPU)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", dest="as_json", action="store_true", help="print the result as JSON")


def _gptq(a: argparse.Namespace) -> int:
    from .quantize.gptq import run_gptq

    return run_gptq(
        a.hf_dir, a.out, as_json=a.as_json, bits=a.bits, group_size=a.group_size, calib=a.calib, samples=a.samples,
        seq_len=a.seq_len, desc_act=a.desc_act, lm_head=a.quantize_lm_head, device=a.device, force=a.force,
    )


def _eval_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ppl = sub.add_parser("ppl", help="perplexity of a GGUF or a Hugging Face / GPTQ folder on a text")
    ppl.add_argument("models", type=Path, nargs=1, metavar="MODEL", help="a GGUF, or a Hugging Face or GPTQ folder")
    ppl.add_argument("--per-syllable", action="store_true",
                     help="each line a document, every token scored; perplexity per Tibetan syllable (comparable across "
                          "tokenizers); --max-windows then counts lines")
    cmp = sub.add_parser("compare", help="ΔPPL, KL divergence and top-1 agreement of QUANT against REF")
    cmp.add_argument("models", type=Path, nargs=2, metavar="MODEL", help="REF then QUANT")
    rep = sub.add_parser("report", help="a table of size, bits/weight, ΔPPL, KL, top-1 and tokens/s per quant type")
    rep.add_argument("models", type=Path, nargs="+", metavar="MODEL", help="the f16 GGUF, then its quantizations")
    rep.add_argument("--out", type=Path, default=None, help="also write OUT.json and OUT.md")
    rep.add_argument("--force", action="store_true", help="overwrite OUT.json and OUT.md if they exist")
    for q in (ppl, cmp, rep):
        q.add_argument("--text", type=Path, nargs="+", required=True, help="text files (plain or .xz)")
        q.add_argument("--ctx", type=int, default=512, help="window size in tokens (default 512, as llama-perplexity)")
        q.add_argument("--max-windows", type=positive_int, default=None, help="score at most this many windows")
        q.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available cores)")
        q.add_argument("--n-gpu-layers", type=int, default=0, metavar="N", help="layers on the GPU; -1 for all (default 0)")
        q.add_argument("--json", dest="as_json", action="store_true", help="print JSON")
    mcq = sub.add_parser("mcq", help="TLUE multiple choice (Ti-MMLU rows): log-likelihood and generation accuracy")
    mcq.add_argument("--data", type=Path, required=True, help="questions as JSON lines (.jsonl or .jsonl.xz): subject, "
                     "loc, polished_ti_content, answer")
    mcq.add_argument("--fewshot", type=Path, default=None, help="solved examples of each subject, the same format")
    mcq.add_argument("--shots", type=int, choices=[0, 5], default=0, help="examples before each question (default 0)")
    tasks = sub.add_parser("tasks", help="Tibetan generation tasks: reading comprehension (qa), verb tenses (tense)")
    tasks.add_argument("--task", required=True, choices=["qa", "tense", "news", "continue", "classify"],
                       help="qa: TibetanQA rows (context, question, answer); tense: verb rows (present, past, future, "
                            "imperative); news: title, article; continue: text, continuation; classify: text, label "
                            "(the corpus tasks' held-out rows: python -m tiblocal.finetune.instructions)")
    tasks.add_argument("--data", type=Path, required=True, help="the task's rows as JSON lines (.jsonl or .jsonl.xz)")
    tasks.add_argument("--parallel", type=positive_int, default=4, metavar="N",
                       help="a GGUF answers N rows in each decode, each in a cache of --ctx tokens (default 4; 1: one "
                            "at a time, the least memory)")
    for q, tokens, out in ((mcq, "16", "index, choice, answer, correct, the options' log-likelihoods, the generated "
                                       "answer"), (tasks, "qa and tense 64, news and continue 128, classify 16",
                                                   "the answer and its scores")):
        q.add_argument("model", nargs="?", type=Path, default=None,
                       help="a GGUF or a Hugging Face / GPTQ folder (default: the bundled model)")
        q.add_argument("--limit", type=positive_int, default=None, help="the first N rows only")
        q.add_argument("--out", type=Path, default=None, help=f"write one JSON line per row: {out}")
        q.add_argument("--force", action="store_true", help="overwrite --out if it exists")
        q.add_argument("--ctx", type=positive_int, default=None, help="context in tokens; longer prompts are skipped "
                       "and counted (default: the context the model was trained on)")
        q.add_argument("--max-tokens", type=positive_int, default=16 if q is mcq else None,
                       help=f"tokens of each generated answer (default {tokens})")
        q.add_argument("--template", default=None, help="chat template (default: the GGUF's own, else alpaca)")
        q.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available cores)")
        q.add_argument("--n-gpu-layers", type=int, default=0, metavar="N",
                       help="layers on the GPU; -1 for all (default 0)")
        q.add_argument("--json", dest="as_json", action="store_true", help="print JSON")


def _eval(a: argparse.Namespace) -> int:
    from .quantize.run import run_eval, run_report

    if a.action == "tasks":
        from .quantize.tasks import run_tasks

        return run_tasks(a.model, task=a.task, data=a.data, limit=a.limit, out=a.out, force=a.force, ctx=a.ctx,
                         threads=a.threads, n_gpu_layers=a.n_gpu_layers, template=a.template,
                         max_tokens=a.max_tokens, as_json=a.as_json, parallel=a.parallel)
    if a.action == "mcq":
        from .quantize.mcq import run_mcq

        return run_mcq(a.model, data=a.data, fewshot=a.fewshot, shots=a.shots, limit=a.limit, out=a.out, force=a.force,
                       ctx=a.ctx, threads=a.threads, n_gpu_layers=a.n_gpu_layers, template=a.template,
                       max_tokens=a.max_tokens, as_json=a.as_json)
    if a.action == "report":
        if len(a.models) < 2:
            raise TiblocalError("eval report needs the reference GGUF and at least one quantization of it")
        return run_report(
            a.models[0], a.models[1:], text=a.text, ctx=a.ctx, max_windows=a.max_windows, threads=a.threads,
            n_gpu_layers=a.n_gpu_layers, out=a.out, as_json=a.as_json, force=a.force,
        )
    return run_eval(
        a.action, a.models, text=a.text, ctx=a.ctx, max_windows=a.max_windows, threads=a.threads,
        n_gpu_layers=a.n_gpu_layers, as_json=a.as_json, per_syllable=getattr(a, "per_syllable", False),
    )


def _vocab_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ext = sub.add_parser("extend", help="train a Tibetan SentencePiece model and merge it into a base tokenizer")
    ext.add_argument("--base", required=True, help="the base tokenizer.model (Llama-2's), its folder, or 'bundled'")
    ext.add_argument("--corpus", type=Path, nargs="+", required=True, help="text files, plain or .xz")
    ext.add_argument("--add", type=int, required=True, help="pieces to add")
    ext.add_argument("--out", type=Path, required=True, help="output folder")
    ext.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="SentencePiece model of the new pieces (default bpe, as Llama-2's)")
    ext.add_argument("--sample-chars", type=positive_int, default=50_000_000, help="memory budget of the training sample (characters)")
    ext.add_argument("--weight", action="append", default=[], metavar="NAME=FACTOR",
                     help="sample a corpus file more or less, e.g. derge_kangyur=0.3 (repeatable)")
    ext.add_argument("--eval", type=Path, nargs="+", default=None, help="held-out text for the report (default: unsampled corpus lines)")
    ext.add_argument("--curve", default=None, metavar="N,N,...", help="also measure these sizes (bpe), e.g. 8000,16000,24000,32000")
    ext.add_argument("--no-split-whitespace", dest="split_by_whitespace", action="store_false",
                     help="let pieces span spaces (the '། །' of verse): about 3%% fewer tokens on Tibetan text")
    ext.add_argument("--force", action="store_true", help="replace --out if it exists")
    ext.add_argument("--json", dest="as_json", action="store_true", help="print the result as JSON")
    stats = sub.add_parser("stats", help="tokens per Tibetan syllable, characters per token, byte fallback")
    par = sub.add_parser("parity", help="do sentencepiece, llama.cpp and Hugging Face give the same ids?")
    for q in (stats, par):
        q.add_argument("tokenizer", help="a tokenizer.model, its folder, or 'bundled'")
        q.add_argument("--text", type=Path, nargs="+", required=True, help="text files, plain or .xz")
        q.add_argument("--json", dest="as_json", action="store_true", help="print the result as JSON")
    par.add_argument("--show", type=nonnegative_int, default=20, help="mismatching lines to show (default 20)")


def _vocab(a: argparse.Namespace) -> int:
    if a.action == "extend":
        from .finetune.vocab_run import run_extend

        return run_extend(
            a.base, a.corpus, a.out, add=a.add, model_type=a.model_type, sample_chars=a.sample_chars,
            weights=a.weight, eval_files=a.eval, force=a.force, as_json=a.as_json, curve=a.curve,
            split_by_whitespace=a.split_by_whitespace,
        )
    from .vocab_cli import run_parity, run_stats

    if a.action == "stats":
        return run_stats(a.tokenizer, a.text, as_json=a.as_json)
    return run_parity(a.tokenizer, a.text, as_json=a.as_json, show=a.show)


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a Hugging Face model folder or a .gguf file")
    p.add_argument("--json", dest="as_json", action="store_true", help="print the result as JSON")


def _check(a: argparse.Namespace) -> int:
    from .check import run_check

    return run_check(a.path, as_json=a.as_json)


def _release_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", type=Path, help="a merged Hugging Face model folder")
    p.add_argument("--out", type=Path, required=True, help="the release folder to write (new, or --force)")
    p.add_argument("--types", default="Q4_K_M,Q8_0",
                   help="llama.cpp quant types, each TYPE or TYPE:OUTPUT_TYPE (the type of output.weight, or of token_embd "
                        "when embeddings are tied), e.g. Q4_K_M:Q5_0,Q8_0 (default Q4_K_M,Q8_0); the first gets the Modelfile")
    p.add_argument("--name", default=None, help="file name stem and model card title (default: the folder's name)")
    p.add_argument("--template", default="alpaca", help="chat template for the GGUFs and the Modelfile (default alpaca)")
    p.add_argument("--eval-text", nargs="+", type=Path, default=[], metavar="FILE",
                   help="text (plain or .xz) on which to measure ΔPPL, KL and top-1 of each quant against f16")
    p.add_argument("--ctx", type=int, default=512, help="evaluation window (default 512)")
    p.add_argument("--max-windows", type=positive_int, default=None, help="evaluate at most this many windows")
    p.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--n-gpu-layers", type=int, default=0, metavar="N",
                   help="layers llama.cpp runs on the GPU for the --eval-text measurements (-1: all; needs a GPU build "
                        "of llama-cpp-python)")
    p.add_argument("--notes", type=Path, default=None, help="Markdown for the model card's 'How it was made'")
    p.add_argument("--gptq", type=int, choices=[4, 8], default=None, metavar="BITS",
                   help="also a GPTQ model folder at 4 or 8 bits (tiblocal gptq, bundled Tibetan calibration)")
    p.add_argument("--gptq-group-size", type=int, default=128, help="GPTQ group size (default 128)")
    p.add_argument("--imatrix", type=Path, default=None, metavar="FILE",
                   help="quantize the GGUFs with this importance matrix (tiblocal imatrix or llama-imatrix); it is shipped "
                        "in the release")
    p.add_argument("--make-imatrix", action="store_true",
                   help="make the importance matrix from the model on Tibetan text first (as tiblocal imatrix), ship it "
                        "and quantize with it")
    p.add_argument("--imatrix-text", nargs="+", type=Path, default=[], metavar="FILE",
                   help="text for --make-imatrix, plain or .xz (implies it; default: the bundled Tibetan calibration excerpt)")
    p.add_argument("--imatrix-chunks", type=int, default=100, help="windows of 512 tokens for --make-imatrix (default 100)")
    p.add_argument("--imatrix-dtype", choices=IMATRIX_DTYPES, default="f32",
                   help="what the model runs in for --make-imatrix (default f32; bf16: 7B in 25 s instead of 42 s on an H100)")
    p.add_argument("--device", default=None, help="where --make-imatrix runs: cpu or cuda (default: cuda when torch sees a GPU)")
    p.add_argument("--rotate", default="", metavar="TYPES",
                   help="quantize these types (e.g. Q8_0) in a rotated basis, as `tiblocal quantize --rotate`; with "
                        "--make-imatrix they take a matrix measured in that basis (NAME.rotated.imatrix.gguf), a given "
                        "--imatrix they do not")
    p.add_argument("--rotate-seed", type=int, default=0, metavar="SEED", help="the rotation's seed (default 0)")
    p.add_argument("--eval-mcq", type=Path, default=None, metavar="FILE",
                   help="TLUE multiple-choice rows to score every GGUF of the release on (as tiblocal eval mcq, 0-shot)")
    p.add_argument("--eval-task", dest="eval_tasks", action="append", default=[], metavar="NAME=FILE",
                   help="a tiblocal eval tasks task and its rows (qa, tense, news, continue, classify), scored on every "
                        "GGUF; repeat for more tasks")
    p.add_argument("--eval-limit", type=positive_int, default=None, metavar="N",
                   help="score the first N rows of each --eval-mcq / --eval-task file")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", dest="as_json", action="store_true", help="print the result as JSON")


def _release(a: argparse.Namespace) -> int:
    from .pipelines.release import run_release

    return run_release(
        a.hf_dir, a.out, as_json=a.as_json, types=a.types.split(","), name=a.name, template=a.template,
        eval_text=a.eval_text, ctx=a.ctx, max_windows=a.max_windows, threads=a.threads, notes=a.notes,
        gptq_bits=a.gptq, gptq_group_size=a.gptq_group_size, force=a.force, imatrix=a.imatrix,
        make_imatrix=a.make_imatrix, imatrix_text=a.imatrix_text, imatrix_chunks=a.imatrix_chunks,
        imatrix_dtype=a.imatrix_dtype, device=a.device, n_gpu_layers=a.n_gpu_layers,
        rotate=[t for t in a.rotate.split(",") if t.strip()], rotate_seed=a.rotate_seed, eval_mcq=a.eval_mcq,
        eval_tasks=a.eval_tasks, eval_limit=a.eval_limit,
    )


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="a folder with SHA256SUMS (from tiblocal merge or release)")
    p.add_argument("--json", dest="as_json", action="store_true", help="print the result as JSON")


def _verify(a: argparse.Namespace) -> int:
    from .verify import run_verify

    return run_verify(a.folder, as_json=a.as_json)


def _train_args(stage: str) -> Callable[[argparse.ArgumentParser], None]:
    """The options of `tiblocal pretrain` or `tiblocal sft`, each with its own example."""

    def configure(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help=f"a YAML recipe, or a name in finetune/configs (e.g. tiny-{stage})")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="change a setting, e.g. output_dir=runs/x lora.r=16")
        p.add_argument("--json", dest="as_json", action="store_true", help="print the result as JSON")

    return configure


def _pretrain(a: argparse.Namespace) -> int:
    from .finetune.train_run import run_train

    return run_train("pretrain", a.config, a.overrides, as_json=a.as_json)


def _sft(a: argparse.Namespace) -> int:
    from .finetune.train_run import run_train

    return run_train("sft", a.config, a.overrides, as_json=a.as_json)


@dataclass(frozen=True)
class Verb:
    name: str
    summary: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


VERBS = (
    Verb("chat", "chat with a GGUF model in the terminal", _chat_args, _chat),
    Verb("generate", "generate answers for a prompt or a file of prompts (JSON lines)", _generate_args, _generate),
    Verb("serve", "serve a GGUF model: OpenAI-compatible API with parallel requests, and a chat page", _serve_args,
         _serve),
    Verb("inspect", "show what a GGUF file, importance matrix or Hugging Face folder holds", _inspect_args, _inspect),
    Verb("vocab", "extend a tokenizer for Tibetan, and check its figures and its parity across runtimes", _vocab_args, _vocab),
    Verb("check", "check that tokenizer, config, weights (or a GGUF) agree on the vocabulary", _check_args, _check),
    Verb("pretrain", "continued pretraining (LoRA or full) from a YAML recipe; runs under accelerate launch", _train_args("pretrain"), _pretrain),
    Verb("sft", "instruction tuning from a YAML recipe; runs under accelerate launch", _train_args("sft"), _sft),
    Verb("merge", "merge LoRA adapters into a base model, shard by shard", _merge_args, _merge),
    Verb("release", "f16 + quantized GGUFs, quality table, model card, Ollama Modelfile, SHA256SUMS", _release_args, _release),
    Verb("verify", "check a folder's files against its SHA256SUMS", _verify_args, _verify),
    Verb("convert", "convert a Hugging Face Llama model to GGUF", _convert_args, _convert),
    Verb("quantize", "quantize a GGUF with llama.cpp's own quantizer (Q4_K_M, Q8_0, ...)", _quantize_args, _quantize),
    Verb("imatrix", "importance matrix for quantize --imatrix, from a Hugging Face model on Tibetan text", _imatrix_args,
         _imatrix),
    Verb("gptq", "GPTQ 4/8-bit through gptqmodel, calibrated on Tibetan text (loads in transformers)", _gptq_args, _gptq),
    Verb("eval", "perplexity, and what quantization cost (ΔPPL, KL, top-1) on a text", _eval_args, _eval),
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, only the options of the verb of that name are set up (none for a name
    that is no verb): the others keep their summary, all that the top-level help shows, and start-up does not pay for
    their options (those of chat and generate import the runtime for their defaults)."""
    parser = argparse.ArgumentParser(
        prog="tiblocal",
        description="Extended-vocabulary Llama models (Tibetan, Chinese) from training to an offline laptop.",
    )
    parser.add_argument("--version", action="version", version=f"tiblocal {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for v in VERBS:
        p = sub.add_parser(v.name, help=v.summary, description=v.summary)
        if only is None or v.name == only:
            v.configure(p)
        p.set_defaults(_run=v.run)
    return parser


# Optional dependencies, by the top-level module a verb imports, and the extra that installs them.
EXTRAS = {"torch": "train", "transformers": "train", "peft": "train", "accelerate": "train", "google": "train",
          "yaml": "train", "gptqmodel": "gptq", "optimum": "gptq", "rouge_score": "eval", "sacrebleu": "eval"}
PACKAGES = {"google": "protobuf", "yaml": "pyyaml", "rouge_score": "rouge-score"}  # modules whose package has another name


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def crash_report(argv: list[str]) -> Path | None:
    """Write the traceback being handled, with the command line and versions, to a file of its own; its path, or None
    when no place could be written."""
    import platform
    import time
    import traceback

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tiblocal" / "crashes"
    text = (f"tiblocal {__version__}, Python {platform.python_version()}, {platform.platform()}\n"
            f"command: tiblocal {' '.join(argv)}\n\n{traceback.format_exc()}")
    for folder in (base, Path(__import__("tempfile").gettempdir()) / "tiblocal-crashes"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def _fail(args: argparse.Namespace, message: str) -> int:
    """One line on stderr; under --json, a JSON error object on stdout too (and nothing else there)."""
    message = _one_line(message)
    print(f"tiblocal: error: {message}", file=sys.stderr)
    if getattr(args, "as_json", False):
        from .jsonout import print_json, printed

        if not printed():  # a verb that printed its result and then failed (verify, check) said it there
            print_json({"error": message}, ensure_ascii=False)
    return 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        # rich lays tables out for 80 columns when it cannot ask a terminal: piped or logged, they lost their numbers
        os.environ["COLUMNS"] = str(WIDE)
    named = next((a for a in argv if not a.startswith("-")), "")  # the verb: top-level options take no value
    parser = build_parser(only=named)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except TiblocalError as e:
        return _fail(args, str(e))
    except KeyboardInterrupt:
        print("tiblocal: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `tiblocal generate ... | head`
        return 0
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in EXTRAS:
            return _last_resort(args, argv, e)
        return _fail(args, f"tiblocal {args.verb} needs {PACKAGES.get(top, top)}, which is not installed here; "
                           f"install it with pip install 'tiblocal[{EXTRAS[top]}]'")
    except MemoryError:
        return _fail(args, f"tiblocal {args.verb} ran out of memory; use a smaller input or a machine with more")
    except Exception as e:  # the last resort: a bug shows up as a report, not a dump
        return _last_resort(args, argv, e)


def _last_resort(args: argparse.Namespace, argv: list[str], e: BaseException) -> int:
    report = crash_report(argv)
    where = f"the traceback is in {report}" if report else "no traceback file could be written"
    return _fail(args, f"unexpected {type(e).__name__} in tiblocal {args.verb}: {e} (a bug in tiblocal: {where}; "
                       f"please report it with that file)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
