"""One definition per verb (tiblocal/options.py): the dataclass gives the command line and the Python call, a Result
is printed one way, and progress off a terminal is a line now and then."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from conftest import run_cli
from tiblocal.cli import VERBS, Verb
from tiblocal.options import Result, add_options, emit, option, option_fields, options_from, options_type, positive_int


def _leaves(verbs, prefix=()):
    for v in verbs:
        if v.actions:
            yield from _leaves(v.actions, (*prefix, v.name))
        else:
            yield " ".join((*prefix, v.name)), v


@pytest.mark.parametrize("name,verb", list(_leaves(VERBS)), ids=[n for n, _ in _leaves(VERBS)])
def test_every_verb_is_a_function_of_one_options_dataclass_in_a_commands_module(name: str, verb: Verb) -> None:
    module, _, function = verb.target.partition(":")
    assert module.rsplit(".", 1)[-1] == "commands", f"{name}: {module} (verbs live in a package's commands.py)"
    run = verb.function()
    kind = options_type(run)
    assert kind is not None, f"{name}: {verb.target} takes no options dataclass"
    for f, _ in option_fields(kind):
        assert "help" in f.metadata or hasattr(f.type, "__dataclass_fields__") or f.name in ("engine", "sampling"), \
            f"{name}: {kind.__name__}.{f.name} is not an option()"


@dataclass(frozen=True)
class _Demo:
    path: Path = option(positional=True, help="a file")
    count: int = option(3, parse=positive_int, help="how many")
    kind: Literal["a", "b"] = option("a", help="which kind")
    rate: float | None = option(None, help="a rate")
    files: list[Path] = option([], help="more files")
    tag: list[str] = option([], repeat=True, help="a tag (repeatable)")
    keep: bool = option(True, flag="--no-keep", negate=True, help="do not keep")
    loud: bool = option(False, help="be loud")
    seed: int | None = option(None, const=0, help="a seed, 0 when given alone")
    one: str | None = option(None, exclusive="src", help="one source")
    other: str | None = option(None, exclusive="src", help="the other source")


def _parse(*argv: str) -> _Demo:
    p = argparse.ArgumentParser(prog="demo", exit_on_error=False)
    add_options(p, _Demo)
    return options_from(_Demo, p.parse_args(list(argv)))


def test_the_dataclass_gives_the_command_line() -> None:
    d = _parse("x.txt", "--one", "o")
    assert d == _Demo(path=Path("x.txt"), one="o")  # every default as the dataclass says
    d = _parse("x.txt", "--count", "5", "--kind", "b", "--rate", "0.5", "--files", "a", "b", "--tag", "t1", "--tag",
               "t2", "--no-keep", "--loud", "--seed", "--other", "z")
    assert d == _Demo(path=Path("x.txt"), count=5, kind="b", rate=0.5, files=[Path("a"), Path("b")], tag=["t1", "t2"],
                      keep=False, loud=True, seed=0, other="z")
    assert _parse("x", "--seed", "7", "--one", "o").seed == 7


@pytest.mark.parametrize("argv", [
    ("x", "--one", "o", "--count", "0"),  # below positive_int
    ("x", "--one", "o", "--kind", "c"),  # not a choice
    ("x", "--one", "o", "--other", "p"),  # both of an exclusive group
    ("x",),  # none of a required exclusive group
    ("--one", "o"),  # the positional missing
])
def test_the_command_line_refuses_what_the_dataclass_does_not_allow(argv) -> None:
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        _parse(*argv)


def test_an_option_without_help_is_refused_when_the_parser_is_built() -> None:
    @dataclass(frozen=True)
    class NoHelp:
        path: Path = Path("x")

    with pytest.raises(TypeError, match="NoHelp.path is not an option"):
        add_options(argparse.ArgumentParser(), NoHelp)


def test_the_python_call_and_the_command_line_give_the_same_result(tmp_path: Path) -> None:
    from tiblocal.commands import VerifyOptions, verify
    from tiblocal.verify import write_sha256sums

    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    write_sha256sums(tmp_path)
    result = verify(VerifyOptions(folder=tmp_path))
    assert result.problem is None and result.data == {"a.txt": "ok"}
    p = run_cli("verify", str(tmp_path), "--json")
    assert p.returncode == 0 and json.loads(p.stdout) == result.data
    (tmp_path / "a.txt").write_text("b", encoding="utf-8")
    result = verify(VerifyOptions(folder=tmp_path))
    assert result.data == {"a.txt": "changed"} and "1 file(s) do not match SHA256SUMS" in result.problem


def test_a_stage_verb_called_from_python_gives_what_its_json_prints(tiny_gguf: Path) -> None:
    """As docs/usage.md shows: eval_ppl(PplOptions(...)) from Python, `tiblocal eval ppl ... --json` from a shell."""
    from conftest import DATA
    from tiblocal.quantize.commands import PplOptions, eval_ppl

    text = DATA / "tibetan_sample.txt"
    result = eval_ppl(PplOptions(models=[tiny_gguf], text=[text], ctx=64, max_windows=2, threads=1))
    p = run_cli("eval", "ppl", str(tiny_gguf), "--text", str(text), "--ctx", "64", "--max-windows", "2", "--threads",
                "1", "--json")
    assert p.returncode == 0, p.stderr
    shown = json.loads(p.stdout)
    assert shown.pop("ppl") == pytest.approx(result.data["ppl"]) and result.data["ppl"] > 1
    assert shown == {k: v for k, v in result.data.items() if k != "ppl"}


def test_emit_prints_the_table_or_the_json_then_fails_with_the_problem(capsys) -> None:
    from tiblocal.errors import TiblocalError

    shown = Result({"n": float("nan")}, lambda console: console.print("a table", markup=False), problem="it broke")
    with pytest.raises(TiblocalError, match="it broke"):
        emit(shown, as_json=False)
    assert capsys.readouterr().out == "a table\n"
    with pytest.raises(TiblocalError, match="it broke"):
        emit(shown, as_json=True)
    assert json.loads(capsys.readouterr().out) == {"n": None}  # no NaN in JSON
    assert emit(Result({}, "wrote x", to="stderr", code=3), as_json=False) == 3
    out = capsys.readouterr()
    assert out.out == "" and out.err == "wrote x\n"


# --- progress off a terminal -------------------------------------------------------------------------------------


def test_progress_off_a_terminal_is_a_line_each_period(tiny_hf: Path, tmp_path: Path) -> None:
    p = run_cli("convert", str(tiny_hf), "--out", str(tmp_path / "a.gguf"), env={"TIBLOCAL_PROGRESS_SECONDS": "0"})
    assert p.returncode == 0, p.stderr
    lines = p.stderr.decode().splitlines()
    assert any(l.startswith("writing a.gguf: ") and "(100%)" in l for l in lines), lines
    assert lines[-1].startswith("wrote ")
    # the default period (30 s) is longer than this job: only the result line
    p = run_cli("convert", str(tiny_hf), "--out", str(tmp_path / "b.gguf"))
    assert p.returncode == 0 and p.stderr.decode().splitlines() == [l for l in p.stderr.decode().splitlines()
                                                                    if l.startswith("wrote ")]


def test_a_bad_progress_period_is_one_line_naming_it(tiny_hf: Path, tmp_path: Path) -> None:
    p = run_cli("convert", str(tiny_hf), "--out", str(tmp_path / "c.gguf"), env={"TIBLOCAL_PROGRESS_SECONDS": "soon"})
    err = p.stderr.decode().strip()
    assert p.returncode == 1 and err.count("\n") == 0, err
    assert "TIBLOCAL_PROGRESS_SECONDS='soon'" in err and "seconds" in err
    assert not (tmp_path / "c.gguf").exists()


def test_generate_reports_progress_off_a_terminal_too(tiny_gguf: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n", encoding="utf-8")
    p = run_cli("generate", str(tiny_gguf), "--file", str(prompts), "--max-tokens", "2", "--out", str(tmp_path / "o.jsonl"),
                env={"TIBLOCAL_PROGRESS_SECONDS": "0"})
    assert p.returncode == 0, p.stderr
    lines = p.stderr.decode().splitlines()
    assert any(l.startswith("generating: 2/2 (100%)") for l in lines), lines
    assert len((tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()) == 2
