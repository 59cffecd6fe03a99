"""JSON as users give it, read one way by every reader (the counterpart of jsonout.py, which writes it)."""

from __future__ import annotations

import json
import math
import numbers
import re
from typing import Any

# \\uD800 to \\uDFFF: only with such an escape can JSON that is valid UTF-8 spell a lone surrogate
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")


def loads(text: str | bytes) -> Any:
    """``json.loads``, where every way a text fails to give values that Python and the tokenizer can use is a
    ``json.JSONDecodeError`` (which readers already catch, with ``UnicodeDecodeError`` for bytes that are not UTF-8):
    besides bad syntax, nesting deeper than the parser's recursion, a number of more than 4,300 digits (Python's limit
    on converting one), and a lone UTF-16 surrogate escape such as "\\ud800", which JSON allows but which is no
    character (UTF-8, SentencePiece and llama.cpp cannot take it)."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("arrays or objects nested too deeply to be read", _doc(text), 0) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError as e:  # the only other one: int() refused a number past sys.get_int_max_str_digits()
        raise json.JSONDecodeError(f"a number too long to be read ({e})", _doc(text), 0) from None
    escapes = (_SURROGATE_ESCAPE if isinstance(text, str) else _SURROGATE_ESCAPE_BYTES).search(text)
    bad = _lone_surrogate(data) if escapes else None
    if bad is not None:
        shown = bad.encode("utf-8", "backslashreplace").decode()
        message = (f"a lone UTF-16 surrogate ({shown}), which is not a character: escape a character outside the BMP "
                   "as a surrogate pair, or write it in UTF-8")
        raise json.JSONDecodeError(message, _doc(text), escapes.start())
    return data


def is_whole(value: object) -> bool:
    """A whole number as JSON, YAML or a caller gives one (numpy's too): not a bool, which Python counts as 0 or 1
    but no file means as a count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A number (whole or not, finite or not), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """A number a float can hold: not a bool, not NaN or infinite, and not an integer past a float's range (JSON and
    YAML allow 400 digits, on which ``math.isfinite`` raises OverflowError)."""
    if not is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _doc(text: str | bytes) -> str:
    return text if isinstance(text, str) else text.decode("utf-8", "replace")


def _lone_surrogate(data: Any) -> str | None:
    """The first lone surrogate in ``data``'s strings; a loop, not a recursion, since the data may nest as deeply as
    json.loads allows."""
    stack = [data]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return v[e.start:e.end]
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None
