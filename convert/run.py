"""`tiblocal convert`: the command around ``hf_to_gguf``, with a progress bar."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from .hf_to_gguf import hf_to_gguf
from tiblocal.jsonout import print_json


@contextlib.contextmanager
def byte_progress(console: Console, label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar in bytes; yields the ``progress(done, total)`` callback the stages call."""
    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def finish(console: Console, summary: dict, message: str, as_json: bool) -> int:
    """The verb's result: JSON on stdout with --json, else one line for the person on stderr."""
    if as_json:
        print_json(summary)
    else:
        console.print(message)
    return 0


def run_convert(
    model_dir: Path, out: Path, *, outtype: str, vocab_only: bool, template: str | None, force: bool, as_json: bool
) -> int:
    err = Console(stderr=True, highlight=False)
    with byte_progress(err, f"writing {out.name}") as report:
        result = hf_to_gguf(
            model_dir, out, outtype=outtype, vocab_only=vocab_only, template=template, force=force, progress=report
        )
    summary = {
        "path": str(result.path),
        "outtype": result.outtype,
        "n_tensors": result.n_tensors,
        "n_vocab": result.n_vocab,
        "size_bytes": result.size,
    }
    return finish(err, summary, f"wrote {result.path} ({result.outtype}, {result.n_tensors} tensors, "
                  f"{result.n_vocab} tokens, {result.size / 2**20:.1f} MiB)", as_json)


def run_merge(base: Path, adapters: list[Path], out: Path, *, dtype: str, force: bool, as_json: bool) -> int:
    from .merge import merge_lora

    err = Console(stderr=True, highlight=False)
    with byte_progress(err, f"merging into {out.name}") as report:
        r = merge_lora(base, adapters, out, dtype=dtype, force=force, progress=report)
    summary = {
        "path": str(r.out), "dtype": dtype, "n_tensors": r.n_tensors, "n_vocab": r.n_vocab,
        "lora_merged": r.merged_lora, "replaced": r.replaced, "bytes": r.bytes_written,
    }
    return finish(err, summary, f"wrote {r.out} ({dtype}, {r.n_tensors} tensors, vocabulary {r.n_vocab}; "
                  f"{r.merged_lora} LoRA updates merged, {r.replaced} tensors replaced)", as_json)
