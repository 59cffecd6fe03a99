"""Seeded random Llama checkpoints, for tests and benchmarks (no torch needed).

``write_llama_checkpoint`` writes a Hugging Face folder (config.json, safetensors shards, tokenizer)
that transformers and ``tiblocal convert`` both load. The weights are random, so it says nothing
about quality, only about shapes, names, numerics and speed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False


def llama_config(shape: LlamaShape, *, dtype: str = "float32", bos: int = 1, eos: int = 2) -> dict:
    cfg = asdict(shape)
    cfg.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_act="silu",
        torch_dtype=dtype,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=None,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        use_cache=True,
    )
    return cfg


def llama_tensor_shapes(shape: LlamaShape) -> Iterator[tuple[str, tuple[int, ...]]]:
    h, f, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    head_dim = h // shape.num_attention_heads
    kv = shape.num_key_value_heads * head_dim
    yield "model.embed_tokens.weight", (v, h)
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (h,)
        yield f"{p}.self_attn.q_proj.weight", (h, h)
        yield f"{p}.self_attn.k_proj.weight", (kv, h)
        yield f"{p}.self_attn.v_proj.weight", (kv, h)
        yield f"{p}.self_attn.o_proj.weight", (h, h)
        yield f"{p}.post_attention_layernorm.weight", (h,)
        yield f"{p}.mlp.gate_proj.weight", (f, h)
        yield f"{p}.mlp.up_proj.weight", (f, h)
        yield f"{p}.mlp.down_proj.weight", (h, f)
    yield "model.norm.weight", (h,)
    if not shape.tie_word_embeddings:
        yield "lm_head.weight", (v, h)


def write_llama_checkpoint(
    out: Path,
    shape: LlamaShape,
    tokenizer_model: Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    std: float = 0.02,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write a random Llama checkpoint in HF layout; norms are 1 plus noise so they are not trivial."""
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Shards are written as soon as they are full (then renamed to HF's model-0000i-of-0000n names),
    # so a 7B-shaped checkpoint never sits in memory whole.
    written: list[tuple[Path, list[str], int]] = []
    pending: dict[str, np.ndarray] = {}
    size = 0

    def flush() -> None:
        path = out / f"shard-{len(written)}.tmp"
        save_file(pending, str(path), metadata={"format": "pt"})
        written.append((path, list(pending), sum(a.nbytes for a in pending.values())))
        pending.clear()

    for name, shp in llama_tensor_shapes(shape):
        if len(shp) == 1:
            arr = (1.0 + 0.1 * rng.standard_normal(shp, dtype=np.float32)).astype(np_dtype)
        else:
            arr = (std * rng.standard_normal(shp, dtype=np.float32)).astype(np_dtype)
        if size and size + arr.nbytes > max_shard_bytes:
            flush()
            size = 0
        pending[name] = arr
        size += arr.nbytes
    flush()
    n = len(written)
    weight_map = {}
    for i, (path, names, _) in enumerate(written):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        path.rename(out / fname)
        weight_map.update({k: fname for k in names})
    if n > 1:
        index = {"metadata": {"total_size": sum(b for _, _, b in written)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(llama_config(shape, dtype=dtype), indent=2))
    shutil.copyfile(tokenizer_model, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": True,
            },
            indent=2,
        )
    )
    return out


LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_lora_adapter(
    out: Path,
    shape: LlamaShape,
    *,
    r: int = 64,
    alpha: int = 128,
    n_vocab: int | None = None,
    tokenizer_model: Path | None = None,
    dtype: str = "float16",
    seed: int = 0,
    std: float = 0.02,
) -> Path:
    """A random peft LoRA adapter in the Tibetan-Llama2 layout: LoRA on the seven projections of every
    layer, and embed_tokens / lm_head trained in full (modules_to_save) with ``n_vocab`` rows."""
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, f = shape.hidden_size, shape.intermediate_size
    kv = shape.num_key_value_heads * (h // shape.num_attention_heads)
    dims = {  # module -> (in, out)
        "self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, f), "mlp.up_proj": (h, f), "mlp.down_proj": (f, h),
    }
    tensors: dict[str, np.ndarray] = {}
    for i in range(shape.num_hidden_layers):
        for module, (d_in, d_out) in dims.items():
            p = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{p}.lora_A.weight"] = (std * rng.standard_normal((r, d_in), dtype=np.float32)).astype(np_dtype)
            tensors[f"{p}.lora_B.weight"] = (std * rng.standard_normal((d_out, r), dtype=np.float32)).astype(np_dtype)
    v = n_vocab or shape.vocab_size
    for name in ("base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"):
        tensors[name] = (std * rng.standard_normal((v, h), dtype=np.float32)).astype(np_dtype)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.05,
        "target_modules": list(LLAMA_LORA_TARGETS), "modules_to_save": ["embed_tokens", "lm_head"],
        "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_model is not None:
        shutil.copyfile(tokenizer_model, out / "tokenizer.model")
    return out
