"""Reading and checking GGUF files, and writing their tensor data as it streams: the conventions tiblocal relies on,
with gguf-py's constants.

Only the header is read (memory-mapped), so inspecting or checking a 7B model reads about a megabyte,
and a 55k-token vocabulary is scanned in tens of milliseconds.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, Keys, LlamaFileType, TokenType

from .errors import InputFileError, ModelFormatError
from .gguf_keys import ROTATION_SEED
from .jsonin import is_whole

GGUF_MAGIC = b"GGUF"

# Architectures the tiblocal runtime is built and tested for (Llama-family models with a
# SentencePiece vocabulary). Other architectures may load in llama.cpp but are not supported here.
SUPPORTED_ARCHITECTURES = ("llama",)
ROTATION_KEY = ROTATION_SEED  # the rotations' seeds (tiblocal/gguf_keys.py)


@dataclass(frozen=True)
class TensorSummary:
    name: str
    type: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first, as llama.cpp prints it
    n_elements: int
    n_bytes: int


@dataclass
class GGUFInfo:
    path: Path
    size: int
    version: int
    architecture: str | None
    metadata: dict[str, Any]  # scalar and string keys; token arrays are summarised below
    tokens: list[str] = field(default_factory=list)
    token_types: list[int] = field(default_factory=list)
    tensors: list[TensorSummary] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get(Keys.Tokenizer.CHAT_TEMPLATE)

    @property
    def file_type(self) -> str | None:
        ft = self.metadata.get(Keys.General.FILE_TYPE)
        if ft is None:
            return None
        try:
            return LlamaFileType(ft).name.removeprefix("MOSTLY_")
        except ValueError:
            return str(ft)

    def token_type_counts(self) -> dict[str, int]:
        counts = Counter(self.token_types)
        out = {}
        for t, n in sorted(counts.items()):
            try:
                out[TokenType(t).name] = n
            except ValueError:
                out[str(t)] = n
        return out

    def special_ids(self) -> dict[str, int]:
        keys = {
            "bos": Keys.Tokenizer.BOS_ID,
            "eos": Keys.Tokenizer.EOS_ID,
            "unk": Keys.Tokenizer.UNK_ID,
            "pad": Keys.Tokenizer.PAD_ID,
            "sep": Keys.Tokenizer.SEP_ID,
        }
        return {name: self.metadata[k] for name, k in keys.items() if k in self.metadata}

    def tensor_type_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(t.type for t in self.tensors).items()))

    @property
    def rotation_seeds(self) -> list[int]:
        """The seeds of the rotations `tiblocal quantize --rotate` wrote the model in, in order; [] for none."""
        return [int(s) for s in self.metadata.get(ROTATION_KEY) or []]

    def arch_value(self, key_template: str) -> Any:
        """An architecture key such as ``Keys.LLM.CONTEXT_LENGTH`` ("{arch}.context_length")."""
        return self.metadata.get(key_template.format(arch=self.architecture))


def _check_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise InputFileError(f"{path}: no such file; give the path of a {what}")
    if path.is_dir():
        raise InputFileError(f"{path} is a folder; give the path of a {what} file")
    if not path.is_file():  # opening a named pipe waits for a writer, for ever; llama.cpp maps the file in any case
        raise InputFileError(f"{path} is not a regular file (a pipe, a device or a socket); give the path of a {what} "
                             "file")


def check_gguf_magic(path: Path) -> None:
    """Fail with a clear message if ``path`` is missing or does not start with the GGUF magic."""
    path = Path(path)
    _check_exists(path, ".gguf model")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ModelFormatError(
            f"{path} is not a GGUF file (it starts with {head!r}, expected {GGUF_MAGIC!r}); "
            "convert a Hugging Face model with `tiblocal convert HF_DIR --out FILE.gguf`"
        )


class _Truncated(Exception):
    pass


_U64 = struct.Struct("<Q")


# struct formats of GGUF scalar value types (little-endian files only)
_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8, GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16, GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.BOOL: np.bool_, GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64, GGUFValueType.FLOAT64: np.float64,
}


class _Scanner:
    """Reads the GGUF header (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) from a memory map.

    gguf-py's GGUFReader builds numpy views for every string of the vocabulary, which takes seconds for a
    55k-token model; this walks the same layout with ``struct`` and skips what is not asked for.
    """

    def __init__(self, buf) -> None:
        self.buf, self.off, self.size = buf, 0, len(buf)

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.off + n > self.size:
            raise _Truncated("its header ends early")
        (v,) = struct.unpack_from(fmt, self.buf, self.off)
        self.off += n
        return v

    def string(self, keep: bool = True) -> str | None:
        n = self.take("<Q")
        if self.off + n > self.size:
            raise _Truncated("its header ends early")
        s = bytes(self.buf[self.off : self.off + n]).decode("utf-8", "replace") if keep else None
        self.off += n
        return s

    def strings(self, n: int, keep: bool) -> list[str] | int:
        """An array of ``n`` strings (a vocabulary): one tight loop, as it runs once per token (55k for Tibetan)."""
        buf, off, size, unpack = self.buf, self.off, self.size, _U64.unpack_from
        out: list[str] = []
        for _ in range(n):
            if off + 8 > size:
                raise _Truncated("its header ends early")
            (k,) = unpack(buf, off)
            off += 8
            if keep:
                out.append(buf[off : off + k].decode("utf-8", "replace"))
            off += k
        if off > size:
            raise _Truncated("its header ends early")
        self.off = off
        return out if keep else n

    def value(self, vtype: int, keep: bool = True, depth: int = 0):
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self.string(keep)
        if vtype == GGUFValueType.ARRAY:
            itype = GGUFValueType(self.take("<I"))
            n = self.take("<Q")
            if itype == GGUFValueType.STRING:
                return self.strings(n, keep)
            if itype == GGUFValueType.ARRAY:
                if depth >= _MAX_NESTING:
                    raise ValueError(f"arrays nested more than {_MAX_NESTING} deep")
                return [self.value(itype, keep, depth + 1) for _ in range(n)]
            width = np.dtype(_NUMPY[itype]).itemsize
            if self.off + n * width > self.size:
                raise _Truncated("its header ends early")
            arr = np.frombuffer(self.buf, dtype=_NUMPY[itype], count=n, offset=self.off) if keep else None
            self.off += n * width
            return arr.tolist() if keep else n
        return self.take(_SCALAR[vtype])


_SKIPPED = (Keys.Tokenizer.SCORES, Keys.Tokenizer.MERGES)
_MAX_NESTING = 4  # arrays of arrays: no key of llama.cpp's nests at all
_MAX_DIMS = 4  # GGML_MAX_DIMS


def read_gguf(path: Path, *, with_tokens: bool = True) -> GGUFInfo:
    """Parse a GGUF header and check that every tensor's data lies inside the file."""
    path = Path(path)
    check_gguf_magic(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(path, size, _Scanner(buf), with_tokens)
    except _Truncated as e:
        raise ModelFormatError(f"{path} is truncated: {e} ({size} bytes); download or convert it again") from None
    except (ValueError, KeyError, UnicodeDecodeError, struct.error, OverflowError) as e:
        raise ModelFormatError(f"{path} is not a valid GGUF file ({e}); download or convert it again") from None


def _parse(path: Path, size: int, sc: _Scanner, with_tokens: bool) -> GGUFInfo:
    sc.off = 4
    version = sc.take("<I")
    if version not in (2, 3):
        raise ModelFormatError(f"{path} is GGUF version {version}; tiblocal reads versions 2 and 3 (little-endian)")
    n_tensors, n_kv = sc.take("<Q"), sc.take("<Q")
    metadata: dict[str, Any] = {}
    tokens: list[str] = []
    token_types: list[int] = []
    for _ in range(n_kv):
        key = sc.string()
        vtype = sc.take("<I")
        if key == Keys.Tokenizer.LIST:
            value = sc.value(vtype, keep=with_tokens)
            tokens = value if with_tokens else [""] * value
        elif key == Keys.Tokenizer.TOKEN_TYPE:
            token_types = sc.value(vtype)
        else:
            value = sc.value(vtype, keep=key not in _SKIPPED)
            if key not in _SKIPPED:
                metadata[key] = value
    infos = []
    for _ in range(n_tensors):
        name = sc.string()
        n_dims = sc.take("<I")
        if n_dims > _MAX_DIMS:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions, more than llama.cpp's {_MAX_DIMS}")
        dims = tuple(sc.take("<Q") for _ in range(n_dims))
        qtype = GGMLQuantizationType(sc.take("<I"))
        infos.append((name, dims, qtype, sc.take("<Q")))
    align = metadata.get(Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
    if not is_whole(align) or align < 1 or align & (align - 1):
        raise ValueError(f"{Keys.General.ALIGNMENT} is {align!r}; expected a power of two (llama.cpp's default: 32)")
    data_start = sc.off + (-sc.off % align)
    tensors = []
    for name, dims, qtype, offset in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_el = math.prod(dims)  # Python integers: dimensions whose product overflows 64 bits stay exact
        n_bytes = n_el * type_size // block
        end = data_start + offset + n_bytes
        if end > size:
            raise _Truncated(f"tensor {name!r} needs bytes up to {end} but the file has {size}")
        tensors.append(TensorSummary(name, qtype.name, dims, n_el, n_bytes))
    return GGUFInfo(path, size, version, metadata.get(Keys.General.ARCHITECTURE), metadata, tokens, token_types, tensors)


def check_supported_architecture(info: GGUFInfo) -> None:
    if info.architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelFormatError(
            f"{info.path} has architecture {info.architecture!r}; tiblocal runs "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} models (Llama-family with a SentencePiece vocabulary); "
            "use llama.cpp directly for other architectures"
        )
    if not info.tensors:
        raise ModelFormatError(
            f"{info.path} holds no tensors (a vocab-only GGUF?); it can be inspected but not run"
        )


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, *, skip: Callable[[str], bool] = lambda key: False,
                  values: dict[str, Any] | None = None) -> None:
    """Every key of ``reader`` into ``writer`` with its GGUF type, for a GGUF rewritten with gguf-py: not the
    header's fields or general.architecture (the writer sets them), nor keys ``skip`` names; ``values`` replaces
    the value of a key that is copied."""
    values = values or {}
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == Keys.General.ARCHITECTURE or skip(f.name):
            continue
        vtype = GGUFValueType(f.types[0])
        sub = GGUFValueType(f.types[-1]) if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, values[f.name] if f.name in values else f.contents(), vtype, sub_type=sub)


def write_gguf_data(writer: gguf.GGUFWriter, path: Path, tensors: Iterable[tuple[str, Iterable[np.ndarray]]], *,
                    progress: Callable[[int, int], None] | None = None) -> None:
    """Write a GGUF whose metadata and tensor infos ``writer`` holds: the header, the key-values and the infos, then
    each tensor's data from ``tensors`` (name, its pieces in order), a piece at a time, so that no tensor is ever
    whole in memory (convert writes blocks of rows; a rotated matrix comes as one piece); then close it.

    gguf-py's ``write_tensor_data`` takes a tensor only whole, so its file and padding are used here piece by piece,
    with its alignment; each tensor must come in the order its info was added and with the bytes the info says.
    ``progress(done, total)`` in bytes."""
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    infos = writer.tensors[0]
    total = sum(ti.nbytes for ti in infos.values())
    fout = writer.fout[0]
    done = 0
    for (name, pieces), (expected_name, info) in zip(tensors, list(infos.items()), strict=True):
        if name != expected_name:
            raise AssertionError(f"tensor {name} written where the infos put {expected_name}")
        writer.write_padding(fout, fout.tell())
        written = 0
        for piece in pieces:
            piece = np.ascontiguousarray(piece)
            piece.tofile(fout)
            written += piece.nbytes
        if written != info.nbytes:
            raise AssertionError(f"{name}: wrote {written} bytes, expected {info.nbytes}")
        writer.write_padding(fout, written)
        done += written
        if progress:
            progress(done, total)
    writer.close()
