"""`tiblocal inspect`: what a GGUF file, an importance matrix or a Hugging Face model folder holds, read from
headers only (a matrix is read whole: it is small)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from .checkpoint import HFCheckpoint
from .errors import InputFileError, ModelFormatError
from .fsutil import human_size
from .gguf_file import read_gguf
from .gguf_vocab import tokenizer_json_ids
from .gguf_keys import suggested_sampling
from .templates import template_name_of


def describe_gguf(path: Path, info=None) -> dict[str, Any]:
    info = info or read_gguf(path)
    arch = info.architecture
    hp = {
        key.split(".", 1)[1]: value
        for key, value in info.metadata.items()
        if arch and key.startswith(f"{arch}.") and not isinstance(value, list)
    }
    template = info.chat_template
    return {
        "path": str(path),
        "format": "gguf",
        "gguf_version": info.version,
        "architecture": arch,
        "name": info.metadata.get("general.name"),
        "file_type": info.file_type,
        "size_bytes": info.size,
        "n_params": info.n_params,
        "hyperparameters": hp,
        "vocab_size": info.vocab_size,
        "tokenizer_model": info.metadata.get("tokenizer.ggml.model"),
        "token_types": info.token_type_counts(),
        "special_ids": info.special_ids(),
        "add_bos": info.metadata.get("tokenizer.ggml.add_bos_token"),
        "add_eos": info.metadata.get("tokenizer.ggml.add_eos_token"),
        # the sampling the model suggests (llama.cpp's general.sampling.*; chat, generate and serve use it)
        "suggested_sampling": suggested_sampling(info.metadata),
        "chat_template_name": template_name_of(template) or ("custom" if template else None),
        "chat_template": template,
        "tensor_types": info.tensor_type_counts(),
        "rotation_seeds": info.rotation_seeds or None,
        "n_tensors": len(info.tensors),
        "bits_per_weight": round(8 * sum(t.n_bytes for t in info.tensors) / info.n_params, 3) if info.n_params else None,
    }


def describe_imatrix(path: Path) -> dict[str, Any]:
    """An importance matrix (``tiblocal imatrix`` or llama-imatrix, GGUF or legacy .dat): what it was measured on
    and in which basis (``rotation_seeds``: [] the model as converted, seeds for ``quantize --rotate``, None where
    the file does not say)."""
    from .imatrix_file import is_gguf, load_imatrix

    im = load_imatrix(path)
    return {
        "path": str(path),
        "format": "imatrix",
        "container": "gguf" if is_gguf(path) else "dat",
        "entries": len(im.entries),
        "datasets": im.datasets,
        "chunks": im.chunk_count,
        "rotation_seeds": im.rotation,
        "size_bytes": path.stat().st_size,
    }


def describe_hf(path: Path) -> dict[str, Any]:
    ckpt = HFCheckpoint.open(path)
    cfg = ckpt.config
    tokenizer: dict[str, Any] = {}
    if ckpt.tokenizer_model is not None:
        from .gguf_vocab import load_sentencepiece

        sp = load_sentencepiece(ckpt.tokenizer_model)
        tokenizer["sentencepiece_pieces"] = sp.vocab_size()
    tj = path / "tokenizer.json"
    if tj.is_file():
        try:
            tokenizer["tokenizer_json_vocab"] = tokenizer_json_ids(tj)
        except ModelFormatError:
            tokenizer["tokenizer_json_vocab"] = "unreadable"
    emb = ckpt.tensors.get("model.embed_tokens.weight")
    keys = (
        "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "vocab_size",
        "rms_norm_eps", "rope_theta", "torch_dtype", "dtype", "tie_word_embeddings",
    )
    return {
        "path": str(path),
        "format": "huggingface",
        "config": {k: cfg[k] for k in keys if k in cfg},
        "n_params": sum(t.n_elements for t in ckpt.tensors.values()),
        "embedding_rows": emb.shape[0] if emb is not None else None,
        "tokenizer": tokenizer,
        "tensor_dtypes": _count(t.dtype for t in ckpt.tensors.values()),
        "shards": [{"file": s.name, "size_bytes": s.stat().st_size} for s in ckpt.shards],
        "size_bytes": sum(s.stat().st_size for s in ckpt.shards),
    }


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return dict(sorted(out.items()))


def describe(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        return describe_hf(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file or folder; give a .gguf file or a Hugging Face model folder")
    if path.suffix == ".dat":  # llama-imatrix's legacy format
        return describe_imatrix(path)
    info = read_gguf(path)
    return describe_imatrix(path) if info.metadata.get("general.type") == "imatrix" else describe_gguf(path, info)


def _num(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def inspect_table(path: Path, d: dict) -> Table:
    """A person's view of ``describe(path)``."""
    table = Table(title=str(path), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    if d["format"] == "imatrix":
        seeds = d["rotation_seeds"]
        basis = ("not said (a llama-imatrix file: the model it was run on)" if seeds is None else
                 f"rotated, seed {', '.join(map(str, seeds))} (for quantize --rotate)" if seeds else
                 "the model as converted (unrotated)")
        rows = [
            ("format", f"importance matrix ({'GGUF' if d['container'] == 'gguf' else 'legacy .dat'})"),
            ("matrices", f"{d['entries']:,}"),
            ("measured on", ", ".join(d["datasets"]) or "not said"),
            ("chunks", str(d["chunks"]) if d["chunks"] else "not said"),
            ("basis", basis),
            ("size", human_size(d["size_bytes"])),
        ]
    elif d["format"] == "gguf":
        rows = [
            ("format", f"GGUF v{d['gguf_version']}"),
            ("architecture", str(d["architecture"])),
            ("name", str(d["name"])),
            ("file type", str(d["file_type"])),
            ("size", f"{human_size(d['size_bytes'])} ({d['bits_per_weight']} bits per weight)"),
            ("parameters", f"{d['n_params']:,}"),
            ("hyperparameters", ", ".join(f"{k}={_num(v)}" for k, v in d["hyperparameters"].items())),
            ("vocabulary", f"{d['vocab_size']:,} tokens ({d['tokenizer_model']})"),
            ("token types", ", ".join(f"{k} {v:,}" for k, v in d["token_types"].items())),
            ("special ids", ", ".join(f"{k} {v}" for k, v in d["special_ids"].items())),
            ("add bos/eos", f"{d['add_bos']} / {d['add_eos']}"),
            ("chat template", d["chat_template_name"] or "none"),
            ("suggested sampling", ", ".join(f"{k} {_num(v)}" for k, v in d["suggested_sampling"].items())
             or "none (tiblocal's defaults: temp 0.2, top-k 40, top-p 0.9, repeat penalty 1.1)"),
            *([("rotation", f"seed {', '.join(map(str, d['rotation_seeds']))} (tiblocal quantize --rotate)")]
              if d["rotation_seeds"] else []),
            ("tensors", f"{d['n_tensors']}: " + ", ".join(f"{k} {v}" for k, v in d["tensor_types"].items())),
        ]
    else:
        cfg = d["config"]
        rows = [
            ("format", "Hugging Face folder"),
            ("architecture", ", ".join(cfg.get("architectures", [])) or "?"),
            ("config", ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "architectures")),
            ("parameters", f"{d['n_params']:,}"),
            ("embedding rows", str(d["embedding_rows"])),
            ("tokenizer", ", ".join(f"{k} {v}" for k, v in d["tokenizer"].items()) or "no tokenizer.model"),
            ("tensor dtypes", ", ".join(f"{k} {v}" for k, v in d["tensor_dtypes"].items())),
            ("shards", ", ".join(f"{s['file']} ({human_size(s['size_bytes'])})" for s in d["shards"])),
            ("size", human_size(d["size_bytes"])),
        ]
    for k, v in rows:
        table.add_row(k, v)
    return table
