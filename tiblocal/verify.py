"""`tiblocal verify DIR`: check the files of a folder against its SHA256SUMS (sha256sum -c, with clear errors)."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath


from .errors import InputFileError


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
    try:
        text = sums.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(f"{sums} is not UTF-8 text (byte {e.start}); write the folder again") from None
    listed: dict[str, str] = {}
    inside = folder.resolve()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        name = name.lstrip("*")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest) or not name:
            raise InputFileError(f"{sums} line {n} is not 'SHA256  NAME'; write the folder again")
        # sha256sum -c would read any path; a folder's list names files in the folder, nothing else
        if (PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts or "\\" in name or "\0" in name
                or not (folder / name).resolve().is_relative_to(inside)):
            raise InputFileError(f"{sums} line {n} names {name!r}, outside {folder}; a SHA256SUMS lists the files in "
                                 "its own folder: get the folder again from where it was made")
        listed[name] = digest.lower()
    present = [name for name in listed if (folder / name).is_file()]
    found = dict(zip(present, sha256_files([folder / name for name in present])))
    status = {name: "missing" if name not in found else ("ok" if found[name] == digest else "changed")
              for name, digest in listed.items()}
    for name in _files(folder):
        if name not in status:
            status[name] = "unlisted"
    return status
