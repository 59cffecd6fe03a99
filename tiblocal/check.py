"""`tiblocal check`: do the tokenizer, the config and the weights agree on the vocabulary?

Every place that states a vocabulary size must agree: tokenizer.model pieces, tokenizer.json,
config.json ``vocab_size``, the rows of embed_tokens and lm_head, and in a GGUF the token list, the
rows of token_embd / output and the special ids. Each disagreement names the file and the fix.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import HFCheckpoint, llama_tensor_problems
from .errors import ModelFormatError
from .gguf_file import read_gguf
from .gguf_vocab import load_sentencepiece, tokenizer_json_ids


def check_hf(path: Path) -> tuple[dict, list[str]]:
    ckpt = HFCheckpoint.open(path)
    facts: dict = {"format": "huggingface"}
    problems: list[str] = []
    cfg_vocab = ckpt.config.get("vocab_size")
    facts["config_vocab_size"] = cfg_vocab
    emb = ckpt.tensors.get("model.embed_tokens.weight")
    head = ckpt.tensors.get("lm_head.weight")
    rows = emb.shape[0] if emb is not None else None
    facts["embed_tokens_rows"] = rows
    facts["lm_head_rows"] = head.shape[0] if head is not None else None
    if rows is None:
        problems.append(f"{path}: no model.embed_tokens.weight; is this a Llama-family model?")
    if rows is not None and cfg_vocab != rows:
        problems.append(f"{path / 'config.json'}: vocab_size is {cfg_vocab} but embed_tokens has {rows} rows; set vocab_size to {rows}")
    if head is not None and rows is not None and head.shape[0] != rows:
        problems.append(f"{path}: lm_head has {head.shape[0]} rows but embed_tokens has {rows}; resize both (model.resize_token_embeddings)")
    if ckpt.architecture in ("LlamaForCausalLM", "LLaMAForCausalLM"):
        # (lm_head's rows against the embedding's: said above)
        problems += [f"{path}: {p}" for p in llama_tensor_problems(ckpt) if not p.startswith("tensor lm_head.weight")]
    if ckpt.tokenizer_model is None:
        problems.append(f"{path} has no tokenizer.model; copy the SentencePiece tokenizer the model was trained with into it")
    else:
        sp = load_sentencepiece(ckpt.tokenizer_model)
        facts["tokenizer_pieces"] = sp.vocab_size()
        if rows is not None and sp.vocab_size() > rows:
            problems.append(
                f"{ckpt.tokenizer_model} has {sp.vocab_size()} pieces but embed_tokens has {rows} rows; pass the "
                "tokenizer the model was trained with, or resize the embeddings"
            )
        for name in ("bos_token_id", "eos_token_id"):
            value = ckpt.config.get(name)
            sp_value = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id()}[name]
            if isinstance(value, int) and value != sp_value:
                problems.append(f"{path / 'config.json'}: {name} is {value} but tokenizer.model says {sp_value}; set it to {sp_value}")
    tj = path / "tokenizer.json"
    if tj.is_file() and "tokenizer_pieces" in facts:
        try:
            n = tokenizer_json_ids(tj)
        except ModelFormatError as e:
            problems.append(str(e))
        else:
            facts["tokenizer_json_vocab"] = n
            if n != facts["tokenizer_pieces"]:
                problems.append(
                    f"{tj} has {n} tokens but tokenizer.model has {facts['tokenizer_pieces']}; it belongs to another "
                    "tokenizer: delete it or write it again (tiblocal vocab extend writes a matching one)"
                )
    return facts, problems


def check_gguf(path: Path) -> tuple[dict, list[str]]:
    info = read_gguf(path)
    problems: list[str] = []
    tensors = {t.name: t for t in info.tensors}
    n = info.vocab_size
    facts = {"format": "gguf", "tokens": n, "token_types": info.token_type_counts(), "special_ids": info.special_ids()}
    if n == 0:
        problems.append(f"{path} has no tokenizer.ggml.tokens; convert the model again with its tokenizer.model")
    if info.token_types and len(info.token_types) != n:
        problems.append(f"{path}: {len(info.token_types)} token types for {n} tokens; convert the model again")
    declared = info.arch_value("{arch}.vocab_size")
    if declared is not None and declared != n:
        problems.append(f"{path}: {info.architecture}.vocab_size is {declared} but the file has {n} tokens; convert it again")
    for name in ("token_embd.weight", "output.weight"):
        t = tensors.get(name)
        if t is not None:
            rows = t.shape[1] if len(t.shape) > 1 else t.shape[0]  # GGUF shapes list the row length first
            facts[f"{name}_rows"] = rows
            if rows != n:
                problems.append(f"{path}: {name} has {rows} rows but the vocabulary has {n} tokens; convert it again from a consistent model")
    for name, value in info.special_ids().items():
        if not 0 <= value < max(n, 1):
            problems.append(f"{path}: the {name} token id {value} is outside the vocabulary of {n}; convert it again")
    return facts, problems


