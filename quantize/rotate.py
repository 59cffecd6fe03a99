"""Rotate a Llama GGUF's hidden basis before quantizing, so llama.cpp's 8-bit kernels lose less (QuaRot, SpinQuant).

llama.cpp's Q8_0 (and k-quant) matrix products round each activation row to 8 bits in blocks of 32 as well as the
weights, and a few large channels of the residual stream (scaled further by the RMSNorm weights) set the scale of
their whole block. An orthogonal change of basis spreads them out and leaves the model's function unchanged:

    residual h' = Qᵀh           token_embd' = E·Q          attn_q/k/v', ffn_gate/up' = W·diag(g)·Q
    attn_output', ffn_down' = Qᵀ·W                          output' = W_out·diag(g_out)·Q
    every RMSNorm weight g becomes 1 (RMSNorm commutes with an orthogonal Q once its weight is folded out)

and per attention head the values and the output projection's columns turn by one more orthogonal matrix H
(``attn_v' = Hᵀ·W_v``, ``attn_output' = W_o·H``), so the input of ``attn_output`` is spread too. The only input left
as it was is ``ffn_down``'s (SiLU(gate)·up cannot be turned without an online transform llama.cpp does not have).
Everything else is a standard llama GGUF: llama.cpp, Ollama and every runtime load it unchanged.

A tied embedding cannot stay tied (the output side carries the final norm's weight), so the output matrix is
written as its own tensor: a tied model grows by one vocabulary × hidden matrix.

This module is the rotation itself (the matrices, and a GGUF written in the turned basis); quantizing a rotated
model, with the search over seeds of --rotate-trials, is ``rotated_quant.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from tiblocal.errors import TiblocalError
from tiblocal.fsutil import atomic_path, check_output_path
from tiblocal.gguf_file import ROTATION_KEY, copy_metadata, write_gguf_data
from tiblocal.gguf_keys import QUANTIZE_IMATRIX_PREFIX

_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
_BLK = re.compile(r"blk\.(\d+)\.(.+)")
# per-block tensors and what the rotation does to them: "in" (columns · diag(norm) · Q), "out" (Qᵀ · rows),
# "norm" (becomes 1), "keep" (unchanged: outputs that feed RoPE and attention scores)
_BLOCK_ROLES = {
    "attn_norm.weight": "norm", "ffn_norm.weight": "norm",
    "attn_q.weight": "in", "attn_k.weight": "in", "attn_v.weight": "in", "ffn_gate.weight": "in", "ffn_up.weight": "in",
    "attn_output.weight": "out", "ffn_down.weight": "out", "attn_output.bias": "out", "ffn_down.bias": "out",
    "attn_q.bias": "keep", "attn_k.bias": "keep", "attn_v.bias": "keep", "ffn_gate.bias": "keep", "ffn_up.bias": "keep",
}
_NORM_OF = {"attn_q.weight": "attn_norm", "attn_k.weight": "attn_norm", "attn_v.weight": "attn_norm",
            "ffn_gate.weight": "ffn_norm", "ffn_up.weight": "ffn_norm"}
_GLOBAL = ("token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight")


# A rotation's seed goes into the GGUF's tiblocal.rotation.seed array, which gguf writes as INT32 for Python ints, and
# into numpy's generator, which takes no negative seed.
SEED_MAX = 2**31 - 1


def check_seed(seed: int, flag: str = "--rotate") -> None:
    if not 0 <= seed <= SEED_MAX:
        raise TiblocalError(f"{flag} {seed}: a rotation's seed is 0 to {SEED_MAX} (the GGUF stores it as a 32-bit "
                            "integer); give a seed in that range")


def orthogonal(n: int, seed: int) -> np.ndarray:
    """A random orthogonal n×n matrix (Haar-distributed: QR of a Gaussian matrix with R's signs folded in)."""
    a = np.random.default_rng(seed).standard_normal((n, n))
    q, r = np.linalg.qr(a)
    return q * np.sign(np.diag(r))[None, :]


class Rotation:
    """Q = Q1 ⊗ Q2 for hidden size n = a·b (a the largest divisor of n up to √n), each factor random orthogonal.

    Every entry of the product is non-zero, so one large channel spreads over all n, as with a dense Q; applying
    it costs 2·rows·n·(a+b) instead of 2·rows·n² (QuaRot's Hadamard matrices are Kronecker products too): a
    7B model's rotation is then bound by reading and writing its file, not by the matrix products."""

    def __init__(self, n: int, seed: int) -> None:
        check_seed(seed)
        a = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
        self.n, self.a, self.b = n, a, n // a
        self.q1 = orthogonal(self.a, seed).astype(np.float32)
        self.q2 = orthogonal(self.b, seed + 1_000_003).astype(np.float32)

    def dense(self) -> np.ndarray:
        return np.kron(self.q1, self.q2)

    def right(self, w: np.ndarray) -> np.ndarray:
        """w · Q for w of shape (rows, n)."""
        t = np.matmul(w.reshape(-1, self.a, self.b), self.q2)
        return np.matmul(self.q1.T, t).reshape(w.shape)

    def left_t(self, w: np.ndarray) -> np.ndarray:
        """Qᵀ · w for w of shape (n, cols)."""
        cols = w.shape[1]
        t = np.matmul(self.q2.T, w.reshape(self.a, self.b, cols))
        return (self.q1.T @ t.reshape(self.a, self.b * cols)).reshape(w.shape)


def head_rotation(n: int, seed: int) -> np.ndarray:
    """The per-head matrix: a normalised Walsh–Hadamard matrix where n is a power of two, else a random orthogonal one."""
    if n & (n - 1):
        return orthogonal(n, seed + 1)
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


@dataclass(frozen=True)
class RotateResult:
    path: Path
    seed: int
    untied: bool
    size: int


def rotate_gguf(
    inp: Path, out: Path, *, seed: int = 0, force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> RotateResult:
    """Write ``out``: ``inp`` (an f32/f16/bf16 llama GGUF) in a rotated basis, the same model in exact arithmetic.

    Matrices are written as F16 when the input's are all F16, else as F32 (a bf16 input's rotated values are not
    bf16 numbers, and f16 could overflow where bf16 did not)."""
    inp, out = Path(inp), Path(out)
    check_output_path(out, force=force, inputs=[inp])
    try:
        reader = gguf.GGUFReader(inp)
    except (ValueError, OSError) as e:
        raise TiblocalError(f"{inp} is not a readable GGUF file ({e}); give the f16 or f32 GGUF that convert wrote") from None
    meta = {f.name: f for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    arch = meta["general.architecture"].contents() if "general.architecture" in meta else None
    if arch != "llama":
        raise TiblocalError(f"{inp} is a {arch!r} model; --rotate knows the llama architecture's tensors only")
    tensors = {t.name: t for t in reader.tensors}
    quantized = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in _FLOAT_TYPES})
    if quantized:
        raise TiblocalError(f"{inp} holds quantized tensors ({', '.join(quantized)}); a rotation must start from "
                            "the f16 or f32 GGUF (tiblocal convert HF_DIR --outtype f16) and quantize afterwards")
    for name in tensors:
        m = _BLK.fullmatch(name)
        if (m is None and name not in _GLOBAL) or (m is not None and m.group(2) not in _BLOCK_ROLES):
            raise TiblocalError(f"{inp}: tensor {name} is not one --rotate knows how to turn (llama's attention, "
                                "feed-forward, norms and embeddings); quantize this model without --rotate")
    missing = [k for k in ("llama.block_count", "llama.attention.head_count") if k not in meta]
    missing += [t for t in ("token_embd.weight", "output_norm.weight") if t not in tensors]
    if missing:
        raise TiblocalError(f"{inp}: {', '.join(missing)} missing; --rotate needs a complete llama GGUF (tiblocal convert)")
    n_layer = int(meta["llama.block_count"].contents())
    n_head = int(meta["llama.attention.head_count"].contents())
    n_kv = int(meta["llama.attention.head_count_kv"].contents()) if "llama.attention.head_count_kv" in meta else n_head
    emb = tensors["token_embd.weight"]
    n_embd, n_vocab = int(emb.shape[0]), int(emb.shape[1])
    head_dim = (int(meta["llama.attention.value_length"].contents()) if "llama.attention.value_length" in meta
                else n_embd // n_head)
    for i in range(n_layer):
        for need in ("attn_norm.weight", "ffn_norm.weight"):
            if f"blk.{i}.{need}" not in tensors:
                raise TiblocalError(f"{inp}: blk.{i}.{need} is missing; --rotate needs every RMSNorm weight")
    all_f16 = all(t.tensor_type == GGMLQuantizationType.F16 for t in reader.tensors if len(t.shape) == 2)
    mtype = GGMLQuantizationType.F16 if all_f16 else GGMLQuantizationType.F32

    q = Rotation(n_embd, seed)
    h = head_rotation(head_dim, seed).astype(np.float32)

    def load(name: str) -> np.ndarray:
        t = tensors[name]
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(a, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])

    def per_head_rows(w: np.ndarray, n: int) -> np.ndarray:  # rows grouped by head: each group ← Hᵀ · group
        return np.matmul(h.T, w.reshape(n, head_dim, -1)).reshape(w.shape)

    def build(name: str) -> np.ndarray:
        if name == "token_embd.weight":
            return q.right(load(name))
        if name == "output.weight":
            src = tensors.get("output.weight", emb)
            return q.right(load(src.name) * load("output_norm.weight")[None, :])
        if name == "output_norm.weight":
            return np.ones(n_embd, dtype=np.float32)
        if name == "rope_freqs.weight":
            return load(name)
        i, part = _BLK.fullmatch(name).groups()
        role = _BLOCK_ROLES[part]
        if role == "norm":
            return np.ones(n_embd, dtype=np.float32)
        if role == "keep":
            w = load(name)
            return per_head_rows(w, n_kv) if part == "attn_v.bias" else w
        if role == "out":
            w = load(name)
            w = q.left_t(w.reshape(n_embd, -1)).reshape(w.shape)  # a bias is one column
            if part == "attn_output.weight":  # columns by head: each group ← group · H
                w = (w.reshape(n_embd, n_head, head_dim) @ h).reshape(n_embd, n_head * head_dim)
            return w
        w = q.right(load(name) * load(f"blk.{i}.{_NORM_OF[part]}.weight")[None, :])
        return per_head_rows(w, n_kv) if part == "attn_v.weight" else w

    names = list(tensors)
    untied = "output.weight" not in tensors
    if untied:
        names.insert(names.index("token_embd.weight") + 1, "output.weight")

    def shape_of(name: str) -> tuple[int, ...]:  # numpy order
        if name == "output.weight" and untied:
            return (n_vocab, n_embd)
        return tuple(int(x) for x in reversed(tensors[name].shape))

    def type_of(name: str) -> GGMLQuantizationType:
        return mtype if len(shape_of(name)) == 2 else GGMLQuantizationType.F32

    def nbytes(name: str) -> int:
        return int(np.prod(shape_of(name))) * (2 if type_of(name) == GGMLQuantizationType.F16 else 4)

    with atomic_path(out, replace=force) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        if "general.alignment" in meta:
            w.data_alignment = int(meta["general.alignment"].contents())
        seeds = list(meta[ROTATION_KEY].contents()) if ROTATION_KEY in meta else []
        # (a matrix named in an f16 file, e.g. a dequantized copy, says nothing of the rotated one)
        copy_metadata(reader, w, skip=lambda key: key == ROTATION_KEY or key.startswith(QUANTIZE_IMATRIX_PREFIX),
                      values={"general.file_type": int(LlamaFileType.MOSTLY_F16 if all_f16 else LlamaFileType.ALL_F32)})
        w.add_array(ROTATION_KEY, [*seeds, seed])
        for name in names:
            t = type_of(name)
            w.add_tensor_info(name, shape_of(name), np.dtype(np.float32), nbytes(name), raw_dtype=t)

        def data(name: str) -> np.ndarray:
            a = build(name)
            if type_of(name) == GGMLQuantizationType.F16:
                a16 = a.astype(np.float16)
                if not np.isfinite(a16).all():
                    raise TiblocalError(f"{inp}: {name} overflows f16 once rotated; rotate the f32 GGUF instead "
                                        "(tiblocal convert HF_DIR --outtype f32)")
                a = a16
            return a

        write_gguf_data(w, tmp, ((name, [data(name)]) for name in names), progress=progress)
    return RotateResult(out, seed, untied, out.stat().st_size)
