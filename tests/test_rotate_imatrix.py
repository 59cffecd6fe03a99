"""Importance matrices for rotated models: `tiblocal imatrix --rotate SEED` measures what the model that
`tiblocal quantize --rotate SEED` writes multiplies by, and quantize takes a matrix only in the model's own basis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, outlier_llama, run_cli
from tiblocal.errors import TiblocalError
from tiblocal.gguf_file import read_gguf
from tiblocal.quantize.gguf_quant import quantize_gguf
from tiblocal.quantize.imatrix import Imatrix, compute_imatrices, compute_imatrix, load_imatrix, write_imatrix
from tiblocal.quantize.rotate import Rotation, head_rotation, rotate_gguf
from tiblocal.quantize.rotated_quant import quantize_rotated

TEXT = DATA / "tibetan_sample.txt"


def _rotated_hf(hf: Path, out: Path, seed: int) -> Path:
    """The Hugging Face model that `quantize --rotate SEED`'s GGUF holds, built here with dense matrices: norms
    folded in and set to 1, Q on the residual side of every matrix, H per head on the values and attn_output's
    columns, the output matrix untied."""
    import shutil

    from safetensors.numpy import load_file, save_file

    cfg = json.loads((hf / "config.json").read_text())
    n, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = n // heads
    q = Rotation(n, seed).dense().astype(np.float64)
    h = head_rotation(hd, seed).astype(np.float32).astype(np.float64)
    t = {k: v.astype(np.float64) for k, v in load_file(str(hf / "model.safetensors")).items()}
    new = {"model.embed_tokens.weight": t["model.embed_tokens.weight"] @ q}
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    new["lm_head.weight"] = (head * t["model.norm.weight"][None, :]) @ q
    new["model.norm.weight"] = np.ones(n)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm, names in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            for name in names:
                new[p + name + ".weight"] = (t[p + name + ".weight"] * t[p + norm + ".weight"][None, :]) @ q
            new[p + norm + ".weight"] = np.ones(n)
        v = new[p + "self_attn.v_proj.weight"]
        new[p + "self_attn.v_proj.weight"] = np.matmul(h.T, v.reshape(kv, hd, n)).reshape(v.shape)
        o = q.T @ t[p + "self_attn.o_proj.weight"]
        new[p + "self_attn.o_proj.weight"] = (o.reshape(n, heads, hd) @ h).reshape(n, heads * hd)
        new[p + "mlp.down_proj.weight"] = q.T @ t[p + "mlp.down_proj.weight"]
    shutil.copytree(hf, out)
    cfg["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.astype(np.float32) for k, v in new.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("shape", [
    dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=4),  # head size 24: H is a random orthogonal matrix
])
def test_rotated_imatrix_is_what_the_rotated_model_multiplies_by(tmp_path, tiny_tokenizer, shape) -> None:
    import torch
    import transformers

    from tiblocal.convert.hf_to_gguf import hf_to_gguf
    from tiblocal.quantize.calibration import calibration_windows

    hf = outlier_llama(tmp_path, tiny_tokenizer, outliers=4.0, **shape)
    ref = _rotated_hf(hf, tmp_path / "rotated-hf", seed=5)
    # the reference is the same model (so its matrices' inputs are the rotated model's)
    ids = torch.tensor([calibration_windows(hf, [TEXT], 1, 32)[0]["input_ids"]])
    with torch.inference_mode():
        a, b = (transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(input_ids=ids).logits
                for d in (hf, ref))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    (plain, _), (turned, counts) = compute_imatrices(hf, [TEXT], [None, 5], chunks=2, ctx=32)
    expected, _ = compute_imatrix(ref, [TEXT], chunks=2, ctx=32)  # measured on the rotated weights themselves
    assert turned.rotation == [5] and plain.rotation == []
    assert set(turned.entries) == set(expected.entries)
    for name, values in expected.entries.items():
        np.testing.assert_allclose(turned.entries[name], values, rtol=2e-4, atol=1e-6 * float(values.max()), err_msg=name)
    # the pass that measures both gives the plain matrix as compute_imatrix alone does
    alone, _ = compute_imatrix(hf, [TEXT], chunks=2, ctx=32)
    assert set(plain.entries) == set(alone.entries)
    for name, values in alone.entries.items():
        np.testing.assert_allclose(plain.entries[name], values, rtol=1e-6)
    # ... and its names and widths are those of the GGUF that --rotate writes (the embedding is only looked up)
    gguf_path = tmp_path / "m.gguf"
    hf_to_gguf(hf, gguf_path, outtype="f32")
    rotated = rotate_gguf(gguf_path, tmp_path / "r.gguf", seed=5).path
    widths = {t.name: t.shape[0] for t in read_gguf(rotated).tensors if len(t.shape) == 2}
    assert {k: len(v) for k, v in turned.entries.items()} == {k: w for k, w in widths.items() if k != "token_embd.weight"}
    assert set(counts.values()) == {64}


def test_quantize_rotate_takes_the_matrix_of_its_rotation(tmp_path, tiny_tokenizer) -> None:
    from tiblocal.convert.hf_to_gguf import hf_to_gguf

    hf = outlier_llama(tmp_path, tiny_tokenizer, outliers=4.0, hidden_size=256, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=4, tie_word_embeddings=True)
    src = tmp_path / "m.gguf"
    hf_to_gguf(hf, src, outtype="f32")
    im5 = tmp_path / "im5.gguf"
    p = run_cli("imatrix", str(hf), "--rotate", "5", "--text", str(TEXT), "--chunks", "2", "--ctx", "32",
                "--out", str(im5), "--json", timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert json.loads(p.stdout)["rotation_seed"] == 5 and load_imatrix(im5).rotation == [5]
    p = run_cli("imatrix", str(hf), "--rotate", str(2**31), "--text", str(TEXT), "--chunks", "2", "--ctx", "32",
                "--out", str(tmp_path / "big.gguf"))
    assert p.returncode == 1 and f"--rotate {2**31}: a rotation's seed is 0 to 2147483647" in p.stderr.decode()
    assert not (tmp_path / "big.gguf").exists()
    shown = run_cli("inspect", str(im5)).stdout.decode()
    assert "importance matrix (GGUF)" in shown and "rotated, seed 5 (for quantize --rotate)" in shown
    # IQ2_XXS needs a matrix: with --rotate it could not be made before
    out = tmp_path / "q.gguf"
    p = run_cli("quantize", str(src), "--type", "IQ2_XXS", "--rotate", "5", "--imatrix", str(im5), "--out", str(out),
                "--json", timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    meta = read_gguf(out).metadata
    assert meta["tiblocal.rotation.seed"] == [5] and meta["quantize.imatrix.entries_count"] == len(load_imatrix(im5).entries)

    plain_im, counts = compute_imatrix(hf, [TEXT], chunks=2, ctx=32)
    plain = tmp_path / "plain.gguf"
    write_imatrix(plain, plain_im, counts, 32)
    assert load_imatrix(plain).rotation == []
    im0 = tmp_path / "im0.gguf"
    assert run_cli("imatrix", str(hf), "--rotate", "--text", str(TEXT), "--chunks", "1", "--ctx", "32",
                   "--out", str(im0), timeout=300).returncode == 0
    assert load_imatrix(im0).rotation == [0]  # --rotate alone: seed 0, as quantize --rotate
    y = tmp_path / "y.gguf"
    refusals = [
        # the unrotated model's matrix, or another seed's, with --rotate 5
        (dict(imatrix=plain, seed=5), r"plain\.gguf was measured in the unrotated basis, but .*m\.gguf is quantized "
                                      r"in the basis of --rotate 5.*tiblocal imatrix HF_DIR --rotate 5 --out FILE"),
        (dict(imatrix=im0, seed=5), r"im0\.gguf was measured in the basis of --rotate 0, but .* --rotate 5"),
        (dict(imatrix=im5, seed=5, trials=2), r"--imatrix with --rotate-trials 2: a matrix fits one rotation only"),
    ]
    for kw, message in refusals:
        with pytest.raises(TiblocalError, match=message):
            quantize_rotated(src, y, ["Q4_K_M"], **kw)
    # a matrix that does not say its basis (llama-imatrix's) is refused with --rotate ...
    unsaid = Imatrix(tmp_path / "llama.gguf", load_imatrix(im5).entries)
    with pytest.raises(TiblocalError, match=r"llama\.gguf does not say which basis .*tiblocal imatrix HF_DIR --rotate 5"):
        quantize_rotated(src, y, ["Q4_K_M"], seed=5, imatrix=unsaid)
    # ... and a rotated matrix for the unrotated model, or for a model rotated otherwise, without --rotate
    with pytest.raises(TiblocalError, match=r"im5\.gguf was measured in the basis of --rotate 5, but .*m\.gguf is "
                                            r"quantized in the unrotated basis.*tiblocal imatrix HF_DIR --out FILE"):
        quantize_gguf(src, y, ["Q4_K_M"], imatrix=im5)
    r0 = rotate_gguf(src, tmp_path / "r0.gguf", seed=0).path
    with pytest.raises(TiblocalError, match=r"im5\.gguf was measured in the basis of --rotate 5, but .*r0\.gguf .*--rotate 0"):
        quantize_gguf(r0, y, ["Q4_K_M"], imatrix=im5)
    quantize_gguf(r0, y, ["Q4_K_M"], imatrix=im0)  # its own rotation's matrix is taken
    y.unlink()
    p = run_cli("quantize", str(src), "--type", "Q4_K_M", "--rotate", "5", "--imatrix", str(plain), "--out", str(y))
    err = p.stderr.decode()
    assert p.returncode == 1 and "measured in the unrotated basis" in err and len(err.strip().splitlines()) == 1
    assert not y.exists() and [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []



def test_quantize_rotated_checks_the_matrix_basis_once_before_it_rotates(tmp_path, tiny_tokenizer, monkeypatch) -> None:
    """quantize --rotate SEED --imatrix checks the matrix's basis once, before the rotation, and the quantizer it
    calls (for each type, and again for a tied embedding) does not check it again."""
    from tiblocal.convert.hf_to_gguf import hf_to_gguf
    from tiblocal.quantize import gguf_quant

    hf = outlier_llama(tmp_path, tiny_tokenizer, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=4, tie_word_embeddings=True)
    src = tmp_path / "m.gguf"
    hf_to_gguf(hf, src, outtype="f32")
    im, counts = compute_imatrix(hf, [TEXT], chunks=1, ctx=32, rotate=3)
    path = tmp_path / "im3.gguf"
    write_imatrix(path, im, counts, 32)
    calls = []
    real = gguf_quant.check_imatrix_basis
    monkeypatch.setattr(gguf_quant, "check_imatrix_basis", lambda *a: (calls.append(a[2]), real(*a))[1])
    results, seeds, _ = quantize_rotated(src, tmp_path / "q-{type}.gguf", ["Q4_0", "Q8_0"], seed=3, imatrix=path)
    assert [r.type for r in results] == ["Q4_0", "Q8_0"] and seeds == {"Q4_0": 3, "Q8_0": 3}
    assert calls == [[3]]
    # a matrix of another basis still stops before anything is written
    calls.clear()
    with pytest.raises(TiblocalError, match="was measured in the basis of --rotate 3, but"):
        quantize_rotated(src, tmp_path / "r-{type}.gguf", ["Q4_0"], seed=4, imatrix=path)
    assert calls == [[4]] and not list(tmp_path.glob("r-*"))
