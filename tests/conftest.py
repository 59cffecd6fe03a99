"""Shared fixtures: a tiny SentencePiece tokenizer, a tiny random Llama checkpoint, its GGUF.

Everything is built in a few seconds from seeds and the small text samples in tests/data.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
DATA = HERE / "data"
SHARED = (HERE.parent.parent / "shared" / "data").resolve()


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent (the shared data folder beside the checkout); this test needs it")
    return p


def outlier_llama(root: Path, tokenizer: Path, *, outliers: float = 1.0, **shape) -> Path:
    """A random Llama in Hugging Face layout (seeded, ``LlamaShape`` fields as keywords); ``outliers`` scales four
    channels of every RMSNorm weight, as trained models' norms have a few large channels."""
    import sentencepiece as spm
    from safetensors.numpy import load_file, save_file

    from tiblocal.synthetic import LlamaShape, write_llama_checkpoint

    n = spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    hf = write_llama_checkpoint(root / "hf", LlamaShape(vocab_size=n, **shape), tokenizer, seed=11, std=0.05)
    if outliers != 1.0:
        f = hf / "model.safetensors"
        t = load_file(str(f))
        for k, v in t.items():
            if k.endswith("layernorm.weight") or k == "model.norm.weight":
                v[[3, 17, 40, 41]] *= outliers
        save_file(t, str(f), metadata={"format": "pt"})
    return hf


def rewrite_gguf(src: Path, dst: Path, *, values: dict | None = None, strings: dict | None = None,
                 tensors: dict | None = None) -> Path:
    """``src`` written again with gguf-py: ``values`` replace the values of keys it has, ``strings`` and ``tensors``
    are added."""
    import gguf
    import numpy as np

    from tiblocal.gguf_file import copy_metadata

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, "llama")
    copy_metadata(r, w, values=values)
    for k, v in (strings or {}).items():
        w.add_string(k, v)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data).reshape([int(x) for x in reversed(t.shape)]))
    for name, a in (tensors or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def train_tiny_tokenizer(out_dir: Path, vocab_size: int = 700) -> Path:
    """A Llama-style SentencePiece BPE (byte fallback, digits split) on the sample texts."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=[str(DATA / "tibetan_sample.txt"), str(DATA / "english_sample.txt")],
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 2-layer, 64-wide random Llama in Hugging Face layout (f32 safetensors)."""
    import sentencepiece as spm

    from tiblocal.synthetic import LlamaShape, write_llama_checkpoint

    n = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer)).vocab_size()
    out = tmp_path_factory.mktemp("hf") / "tiny-llama"
    return write_llama_checkpoint(out, LlamaShape(vocab_size=n), tiny_tokenizer, seed=1234)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_hf) -> Path:
    from tiblocal.convert.hf_to_gguf import hf_to_gguf

    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    hf_to_gguf(tiny_hf, out, outtype="f32", template="alpaca")
    return out


@pytest.fixture(scope="session")
def tiny256(tmp_path_factory, tiny_tokenizer) -> tuple[Path, Path]:
    """A random Llama 256 wide (so k-quants apply to every matrix) and its f32 GGUF: (hf folder, gguf)."""
    import sentencepiece as spm

    from tiblocal.convert.hf_to_gguf import hf_to_gguf
    from tiblocal.synthetic import LlamaShape, write_llama_checkpoint

    n = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer)).vocab_size()
    root = tmp_path_factory.mktemp("tiny256")
    shape = LlamaShape(vocab_size=n, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)
    hf = write_llama_checkpoint(root / "hf", shape, tiny_tokenizer, seed=7, std=0.05)
    gguf_path = root / "tiny256-f32.gguf"
    hf_to_gguf(hf, gguf_path, outtype="f32")
    return hf, gguf_path


# --- LoRA adapters over an extended vocabulary (need torch and peft) ---------------------------------

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_EXT = 760  # rows after the "vocabulary extension"


def load_hf(path: Path, n_vocab: int | None = None):
    """A transformers model in float32 (resized to ``n_vocab`` rows when given)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if n_vocab is not None and model.get_input_embeddings().weight.shape[0] != n_vocab:
        model.resize_token_embeddings(n_vocab, mean_resizing=False)
    return model.eval()


def _randomise(model, seed: int) -> None:
    """LoRA B starts at zero and modules_to_save start as copies: make every trained part non-trivial."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, tiny_hf):
    """Adapter A (pretraining: r 8 on the seven projections, embed_tokens/lm_head trained, vocabulary
    extended to 760 rows, with its tokenizer) and adapter B (SFT on top: rsLoRA r 4 with a rank pattern,
    LoRA on the embedding too)."""
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("adapters")
    ext_tok = train_tiny_tokenizer(root / "tok-ext", vocab_size=N_EXT)

    base = load_hf(tiny_hf, N_EXT)
    cfg_a = peft.LoraConfig(r=8, lora_alpha=16, target_modules=PROJ, modules_to_save=["embed_tokens", "lm_head"],
                            lora_dropout=0.05, task_type="CAUSAL_LM")
    pa = peft.get_peft_model(base, cfg_a)
    _randomise(pa, 1)
    a_dir = root / "pt-lora"
    pa.save_pretrained(a_dir)
    shutil.copyfile(ext_tok, a_dir / "tokenizer.model")

    merged_a = pa.merge_and_unload()
    cfg_b = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                            rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3}, task_type="CAUSAL_LM")
    pb = peft.get_peft_model(merged_a, cfg_b)
    _randomise(pb, 2)
    b_dir = root / "sft-lora"
    pb.save_pretrained(b_dir)
    shutil.copyfile(ext_tok, b_dir / "tokenizer.model")
    reference = {k: v.detach().numpy().copy() for k, v in pb.merge_and_unload().state_dict().items()}
    return a_dir, b_dir, reference, ext_tok


@pytest.fixture(scope="session")
def merged(tmp_path_factory, tiny_hf, adapters):
    from tiblocal.convert.merge import merge_lora

    a_dir, b_dir, _, _ = adapters
    out = tmp_path_factory.mktemp("merged") / "model"
    merge_lora(tiny_hf, [a_dir, b_dir], out, dtype="f32")
    return out



def run_cli(*args: str, input: bytes | None = None, timeout: float = 120, env: dict | None = None, cwd=None):
    """Run ``python -m tiblocal ARGS`` as a user would; returns the CompletedProcess."""
    import subprocess

    full_env = dict(os.environ, PYTHONIOENCODING="utf-8", NO_COLOR="1", COLUMNS="200")
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "tiblocal", *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd,
    )
