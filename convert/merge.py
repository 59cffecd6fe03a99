"""Merge LoRA adapters into a base model, shard by shard, without torch.

The Chinese-Alpaca-Plus recipe: the pretraining LoRA first, then the SFT LoRA, each applied to the
result of the one before. For every base tensor, in order:
- a ``modules_to_save`` tensor of the adapter (trained embed_tokens / lm_head, possibly with more rows
  after the vocabulary was extended) replaces it;
- a LoRA pair adds ``scale * B @ A`` computed in float32, with scale = alpha / r (alpha / sqrt(r) for
  rsLoRA, per-module ``rank_pattern`` / ``alpha_pattern`` honoured) and the product transposed when
  ``fan_in_fan_out``.
Everything is checked before the first byte is written: every adapter tensor must match a base
tensor and its shape, and the vocabulary (embedding rows, lm_head rows, tokenizer pieces) must agree.
Base tensors and adapters are memory-mapped, so the peak memory is about one tensor in float32.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tiblocal.checkpoint import (
    HFCheckpoint,
    SafetensorsWriter,
    TensorRef,
    encode_as,
    read_safetensors_header,
)
from tiblocal.errors import InputFileError, ModelFormatError, TiblocalError
from tiblocal.fsutil import atomic_dir, check_output_path
from tiblocal.jsonin import is_finite_number, is_whole, loads
from tiblocal.verify import write_sha256sums

log = logging.getLogger(__name__)

DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "added_tokens.json")
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraPair:
    a: TensorRef  # (r, in) or, for embeddings, lora_embedding_A (r, vocab)
    b: TensorRef  # (out, r) or lora_embedding_B (hidden, r)
    scale: float
    transpose: bool  # fan_in_fan_out, or an embedding (B @ A is (hidden, vocab))

    def delta(self) -> np.ndarray | None:
        """``scale * B @ A`` (out, in) in float32; None where it is not finite (NaN or infinity in A or B, or a scale
        that overflows). Bounded from the factors first: each entry is a sum of r products, so when A and B are finite
        and scale * r * max|A| * max|B| is well inside float32 every entry is finite, and only an update that fails
        the bound (none in practice) is checked entry by entry (over the product, that took 6% of a merge's time)."""
        a, b = self.a.read_f32(), self.b.read_f32()
        with np.errstate(over="ignore", invalid="ignore"):
            scale = np.float32(self.scale)
            bound = abs(float(scale)) * a.shape[0] * float(np.abs(a).max(initial=0)) * float(np.abs(b).max(initial=0))
            d = b @ a
            if self.transpose:
                d = d.T
            d *= scale
        if not (math.isfinite(bound) and bound < 1e37) and not _all_finite(d):  # max() of a NaN is NaN: no bound
            return None
        return d

    @property
    def shape(self) -> tuple[int, int]:
        s = (self.b.shape[0], self.a.shape[1])
        return (s[1], s[0]) if self.transpose else s


@dataclass
class Adapter:
    path: Path
    config: dict
    replacements: dict[str, TensorRef] = field(default_factory=dict)  # base name -> full tensor
    pairs: dict[str, LoraPair] = field(default_factory=dict)  # base name -> LoRA pair

    @property
    def tokenizer_model(self) -> Path | None:
        p = self.path / "tokenizer.model"
        return p if p.is_file() else None


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _all_finite(a: np.ndarray) -> bool:
    """No NaN or infinity in ``a``: its sum first (``np.isfinite(a).all()`` takes half as long as a LoRA product),
    then, only where the sum is not finite (a NaN or an infinity, or finite values that add up past float32), its
    largest and smallest values, which NaN also reaches."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(a.sum()) or (np.isfinite(a.max()) and np.isfinite(a.min())))


def check_lora_config(cfg, cfg_path: Path) -> None:
    """The values of adapter_config.json the merge reads, of peft's types (all problems in one line): a rank of "abc"
    or None crashed, 4.5 was taken as 4, "use_rslora": "no" was taken as true (another scale), an infinite alpha
    merged infinite weights, and a rank_pattern key that is no regular expression crashed where peft matches it."""
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{cfg_path} is a JSON {type(cfg).__name__}; expected an object (peft's LoraConfig)")
    problems = []
    if "r" in cfg and not (is_whole(cfg["r"]) and cfg["r"] >= 1):
        problems.append(f"r {cfg['r']!r} (expected a whole number of at least 1)")
    if "lora_alpha" in cfg and not is_finite_number(cfg["lora_alpha"]):
        problems.append(f"lora_alpha {cfg['lora_alpha']!r} (expected a finite number)")
    for key in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            problems.append(f"{key} {cfg[key]!r} (expected true or false)")
    for key, ok, what in (("rank_pattern", lambda v: is_whole(v) and v >= 1, "a whole number of at least 1"),
                          ("alpha_pattern", is_finite_number, "a finite number")):
        patterns = cfg.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            problems.append(f"{key} {patterns!r} (expected an object of module name: value)")
            continue
        for name, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?{name}$")
            except re.error as e:
                problems.append(f"{key} key {name!r} (not a regular expression: {e})")
            if not ok(value):
                problems.append(f"{key} {name!r}: {value!r} (expected {what})")
    if problems:
        raise ModelFormatError(f"{cfg_path}: " + "; ".join(problems))


def load_adapter(path: Path) -> Adapter:
    path = Path(path)
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise InputFileError(f"{path} has no adapter_config.json; give a peft LoRA adapter folder")
    try:
        cfg = loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{cfg_path} is not valid JSON ({e})") from None
    check_lora_config(cfg, cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelFormatError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}; tiblocal merges LoRA adapters")
    if cfg.get("use_dora"):
        raise ModelFormatError(f"{cfg_path}: DoRA adapters are not supported; merge them with peft's merge_and_unload()")
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        refs = read_safetensors_header(weights)
    elif (path / "adapter_model.bin").is_file():
        from tiblocal.checkpoint import read_torch_bin

        refs = read_torch_bin(path / "adapter_model.bin")
    else:
        raise InputFileError(f"{path} has no adapter_model.safetensors (or adapter_model.bin)")

    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    rslora = bool(cfg.get("use_rslora", False))
    fif = bool(cfg.get("fan_in_fan_out", False))
    adapter = Adapter(path, cfg)
    halves: dict[str, dict[str, TensorRef]] = {}
    for key, ref in refs.items():
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        name = name.replace(".default.", ".")
        if ".original_module." in name:
            continue  # peft's copy of the untouched base tensor
        m = re.match(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$", name)
        if m:
            halves.setdefault(m.group(1), {})[m.group(2)] = ref
            continue
        if ".lora_" in name or "lora_magnitude" in name:
            raise ModelFormatError(f"{weights}: tensor {key!r} is of a LoRA variant tiblocal does not merge")
        # A trained copy (modules_to_save), or the full base layer peft saves when the embedding is a
        # LoRA target of a resized vocabulary (save_embedding_layers): either replaces the base tensor.
        name = name.replace(".modules_to_save.", ".").replace(".base_layer.", ".")
        if name in adapter.replacements and adapter.replacements[name].shape != ref.shape:
            raise ModelFormatError(f"{weights}: two different copies of {name}")
        adapter.replacements[name] = ref
    for module, parts in halves.items():
        emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if emb else "lora_A")
        b = parts.get("lora_embedding_B" if emb else "lora_B")
        if a is None or b is None:
            raise ModelFormatError(f"{weights}: {module} has only one half of its LoRA pair")
        r = int(_pattern_value(cfg.get("rank_pattern") or {}, module, r_default))
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha_default))
        if a.shape[0] != r or b.shape[1] != r:
            raise ModelFormatError(
                f"{weights}: {module} has rank {a.shape[0]} but adapter_config.json says r={r}; the config does not "
                "belong to these weights"
            )
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        adapter.pairs[f"{module}.weight"] = LoraPair(a, b, scale, transpose=emb or fif)
    return adapter


@dataclass(frozen=True)
class MergePlan:
    shapes: dict[str, tuple[int, ...]]  # final shape of every output tensor
    n_vocab: int
    tokenizer_dir: Path


def plan_merge(base: HFCheckpoint, adapters: list[Adapter]) -> MergePlan:
    """Check every adapter against the base (and the adapters before it) and the vocabulary."""
    shapes = {name: ref.shape for name, ref in base.tensors.items()}
    for ad in adapters:
        for name, ref in ad.replacements.items():
            if name not in shapes:
                raise ModelFormatError(
                    f"{ad.path}: adapter tensor {name!r} matches no tensor of the base {base.path}; "
                    "is the adapter for another model?"
                )
            old = shapes[name]
            if ref.shape[1:] != old[1:] or (ref.shape[0] != old[0] and not _is_vocab_tensor(name)):
                raise ModelFormatError(
                    f"{ad.path}: {name} has shape {ref.shape} but the base has {old}; the adapter was trained for "
                    "another base model"
                )
            shapes[name] = ref.shape
        for name, pair in ad.pairs.items():
            if name not in shapes:
                raise ModelFormatError(
                    f"{ad.path}: LoRA target {name!r} matches no tensor of the base {base.path}; "
                    "is the adapter for another model?"
                )
            if pair.shape != shapes[name]:
                raise ModelFormatError(
                    f"{ad.path}: the LoRA update of {name} has shape {pair.shape} but the base tensor is "
                    f"{shapes[name]}; the adapter was trained for another base model"
                )

    emb = shapes.get("model.embed_tokens.weight")
    head = shapes.get("lm_head.weight")
    if emb is None:
        raise ModelFormatError(f"{base.path} has no model.embed_tokens.weight; is it a Llama-family model?")
    n_vocab = emb[0]
    if head is not None and head[0] != n_vocab:
        raise ModelFormatError(
            f"after merging, embed_tokens has {n_vocab} rows but lm_head has {head[0]}; the adapter must train "
            "both (modules_to_save: embed_tokens, lm_head) when it resizes the vocabulary"
        )
    tok_dir = next((ad.path for ad in reversed(adapters) if ad.tokenizer_model), None)
    if tok_dir is None:
        if base.tokenizer_model is None:
            raise ModelFormatError(
                f"neither the adapters nor {base.path} have a tokenizer.model; copy the (extended) SentencePiece "
                "tokenizer.model into the adapter folder"
            )
        if n_vocab != base.tensors["model.embed_tokens.weight"].shape[0]:
            raise ModelFormatError(
                f"the adapters resize the vocabulary to {n_vocab} rows but carry no tokenizer.model; copy the "
                "extended tokenizer.model into the adapter folder"
            )
        tok_dir = base.path
    from tiblocal.gguf_vocab import load_sentencepiece

    n_pieces = load_sentencepiece(tok_dir / "tokenizer.model").vocab_size()
    if n_pieces > n_vocab:
        raise ModelFormatError(
            f"{tok_dir / 'tokenizer.model'} has {n_pieces} pieces but the merged embed_tokens has {n_vocab} rows; "
            "pass the adapter trained with this tokenizer (or the tokenizer it was trained with)"
        )
    return MergePlan(shapes, n_vocab, tok_dir)


def _is_vocab_tensor(name: str) -> bool:
    return name in ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class MergeResult:
    out: Path
    n_tensors: int
    n_vocab: int
    merged_lora: int
    replaced: int
    bytes_written: int


def merge_lora(
    base_dir: Path,
    adapter_dirs: list[Path],
    out: Path,
    *,
    dtype: str = "f16",
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MergeResult:
    if dtype not in DTYPES:
        raise TiblocalError(f"unknown --dtype {dtype!r}; expected one of: {', '.join(DTYPES)}")
    if not adapter_dirs:
        raise TiblocalError("give at least one adapter folder")
    out = Path(out)
    check_output_path(out, force=force, inputs=[base_dir, *adapter_dirs], folder=True)
    st_dtype = DTYPES[dtype]
    base = HFCheckpoint.open(Path(base_dir))
    adapters = [load_adapter(Path(p)) for p in adapter_dirs]
    plan = plan_merge(base, adapters)

    total = sum(int(np.prod(s, dtype=np.int64)) for s in plan.shapes.values()) * (2 if st_dtype != "F32" else 4)
    done = 0
    n_lora = n_repl = 0
    with atomic_dir(out, replace=force) as tmp:
        weight_map: dict[str, str] = {}
        names_out = []
        for shard, refs in base.iter_shards():
            fname = shard.name if len(base.shards) > 1 else "model.safetensors"
            specs = [(r.name, st_dtype, plan.shapes[r.name]) for r in refs]
            writer = SafetensorsWriter(tmp / fname, specs)
            for ref in refs:
                w: np.ndarray | None = None
                # Whole tensors are read (not memory-mapped) so their memory goes as soon as they are written.
                for ad in adapters:
                    if ref.name in ad.replacements:
                        w = ad.replacements[ref.name].read_f32()
                        n_repl += 1
                    if ref.name in ad.pairs:
                        if w is None:
                            w = ref.read_f32()
                        delta = ad.pairs[ref.name].delta()
                        if delta is None:
                            raise ModelFormatError(
                                f"{ad.path}: the LoRA update of {ref.name} is not finite (scale "
                                f"{ad.pairs[ref.name].scale:g}, lora_alpha over r; or NaN or infinity in its lora_A or "
                                "lora_B): the adapter is damaged or its lora_alpha is wrong")
                        w += delta
                        del delta
                        n_lora += 1
                if w is None:
                    data = ref.read() if ref.dtype == st_dtype else encode_as(ref.read_f32(), st_dtype)
                else:
                    data = encode_as(w, st_dtype)
                writer.write(ref.name, data)
                done += data.nbytes
                del w, data
                if progress:
                    progress(done, total)
            writer.close()
            weight_map.update({r.name: fname for r in refs})
            names_out.append(fname)
        if len(names_out) > 1:
            index = {"metadata": {"total_size": done}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = dict(base.config)
        config["vocab_size"] = plan.n_vocab
        config["torch_dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[st_dtype]
        config.pop("dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        for extra in ("generation_config.json",):
            if (base.path / extra).is_file():
                shutil.copyfile(base.path / extra, tmp / extra)
        for name in TOKENIZER_FILES:
            src = plan.tokenizer_dir / name
            if src.is_file():
                shutil.copyfile(src, tmp / name)
        write_sha256sums(tmp)
    return MergeResult(out, len(plan.shapes), plan.n_vocab, n_lora, n_repl, done)

