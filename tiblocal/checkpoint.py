"""Hugging Face model folders without torch: config, safetensors shards, tokenizer files.

Safetensors shards are memory-mapped and read one tensor at a time, so converting or merging a 7B
model never holds the whole model in memory. The format is an 8-byte little-endian header length, a
JSON header (dtype, shape, byte range per tensor) and the raw data
(https://github.com/huggingface/safetensors#format).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputFileError, ModelFormatError
from .jsonin import is_finite_number, is_whole, loads

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

    def read(self) -> np.ndarray:
        """The stored values read into memory (not mapped): the memory is released as soon as it is dropped."""
        dtype = _ST_DTYPES[self.dtype]
        return np.fromfile(self.file, dtype=dtype, count=self.n_elements, offset=self.start).reshape(self.shape)

    def read_f32(self) -> np.ndarray:
        """The values as a new, writable float32 array."""
        data = self.read()
        if self.dtype == "BF16":
            return bf16_to_f32(data)
        return data.astype(np.float32, copy=self.dtype != "F32")


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
            header = loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{path} has a damaged safetensors header ({e}); save or download it again") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path} has a damaged safetensors header (a JSON {type(header).__name__}, expected an "
                               "object of tensors); save or download it again")
    base = 8 + n
    refs = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        damaged = f"{path} has a damaged safetensors header: tensor {name!r}"
        if not isinstance(spec, dict):
            raise ModelFormatError(f"{damaged} is {spec!r}, expected {{dtype, shape, data_offsets}}; save or download it again")
        dtype = spec.get("dtype")
        if dtype not in _ST_DTYPES:
            raise ModelFormatError(f"{path}: tensor {name!r} has dtype {dtype!r}, which tiblocal cannot read")
        offsets, shape = spec.get("data_offsets"), spec.get("shape")
        if not (_ints(offsets) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1]):
            raise ModelFormatError(f"{damaged} has data_offsets {offsets!r}, expected [start, end] with 0 <= start "
                                   "<= end; save or download it again")
        if not (_ints(shape) and len(shape) <= 8 and all(d >= 0 for d in shape)):
            raise ModelFormatError(f"{damaged} has shape {shape!r}, expected a list of sizes; save or download it again")
        if math.prod(shape) * np.dtype(_ST_DTYPES[dtype]).itemsize != offsets[1] - offsets[0]:
            raise ModelFormatError(f"{damaged} has shape {shape} of {dtype} but {offsets[1] - offsets[0]} bytes; "
                                   "save or download it again")
        start, end = base + offsets[0], base + offsets[1]
        if end > size:
            raise ModelFormatError(
                f"{path} is truncated: tensor {name!r} needs bytes up to {end} but the file has {size}; "
                "save or download it again"
            )
        refs[name] = TensorRef(path, name, dtype, tuple(shape), start, end)
    return refs


def _ints(value) -> bool:
    return isinstance(value, list) and all(is_whole(v) for v in value)


@dataclass(frozen=True)
class TorchTensorRef:
    """One tensor of a pytorch ``.bin`` file (read through torch, which must be installed)."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    def raw(self) -> np.ndarray:
        import torch

        t = _torch_state(self.file)[self.name]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()

    def read(self) -> np.ndarray:
        return np.array(self.raw())

    def read_f32(self) -> np.ndarray:
        data = self.raw()
        return bf16_to_f32(data) if self.dtype == "BF16" else np.array(data, dtype=np.float32)


_TORCH_CACHE: dict[Path, Any] = {}


def _torch_state(path: Path):
    """The state dict of one .bin file, memory-mapped; only the last file read is kept open."""
    if path not in _TORCH_CACHE:
        import torch

        _TORCH_CACHE.clear()
        try:
            _TORCH_CACHE[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many kinds for a damaged file
            raise ModelFormatError(f"{path} cannot be read by torch ({str(e).splitlines()[0]}); save it again") from None
    return _TORCH_CACHE[path]


def read_torch_bin(path: Path) -> dict[str, TorchTensorRef]:
    """Tensors of a pytorch ``.bin`` checkpoint (needs torch: ``pip install tiblocal[train]``)."""
    try:
        import torch
    except ImportError:
        raise InputFileError(
            f"{path} is a pytorch .bin file and torch is not installed; install torch or re-save the weights as "
            "safetensors (model.save_pretrained(dir, safe_serialization=True))"
        ) from None
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    refs = {}
    for name, t in _torch_state(Path(path)).items():
        if t.dtype not in names:
            raise ModelFormatError(f"{path}: tensor {name!r} has dtype {t.dtype}, which tiblocal cannot read")
        refs[name] = TorchTensorRef(Path(path), name, names[t.dtype], tuple(t.shape))
    return refs


@dataclass
class HFCheckpoint:
    """A Hugging Face model folder: ``config.json``, weight shards and tokenizer files."""

    path: Path
    config: dict[str, Any]
    shards: list[Path]
    tensors: dict[str, TensorRef | TorchTensorRef]

    @classmethod
    def open(cls, path: Path) -> HFCheckpoint:
        path = Path(path)
        if not path.is_dir():
            raise InputFileError(f"{path} is not a folder; give a Hugging Face model folder (config.json + *.safetensors)")
        config = load_config(path)
        shards = find_shards(path)
        tensors: dict[str, TensorRef | TorchTensorRef] = {}
        for shard in shards:
            refs = read_torch_bin(shard) if shard.suffix == ".bin" else read_safetensors_header(shard)
            for name, ref in refs.items():
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

    def iter_shards(self) -> Iterator[tuple[Path, list[TensorRef | TorchTensorRef]]]:
        for shard in self.shards:
            yield shard, [t for t in self.tensors.values() if t.file == shard]


def load_config(path: Path) -> dict[str, Any]:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise InputFileError(f"{path} has no config.json; give a Hugging Face model folder")
    try:
        config = loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{cfg} is not valid JSON ({e}); fix or re-save the model") from None
    if not isinstance(config, dict):
        raise ModelFormatError(f"{cfg} is a JSON {type(config).__name__}; a config.json is an object of settings: "
                               "fix or re-save the model")
    problems = config_problems(config)
    if problems:
        raise ModelFormatError(f"{cfg}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                               + "; fix it or re-save the model")
    return config


# config.json's numbers that tiblocal reads: the kind each must be, when present (Llama-family names)
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "head_dim")
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta")
_LLAMA_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_MAX_DIM = 1 << 24  # far beyond any Llama's size: a value past it is damage, and sizes multiply


def _rope_scaling_problems(config: dict) -> list[str]:
    """The values of rope_scaling (transformers 5: rope_parameters) that convert writes into the GGUF as llama.cpp's
    converter does: a factor of "x" crashed the conversion; an infinite one would be written as such."""
    problems = []
    for key in ("rope_scaling", "rope_parameters"):
        scaling = config.get(key)
        if scaling is None:
            continue
        if not isinstance(scaling, dict):
            problems.append(f"{key} is {scaling!r}, expected an object such as {{\"rope_type\": \"linear\", \"factor\": 4.0}}")
            continue
        for name in ("rope_type", "type"):
            if scaling.get(name) is not None and not isinstance(scaling[name], str):
                problems.append(f"{key}.{name} is {scaling[name]!r}, expected a name such as \"linear\" or \"yarn\"")
        if scaling.get("factor") is not None and not (is_finite_number(scaling["factor"]) and scaling["factor"] > 0):
            problems.append(f"{key}.factor is {scaling['factor']!r}, expected a positive number")
        for name in ("extrapolation_factor", "attention_factor", "attn_factor", "beta_fast", "beta_slow"):
            v = scaling.get(name)
            if v is not None and not is_finite_number(v):
                problems.append(f"{key}.{name} is {v!r}, expected a number")
    for where, scaling in (("", config), ("rope_scaling.", config.get("rope_scaling")),
                           ("rope_parameters.", config.get("rope_parameters"))):
        v = scaling.get("original_max_position_embeddings") if isinstance(scaling, dict) else None
        if v is not None and not (is_whole(v) and 0 < v <= _MAX_DIM):
            problems.append(f"{where}original_max_position_embeddings is {v!r}, expected a whole number from 1 to "
                            f"{_MAX_DIM}")
    return problems


def config_problems(config: dict) -> list[str]:
    """What is wrong with config.json's values that tiblocal reads (types, ranges, the Llama family's required sizes
    and the rules between them)."""
    problems = []
    for key in _POSITIVE_INTS:
        v = config.get(key)
        if key in config and v is not None and not (is_whole(v) and 0 < v <= _MAX_DIM):
            problems.append(f"{key} is {v!r}, expected a whole number from 1 to {_MAX_DIM}")
    for key in _POSITIVE_FLOATS:
        v = config.get(key)
        if key in config and v is not None and not (
                is_finite_number(v) and v > 0):
            problems.append(f"{key} is {v!r}, expected a positive number")
    problems += _rope_scaling_problems(config)
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        problems.append(f"architectures is {archs!r}, expected a list of names, e.g. [\"LlamaForCausalLM\"]")
    elif archs and archs[0] in ("LlamaForCausalLM", "LLaMAForCausalLM"):
        problems += [f"{k} is missing (the Llama family needs it)" for k in _LLAMA_REQUIRED if config.get(k) is None]
    if not problems:
        heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
        if heads and kv and heads % kv:
            problems.append(f"num_key_value_heads {kv} does not divide num_attention_heads {heads}")
        hidden = config.get("hidden_size")
        if heads and hidden and "head_dim" not in config and hidden % heads:
            problems.append(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    for key in ("tie_word_embeddings",):
        if key in config and not isinstance(config[key], bool):
            problems.append(f"{key} is {config[key]!r}, expected true or false")
    return problems


def llama_tensor_problems(ckpt: HFCheckpoint) -> list[str]:
    """The tensors a Llama model needs that the checkpoint lacks or has in another shape (config.json's sizes)."""
    c = ckpt.config
    hidden, ffn, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    kv = (c.get("num_key_value_heads") or heads) * head_dim
    rows = ckpt.tensors.get("model.embed_tokens.weight")
    vocab = rows.shape[0] if rows is not None and len(rows.shape) == 2 else vocab  # check reports a vocab_size mismatch
    need = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    # lm_head may be absent: llama.cpp then uses the embedding as the output, as with tied embeddings
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        need |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                 p + "self_attn.q_proj.weight": (heads * head_dim, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                 p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                 p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                 p + "mlp.down_proj.weight": (hidden, ffn)}
    missing = [n for n in need if n not in ckpt.tensors]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) the model needs are missing: {', '.join(missing[:3])}"
                        + (", ..." if len(missing) > 3 else ""))
    if "lm_head.weight" in ckpt.tensors:
        need["lm_head.weight"] = (vocab, hidden)
    for name, shape in need.items():
        ref = ckpt.tensors.get(name)
        if ref is not None and tuple(ref.shape) != shape:
            problems.append(f"tensor {name} has shape {list(ref.shape)}, config.json's sizes make it {list(shape)}")
    return problems


def find_shards(path: Path) -> list[Path]:
    """Weight shards in index order: safetensors, else pytorch .bin (read through torch)."""
    path = Path(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if not index.is_file():
            continue
        try:
            weight_map = loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{index} is not a valid weight index ({e})") from None
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise InputFileError(f"{path} is missing shards listed in {index.name}: {', '.join(missing)}")
        return [path / n for n in names]
    shards = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if shards:
        return shards
    raise InputFileError(f"{path} has no weights (no *.safetensors or pytorch_model*.bin); give a Hugging Face model folder")


# numpy dtype of the values handed to the writer -> safetensors dtype name (BF16 is passed as uint16)
_WRITE_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (round to nearest even), returned as uint16 bit patterns."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def encode_as(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the stored form of ``dtype`` (F32, F16 or BF16)."""
    if dtype == "BF16":
        return f32_to_bf16(x)
    return np.ascontiguousarray(x, dtype=_WRITE_DTYPES[dtype])


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor: the header (all names, dtypes, shapes) first.

    Memory stays at one tensor: callers ``write(name, data)`` in the order given to the constructor.
    """

    def __init__(self, path: Path, specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._specs = specs
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, dtype, shape in specs:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_WRITE_DTYPES[dtype]).itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # align the data start to 8 bytes
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, data: np.ndarray) -> None:
        exp_name, dtype, shape = self._specs[self._next]
        if name != exp_name or tuple(data.shape) != tuple(shape) or data.dtype != _WRITE_DTYPES[dtype]:
            raise AssertionError(f"writer expected {exp_name} {dtype} {shape}, got {name} {data.dtype} {data.shape}")
        np.ascontiguousarray(data).tofile(self._f)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._specs):
            self._f.close()
            raise AssertionError(f"{self.path}: wrote {self._next} of {len(self._specs)} tensors")
        self._f.close()
