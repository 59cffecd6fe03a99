"""benchmarks/bench_q8_split.py: its rounded copy holds exactly the weights of llama.cpp's Q8_0 file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
pytest.importorskip("torch")
pytest.importorskip("llama_cpp")


def test_rounded_copy_equals_llama_cpp_q8_0(tiny_hf, tmp_path):
    from bench_q8_split import rounded_copy, same_weights

    from tiblocal.convert.hf_to_gguf import hf_to_gguf
    from tiblocal.quantize.gguf_quant import quantize_gguf

    hf_to_gguf(tiny_hf, tmp_path / "f16.gguf", outtype="f16")
    quantize_gguf(tmp_path / "f16.gguf", tmp_path / "q8.gguf", ["Q8_0"])
    rounded_copy(tiny_hf, tmp_path / "rounded")
    hf_to_gguf(tmp_path / "rounded", tmp_path / "r32.gguf", outtype="f32")
    n, worst = same_weights(tmp_path / "q8.gguf", tmp_path / "r32.gguf")
    assert n >= 2 * 7 + 1 and worst == 0.0  # every projection of both layers and the embedding

    # the check can fail: the unrounded weights differ from the Q8_0 file's
    hf_to_gguf(tiny_hf, tmp_path / "f32.gguf", outtype="f32")
    n, worst = same_weights(tmp_path / "q8.gguf", tmp_path / "f32.gguf")
    assert n >= 15 and worst > 0.0
