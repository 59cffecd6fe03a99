"""`tiblocal generate`: batch generation over a prompt or a file of prompts, one JSON object each."""

from __future__ import annotations

import codecs
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console

from . import jsonout
from .chat import render_prompt
from .engine import Engine, EngineConfig, Generation, Sampling
from .errors import InputFileError, PromptTooLongError, TiblocalError
from .fsutil import atomic_write_text, check_output_path
from .jsonin import loads
from .models import resolve_model
from .progress import progress
from .templates import ChatTemplate, resolve_chat_template


@dataclass(frozen=True)
class PromptItem:
    index: int
    instruction: str
    system: str | None = None
    source: str = ""  # file:line, for messages


def _decode_line(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(
            f"{where} is not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); save the file as UTF-8"
        ) from None


def check_text(text: str, where: str) -> None:
    """Refuse text that cannot be encoded as UTF-8: bytes that were not UTF-8 on the command line (Python keeps them
    as lone surrogates). A JSON string's unpaired \\ud800-style escape is refused where the JSON is read
    (jsonin.loads)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        raw = bad.encode("utf-8", "surrogateescape") if "\udc80" <= bad <= "\udcff" else None
        what = f"the byte {raw[0]:#04x}, which is not UTF-8" if raw else f"an unpaired surrogate (U+{ord(bad):04X})"
        raise InputFileError(f"{where} holds {what} at character {e.start}; give the text in UTF-8") from None


def read_prompts(path: Path) -> list[PromptItem]:
    """Prompts from a .txt file (one a line) or a .jsonl file (instruction[/input] or prompt); '-' is stdin."""
    if str(path) == "-":
        data = sys.stdin.buffer.read()
        name, is_jsonl = "<stdin>", None
    else:
        if not path.is_file():
            raise InputFileError(f"{path}: no such prompts file; give a .txt (one prompt a line) or .jsonl file")
        data = path.read_bytes()
        name, is_jsonl = str(path), path.suffix.lower() in (".jsonl", ".json")
    raw_lines = data.removeprefix(codecs.BOM_UTF8).splitlines()  # Notepad's byte-order mark is no prompt text
    items: list[PromptItem] = []
    for n, raw in enumerate(raw_lines, 1):
        where = f"{name} line {n}"
        line = _decode_line(raw, where).strip()
        if not line:
            continue
        jsonl = is_jsonl if is_jsonl is not None else line.startswith("{")
        if not jsonl:
            items.append(PromptItem(len(items), line, None, where))
            continue
        try:
            obj = loads(line)
        except json.JSONDecodeError as e:
            raise InputFileError(f"{where} is not valid JSON ({e.msg}); expected {{\"instruction\": ...}}") from None
        if not isinstance(obj, dict):
            raise InputFileError(f"{where}: expected a JSON object with \"instruction\" or \"prompt\", got {type(obj).__name__}")
        text = obj.get("instruction", obj.get("prompt"))
        if not isinstance(text, str) or not text.strip():
            raise InputFileError(f"{where}: expected a non-empty \"instruction\" or \"prompt\" string")
        extra = obj.get("input")
        if isinstance(extra, str) and extra.strip():
            text = f"{text}\n{extra}"  # Chinese-Alpaca joins instruction and input with a newline
        system = obj.get("system") if isinstance(obj.get("system"), str) else None
        items.append(PromptItem(len(items), text, system, where))
    if not items:
        raise InputFileError(f"{name} holds no prompts")
    return items


def generate_one(
    engine: Engine, template: ChatTemplate, item: PromptItem, sampling: Sampling, system: str | None
) -> dict[str, Any]:
    sys_text = item.system or system
    messages = ([{"role": "system", "content": sys_text}] if sys_text else []) + [
        {"role": "user", "content": item.instruction}
    ]
    result = Generation()
    record: dict[str, Any] = {"index": item.index, "prompt": item.instruction}
    tokens = render_prompt(engine, template, messages)
    try:
        for _ in engine.stream(tokens, sampling, template.stop, result):
            pass
    except PromptTooLongError as e:
        record.update(error=str(e), prompt_tokens=len(tokens))
        return record
    record.update(
        text=result.text,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        prompt_ms=round(result.prompt_ms, 2),
        first_token_ms=round(result.first_token_ms, 2),
        gen_ms=round(result.gen_ms, 2),
        tokens_per_s=round(result.tokens_per_s, 2),
        stop_reason=result.stop_reason,
    )
    return record


def run_generate(
    model: Path | None,
    *,
    prompt: str | None,
    file: Path | None,
    out: Path | None,
    template: str | None,
    system: str | None,
    as_json: bool,
    force: bool,
    engine_config: EngineConfig,
    sampling: dict,
) -> int:
    """``sampling``: the settings given on the command line, over the model's suggested ones."""
    if (prompt is None) == (file is None):
        raise TiblocalError("give exactly one of --prompt TEXT or --file PROMPTS")
    for option, value in (("--prompt", prompt), ("--system", system)):
        if value is not None:
            check_text(value, option)
    items = [PromptItem(0, prompt, None, "--prompt")] if prompt is not None else read_prompts(Path(file))
    if out is not None:
        check_output_path(out, force=force, inputs=[model, file])
    err = Console(stderr=True, highlight=False)
    with Engine(resolve_model(model), engine_config) as engine:
        tmpl, notice = resolve_chat_template(engine.chat_template, template)
        if notice:
            err.print(f"note: {notice}")
        settings = Sampling.for_metadata(engine.info.metadata, **sampling)
        records = _run_all(engine, tmpl, items, settings, system, show_progress=file is not None)
    failed = [r for r in records if "error" in r]

    if out is not None:
        with atomic_write_text(out, replace=force) as f:
            _write_jsonl(f, records)
        err.print(f"wrote {len(records)} results to {out}")
    elif prompt is not None and not as_json:
        if failed:
            raise PromptTooLongError(failed[0]["error"])
        sys.stdout.write(records[0]["text"] + "\n")
    else:
        _write_jsonl(sys.stdout, records)
        jsonout.mark_printed()
    for r in failed:
        err.print(f"[yellow]prompt {r['index']} ({items[r['index']].source}) skipped:[/] {r['error']}")
    return 1 if failed else 0


def _run_all(engine, tmpl, items, sampling, system, *, show_progress: bool) -> list[dict[str, Any]]:
    if not show_progress:
        return [generate_one(engine, tmpl, it, sampling, system) for it in items]
    records = []
    with progress("generating", total=len(items)) as report:
        for it in items:
            records.append(generate_one(engine, tmpl, it, sampling, system))
            report(len(records))
    return records


def _write_jsonl(f: TextIO, records: list[dict[str, Any]]) -> None:
    for r in records:
        f.write(jsonout.dumps(r, ensure_ascii=False) + "\n")
    f.flush()

