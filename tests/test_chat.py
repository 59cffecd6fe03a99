"""The chat: session logic (history trimming, commands, transcript) and a real exchange in a pseudo-terminal."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pexpect
import pytest

from tiblocal.chat import ChatSession, status_line
from tiblocal.engine import Engine, EngineConfig, Generation, Sampling
from tiblocal.errors import PromptTooLongError, TiblocalError
from tiblocal.templates import get_template


@pytest.fixture
def session(tiny_gguf):
    engine = Engine(tiny_gguf, EngineConfig(ctx=256, threads=1))
    yield ChatSession(engine, get_template("alpaca"), Sampling(temperature=0, max_tokens=8))
    engine.close()


def _answer(session: ChatSession, text: str):
    stream, result, dropped = session.ask(text)
    return "".join(stream), result, dropped


def test_turns_accumulate_and_reuse_the_cache(session) -> None:
    a1, r1, _ = _answer(session, "བཀྲ་ཤིས་བདེ་ལེགས།")
    a2, r2, _ = _answer(session, "ཁྱེད་རང་ག་འདྲ་ཡོད།")
    assert [t.assistant for t in session.turns] == [a1, a2]
    assert r2.reused_tokens >= r1.prompt_tokens - 1  # the first turn is not evaluated again
    msgs = session.messages()
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]


def test_oldest_turns_are_dropped_to_fit_the_context(session) -> None:
    for _ in range(6):
        _, _, dropped = _answer(session, "བཀྲ་ཤིས་བདེ་ལེགས། " * 6)
    assert dropped >= 1
    tokens, _ = session.prompt_tokens()
    assert len(tokens) <= session.engine.n_ctx - session.reserve()


def test_a_message_longer_than_the_context_is_refused_and_not_kept(session) -> None:
    _answer(session, "short")
    with pytest.raises(PromptTooLongError):
        session.ask("བཀྲ་ཤིས་བདེ་ལེགས། " * 200)
    assert [t.user for t in session.turns] == ["short"]


def test_interrupting_an_answer_keeps_what_was_said(session) -> None:
    session.sampling = Sampling(temperature=0, max_tokens=100)
    stream, result, _ = session.ask("Hello")
    first = next(stream)
    stream.close()  # what Ctrl-C does in the terminal
    assert result.stop_reason == "interrupted"
    assert session.turns[-1].assistant.startswith(first)
    assert "stopped" in status_line(result)


def test_commands(session, tmp_path: Path) -> None:
    assert "/reset" in session.command("/help")
    assert session.command("/set temp 0.3") == "temp = 0.3" and session.sampling.temperature == 0.3
    assert "max_tokens 8" in session.command("/set")
    session.command("/template llama-2")
    assert session.template.name == "llama-2"
    session.command("/system ཁྱེད་ནི་རོགས་རམ་པ་ཡིན།")
    assert session.messages()[0] == {"role": "system", "content": "ཁྱེད་ནི་རོགས་རམ་པ་ཡིན།"}
    session.command("/task tense")
    _answer(session, "འགྲོ")
    assert session.turns[-1].user == "འགྲོ-བྱ་ཚིག་འདིའི་དུས་གསུམ་ནི་གང་དག་ཡིན།"
    assert session.task is None  # one message only
    out = tmp_path / "t.jsonl"
    assert session.command(f"/save {out}") == f"saved 3 messages to {out}"
    rows = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["tiblocal_chat"] == 1 and rows[0]["template"] == "llama-2" and rows[0]["sampling"]["temperature"] == 0.3
    assert [r["role"] for r in rows[1:]] == ["system", "user", "assistant"]
    with pytest.raises(TiblocalError, match="already exists"):
        session.command(f"/save {out}")
    saved = session.messages()
    assert session.command("/reset") == "conversation cleared" and session.turns == []
    # /load brings the conversation back with the template, system prompt and sampling it was saved with
    session.command("/template alpaca")
    session.command("/set temp 0.9")
    assert session.command(f"/load {out}") == f"loaded 1 turns from {out}"
    assert session.messages() == saved and session.template.name == "llama-2" and session.sampling.temperature == 0.3
    _answer(session, "ཡང་བསྐྱར།")  # and goes on from there
    assert len(session.turns) == 2
    assert session.command("/exit") is None
    for bad, msg in [("/set warmth 2", "unknown setting"), ("/template chatml", "unknown chat template"),
                     ("/task poem", "unknown task"), ("/fly", "unknown command /fly"), ("/set temp", "needs a value")]:
        with pytest.raises(TiblocalError, match=msg):
            session.command(bad)


def test_status_line_counts_syllables() -> None:
    r = Generation(text="བཀྲ་ཤིས་བདེ་ལེགས།", completion_tokens=8, gen_ms=2000, first_token_ms=150, stop_reason="eos")
    assert status_line(r) == "8 tokens · 4.0 tokens/s · 2.0 syllables/s · first token 0.15 s"


def _spawn(*args: str) -> pexpect.spawn:
    env = dict(os.environ, NO_COLOR="1", TERM="dumb", COLUMNS="200", PYTHONIOENCODING="utf-8", LANG="C.UTF-8")
    # Ctrl-C reaches the chat as it reaches it in a terminal, even when the tests themselves run with SIGINT ignored
    # (a background job of a non-interactive shell, `cmd &`): Python raises KeyboardInterrupt only where SIGINT was
    # not ignored when it started
    return pexpect.spawn(
        sys.executable, ["-m", "tiblocal", "chat", *args], env=env, timeout=60, dimensions=(40, 200), encoding="utf-8",
        codec_errors="replace", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_chat_in_a_terminal(tiny_gguf, tmp_path: Path) -> None:
    child = _spawn(str(tiny_gguf), "--max-tokens", "8", "--temp", "0", "--ctx", "256")
    child.expect(r"template\s+alpaca")
    child.expect(">>> ")
    child.sendline("བཀྲ་ཤིས་བདེ་ལེགས།")
    child.expect(r"\d+ tokens · [\d.]+ tokens/s · [\d.]+ syllables/s")
    child.expect(">>> ")
    os.write(child.child_fd, b"bad \xff\xfe bytes\r")  # raw bytes that are not UTF-8
    child.expect("not valid UTF-8 \\(bytes ff fe\\)")
    child.expect(">>> ")
    child.sendintr()  # Ctrl-C at the prompt keeps the chat open
    child.expect("Ctrl-D or /exit to leave")
    child.expect(">>> ")
    child.sendline("/set temp 0.5")
    child.expect("temp = 0.5")
    out = tmp_path / "chat.jsonl"
    child.sendline(f"/save {out}")
    child.expect("saved 2 messages")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    rows = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["model"] == tiny_gguf.name and rows[0]["sampling"]["temperature"] == 0.5
    assert rows[1] == {"role": "user", "content": "བཀྲ་ཤིས་བདེ་ལེགས།"}


def test_ctrl_d_leaves_the_chat(tiny_gguf) -> None:
    child = _spawn(str(tiny_gguf), "--ctx", "256")
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_load_refuses_what_is_not_a_saved_conversation_and_keeps_the_chat(session, tmp_path: Path) -> None:
    _answer(session, "བཀྲ་ཤིས་བདེ་ལེགས།")
    before = session.messages()
    plain = tmp_path / "plain.jsonl"  # message lines without the header load too (the template and sampling stay)
    plain.write_text('{"role": "user", "content": "ཀ"}\n{"role": "assistant", "content": "ཁ"}\n', encoding="utf-8")
    template = session.template.name
    assert session.command(f"/load {plain}") == f"loaded 1 turns from {plain}" and session.template.name == template
    other = tmp_path / "other.jsonl"
    other.write_text('{"tiblocal_chat": 1, "model": "elsewhere.gguf"}\n', encoding="utf-8")
    assert "saved with elsewhere.gguf" in session.command(f"/load {other}") and session.turns == []
    session.command(f"/load {plain}")
    before = session.messages()
    cases = {
        "missing.jsonl": (None, "no such file"),
        ".": (None, "is a folder"),
        "bad.jsonl": (b'{"role": "user", "content": "x"}\n{oops\n', "line 2 is not valid JSON"),
        "latin1.jsonl": (b'{"role": "user", "content": "\xe9"}\n', "is not valid UTF-8"),
        "list.jsonl": (b'[1]\n', "line 1: expected an object"),
        "role.jsonl": (b'{"role": "bot", "content": "x"}\n', "line 1: expected a message"),
        "order.jsonl": (b'{"role": "assistant", "content": "x"}\n', "line 1: a assistant message out of turn"),
        "twice.jsonl": (b'{"role": "user", "content": "a"}\n{"role": "user", "content": "b"}\n', "line 2: a user message out of turn"),
        "open.jsonl": (b'{"role": "user", "content": "a"}\n', "the last user message has no answer"),
        "sampling.jsonl": (b'{"tiblocal_chat": 1, "sampling": {"warmth": 1}}\n', "unknown sampling settings warmth"),
        "range.jsonl": (b'{"tiblocal_chat": 1, "sampling": {"temperature": -1}}\n', "invalid sampling setting"),
        # values of the wrong type: "5" ended the chat with a crash report, 1.5 and "yes" were taken
        "type.jsonl": (b'{"tiblocal_chat": 1, "sampling": {"top_k": "5"}}\n', r"top_k '5' \(expected an integer\)"),
        "seed.jsonl": (b'{"tiblocal_chat": 1, "sampling": {"seed": 1.5}}\n', r"seed 1.5 \(expected an integer\)"),
        "flag.jsonl": (b'{"tiblocal_chat": 1, "sampling": {"ignore_eos": "yes"}}\n', "ignore_eos 'yes' \\(expected true"),
        "null.jsonl": (b'{"tiblocal_chat": 1, "sampling": {"temperature": null}}\n', "temperature None \\(expected a"),
        "object.jsonl": (b'{"tiblocal_chat": 1, "sampling": [1]}\n', '"sampling" is list; expected an object'),
        "digits.jsonl": (b'{"tiblocal_chat": 1, "sampling": {"temperature": 1' + b"0" * 400 + b'}}\n',
                         r"temperature of 401 digits \(expected a finite number\)"),  # OverflowError in isfinite
        "template.jsonl": (b'{"tiblocal_chat": 1, "template": "chatml"}\n', "unknown chat template"),
    }
    for name, (data, msg) in cases.items():
        f = tmp_path / name
        if data is not None:
            f.write_bytes(data)
        with pytest.raises(TiblocalError, match=msg):
            session.command(f"/load {f}")
        assert session.messages() == before and session.template.name == template  # nothing changed
    with pytest.raises(TiblocalError, match="/load needs a file name"):
        session.command("/load")
