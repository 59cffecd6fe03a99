"""`tiblocal quantize --imatrix`: llama-imatrix files (GGUF and legacy .dat) passed to llama.cpp's quantizer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, run_cli
from tiblocal.errors import InputFileError, TiblocalError
from tiblocal.gguf_file import read_gguf
from tiblocal.quantize.gguf_quant import quantize_gguf
from tiblocal.quantize.imatrix import DTYPES, Imatrix, compute_imatrix, load_imatrix, write_imatrix
from tiblocal.pipelines.release import ReleaseOptions, release


def _weights(model: Path) -> dict[str, int]:
    """Each matrix llama.cpp may quantize with an imatrix, with its input width (GGUF's first dimension)."""
    return {t.name: t.shape[0] for t in read_gguf(model).tensors if len(t.shape) == 2}


def _sums(model: Path, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.gamma(0.5, 2.0, size=width).astype(np.float32) for name, width in _weights(model).items()}


def write_gguf_imatrix(path: Path, sums: dict[str, np.ndarray], count: int, *, metadata: bool = True) -> Path:
    """What llama-imatrix writes (NAME.in_sum2 and NAME.counts, the imatrix.* keys), by tiblocal's writer; with
    ``metadata=False`` the same tensors and no imatrix.* keys."""
    import gguf

    im = Imatrix(Path(), sums, ["tibetan_sample.txt"], 4)
    if metadata:
        write_imatrix(path, im, {name: count for name in sums}, 512)
        return path
    w = gguf.GGUFWriter(path, "llama")
    for name, s in sums.items():
        w.add_tensor(f"{name}.in_sum2", (s * count).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[count]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_legacy_imatrix(path: Path, sums: dict[str, np.ndarray], ncall: int) -> Path:
    """llama-imatrix's older .dat: entries of (name, ncall, values summed over the calls), then chunks and dataset."""
    out = [struct.pack("<i", len(sums))]
    for name, s in sums.items():
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, len(s)), (s * ncall).astype("<f4").tobytes()]
    out += [struct.pack("<i", 4), struct.pack("<i", 18), b"tibetan_sample.txt"]
    path.write_bytes(b"".join(out))
    return path


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    import gguf

    return {t.name: bytes(t.data) for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def model(tiny256) -> Path:
    return tiny256[1]


def test_types_that_need_an_importance_matrix_say_so(tmp_path: Path, model) -> None:
    out = tmp_path / "q.gguf"
    p = run_cli("quantize", str(model), "--type", "IQ2_XXS", "--out", str(out))
    err = p.stderr.decode()
    assert p.returncode == 1
    assert "could not quantize" in err and "requires an importance matrix" in err and "offending tensor: blk." in err
    assert "Pass --imatrix FILE" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_iq2_xxs_with_an_imatrix_and_its_keys_in_the_output(tmp_path: Path, model) -> None:
    im = write_gguf_imatrix(tmp_path / "im.gguf", _sums(model, 1), 2048)
    out = tmp_path / "q.gguf"
    p = run_cli("quantize", str(model), "--type", "IQ2_XXS", "--imatrix", str(im), "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr
    info = read_gguf(out)
    assert info.file_type == "IQ2_XXS"
    assert info.metadata["quantize.imatrix.file"] == str(im)
    assert info.metadata["quantize.imatrix.dataset"] == "tibetan_sample.txt"
    assert info.metadata["quantize.imatrix.entries_count"] == len(_weights(model))
    assert info.metadata["quantize.imatrix.chunks_count"] == 4


def test_the_importance_matrix_steers_the_rounding_and_both_formats_read_the_same(tmp_path: Path, model) -> None:
    a = write_gguf_imatrix(tmp_path / "a.gguf", _sums(model, 1), 2048)
    b = write_gguf_imatrix(tmp_path / "b.gguf", _sums(model, 2), 2048)
    # the same means in the other format, over another count (powers of two, so that sums / count is exact in float32)
    a_dat = write_legacy_imatrix(tmp_path / "a.dat", _sums(model, 1), 8)
    outs = {}
    for name, im in (("none", None), ("a", a), ("b", b), ("a_dat", a_dat)):
        outs[name] = _tensor_bytes(quantize_gguf(model, tmp_path / f"q-{name}.gguf", ["Q4_K_M"], imatrix=im)[0].path)
    layer = "blk.0.attn_q.weight"
    assert outs["a"][layer] != outs["none"][layer] and outs["a"][layer] != outs["b"][layer]
    assert outs["a"] == outs["a_dat"]
    assert load_imatrix(a_dat).chunk_count == 4 and load_imatrix(a_dat).datasets == ["tibetan_sample.txt"]


def test_bad_importance_matrices(tmp_path: Path, model) -> None:
    with pytest.raises(InputFileError, match="no such importance matrix file: .*llama-imatrix"):
        quantize_gguf(model, tmp_path / "out", ["IQ2_XXS", "IQ3_XXS"], imatrix=tmp_path / "none.gguf")
    assert not (tmp_path / "out").exists()  # refused before the output folder is made
    with pytest.raises(InputFileError, match=r"is not a usable importance matrix: it lacks the keys imatrix.datasets"):
        load_imatrix(write_gguf_imatrix(tmp_path / "nometa.gguf", _sums(model, 1), 8, metadata=False))
    with pytest.raises(InputFileError, match="it holds no .in_sum2/.counts tensors"):
        load_imatrix(write_gguf_imatrix(tmp_path / "empty.gguf", {}, 8))
    dat = write_legacy_imatrix(tmp_path / "cut.dat", _sums(model, 1), 3)
    dat.write_bytes(dat.read_bytes()[:200])
    with pytest.raises(InputFileError, match="cut.dat is not a usable importance matrix: it ends at byte 200"):
        load_imatrix(dat)
    for bad, fmt in ((np.nan, "gguf"), (np.inf, "dat")):  # refused on reading, not by llama.cpp after the long work
        sums = _sums(model, 1)
        sums["blk.0.attn_k.weight"][2] = bad
        path = (write_gguf_imatrix(tmp_path / "nan.gguf", sums, 8) if fmt == "gguf"
                else write_legacy_imatrix(tmp_path / "inf.dat", sums, 3))
        with pytest.raises(InputFileError, match=f"blk.0.attn_k.weight holds a value that is not a finite number \\({bad}\\)"):
            load_imatrix(path)
    text = tmp_path / "notes.txt"
    text.write_text("not an imatrix\n")
    with pytest.raises(InputFileError, match="notes.txt is not a usable importance matrix"):
        load_imatrix(text)
    # an imatrix that misses a tensor the type needs: llama.cpp names it, tiblocal says what to do
    partial = {k: v for k, v in _sums(model, 1).items() if k != "blk.0.attn_k.weight"}
    im = write_gguf_imatrix(tmp_path / "partial.gguf", partial, 64)
    with pytest.raises(TiblocalError, match="partial.gguf does not fit this model there"):
        quantize_gguf(model, tmp_path / "q.gguf", ["IQ2_XXS"], imatrix=im)
    assert not (tmp_path / "q.gguf").exists()


@pytest.fixture(scope="session")
def llama_quantize() -> str:
    """llama.cpp's own llama-quantize, of the llama.cpp the installed bindings vendor: $TIBLOCAL_LLAMA_QUANTIZE, else
    built once by benchmarks/bench_engine.py's builder (pip downloads the bindings' sdist, CMake builds the tool and
    libllama: minutes on 2 cores the first time, then cached under ~/.cache/tiblocal/llama.cpp). Where it cannot be
    built the comparison skips and says why, except under .ci/run (TIBLOCAL_CI=1), where that fails."""
    import os
    import sys

    if os.environ.get("TIBLOCAL_LLAMA_QUANTIZE"):
        return os.environ["TIBLOCAL_LLAMA_QUANTIZE"]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from bench_engine import build_llama_tool

        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tiblocal" / "llama.cpp"
        return str(build_llama_tool(root, "llama-quantize"))
    except Exception as e:  # no network for the sdist, no CMake or compiler
        if os.environ.get("TIBLOCAL_CI") == "1":
            raise
        pytest.skip(f"llama-quantize could not be built here ({type(e).__name__}: {e}); set TIBLOCAL_LLAMA_QUANTIZE "
                    "to one built from the bindings' llama.cpp")
    finally:
        sys.path.remove(str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["IQ2_XXS", "IQ3_XXS", "Q2_K_S", "Q4_K_M"])
def test_same_file_as_llama_quantize_with_the_same_imatrix(tmp_path: Path, model, qtype, llama_quantize) -> None:
    import subprocess

    binary = llama_quantize
    im = write_gguf_imatrix(tmp_path / "im.gguf", _sums(model, 3), 1024)
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    subprocess.run([binary, "--imatrix", str(im), str(model), str(ref), qtype, "2"], check=True, capture_output=True)
    quantize_gguf(model, ours, [qtype], threads=2, imatrix=im)
    assert _tensor_bytes(ours) == _tensor_bytes(ref)
    keys = [{k: v for k, v in read_gguf(p).metadata.items() if k.startswith("quantize.")} for p in (ours, ref)]
    assert keys[0] == keys[1] and len(keys[0]) == 4


# --- tiblocal imatrix: the importance matrix from a Hugging Face model -----------------------------------------------


def test_computed_imatrix_is_the_mean_square_of_each_matrix_input(tiny256) -> None:
    import torch
    import transformers

    from tiblocal.quantize.calibration import calibration_windows

    hf, model = tiny256
    text = [DATA / "tibetan_sample.txt"]
    im, counts = compute_imatrix(hf, text, chunks=2, ctx=32)
    assert set(im.entries) == set(_weights(model)) - {"token_embd.weight"}  # every matrix llama.cpp multiplies by
    assert set(counts.values()) == {2 * 32} and im.chunk_count == 2 and im.datasets == ["tibetan_sample.txt"]
    # by hand: the first layer's attention input is input_layernorm(embeddings), the output's is the final norm
    m = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids = torch.tensor([w["input_ids"] for w in calibration_windows(hf, text, 2, 32)])
    with torch.inference_mode():
        x = m.model.layers[0].input_layernorm(m.model.embed_tokens(ids)).reshape(-1, m.config.hidden_size).double()
        last = m(input_ids=ids, output_hidden_states=True).hidden_states[-1].reshape(-1, m.config.hidden_size).double()
    np.testing.assert_allclose(im.entries["blk.0.attn_q.weight"], (x * x).mean(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(im.entries["blk.0.attn_v.weight"], im.entries["blk.0.attn_q.weight"])
    np.testing.assert_allclose(im.entries["output.weight"], (last * last).mean(0).numpy(), rtol=1e-4)
    # in bf16 the same matrices, to bf16's precision (the squares still summed in float64)
    half, _ = compute_imatrix(hf, text, chunks=2, ctx=32, dtype="bf16")
    assert set(half.entries) == set(im.entries)
    for name, values in im.entries.items():
        np.testing.assert_allclose(half.entries[name], values, rtol=0.1, atol=1e-3 * float(values.max()))
    assert any(not np.array_equal(half.entries[n], im.entries[n]) for n in im.entries)
    with pytest.raises(TiblocalError, match="--dtype f8: expected one of f32, bf16, f16"):
        compute_imatrix(hf, text, chunks=2, ctx=32, dtype="f8")


def test_the_cli_offers_the_dtypes_imatrix_runs_in() -> None:
    from tiblocal.cli import build_parser

    verbs = next(a for a in build_parser()._actions if a.dest == "verb").choices
    offered = {name: next(a.choices for a in verbs[name]._actions if a.dest == dest)
               for name, dest in (("imatrix", "dtype"), ("release", "imatrix_dtype"))}
    assert offered == {"imatrix": list(DTYPES), "release": list(DTYPES)}


def test_imatrix_command_writes_what_quantize_reads(tmp_path: Path, tiny256) -> None:
    hf, model = tiny256
    out = tmp_path / "im.gguf"
    p = run_cli("imatrix", str(hf), "--text", str(DATA / "tibetan_sample.txt"), "--chunks", "2", "--ctx", "32",
                "--out", str(out), "--json", timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["entries"] == len(_weights(model)) - 1
    # --no-output: only the layers' matrices, as llama-imatrix without --process-output
    p = run_cli("imatrix", str(hf), "--text", str(DATA / "tibetan_sample.txt"), "--chunks", "2", "--ctx", "32",
                "--out", str(tmp_path / "layers.gguf"), "--no-output", timeout=300)
    assert p.returncode == 0, p.stderr
    assert set(load_imatrix(tmp_path / "layers.gguf").entries) == {n for n in _weights(model) if n.startswith("blk.")}
    im = load_imatrix(out)
    assert im.chunk_count == 2 and im.datasets == ["tibetan_sample.txt"]
    q = quantize_gguf(model, tmp_path / "q.gguf", ["IQ2_XXS"], imatrix=out)[0]
    assert read_gguf(q.path).metadata["quantize.imatrix.entries_count"] == len(im.entries)
    again = run_cli("imatrix", str(hf), "--text", str(DATA / "tibetan_sample.txt"), "--chunks", "2", "--ctx", "32",
                    "--out", str(out))
    assert again.returncode == 1 and "already exists; pass --force" in again.stderr.decode()
    short = run_cli("imatrix", str(hf), "--text", str(DATA / "tibetan_sample.txt"), "--chunks", "100000",
                    "--out", str(tmp_path / "x.gguf"), timeout=300)
    err = short.stderr.decode()
    assert short.returncode == 1 and "fewer than --chunks 100000; give more text with --text, or lower --chunks or --ctx" in err
    assert not (tmp_path / "x.gguf").exists()
    zero = run_cli("imatrix", str(hf), "--chunks", "0", "--out", str(tmp_path / "x.gguf"))
    assert zero.returncode == 1 and "--chunks 0 --ctx 512: expected at least 1 window" in zero.stderr.decode()


def test_tied_embeddings_give_the_output_product_the_embedding_name(tmp_path: Path, tiny_tokenizer) -> None:
    import sentencepiece as spm

    from tiblocal.synthetic import LlamaShape, write_llama_checkpoint

    n = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer)).vocab_size()
    shape = LlamaShape(vocab_size=n, hidden_size=64, intermediate_size=128, tie_word_embeddings=True)
    hf = write_llama_checkpoint(tmp_path / "hf", shape, tiny_tokenizer, seed=3)
    im, _ = compute_imatrix(hf, [DATA / "tibetan_sample.txt"], chunks=1, ctx=32)
    # llama.cpp multiplies the last hidden state by token_embd.weight when there is no output.weight
    assert "token_embd.weight" in im.entries and "output.weight" not in im.entries
    no_output, _ = compute_imatrix(hf, [DATA / "tibetan_sample.txt"], chunks=1, ctx=32, output=False)
    assert set(no_output.entries) == set(im.entries) - {"token_embd.weight"}


def test_release_makes_the_imatrix_ships_it_and_quantizes_with_it(tmp_path: Path, tiny256) -> None:
    hf, _ = tiny256
    text = str(DATA / "tibetan_sample.txt")
    out = tmp_path / "rel"
    p = run_cli("release", str(hf), "--out", str(out), "--name", "t", "--types", "IQ2_XXS,Q4_K_M", "--imatrix-text", text,
                "--imatrix-chunks", "3", "--imatrix-dtype", "bf16", "--device", "cpu", "--json", timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    files = sorted(x.name for x in out.iterdir())
    assert "t.imatrix.gguf" in files and "t-IQ2_XXS.gguf" in files  # IQ2_XXS is refused without an imatrix
    im = load_imatrix(out / "t.imatrix.gguf")
    assert im.chunk_count == 3 and im.datasets == ["tibetan_sample.txt"]
    # the same matrix as `tiblocal imatrix` makes on the same text in the same dtype (bf16 moves it by about 1e-2
    # from f32), and the same file as quantize makes with it
    alone = tmp_path / "alone.gguf"
    assert run_cli("imatrix", str(hf), "--text", text, "--chunks", "3", "--out", str(alone), "--device", "cpu",
                   "--dtype", "bf16", timeout=300).returncode == 0
    ref = load_imatrix(alone)
    assert set(ref.entries) == set(im.entries)
    for name, values in ref.entries.items():
        np.testing.assert_allclose(im.entries[name], values, rtol=1e-6)
    # made with the matrix as the shipped file holds it (3 × 512 rows: the stored sums do not round-trip exactly)
    for t in ("IQ2_XXS", "Q4_K_M"):
        q = quantize_gguf(out / "t-f16.gguf", tmp_path / f"q-{t}.gguf", [t], imatrix=out / "t.imatrix.gguf")[0]
        assert _tensor_bytes(q.path) == _tensor_bytes(out / f"t-{t}.gguf"), t
    plain = quantize_gguf(out / "t-f16.gguf", tmp_path / "plain.gguf", ["Q4_K_M"])[0]
    assert _tensor_bytes(plain.path) != _tensor_bytes(out / "t-Q4_K_M.gguf")
    meta = read_gguf(out / "t-Q4_K_M.gguf", with_tokens=False).metadata
    assert meta["quantize.imatrix.file"] == "t.imatrix.gguf"  # not the temporary folder it was made in
    info = json.loads((out / "quantization.json").read_text())["imatrix"]
    assert info == {"file": "t.imatrix.gguf", "made": True, "datasets": ["tibetan_sample.txt"], "chunks": 3, "ctx": 512,
                    "dtype": "bf16"}
    card = (out / "README.md").read_text()
    assert "importance matrix `t.imatrix.gguf` (made by `tiblocal imatrix` from this model on tibetan_sample.txt, 3 " \
           "windows of 512 tokens, the model run in bf16)" in card
    assert "tiblocal chat t-IQ2_XXS.gguf" in card and "  t.imatrix.gguf\n" in (out / "SHA256SUMS").read_text()
    assert run_cli("verify", str(out)).returncode == 0


def test_release_with_a_given_imatrix(tmp_path: Path, tiny256, model) -> None:
    hf, _ = tiny256
    dat = write_legacy_imatrix(tmp_path / "mine.dat", _sums(model, 5), 3)
    out = tmp_path / "rel"
    p = run_cli("release", str(hf), "--out", str(out), "--name", "t", "--types", "Q2_K_S", "--imatrix", str(dat), timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert (out / "t.imatrix.dat").read_bytes() == dat.read_bytes()
    q = quantize_gguf(out / "t-f16.gguf", tmp_path / "q.gguf", ["Q2_K_S"], imatrix=dat)[0]
    assert _tensor_bytes(q.path) == _tensor_bytes(out / "t-Q2_K_S.gguf")
    assert read_gguf(out / "t-Q2_K_S.gguf", with_tokens=False).metadata["quantize.imatrix.file"] == "t.imatrix.dat"
    assert "importance matrix `t.imatrix.dat` (given, computed on tibetan_sample.txt, 4 windows)" in (out / "README.md").read_text()
    info = json.loads((out / "quantization.json").read_text())["imatrix"]
    assert info["source"] == "mine.dat"  # its name, not its path on the machine that made the release


def test_release_imatrix_errors_leave_nothing(tmp_path: Path, tiny256) -> None:
    hf, _ = tiny256
    text = str(DATA / "tibetan_sample.txt")
    cases = [
        (["--imatrix", str(tmp_path / "none.gguf")], "no such importance matrix file: "),
        (["--imatrix", text], "tibetan_sample.txt is not a usable importance matrix"),
        (["--imatrix", text, "--make-imatrix"], "--make-imatrix/--imatrix-text both given; give one of them"),
        (["--imatrix-text", str(tmp_path / "none.txt")], "none.txt: no such calibration text file; give plain or .xz "
                                                          "text with --imatrix-text"),
        (["--imatrix-text", text, "--imatrix-chunks", "100000"],
         "fewer than --imatrix-chunks 100000; give more text with --imatrix-text, or lower --imatrix-chunks\n"),
        (["--make-imatrix", "--imatrix-chunks", "0"], "--imatrix-chunks 0: expected at least 1 window"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"rel{i}"
        p = run_cli("release", str(hf), "--out", str(out), "--types", "Q4_K_M", *args, timeout=300)
        assert p.returncode == 1 and message in p.stderr.decode(), (args, p.stderr.decode())
        assert not out.exists() and not list(tmp_path.glob(f".rel{i}.*"))
    # a dtype the command line would not take, through the Python API
    with pytest.raises(TiblocalError, match="--imatrix-dtype f8: expected one of f32, bf16, f16"):
        release(ReleaseOptions(hf_dir=hf, out=tmp_path / "api", types=["Q4_K_M"], make_imatrix=True, imatrix_dtype="f8"))
    assert not (tmp_path / "api").exists() and not list(tmp_path.glob(".api.*"))


def test_inspect_shows_what_a_matrix_was_measured_on_and_in_which_basis(tmp_path: Path, model) -> None:
    gg = write_gguf_imatrix(tmp_path / "im.gguf", _sums(model, 1), 64)
    d = json.loads(run_cli("inspect", str(gg), "--json").stdout)
    assert (d["format"], d["container"], d["entries"], d["datasets"], d["chunks"], d["rotation_seeds"]) == (
        "imatrix", "gguf", len(_weights(model)), ["tibetan_sample.txt"], 4, [])
    dat = write_legacy_imatrix(tmp_path / "im.dat", _sums(model, 1), 8)
    d = json.loads(run_cli("inspect", str(dat), "--json").stdout)
    assert (d["container"], d["rotation_seeds"]) == ("dat", None)  # llama-imatrix's files do not say
    shown = run_cli("inspect", str(dat)).stdout.decode()
    assert "importance matrix (legacy .dat)" in shown and "not said" in shown
    bad = tmp_path / "x.dat"
    bad.write_bytes(b"\x01\x00")
    p = run_cli("inspect", str(bad))
    err = p.stderr.decode()
    assert p.returncode == 1 and "x.dat is not a usable importance matrix" in err and len(err.strip().splitlines()) == 1
