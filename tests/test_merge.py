"""`tiblocal merge` against peft's merge_and_unload(), on a tiny model whose vocabulary the adapter extends."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import N_EXT, load_hf, run_cli, train_tiny_tokenizer

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

from tiblocal.convert.merge import merge_lora  # noqa: E402
from tiblocal.errors import ModelFormatError, TiblocalError  # noqa: E402


def test_merged_weights_equal_peft_merge_and_unload(merged, adapters) -> None:
    reference = adapters[2]
    ours = load_file(str(merged / "model.safetensors"))
    assert set(ours) == set(reference)
    for name, ref in reference.items():
        np.testing.assert_allclose(ours[name], ref, rtol=1e-5, atol=1e-6, err_msg=name)
    assert ours["model.embed_tokens.weight"].shape == (N_EXT, 64)


def test_merged_folder_is_complete(merged, adapters) -> None:
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["vocab_size"] == N_EXT and cfg["torch_dtype"] == "float32"
    assert (merged / "tokenizer.model").read_bytes() == adapters[3].read_bytes()
    sums = dict(reversed(line.split("  ")) for line in (merged / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {"model.safetensors", "config.json", "tokenizer.model"}
    import hashlib

    assert sums["model.safetensors"] == hashlib.sha256((merged / "model.safetensors").read_bytes()).hexdigest()
    # transformers loads it and gives the merged model's logits
    model = load_hf(merged)
    assert model.get_input_embeddings().weight.shape[0] == N_EXT


def test_f16_and_bf16_outputs(tmp_path: Path, tiny_hf, adapters, merged) -> None:
    a_dir, b_dir, reference, _ = adapters
    ours_f32 = load_file(str(merged / "model.safetensors"))
    for dtype, tdtype, tol in (("f16", torch.float16, 1e-3), ("bf16", torch.bfloat16, 8e-3)):
        out = tmp_path / dtype
        p = run_cli("merge", str(tiny_hf), str(a_dir), str(b_dir), "--out", str(out), "--dtype", dtype, "--json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["lora_merged"] == 2 * 7 + 2 * 3 + 1  # A: 7 per layer; B: q, v, down per layer + the embedding
        from safetensors.torch import load_file as load_torch

        ours = load_torch(str(out / "model.safetensors"))
        for name, ref in reference.items():
            assert ours[name].dtype == tdtype
            # the float32 merge, rounded once (round to nearest even, as torch casts)
            assert torch.equal(ours[name], torch.from_numpy(ours_f32[name]).to(tdtype)), name
            np.testing.assert_allclose(ours[name].float().numpy(), ref, rtol=tol, atol=tol * 0.05, err_msg=name)


def test_two_shard_base_gives_two_shards_with_index(tmp_path: Path, tiny_tokenizer, adapters) -> None:
    import sentencepiece as spm

    from tiblocal.synthetic import LlamaShape, write_llama_checkpoint

    n = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer)).vocab_size()
    base = write_llama_checkpoint(tmp_path / "base", LlamaShape(vocab_size=n), tiny_tokenizer, seed=1234, max_shard_bytes=300_000)
    assert (base / "model.safetensors.index.json").is_file()
    out = tmp_path / "merged"
    merge_lora(base, [adapters[0]], out, dtype="f32")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert all((out / f).is_file() for f in index["weight_map"].values())


def test_adapter_for_another_base_is_refused(tmp_path: Path, tiny_tokenizer, tiny_hf) -> None:
    import sentencepiece as spm

    from tiblocal.synthetic import LlamaShape, write_llama_checkpoint

    n = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer)).vocab_size()
    other = write_llama_checkpoint(tmp_path / "other", LlamaShape(vocab_size=n, hidden_size=32, intermediate_size=96), tiny_tokenizer)
    pm = peft.get_peft_model(load_hf(other), peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path / "other-lora")
    with pytest.raises(ModelFormatError, match=r"has shape \(32, 32\) but the base tensor is \(64, 64\); the adapter was trained for another base"):
        merge_lora(tiny_hf, [tmp_path / "other-lora"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_key_matching_no_base_tensor(tmp_path: Path, tiny_hf, adapters) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(adapters[0], bad)
    from safetensors.numpy import load_file as ld, save_file

    t = ld(str(bad / "adapter_model.safetensors"))
    t["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    t["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(t, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ModelFormatError, match=r"model.layers.9.self_attn.q_proj.weight' matches no tensor of the base"):
        merge_lora(tiny_hf, [bad], tmp_path / "out")


@pytest.mark.parametrize("change, match", [
    ([1], r"adapter_config.json is a JSON list; expected an object"),
    ({"r": "abc"}, r"r 'abc' \(expected a whole number of at least 1\)"),  # crashed in int()
    ({"r": 8.5}, r"r 8.5 \(expected a whole number"),  # was taken as 8
    ({"r": None, "lora_alpha": None}, r"r None \(expected a whole number of at least 1\); lora_alpha None"),
    ({"lora_alpha": float("inf")}, r"lora_alpha inf \(expected a finite number\)"),  # merged infinite weights
    ({"use_rslora": "no"}, r"use_rslora 'no' \(expected true or false\)"),  # was taken as true: another scale
    ({"rank_pattern": [2]}, r"rank_pattern \[2\] \(expected an object"),  # crashed
    ({"alpha_pattern": {"down_proj": "x"}}, r"alpha_pattern 'down_proj': 'x' \(expected a finite number\)"),
    ({"rank_pattern": {"(": 2}}, r"rank_pattern key '\(' \(not a regular expression"),  # crashed in re.match
    ({"lora_alpha": 1e308}, r"the LoRA update of .* is not finite \(scale 1.25e\+307"),  # finite, but not its scale
    ({"lora_alpha": 10**400}, r"lora_alpha 1000.* \(expected a finite number\)"),  # OverflowError in math.isfinite
])
def test_adapter_configs_of_wrong_values_are_one_line(tmp_path: Path, tiny_hf, adapters, change, match) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(adapters[0], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(change if isinstance(change, list) else {**cfg, **change}))
    p = run_cli("merge", str(tiny_hf), str(bad), "--out", str(tmp_path / "out"))
    err = p.stderr.decode()
    assert p.returncode == 1 and len(err.splitlines()) == 1 and re.search(match, err), err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_the_finiteness_check_is_exact() -> None:
    from tiblocal.convert.merge import _all_finite

    ones = np.ones((4, 4), np.float32)
    assert _all_finite(ones) and _all_finite(np.full((1000, 1000), 3e35, np.float32))  # the sum overflows, no value
    for bad in (np.nan, np.inf, -np.inf):
        x = ones.copy()
        x[2, 3] = bad
        assert not _all_finite(x)


def test_nan_in_a_lora_tensor_is_refused(tmp_path: Path, tiny_hf, adapters) -> None:
    from safetensors.numpy import load_file as ld, save_file

    bad = tmp_path / "bad"
    shutil.copytree(adapters[0], bad)
    t = ld(str(bad / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    t[key] = t[key].copy()
    t[key][0, 0] = np.nan
    save_file(t, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ModelFormatError, match=r"the LoRA update of model.layers.1.self_attn.v_proj.weight is not "
                                               r"finite .* or NaN or infinity in its lora_A or lora_B"):
        merge_lora(tiny_hf, [bad], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_resized_vocabulary_without_tokenizer(tmp_path: Path, tiny_hf, adapters) -> None:
    bad = tmp_path / "notok"
    shutil.copytree(adapters[0], bad)
    (bad / "tokenizer.model").unlink()
    with pytest.raises(ModelFormatError, match="resize the vocabulary to 760 rows but carry no tokenizer.model"):
        merge_lora(tiny_hf, [bad], tmp_path / "out")


def test_tokenizer_bigger_than_embedding(tmp_path: Path, tiny_hf, adapters) -> None:
    bad = tmp_path / "bigtok"
    shutil.copytree(adapters[0], bad)
    shutil.copyfile(train_tiny_tokenizer(tmp_path / "t900", vocab_size=900), bad / "tokenizer.model")
    with pytest.raises(ModelFormatError, match="has 900 pieces but the merged embed_tokens has 760 rows"):
        merge_lora(tiny_hf, [bad], tmp_path / "out")


def test_truncated_base_shard(tmp_path: Path, tiny_hf, adapters) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_hf, base)
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[: len(data) // 2])
    p = run_cli("merge", str(base), str(adapters[0]), "--out", str(tmp_path / "out"))
    assert p.returncode == 1
    assert "model.safetensors is truncated: tensor" in p.stderr.decode()
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tmp_path: Path, tiny_hf, adapters) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    p = run_cli("merge", str(tiny_hf), str(adapters[0]), "--out", str(out))
    assert p.returncode == 1 and "already exists; pass --force" in p.stderr.decode()
    assert (out / "keep.txt").read_text() == "mine"
    p = run_cli("merge", str(tiny_hf), str(adapters[0]), "--out", str(out), "--force")
    assert p.returncode == 0, p.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_full_disk_leaves_nothing(tmp_path: Path, tiny_hf, adapters, monkeypatch) -> None:
    from tiblocal import checkpoint

    def no_space(self, name, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.SafetensorsWriter, "write", no_space)
    with pytest.raises(TiblocalError, match="the disk is full while writing .*out"):
        merge_lora(tiny_hf, [adapters[0]], tmp_path / "out")
    assert _leftovers(tmp_path) == []


def test_ctrl_c_leaves_nothing(tmp_path: Path, tiny_hf, adapters) -> None:
    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge_lora(tiny_hf, [adapters[0]], tmp_path / "out", progress=interrupt)
    assert _leftovers(tmp_path) == []


def test_pytorch_bin_base_and_adapter(tmp_path: Path, tiny_hf, adapters, merged) -> None:
    """With torch installed, .bin checkpoints merge exactly like their safetensors twins."""
    from safetensors.numpy import load_file as ld

    base = tmp_path / "base-bin"
    base.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(tiny_hf / name, base / name)
    torch.save({k: torch.from_numpy(v) for k, v in ld(str(tiny_hf / "model.safetensors")).items()}, base / "pytorch_model.bin")
    ad = tmp_path / "ad-bin"
    shutil.copytree(adapters[0], ad)
    st = ad / "adapter_model.safetensors"
    torch.save({k: torch.from_numpy(v) for k, v in ld(str(st)).items()}, ad / "adapter_model.bin")
    st.unlink()
    ref = tmp_path / "ref"
    merge_lora(tiny_hf, [adapters[0]], ref, dtype="f32")
    out = tmp_path / "out"
    merge_lora(base, [ad], out, dtype="f32")
    a, b = ld(str(ref / "model.safetensors")), ld(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_verify_the_merged_folder(tmp_path: Path, merged) -> None:
    folder = tmp_path / "m"
    shutil.copytree(merged, folder)
    p = run_cli("verify", str(folder), "--json")
    assert p.returncode == 0, p.stderr
    assert set(json.loads(p.stdout).values()) == {"ok"}
    with open(folder / "config.json", "a") as f:
        f.write(" ")
    (folder / "tokenizer.model").unlink()
    (folder / "notes.txt").write_text("mine")
    p = run_cli("verify", str(folder), "--json")
    assert p.returncode == 1
    assert json.loads(p.stdout) == {"model.safetensors": "ok", "config.json": "changed", "tokenizer.model": "missing",
                                    "notes.txt": "unlisted"}
    assert "2 file(s) do not match SHA256SUMS" in p.stderr.decode()
    p = run_cli("verify", str(tmp_path))
    assert p.returncode == 1 and "has no SHA256SUMS" in p.stderr.decode()
