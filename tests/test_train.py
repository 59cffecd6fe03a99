"""The training stages on tiny CPU recipes: loss falls, outputs load, a killed run resumes to the same loss."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DATA, run_cli

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from tiblocal.errors import TiblocalError  # noqa: E402
from tiblocal.finetune.config import CONFIG_DIR, load_config  # noqa: E402

TEXT = str(DATA / "tibetan_sample.txt")
SFT = str(DATA / "tiny_sft.jsonl")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def _pretrain(out: Path, *extra: str):
    return run_cli("pretrain", "tiny-pretrain", f"output_dir={out}", f"train_files=[{TEXT}]", f"eval_files=[{TEXT}]",
                   *extra, "--json", timeout=300)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pt") / "run"
    p = _pretrain(out)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    return out


def test_every_shipped_recipe_validates() -> None:
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"tiny-pretrain", "tiny-sft", "tibetan-llama2-7b-pretrain", "tibetan-llama2-13b-pretrain", "tibetan-alpaca-7b-sft"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.stage in ("pretrain", "sft")
    seven = load_config("tibetan-llama2-7b-pretrain")
    assert (seven.lora.r, seven.lora.alpha, seven.lora.dropout, seven.block_size, seven.lr, seven.dtype) == (64, 128, 0.05, 1024, 2e-4, "bfloat16")
    assert set(seven.lora.targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert seven.lora.modules_to_save == ("embed_tokens", "lm_head")
    assert load_config("tibetan-alpaca-7b-sft").lr == 1e-4


def test_unknown_keys_are_listed_and_overrides_apply(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: pretrain\noutput_dir: x\nlearning_rate: 1\nbatchsize: 2\n")
    with pytest.raises(TiblocalError, match="unknown settings batchsize, learning_rate; known: stage, output_dir"):
        load_config(bad)
    with pytest.raises(TiblocalError, match="unknown lora settings rank"):
        load_config("tiny-sft", ["lora.rank=4"])
    cfg = load_config("tiny-sft", ["lora.r=4", "max_steps=3", "output_dir=elsewhere"])
    assert (cfg.lora.r, cfg.max_steps, cfg.output_dir) == (4, 3, "elsewhere")
    with pytest.raises(TiblocalError, match="is a sft recipe; run it with `tiblocal sft`"):
        load_config("tiny-sft", stage="pretrain")


def test_pretraining_loss_falls_and_the_model_loads(pretrained) -> None:
    import transformers

    m = _metrics(pretrained)
    assert m[-1]["step"] == 8 and m[-1]["loss"] < m[0]["loss"]
    evals = [r["eval_loss"] for r in m if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(pretrained / "model")
    assert model.get_input_embeddings().weight.shape[0] == 56000  # resized to the bundled tokenizer
    assert (pretrained / "model" / "tokenizer.model").is_file()
    assert "stage: pretrain" in (pretrained / "run_config.yaml").read_text()


def test_sft_adapter_carries_embeddings_and_merges(tmp_path: Path, pretrained) -> None:
    out = tmp_path / "sft"
    p = run_cli("sft", "tiny-sft", f"output_dir={out}", f"base_model={pretrained / 'model'}", f"train_files=[{SFT}]",
                f"eval_files=[{SFT}]", "--json", timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    m = _metrics(out)
    assert m[-1]["loss"] < m[0]["loss"]
    from safetensors import safe_open

    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "np") as f:
        keys = set(f.keys())
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys
    assert any("lora_A" in k for k in keys)
    merged = tmp_path / "merged"
    p = run_cli("merge", str(pretrained / "model"), str(out / "adapter"), "--out", str(merged), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["n_vocab"] == 56000


def test_a_killed_run_resumes_to_the_same_loss(tmp_path: Path) -> None:
    steps = ["max_steps=8", "save_every=1"]
    ref = tmp_path / "ref"
    assert _pretrain(ref, *steps).returncode == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tiblocal", "pretrain", "tiny-pretrain", f"output_dir={out}", f"train_files=[{TEXT}]",
           f"eval_files=[{TEXT}]", *steps]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        mf = out / "metrics.jsonl"
        if mf.is_file() and any(json.loads(l)["step"] >= 3 for l in mf.read_text().splitlines() if l.strip()):
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists()  # it did not finish
    p = _pretrain(out, *steps)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    res = json.loads(p.stdout)
    # step 3 was logged, so the checkpoint of step 2 at least was complete (a kill during a save keeps the last one)
    assert 2 <= res["resumed_from"] < 8
    assert res["train_loss"] == pytest.approx(_metrics(ref)[-1]["loss"], abs=1e-4)
    assert res["eval_loss"] == pytest.approx([r for r in _metrics(ref) if "eval_loss" in r][-1]["eval_loss"], abs=1e-4)


def test_bad_input(tmp_path: Path, tiny_tokenizer, pretrained) -> None:
    # a tokenizer without added pieces while the recipe says extended
    p = run_cli("pretrain", "tiny-pretrain", f"output_dir={tmp_path / 'a'}", f"tokenizer={tiny_tokenizer}",
                f"train_files=[{TEXT}]")
    assert p.returncode == 1 and "has no added pieces" in p.stderr.decode() and "extended: true" in p.stderr.decode()
    # an output folder that holds a different run
    p = _pretrain(pretrained, "lr=0.01")
    assert p.returncode == 1 and "holds a different run (lr differ)" in p.stderr.decode()
    # unknown keys from the command line
    p = run_cli("pretrain", "tiny-pretrain", "lerning_rate=1")
    assert p.returncode == 1 and "unknown settings lerning_rate" in p.stderr.decode()
    # an instruction file with too many bad rows
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q"}\n{"output": "a"}\n{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    p = run_cli("sft", "tiny-sft", f"output_dir={tmp_path / 'b'}", f"base_model={pretrained / 'model'}", f"train_files=[{bad}]")
    assert p.returncode == 1 and "2 of 3 rows are bad" in p.stderr.decode()


def test_gradient_accumulation_gives_the_same_step(tmp_path: Path) -> None:
    """One step of batch 4 equals one step of 4 accumulated micro-batches of 1 (same examples, same update)."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["max_steps=2", "save_every=2", "eval_every=2"]
    assert _pretrain(a, *common).returncode == 0
    p = _pretrain(b, *common, "grad_accum=4")
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    la, lb = _metrics(a), _metrics(b)
    assert lb[-1]["loss"] == pytest.approx(la[-1]["loss"], abs=2e-3)
    assert lb[-1]["eval_loss"] == pytest.approx(la[-1]["eval_loss"], abs=2e-3)
