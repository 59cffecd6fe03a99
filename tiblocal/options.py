"""One definition per verb: a verb is a function of one typed options dataclass, and the command line, its ``--help``
and the call all come from that dataclass; what the verb found comes back as a ``Result`` that one function prints.

A verb, in a package's ``commands.py``::

    @dataclass(frozen=True)
    class VerifyOptions:
        folder: Path = option(help="a folder with SHA256SUMS", positional=True)
        as_json: bool = option(False, flag="--json", help="print the result as JSON")

    def verify(o: VerifyOptions) -> Result: ...

``add_options`` turns the fields into argparse arguments (the type from the annotation: ``bool`` a switch, ``X | None``
an optional X, ``list[X]`` several values, ``Literal[...]`` choices; ``--name-with-dashes`` from the field's name
unless ``flag`` says otherwise), ``options_from`` turns the parsed namespace back into the dataclass, and a Python
caller builds the dataclass itself: ``verify(VerifyOptions(folder=Path("release")))``. A field whose type is another
options dataclass (the engine's settings of chat, generate and serve) becomes an argument group of its own.

Written here rather than taken from a library (jsonargparse, typer, click): those bring their own help layout,
their own exit codes and their own error format, where tiblocal's are argparse's (exit 2 on a usage error) and one
line on stderr for everything else; this module is the only place that knows argparse's details.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

REQUIRED: Any = dataclasses.MISSING


def option(
    default: Any = REQUIRED,
    *,
    help: str | Callable[[], str],
    flag: str | None = None,
    positional: bool = False,
    metavar: str | None = None,
    choices: Any = None,
    parse: Callable[[str], Any] | None = None,
    nargs: str | int | None = None,
    repeat: bool = False,
    negate: bool = False,
    exclusive: str | None = None,
    const: Any = None,
) -> Any:
    """A verb's option: a dataclass field carrying what the command line needs.

    ``help`` and ``choices`` may be functions, called when the parser is built: the runtime's modules then load only
    for the verbs that use them. ``parse`` turns the text into the value (default: the annotated type). ``repeat``:
    the option may be given many times (a list field). ``negate``: a ``True``-by-default switch whose flag turns it off
    (``--no-output``). ``exclusive``: options of one name form a group of which exactly one is given. ``const``: the
    value of an option given without one (``--rotate`` alone is seed 0).
    """
    meta = {"help": help, "flag": flag, "positional": positional, "metavar": metavar, "choices": choices,
            "parse": parse, "nargs": nargs, "repeat": repeat, "negate": negate, "exclusive": exclusive, "const": const}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _resolve(value: Any) -> Any:
    return value() if callable(value) and not isinstance(value, type) else value


def _strip_optional(kind: Any) -> Any:
    """``X | None`` -> X; other types unchanged."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


@functools.cache  # read when the parser is made and again when the parsed options become the dataclass
def option_fields(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    """``cls``'s fields with their annotations resolved (each in its own class's module, base classes too)."""
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls))


def is_options(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def add_options(parser: argparse.ArgumentParser, cls: type, *, group: Any = None) -> None:
    """Add ``cls``'s fields to ``parser`` in their order (a nested options dataclass as an argument group titled by its
    docstring's first line)."""
    target = group if group is not None else parser
    exclusive: dict[str, Any] = {}
    for f, kind in option_fields(cls):
        if is_options(kind):
            title = (kind.__doc__ or kind.__name__).strip().splitlines()[0]
            add_options(parser, kind, group=parser.add_argument_group(title))
            continue
        m = f.metadata
        if "help" not in m:
            raise TypeError(f"{cls.__name__}.{f.name} is not an option(): give it help")
        kind = _strip_optional(kind)
        kw: dict[str, Any] = {"help": _resolve(m["help"])}
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        where = target
        if m["exclusive"]:
            if m["exclusive"] not in exclusive:
                exclusive[m["exclusive"]] = target.add_mutually_exclusive_group(required=True)
            where = exclusive[m["exclusive"]]
        if has_default:
            kw["default"] = default
        if kind is bool:
            kw["action"] = "store_false" if m["negate"] else "store_true"
        else:
            item = kind
            if typing.get_origin(kind) is list and m["parse"] is not None and not (m["repeat"] or m["nargs"]):
                item = kind  # one value that ``parse`` turns into the list (--types Q4_K_M,Q8_0)
            elif typing.get_origin(kind) is list:
                (item,) = typing.get_args(kind)
                if m["repeat"]:
                    kw["action"] = "append"
                else:
                    kw["nargs"] = m["nargs"] or ("*" if m["positional"] and has_default else "+")
            elif m["nargs"] is not None:
                kw["nargs"] = m["nargs"]
            if m["const"] is not None:
                kw.update(nargs="?", const=m["const"])
            item = _strip_optional(item)
            if typing.get_origin(item) is Literal:
                kw["choices"] = list(typing.get_args(item))
                item = type(kw["choices"][0])
            if m["choices"] is not None:
                kw["choices"] = list(_resolve(m["choices"]))
            parse = m["parse"] or (item if item in (int, float, Path) else None)
            if parse is not None:
                kw["type"] = parse
            if m["metavar"]:
                kw["metavar"] = m["metavar"]
            if m["positional"] and has_default and "nargs" not in kw:
                kw["nargs"] = "?"
        if m["positional"]:
            where.add_argument(f.name, **kw)
            continue
        if not has_default and not m["exclusive"]:
            kw["required"] = True
        where.add_argument(m["flag"] or "--" + f.name.replace("_", "-"), dest=f.name, **kw)


def options_from(cls: type, namespace: argparse.Namespace) -> Any:
    """The ``cls`` the parsed command line describes."""
    values = {}
    for f, kind in option_fields(cls):
        values[f.name] = options_from(kind, namespace) if is_options(kind) else getattr(namespace, f.name)
    return cls(**values)


def options_type(run: Callable) -> type | None:
    """The options dataclass a verb's function takes (its one parameter's annotation)."""
    hints = typing.get_type_hints(run)
    hints.pop("return", None)
    kinds = [k for k in hints.values() if is_options(k)]
    return kinds[0] if kinds else None


# --- results -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """What a verb found, for ``emit`` to print: ``data`` with ``--json`` (one JSON document on stdout), else
    ``show(console)`` for a person, on stdout (tables) or stderr (a line about a file written, so that stdout stays
    the program's). ``problem``: the verb failed after finding what it shows (verify, check): shown, then one error
    line and exit 1. ``code``: the exit status when it is not an error (vocab parity: 1 when a runtime differs)."""

    data: Any
    show: Callable[[Any], None] | str
    to: Literal["stdout", "stderr"] = "stdout"
    problem: str | None = None
    code: int = 0
    indent: int | None = None


def emit(result: Result, as_json: bool) -> int:
    """The one output path of every verb that returns a ``Result``."""
    from rich.console import Console

    from .errors import TiblocalError
    from .jsonout import print_json

    if as_json:
        print_json(result.data, ensure_ascii=False, indent=result.indent)
    else:
        console = Console(stderr=result.to == "stderr", highlight=False)
        if isinstance(result.show, str):
            console.print(result.show, markup=False)
        else:
            result.show(console)
    if result.problem:
        raise TiblocalError(result.problem)
    return result.code


# --- value parsers -------------------------------------------------------------------------------


def at_least(least: int) -> Callable[[str], int]:
    """A parser: a whole number of at least ``least`` (argparse names the option in its usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value}: expected a whole number of at least {least}")
        return value

    return parse


positive_int = at_least(1)  # counts of windows, samples, questions, rows
nonnegative_int = at_least(0)


def comma_list(text: str) -> list[str]:
    """``Q4_K_M,Q8_0`` -> ["Q4_K_M", "Q8_0"] (empty entries dropped)."""
    return [t.strip() for t in text.split(",") if t.strip()]
