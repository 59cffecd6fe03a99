"""The GGUF vocabulary of a SentencePiece (Llama) tokenizer: pieces, scores, token types, special ids.

Shared by ``tiblocal convert`` (full models and ``--vocab-only``) and the tokenizer parity check. It
follows llama.cpp's ``_create_vocab_sentencepiece`` (ggml-org/llama.cpp, convert_hf_to_gguf.py):
every piece keeps its id and score, control/unknown/unused/byte pieces get their token types, and
rows of the embedding beyond the tokenizer are filled with ``[PAD{i}]`` tokens of type UNUSED.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf import TokenType

from .errors import ModelFormatError
from .gguf_file import write_gguf_data
from .jsonin import loads


@dataclass(frozen=True)
class GGUFVocab:
    tokens: list[bytes]
    scores: list[float]
    token_types: list[int]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    n_pieces: int  # pieces in tokenizer.model (the rest is padding)

    def write_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(self.tokens)
        writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        for value, add in (
            (self.bos_id, writer.add_bos_token_id),
            (self.eos_id, writer.add_eos_token_id),
            (self.unk_id, writer.add_unk_token_id),
            (self.pad_id, writer.add_pad_token_id),
        ):
            if value is not None:
                add(value)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)


def load_sentencepiece(path: Path):
    """Load a SentencePiece model, with a clear error when the file is something else."""
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such tokenizer file; give a SentencePiece tokenizer.model")
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise ModelFormatError(
            f"{path} is not a SentencePiece model ({str(e).splitlines()[0]}); give a tokenizer.model file"
        ) from None
    return sp


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file of a model folder ({} when absent); anything else is one ModelFormatError naming it."""
    if not path.is_file():
        return {}
    try:
        data = loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path} is not valid JSON ({e}); fix or re-save it") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} is a JSON {type(data).__name__}, not an object; fix or re-save it")
    return data


def tokenizer_json_ids(path: Path) -> int:
    """How many token ids a Hugging Face tokenizer.json defines: its vocabulary and its added tokens (mostly the
    vocabulary's own special pieces), each id once."""
    data = _read_json(path)
    model = data.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    added = data.get("added_tokens", [])
    if not isinstance(vocab, dict) or not isinstance(added, list):
        raise ModelFormatError(f"{path} has no model.vocab object or added_tokens list; write it again (tiblocal vocab "
                               "extend writes one)")
    return len(set(vocab.values()) | {t.get("id") for t in added if isinstance(t, dict)})


def sentencepiece_vocab(
    tokenizer_model: Path, *, n_vocab: int | None = None, model_dir: Path | None = None
) -> GGUFVocab:
    """The GGUF vocabulary of ``tokenizer_model``, padded to ``n_vocab`` rows.

    ``model_dir`` supplies ``config.json`` / ``tokenizer_config.json`` overrides for the special ids
    and add_bos/add_eos, as Hugging Face would read them.
    """
    sp = load_sentencepiece(tokenizer_model)
    n_pieces = sp.vocab_size()
    if n_vocab is None:
        n_vocab = n_pieces
    if n_vocab < n_pieces:
        raise ModelFormatError(
            f"{tokenizer_model} has {n_pieces} pieces but the model has only {n_vocab} embedding rows "
            "(config vocab_size); resize the model's embeddings or pass the tokenizer it was trained with"
        )

    tokens: list[bytes] = []
    scores: list[float] = []
    types: list[int] = []
    for i in range(n_pieces):
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(float(sp.GetScore(i)))
        if sp.IsUnknown(i):
            types.append(TokenType.UNKNOWN)
        elif sp.IsControl(i):
            types.append(TokenType.CONTROL)
        elif sp.IsUnused(i):
            types.append(TokenType.UNUSED)
        elif sp.IsByte(i):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    for i in range(n_pieces, n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)

    def sp_id(i: int) -> int | None:
        return i if i >= 0 else None

    bos, eos, unk, pad = sp_id(sp.bos_id()), sp_id(sp.eos_id()), sp_id(sp.unk_id()), sp_id(sp.pad_id())
    add_bos, add_eos = True, False
    if model_dir is not None:
        config = _read_json(Path(model_dir) / "config.json")
        tok_config = _read_json(Path(model_dir) / "tokenizer_config.json")
        bos = config.get("bos_token_id", bos) if isinstance(config.get("bos_token_id"), int) else bos
        eos = config.get("eos_token_id", eos) if isinstance(config.get("eos_token_id"), int) else eos
        if isinstance(config.get("pad_token_id"), int) and config["pad_token_id"] >= 0:
            pad = config["pad_token_id"]
        add_bos = bool(tok_config.get("add_bos_token", add_bos))
        add_eos = bool(tok_config.get("add_eos_token", add_eos))
    for name, value in (("bos", bos), ("eos", eos), ("unk", unk), ("pad", pad)):
        if value is not None and not 0 <= value < n_vocab:
            raise ModelFormatError(
                f"{name} token id {value} is outside the vocabulary of {n_vocab} tokens "
                f"({model_dir or tokenizer_model}); fix {name}_token_id in config.json"
            )
    return GGUFVocab(tokens, scores, types, bos, eos, unk, pad, add_bos, add_eos, n_pieces)


def write_vocab_gguf(folder: Path, out: Path, chat_template: str | None = None) -> None:
    """A vocab-only GGUF (no tensors) from a tokenizer folder: what llama.cpp tokenizes with.

    The same vocabulary ``tiblocal convert`` writes into full models.
    """
    from .fsutil import atomic_path

    folder, out = Path(folder), Path(out)
    tok = folder / "tokenizer.model"
    if not tok.is_file():
        raise ModelFormatError(f"{folder} has no tokenizer.model; give a model or tokenizer folder")
    vocab = sentencepiece_vocab(tok, model_dir=folder)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        w.add_name(folder.name)
        w.add_type("vocab")
        w.add_vocab_size(len(vocab.tokens))
        vocab.write_to(w)
        if chat_template:
            w.add_chat_template(chat_template)
        write_gguf_data(w, tmp, [])  # no tensors
