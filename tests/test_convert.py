"""`tiblocal convert`: llama.cpp on our GGUF gives transformers' logits; tensors equal llama.cpp's own converter's."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm

from conftest import load_hf, run_cli
from tiblocal.convert.hf_to_gguf import hf_to_gguf
from tiblocal.engine import Engine, EngineConfig
from tiblocal.errors import ModelFormatError, TiblocalError

TEXT = "བཀྲ་ཤིས་བདེ་ལེགས། ང་ཚོ་ལྷ་སར་འགྲོ་གི་ཡོད། Hello, world 2024! 中文  two  spaces"


def test_llama_cpp_logits_match_transformers_on_the_merged_model(tmp_path: Path, merged) -> None:
    torch = pytest.importorskip("torch")
    out = tmp_path / "merged-f32.gguf"
    hf_to_gguf(merged, out, outtype="f32")
    sp = spm.SentencePieceProcessor(model_file=str(merged / "tokenizer.model"))
    with Engine(out, EngineConfig(ctx=512, threads=2)) as engine:
        ids = engine.tokenize(TEXT)
        assert ids == [sp.bos_id()] + sp.encode(TEXT)  # same token ids in both runtimes
        ours = engine.eval_logits(ids)
    model = load_hf(merged)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert ours.shape == ref.shape == (len(ids), 760)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(ours - ref).max() < 1e-3


def test_f16_and_q8_0_stay_close(tmp_path: Path, tiny_hf, tiny_gguf) -> None:
    with Engine(tiny_gguf, EngineConfig(ctx=256, threads=2)) as e:
        ids = e.tokenize(TEXT)
        ref = e.eval_logits(ids)
    for outtype, tol in (("f16", 5e-3), ("bf16", 3e-2), ("q8_0", 3e-2)):
        path = tmp_path / f"m-{outtype}.gguf"
        hf_to_gguf(tiny_hf, path, outtype=outtype)
        with Engine(path, EngineConfig(ctx=256, threads=2)) as e:
            got = e.eval_logits(ids)
        assert np.abs(got - ref).max() < tol, outtype


# --- llama.cpp's own converter, from the llama-cpp-python sdist -------------------------------------


@pytest.fixture(scope="session")
def llama_cpp_converter(tmp_path_factory) -> Path:
    """convert_hf_to_gguf.py, conversion/ and gguf-py from the sdist of the installed llama-cpp-python."""
    pytest.importorskip("torch")
    version = metadata.version("llama-cpp-python")
    cache = Path.home() / ".cache" / "tiblocal-tests" / f"llama.cpp-{version}"
    script = cache / "convert_hf_to_gguf.py"
    if not script.is_file():
        dl = tmp_path_factory.mktemp("sdist")
        p = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q", "-d", str(dl),
             f"llama-cpp-python=={version}"],
            capture_output=True, timeout=600,
        )
        sdists = list(dl.glob("*.tar.gz"))
        if p.returncode != 0 or not sdists:
            pytest.skip(f"could not download the llama-cpp-python {version} sdist: {p.stderr.decode()[-300:]}")
        prefix = sdists[0].name[: -len(".tar.gz")] + "/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]
            for m in members:
                m.name = m.name[len(prefix):]
            cache.mkdir(parents=True, exist_ok=True)
            tar.extractall(cache, members=members, filter="data")
    return script


def _fields(path: Path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, [int(d) for d in t.shape], np.asarray(t.data).tobytes()) for t in r.tensors}
    return fields, tensors


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_same_tensors_and_metadata_as_llama_cpp_converter(tmp_path: Path, merged, llama_cpp_converter, outtype) -> None:
    ref_path = tmp_path / "ref.gguf"
    env_path = f"{llama_cpp_converter.parent / 'gguf-py'}:{llama_cpp_converter.parent}"
    p = subprocess.run(
        [sys.executable, str(llama_cpp_converter), str(merged), "--outfile", str(ref_path), "--outtype", outtype],
        capture_output=True, timeout=600, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    ours_path = tmp_path / "ours.gguf"
    hf_to_gguf(merged, ours_path, outtype=outtype, template=None)
    ref_fields, ref_tensors = _fields(ref_path)
    our_fields, our_tensors = _fields(ours_path)
    assert our_tensors.keys() == ref_tensors.keys()
    for name in ref_tensors:
        assert our_tensors[name] == ref_tensors[name], name  # type, shape and every byte
    # every key llama.cpp writes, with the same value (general.name is the folder's name, title-cased there)
    differ = {k for k in ref_fields if k != "general.name" and our_fields.get(k) != ref_fields[k]}
    assert differ == set()
    # keys we write beyond llama.cpp's (it omits add_bos/add_eos without a tokenizer_config.json; its
    # loader's defaults for a SentencePiece vocabulary are the values we write)
    extra = set(our_fields) - set(ref_fields)
    assert extra <= {"tokenizer.ggml.unknown_token_id", "general.type", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"}
    assert our_fields["tokenizer.ggml.add_bos_token"] is True and our_fields["tokenizer.ggml.add_eos_token"] is False


# --- the vocabulary ---------------------------------------------------------------------------------


def test_vocab_only_gguf_tokenizes_like_sentencepiece(tmp_path: Path, merged) -> None:
    import llama_cpp

    out = tmp_path / "vocab.gguf"
    p = run_cli("convert", str(merged), "--out", str(out), "--vocab-only", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["n_tensors"] == 0
    sp = spm.SentencePieceProcessor(model_file=str(merged / "tokenizer.model"))
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    for line in (TEXT, "  leading spaces", "a\n\nb", "ཀྵ་ཧཱུྃ"):
        assert llm.tokenize(line.encode(), add_bos=False, special=False) == sp.encode(line)


def test_embedding_rows_beyond_the_tokenizer_become_padding(tmp_path: Path, tiny_tokenizer) -> None:
    from tiblocal.gguf_file import read_gguf
    from tiblocal.synthetic import LlamaShape, write_llama_checkpoint

    hf = write_llama_checkpoint(tmp_path / "hf", LlamaShape(vocab_size=704), tiny_tokenizer)
    out = tmp_path / "pad.gguf"
    hf_to_gguf(hf, out, outtype="f32")
    info = read_gguf(out)
    assert info.vocab_size == 704
    assert info.tokens[700:] == [f"[PAD{i}]" for i in range(700, 704)]
    assert info.token_type_counts()["UNUSED"] == 4
    with Engine(out, EngineConfig(ctx=64)) as e:
        assert e.n_vocab == 704


def test_metadata_written(tiny_gguf) -> None:
    from tiblocal.gguf_file import read_gguf
    from tiblocal.templates import TEMPLATES

    info = read_gguf(tiny_gguf)
    md = info.metadata
    assert md["llama.attention.head_count"] == 4 and md["llama.rope.freq_base"] == 10000.0
    assert md["tokenizer.ggml.model"] == "llama" and md["tokenizer.ggml.add_bos_token"] is True
    assert md["tokenizer.chat_template"] == TEMPLATES["alpaca"].jinja


# --- bad input ----------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_tokenizer_model(tmp_path: Path, tiny_hf) -> None:
    hf = _copy(tiny_hf, tmp_path / "hf")
    (hf / "tokenizer.model").unlink()
    p = run_cli("convert", str(hf), "--out", str(tmp_path / "x.gguf"))
    assert p.returncode == 1
    assert "has no tokenizer.model; copy the SentencePiece tokenizer.model" in p.stderr.decode()
    assert not (tmp_path / "x.gguf").exists()


def test_config_vocab_size_smaller_than_the_model(tmp_path: Path, tiny_hf) -> None:
    hf = _copy(tiny_hf, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["vocab_size"] = 600
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="vocab_size is 600 but model.embed_tokens.weight has 700 rows; set vocab_size to 700"):
        hf_to_gguf(hf, tmp_path / "x.gguf")


def test_tokenizer_bigger_than_the_embedding(tmp_path: Path, tiny_hf) -> None:
    from conftest import train_tiny_tokenizer

    hf = _copy(tiny_hf, tmp_path / "hf")
    big = train_tiny_tokenizer(tmp_path / "tok", vocab_size=760)
    (hf / "tokenizer.model").write_bytes(big.read_bytes())
    with pytest.raises(ModelFormatError, match="has 760 pieces but the model has only 700 embedding rows"):
        hf_to_gguf(hf, tmp_path / "x.gguf")


def test_not_a_sentencepiece_model(tmp_path: Path, tiny_hf) -> None:
    hf = _copy(tiny_hf, tmp_path / "hf")
    (hf / "tokenizer.model").write_text("not a model")
    with pytest.raises(ModelFormatError, match="is not a SentencePiece model"):
        hf_to_gguf(hf, tmp_path / "x.gguf")


def test_truncated_safetensors(tmp_path: Path, tiny_hf) -> None:
    hf = _copy(tiny_hf, tmp_path / "hf")
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[:-1000])
    with pytest.raises(ModelFormatError, match="model.safetensors is truncated: tensor"):
        hf_to_gguf(hf, tmp_path / "x.gguf")


def test_unsupported_architecture(tmp_path: Path, tiny_hf) -> None:
    hf = _copy(tiny_hf, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="architecture 'GPT2LMHeadModel' is not supported; tiblocal converts"):
        hf_to_gguf(hf, tmp_path / "x.gguf")


def test_existing_output_needs_force(tmp_path: Path, tiny_hf) -> None:
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    p = run_cli("convert", str(tiny_hf), "--out", str(out))
    assert p.returncode == 1 and "already exists; pass --force" in p.stderr.decode()
    assert out.read_bytes() == b"keep me"
    assert run_cli("convert", str(tiny_hf), "--out", str(out), "--force").returncode == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_full_disk_and_ctrl_c_leave_nothing(tmp_path: Path, tiny_hf, monkeypatch) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hf_to_gguf(tiny_hf, out_dir / "x.gguf", progress=interrupt)
    assert list(out_dir.iterdir()) == []

    def no_space(done, total):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(TiblocalError, match="the disk is full while writing"):
        hf_to_gguf(tiny_hf, out_dir / "x.gguf", progress=no_space)
    assert list(out_dir.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("scaling", [
    {"type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32.0, "beta_slow": 1.0},
], ids=["linear", "yarn"])
def test_rope_scaling_written_as_llama_cpps_converter_writes_it(tmp_path: Path, merged, llama_cpp_converter,
                                                                scaling) -> None:
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(merged, hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["rope_scaling"] = scaling
    (hf / "config.json").write_text(json.dumps(cfg))
    ref_path = tmp_path / "ref.gguf"
    env_path = f"{llama_cpp_converter.parent / 'gguf-py'}:{llama_cpp_converter.parent}"
    p = subprocess.run(
        [sys.executable, str(llama_cpp_converter), str(hf), "--outfile", str(ref_path), "--outtype", "f32"],
        capture_output=True, timeout=600, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    hf_to_gguf(hf, tmp_path / "ours.gguf", outtype="f32", template=None)
    ref = {k: v for k, v in _fields(ref_path)[0].items() if ".rope." in k}
    ours = {k: v for k, v in _fields(tmp_path / "ours.gguf")[0].items() if ".rope." in k}
    assert "llama.rope.scaling.type" in ref and ours == ref


def test_yarn_without_its_trained_context_is_refused(tmp_path: Path, tiny_hf) -> None:
    hf = _copy(tiny_hf, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (hf / "config.json").write_text(json.dumps(cfg))
    p = run_cli("convert", str(hf), "--out", str(tmp_path / "x.gguf"))
    assert p.returncode == 1 and "without original_max_position_embeddings" in p.stderr.decode()
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))
