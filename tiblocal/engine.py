"""The llama.cpp engine: load a GGUF, tokenize, and stream sampled text.

Built directly on llama-cpp-python's low-level bindings (the C API), so a generated token costs one
``llama_decode`` and one sampler call, nothing more: the same loop a raw llama.cpp program runs.
The KV cache is kept between calls and reused for the longest common prefix, so each chat turn only
evaluates the new tokens.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, Keys

from . import bindings
from .errors import EngineError, PromptTooLongError, TiblocalError
from .gguf_file import GGUFInfo, check_supported_architecture, read_gguf
from .jsonin import is_finite_number, is_number, is_whole
from .text import CompletionText, Utf8Stream

log = logging.getLogger(__name__)


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def as_float32(value: float) -> float:
    """``value`` as llama.cpp receives it in a C ``float``: ctypes rounds it to 32 bits without a word, to inf past
    ±3.4e38 and to 0 below 1.4e-45 (so 1e308 and 1e-320 would pass a check made on the Python float)."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _check_long_context(config: EngineConfig) -> None:
    problems = []
    if config.rope_scaling is not None and config.rope_scaling not in ROPE_SCALING:
        problems.append(f"--rope-scaling {config.rope_scaling!r} (expected one of {', '.join(ROPE_SCALING)})")
    for name, value in (("--rope-scale", config.rope_scale), ("--rope-freq-base", config.rope_freq_base)):
        if value is None:
            continue
        if not (math.isfinite(value) and value > 0):
            problems.append(f"{name} {value} (expected a positive number)")
            continue
        # what llama.cpp is given: rope_freq_scale is the scale's inverse; 0 there would mean "the model's own"
        given, what = (1.0 / value, "its inverse") if name == "--rope-scale" else (value, "it")
        if not (math.isfinite(as_float32(given)) and as_float32(given) > 0):
            problems.append(f"{name} {value} (out of range: llama.cpp takes {what} as a 32-bit float, where it is "
                            f"{as_float32(given):g}; expected about 1e-38 to 1e38)")
    if config.yarn_orig_ctx is not None and not 1 <= config.yarn_orig_ctx <= UINT32_MAX:
        problems.append(f"--yarn-orig-ctx {config.yarn_orig_ctx} (expected the trained context, in tokens: 1 to "
                        f"{UINT32_MAX})")
    for name, value in (("--cache-type-k", config.cache_type_k), ("--cache-type-v", config.cache_type_v)):
        if value not in CACHE_TYPES:
            problems.append(f"{name} {value!r} (expected one of {', '.join(CACHE_TYPES)})")
    if config.cache_type_v != "f16" and config.flash_attn == "off":
        problems.append(f"--cache-type-v {config.cache_type_v} with --flash-attn off (llama.cpp quantizes the V cache "
                        "only with flash attention: drop --flash-attn off)")
    if problems:
        raise TiblocalError("invalid context setting: " + "; ".join(problems))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens ``a`` and ``b`` share from their start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def put_token(batch, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
    """Entry ``i`` of a ``llama_batch``: ``token`` at position ``pos`` of sequence ``seq``, with its logits or not."""
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq
    batch.logits[i] = logits


def check_threads(threads: int | None) -> None:
    """Refuse a negative --threads (checked before long work that would give it to llama.cpp later)."""
    if threads is not None and threads < 0:
        raise TiblocalError(f"--threads {threads} is negative; give a number of threads (0 or none: every core)")


def resolve_threads(threads: int | None) -> int:
    """The thread count to give llama.cpp: every core for None or 0, at most the cores this process may use (llama.cpp
    crashes on 100,000), and a negative count refused."""
    cores = default_threads()
    if threads is None or threads == 0:
        return cores
    check_threads(threads)
    if threads > cores:
        log.warning("--threads %d is more than the %d cores this process may use; using %d", threads, cores, cores)
        return cores
    return threads


def kv_cache_bytes(info: GGUFInfo, n_tokens: int, type_k: str = "f16", type_v: str = "f16") -> int | None:
    """Bytes of llama.cpp's KV cache for ``n_tokens`` of this model (keys and values of every layer, in the given
    types); None when its header does not give the shapes."""
    m, arch = info.metadata, info.architecture
    try:
        layers = int(m[Keys.LLM.BLOCK_COUNT.format(arch=arch)])
        heads = int(m[Keys.Attention.HEAD_COUNT.format(arch=arch)])
        kv_heads = int(m.get(Keys.Attention.HEAD_COUNT_KV.format(arch=arch), heads))
        head_dim = int(m.get(Keys.Attention.KEY_LENGTH.format(arch=arch),
                             int(m[Keys.LLM.EMBEDDING_LENGTH.format(arch=arch)]) // max(heads, 1)))
    except (KeyError, TypeError, ValueError):
        return None
    per_element = 0.0
    for t in (type_k, type_v):
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t.upper()]]
        per_element += size / block
    return int(layers * kv_heads * head_dim * n_tokens * per_element)


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this platform
        return None


FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # llama.h's enum llama_flash_attn_type (AUTO, DISABLED, ENABLED)
ROPE_SCALING = ("none", "linear", "yarn")  # llama.h's enum llama_rope_scaling_type, in its order from 0
CACHE_TYPES = ("f16", "q8_0", "q4_0")
DEFAULT_CTX = 2048  # the context when none is given, unless the model was trained on a shorter one
SAMPLER_PREFIX_END = 1e30  # the top-n-sigma that ends a chain's graph-side prefix (Engine.sampler, device=True)


@dataclass(frozen=True)
class EngineConfig:
    threads: int | None = None  # None: every core this process may use
    # tokens of each sequence (llama.cpp rounds it up to a multiple of 256); None: 2048, or the context the model was
    # trained on where that is shorter (the command line's default)
    ctx: int | None = 2048
    n_gpu_layers: int = 0  # -1: all layers
    batch: int = 512
    verbose: bool = False  # show llama.cpp's own log on stderr
    parallel: int = 1  # sequences sharing the context, each with its own `ctx` tokens of KV cache (tiblocal serve)
    flash_attn: str = "auto"  # auto | on | off: llama.cpp's flash attention
    # Long contexts, as llama.cpp's --rope-scaling, --rope-scale, --rope-freq-base, --yarn-orig-ctx (None: the model's)
    rope_scaling: str | None = None  # none | linear | yarn
    rope_scale: float | None = None  # the context is extended this many times (llama.cpp's rope_freq_scale = 1/it)
    rope_freq_base: float | None = None
    yarn_orig_ctx: int | None = None  # the context the model was trained on, for yarn
    cache_type_k: str = "f16"  # f16 | q8_0 | q4_0: the KV cache's types (a quantized V needs flash attention)
    cache_type_v: str = "f16"
    # The first cut of sampling (top-k over the whole vocabulary) inside llama.cpp's graph, on the device that holds
    # the output layer: llama.cpp's --backend-sampling. Only the cut's candidates come back to the CPU.
    backend_sampling: bool = False


# llama_sampler_init_dist takes a uint32_t seed, top-k and the penalties' window are int32_t: ctypes would wrap a
# larger value silently (top_k 2**32 + 1 would sample greedily); so would it yarn_orig_ctx, a uint32_t
UINT32_MAX = 2**32 - 1
SEED_MAX = UINT32_MAX
INT32_MAX = 2**31 - 1


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false"}


def _of_type(value: object, kind: str) -> bool:
    """``value`` fits a Sampling field of type ``kind`` ("int", "float", "bool"); a bool is no number here."""
    if kind == "bool":
        return isinstance(value, (bool, np.bool_))
    return is_whole(value) if kind == "int" else is_number(value)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; temperature, top-k, top-p and repetition penalty default to the values of
    Chinese-Alpaca's and Tibetan-Alpaca's inference scripts."""

    temperature: float = 0.2
    top_k: int = 40
    top_p: float = 0.9
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    max_tokens: int = 512
    seed: int = -1  # -1: a new random seed for each generation
    # OpenAI's penalties, as llama.cpp applies them: over the last `repeat_last_n` tokens, subtracted from the logits
    # (count * frequency_penalty + presence_penalty)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False  # never end at the end-of-generation tokens (speed measured over a fixed length)

    # Names accepted by the chat's `/set NAME VALUE`, mapped to fields.
    ALIASES = {
        "temp": "temperature",
        "temperature": "temperature",
        "top_k": "top_k",
        "top-k": "top_k",
        "top_p": "top_p",
        "top-p": "top_p",
        "repeat": "repeat_penalty",
        "repeat_penalty": "repeat_penalty",
        "repeat-penalty": "repeat_penalty",
        "repeat_last_n": "repeat_last_n",
        "max_tokens": "max_tokens",
        "max-tokens": "max_tokens",
        "seed": "seed",
    }

    def __post_init__(self) -> None:
        # the types first: a /load-ed file or a caller may give "5", 1.5 or true where a number goes ('<=' between
        # int and str ended the chat with a crash report; ctypes refuses a float seed only when sampling starts)
        wrong = [f"{f.name} {getattr(self, f.name)!r} (expected {_EXPECTED[f.type]})"
                 for f in fields(self) if not _of_type(getattr(self, f.name), f.type)]
        if wrong:
            raise TiblocalError("invalid sampling setting: " + "; ".join(wrong))
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type != "float":
                continue
            if not is_finite_number(value):
                shown = f"of {len(str(abs(value)))} digits" if is_whole(value) else value
                problems.append(f"{f.name} {shown} (expected a finite number)")
            elif not math.isfinite(as_float32(value)):  # llama.cpp's samplers take C floats
                problems.append(f"{f.name} {value} (expected a finite number; llama.cpp takes it as a 32-bit float, "
                                "at most 3.4e38 either way)")
        if problems:
            raise TiblocalError("invalid sampling setting: " + "; ".join(problems))

        def as_zero(value: float) -> str:  # a positive value that reaches llama.cpp as 0 says so
            return "; it is 0 as the 32-bit float llama.cpp takes" if value and not as_float32(value) else ""

        if self.temperature < 0:
            problems.append(f"temperature {self.temperature} (expected >= 0; 0 is greedy)")
        if not 0 <= self.top_k <= INT32_MAX:
            problems.append(f"top_k {self.top_k} (expected 0 to {INT32_MAX}; 0 disables it)")
        if not 0 < as_float32(self.top_p) <= 1:
            problems.append(f"top_p {self.top_p} (expected 0 < top_p <= 1{as_zero(self.top_p)})")
        if as_float32(self.repeat_penalty) <= 0:  # llama.cpp divides by it
            problems.append(
                f"repeat_penalty {self.repeat_penalty} (expected > 0; 1 disables it{as_zero(self.repeat_penalty)})")
        if not 0 <= self.repeat_last_n <= INT32_MAX:
            problems.append(f"repeat_last_n {self.repeat_last_n} (expected 0 to {INT32_MAX})")
        if self.max_tokens < 1:
            problems.append(f"max_tokens {self.max_tokens} (expected >= 1)")
        if not -1 <= self.seed <= SEED_MAX:
            problems.append(f"seed {self.seed} (expected 0 to {SEED_MAX}, or -1 for a new one each time)")
        if problems:
            raise TiblocalError("invalid sampling setting: " + "; ".join(problems))

    # general.sampling.* keys of a GGUF (the model's suggested settings) -> fields
    GGUF_KEYS = {
        Keys.General.SAMPLING_TEMP: "temperature",
        Keys.General.SAMPLING_TOP_K: "top_k",
        Keys.General.SAMPLING_TOP_P: "top_p",
        Keys.General.SAMPLING_PENALTY_REPEAT: "repeat_penalty",
        Keys.General.SAMPLING_PENALTY_LAST_N: "repeat_last_n",
    }

    @classmethod
    def for_metadata(cls, meta: dict, **given) -> Sampling:
        """``given`` over the suggested settings in a GGUF's metadata (general.sampling.*) over the defaults."""
        suggested = {}
        for key, name in cls.GGUF_KEYS.items():
            if key in meta and isinstance(meta[key], (int, float)):
                value = meta[key]  # stored as float32: 0.9 reads 0.8999999761
                suggested[name] = int(value) if _FIELD_TYPES[name] is int else round(float(value), 6)
        return cls(**{**suggested, **given})

    @classmethod
    def for_model(cls, model: Path | None, **given) -> Sampling:
        """Settings for ``model`` (None: the bundled one), reading its header; a model that cannot be read gives
        the defaults (loading it reports the problem). An open Engine has the metadata: use for_metadata."""
        from .models import resolve_model

        try:
            meta = read_gguf(resolve_model(model), with_tokens=False).metadata
        except TiblocalError:
            meta = {}
        return cls.for_metadata(meta, **given)

    def with_value(self, name: str, value: str) -> Sampling:
        """A copy with one setting changed from text, as typed in `/set temp 0.3`."""
        key = self.ALIASES.get(name.lower())
        if key is None:
            raise TiblocalError(
                f"unknown setting {name!r}; expected one of: temp, top_k, top_p, repeat, repeat_last_n, max_tokens, seed"
            )
        kind = _FIELD_TYPES[key]
        try:
            parsed = kind(value)
        except ValueError:
            raise TiblocalError(f"{key} must be {'an integer' if kind is int else 'a number'}, not {value!r}") from None
        return replace(self, **{key: parsed})


_FIELD_TYPES = {f.name: {"int": int, "float": float, "bool": bool}[f.type] for f in fields(Sampling)}


@dataclass
class Generation:
    """What one generation produced, with its timings."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens found in the KV cache and not evaluated again
    prompt_ms: float = 0.0  # evaluating the prompt
    first_token_ms: float = 0.0  # from the start of the call to the first sampled token
    gen_ms: float = 0.0  # sampling and evaluating the completion
    stop_reason: str = ""  # eos | stop | length | context | interrupted
    tokens: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / (self.gen_ms / 1000) if self.gen_ms > 0 else 0.0


_llama_cpp = None


def _bindings(verbose: bool = False):
    """llama.cpp's C API (tiblocal.bindings), with llama.cpp's own log silenced unless ``verbose``."""
    global _llama_cpp
    _llama_cpp = bindings.load(verbose)
    return _llama_cpp


def gpu_offload_supported() -> bool:
    return bool(_bindings().llama_supports_gpu_offload())


def check_gpu_offload(n_gpu_layers: int, lib=None) -> None:
    """Refuse GPU layers where the bindings have no GPU backend (llama.cpp would run on the CPU without a word)."""
    if n_gpu_layers != 0 and not (lib or _bindings()).llama_supports_gpu_offload():
        raise EngineError(
            f"--n-gpu-layers {n_gpu_layers} asks for GPU offload, but this llama-cpp-python build has no "
            'GPU backend; reinstall it with CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall '
            "--no-cache-dir llama-cpp-python, or drop --n-gpu-layers"
        )


def gpu_layers(n_gpu_layers: int) -> int:
    """llama.cpp's n_gpu_layers (an int32_t) for --n-gpu-layers: any negative count, or more layers than int32 holds,
    means every layer (ctypes would wrap 2**32 + 5 to 5 layers, and 2**31 to a negative count, without a word)."""
    return INT32_MAX if n_gpu_layers < 0 else min(n_gpu_layers, INT32_MAX)


def _tokenize(vocab, text: str, add_bos: bool, special: bool) -> list[int]:
    lib = _llama_cpp
    data = text.encode("utf-8")
    cap = len(data) + 8  # SentencePiece never gives more tokens than bytes (+ BOS/EOS)
    buf = (lib.llama_token * cap)()
    n = lib.llama_tokenize(vocab, data, len(data), buf, cap, add_bos, special)
    if n < 0:  # pragma: no cover
        cap = -n
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(vocab, data, len(data), buf, cap, add_bos, special)
    return list(buf[:n])


class LlamaVocab:
    """llama.cpp's tokenizer alone, from any GGUF (a vocab-only one too): no weights are loaded."""

    def __init__(self, path: Path) -> None:
        lib = _bindings()
        params = lib.llama_model_default_params()
        params.vocab_only = True
        self._model = lib.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not self._model:
            raise EngineError(f"llama.cpp could not load the vocabulary of {path}")
        self._vocab = lib.llama_model_get_vocab(self._model)

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return _tokenize(self._vocab, text, add_bos, special)

    def close(self) -> None:
        if self._model:
            _llama_cpp.llama_model_free(self._model)
            self._model = None


class Engine:
    """One loaded GGUF model with one context (one conversation's KV cache)."""

    def __init__(self, path: Path, config: EngineConfig = EngineConfig()) -> None:
        path = Path(path)
        self.path = path
        self.config = config
        self.info: GGUFInfo = read_gguf(path, with_tokens=False)
        check_supported_architecture(self.info)
        if config.ctx is None:
            trained = self.info.metadata.get(f"{self.info.architecture}.context_length")
            config = replace(config, ctx=min(DEFAULT_CTX, trained) if isinstance(trained, int) and trained > 0
                             else DEFAULT_CTX)
            self.config = config
        lib = _bindings(config.verbose)
        check_gpu_offload(config.n_gpu_layers, lib)
        if config.ctx < 16:
            raise TiblocalError(f"--ctx {config.ctx} is too small; expected at least 16 tokens")
        if not 1 <= config.parallel <= 256:  # LLAMA_MAX_SEQ
            raise TiblocalError(f"--parallel {config.parallel} is out of range; expected 1 to 256 sequences")
        if config.flash_attn not in FLASH_ATTN:
            raise TiblocalError(f"--flash-attn {config.flash_attn!r}: expected one of {', '.join(FLASH_ATTN)}")
        _check_long_context(config)
        self._check_cache_fits(config)
        self.threads = resolve_threads(config.threads)

        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = gpu_layers(config.n_gpu_layers)
        self._model = lib.llama_model_load_from_file(str(path).encode("utf-8"), mparams)
        if not self._model:
            raise EngineError(
                f"llama.cpp could not load {path} (damaged file, or a GGUF this llama.cpp does not support); "
                "run `tiblocal inspect` on it, or convert it again (--verbose shows llama.cpp's log)"
            )
        self._vocab = lib.llama_model_get_vocab(self._model)
        n_ctx_train = lib.llama_model_n_ctx_train(self._model)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = config.ctx * config.parallel
        cparams.n_seq_max = config.parallel
        cparams.kv_unified = False  # each sequence attends over its own cache: `ctx` tokens each
        cparams.n_batch = min(config.batch, config.ctx)
        cparams.n_ubatch = min(config.batch, config.ctx)
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.flash_attn_type = FLASH_ATTN[config.flash_attn]
        if config.rope_scaling is not None:
            cparams.rope_scaling_type = ROPE_SCALING.index(config.rope_scaling)
        if config.rope_scale is not None:
            cparams.rope_freq_scale = 1.0 / config.rope_scale
        if config.rope_freq_base is not None:
            cparams.rope_freq_base = config.rope_freq_base
        if config.yarn_orig_ctx is not None:
            cparams.yarn_orig_ctx = config.yarn_orig_ctx
        cparams.type_k = GGMLQuantizationType[config.cache_type_k.upper()].value
        cparams.type_v = GGMLQuantizationType[config.cache_type_v.upper()].value
        cparams.no_perf = True
        self._ctx = lib.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lib.llama_model_free(self._model)
            self._model = None
            raise EngineError(f"llama.cpp could not create a context of {config.ctx} tokens for {path}; try a smaller --ctx")
        self._mem = lib.llama_get_memory(self._ctx)
        # What llama.cpp chose, not what was asked: it rounds the context up to a multiple of 256, and a batch larger
        # than n_batch would fail its assertion.
        self.n_ctx = lib.llama_n_ctx_seq(self._ctx)  # tokens one sequence holds
        self.n_batch = lib.llama_n_batch(self._ctx)
        self.parallel = lib.llama_n_seq_max(self._ctx)
        self.backend_sampling = config.backend_sampling
        if self.backend_sampling and not hasattr(lib, "llama_set_sampler"):
            log.warning("--backend-sampling: this llama-cpp-python has no backend sampling (llama_set_sampler); "
                        "sampling runs on the CPU, with the same choices")
        self._attached: dict[int, object] = {}  # sequence -> the sampler chain llama.cpp runs in its graph for it
        self.n_ctx_train = n_ctx_train
        self._notice_beyond_training(config)
        self.n_vocab = lib.llama_vocab_n_tokens(self._vocab)
        self.bos_id = lib.llama_vocab_bos(self._vocab)
        self.eos_id = lib.llama_vocab_eos(self._vocab)
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab))
        self._past: list[int] = []  # tokens whose keys/values are in the cache (sequence 0)
        self._local = threading.local()  # a piece buffer per thread (the server detokenizes beside its decode loop)
        self.chat_template: str | None = self.info.chat_template

    def _check_cache_fits(self, config: EngineConfig) -> None:
        """Refuse a context llama.cpp cannot hold, before it tries: over its 32-bit token count, or (on the CPU) a KV
        cache larger than this machine's memory, where the allocation would end the process or swap for minutes."""
        total = config.ctx * config.parallel
        what = f"--ctx {config.ctx}" + (f" × --parallel {config.parallel}" if config.parallel > 1 else "")
        if total >= 2**32:
            raise TiblocalError(f"{what} is {total:,} tokens, more than llama.cpp can address (2^32); lower it")
        need, have = kv_cache_bytes(self.info, total, config.cache_type_k, config.cache_type_v), physical_memory()
        if config.n_gpu_layers == 0 and need and have and need > have:
            raise TiblocalError(
                f"{what} needs a KV cache of {need / 2**30:,.1f} GiB for {self.path.name}, more than this machine's "
                f"{have / 2**30:,.1f} GiB of memory; lower it (the model was trained on "
                f"{self.info.metadata.get(Keys.LLM.CONTEXT_LENGTH.format(arch=self.info.architecture), '?')} tokens)"
            )

    def _notice_beyond_training(self, config: EngineConfig) -> None:
        """A context longer than the model's training, with no RoPE scaling asked for or in the GGUF: allowed (the
        user may know better), with a notice, as answers past the trained length usually degrade."""
        scaled = config.rope_scaling not in (None, "none") or config.rope_scale not in (None, 1.0)
        in_gguf = self.info.metadata.get(Keys.Rope.SCALING_TYPE.format(arch=self.info.architecture), "none")
        if self.n_ctx > self.n_ctx_train > 0 and not scaled and in_gguf == "none":
            factor = -(-self.n_ctx // self.n_ctx_train)
            log.warning(
                "--ctx %d is beyond the %d tokens %s was trained on, without RoPE scaling: answers past %d tokens may "
                "degrade; --rope-scaling linear --rope-scale %d stretches the trained positions over it",
                self.n_ctx, self.n_ctx_train, self.path.name, self.n_ctx_train, factor,
            )

    # --- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        lib = _llama_cpp
        if lib is None:
            return
        if getattr(self, "_ctx", None):
            for seq in list(self._attached):
                self.detach_sampler(seq)
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # --- vocabulary ---------------------------------------------------------------------------
    @property
    def bos_text(self) -> str:
        return self.piece(self.bos_id, special=True).decode("utf-8", "replace") if self.bos_id >= 0 else ""

    @property
    def eos_text(self) -> str:
        return self.piece(self.eos_id, special=True).decode("utf-8", "replace") if self.eos_id >= 0 else ""

    def tokenize(self, text: str, *, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of ``text`` as llama.cpp makes them (``special``: parse "<s>", "</s>" as control tokens)."""
        return _tokenize(self._vocab, text, self.add_bos if add_bos is None else add_bos, special)

    def piece(self, token: int, *, special: bool = False, lstrip: int = 0) -> bytes:
        """The bytes of one token (a byte-fallback token is a single, possibly partial, UTF-8 byte)."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = ctypes.create_string_buffer(256)
        n = _llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), lstrip, special)
        if n < 0:  # pragma: no cover - pieces are short
            buf = ctypes.create_string_buffer(-n)
            n = _llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, lstrip, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        stream = Utf8Stream()
        text = "".join(stream.feed(self.piece(t, lstrip=1 if i == 0 else 0)) for i, t in enumerate(tokens))
        return text + stream.finish()

    def is_eog(self, token: int) -> bool:
        return bool(_llama_cpp.llama_vocab_is_eog(self._vocab, token))

    @functools.cached_property
    def eog_tokens(self) -> list[int]:
        """Every end-of-generation token of the vocabulary (EOS, EOT and the like)."""
        return [t for t in range(self.n_vocab) if self.is_eog(t)]

    # --- evaluation ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the KV cache (the next prompt is evaluated from scratch)."""
        _llama_cpp.llama_memory_clear(self._mem, True)
        self._past = []

    def _decode(self, tokens: Sequence[int]) -> None:
        lib = _llama_cpp
        step = self.n_batch
        for i in range(0, len(tokens), step):
            chunk = tokens[i : i + step]
            arr = (lib.llama_token * len(chunk))(*chunk)
            rc = lib.llama_decode(self._ctx, lib.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                raise EngineError(f"llama_decode failed with code {rc} after {len(self._past)} tokens")
            self._past.extend(chunk)

    def keep_prefix(self, seq: int, past: list[int], tokens: Sequence[int]) -> int:
        """Trim sequence ``seq``'s cache (whose tokens ``past`` lists, trimmed in place) to its common prefix with
        ``tokens``, less the last token, which is evaluated again for its logits; returns how many tokens were kept.
        Everything after the prefix goes, also a token decoded just before a Ctrl-C was recorded."""
        keep = min(common_prefix(past, tokens), len(tokens) - 1)
        if not _llama_cpp.llama_memory_seq_rm(self._mem, seq, keep, -1):
            _llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
            keep = 0
        del past[keep:]
        return keep

    def _prefill(self, tokens: Sequence[int]) -> int:
        """Bring the cache to ``tokens``, reusing the common prefix; returns the reused count."""
        keep = self.keep_prefix(0, self._past, tokens)
        self._decode(tokens[keep:])
        return keep

    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """The logits after ``tokens`` (float32, n_vocab): only the last position's are computed, and the cache's
        common prefix with the tokens is kept (questions that share their few-shot examples evaluate them once)."""
        self.check_fits(len(tokens), room=0)
        self._prefill(tokens)
        ptr = _llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def eval_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position of ``tokens`` (float32, shape (len, n_vocab)), from an empty cache."""
        lib = _llama_cpp
        self.check_fits(len(tokens), room=0)  # scoring needs no slot for a next token
        self.reset()
        out = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        step = self.n_batch
        batch = lib.llama_batch_init(step, 0, 1)
        try:
            for start in range(0, len(tokens), step):
                chunk = tokens[start : start + step]
                batch.n_tokens = len(chunk)
                for i, t in enumerate(chunk):
                    put_token(batch, i, t, start + i, 0, True)
                rc = lib.llama_decode(self._ctx, batch)
                if rc != 0:
                    raise EngineError(f"llama_decode failed with code {rc} at position {start}")
                ptr = lib.llama_get_logits(self._ctx)
                out[start : start + len(chunk)] = np.ctypeslib.as_array(ptr, shape=(len(chunk), self.n_vocab))
                self._past.extend(chunk)
        finally:
            lib.llama_batch_free(batch)
        return out

    def greedy_many(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
        """Greedy answers (token ids, end of generation excluded) to several prompts, up to ``parallel`` of them in
        each ``llama_decode``: evaluation's batched generation. Each prompt runs in a sequence of its own (its cache
        cleared first), so the answers are those of one prompt at a time, up to the float differences of batched
        kernels; an answer stops at end of generation, ``max_tokens`` or a full sequence. The cache is empty after."""
        lib = _llama_cpp
        for p in prompts:
            self.check_fits(len(p))
        out: list[list[int]] = [[] for _ in prompts]
        waiting = list(range(len(prompts)))[::-1]  # popped from the end: the prompts in order
        free = list(range(self.parallel))[::-1]
        active: dict[int, list[int]] = {}  # seq -> [prompt index, next token, its position]
        batch = lib.llama_batch_init(self.n_batch, 0, 1)

        def pick(i: int) -> int:
            return int(np.argmax(np.ctypeslib.as_array(lib.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,))))

        def take(seq: int, k: int, tok: int, pos: int) -> None:
            if self.is_eog(tok) or max_tokens == 0:
                free.append(seq)
                return
            out[k].append(tok)
            if len(out[k]) >= max_tokens or pos + 1 > self.n_ctx:
                free.append(seq)
            else:
                active[seq] = [k, tok, pos]

        def decode(n: int) -> None:
            batch.n_tokens = n
            rc = lib.llama_decode(self._ctx, batch)
            if rc != 0:
                raise EngineError(f"llama_decode failed with code {rc} in batched generation")

        try:
            self.reset()
            while waiting or active:
                while waiting and free:  # a new prompt in a free sequence, evaluated in chunks of the batch
                    seq, k = free.pop(), waiting.pop()
                    prompt = prompts[k]
                    lib.llama_memory_seq_rm(self._mem, seq, -1, -1)  # the last answer in this sequence goes
                    for start in range(0, len(prompt), self.n_batch):
                        chunk = prompt[start : start + self.n_batch]
                        for i, t in enumerate(chunk):
                            put_token(batch, i, t, start + i, seq, start + i == len(prompt) - 1)
                        decode(len(chunk))
                    take(seq, k, pick(len(prompt) - 1 - (len(prompt) - 1) // self.n_batch * self.n_batch),
                         len(prompt))
                if not active:
                    continue
                seqs = list(active)
                for g in range(0, len(seqs), self.n_batch):  # the next token of every answering sequence, one decode
                    group = seqs[g : g + self.n_batch]
                    for i, seq in enumerate(group):
                        _, tok, pos = active[seq]
                        put_token(batch, i, tok, pos, seq, True)
                    decode(len(group))
                    for i, seq in enumerate(group):
                        k, _, pos = active.pop(seq)
                        take(seq, k, pick(i), pos + 1)
        finally:
            lib.llama_batch_free(batch)
            self.reset()
        return out

    def sampler(self, s: Sampling, grammar: str | None = None, history: Sequence[int] = (), *, precut: bool = True,
                device: bool = False):
        """A llama.cpp sampler chain for ``s`` (free it with ``free_sampler``); ``grammar``: GBNF text whose root rule
        every answer must match (JSON output), applied before anything else; ``history``: the prompt, whose last
        ``repeat_last_n`` tokens the penalties count (and only they: the grammar would refuse the prompt's tokens,
        and a refusal inside llama.cpp ends the process); ``precut=False`` leaves out the cut before the penalties
        (the same choices, slower: for tests).

        ``device=True``: a chain whose first cut (the end-of-generation bias and a top-k over the vocabulary) can run
        in llama.cpp's graph once attached (``attach_sampler``), and the rest on the CPU over the cut's candidates:
        the same choices. None when these settings need every candidate on the CPU (a grammar, top-k 0 with a
        temperature, penalties that raise scores)."""
        lib = _llama_cpp
        penalised = (s.repeat_penalty != 1.0 or s.frequency_penalty != 0.0 or s.presence_penalty != 0.0) and (
            s.repeat_last_n > 0
        )
        keep = 1 if s.temperature <= 0 else s.top_k  # the candidates the chain ends up choosing among (0: all)
        can_precut = penalised and keep and s.repeat_penalty >= 1.0 and min(s.frequency_penalty, s.presence_penalty) >= 0
        if device:
            if grammar is not None or not keep or (penalised and not can_precut):
                return None
            precut = True
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if grammar is not None:
            g = lib.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
            if not g:
                lib.llama_sampler_free(chain)
                raise TiblocalError(f"the grammar does not parse: {bindings.take_errors() or 'llama.cpp gave no reason'}")
            lib.llama_sampler_chain_add(chain, g)
        if s.ignore_eos:
            eog = self.eog_tokens
            biases = (lib.llama_logit_bias * len(eog))(*((t, -math.inf) for t in eog))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_logit_bias(self.n_vocab, len(eog), biases))
        if can_precut and precut:
            # The penalties only lower the scores of the (at most repeat_last_n) recent tokens, so the `keep` best after
            # them are among the keep + repeat_last_n best before them: cutting there first gives the same choice while
            # the penalties (a hash look-up per candidate) see about a hundred candidates instead of the whole vocabulary.
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(keep + s.repeat_last_n))
        elif device:  # no penalties: the cut is the top-k itself (again below, on the CPU, where it also sorts)
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(keep))
        if device:
            # llama.cpp runs a chain's leading samplers that have a graph form in the graph, up to the first without
            # one; its graph top-p cannot follow its graph top-k (0.3.36 asserts on the candidates' shape and ends the
            # process). A top-n-sigma of 1e30 ends that prefix here, after the one cut: it has no graph form and keeps
            # every candidate within 1e30 standard deviations of the best, i.e. all (a typical-p of 1, the obvious
            # no-op, is replaced by an empty sampler, which has a graph form and would not end the prefix).
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_n_sigma(SAMPLER_PREFIX_END))
        if penalised:
            penalties = lib.llama_sampler_init_penalties(
                self.n_vocab, s.repeat_last_n, s.repeat_penalty, s.frequency_penalty, s.presence_penalty
            )
            for t in history[-s.repeat_last_n :]:
                lib.llama_sampler_accept(penalties, t)
            lib.llama_sampler_chain_add(chain, penalties)
        if s.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            if s.top_k > 0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(s.top_k))
            if s.top_p < 1.0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(s.top_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(s.temperature))
            seed = s.seed if s.seed >= 0 else lib.LLAMA_DEFAULT_SEED
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain

    @staticmethod
    def free_sampler(chain) -> None:
        _llama_cpp.llama_sampler_free(chain)

    def attach_sampler(self, seq: int, chain) -> bool:
        """Let llama.cpp run ``chain``'s first cut in its graph for sequence ``seq``'s outputs (a chain made with
        ``device=True``), from the next decode on; False when it cannot (the chain stays usable on the CPU).
        Detach it (``detach_sampler``) before freeing it."""
        set_sampler = getattr(_llama_cpp, "llama_set_sampler", None)
        if set_sampler is None:  # llama-cpp-python before backend sampling: the chain runs on the CPU, the same choices
            return False
        if not set_sampler(self._ctx, seq, chain):
            return False
        self._attached[seq] = chain
        return True

    def detach_sampler(self, seq: int) -> None:
        if self._attached.pop(seq, None) is not None:
            _llama_cpp.llama_set_sampler(self._ctx, seq, None)

    def check_fits(self, n_prompt: int, *, room: int = 1) -> None:
        """Refuse ``n_prompt`` tokens unless the context holds them and ``room`` more (the first generated token)."""
        if n_prompt + room > self.n_ctx:
            raise PromptTooLongError(
                f"the prompt has {n_prompt} tokens but the context holds {self.n_ctx}; "
                f"shorten it or raise --ctx (the model was trained on {self.n_ctx_train})"
            )

    def generate_tokens(self, prompt: Sequence[int], sampling: Sampling, result: Generation) -> Iterator[int]:
        """Yield sampled token ids until end of generation, ``max_tokens`` or a full context.

        ``result`` receives the counts and timings as they happen (the caller sets ``stop_reason``
        when it stops early, e.g. on a stop string).
        """
        lib = _llama_cpp
        self.check_fits(len(prompt))
        t0 = time.perf_counter()
        result.prompt_tokens = len(prompt)
        chain = self.backend_sampling and self.sampler(sampling, history=prompt, device=True)
        # attached before the prompt's decode: its last logits are then cut in the graph, as every later one
        attached = bool(chain) and self.attach_sampler(0, chain)
        chain = chain or self.sampler(sampling, history=prompt)
        try:
            result.reused_tokens = self._prefill(prompt)
        except BaseException:
            self.detach_sampler(0)
            lib.llama_sampler_free(chain)
            raise
        t1 = time.perf_counter()
        result.prompt_ms = (t1 - t0) * 1000
        try:
            result.stop_reason = "length"
            while result.completion_tokens < sampling.max_tokens:
                tok = lib.llama_sampler_sample(chain, self._ctx, -1)
                if result.completion_tokens == 0:
                    result.first_token_ms = (time.perf_counter() - t0) * 1000
                if self.is_eog(tok):
                    result.stop_reason = "eos"
                    break
                result.completion_tokens += 1
                result.tokens.append(tok)
                yield tok
                if len(self._past) + 1 >= self.n_ctx:  # prompt + completion fill the context
                    result.stop_reason = "context"
                    break
                self._decode((tok,))
        finally:
            if attached:
                self.detach_sampler(0)
            lib.llama_sampler_free(chain)
            result.gen_ms = (time.perf_counter() - t1) * 1000

    def stream(
        self, prompt: Sequence[int], sampling: Sampling, stops: Sequence[str] = (), result: Generation | None = None
    ) -> Iterator[str]:
        """Yield the completion as text, UTF-8 safe, cut before the first stop string.

        Text is yielded only when its characters are complete; ``result.text`` holds the whole
        completion at the end. Closing the generator early (Ctrl-C) keeps what was produced.
        """
        result = result if result is not None else Generation()
        out = CompletionText(stops)
        tokens = self.generate_tokens(prompt, sampling, result)
        try:
            for i, tok in enumerate(tokens):
                text = out.feed(self.piece(tok, lstrip=1 if i == 0 else 0))
                if text:
                    yield text
                if out.stopped:
                    result.stop_reason = "stop"
                    break
            tail = out.finish()
            if tail:
                yield tail
        except (KeyboardInterrupt, GeneratorExit):
            result.stop_reason = "interrupted"
            raise
        finally:
            tokens.close()
            result.text = out.text
