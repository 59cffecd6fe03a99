"""The random adapter the merge benchmark uses is a real peft adapter: peft loads it and merges it as we do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import load_hf


def test_synthetic_adapter_merges_like_peft(tmp_path: Path, tiny_hf, tiny_tokenizer) -> None:
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from safetensors.numpy import load_file

    from tiblocal.convert.merge import merge_lora
    from tiblocal.synthetic import LlamaShape, write_lora_adapter

    shape = LlamaShape(vocab_size=700)
    ad = write_lora_adapter(tmp_path / "ad", shape, r=8, alpha=16, n_vocab=700, tokenizer_model=tiny_tokenizer, dtype="float32")
    ref = peft.PeftModel.from_pretrained(load_hf(tiny_hf), ad).merge_and_unload().state_dict()
    merge_lora(tiny_hf, [ad], tmp_path / "m", dtype="f32")
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    for name, t in ref.items():
        np.testing.assert_allclose(ours[name], t.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.allclose(ours["model.layers.0.self_attn.q_proj.weight"], load_file(str(tiny_hf / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"])
