"""`tiblocal release`: GGUFs, quality table, Modelfile, model card and SHA256SUMS in one atomic folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import DATA, run_cli


def test_release_writes_every_artifact_and_verifies(tiny_hf: Path, tmp_path: Path) -> None:
    hf = tmp_path / "tiny-demo"
    shutil.copytree(tiny_hf, hf)
    gen = {"do_sample": True, "temperature": 0.7, "top_k": 30, "top_p": 0.85, "repetition_penalty": 1.15}
    (hf / "generation_config.json").write_text(json.dumps(gen))
    notes = tmp_path / "notes.md"
    notes.write_text("Trained by the tests.\n")
    out = tmp_path / "rel"
    p = run_cli("release", str(hf), "--out", str(out), "--types", "Q8_0,Q4_0:Q8_0", "--eval-text", str(DATA / "tibetan_sample.txt"),
                "--ctx", "64", "--max-windows", "4", "--notes", str(notes), "--threads", "2", "--json", timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    files = sorted(x.name for x in out.iterdir())
    assert files == ["Modelfile", "README.md", "SHA256SUMS", "quantization.json", "tiny-demo-Q4_0.gguf", "tiny-demo-Q8_0.gguf",
                     "tiny-demo-f16.gguf"]
    assert not list(tmp_path.glob(".rel.*"))  # no temporary folder left
    q = json.loads((out / "quantization.json").read_text())
    import hashlib

    sample = (DATA / "tibetan_sample.txt").read_bytes()
    assert q["text"] == [{"file": "tibetan_sample.txt", "bytes": len(sample), "sha256": hashlib.sha256(sample).hexdigest()}]
    assert str(tmp_path) not in (out / "quantization.json").read_text()  # no path of the machine that made it
    rows = q["rows"]
    assert [r["file_type"] for r in rows] == ["F16", "Q8_0", "Q4_0"]
    assert q["speed"] == {"tokens": 64, "threads": 2, "n_gpu_layers": 0} and all(r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["mean_kl"] == 0 and 0 < rows[1]["mean_kl"] < rows[2]["mean_kl"]
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-demo-Q8_0.gguf\nTEMPLATE \"\"\"")
    assert "### Instruction:\n{{ .Prompt }}\n\n### Response: {{ .Response }}" in modelfile
    for line in ('PARAMETER stop "### Instruction:"', 'PARAMETER stop "</s>"', "PARAMETER temperature 0.7", "PARAMETER top_k 30",
                 "PARAMETER top_p 0.85", "PARAMETER repeat_penalty 1.15", 'SYSTEM """Below is an instruction'):
        assert line in modelfile, line
    card = (out / "README.md").read_text()
    assert "| tiny-demo-Q4_0.gguf | Q4_0 |" in card and "Trained by the tests." in card and "temp 0.7, top_k 30" in card
    assert "tokens/s: llama.cpp decoding 64 tokens on the CPU, 2 threads." in card
    assert run_cli("verify", str(out)).returncode == 0
    (out / "tiny-demo-Q4_0.gguf").write_bytes(b"changed")
    v = run_cli("verify", str(out))
    assert v.returncode == 1 and "changed" in v.stdout.decode() + v.stderr.decode()


def test_release_bad_input(tiny_hf: Path, tmp_path: Path) -> None:
    p = run_cli("release", str(tmp_path), "--out", str(tmp_path / "a"))
    assert p.returncode == 1 and "no config.json" in p.stderr.decode()
    p = run_cli("release", str(tiny_hf), "--out", str(tmp_path / "b"), "--types", "Q3_X")
    assert p.returncode == 1 and "unknown quantization type Q3_X; valid types:" in p.stderr.decode()
    p = run_cli("release", str(tiny_hf), "--out", str(tmp_path / "b"), "--types", ",")
    assert p.returncode == 1 and "--types is empty; give one or more types, e.g. --types Q4_K_M,Q8_0" in p.stderr.decode()
    assert not (tmp_path / "b").exists()
    p = run_cli("release", str(tiny_hf), "--out", str(tmp_path / "c"), "--template", "chatml")
    assert p.returncode == 1 and "unknown chat template 'chatml'" in p.stderr.decode()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    p = run_cli("release", str(tiny_hf), "--out", str(tmp_path / "d"), "--types", "Q8_0")
    assert p.returncode == 1 and "already exists; pass --force" in p.stderr.decode()
    assert (tmp_path / "d" / "keep.txt").read_text() == "mine"
    p = run_cli("release", str(tiny_hf), "--out", str(tmp_path / "e"), "--types", "Q8_0", "--notes", str(tmp_path / "none.md"))
    assert p.returncode == 1 and "no such notes file" in p.stderr.decode() and not (tmp_path / "e").exists()
    # a GPTQ group size that cannot work is refused before the GGUFs are made
    p = run_cli("release", str(tiny_hf), "--out", str(tmp_path / "f"), "--types", "Q8_0", "--gptq", "4")
    assert p.returncode == 1 and "hidden_size 64 is not a multiple of --gptq-group-size 128" in p.stderr.decode()
    assert not (tmp_path / "f").exists() and not list(tmp_path.glob(".f.*"))
    p = run_cli("release", str(tiny_hf), "--out", str(tmp_path / "f"), "--types", "Q8_0", "--gptq", "4",
                "--gptq-group-size", "0")  # crashed in gptqmodel, after the conversion
    assert p.returncode == 1 and "--gptq-group-size 0: expected a positive size" in p.stderr.decode()
    assert not (tmp_path / "f").exists() and not list(tmp_path.glob(".f.*"))
    p = run_cli("release", str(tiny_hf), "--out", str(tmp_path / "g"), "--types", "Q8_0", "--rotate", "Q4_0")
    assert p.returncode == 1 and "--rotate Q4_0: Q4_0 is not among --types Q8_0" in p.stderr.decode()
    assert not (tmp_path / "g").exists()
    # a rotation seed the GGUF cannot hold is refused before the conversion
    p = run_cli("release", str(tiny_hf), "--out", str(tmp_path / "h"), "--types", "Q8_0", "--rotate", "Q8_0",
                "--rotate-seed", "-3")
    assert p.returncode == 1 and "--rotate-seed -3: a rotation's seed is 0 to 2147483647" in p.stderr.decode()
    assert not (tmp_path / "h").exists() and not list(tmp_path.glob(".h.*"))
    # a negative thread count likewise (the quantizer took -2147483649 as 2**31 - 1 threads, and the process ended)
    p = run_cli("release", str(tiny_hf), "--out", str(tmp_path / "i"), "--types", "Q8_0", "--threads", "-2147483649")
    assert p.returncode == 1 and "--threads -2147483649 is negative" in p.stderr.decode()
    assert not (tmp_path / "i").exists() and not list(tmp_path.glob(".i.*"))


def test_release_rotates_the_types_it_is_told_to(tiny_hf: Path, tmp_path: Path) -> None:
    import gguf

    from tiblocal.quantize.imatrix import load_imatrix
    from tiblocal.quantize.rotate import ROTATION_KEY

    out = tmp_path / "rel"
    p = run_cli("release", str(tiny_hf), "--out", str(out), "--name", "t", "--types", "Q4_K_M,Q8_0", "--make-imatrix",
                "--imatrix-text", str(DATA / "tibetan_sample.txt"), "--imatrix-chunks", "2", "--rotate", "q8_0",
                "--rotate-seed", "4", "--eval-text", str(DATA / "tibetan_sample.txt"), "--ctx", "64",
                "--max-windows", "4", "--threads", "2", "--json", timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    fields = {f: gguf.GGUFReader(out / f"t-{f}.gguf").fields for f in ("f16", "Q4_K_M", "Q8_0")}
    assert list(fields["Q8_0"][ROTATION_KEY].contents()) == [4]
    assert ROTATION_KEY not in fields["Q4_K_M"] and ROTATION_KEY not in fields["f16"]
    # each type quantized with the matrix of its basis, both measured in one pass and shipped
    assert fields["Q4_K_M"]["quantize.imatrix.file"].contents() == "t.imatrix.gguf"
    assert fields["Q8_0"]["quantize.imatrix.file"].contents() == "t.rotated.imatrix.gguf"
    assert load_imatrix(out / "t.imatrix.gguf").rotation == [] and load_imatrix(out / "t.rotated.imatrix.gguf").rotation == [4]
    q = json.loads((out / "quantization.json").read_text())
    assert q["rotated"] == {"Q8_0": 4}
    assert q["imatrix"]["file"] == "t.imatrix.gguf" and q["rotated_imatrix"]["rotation_seed"] == 4
    kl = {r["file_type"]: r["mean_kl"] for r in q["rows"]}
    assert 0 < kl["Q8_0"] < kl["Q4_K_M"]  # measured against the unrotated f16: the same model
    card = (out / "README.md").read_text()
    assert "`t-Q8_0.gguf`: quantized in a rotated basis (`tiblocal quantize --rotate 4`)" in card
    assert "The other quantized GGUFs were made with the importance matrix `t.imatrix.gguf`" in card
    assert ("They were made with the importance matrix `t.rotated.imatrix.gguf` (made by `tiblocal imatrix --rotate 4` "
            "from this model on tibetan_sample.txt, 2 windows of 512 tokens)") in card
    assert run_cli("verify", str(out)).returncode == 0
    # with a given matrix (the unrotated model's) the rotated types are made without one; a rotated one is refused
    given = tmp_path / "given"
    p = run_cli("release", str(tiny_hf), "--out", str(given), "--name", "t", "--types", "Q4_K_M,Q8_0", "--imatrix",
                str(out / "t.imatrix.gguf"), "--rotate", "Q8_0", timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert "The rotated files below were made without it." in (given / "README.md").read_text()
    assert "quantize.imatrix.file" not in gguf.GGUFReader(given / "t-Q8_0.gguf").fields
    p = run_cli("release", str(tiny_hf), "--out", str(tmp_path / "bad"), "--types", "Q8_0", "--imatrix",
                str(out / "t.rotated.imatrix.gguf"))
    err = p.stderr.decode()
    assert p.returncode == 1 and "was measured in the basis of --rotate 4; a release quantizes its f16 GGUF" in err
    assert not (tmp_path / "bad").exists()


def test_release_refuses_gpu_layers_without_a_gpu_build_before_any_work(tiny_hf: Path, tmp_path: Path, monkeypatch) -> None:
    from tiblocal.convert import hf_to_gguf
    from tiblocal.engine import EngineError, gpu_offload_supported
    from tiblocal.pipelines.release import ReleaseOptions, release

    if gpu_offload_supported():
        pytest.skip("this llama-cpp-python build has a GPU backend")
    p = run_cli("release", str(tiny_hf), "--out", str(tmp_path / "g"), "--types", "Q8_0", "--eval-text",
                str(DATA / "tibetan_sample.txt"), "--n-gpu-layers", "-1")
    assert p.returncode == 1 and "--n-gpu-layers -1 asks for GPU offload" in p.stderr.decode()
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob(".g.*"))

    def converted(*a, **k):
        raise AssertionError("converted before the GPU check")

    monkeypatch.setattr(hf_to_gguf, "hf_to_gguf", converted)
    with pytest.raises(EngineError, match="no GPU backend"):
        release(ReleaseOptions(hf_dir=tiny_hf, out=tmp_path / "h", types=["Q8_0"], eval_text=[DATA / "tibetan_sample.txt"],
                               n_gpu_layers=2))
    # without --eval-text nothing runs through llama.cpp's evaluation, so there is nothing to refuse
    with pytest.raises(AssertionError, match="converted before the GPU check"):
        release(ReleaseOptions(hf_dir=tiny_hf, out=tmp_path / "i", types=["Q8_0"], n_gpu_layers=2))


def test_convert_writes_the_suggested_sampling_and_the_runtime_uses_it(tiny_hf: Path, tmp_path: Path) -> None:
    from tiblocal.convert.hf_to_gguf import hf_to_gguf
    from tiblocal.engine import Sampling
    from tiblocal.gguf_file import read_gguf

    hf = tmp_path / "m"
    shutil.copytree(tiny_hf, hf)
    (hf / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    hf_to_gguf(hf, tmp_path / "greedy.gguf", outtype="f32")
    assert not any(k.startswith("general.sampling") for k in read_gguf(tmp_path / "greedy.gguf", with_tokens=False).metadata)
    assert Sampling.for_model(tmp_path / "greedy.gguf") == Sampling()
    (hf / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_k": 20}))
    hf_to_gguf(hf, tmp_path / "s.gguf", outtype="f32")
    s = Sampling.for_model(tmp_path / "s.gguf")
    assert (s.temperature, s.top_k, s.top_p) == (0.6, 20, Sampling().top_p)
    assert Sampling.for_model(tmp_path / "s.gguf", temperature=0.1).temperature == 0.1  # the command line wins
    assert Sampling.for_model(tmp_path / "missing.gguf") == Sampling()  # loading it reports the problem later
    (hf / "generation_config.json").write_text("{not json")
    from tiblocal.errors import TiblocalError

    with pytest.raises(TiblocalError, match=r"generation_config.json is not valid JSON"):
        hf_to_gguf(hf, tmp_path / "bad.gguf", outtype="f32")
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.slow
def test_release_with_gptq(tiny_hf: Path, tmp_path: Path) -> None:
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    out = tmp_path / "rel"
    p = run_cli("release", str(tiny_hf), "--out", str(out), "--name", "tiny", "--types", "Q8_0", "--gptq", "4",
                "--gptq-group-size", "32", "--eval-text", str(DATA / "tibetan_sample.txt"), "--ctx", "64",
                "--max-windows", "2", timeout=900, env={"GPTQMODEL_CPU_WORKERS": "2"})
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    assert (out / "tiny-GPTQ-4bit" / "config.json").is_file() and (out / "tiny-GPTQ-4bit" / "tokenizer.model").is_file()
    sums = (out / "SHA256SUMS").read_text()
    assert "  tiny-GPTQ-4bit/config.json\n" in sums and "  tiny-Q8_0.gguf\n" in sums
    rows = json.loads((out / "quantization.json").read_text())["rows"]
    assert [r["file_type"] for r in rows] == ["F16", "Q8_0", "GPTQ 4-bit"] and rows[2]["mean_kl"] > 0
    card = (out / "README.md").read_text()
    assert "| tiny-GPTQ-4bit | GPTQ 4-bit |" in card and "from_pretrained('tiny-GPTQ-4bit/')" in card
    v = run_cli("verify", str(out), "--json")
    assert v.returncode == 0, v.stdout.decode() + v.stderr.decode()
    (out / "tiny-GPTQ-4bit" / "extra.txt").write_text("x")
    v = run_cli("verify", str(out))
    assert v.returncode == 0 and "unlisted  tiny-GPTQ-4bit/extra.txt" in v.stdout.decode()  # reported, as sha256sum -c does not
    (out / "tiny-GPTQ-4bit" / "config.json").write_text("{}")
    v = run_cli("verify", str(out))
    assert v.returncode == 1 and "tiny-GPTQ-4bit/config.json is changed" in v.stderr.decode()


def _jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def test_release_scores_the_tibetan_tasks_on_every_gguf(tiny_hf: Path, tmp_path: Path) -> None:
    """--eval-mcq and --eval-task NAME=FILE: one row per GGUF (f16 and each quantization) in evaluation.json and in a
    model card table beside the quantization table; --eval-limit takes the first rows."""
    pytest.importorskip("rouge_score")
    pytest.importorskip("sacrebleu")
    mcq = _jsonl(tmp_path / "mcq.jsonl", [
        {"subject": "arts", "loc": f"arts{i}", "polished_ti_content": "རི་མོ་གང་ཡིན།\nA. ཀ\nB. ཁ\nC. ག\nD. ང", "answer": "D"}
        for i in range(3)])
    tense = _jsonl(tmp_path / "tense.jsonl", [{"present": "སྒྲུབ", "past": "བསྒྲུབས", "future": "བསྒྲུབ", "imperative": "སྒྲུབས"}] * 3)
    kinds = _jsonl(tmp_path / "kinds.jsonl", [{"text": "ལྷ་ས་ནི་རྒྱལ་ས་ཡིན།", "label": "གསར་འགྱུར།"}] * 2)
    out = tmp_path / "rel"
    p = run_cli("release", str(tiny_hf), "--out", str(out), "--types", "Q8_0", "--name", "tiny", "--eval-mcq", str(mcq),
                "--eval-task", f"tense={tense}", "--eval-task", f"classify={kinds}", "--eval-limit", "2", "--threads", "2",
                "--json", timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    rows = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
    assert [r["model"] for r in rows] == ["tiny-f16.gguf", "tiny-Q8_0.gguf"]
    for r in rows:
        assert r["mcq"]["n"] == 2 and 0 <= r["mcq"]["accuracy"] <= 1 and r["mcq"]["file"] == "mcq.jsonl"
        assert r["tense"]["n"] == 2 and "past_found" in r["tense"] and r["classify"]["n"] == 2
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "## Tibetan tasks" in card
    assert "TLUE accuracy (log-likelihood) (mcq.jsonl, 2) | tense exact match (tense.jsonl, 2) | kind of text (kinds.jsonl, 2)" in card
    assert "| tiny-Q8_0.gguf |" in card.split("## Tibetan tasks")[1]
    assert "evaluation.json" in (out / "SHA256SUMS").read_text()


@pytest.mark.parametrize("args, match", [
    (["--eval-task", "summary=x.jsonl"], "--eval-task 'summary=x.jsonl': expected NAME=FILE with NAME one of qa, tense"),
    (["--eval-task", "tense"], "--eval-task 'tense': expected NAME=FILE"),
    (["--eval-task", "tense=MISSING"], "no such file"),
    (["--eval-mcq", "MISSING"], "no such file"),
    (["--eval-task", "tense=TENSE", "--eval-task", "tense=TENSE"], "--eval-task tense is given twice"),
])
def test_release_task_arguments_are_checked_before_any_work(tiny_hf: Path, tmp_path: Path, args, match) -> None:
    tense = _jsonl(tmp_path / "tense.jsonl", [{"present": "སྒྲུབ", "past": "བསྒྲུབས"}])
    args = [a.replace("MISSING", str(tmp_path / "none.jsonl")).replace("TENSE", str(tense)) for a in args]
    p = run_cli("release", str(tiny_hf), "--out", str(tmp_path / "rel"), "--types", "Q8_0", *args)
    err = p.stderr.decode().strip()
    assert p.returncode == 1 and match in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "rel").exists() and not list(tmp_path.glob(".rel.*"))
