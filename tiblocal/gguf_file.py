"""Reading and checking GGUF files: the conventions tiblocal relies on, on top of gguf-py.

Everything here works from the file's header through ``gguf.GGUFReader`` (memory-mapped), so
inspecting or checking a 7B model reads kilobytes, not gigabytes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, Keys, LlamaFileType, TokenType

from .errors import InputFileError, ModelFormatError

GGUF_MAGIC = b"GGUF"

# Architectures the tiblocal runtime is built and tested for (Llama-family models with a
# SentencePiece vocabulary). Other architectures may load in llama.cpp but are not supported here.
SUPPORTED_ARCHITECTURES = ("llama",)


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

    def arch_value(self, key_template: str) -> Any:
        """An architecture key such as ``Keys.LLM.CONTEXT_LENGTH`` ("{arch}.context_length")."""
        return self.metadata.get(key_template.format(arch=self.architecture))


class _Truncated(Exception):
    pass


class _CheckedReader(gguf.GGUFReader):
    """GGUFReader that says "truncated" when a tensor's bytes run past the end of the file.

    The stock reader fails later with a numpy reshape error; this checks each tensor's extent
    (from its type, shape and offset) before the reader builds its views.
    """

    def _build_tensors(self, start_offs, fields):  # gguf-py internal hook, stable since 0.6
        size = len(self.data)
        for fld in fields:
            _name_len, name_data, _n_dims, dims, raw_dtype, offset_tensor = fld.parts
            block, type_size = gguf.GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_dtype[0]))]
            n_bytes = int(np.prod(dims, dtype=np.int64)) * type_size // block
            end = int(start_offs + offset_tensor[0]) + n_bytes
            if end > size:
                name = bytes(name_data).decode("utf-8", "replace")
                raise _Truncated(f"tensor {name!r} needs bytes up to {end} but the file has {size}")
        return super()._build_tensors(start_offs, fields)


def _check_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise InputFileError(f"{path}: no such file; give the path of a {what}")
    if path.is_dir():
        raise InputFileError(f"{path} is a folder; give the path of a {what} file")


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


def read_gguf(path: Path, *, with_tokens: bool = True) -> GGUFInfo:
    """Parse a GGUF header and check that every tensor's data lies inside the file."""
    path = Path(path)
    check_gguf_magic(path)
    size = path.stat().st_size
    try:
        reader = _CheckedReader(path, "r")
    except _Truncated as e:
        raise ModelFormatError(f"{path} is truncated: {e}; download or convert it again") from None
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError) as e:
        # numpy's view/index errors: a field ran past the end of the file
        if isinstance(e, IndexError) or any(m in str(e) for m in ("out of bounds", "larger dtype")):
            raise ModelFormatError(
                f"{path} is truncated: its header ends early ({size} bytes); download or convert it again"
            ) from None
        raise ModelFormatError(f"{path} is not a valid GGUF file ({e}); download or convert it again") from None

    metadata: dict[str, Any] = {}
    tokens: list[str] = []
    token_types: list[int] = []
    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if name == Keys.Tokenizer.LIST:
            if with_tokens:
                tokens = fld.contents()
            else:
                tokens = [""] * len(fld.data)
            continue
        if name == Keys.Tokenizer.TOKEN_TYPE:
            token_types = fld.contents()
            continue
        if name in (Keys.Tokenizer.SCORES, Keys.Tokenizer.MERGES):
            continue
        metadata[name] = fld.contents()

    tensors = []
    for t in reader.tensors:
        tensors.append(
            TensorSummary(
                name=t.name,
                type=GGMLQuantizationType(t.tensor_type).name,
                shape=tuple(int(d) for d in t.shape),
                n_elements=int(t.n_elements),
                n_bytes=int(t.n_bytes),
            )
        )
    version = int(reader.fields["GGUF.version"].contents())
    arch = metadata.get(Keys.General.ARCHITECTURE)
    return GGUFInfo(path, size, version, arch, metadata, tokens, token_types, tensors)


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
