"""JSON lines files read row by row, each problem one line naming the file and the line: evaluation data (TLUE, the
generation tasks) and the chat's saved conversations."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputFileError
from .jsonin import loads


def json_rows(path: Path, what: str, expected: str):
    """(where, row) for each JSON object of a .jsonl (or .jsonl.xz) file: ``where`` names the file and the line for
    the caller's own checks; a missing file, a line that is not JSON or not an object is one error naming it."""
    from .vocab import read_lines

    path = Path(path)
    if path.is_dir():
        raise InputFileError(f"{what} {path} is a folder; give the file of {expected} (JSON lines)")
    if not path.is_file():
        raise InputFileError(f"{what} {path}: no such file; give {expected} as JSON lines")
    for n, line in enumerate(read_lines([path]), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = loads(line)
        except json.JSONDecodeError as e:
            raise InputFileError(f"{where} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputFileError(f"{where}: expected an object with {expected}")
        yield where, row
