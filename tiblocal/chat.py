"""`tiblocal chat`: a terminal chat on a GGUF model, streamed, UTF-8 safe.

``ChatSession`` holds the conversation and the settings and knows nothing of the terminal (tests
drive it directly); ``run_chat`` is the rich terminal around it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .engine import Engine, EngineConfig, Generation, Sampling
from .errors import TiblocalError
from .jsonlines import json_rows
from .fsutil import atomic_write_text, check_output_path
from .models import resolve_model
from .templates import TASKS, TEMPLATES, ChatTemplate, get_task, get_template, resolve_chat_template
from .text import count_syllables

SAVE_HEADER = "tiblocal_chat"  # the key of /save's first line (the model, template and sampling), format version 1

HELP = """\
/help               this help
/reset              forget the conversation
/system TEXT        set the system prompt (empty: the template's default)
/template NAME      switch chat template: {templates}
/set NAME VALUE     change a sampling setting: temp, top_k, top_p, repeat, repeat_last_n, max_tokens, seed
/set                show the settings
/task NAME          wrap your next message in a Tibetan-Alpaca task prompt: {tasks}
/save FILE          write the conversation as JSON lines: a first line with the model, template and sampling, then
                    one message a line ({{"role": ..., "content": ...}})
/load FILE          continue a conversation /save wrote (its template, system prompt and sampling too), or plain
                    message lines
/exit               leave (or Ctrl-D); Ctrl-C stops an answer
"""


def render_prompt(engine: Engine, template: ChatTemplate, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of a conversation ready for the answer: the template rendered (in its sandbox) and tokenized by
    llama.cpp, which adds the first BOS. The chat, ``generate`` and the server all build prompts here."""
    text = template.render(messages, bos_token=engine.bos_text, eos_token=engine.eos_text)
    return engine.tokenize(text)


@dataclass
class Turn:
    user: str
    assistant: str = ""
    stats: Generation | None = None


@dataclass
class ChatSession:
    engine: Engine
    template: ChatTemplate
    sampling: Sampling = field(default_factory=Sampling)
    system: str | None = None
    turns: list[Turn] = field(default_factory=list)
    task: str | None = None  # applies to the next message only

    def messages(self, turns: list[Turn] | None = None) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for t in self.turns if turns is None else turns:
            msgs.append({"role": "user", "content": t.user})
            if t.assistant:
                msgs.append({"role": "assistant", "content": t.assistant})
        return msgs

    def _tokens_for(self, turns: list[Turn]) -> list[int]:
        return render_prompt(self.engine, self.template, self.messages(turns))

    def reserve(self) -> int:
        """Tokens kept free for the answer when the history is trimmed."""
        return min(self.sampling.max_tokens, self.engine.n_ctx // 4)

    def prompt_tokens(self) -> tuple[list[int], int]:
        """Tokens of the conversation, dropping the oldest turns until it fits; returns (tokens, dropped)."""
        budget = self.engine.n_ctx - self.reserve()
        dropped = 0
        tokens = self._tokens_for(self.turns)
        while len(tokens) > budget and len(self.turns) - dropped > 1:
            dropped += 1
            tokens = self._tokens_for(self.turns[dropped:])
        if len(tokens) >= self.engine.n_ctx:
            self.turns.pop()
            self.engine.check_fits(len(tokens))
        if dropped:
            del self.turns[:dropped]
        return tokens, dropped

    def ask(self, text: str) -> tuple[Iterator[str], Generation, int]:
        """Add a user message; return the answer's text stream, its stats and how many old turns were dropped."""
        if self.task:
            text = get_task(self.task).wrap(text)
            self.task = None
        turn = Turn(text)
        self.turns.append(turn)
        tokens, dropped = self.prompt_tokens()
        result = Generation()
        turn.stats = result

        def stream() -> Iterator[str]:
            try:
                yield from self.engine.stream(tokens, self.sampling, self.template.stop, result)
            finally:
                turn.assistant = result.text

        return stream(), result, dropped

    def reset(self) -> None:
        self.turns.clear()
        self.engine.reset()

    def save(self, path: Path) -> int:
        path = Path(path).expanduser()
        if path.exists() or path.is_symlink():
            raise TiblocalError(f"{path} already exists; /save to a new file name")
        check_output_path(path, inputs=[self.engine.path], option="/save")
        header = {SAVE_HEADER: 1, "model": self.engine.path.name, "template": self.template.name,
                  "sampling": asdict(self.sampling)}
        lines = [json.dumps(m, ensure_ascii=False) for m in self.messages()]
        with atomic_write_text(path, replace=False) as f:
            f.write("\n".join([json.dumps(header, ensure_ascii=False), *lines]) + "\n")
        return len(lines)

    def load(self, path: Path) -> str:
        """Replace the conversation (and the template and sampling a /save recorded) with a saved one; the file is
        read and checked whole before anything changes."""
        path = Path(path).expanduser()
        header, messages = None, []
        for where, row in json_rows(path, "/load", "a conversation /save wrote"):
            if SAVE_HEADER in row and not messages and header is None:
                header = row
                continue
            if row.get("role") not in ("system", "user", "assistant") or not isinstance(row.get("content"), str):
                raise TiblocalError(f"{where}: expected a message {{\"role\": \"system\", \"user\" or \"assistant\", "
                                    "\"content\": TEXT}")
            messages.append((where, row["role"], row["content"]))
        system, turns = None, []
        for i, (where, role, content) in enumerate(messages):
            if role == "system" and i == 0:
                system = content or None
            elif role == "user" and (not turns or turns[-1].assistant):
                turns.append(Turn(content))
            elif role == "assistant" and turns and not turns[-1].assistant and content:
                turns[-1].assistant = content
            else:
                raise TiblocalError(f"{where}: a {role} message out of turn; a conversation is an optional "
                                    "system message, then a user message and its answer, in turns")
        if turns and not turns[-1].assistant:
            raise TiblocalError(f"{path}: the last user message has no answer; remove it and ask it again after /load")
        template, sampling, notes = self.template, self.sampling, []
        if header is not None:
            if "template" in header:
                template = get_template(str(header["template"]))
            if "sampling" in header and not isinstance(header["sampling"], dict):
                raise TiblocalError(f"{path}: \"sampling\" is {type(header['sampling']).__name__}; expected an object "
                                    "of settings, as /save writes it")
            if isinstance(header.get("sampling"), dict):
                known = {f.name for f in fields(Sampling)}
                if extra := sorted(set(header["sampling"]) - known):
                    raise TiblocalError(f"{path}: unknown sampling settings {', '.join(extra)}; known: {', '.join(sorted(known))}")
                sampling = Sampling(**header["sampling"])
            if header.get("model") not in (None, self.engine.path.name):
                notes.append(f"saved with {header['model']}, continued with {self.engine.path.name}")
        self.system, self.turns, self.template, self.sampling, self.task = system, turns, template, sampling, None
        self.engine.reset()
        return f"loaded {len(turns)} turns from {path}" + "".join(f"; {x}" for x in notes)

    def command(self, line: str) -> str | None:
        """Run a /command; returns text to show, or None for /exit."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        name = name.lower()
        if name in ("exit", "quit", "q"):
            return None
        if name == "help":
            return HELP.format(templates=", ".join(TEMPLATES), tasks=", ".join(TASKS))
        if name == "reset":
            self.reset()
            return "conversation cleared"
        if name == "system":
            self.system = arg or None
            return f"system prompt set to: {arg}" if arg else "system prompt back to the template's default"
        if name == "template":
            if not arg:
                return f"template: {self.template.name}; built-in: {', '.join(TEMPLATES)}"
            self.template = get_template(arg)
            return f"template: {self.template.name} ({self.template.description})"
        if name == "set":
            if not arg:
                s = self.sampling
                return (
                    f"temp {s.temperature}, top_k {s.top_k}, top_p {s.top_p}, repeat {s.repeat_penalty}, "
                    f"repeat_last_n {s.repeat_last_n}, max_tokens {s.max_tokens}, seed {s.seed}"
                )
            key, _, value = arg.partition(" ")
            if not value.strip():
                raise TiblocalError(f"/set {key} needs a value, e.g. /set temp 0.3")
            self.sampling = self.sampling.with_value(key, value.strip())
            return f"{key} = {value.strip()}"
        if name == "task":
            if not arg:
                return "tasks: " + ", ".join(f"{t.name} ({t.description})" for t in TASKS.values())
            if arg == "off":
                self.task = None
                return "task cleared"
            self.task = get_task(arg).name
            return f"your next message is wrapped in the {self.task!r} task prompt"
        if name == "load":
            if not arg:
                raise TiblocalError("/load needs a file name, e.g. /load chat.jsonl")
            return self.load(Path(arg))
        if name == "save":
            if not arg:
                raise TiblocalError("/save needs a file name, e.g. /save chat.jsonl")
            n = self.save(Path(arg).expanduser())
            return f"saved {n} messages to {arg}"
        raise TiblocalError(f"unknown command /{name}; /help lists the commands")


def status_line(result: Generation) -> str:
    secs = result.gen_ms / 1000
    syl = count_syllables(result.text)
    syl_s = syl / secs if secs > 0 else 0.0
    reason = {"length": "max tokens reached", "context": "context full", "interrupted": "stopped"}.get(result.stop_reason)
    parts = [
        f"{result.completion_tokens} tokens",
        f"{result.tokens_per_s:.1f} tokens/s",
        f"{syl_s:.1f} syllables/s",
        f"first token {result.first_token_ms / 1000:.2f} s",
    ]
    if reason:
        parts.append(reason)
    return " · ".join(parts)


def _invalid_utf8(text: str) -> bytes | None:
    """The undecodable bytes of a line read with surrogateescape, or None when it was valid UTF-8."""
    bad = bytes(ord(c) - 0xDC00 for c in text if "\udc80" <= c <= "\udcff")
    return bad or None


def run_chat(
    model: Path | None,
    *,
    template: str | None,
    system: str | None,
    engine_config: EngineConfig,
    sampling: dict,
    console: Console | None = None,
) -> int:
    """``sampling``: the settings given on the command line, over the model's suggested ones."""
    console = console or Console(highlight=False)
    path = resolve_model(model)
    with console.status(f"loading {path.name}"):
        engine = Engine(path, engine_config)
    try:
        return _chat_loop(engine, path, template, system, Sampling.for_metadata(engine.info.metadata, **sampling), console)
    finally:
        engine.close()


def _chat_loop(
    engine: Engine, path: Path, template: str | None, system: str | None, sampling: Sampling, console: Console
) -> int:
    tmpl, notice = resolve_chat_template(engine.chat_template, template)
    session = ChatSession(engine, tmpl, sampling, system)

    info = Table.grid(padding=(0, 2))
    info.add_row("model", f"{path.name} ({engine.info.architecture}, {engine.info.n_params / 1e6:.1f}M parameters)")
    info.add_row("template", f"{tmpl.name}  ·  context {engine.n_ctx}  ·  threads {engine.threads}")
    console.print(info)
    if notice:
        console.print(f"[yellow]note:[/] {notice}")
    console.print("[dim]/help for commands, Ctrl-C stops an answer, Ctrl-D or /exit leaves[/]")

    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # pragma: no cover - not on every platform
        pass

    while True:
        try:
            line = console.input("[bold green]>>> [/]")
        except EOFError:
            console.print()
            break
        except KeyboardInterrupt:
            console.print("\n[dim](Ctrl-D or /exit to leave)[/]")
            continue
        bad = _invalid_utf8(line)
        if bad is not None:
            console.print(
                f"[yellow]note:[/] that line is not valid UTF-8 (bytes {bad[:8].hex(' ')}); it was not sent. "
                "Set your terminal to UTF-8."
            )
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            try:
                out = session.command(line.strip())
            except TiblocalError as e:
                console.print(f"[red]{e}[/]", markup=True, highlight=False)
                continue
            if out is None:
                break
            console.print(f"[dim]{_escape(out)}[/]")
            continue
        try:
            stream, result, dropped = session.ask(line)
        except TiblocalError as e:
            console.print(f"[yellow]note:[/] {_escape(str(e))}; the message was not sent")
            continue
        if dropped:
            console.print(f"[dim](dropped the {dropped} oldest turn(s) to fit the context of {engine.n_ctx} tokens)[/]")
        try:
            for chunk in stream:
                console.print(chunk, end="", style="cyan", markup=False, highlight=False, soft_wrap=True)
        except KeyboardInterrupt:
            stream.close()
            console.print(" [dim]\\[stopped][/]", end="")
        console.print()
        console.print(f"[dim]{status_line(result)}[/]")
    return 0


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
