"""The training stages on tiny CPU recipes: loss falls, outputs load, a killed run resumes to the same loss."""

from __future__ import annotations

import errno
import json
import re
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
    # micro-batches of 4 blocks, compiled, tiblocal's LoRA function (the setup measured in the README)
    assert (seven.batch_size // seven.grad_accum, seven.compile, seven.lora.fused) == (4, True, True)


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
    with pytest.raises(TiblocalError, match="grad_accum 8 with batch_size 4; .* must be from 1 to batch_size"):
        load_config("tiny-sft", ["grad_accum=8"])
    with pytest.raises(TiblocalError, match="grad_accum 0 with batch_size 4"):
        load_config("tiny-sft", ["grad_accum=0"])
    with pytest.raises(TiblocalError, match="micro_tokens is for sft recipes"):
        load_config("tiny-pretrain", ["micro_tokens=256"])
    with pytest.raises(TiblocalError, match="micro_tokens and grad_accum 2 both split the step"):
        load_config("tiny-sft", ["micro_tokens=512", "grad_accum=2"])
    with pytest.raises(TiblocalError, match=r"micro_tokens 100; expected a whole number of tokens of at least block_size \(256\)"):
        load_config("tiny-sft", ["micro_tokens=100"])
    assert load_config("tibetan-alpaca-7b-sft").micro_tokens == 4096


def test_sft_in_micro_batches_of_tokens(tmp_path: Path, pretrained) -> None:
    out = tmp_path / "sft"
    p = run_cli("sft", "tiny-sft", f"output_dir={out}", f"base_model={pretrained / 'model'}", "micro_tokens=256",
                "--json", timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert json.loads(p.stdout)["steps"] == 6  # stdout holds the JSON summary alone
    m = _metrics(out)
    assert m[-1]["loss"] < m[0]["loss"] and (out / "adapter" / "adapter_config.json").is_file()


def test_token_chunks_keep_every_example_once_within_the_budget() -> None:
    from tiblocal.finetune.train import _micro_batches, token_chunks

    lengths = {0: 900, 1: 500, 2: 300, 3: 120, 4: 100, 5: 90, 6: 60, 7: 50}
    chunks = token_chunks(list(lengths), lengths, 1024)
    assert chunks == [[0], [1, 2], [3, 4, 5, 6, 7]]  # 2 x 500 and 5 x 120 fit; 900 goes alone
    assert all(len(c) * max(lengths[i] for i in c) <= 1024 for c in chunks)
    assert token_chunks([0], {0: 5000}, 1024) == [[0]]  # longer than the budget: alone
    cfg = load_config("tiny-sft", ["micro_tokens=512"])
    examples = {i: ([1] * n, [1] * n) for i, n in lengths.items()}
    # two processes: the same number of passes, each taking its share of every run (budget 512 a process)
    p0 = _micro_batches(cfg, [7, 0, 3, 1, 5, 2, 4, 6], examples, 0, 2)
    p1 = _micro_batches(cfg, [7, 0, 3, 1, 5, 2, 4, 6], examples, 1, 2)
    assert len(p0) == len(p1) == 3
    assert sorted(i for part in p0 + p1 for i in part) == [0, 0, 1, 2, 3, 4, 5, 6, 7]  # 0 alone: both take it
    # without micro_tokens: grad_accum equal parts of this process's share, as before
    cfg = load_config("tiny-sft", ["grad_accum=2"])
    assert _micro_batches(cfg, [0, 1, 2, 3], examples, 0, 1) == [[0, 1], [2, 3]]


def test_a_checkpoint_resumes_only_the_way_it_was_written(tmp_path: Path) -> None:
    from accelerate import Accelerator

    from tiblocal.finetune.train import _load_training_state

    with pytest.raises(TiblocalError, match="was written under FSDP; resume it the way it was started"):
        _load_training_state(Accelerator(cpu=True), None, None, {"format": "fsdp"}, tmp_path)


@pytest.mark.parametrize("fused", [True, False])
def test_lora_fused_setting_routes_the_projections(pretrained, fused: bool) -> None:
    from tiblocal.finetune import train as T

    cfg = load_config("tiny-sft", [f"base_model={pretrained / 'model'}", "output_dir=unused", f"lora.fused={str(fused).lower()}"])
    sp, model_file, _, n_base = T._load_tokenizer(cfg)
    model = T._build_model(cfg, sp, model_file, n_base)
    routed = [n for n, m in model.named_modules() if "forward" in m.__dict__]
    assert len(routed) == (14 if fused else 0)  # 2 layers x 7 projections


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
        # whole lines only (the last one may be caught half written)
        if mf.is_file() and any(json.loads(l)["step"] >= 3 for l in mf.read_text().split("\n")[:-1] if l.strip()):
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


def test_a_kill_at_any_line_of_a_save_leaves_a_whole_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """A save interrupted after any line of tiblocal's code (a kill between removing the old checkpoint and
    putting the new one in place once made the resumed run start again from step 0) leaves the previous checkpoint
    or the new one, whole."""
    import torch
    from accelerate.utils import DistributedType

    from tiblocal import fsutil
    from tiblocal.finetune import train

    class OneProcess:  # what _save_checkpoint asks of accelerate's Accelerator, on one process
        is_main_process = True
        distributed_type = DistributedType.NO

        def wait_for_everyone(self) -> None:
            pass

        def get_state_dict(self, model):
            return model.state_dict()

        def unwrap_model(self, model):
            return model

    class Killed(BaseException):
        pass

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.inner = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    model.inner(torch.ones(1, 8)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    accel, out = OneProcess(), tmp_path / "run"
    out.mkdir()
    ours = {train.__file__, fsutil.__file__}

    def save_killed_at(line: int) -> bool:
        """Save step 3 over step 2's checkpoint, killed (an exception no cleanup is written for) after ``line``
        lines of our code; False when the save ran to its end first."""
        seen = 0

        def trace(frame, event, arg):
            nonlocal seen
            if frame.f_code.co_filename not in ours:
                return None
            if event == "line":
                seen += 1
                if seen == line:
                    raise Killed
            return trace

        train._save_checkpoint(accel, model, opt, sched, 2, out)
        sys.settrace(trace)
        try:
            train._save_checkpoint(accel, model, opt, sched, 3, out)
        except Killed:
            return True
        finally:
            sys.settrace(None)
        return False

    line = 1
    while save_killed_at(line):
        state_file = out / train.CHECKPOINT / "state.pt"
        assert state_file.is_file(), f"no checkpoint after a kill at line {line} of the save"
        assert torch.load(state_file, weights_only=False)["step"] in (2, 3)
        line += 1
    assert line > 5  # the kill did land inside the save, at each of its lines
    assert torch.load(out / train.CHECKPOINT / "state.pt", weights_only=False)["step"] == 3
    # a SIGKILL skips the cleanup and leaves the temporary file; the next save removes it, and nothing else
    stale = out / train.CHECKPOINT / ".state.pt.0123456789ab.partial"
    stale.write_bytes(b"half")
    kept = out / train.CHECKPOINT / ".other.0123456789ab.partial"
    kept.write_bytes(b"not ours")
    train._save_checkpoint(accel, model, opt, sched, 3, out)
    assert not stale.exists() and kept.exists()
    kept.unlink()

    # a full disk: a one-line error naming the setting to change, and the previous checkpoint kept
    def full(obj, f):
        Path(f).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(TiblocalError, match="the disk is full while writing .*state.pt.*another disk with output_dir="):
        train._save_checkpoint(accel, model, opt, sched, 4, out)
    assert torch.load(out / train.CHECKPOINT / "state.pt", weights_only=False)["step"] == 3
    assert [p.name for p in (out / train.CHECKPOINT).iterdir()] == ["state.pt"]


def test_bad_input(tmp_path: Path, tiny_tokenizer, pretrained) -> None:
    # a tokenizer without added pieces while the recipe says extended
    p = run_cli("pretrain", "tiny-pretrain", f"output_dir={tmp_path / 'a'}", f"tokenizer={tiny_tokenizer}",
                f"train_files=[{TEXT}]")
    assert p.returncode == 1 and "has no added pieces" in p.stderr.decode() and "extended: true" in p.stderr.decode()
    # an output folder that holds a different run
    p = _pretrain(pretrained, "lr=0.01")
    assert p.returncode == 1 and "holds a different run (lr differ)" in p.stderr.decode()
    # tensorboard asked for where it is not installed: refused before anything is written
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        p = run_cli("pretrain", "tiny-pretrain", f"output_dir={tmp_path / 'tb'}", f"train_files=[{TEXT}]", "tensorboard=true")
        assert p.returncode == 1 and "needs the tensorboard package" in p.stderr.decode() and not (tmp_path / "tb").exists()
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


@pytest.mark.parametrize("with_lora", [False, True])
def test_chunked_loss_equals_the_model_loss_and_gradients(with_lora: bool, monkeypatch) -> None:
    """The chunked head + cross-entropy gives HF's loss and the same gradients (LoRA and embeddings too)."""
    import peft
    import torch
    import transformers

    from tiblocal.finetune import loss as chunked

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=300)
    model = transformers.LlamaForCausalLM(cfg)
    if with_lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                    modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM"))
        # LoRA B starts at zero; move it so that the LoRA path carries gradient into A too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 300, (3, 40))
    labels = ids.clone()
    labels[0, :25] = -100
    mask = torch.ones_like(ids)
    ids[2, 30:], labels[2, 30:], mask[2, 30:] = 0, -100, 0  # a right-padded row
    ref = model(input_ids=ids, labels=labels, attention_mask=mask).loss
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 4 * 300 * 17)  # several chunks, the last one short
    got = chunked.CausalLMWithLoss(model)(ids, labels, mask)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(want)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():  # evaluation: the loss alone
        assert chunked.CausalLMWithLoss(model)(ids, labels, mask).item() == pytest.approx(ref.item(), rel=1e-6)


def test_train_weights_sample_and_repeat_files(tmp_path: Path) -> None:
    from tiblocal.finetune.train import _examples, _load_tokenizer

    cfg = load_config("tiny-pretrain", [f"output_dir={tmp_path}", f"train_files=[{TEXT}]"])
    sp = _load_tokenizer(cfg)[0]
    whole = _examples(cfg, sp, (TEXT,))
    assert whole.dtype.is_floating_point is False and whole.shape[1] == 64 and len(whole) > 10
    twice = _examples(cfg, sp, (TEXT,), weights={TEXT: 2.5})
    assert len(twice) == int(2 * len(whole) + round(0.5 * len(whole)))
    assert (twice[: len(whole)] == whole).all() and (twice[len(whole) : 2 * len(whole)] == whole).all()
    part = _examples(cfg, sp, (TEXT,), weights={TEXT: 0.3})
    assert 0.1 * len(whole) < len(part) < 0.5 * len(whole)
    assert (_examples(cfg, sp, (TEXT,), weights={TEXT: 0.3}) == part).all()  # seeded
    with pytest.raises(TiblocalError, match=r"train_weights names other.txt, which is not in train_files"):
        load_config("tiny-pretrain", [f"output_dir={tmp_path}", f"train_files=[{TEXT}]", "train_weights={other.txt: 0.5}"])
    with pytest.raises(TiblocalError, match=r"expected a number above 0"):
        load_config("tiny-pretrain", [f"output_dir={tmp_path}", f"train_files=[{TEXT}]", f"train_weights={{{TEXT}: 0}}"])
    with pytest.raises(TiblocalError, match=r"generation must be a group of generation_config.json settings"):
        load_config("tiny-pretrain", [f"output_dir={tmp_path}", "generation=0.8"])
    with pytest.raises(TiblocalError, match=r"mixed_precision 'fp8'; expected no or bf16"):
        load_config("tiny-pretrain", [f"output_dir={tmp_path}", "mixed_precision=fp8"])


def test_batches_grouped_by_length_pad_less_and_resume_the_same() -> None:
    import random

    from tiblocal.finetune.train import BatchOrder

    rng = random.Random(0)
    lengths = [rng.randint(10, 1000) for _ in range(1000)]
    grouped, plain = BatchOrder(1000, 8, 7, lengths), BatchOrder(1000, 8, 7)
    steps = range(2 * grouped.per_epoch)

    def padded(order):
        return sum(len(order.indices(s)) * max(lengths[i] for i in order.indices(s)) for s in steps)

    assert padded(grouped) < 0.75 * padded(plain)
    epoch = [i for s in range(grouped.per_epoch) for i in grouped.indices(s)]
    assert len(epoch) == len(set(epoch)) == 125 * 8  # each example at most once an epoch
    again = BatchOrder(1000, 8, 7, lengths)  # a resumed run: the same batches from any step on
    assert [again.indices(s) for s in (200, 3, 130)] == [grouped.indices(s) for s in (200, 3, 130)]
    assert grouped.indices(125) != grouped.indices(0)  # a new epoch, a new order


def test_generation_settings_reach_generation_config(tmp_path: Path) -> None:
    out = tmp_path / "g"
    p = _pretrain(out, "max_steps=1", "save_every=1", "eval_every=1", "generation={do_sample: true, temperature: 0.7, top_k: 30}")
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    gen = json.loads((out / "model" / "generation_config.json").read_text())
    assert gen["do_sample"] is True and gen["temperature"] == 0.7 and gen["top_k"] == 30


def test_hidden_dropout_drops_in_training_only(tmp_path: Path) -> None:
    """hidden_dropout: the embedding and every attention and MLP output are dropped while training; in eval mode the
    model computes what it computes without the hooks, and a rate outside [0, 1] is refused."""
    import torch
    import transformers

    from tiblocal.finetune.train import add_hidden_dropout

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    plain = transformers.LlamaForCausalLM(cfg)
    dropped = transformers.LlamaForCausalLM(cfg)
    dropped.load_state_dict(plain.state_dict())
    add_hidden_dropout(dropped, 0.5)
    ids = torch.arange(1, 17)[None]
    plain.eval(), dropped.eval()
    assert torch.equal(plain(ids).logits, dropped(ids).logits)
    dropped.train()
    seen = []
    dropped.model.layers[0].mlp.register_forward_hook(lambda m, a, out: seen.append(out))  # after the dropout hook
    a, b = dropped(ids).logits, dropped(ids).logits
    assert not torch.equal(a, b) and not torch.allclose(a, plain(ids).logits)
    assert 0.3 < float((seen[0] == 0).float().mean()) < 0.7
    assert load_config("tiny-pretrain", ["hidden_dropout=0.1"]).hidden_dropout == 0.1
    with pytest.raises(TiblocalError, match="hidden_dropout"):
        load_config("tiny-pretrain", ["hidden_dropout=1.5"])


def test_keep_best_saves_the_model_of_the_lowest_eval_loss_and_keeps_it_across_a_resume(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    """With keep_best the run's model is the one of its lowest eval loss (the evaluations are scripted here: 3.0,
    2.0, 2.5, 2.8 at steps 2, 4, 6, 8), bit for bit the model that a run of 4 steps saves (the tiny recipe's
    learning rate is constant); a run continued to more steps keeps that choice unless it finds a lower loss."""
    from safetensors.numpy import load_file

    from tiblocal.finetune import train as trainer

    def scripted(*losses):
        it = iter(losses)
        monkeypatch.setattr(trainer, "_evaluate", lambda *a, **k: next(it))

    common = [f"train_files=[{TEXT}]", f"eval_files=[{TEXT}]", "eval_every=2", "save_every=2"]

    def run(name: str, *extra: str):
        return trainer.train(load_config("tiny-pretrain", [f"output_dir={tmp_path / name}", *common, *extra]))

    scripted(3.0, 2.0, 2.5, 2.8)
    r = run("best", "max_steps=8", "keep_best=true")
    assert (r.steps, r.best_step, r.eval_loss) == (8, 4, 2.0)
    assert [m["step"] for m in _metrics(tmp_path / "best") if m.get("kept")] == [2, 4]
    scripted(3.0, 2.0)
    assert run("four", "max_steps=4").best_step is None

    def weights(name: str) -> dict:
        return load_file(str(tmp_path / name / "model" / "model.safetensors"))

    ref = weights("four")
    got = weights("best")
    assert set(got) == set(ref) and all((got[k] == ref[k]).all() for k in ref)
    # continued to 12 steps: 2.9 and 2.1 at steps 10 and 12 do not beat step 4's 2.0
    scripted(2.9, 2.1)
    r = run("best", "max_steps=12", "keep_best=true")
    assert (r.resumed_from, r.best_step, r.eval_loss) == (8, 4, 2.0)
    got = weights("best")
    assert all((got[k] == ref[k]).all() for k in ref)
    # a kept model that went missing is named, not replaced by the last step's
    import shutil

    shutil.rmtree(tmp_path / "best" / "best")
    scripted(2.6, 2.7)
    with pytest.raises(TiblocalError, match=r"best should hold the model of step 4 \(eval loss 2\.0000\) and does not"):
        run("best", "max_steps=16", "keep_best=true")
    assert all((weights("best")[k] == ref[k]).all() for k in ref)
    # and without eval_files there is nothing to keep the best by
    with pytest.raises(TiblocalError, match="keep_best keeps the model of the lowest eval loss, and there are no "
                                            "eval_files"):
        load_config("tiny-pretrain", [f"output_dir={tmp_path / 'x'}", "eval_files=[]", "keep_best=true"])


def test_a_run_saved_before_a_setting_existed_resumes_with_its_default(tmp_path: Path) -> None:
    """A run whose run_config.yaml predates a setting (keep_best, here) had that setting's default; it resumes."""
    out = tmp_path / "run"
    assert _pretrain(out, "max_steps=2", "save_every=2").returncode == 0
    saved = out / "run_config.yaml"
    text = saved.read_text(encoding="utf-8")
    assert "keep_best: false" in text
    saved.write_text("".join(l for l in text.splitlines(keepends=True) if not l.startswith("keep_best:")), encoding="utf-8")
    p = _pretrain(out, "max_steps=4", "save_every=2")
    assert p.returncode == 0, p.stderr.decode()[-1000:]
    assert json.loads(p.stdout)["resumed_from"] == 2
    # a setting that differs from what the run saved is still refused
    p = _pretrain(out, "max_steps=6", "keep_best=true")
    assert p.returncode == 1 and "holds a different run (keep_best differ)" in p.stderr.decode()


def test_holdout_splits_each_line_one_way_and_evaluates_on_the_held_out_share(tmp_path: Path) -> None:
    """holdout {FILE: share}: a line is held out by a hash of its text (the same on every run, and the same for a
    line that occurs twice), never trained on, and the held-out lines are the evaluation text."""
    from collections import Counter

    from tiblocal.finetune.train import _weighted_lines, held_out
    from tiblocal.vocab import read_lines

    lines = list(read_lines([Path(TEXT)]))
    kept = list(_weighted_lines(Path(TEXT), 1.0, 0, 0.3, held=False))
    held = list(_weighted_lines(Path(TEXT), 1.0, 0, 0.3, held=True))
    assert Counter(kept) + Counter(held) == Counter(lines) and not set(kept) & set(held)
    assert 0.15 < len(held) / len(lines) < 0.45 and held == [l for l in lines if held_out(l, 0.3)]
    assert all(held_out(l, 0.3) == held_out(l, 0.3) for l in lines) and not any(held_out(l, 1e-12) for l in lines)
    # sampled files (train_weights < 1) sample among the kept lines only
    assert set(_weighted_lines(Path(TEXT), 0.5, 0, 0.3, held=False)) <= set(kept)

    out = tmp_path / "run"
    p = run_cli("pretrain", "tiny-pretrain", f"output_dir={out}", f"train_files=[{TEXT}]", "eval_files=[]",
                f"holdout={{{TEXT}: 0.3}}", "keep_best=true", "max_steps=4", "eval_every=2", "--json", timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-1500:]
    r = json.loads(p.stdout)
    evals = {m["step"]: m["eval_loss"] for m in _metrics(out) if "eval_loss" in m}  # rounded to 5 places there
    assert set(evals) == {2, 4} and r["best_step"] == min(evals, key=evals.get)
    assert r["eval_loss"] == pytest.approx(min(evals.values()), abs=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ([f"train_files=[{TEXT}]", "eval_files=[]", "holdout={other.txt: 0.1}"], "holdout names other.txt, which is not in "
                                                                             "train_files"),
    ([f"train_files=[{TEXT}]", "eval_files=[]", f"holdout={{{TEXT}: 0.9}}"], "expected a fraction above 0 and at most 0.5"),
    ([f"train_files=[{TEXT}]", f"eval_files=[{TEXT}]", f"holdout={{{TEXT}: 0.1}}"], "holdout and eval_files both give"),
    ([f"train_files=[{TEXT}]", "eval_files=[]", "holdout=[0.1]"], "holdout must map files of train_files to fractions"),
])
def test_bad_holdout_is_named(overrides, message) -> None:
    with pytest.raises(TiblocalError, match=message):
        load_config("tiny-pretrain", ["output_dir=x", *overrides])


def test_holdout_is_for_pretraining() -> None:
    with pytest.raises(TiblocalError, match="holdout is for pretrain recipes"):
        load_config("tiny-sft", ["output_dir=x", f"holdout={{{SFT}: 0.1}}", f"train_files=[{SFT}]", "eval_files=[]"])


def test_replay_mixes_sampled_lines_of_text_into_sft_with_every_token_trained(tmp_path: Path) -> None:
    """replay {FILE: N}: N distinct lines of the file, the same ones on every run (a seeded sample), each BOS + text +
    EOS cut at block_size with every token labelled, added to the instruction examples."""
    import sentencepiece as spm

    from tiblocal.finetune.train import _replay
    from tiblocal.vocab import read_lines, tokenizer_model

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model("bundled")))
    cfg = load_config("tiny-sft", ["output_dir=x", f"replay={{{TEXT}: 5}}", "block_size=40"])
    first, again = _replay(cfg, sp), _replay(cfg, sp)
    assert first == again and len(first) == 5
    lines = [l for l in read_lines([Path(TEXT)]) if l.strip()]
    as_examples = {tuple([sp.bos_id(), *sp.encode(l), sp.eos_id()][:40]): l for l in lines}
    picked = [as_examples.get(tuple(ids)) for ids, _ in first]
    assert None not in picked and len(set(picked)) == 5 and all(labels == ids for ids, labels in first)
    assert any(len(sp.encode(l)) + 2 > 40 for l in picked)  # one was cut at block_size
    other = _replay(load_config("tiny-sft", ["output_dir=x", f"replay={{{TEXT}: 5}}", "block_size=40", "seed=7"]), sp)
    assert other != first
    with pytest.raises(TiblocalError, match=f"replay asks for 100000 lines of {re.escape(TEXT)}, which has {len(lines)}"):
        _replay(load_config("tiny-sft", ["output_dir=x", f"replay={{{TEXT}: 100000}}"]), sp)


def test_sft_with_replay_trains_on_both(tmp_path: Path, pretrained) -> None:
    out = tmp_path / "sft"
    runs = {}
    for name, extra in (("plain", []), ("replay", [f"replay={{{TEXT}: 8}}"])):
        p = run_cli("sft", "tiny-sft", f"output_dir={out / name}", f"base_model={pretrained / 'model'}", *extra,
                    "max_steps=3", "--json", timeout=300)
        assert p.returncode == 0, p.stderr.decode()[-2000:]
        runs[name] = json.loads(p.stdout)
    assert runs["replay"]["examples"] == runs["plain"]["examples"] + 8 and runs["replay"]["steps"] == 3
    assert f"replay:\n  {TEXT}: 8" in (out / "replay" / "run_config.yaml").read_text()


@pytest.mark.parametrize("overrides, message", [
    (["replay=[a.txt]"], "replay must map plain-text files to numbers of lines"),
    ([f"replay={{{TEXT}: 0}}"], "expected a whole number of lines, at least 1"),
    ([f"replay={{{TEXT}: 2.5}}"], "expected a whole number of lines, at least 1"),
])
def test_bad_replay_is_named(overrides, message) -> None:
    with pytest.raises(TiblocalError, match=re.escape(message)):
        load_config("tiny-sft", ["output_dir=x", *overrides])


def test_replay_is_for_sft() -> None:
    with pytest.raises(TiblocalError, match="replay is for sft recipes"):
        load_config("tiny-pretrain", ["output_dir=x", f"replay={{{TEXT}: 3}}"])


def test_recipes_read_yes_no_on_off_as_text_as_yaml_1_2_does() -> None:
    """`mixed_precision=no` is that setting's value "no", not YAML 1.1's boolean False; true and false stay booleans."""
    from tiblocal.finetune.config import _yaml

    assert load_config("tiny-pretrain", ["output_dir=x", "mixed_precision=no", "compile=false"]).mixed_precision == "no"
    assert _yaml("a: no\nb: yes\nc: on\nd: off\ne: true\nf: False\ng: [no, 1]", "x") == {
        "a": "no", "b": "yes", "c": "on", "d": "off", "e": True, "f": False, "g": ["no", 1]}
    with pytest.raises(TiblocalError, match="compile is 'yes', expected true or false"):
        load_config("tiny-pretrain", ["output_dir=x", "compile=yes"])


@pytest.mark.parametrize("setting, line", [
    ("model_config.hidden_size=-5", "model_config: ValueError: The hidden size (-5) is not a multiple of the number of "
                                    "attention heads"),  # raised from transformers' config class: a crash report
    ("model_config.vocab_size=5", "model_config: vocab_size 5 is smaller than the tokenizer's 32000 base pieces"),
    ("model_config.hidden_size=100000000", "model_config gives a model of 8e+16 parameters"),  # torch: 12.8 TB
])
def test_a_scratch_model_that_cannot_be_made_is_one_line_before_the_data_is_read(tmp_path: Path, setting,
                                                                                   line) -> None:
    p = _pretrain(tmp_path / "out", setting, "compile=false")
    err = p.stderr.decode()
    assert p.returncode == 1 and line in err and "bug in tiblocal" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_diverged_run_stops_with_its_step_and_writes_no_model(tmp_path: Path) -> None:
    """lr=1e30: the loss is NaN from the second step. The run went on and wrote a model of NaN weights as its result;
    it now stops at that step, keeps the last checkpoint before it, and writes no model."""
    out = tmp_path / "out"
    p = _pretrain(out, "lr=1e30", "max_steps=4", "save_every=1", "compile=false")
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert "the training loss is nan at step 2 (lr 1e+30): the training diverged; lower lr" in err
    assert f"the checkpoint of step 1 stays in {out}; no model was written" in err
    assert not (out / "model").exists()
    import torch

    from tiblocal.finetune import train

    assert torch.load(out / train.CHECKPOINT / "state.pt", weights_only=False)["step"] == 1


def test_a_seed_past_32_bits_is_refused_before_the_model_loads() -> None:
    """Each step seeds torch with (seed * 1,000,003 + step) * 64 + rank, within its 64 bits: seed=10**12 crashed at
    the first step, after the model had loaded, and 10**20 in torch.manual_seed at the start."""
    for seed in (2**32, 10**12, 10**20):
        with pytest.raises(TiblocalError, match=rf"seed is {seed}, expected a whole number from 0 to 4294967295"):
            load_config("tiny-pretrain", ["output_dir=x", f"seed={seed}"])
    assert load_config("tiny-pretrain", ["output_dir=x", f"seed={2**32 - 1}"]).seed == 2**32 - 1


def test_learning_rates_written_as_papers_write_them_are_numbers() -> None:
    """YAML 1.1 (PyYAML) needs a dot and a signed exponent: `lr=1e-4` was the string '1e-4' and refused ("expected a
    number above 0"); YAML 1.2 reads it as the number."""
    from tiblocal.finetune.config import _yaml

    with pytest.raises(TiblocalError, match="lr is 1000"):  # 400 digits: OverflowError in math.isfinite
        load_config("tiny-pretrain", ["output_dir=x", "lr=1" + "0" * 400])
    cfg = load_config("tiny-pretrain", ["output_dir=x", "lr=1e-4", "embed_lr=2E-5"])
    assert (cfg.lr, cfg.embed_lr) == (1e-4, 2e-5)
    assert _yaml("a: 3e-4\nb: 1.0e5\nc: .5e3\nd: -2e-2\ne: 1e\nf: 12\ng: 1.5", "x") == {
        "a": 3e-4, "b": 1e5, "c": 500.0, "d": -0.02, "e": "1e", "f": 12, "g": 1.5}
