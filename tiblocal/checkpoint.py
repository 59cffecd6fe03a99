"""Hugging Face model folders without torch: config, safetensors shards, tokenizer files.

Safetensors shards are memory-mapped and read one tensor at a time, so converting or merging a 7B
model never holds the whole model in memory. The format is an 8-byte little-endian header length, a
JSON header (dtype, shape, byte range per tensor) and the raw data
(https://github.com/huggingface/safetensors#format).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputFileError, ModelFormatError

# safetensors dtype -> numpy dtype as stored. BF16 has no numpy type: it is read as uint16 and
# widened with ``bf16_to_f32``.
_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}

_MAX_HEADER = 100 * 1024 * 1024


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen bfloat16 values stored as uint16 to float32 (exact)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class TensorRef:
    """One tensor in a safetensors file, not yet read."""

    file: Path
    name: str
    dtype: str  # safetensors name: F32, F16, BF16, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    def raw(self) -> np.ndarray:
        """The stored values, memory-mapped (BF16 comes back as uint16)."""
        if self.end == self.start:
            return np.zeros(self.shape, dtype=_ST_DTYPES[self.dtype])
        return np.memmap(self.file, dtype=_ST_DTYPES[self.dtype], mode="r", offset=self.start, shape=self.shape)

    def as_f32(self) -> np.ndarray:
        data = self.raw()
        if self.dtype == "BF16":
            return bf16_to_f32(data)
        return np.asarray(data, dtype=np.float32)


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    """Parse a safetensors header and check that every tensor's bytes lie inside the file."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFormatError(f"{path} is not a safetensors file ({size} bytes); save or download it again")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise ModelFormatError(
                f"{path} is not a safetensors file or is truncated (header of {n} bytes, file of {size}); "
                "save or download it again"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{path} has a damaged safetensors header ({e}); save or download it again") from None
    base = 8 + n
    refs = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype = spec.get("dtype")
        if dtype not in _ST_DTYPES:
            raise ModelFormatError(f"{path}: tensor {name!r} has dtype {dtype!r}, which tiblocal cannot read")
        start, end = (base + int(o) for o in spec["data_offsets"])
        if end > size:
            raise ModelFormatError(
                f"{path} is truncated: tensor {name!r} needs bytes up to {end} but the file has {size}; "
                "save or download it again"
            )
        refs[name] = TensorRef(path, name, dtype, tuple(int(d) for d in spec["shape"]), start, end)
    return refs


@dataclass
class HFCheckpoint:
    """A Hugging Face model folder: ``config.json``, weight shards and tokenizer files."""

    path: Path
    config: dict[str, Any]
    shards: list[Path]
    tensors: dict[str, TensorRef]

    @classmethod
    def open(cls, path: Path) -> HFCheckpoint:
        path = Path(path)
        if not path.is_dir():
            raise InputFileError(f"{path} is not a folder; give a Hugging Face model folder (config.json + *.safetensors)")
        config = load_config(path)
        shards = find_shards(path)
        tensors: dict[str, TensorRef] = {}
        for shard in shards:
            for name, ref in read_safetensors_header(shard).items():
                if name in tensors:
                    raise ModelFormatError(f"{shard}: tensor {name!r} is also in {tensors[name].file}")
                tensors[name] = ref
        return cls(path, config, shards, tensors)

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else None

    @property
    def tokenizer_model(self) -> Path | None:
        p = self.path / "tokenizer.model"
        return p if p.is_file() else None

    def iter_shards(self) -> Iterator[tuple[Path, list[TensorRef]]]:
        for shard in self.shards:
            yield shard, [t for t in self.tensors.values() if t.file == shard]


def load_config(path: Path) -> dict[str, Any]:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise InputFileError(f"{path} has no config.json; give a Hugging Face model folder")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{cfg} is not valid JSON ({e}); fix or re-save the model") from None


def find_shards(path: Path) -> list[Path]:
    """Safetensors shards in index order; ``.bin`` checkpoints are refused with the fix."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{index} is not a valid safetensors index ({e})") from None
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise InputFileError(f"{path} is missing shards listed in {index.name}: {', '.join(missing)}")
        return [path / n for n in names]
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    if list(path.glob("pytorch_model*.bin")):
        raise InputFileError(
            f"{path} has only pytorch .bin weights; re-save them as safetensors "
            "(model.save_pretrained(dir, safe_serialization=True))"
        )
    raise InputFileError(f"{path} has no weights (no *.safetensors); give a Hugging Face model folder")
