"""Atomic output files: a temporary name beside the target, then a rename.

An interrupted write (Ctrl-C, full disk, crash) never leaves a file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from .errors import TiblocalError


def check_output_path(path: Path, *, force: bool = False, inputs: Iterable[Path | None] = (), option: str = "--out",
                      folder: bool = False) -> None:
    """Refuse to overwrite an existing output unless ``force``, an output that is, contains or lies inside one of the
    ``inputs`` (whatever the spelling: relative, symlinks, ``..``, a hard link), and an existing folder where a file
    goes (``folder`` False) or a file where a folder goes; make sure the output's folder exists."""
    path = Path(path)
    check_not_an_input(path, inputs, option)
    if path.exists() or path.is_symlink():
        if not force:
            raise TiblocalError(f"{path} already exists; pass --force to overwrite it or choose another {option}")
        if path.is_dir() and not folder:
            raise TiblocalError(f"{option} {path} is a folder; give the file to write, e.g. {path / 'model.gguf'}")
        if folder and not path.is_dir():
            raise TiblocalError(f"{option} {path} is a file, and a folder goes there; remove it or choose another {option}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise TiblocalError(f"folder {parent} for output {path.name} does not exist; create it first")


def check_file_name(name: str, option: str) -> None:
    """Refuse a value that becomes part of a file name unless it is a plain name: no folder separators, no ``..``,
    no leading dot or dash, no control characters."""
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith((".", "-"))
           or any(ord(c) < 32 or c == "\x7f" for c in name) or len(name.encode("utf-8", "surrogateescape")) > 200)
    if bad:
        raise TiblocalError(f"{option} {name!r} is not a plain file name (it names files inside the output); use "
                            "letters, digits, '-', '_' and '.', e.g. tibetan-alpaca-7b")


def check_not_an_input(out: Path, inputs: Iterable[Path | None], option: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside an input: writing it would destroy the input."""
    target = Path(out).resolve()
    for given in inputs:
        if given is None or str(given) in ("", "-", "bundled"):
            continue
        source = Path(given).resolve()
        same = target == source
        if not same and target.exists() and source.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(target, source)  # a hard link, or a bind mount
        if same:
            raise TiblocalError(f"{option} {out} is the input {given}; writing it would destroy the input: "
                                f"choose another {option}")
        if source.is_relative_to(target):
            raise TiblocalError(f"{option} {out} contains the input {given}; writing it would destroy the input: "
                                f"choose a {option} outside it")
        if target.is_relative_to(source):
            raise TiblocalError(f"{option} {out} lies inside the input {given}; choose a {option} outside it")


def _disk_full(path: Path, e: OSError, option: str = "--out") -> TiblocalError:
    return TiblocalError(
        f"the disk is full while writing {path} ({e.strerror or 'no space left on the device'}); nothing was left behind. "
        f"Free some space or write to another disk with {option}"
    )


_PARTIAL = ".{name}.{tag}.partial"  # the temporary name beside the target; tag: the writer's PID, a dash, random hex
log = logging.getLogger(__name__)


def _writer_alive(stale: Path) -> bool:
    """Whether the process that named ``stale`` (its PID is in the tag) still runs on this machine."""
    tag = stale.name[: -len(".partial")].rsplit(".", 1)[-1]
    pid = tag.split("-", 1)[0]
    if "-" not in tag or not pid.isdigit():
        return False  # an older tiblocal's name, with no PID: no run of this version writes it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_partials(path: Path) -> list[Path]:
    """Delete what an atomic write of ``path`` left beside it when its process was killed (a partial whose writer
    still runs is left alone); returns what was removed."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    removed = []
    for stale in parent.glob(_PARTIAL.format(name=glob.escape(path.name), tag="*")):
        if _writer_alive(stale):
            continue
        with contextlib.suppress(OSError):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
            removed.append(stale)
    if removed:
        log.warning("removed %d partial output%s that an interrupted run left beside %s: %s", len(removed),
                    "" if len(removed) == 1 else "s", path, ", ".join(p.name for p in removed))
    return removed


def _partial_name(path: Path) -> Path:
    parent = path.parent if str(path.parent) else Path(".")
    while True:
        candidate = parent / _PARTIAL.format(name=path.name, tag=f"{os.getpid()}-{secrets.token_hex(6)}")
        if not candidate.exists():
            return candidate


def _take_name(tmp: Path, path: Path, replace: bool, option: str) -> None:
    """Put the finished ``tmp`` at ``path``: replacing what is there, or (``replace`` False) only if nothing is
    there now, atomically (a hard link fails on an existing name), so that a second run writing the same output
    meanwhile is not silently replaced."""
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise TiblocalError(f"{path} appeared while this run was writing it (another run writing the same output?); "
                            f"it was left as it is and this run's result discarded: choose another {option}") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if path.exists():  # a file system without hard links: the check and the rename are two steps
            raise TiblocalError(f"{path} appeared while this run was writing it; it was left as it is and this run's "
                                f"result discarded: choose another {option}") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: Path, *, option: str = "--out", replace: bool = True) -> Iterator[Path]:
    """Yield an unused temporary name beside ``path``; it becomes ``path`` only if the block succeeds (with
    ``replace`` False, only if no ``path`` appeared meanwhile). Partials that killed runs left for ``path`` go first.

    The name is not created here: the writer creates the file. A file made empty beforehand and then opened with
    O_TRUNC by the writer (llama.cpp's quantizer does) is flushed to disk whole when it is closed on ext4
    (auto_da_alloc's replace-via-truncate rule): 3.8 s (median of 10) on a 7.4 GB Q8_0 output. ``option`` is the
    setting a full disk's error names for choosing another place.
    """
    path = Path(path)
    remove_partials(path)
    tmp_path = _partial_name(path)
    try:
        yield tmp_path
        _take_name(tmp_path, path, replace, option)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(e, OSError) and (e.errno in (errno.ENOSPC, errno.EDQUOT) or _looks_full(e, path)):
            raise _disk_full(path, e, option) from None
        if isinstance(e, OSError) and _about(e, tmp_path):
            raise TiblocalError(f"cannot write {path}: {e.strerror}; choose a writable place with {option}") from None
        raise


def _looks_full(e: OSError, path: Path) -> bool:
    """A short write without an errno (numpy's tofile says "N requested and M written") on a disk with no room."""
    if e.errno is not None or "written" not in str(e):
        return False
    parent = path.parent if str(path.parent) else Path(".")
    try:
        return shutil.disk_usage(parent).free < (16 << 20)
    except OSError:
        return False


def _about(e: OSError, tmp: Path) -> bool:
    """Whether an OSError is about writing ``tmp`` (not about reading an input meanwhile)."""
    return e.filename is not None and Path(os.fsdecode(e.filename)).name == tmp.name


@contextlib.contextmanager
def atomic_dir(path: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it becomes ``path`` only if the block succeeds.

    With ``replace``, an existing ``path`` is swapped out only after the new folder is complete.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise TiblocalError(f"folder {parent} for output {path.name} does not exist; create it first")
    remove_partials(path)
    tmp = _partial_name(path)
    try:
        os.mkdir(tmp, 0o777)  # the umask applies, as to any folder the user makes
    except OSError as e:
        raise TiblocalError(f"cannot write in {parent}: {e.strerror}; choose a writable place with --out") from None
    try:
        yield tmp
        if path.exists():
            if not replace:
                raise TiblocalError(f"{path} already exists; pass --force to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (e.errno in (errno.ENOSPC, errno.EDQUOT) or _looks_full(e, path)):
            raise _disk_full(path, e) from None
        if isinstance(e, OSError) and e.filename is not None and Path(os.fsdecode(e.filename)).is_relative_to(tmp):
            raise TiblocalError(f"cannot write {path}: {e.strerror}; choose a writable place with --out") from None
        raise


@contextlib.contextmanager
def atomic_write_text(path: Path, *, replace: bool = True) -> Iterator[TextIO]:
    with atomic_path(path, replace=replace) as tmp, open(tmp, "w", encoding="utf-8") as f:
        yield f


def human_size(n: float) -> str:
    """Bytes for a person: 512 B, 14.5 MiB, 3.9 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return str(n)
