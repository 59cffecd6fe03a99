"""Shared fixtures: a tiny SentencePiece tokenizer, a tiny random Llama checkpoint, its GGUF.

Everything is built in a few seconds from seeds and the small text samples in tests/data.
"""

from __future__ import annotations

import os
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


def run_cli(*args: str, input: bytes | None = None, timeout: float = 120, env: dict | None = None):
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
    )
