"""Progress of a long job on stderr, one way for every verb.

On a terminal: rich's bar (or spinner), gone when the job ends. Written to a pipe or a log (CI, nohup, a device
script) a bar draws nothing, so there a plain line is written instead, ``label: 40/100 (40%), 12 s``, once the job has
run ``PERIOD`` seconds and then at most once every ``PERIOD`` seconds: short jobs (and the quick failures of bad
input, whose one error line stays alone) print none. ``TIBLOCAL_PROGRESS_SECONDS`` sets the period (0: every
update).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

from .fsutil import human_size

PERIOD_ENV = "TIBLOCAL_PROGRESS_SECONDS"
PERIOD = 30.0


def _period() -> float:
    text = os.environ.get(PERIOD_ENV)
    if text is None:
        return PERIOD
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # NaN too
        from .errors import TiblocalError

        raise TiblocalError(f"{PERIOD_ENV}={text!r}: expected the seconds between progress lines off a terminal, a "
                            f"number of at least 0 (0: every update); set it so, or unset it for {PERIOD:.0f}")
    return value


def _on_terminal() -> bool:
    return sys.stderr.isatty()


class _Lines:
    """The off-terminal reporter: a line when the period has passed since the start and since the last line."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.period = _period()
        self.start = self.last = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.period:
            return False
        self.last = now
        return True

    def write(self, text: str) -> None:
        print(f"{self.label}: {text}, {time.monotonic() - self.start:.0f} s", file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress(label: str, *, total: int | None = None, unit: str = "") -> Iterator[Callable[..., None]]:
    """Yields ``report(done, total=None, **fields)``; ``unit="bytes"`` shows sizes. ``fields`` (e.g. ``loss="loss
    2.31"``) are shown after the label."""
    lines = _Lines(label)  # the period is checked on a terminal too: a bad value is named wherever it is set
    if not _on_terminal():
        last_total = [total]

        def report(done: int, total: int | None = None, **fields) -> None:
            last_total[0] = total if total is not None else last_total[0]
            if not lines.due():
                return
            t = last_total[0]
            shown = (f"{human_size(done)}/{human_size(t)}" if unit == "bytes" else f"{done}/{t}") if t else (
                human_size(done) if unit == "bytes" else str(done))
            shown += f" ({done / t:.0%})" if t else ""
            lines.write(" ".join([*map(str, fields.values()), shown]))

        yield report
        return

    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    columns = ((TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
               if unit == "bytes" else
               (TextColumn(label + " {task.fields[extra]}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()))
    with Progress(*columns, console=Console(stderr=True, highlight=False), transient=True) as bar:
        task = bar.add_task(label, total=total, extra="")

        def report(done: int, total: int | None = None, **fields) -> None:
            more = {"total": total} if total is not None else {}
            bar.update(task, completed=done, extra=" ".join(map(str, fields.values())), **more)

        yield report


@contextlib.contextmanager
def stages(label: str) -> Iterator[Callable[[str, int, int], None]]:
    """Several counted stages one after another (``report(stage, done, total)``), each its own bar on a terminal."""
    lines = _Lines(label)
    if not _on_terminal():

        def report(stage: str, done: int, total: int) -> None:
            if lines.due():
                lines.write(f"{stage} {done}/{total}" + (f" ({done / total:.0%})" if total else ""))

        yield report
        return

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True, highlight=False), transient=True) as bar:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield report


@contextlib.contextmanager
def status(label: str) -> Iterator[Callable[[str], None]]:
    """A job told in messages (``say("quantizing Q4_K_M")``): a spinner on a terminal, else the current message as a
    line, within the same period as the bars."""
    lines = _Lines(label)
    if not _on_terminal():

        def say(message: str) -> None:
            if lines.due():
                lines.write(message)

        yield say
        return

    from rich.console import Console

    with Console(stderr=True, highlight=False).status(label) as spinner:
        yield lambda message: spinner.update(message)
