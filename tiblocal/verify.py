"""`tiblocal verify DIR`: check the files of a folder against its SHA256SUMS (sha256sum -c, with clear errors)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
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


def sha256_files(paths: list[Path]) -> list[str]:
    """The digests of ``paths``, several files at a time (hashlib and reads release the GIL): a file's hash is
    sequential, so one thread a file; a 7B release's three GGUFs took 28 s one after another on the H100 host."""
    workers = max(1, min(len(paths), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(sha256_file, paths))


def write_sha256sums(folder: Path) -> None:
    """``SHA256SUMS`` in sha256sum(1)'s format (``sha256sum -c`` checks it), over every file below ``folder``."""
    folder = Path(folder)
    names = _files(folder)
    lines = [f"{digest}  {name}" for digest, name in zip(sha256_files([folder / n for n in names]), names)]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def verify(folder: Path) -> dict[str, str]:
    """Each listed file: "ok", "missing" or "changed"; files present but not listed: "unlisted"."""
    folder = Path(folder)
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise InputFileError(f"{folder} has no SHA256SUMS; it was not written by tiblocal merge (or release)")
    listed: dict[str, str] = {}
    for n, line in enumerate(sums.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise InputFileError(f"{sums} line {n} is not 'SHA256  NAME'; write the folder again")
        listed[name.lstrip("*")] = digest
    present = [name for name in listed if (folder / name).is_file()]
    found = dict(zip(present, sha256_files([folder / name for name in present])))
    status = {name: "missing" if name not in found else ("ok" if found[name] == digest else "changed")
              for name, digest in listed.items()}
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
