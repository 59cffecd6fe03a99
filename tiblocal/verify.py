"""`tiblocal verify DIR`: check the files of a folder against its SHA256SUMS (sha256sum -c, with clear errors)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from rich.console import Console

from .errors import InputFileError, TiblocalError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file below ``folder`` (sub-folders too, e.g. a release's GPTQ model), as relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file() and p.name != "SHA256SUMS")


def write_sha256sums(folder: Path) -> None:
    """``SHA256SUMS`` in sha256sum(1)'s format (``sha256sum -c`` checks it), over every file below ``folder``."""
    folder = Path(folder)
    lines = [f"{sha256_file(folder / name)}  {name}" for name in _files(folder)]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def verify(folder: Path) -> dict[str, str]:
    """Each listed file: "ok", "missing" or "changed"; files present but not listed: "unlisted"."""
    folder = Path(folder)
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise InputFileError(f"{folder} has no SHA256SUMS; it was not written by tiblocal merge (or release)")
    status: dict[str, str] = {}
    for n, line in enumerate(sums.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise InputFileError(f"{sums} line {n} is not 'SHA256  NAME'; write the folder again")
        name = name.lstrip("*")
        path = folder / name
        status[name] = "missing" if not path.is_file() else ("ok" if sha256_file(path) == digest else "changed")
    for name in _files(folder):
        if name not in status:
            status[name] = "unlisted"
    return status


def run_verify(folder: Path, *, as_json: bool) -> int:
    status = verify(folder)
    bad = {k: v for k, v in status.items() if v in ("missing", "changed")}
    if as_json:
        sys.stdout.write(json.dumps(status) + "\n")
    else:
        con = Console(highlight=False)
        for name, s in status.items():
            con.print(f"{s:9} {name}", markup=False)
    if bad:
        first = next(iter(bad.items()))
        raise TiblocalError(
            f"{folder}: {len(bad)} file(s) do not match SHA256SUMS ({first[0]} is {first[1]}); copy or download them again"
        )
    return 0
