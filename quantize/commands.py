"""The quantization stage's verbs: quantize (GGUF through llama.cpp's quantizer), imatrix, gptq, and eval (ppl, compare,
report, mcq, tasks). Each is a function of one options dataclass (``tiblocal/options.py``); torch, llama.cpp and the
scorers are imported inside the functions."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tiblocal.errors import TiblocalError
from tiblocal.options import Result, option, positive_int

CALIB_HELP = "calibration text, plain or .xz (default: the Tibetan excerpt bundled in the package)"


def _imatrix_dtypes() -> list[str]:
    from .imatrix import DTYPES

    return list(DTYPES)


# --- quantize ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizeOptions:
    input: Path = option(positional=True, help="an f32/f16/bf16 .gguf")
    types: str = option(flag="--type", help="Q4_K_M, Q8_0, ... or several: Q4_K_M,Q5_K_M,Q8_0")
    out: Path = option(help="output .gguf; with several types a folder or a name with {type}")
    threads: int | None = option(None, help="threads (default: all cores)")
    output_tensor_type: str | None = option(None, metavar="T", help="type of output.weight (e.g. Q8_0, F16)")
    token_embedding_type: str | None = option(None, metavar="T", help="type of token_embd.weight")
    imatrix: Path | None = option(
        None, metavar="FILE",
        help="importance matrix from tiblocal imatrix or llama.cpp's llama-imatrix (GGUF or .dat); IQ1/IQ2/IQ3_XXS "
             "types and Q2_K_S need one; with --rotate SEED, the one from tiblocal imatrix --rotate SEED")
    allow_requantize: bool = option(False, help="accept an input that is already quantized")
    rotate: int | None = option(
        None, const=0, metavar="SEED",
        help="turn the model's hidden basis by a random orthogonal matrix (seed SEED, default 0) before quantizing: "
             "the same model, with outlier channels spread so 8-bit activations and weights lose less (a tied output "
             "matrix is written as its own tensor)")
    rotate_trials: int | None = option(
        None, metavar="K", help="with --rotate: try K rotations (seeds SEED..SEED+K-1) and keep, per type, the one "
                                "with the lowest perplexity on the calibration text (default 1)")
    calib: list[Path] = option([], metavar="FILE", help="with --rotate-trials: calibration text, plain or .xz "
                                                        "(default: the bundled Tibetan excerpt)")
    calib_windows: int | None = option(
        None, metavar="N", help="with --rotate-trials: windows of 512 tokens scored per trial (default 32)")
    n_gpu_layers: int | None = option(
        None, metavar="N", help="with --rotate-trials: layers on the GPU while scoring (-1: all; default 0)")
    force: bool = option(False, help="overwrite outputs that exist")
    verbose: bool = option(False, help="show llama.cpp's own log (one line per tensor)")
    as_json: bool = option(False, flag="--json", help="print the results as JSON")


class _Display:
    """What is being quantized (tiblocal.progress.status), begun on the first type: rich is imported while llama.cpp
    is already working."""

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.say = None

    def started(self, qtype: str, path: Path) -> None:
        self.stage(f"quantizing to {qtype} -> {path.name}")

    def stage(self, description: str) -> None:
        if self.say is None:
            from tiblocal.progress import status

            self.say = self.stack.enter_context(status("quantize"))
        self.say(description)

    def stop(self) -> None:
        self.stack.close()


def quantize(o: QuantizeOptions) -> Result:
    from .gguf_quant import parse_types, quantize_gguf

    # --rotate-trials, --calib, --calib-windows, --n-gpu-layers: None or empty when not given (quantize_rotated has
    # their defaults)
    given = {k: v for k, v in (("trials", o.rotate_trials), ("calib", o.calib or None),
                               ("calib_windows", o.calib_windows), ("n_gpu_layers", o.n_gpu_layers)) if v is not None}
    if o.rotate is None and given:
        raise TiblocalError("--rotate-trials, --calib, --calib-windows and --n-gpu-layers belong to --rotate; add "
                            "--rotate or leave them out")
    names = parse_types(o.types)
    display = _Display()
    settings = dict(output_tensor_type=o.output_tensor_type, token_embedding_type=o.token_embedding_type,
                    allow_requantize=o.allow_requantize, verbose=o.verbose, imatrix=o.imatrix)
    seeds: dict[str, int] = {}
    trials = []
    t0 = time.perf_counter()
    try:
        if o.rotate is None:
            results = quantize_gguf(o.input, o.out, names, threads=o.threads, force=o.force, on_start=display.started,
                                    **settings)
        else:
            from .rotated_quant import quantize_rotated

            results, seeds, trials = quantize_rotated(o.input, o.out, names, seed=o.rotate, threads=o.threads,
                                                      force=o.force, on_stage=display.stage, **given, **settings)
    finally:
        display.stop()
    seconds = time.perf_counter() - t0
    rows = []
    for r in results:
        row = {"type": r.type, "path": str(r.path), "size_bytes": r.size, "seconds": round(r.seconds, 2)}
        if o.rotate is not None:
            row["rotation_seed"] = seeds[r.type]
            row["seconds_in_all"] = round(seconds, 2)  # the rotations and trials too, for every type together
            row["trials"] = [{"seed": t.seed, "calib_ppl": t.calib_ppl} for t in trials if t.type == r.type]
        rows.append(row)

    lines = []
    for r, row in zip(results, rows, strict=True):
        if o.rotate is None:
            lines.append(f"wrote {r.path} ({r.type}, {r.size / 2**20:.1f} MiB, {r.seconds:.1f} s)")
            continue
        scored = [t for t in row["trials"] if t["calib_ppl"] is not None]
        how = ("; calibration perplexity " + ", ".join(f"seed {t['seed']} {t['calib_ppl']:.5g}" for t in scored)
               if scored else "")
        lines.append(f"wrote {r.path} ({r.type}, {r.size / 2**20:.1f} MiB, rotation seed {row['rotation_seed']}{how})")
    if o.rotate is not None:
        lines.append(f"{seconds:.1f} s in all")
    return Result(rows, "\n".join(lines), to="stderr")


# --- imatrix, gptq -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImatrixOptions:
    hf_dir: Path = option(positional=True, help="the merged Hugging Face model folder the GGUF was converted from")
    out: Path = option(help="the importance matrix to write (GGUF, as llama-imatrix)")
    text: list[Path] = option([], metavar="FILE", help="text, plain or .xz (default: the Tibetan calibration excerpt "
                                                       "bundled in the package)")
    chunks: int = option(100, help="windows of text to run (default 100)")
    ctx: int = option(512, help="tokens a window (default 512, as llama-imatrix)")
    device: str | None = option(None, help="cpu or cuda (default: cuda when torch sees a GPU)")
    dtype: str = option("f32", choices=_imatrix_dtypes,
                        help="what the model runs in (default f32; bf16 halves the GPU memory: 7B takes about 14 GB)")
    output: bool = option(True, flag="--no-output", negate=True,
                          help="leave out the output product (lm_head, or the tied embedding), as llama-imatrix does "
                               "without --process-output")
    rotate: int | None = option(None, const=0, metavar="SEED",
                                help="measure the model as `tiblocal quantize --rotate SEED` turns it (seed default 0), "
                                     "for quantize --rotate SEED --imatrix")
    force: bool = option(False, help="overwrite --out if it exists")
    as_json: bool = option(False, flag="--json", help="print the result as JSON")


def imatrix(o: ImatrixOptions) -> Result:
    from tiblocal.fsutil import check_output_path
    from tiblocal.imatrix_file import basis_name, write_imatrix
    from tiblocal.progress import progress

    from .calibration import calibration_texts
    from .imatrix import check_device, compute_imatrix

    if o.chunks < 1 or o.ctx < 2:
        raise TiblocalError(f"--chunks {o.chunks} --ctx {o.ctx}: expected at least 1 window of at least 2 tokens")
    check_device(o.device)
    check_output_path(o.out, force=o.force, inputs=[o.hf_dir, *o.text])
    texts = calibration_texts(o.text, "--text")
    with progress("imatrix", total=o.chunks) as report:
        im, counts = compute_imatrix(o.hf_dir, texts, chunks=o.chunks, ctx=o.ctx, device=o.device, output=o.output,
                                     dtype=o.dtype, rotate=o.rotate, progress=report)
    write_imatrix(o.out, im, counts, o.ctx)
    summary = {"out": str(o.out), "entries": len(im.entries), "chunks": im.chunk_count, "ctx": o.ctx,
               "tokens": max(counts.values()), "datasets": im.datasets, "rotation_seed": o.rotate}
    return Result(summary, f"wrote {o.out}: {len(im.entries)} matrices, {im.chunk_count} chunks of {o.ctx} tokens"
                           + (f", in {basis_name([o.rotate])}" if o.rotate is not None else ""), to="stderr")


@dataclass(frozen=True)
class GptqOptions:
    hf_dir: Path = option(positional=True, help="a merged Hugging Face model folder")
    bits: Literal[4, 8] = option(help="bits a weight: 4 or 8")
    out: Path = option(help="the GPTQ model folder to write")
    group_size: int = option(128, help="columns sharing a scale (default 128; -1: one group a row)")
    calib: list[Path] = option([], metavar="FILE", help=CALIB_HELP)
    samples: int = option(128, parse=positive_int, help="calibration windows (default 128)")
    seq_len: int = option(512, parse=positive_int, help="tokens a window (default 512)")
    desc_act: bool = option(False, help="quantize columns in order of decreasing activation")
    quantize_lm_head: bool = option(False, help="quantize lm_head too (kept unquantized by default)")
    device: str | None = option(None, help="cpu or cuda (default: cuda when torch sees a GPU)")
    force: bool = option(False, help="replace --out if it exists")
    as_json: bool = option(False, flag="--json", help="print the result as JSON")


def gptq(o: GptqOptions) -> Result:
    from tiblocal.progress import status

    from .gptq import gptq_quantize

    with status("GPTQ") as say:
        r = gptq_quantize(o.hf_dir, o.out, bits=o.bits, group_size=o.group_size, calib=o.calib, samples=o.samples,
                          seq_len=o.seq_len, desc_act=o.desc_act, lm_head=o.quantize_lm_head, device=o.device,
                          force=o.force, progress=say)
    summary = {"out": str(r.out), "bits": r.bits, "group_size": r.group_size, "samples": r.samples,
               "seq_len": r.seq_len, "seconds": round(r.seconds, 1), "size_bytes": r.size}
    return Result(summary, f"wrote {r.out} (GPTQ {r.bits}-bit, group {r.group_size}, {r.size / 2**20:.1f} MiB, "
                           f"{r.seconds:.0f} s)", to="stderr")


# --- eval ppl, compare, report -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Measure:
    text: list[Path] = option(help="text files (plain or .xz)")
    ctx: int = option(512, help="window size in tokens (default 512, as llama-perplexity)")
    max_windows: int | None = option(None, parse=positive_int, help="score at most this many windows")
    threads: int | None = option(None, help="CPU threads (default: all available cores)")
    n_gpu_layers: int = option(0, metavar="N", help="layers on the GPU; -1 for all (default 0)")
    as_json: bool = option(False, flag="--json", help="print JSON")


@dataclass(frozen=True, kw_only=True)
class PplOptions(_Measure):
    models: list[Path] = option(positional=True, nargs=1, metavar="MODEL",
                                help="a GGUF, or a Hugging Face or GPTQ folder")
    per_syllable: bool = option(
        False, help="each line a document, every token scored; perplexity per Tibetan syllable (comparable across "
                    "tokenizers); --max-windows then counts lines")


@dataclass(frozen=True, kw_only=True)
class CompareOptions(_Measure):
    models: list[Path] = option(positional=True, nargs=2, metavar="MODEL", help="REF then QUANT")


def _measure(action: str, o: _Measure, per_syllable: bool = False) -> Result:
    from tiblocal.progress import progress
    from tiblocal.vocab import read_lines

    from .evaluate import compare, open_source, perplexity, perplexity_per_syllable, read_text

    if per_syllable:  # each line a document; --max-windows counts lines
        lines = [line for line in read_lines(o.text) if line.strip()][:o.max_windows]
    else:
        body = read_text(o.text)
    sources = [open_source(m, ctx=o.ctx, threads=o.threads, n_gpu_layers=o.n_gpu_layers) for m in o.models]
    try:
        with progress(f"eval {action}") as report:
            if per_syllable:
                result = perplexity_per_syllable(sources[0], lines, o.ctx, progress=report,
                                                 text_name=", ".join(str(t) for t in o.text)).as_dict()
            elif action == "ppl":
                result = perplexity(sources[0], body, o.ctx, max_windows=o.max_windows, progress=report).as_dict()
            else:
                result = compare(sources[0], sources[1], body, o.ctx, max_windows=o.max_windows,
                                 progress=report).as_dict()
    finally:
        for s in sources:
            s.close()

    def show(console) -> None:
        from rich.table import Table

        table = Table(show_header=False, title=f"eval {action}", title_justify="left")
        for k, v in result.items():
            table.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
        console.print(table)

    return Result(result, show)


def eval_ppl(o: PplOptions) -> Result:
    return _measure("ppl", o, per_syllable=o.per_syllable)


def eval_compare(o: CompareOptions) -> Result:
    return _measure("compare", o)


@dataclass(frozen=True, kw_only=True)
class ReportOptions(_Measure):
    models: list[Path] = option(positional=True, metavar="MODEL", help="the f16 GGUF, then its quantizations")
    out: Path | None = option(None, help="also write OUT.json and OUT.md")
    force: bool = option(False, help="overwrite OUT.json and OUT.md if they exist")


def eval_report(o: ReportOptions) -> Result:
    from tiblocal.fsutil import atomic_write_text, check_output_path
    from tiblocal.jsonout import dumps
    from tiblocal.progress import status

    from .evaluate import REPORT_COLUMNS, format_cell, quant_report, read_text, report_markdown

    if len(o.models) < 2:
        raise TiblocalError("eval report needs the reference GGUF and at least one quantization of it")
    ref, quants = o.models[0], o.models[1:]
    if o.out is not None:  # before the measuring, which takes minutes
        for path in (o.out.with_suffix(".json"), o.out.with_suffix(".md")):
            check_output_path(path, force=o.force, inputs=[ref, *quants, *o.text])
    body = read_text(o.text)
    with status("measuring") as say:
        rows = quant_report(ref, quants, body, o.ctx, max_windows=o.max_windows, threads=o.threads,
                            n_gpu_layers=o.n_gpu_layers, progress=lambda m: say(f"measuring {Path(m).name}"))
    title = f"What quantization cost on {', '.join(p.name for p in o.text)} (ctx {o.ctx}, against {ref.name})"
    if o.out is not None:
        with atomic_write_text(o.out.with_suffix(".json"), replace=o.force) as f:
            f.write(dumps({"title": title, "text": [str(t) for t in o.text], "ctx": o.ctx, "rows": rows},
                          indent=2) + "\n")
        with atomic_write_text(o.out.with_suffix(".md"), replace=o.force) as f:
            f.write(report_markdown(rows, title))
        print(f"wrote {o.out.with_suffix('.json')} and {o.out.with_suffix('.md')}", file=sys.stderr)

    def show(console) -> None:
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for _, label, _ in REPORT_COLUMNS:
            table.add_column(label)
        for r in rows:
            table.add_row(*(format_cell(k, f, r) for k, _, f in REPORT_COLUMNS))
        console.print(table)

    return Result(rows, show)


# --- eval mcq, tasks ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Answers:
    model: Path | None = option(None, positional=True,
                                help="a GGUF or a Hugging Face / GPTQ folder (default: the bundled model)")
    data: Path = option(help="the rows as JSON lines (.jsonl or .jsonl.xz)")
    limit: int | None = option(None, parse=positive_int, help="the first N rows only")
    out: Path | None = option(None, help="write one JSON line per row")
    force: bool = option(False, help="overwrite --out if it exists")
    ctx: int | None = option(None, parse=positive_int, help="context in tokens; longer prompts are skipped and counted "
                                                             "(default: the context the model was trained on)")
    template: str | None = option(None, help="chat template (default: the GGUF's own, else alpaca)")
    threads: int | None = option(None, help="CPU threads (default: all available cores)")
    n_gpu_layers: int = option(0, metavar="N", help="layers on the GPU; -1 for all (default 0)")
    as_json: bool = option(False, flag="--json", help="print JSON")


@dataclass(frozen=True, kw_only=True)
class McqOptions(_Answers):
    data: Path = option(help="questions as JSON lines (.jsonl or .jsonl.xz): subject, loc, polished_ti_content, "
                             "answer")
    out: Path | None = option(None, help="write one JSON line per row: index, choice, answer, correct, the options' "
                                         "log-likelihoods, the generated answer")
    fewshot: Path | None = option(None, help="solved examples of each subject, the same format")
    shots: Literal[0, 5] = option(0, help="examples before each question (default 0)")
    max_tokens: int = option(16, parse=positive_int, help="tokens of each generated answer (default 16)")


def _write_records(out: Path | None, records: list[dict], force: bool) -> None:
    from tiblocal.fsutil import atomic_write_text
    from tiblocal.jsonout import dumps

    if out is not None:
        with atomic_write_text(out, replace=force) as f:
            for rec in records:
                f.write(dumps(rec, ensure_ascii=False) + "\n")


def eval_mcq(o: McqOptions) -> Result:
    from tiblocal.fsutil import check_output_path
    from tiblocal.models import resolve_model
    from tiblocal.progress import progress

    from .mcq import chat_template_of, evaluate_mcq, open_mcq_source, read_questions, shot_pool

    if o.shots not in (0, 5):
        raise TiblocalError(f"--shots {o.shots}: TLUE uses 0 or 5")
    questions = read_questions(o.data)[:o.limit] if o.limit else read_questions(o.data)
    examples = read_questions(o.fewshot, "--fewshot") if o.fewshot is not None else []
    if o.shots and not examples:
        raise TiblocalError(f"--shots {o.shots} needs --fewshot FILE (TLUE's 5-shot rows of each subject)")
    shot_pool(questions, examples, o.shots)  # before the model loads
    path = resolve_model(o.model)
    if o.out is not None:
        check_output_path(o.out, force=o.force, inputs=[path, o.data, o.fewshot])
    source = open_mcq_source(path, ctx=o.ctx, threads=o.threads, n_gpu_layers=o.n_gpu_layers)
    try:
        tmpl = chat_template_of(source, o.template)
        with progress("eval mcq", total=len(questions)) as report:
            r = evaluate_mcq(source, tmpl, questions, examples, shots=o.shots, max_tokens=o.max_tokens,
                             progress=report)
    finally:
        source.close()
    _write_records(o.out, r.predictions, o.force)
    result = r.as_dict()

    def show(console) -> None:
        from rich.table import Table

        lo, hi = result["ci95"]
        skipped = [f"{r.skipped_too_long} longer than the context"] if r.skipped_too_long else []
        skipped += [f"{r.skipped_empty} with an empty question"] if r.skipped_empty else []
        title = (f"{path.name} on {Path(o.data).name}, {o.shots}-shot: {r.n} questions"
                 + (f" (skipped: {', '.join(skipped)})" if skipped else ""))
        t = Table(title=title, title_justify="left")
        for col in ("scorer", "accuracy", "95% interval", "response rate", "conditional accuracy"):
            t.add_column(col)
        if r.n:
            t.add_row("log-likelihood", f"{result['accuracy']:.1%}", f"{lo:.1%}–{hi:.1%}", "100%", "")
            for name, g in result["generation"].items():
                cond = "" if g["conditional_accuracy"] is None else f"{g['conditional_accuracy']:.1%}"
                t.add_row(f"generation, TLUE {name.replace('_', ' ')}", f"{g['accuracy']:.1%}", "",
                          f"{g['response_rate']:.1%}", cond)
        console.print(t)
        console.print("chance: 25%; by subject: " + ", ".join(f"{s} {v['accuracy']:.0%} ({v['n']})"
                                                              for s, v in result["by_subject"].items()), markup=False)

    return Result(result, show)


def _task_names() -> tuple[str, ...]:
    from .tasks import TASK_NAMES

    return TASK_NAMES


@dataclass(frozen=True, kw_only=True)
class TasksOptions(_Answers):
    task: str = option(choices=_task_names,
                       help="qa: TibetanQA rows (context, question, answer); tense: verb rows (present, past, future, "
                            "imperative); news: title, article; continue: text, continuation; classify: text, label "
                            "(the corpus tasks' held-out rows: python -m tiblocal.finetune.instructions)")
    data: Path = option(help="the task's rows as JSON lines (.jsonl or .jsonl.xz)")
    out: Path | None = option(None, help="write one JSON line per row: the answer and its scores")
    parallel: int = option(4, parse=positive_int, metavar="N",
                           help="a GGUF answers N rows in each decode, each in a cache of --ctx tokens (default 4; 1: "
                                "one at a time, the least memory)")
    max_tokens: int | None = option(None, parse=positive_int, help="tokens of each generated answer (default qa and "
                                                                   "tense 64, news and continue 128, classify 16)")


def eval_tasks(o: TasksOptions) -> Result:
    from tiblocal.fsutil import check_output_path
    from tiblocal.models import resolve_model
    from tiblocal.progress import progress

    from .mcq import chat_template_of, open_mcq_source
    from .tasks import MAX_TOKENS, TASK_NAMES, _scorers, evaluate_task, read_rows

    if o.task not in TASK_NAMES:
        raise TiblocalError(f"--task {o.task!r}: expected one of {', '.join(TASK_NAMES)}")
    _scorers()  # the libraries first: no reading or loading for nothing
    max_tokens = o.max_tokens or MAX_TOKENS[o.task]
    rows, no_forms = read_rows(o.data, o.task)
    rows = rows[:o.limit] if o.limit else rows
    path = resolve_model(o.model)
    if o.out is not None:
        check_output_path(o.out, force=o.force, inputs=[path, o.data])
    source = open_mcq_source(path, ctx=o.ctx, threads=o.threads, n_gpu_layers=o.n_gpu_layers, parallel=o.parallel)
    try:
        tmpl = chat_template_of(source, o.template)
        with progress(f"eval {o.task}", total=len(rows)) as report:
            done = evaluate_task(source, tmpl, o.task, rows, max_tokens=max_tokens, progress=report)
    finally:
        source.close()
    _write_records(o.out, done["records"], o.force)
    result = done["result"]
    if o.task == "tense":
        result["skipped_no_forms"] = no_forms

    def show(console) -> None:
        from rich.table import Table

        table = Table(title=f"{path.name}: {o.task} on {Path(o.data).name}, {result['n']} rows", title_justify="left",
                      show_header=False)
        for k, v in result.items():
            table.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
        console.print(table)

    return Result(result, show)
