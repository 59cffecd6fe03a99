"""`tiblocal quantize`: the command around ``quantize_gguf``, with a live display per type."""

from __future__ import annotations

import time
from pathlib import Path

from .gguf_quant import parse_types, quantize_gguf
from tiblocal.jsonout import print_json


class _Display:
    """A spinner per type on stderr. rich is imported on the first type, while llama.cpp is already working."""

    def __init__(self) -> None:
        self.progress = None
        self.tasks: list = []

    def started(self, qtype: str, path: Path) -> None:
        self.stage(f"quantizing to {qtype} -> {path.name}")

    def stage(self, description: str) -> None:
        if self.progress is None:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
            self.progress = Progress(*columns, console=_stderr(), transient=True)
            self.progress.start()
        if self.tasks:
            self.progress.update(self.tasks[-1], completed=1, total=1)
        self.tasks.append(self.progress.add_task(description, total=None))

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def run_quantize(
    inp: Path, out: Path, *, types: str, threads: int | None, output_tensor_type: str | None,
    token_embedding_type: str | None, imatrix: Path | None, allow_requantize: bool, force: bool, verbose: bool,
    as_json: bool, rotate: int | None = None, rotate_trials: int | None = None, calib: list[Path] | None = None,
    calib_windows: int | None = None, n_gpu_layers: int | None = None,
) -> int:
    """``rotate_trials``, ``calib``, ``calib_windows``, ``n_gpu_layers``: None or empty when not given (they belong to
    ``rotate``; quantize_rotated has their defaults)."""
    given = {k: v for k, v in (("trials", rotate_trials), ("calib", calib or None), ("calib_windows", calib_windows),
                               ("n_gpu_layers", n_gpu_layers)) if v is not None}
    if rotate is None and given:
        from tiblocal.errors import TiblocalError

        raise TiblocalError("--rotate-trials, --calib, --calib-windows and --n-gpu-layers belong to --rotate; add "
                            "--rotate or leave them out")
    names = parse_types(types)
    display = _Display()
    options = dict(output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type,
                   allow_requantize=allow_requantize, verbose=verbose, imatrix=imatrix)
    seeds: dict[str, int] = {}
    trials = []
    t0 = time.perf_counter()
    try:
        if rotate is None:
            results = quantize_gguf(inp, out, names, threads=threads, force=force, on_start=display.started, **options)
        else:
            from .rotated_quant import quantize_rotated

            results, seeds, trials = quantize_rotated(
                inp, out, names, seed=rotate, threads=threads, force=force, on_stage=display.stage, **given, **options,
            )
    finally:
        display.stop()
    seconds = time.perf_counter() - t0
    rows = []
    for r in results:
        row = {"type": r.type, "path": str(r.path), "size_bytes": r.size, "seconds": round(r.seconds, 2)}
        if rotate is not None:
            row["rotation_seed"] = seeds[r.type]
            row["seconds_in_all"] = round(seconds, 2)  # the rotations and trials too, for every type together
            row["trials"] = [{"seed": t.seed, "calib_ppl": t.calib_ppl} for t in trials if t.type == r.type]
        rows.append(row)
    if as_json:
        print_json(rows)
        return 0
    err = _stderr()
    for r, row in zip(results, rows):
        if rotate is None:
            err.print(f"wrote {r.path} ({r.type}, {r.size / 2**20:.1f} MiB, {r.seconds:.1f} s)")
            continue
        scored = [t for t in row["trials"] if t["calib_ppl"] is not None]
        how = ("; calibration perplexity " + ", ".join(f"seed {t['seed']} {t['calib_ppl']:.5g}" for t in scored)) if scored else ""
        err.print(f"wrote {r.path} ({r.type}, {r.size / 2**20:.1f} MiB, rotation seed {row['rotation_seed']}{how})")
    if rotate is not None:
        err.print(f"{seconds:.1f} s in all")
    return 0


def run_eval(
    action: str, models: list[Path], *, text: list[Path], ctx: int, max_windows: int | None, threads: int | None,
    n_gpu_layers: int, as_json: bool, per_syllable: bool = False,
) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from tiblocal.vocab import read_lines

    from .evaluate import compare, open_source, perplexity, perplexity_per_syllable, read_text

    err = Console(stderr=True, highlight=False)
    if per_syllable:  # each line a document; --max-windows counts lines
        lines = [line for line in read_lines(text) if line.strip()][:max_windows]
    else:
        body = read_text(text)
    sources = [open_source(m, ctx=ctx, threads=threads, n_gpu_layers=n_gpu_layers) for m in models]
    columns = (TextColumn(f"eval {action}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(action, total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        if per_syllable:
            result = perplexity_per_syllable(sources[0], lines, ctx, progress=report,
                                             text_name=", ".join(str(t) for t in text)).as_dict()
        elif action == "ppl":
            result = perplexity(sources[0], body, ctx, max_windows=max_windows, progress=report).as_dict()
        else:
            result = compare(sources[0], sources[1], body, ctx, max_windows=max_windows, progress=report).as_dict()
    for s in sources:
        s.close()
    if as_json:
        print_json(result)
        return 0
    table = Table(show_header=False, title=f"eval {action}", title_justify="left")
    for k, v in result.items():
        table.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    Console(highlight=False).print(table)
    return 0


def run_report(
    ref: Path, quants: list[Path], *, text: list[Path], ctx: int, max_windows: int | None, threads: int | None,
    n_gpu_layers: int, out: Path | None, as_json: bool, force: bool = False,
) -> int:
    from rich.console import Console
    from rich.table import Table

    from tiblocal.fsutil import atomic_write_text, check_output_path
    from tiblocal.jsonout import dumps

    from .evaluate import REPORT_COLUMNS, format_cell, quant_report, read_text, report_markdown

    err = Console(stderr=True, highlight=False)
    if out is not None:  # before the measuring, which takes minutes
        for path in (out.with_suffix(".json"), out.with_suffix(".md")):
            check_output_path(path, force=force, inputs=[ref, *quants, *text])
    body = read_text(text)
    with err.status("measuring") as status:
        rows = quant_report(ref, quants, body, ctx, max_windows=max_windows, threads=threads, n_gpu_layers=n_gpu_layers,
                            progress=lambda m: status.update(f"measuring {Path(m).name}"))
    title = f"What quantization cost on {', '.join(p.name for p in text)} (ctx {ctx}, against {ref.name})"
    if out is not None:
        with atomic_write_text(out.with_suffix(".json"), replace=force) as f:
            f.write(dumps({"title": title, "text": [str(t) for t in text], "ctx": ctx, "rows": rows}, indent=2) + "\n")
        with atomic_write_text(out.with_suffix(".md"), replace=force) as f:
            f.write(report_markdown(rows, title))
        err.print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    if as_json:
        print_json(rows)
        return 0
    table = Table(title=title, title_justify="left")
    for _, label, _ in REPORT_COLUMNS:
        table.add_column(label)
    for r in rows:
        table.add_row(*(format_cell(k, f, r) for k, _, f in REPORT_COLUMNS))
    Console(highlight=False).print(table)
    return 0
