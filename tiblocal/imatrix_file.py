"""Importance matrix files: llama.cpp's ``llama-imatrix`` output, read and written (the file format alone).

The GGUF format (``NAME.in_sum2`` and ``NAME.counts`` tensors, ``imatrix.*`` keys) or the legacy binary ``.dat``,
each entry normalised as llama.cpp's ``common_imatrix_load`` does (sums over counts, 1 where a count is 0). The
measurement (``tiblocal imatrix``) and the hand-over to llama.cpp's quantizer live in ``tiblocal.quantize.imatrix``;
``tiblocal inspect`` reads files through this module, so the core does not import a stage.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import Keys

from .errors import InputFileError
from .gguf_keys import IMATRIX_ROTATED as KV_ROTATED  # the seeds then under ROTATION_SEED

KV_DATASETS, KV_CHUNK_COUNT, KV_CHUNK_SIZE = Keys.IMatrix.DATASETS, Keys.IMatrix.CHUNK_COUNT, Keys.IMatrix.CHUNK_SIZE


@dataclass
class Imatrix:
    path: Path
    entries: dict[str, np.ndarray]  # tensor name -> float32 importance per input column (per expert, flattened)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    # the rotation seeds of the model it was measured on ([]: unrotated); None where the file does not say
    # (llama-imatrix's files, which may have been measured on any GGUF)
    rotation: list[int] | None = None

    def basis(self) -> str:
        return basis_name(self.rotation)


def basis_name(seeds: list[int] | None) -> str:
    """The basis a matrix was measured in, or a model is written in, as messages name it."""
    if seeds is None:
        return "an unknown basis"
    return f"the basis of --rotate {','.join(map(str, seeds))}" if seeds else "the unrotated basis"


def _bad(path: Path, what: str) -> InputFileError:
    return InputFileError(
        f"{path} is not a usable importance matrix: {what}; give a file written by `tiblocal imatrix` or llama.cpp's "
        "llama-imatrix (GGUF or legacy .dat)"
    )


def is_gguf(path: Path) -> bool:
    """Whether the file is in the GGUF format (else llama-imatrix's legacy .dat)."""
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_imatrix(path: Path) -> Imatrix:
    path = Path(path)
    if not path.is_file():
        raise InputFileError(
            f"no such importance matrix file: {path}; make one with `tiblocal imatrix HF_DIR --out FILE` or llama.cpp's "
            "llama-imatrix"
        )
    im = _load_gguf(path) if is_gguf(path) else _load_legacy(path)
    for name, values in im.entries.items():  # llama.cpp refuses them only once it quantizes, after the long work
        if not np.isfinite(values).all():
            raise _bad(path, f"{name} holds a value that is not a finite number ({values[~np.isfinite(values)][0]})")
    return im


def _load_gguf(path: Path) -> Imatrix:
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf-py raises plain ValueError/struct errors on damaged files
        raise _bad(path, f"its GGUF header does not read ({e})") from None
    keys = {f.name: f for f in reader.fields.values()}
    missing = [k for k in (KV_DATASETS, KV_CHUNK_COUNT, KV_CHUNK_SIZE) if k not in keys]
    if missing:  # llama-quantize stops here too ("missing imatrix metadata")
        raise _bad(path, f"it lacks the keys {', '.join(missing)}")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        for suffix, into in ((".in_sum2", sums), (".counts", counts)):
            if t.name.endswith(suffix):
                if t.tensor_type != GGMLQuantizationType.F32:
                    raise _bad(path, f"tensor {t.name} is {t.tensor_type.name}, not F32")
                into[t.name.removesuffix(suffix)] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    if not sums and not counts:
        raise _bad(path, "it holds no .in_sum2/.counts tensors")
    if unpaired := sorted(set(sums) ^ set(counts)):
        raise _bad(path, f"sums and counts do not pair up for {unpaired[0]}")
    entries = {}
    for name, s in sums.items():
        c = np.rint(counts[name]).astype(np.float32)
        if len(c) == 0 or len(s) % len(c):
            raise _bad(path, f"{name} has {len(s)} sums for {len(c)} counts")
        per = s.reshape(len(c), -1)
        entries[name] = np.where(c[:, None] > 0, per / np.where(c > 0, c, 1)[:, None], 1).astype(np.float32).reshape(-1)
    datasets = [str(bytes(keys[KV_DATASETS].parts[i]), "utf-8") for i in keys[KV_DATASETS].data]
    chunk_count = int(keys[KV_CHUNK_COUNT].parts[keys[KV_CHUNK_COUNT].data[0]][0])
    rotation = None
    if KV_ROTATED in keys:
        from .gguf_file import ROTATION_KEY

        rotated = bool(keys[KV_ROTATED].contents())
        rotation = [int(x) for x in keys[ROTATION_KEY].contents()] if rotated and ROTATION_KEY in keys else []
        if rotated and not rotation:
            raise _bad(path, f"{KV_ROTATED} is true but {ROTATION_KEY} does not name the rotation")
    return Imatrix(path, entries, datasets, chunk_count, rotation)


def _load_legacy(path: Path) -> Imatrix:
    buf = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(buf):
            raise _bad(path, f"it ends at byte {len(buf)} inside an entry")
        out = struct.unpack_from(fmt, buf, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise _bad(path, "it is neither GGUF nor a legacy .dat with entries")
    entries = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length <= 4096:
            raise _bad(path, f"an entry name of {length} bytes")
        name = take(f"<{length}s")[0].decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise _bad(path, f"entry {name} has {nval} values")
        if pos + 4 * nval > len(buf):
            raise _bad(path, f"it ends at byte {len(buf)} inside an entry")
        values = np.frombuffer(buf, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        with np.errstate(invalid="ignore", over="ignore"):  # inf / n and nan / n: refused in load_imatrix
            entries[name] = values / ncall if ncall > 0 else values
    datasets, chunk_count = [], 0
    if pos < len(buf):  # optional: chunk count and dataset name
        (chunk_count,) = take("<i")
        if pos + 4 <= len(buf):
            (length,) = take("<i")
            if length > 0:
                datasets.append(take(f"<{length}s")[0].decode("utf-8", errors="replace"))
    return Imatrix(path, entries, datasets, chunk_count)


def write_imatrix(path: Path, im: Imatrix, counts: dict[str, int], chunk_size: int) -> None:
    """The GGUF format ``llama-imatrix`` writes: per matrix the summed squares (``NAME.in_sum2``, ``entries`` times
    the count) and the count of rows (``NAME.counts``), and the ``imatrix.*`` keys; atomically."""
    import gguf

    from .fsutil import atomic_path

    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_string("general.type", "imatrix")
        w.add_array(KV_DATASETS, im.datasets)
        w.add_uint32(KV_CHUNK_COUNT, im.chunk_count)
        w.add_uint32(KV_CHUNK_SIZE, chunk_size)
        w.add_bool(KV_ROTATED, bool(im.rotation))
        if im.rotation:
            from .gguf_file import ROTATION_KEY

            w.add_array(ROTATION_KEY, [int(x) for x in im.rotation])
        for name, values in im.entries.items():
            w.add_tensor(f"{name}.in_sum2", (values * counts[name]).astype(np.float32).reshape(1, -1))
            w.add_tensor(f"{name}.counts", np.array([[counts[name]]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
