"""`tiblocal pretrain` / `tiblocal sft`: a recipe with overrides, a progress bar, a summary."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .config import load_config
from .train import train
from tiblocal.jsonout import print_json, stdout_to_stderr


def run_train(stage: str, config: str, overrides: list[str], *, as_json: bool) -> int:
    cfg = load_config(config, overrides, stage=stage)
    err = Console(stderr=True, highlight=False)
    main = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch, one process reports
    columns = (TextColumn(f"{stage} {{task.fields[loss]}}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=not main) as progress:
        task = progress.add_task(stage, total=cfg.max_steps, loss="")

        def report(done: int, total: int, loss: float) -> None:
            progress.update(task, completed=done, loss=f"loss {loss:.4f}")

        # stdout is the command's own (--json); libraries that print there (gptqmodel's banner, imported by peft
        # when it is installed) go to stderr
        with stdout_to_stderr():
            r = train(cfg, progress=report)
    summary = {"output_dir": str(r.output_dir), "steps": r.steps, "resumed_from": r.resumed_from,
               "train_loss": r.train_loss, "eval_loss": r.eval_loss}
    if not main:
        return 0
    if as_json:
        print_json(summary)
    else:
        ev = f", eval loss {r.eval_loss:.4f}" if r.eval_loss is not None else ""
        resumed = f" (resumed at step {r.resumed_from})" if r.resumed_from else ""
        err.print(f"{stage}: {r.steps} steps{resumed}, train loss {r.train_loss:.4f}{ev}; wrote {Path(r.output_dir)}")
    return 0
