"""Machine output: ``--json`` prints one JSON document on stdout and nothing else goes there.

JSON has no NaN or infinity (Python's json writes bare ``NaN``, which strict parsers refuse): non-finite numbers are
written as null. Libraries that print on stdout (gptqmodel's banner and logs) are sent to stderr while a verb works,
at the file-descriptor level, so that C code and subprocesses follow too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every NaN and infinity (Python or NumPy floats, at any depth) replaced by None."""
    if isinstance(obj, float) or type(obj).__name__ in ("float16", "float32", "float64"):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


_printed = False  # whether this process printed its result on stdout (a later error then adds no error object)


def print_json(obj: Any, **kwargs) -> None:
    """One JSON document on stdout, on one line unless ``indent`` is given."""
    global _printed
    sys.stdout.write(dumps(obj, **kwargs) + "\n")
    sys.stdout.flush()
    _printed = True


def printed() -> bool:
    return _printed


def mark_printed() -> None:
    """The verb wrote its result on stdout itself (JSON lines)."""
    global _printed
    _printed = True


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send whatever is written to stdout meanwhile (Python, C, child processes) to stderr."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all
        yield
        return
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
