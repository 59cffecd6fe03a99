"""`tiblocal vocab extend`: the command around ``extend_vocabulary``, with progress and a summary table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .vocab_extend import ExtendConfig, extend_vocabulary
from tiblocal.jsonout import print_json


def parse_weights(weights: list[str]) -> tuple[tuple[str, float], ...]:
    """``--weight NAME=FACTOR`` options as (file stem, factor) pairs."""
    from tiblocal.errors import TiblocalError

    pairs = []
    for w in weights:
        name, _, factor = w.partition("=")
        try:
            pairs.append((name, float(factor)))
        except ValueError:
            raise TiblocalError(f"--weight {w!r}: expected NAME=FACTOR, e.g. derge_kangyur=0.3") from None
    return tuple(pairs)


def run_extend(
    base: Path, corpus: list[Path], out: Path, *, add: int, model_type: str, sample_chars: int,
    weights: list[str], eval_files: list[Path] | None, force: bool, as_json: bool, curve: str | None = None,
    split_by_whitespace: bool = True,
) -> int:
    from tiblocal.errors import TiblocalError

    pairs = parse_weights(weights)
    try:
        sizes = tuple(int(x) for x in curve.split(",")) if curve else ()
    except ValueError:
        raise TiblocalError(f"--curve {curve!r}: expected sizes like 8000,16000,24000") from None
    cfg = ExtendConfig(add=add, model_type=model_type, sample_chars=sample_chars, weights=pairs, curve=sizes,
                       split_by_whitespace=split_by_whitespace)
    err = Console(stderr=True, highlight=False)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                label = {"counting": "counting the corpus", "sampling": "sampling", "training": "training SentencePiece"}
                tasks[stage] = progress.add_task(label.get(stage, stage), total=total)
            progress.update(tasks[stage], completed=done, total=total)

        r = extend_vocabulary(base, corpus, out, cfg, eval_files=eval_files, force=force, progress=report)
    if as_json:
        print_json(r.report, ensure_ascii=False)
        return 0
    ev = r.report["eval"]
    table = Table(title=f"{out}: {r.base_pieces} + {r.added} pieces", title_justify="left")
    for col in ("", "tokens/syllable", "chars/token", "byte fallback"):
        table.add_column(col)
    for name in ("base", "extended"):
        s = ev[name]
        table.add_row(name, f"{s['tokens_per_syllable']:.3f}", f"{s['chars_per_token']:.2f}", f"{s['byte_fallback_share']:.1%}")
    for point in r.report.get("curve", []):
        table.add_row(f"+{point['added']}", f"{point['tokens_per_syllable']:.3f}", f"{point['chars_per_token']:.2f}",
                      f"{point['byte_fallback_share']:.1%}")
    Console(highlight=False).print(table)
    return 0
