"""Hugging Face model folder -> GGUF, streamed tensor by tensor.

A small registry maps the HF architecture name to a converter class; the hooks ``set_gguf_parameters``,
``set_vocab`` and ``modify_tensors`` are the only places a family differs (the shape of
llama.cpp's ``conversion/`` after ggml-org/llama.cpp PR #17114). Tensor names come from gguf-py's
``TensorNameMap``; tensors are read memory-mapped and written in row blocks, so memory does not grow
with the model, and the output appears under its final name only when it is complete.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import gguf
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from tiblocal.checkpoint import HFCheckpoint, TensorRef, bf16_to_f32, llama_tensor_problems
from tiblocal.engine import INT32_MAX
from tiblocal.errors import ModelFormatError, TiblocalError
from tiblocal.fsutil import atomic_path, check_output_path
from tiblocal.gguf_file import read_gguf, write_gguf_data
from tiblocal.gguf_vocab import sentencepiece_vocab, write_vocab_gguf
from tiblocal.jsonin import is_finite_number, is_number, loads
from tiblocal.templates import get_template

log = logging.getLogger(__name__)

OUTTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}

# Rows converted at a time: bounds the memory of one conversion step to about this many elements.
_BLOCK_ELEMENTS = 16 * 1024 * 1024


@dataclass(frozen=True)
class OutTensor:
    """A tensor to write: its GGUF name, shape (numpy order) and a reader of row blocks."""

    name: str
    shape: tuple[int, ...]
    rows: Callable[[int, int], np.ndarray]  # (start, stop) -> those rows, in dtype ``stored``
    stored: str  # safetensors dtype of what ``rows`` returns: F32, F16 or BF16 (as uint16)


class ModelConverter:
    """Base class: one subclass per model family, registered by HF architecture name."""

    registry: ClassVar[dict[str, type[ModelConverter]]] = {}
    model_arch: ClassVar[gguf.MODEL_ARCH]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "model_arch" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must set model_arch (a gguf.MODEL_ARCH)")

    @classmethod
    def register(cls, *hf_architectures: str):
        def wrap(sub: type[ModelConverter]) -> type[ModelConverter]:
            for name in hf_architectures:
                cls.registry[name] = sub
            return sub

        return wrap

    @classmethod
    def for_checkpoint(cls, ckpt: HFCheckpoint) -> ModelConverter:
        arch = ckpt.architecture
        if arch not in cls.registry:
            raise ModelFormatError(
                f"{ckpt.path / 'config.json'}: architecture {arch!r} is not supported; "
                f"tiblocal converts {', '.join(sorted(cls.registry))}"
            )
        return cls.registry[arch](ckpt)

    def __init__(self, ckpt: HFCheckpoint) -> None:
        self.ckpt = ckpt
        self.hparams = ckpt.config
        self.arch_name = gguf.MODEL_ARCH_NAMES[self.model_arch]
        self.n_layers = int(self.hparams["num_hidden_layers"])
        self.name_map = gguf.get_tensor_name_map(self.model_arch, self.n_layers)

    # --- hooks ---------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """What makes the checkpoint unusable for this family (missing tensors, shapes against config.json)."""
        return []

    def set_gguf_parameters(self, w: gguf.GGUFWriter) -> None:
        raise NotImplementedError

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        raise NotImplementedError

    def modify_tensors(self, ref: TensorRef, gguf_name: str) -> OutTensor:
        return OutTensor(gguf_name, ref.shape, _row_reader(ref), ref.dtype)

    # --- shared machinery ----------------------------------------------------------------------
    def map_name(self, hf_name: str) -> str:
        new = self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ModelFormatError(
                f"{self.ckpt.path}: tensor {hf_name!r} has no GGUF name for {self.arch_name}; "
                "is this checkpoint of the architecture config.json says?"
            )
        return new

    def out_tensors(self) -> list[OutTensor]:
        out = []
        for ref in self.ckpt.tensors.values():
            if ref.name.endswith(".rotary_emb.inv_freq"):
                continue  # recomputed by llama.cpp from rope_theta
            out.append(self.modify_tensors(ref, self.map_name(ref.name)))
        return out


# generation_config.json field -> the GGUF's suggested sampling (general.sampling.*), which llama.cpp
# and tiblocal use as the defaults of a model that carries them
_SAMPLING_FIELDS = {
    "temperature": "add_sampling_temp",
    "top_k": "add_sampling_top_k",
    "top_p": "add_sampling_top_p",
    "min_p": "add_sampling_min_p",
    "repetition_penalty": "add_sampling_penalty_repeat",
}


_SAMPLING_RANGES = {  # the values tiblocal's Sampling accepts
    "temperature": (lambda v: v >= 0, "a number of at least 0"),
    "top_k": (lambda v: 0 <= v <= INT32_MAX and v == int(v), f"a whole number from 0 to {INT32_MAX}"),
    "top_p": (lambda v: 0 < v <= 1, "a number above 0, at most 1"),
    "min_p": (lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "repetition_penalty": (lambda v: v > 0, "a number above 0"),
}


def _add_sampling(w: gguf.GGUFWriter, model_dir: Path) -> None:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return
    try:
        cfg = loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path} is not valid JSON ({e}); fix or remove it") from None
    if not isinstance(cfg, dict) or not cfg.get("do_sample", False):
        return  # greedy by default: the file suggests no sampling settings
    for field_name, add in _SAMPLING_FIELDS.items():
        value = cfg.get(field_name)
        if is_number(value):
            valid, want = _SAMPLING_RANGES[field_name]
            if not (is_finite_number(value) and valid(value)):
                # copied into the GGUF, it would make the model refuse to run (tiblocal checks the values it samples with)
                raise ModelFormatError(f"{path}: {field_name} {value!r} is not a valid setting (expected {want}); fix "
                                       "or remove it")
            getattr(w, add)(int(value) if field_name == "top_k" else float(value))


def _row_reader(ref: TensorRef) -> Callable[[int, int], np.ndarray]:
    def rows(start: int, stop: int) -> np.ndarray:
        return ref.raw()[start:stop]

    return rows


def _permute_qk(ref: TensorRef, n_head: int) -> Callable[[int, int], np.ndarray]:
    """Reorder q/k rows from HF's rotate-half layout to the interleaved one llama.cpp expects.

    Ported from ggml-org/llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``.
    """

    def rows(start: int, stop: int) -> np.ndarray:
        w = ref.raw()
        out_dim = w.shape[0]
        view = w.reshape(n_head, 2, out_dim // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return view[start:stop]

    return rows


@ModelConverter.register("LlamaForCausalLM", "LLaMAForCausalLM")
class LlamaConverter(ModelConverter):
    model_arch = gguf.MODEL_ARCH.LLAMA

    def problems(self) -> list[str]:
        return llama_tensor_problems(self.ckpt)

    def set_gguf_parameters(self, w: gguf.GGUFWriter) -> None:
        hp = self.hparams
        n_head = int(hp["num_attention_heads"])
        n_embd = int(hp["hidden_size"])
        w.add_context_length(int(hp.get("max_position_embeddings", 4096)))
        w.add_embedding_length(n_embd)
        w.add_block_count(self.n_layers)
        w.add_feed_forward_length(int(hp["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(int(hp.get("num_key_value_heads", n_head)))
        w.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps", 1e-6)))
        head_dim = int(hp.get("head_dim", n_embd // n_head))
        w.add_rope_dimension_count(head_dim)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        rope_theta = hp.get("rope_theta", (hp.get("rope_parameters") or {}).get("rope_theta"))
        if rope_theta is not None:
            w.add_rope_freq_base(float(rope_theta))
        self._set_rope_scaling(w, hp)
        w.add_vocab_size(self.n_vocab)

    @staticmethod
    def _set_rope_scaling(w: gguf.GGUFWriter, hp: dict) -> None:
        """config.json's rope_scaling (or transformers 5's rope_parameters) as llama.cpp's converter writes it
        (conversion/base.py, set_gguf_parameters): linear and yarn with their factor, yarn with its trained context and
        its optional corrections. Older configs say "type" where newer ones say "rope_type"."""
        scaling = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
        kind, factor = scaling.get("rope_type", scaling.get("type")), scaling.get("factor")
        if factor is None or kind not in ("linear", "yarn"):
            return
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(factor))
            return
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        orig = scaling.get("original_max_position_embeddings", hp.get("original_max_position_embeddings"))
        if orig is None:
            raise ModelFormatError(
                f"config.json: rope_scaling is yarn (factor {factor}) without original_max_position_embeddings; "
                "add the context the model was trained on to rope_scaling"
            )
        w.add_rope_scaling_orig_ctx_len(int(orig))
        corrections = {
            "extrapolation_factor": w.add_rope_scaling_yarn_ext_factor,
            "attention_factor": w.add_rope_scaling_yarn_attn_factor,
            "beta_fast": w.add_rope_scaling_yarn_beta_fast,
            "beta_slow": w.add_rope_scaling_yarn_beta_slow,
        }
        values = {**scaling, "attention_factor": scaling.get("attention_factor", scaling.get("attn_factor"))}
        for key, add in corrections.items():
            if values.get(key) is not None:
                add(float(values[key]))

    @property
    def n_vocab(self) -> int:
        emb = self.ckpt.tensors.get("model.embed_tokens.weight")
        return emb.shape[0] if emb is not None else int(self.hparams["vocab_size"])

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        tok = self.ckpt.tokenizer_model
        if tok is None:
            raise ModelFormatError(
                f"{self.ckpt.path} has no tokenizer.model; copy the SentencePiece tokenizer.model the model "
                "was trained with into the folder (transformers 5 does not save it)"
            )
        cfg_vocab = int(self.hparams.get("vocab_size", self.n_vocab))
        if cfg_vocab != self.n_vocab:
            raise ModelFormatError(
                f"{self.ckpt.path / 'config.json'}: vocab_size is {cfg_vocab} but model.embed_tokens.weight has "
                f"{self.n_vocab} rows; set vocab_size to {self.n_vocab}"
            )
        sentencepiece_vocab(tok, n_vocab=self.n_vocab, model_dir=self.ckpt.path).write_to(w)

    def modify_tensors(self, ref: TensorRef, gguf_name: str) -> OutTensor:
        n_head = int(self.hparams["num_attention_heads"])
        n_kv = int(self.hparams.get("num_key_value_heads", n_head))
        if ref.name.endswith("q_proj.weight"):
            return OutTensor(gguf_name, ref.shape, _permute_qk(ref, n_head), ref.dtype)
        if ref.name.endswith("k_proj.weight"):
            return OutTensor(gguf_name, ref.shape, _permute_qk(ref, n_kv), ref.dtype)
        return super().modify_tensors(ref, gguf_name)


def _target_type(t: OutTensor, outtype: GGMLQuantizationType) -> GGMLQuantizationType:
    if len(t.shape) <= 1 or t.name.endswith("_norm.weight"):
        return GGMLQuantizationType.F32  # norms and biases stay f32, as llama.cpp's converter keeps them
    if outtype == GGMLQuantizationType.Q8_0 and t.shape[-1] % 32 != 0:
        return GGMLQuantizationType.F16
    return outtype


_SAME_AS_STORED = {
    GGMLQuantizationType.F32: "F32",
    GGMLQuantizationType.F16: "F16",
    GGMLQuantizationType.BF16: "BF16",
}


def _encode(block: np.ndarray, stored: str, qtype: GGMLQuantizationType) -> np.ndarray:
    """Rows as stored (dtype ``stored``) -> bytes of ``qtype``."""
    if _SAME_AS_STORED.get(qtype) == stored:
        return block
    f32 = bf16_to_f32(block) if stored == "BF16" else np.asarray(block, dtype=np.float32)
    if qtype == GGMLQuantizationType.F32:
        return f32
    if qtype == GGMLQuantizationType.F16:
        return f32.astype(np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(f32), qtype)


def _nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) * size // block


def vocab_size_of(path: Path) -> int:
    return read_gguf(path, with_tokens=False).vocab_size


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    n_tensors: int
    n_vocab: int
    outtype: str
    size: int


def hf_to_gguf(
    model_dir: Path,
    out: Path,
    *,
    outtype: str = "f16",
    vocab_only: bool = False,
    template: str | None = "alpaca",
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ConvertResult:
    """Convert a Hugging Face Llama-family folder to GGUF (``--vocab-only`` writes just the tokenizer)."""
    model_dir, out = Path(model_dir), Path(out)
    if outtype not in OUTTYPES:
        raise TiblocalError(f"unknown --outtype {outtype!r}; expected one of: {', '.join(OUTTYPES)}")
    check_output_path(out, force=force, inputs=[model_dir])
    qtype, ftype = OUTTYPES[outtype]
    chat_template = get_template(template).jinja if template else None
    if vocab_only and not (model_dir / "config.json").is_file():
        write_vocab_gguf(model_dir, out, chat_template)
        return ConvertResult(out, 0, vocab_size_of(out), "vocab", out.stat().st_size)
    ckpt = HFCheckpoint.open(model_dir)
    conv = ModelConverter.for_checkpoint(ckpt)
    if not vocab_only and (problems := conv.problems()):
        raise ModelFormatError(f"{model_dir}: {problems[0]}" + (f" (and {len(problems) - 1} more problems)"
                               if len(problems) > 1 else "") + "; the checkpoint is incomplete: save or download it again")

    tensors = [] if vocab_only else conv.out_tensors()
    with atomic_path(out, replace=force) as tmp:
        w = gguf.GGUFWriter(tmp, conv.arch_name)
        w.add_name(model_dir.name)
        w.add_type("model")
        w.add_file_type(ftype)
        conv.set_gguf_parameters(w)
        conv.set_vocab(w)
        if chat_template:
            w.add_chat_template(chat_template)
        _add_sampling(w, model_dir)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)  # written for every type, as llama.cpp's converter does
        n_params = sum(int(np.prod(t.shape, dtype=np.int64)) for t in tensors)
        if n_params:
            w.add_size_label(gguf.size_label(n_params, 0, 0, 0))
        targets = [_target_type(t, qtype) for t in tensors]
        for t, q in zip(tensors, targets):
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, q), raw_dtype=q)

        def pieces(t, q):  # blocks of rows, encoded as they are read: a tensor is never whole in memory
            n_rows = t.shape[0] if t.shape else 1
            row_elems = max(1, int(np.prod(t.shape[1:], dtype=np.int64)))
            step = max(1, _BLOCK_ELEMENTS // row_elems)
            for start in range(0, n_rows, step):
                yield _encode(np.asarray(t.rows(start, min(n_rows, start + step))), t.stored, q)

        write_gguf_data(w, tmp, ((t.name, pieces(t, q)) for t, q in zip(tensors, targets)), progress=progress)
    return ConvertResult(out, len(tensors), conv.n_vocab, outtype, out.stat().st_size)

