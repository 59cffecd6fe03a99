"""`tiblocal pretrain` and `tiblocal sft`: the Tibetan-Llama2 recipe on one device or many (accelerate).

One loop serves both stages and both LoRA and full-parameter training:
- the model comes from a Hugging Face folder or from scratch (``model_config``); with an extended
  tokenizer its embeddings are resized and each new row initialised from the mean of the rows of the
  pieces the base tokenizer splits it into;
- LoRA (peft) on the projections, with embed_tokens / lm_head trained in full (``modules_to_save``) at
  their own learning rate; or every parameter when ``lora`` is null;
- pretraining on packed blocks of raw text, SFT on chat-template examples with the loss on the answer
  only, both tokenized to the runtime's SentencePiece ids;
- the batch order is a function of the seed and the step, and the checkpoint holds the step, the
  optimizer, the scheduler and the RNG states, so a killed run resumes exactly where it stopped.
Run under ``accelerate launch`` for several GPUs (each process takes its share of every batch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from tiblocal.errors import InputFileError, TiblocalError
from tiblocal.fsutil import atomic_dir, atomic_path, remove_partials

from .config import TrainConfig, dump, read_yaml, to_dict

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint"
BEST = "best"  # keep_best: the model of the lowest eval loss so far, copied into place when the run ends


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    train_loss: float
    eval_loss: float | None  # with keep_best: the kept model's
    resumed_from: int
    best_step: int | None = None  # with keep_best: the step of the model saved
    examples: int = 0  # training examples: packed blocks (pretrain), instructions and replayed lines (sft)


def _torch():
    try:
        import torch
    except ImportError:
        raise TiblocalError("training needs torch, transformers, peft and accelerate: pip install 'tiblocal[train]'") from None
    return torch


def _load_tokenizer(cfg: TrainConfig):
    from tiblocal.gguf_vocab import load_sentencepiece
    from tiblocal.vocab import base_pieces, tokenizer_dir, tokenizer_model

    model_file = tokenizer_model(cfg.tokenizer)
    sp = load_sentencepiece(model_file)
    n_base = base_pieces(cfg.tokenizer)
    if cfg.extended and (n_base is None or n_base >= sp.vocab_size()):
        raise TiblocalError(
            f"{model_file} has no added pieces (no tiblocal_vocab.json beside it, or nothing beyond the base) but the "
            "recipe says extended: true; give the extended tokenizer (e.g. 'bundled') or set extended=false"
        )
    return sp, model_file, tokenizer_dir(cfg.tokenizer), n_base


def _scratch_config(cfg: TrainConfig, sp, n_base: int | None, device=None):
    """The LlamaConfig of a model made from scratch, checked before the data is read and anything is allocated:
    transformers' own validation (a hidden size of -5 raised from its config class), a vocabulary smaller than the
    tokenizer's base (SentencePiece failed on the truncated tokenizer), and weights larger than the memory they are
    made in (a hidden size of 10**8 asked torch for 12.8 TB; one just past the memory would start swapping, or be
    killed without a word)."""
    torch = _torch()
    import transformers

    mc = dict(cfg.model_config)
    mc.setdefault("vocab_size", n_base if cfg.extended else sp.vocab_size())
    mc.setdefault("bos_token_id", sp.bos_id())
    mc.setdefault("eos_token_id", sp.eos_id())
    try:
        config = transformers.LlamaConfig(**mc)
    except Exception as e:  # transformers validates in its config class (huggingface_hub's strict dataclasses)
        raise TiblocalError(f"model_config: {str(e).splitlines()[-1].strip() or type(e).__name__}") from None
    least = n_base if cfg.extended else sp.vocab_size()
    if not isinstance(config.vocab_size, int) or config.vocab_size < least:
        raise TiblocalError(f"model_config: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                            f"{least} {'base ' if cfg.extended else ''}pieces; leave it out (the tokenizer's is taken)")
    h, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    kv_dim = h // max(heads, 1) * kv
    params = config.vocab_size * h * (1 if config.tie_word_embeddings else 2) + layers * (
        2 * h * h + 2 * h * kv_dim + 3 * h * ffn + 2 * h) + h
    size = params * {"float32": 4, "bfloat16": 2}[cfg.dtype]
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        have, where = torch.cuda.mem_get_info(device)[0], f"{torch.cuda.get_device_name(device)}'s free memory"
    else:
        from tiblocal.engine import physical_memory

        have, where = physical_memory(), "this machine's memory"
    if have and size > have:
        raise TiblocalError(f"model_config gives a model of {params:.3g} parameters, {size / 2**30:,.1f} GiB of "
                            f"{cfg.dtype} weights alone, more than {where} ({have / 2**30:,.1f} GiB); make it smaller")
    return config


def _build_model(cfg: TrainConfig, sp, model_file: Path, n_base: int | None, device=None, scratch=None):
    """``scratch``: the LlamaConfig ``_scratch_config`` made (and checked) for a model from scratch, if it ran."""
    torch = _torch()
    import transformers

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    if cfg.base_model == "scratch":
        config = scratch or _scratch_config(cfg, sp, n_base, device)
        with torch.device(device or "cpu"):  # initialised where it trains (a 7B init on the CPU takes minutes)
            model = transformers.LlamaForCausalLM(config).to(dtype)
    else:
        if not Path(cfg.base_model, "config.json").is_file():
            raise InputFileError(f"{cfg.base_model}: no config.json; base_model must be a Hugging Face folder or 'scratch'")
        model = transformers.AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=dtype)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < sp.vocab_size():
        if not cfg.extended:
            raise TiblocalError(f"the model has {rows} embedding rows but the tokenizer has {sp.vocab_size()} pieces")
        from tiblocal.vocab import init_new_rows

        model.resize_token_embeddings(sp.vocab_size(), mean_resizing=False)
        with torch.no_grad():
            for module in (model.get_input_embeddings(), model.get_output_embeddings()):
                w = module.weight.detach().float().cpu().numpy()
                module.weight.copy_(torch.from_numpy(init_new_rows(w, model_file, rows)).to(module.weight.dtype))
    elif rows > sp.vocab_size() and cfg.extended:
        raise TiblocalError(f"the model has {rows} embedding rows, more than the tokenizer's {sp.vocab_size()} pieces")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.hidden_dropout:
        add_hidden_dropout(model, cfg.hidden_dropout)
    if cfg.lora is not None:
        import peft

        lc = peft.LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.targets),
            modules_to_save=list(cfg.lora.modules_to_save) or None, task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, lc)
        if cfg.lora.fused:
            from .fused_lora import fuse_lora

            fuse_lora(model)
    if cfg.compile:
        compile_layers(model)
    return model


def add_hidden_dropout(model, p: float) -> None:
    """Dropout (rate ``p``, training mode only) on the token embeddings and on every attention and MLP output
    before the residual add, as forward hooks: the saved model and its config are unchanged."""
    torch = _torch()

    def drop(module, args, output):
        if isinstance(output, tuple):
            return (torch.nn.functional.dropout(output[0], p, module.training), *output[1:])
        return torch.nn.functional.dropout(output, p, module.training)

    core = model.model
    core.embed_tokens.register_forward_hook(drop)
    for layer in core.layers:
        layer.self_attn.register_forward_hook(drop)
        layer.mlp.register_forward_hook(drop)


def compile_layers(model) -> None:
    """torch.compile every decoder layer in place (one compiled graph serves all, as they share code and shapes);
    the head and the loss stay outside (they are chunked by hand)."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in core.model.layers:
        layer.compile()


def make_optimizer(groups, cfg: TrainConfig):
    """AdamW, fused into one kernel on CUDA."""
    torch = _torch()
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=on_cuda or None)


def held_out(line: str, share: float) -> bool:
    """Whether ``line`` is in a file's held-out ``share`` (holdout): a hash of its text, the same on every run."""
    digest = hashlib.blake2b(line.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * 2**64


def _weighted_lines(path: Path, weight: float, seed: int, holdout: float = 0.0, held: bool = False):
    """The lines of one file, a seeded share ``weight`` of them when ``weight`` < 1; with ``holdout``, only the
    lines outside the held-out share (``held``: only those in it)."""
    from tiblocal.vocab import read_lines

    lines = read_lines([path])
    if holdout:
        lines = (line for line in lines if held_out(line, holdout) == held)
    if weight >= 1:
        yield from lines
        return
    rng = random.Random(f"{seed}:{path.name}")
    for line in lines:
        if rng.random() < weight:
            yield line


def _blocks(cfg: TrainConfig, sp, files: tuple[str, ...], limit: int | None, weights: dict, *, held: bool = False):
    """Pretraining blocks as one (n, block_size) int32 tensor: each file packed on its own, weighted, without its
    held-out lines (cfg.holdout); ``held``: the held-out lines alone, as many blocks of each file (``limit`` in all)."""
    torch = _torch()
    import numpy as np

    from .data import pack_blocks

    parts = []
    per_file = -(-limit // len(files)) if held and limit and files else limit
    for f in files:
        w = float(weights.get(f, 1.0))
        lines = _weighted_lines(Path(f), w, cfg.seed, float(cfg.holdout.get(f, 0.0)), held)
        blocks = [np.asarray(b, dtype=np.int32) for b in islice(pack_blocks(sp, lines, cfg.block_size), per_file)]
        if not blocks:
            continue
        arr = np.stack(blocks)
        if w > 1:  # whole repeats, then a seeded share of the blocks for the fraction
            extra = np.random.default_rng(cfg.seed).permutation(len(arr))[: int(round((w % 1) * len(arr)))]
            arr = np.concatenate([arr] * int(w) + [arr[extra]])
        parts.append(arr)
        log.info("%s: %d blocks of %d tokens (weight %g)", f, len(arr), cfg.block_size, w)
    if not parts:
        return torch.zeros((0, cfg.block_size), dtype=torch.int32)
    out = torch.from_numpy(np.concatenate(parts))
    return out[:limit] if limit is not None else out


def _examples(cfg: TrainConfig, sp, files: tuple[str, ...], limit: int | None = None, weights: dict | None = None):
    """Pretraining: a tensor of packed blocks; SFT: (input_ids, labels) pairs of rendered examples (at most ``limit``)."""
    from tiblocal.templates import get_template

    from .data import read_instructions, sft_example

    if cfg.stage == "pretrain":
        return _blocks(cfg, sp, files, limit, weights or {})
    template = get_template(cfg.template)
    out = []
    for f in files:
        rows, report = read_instructions(Path(f))
        if report.bad:
            log.warning("%s: skipped %d of %d rows (%s)", f, report.bad, report.rows, report.reasons)
        for row in rows:
            ids, labels = sft_example(template, sp, row)
            if len(ids) <= cfg.block_size:
                out.append((ids, labels))
    if limit is not None and len(out) > limit:  # evenly through the files, so every task is in the sample
        out = [out[i * len(out) // limit] for i in range(limit)]
    return out


def _replay(cfg: TrainConfig, sp) -> list[tuple[list[int], list[int]]]:
    """SFT's replay: from each plain-text file, a seeded sample of ``cfg.replay[file]`` of its lines, each an example
    BOS + text + EOS (cut at block_size) whose every token is labelled, as in pretraining."""
    from tiblocal.vocab import read_lines

    out = []
    for f, n in cfg.replay.items():
        lines = [line for line in read_lines([Path(f)]) if line.strip()]
        if len(lines) < n:
            raise InputFileError(f"replay asks for {n} lines of {f}, which has {len(lines)}; ask for at most that")
        picked = random.Random(f"{cfg.seed}:replay:{Path(f).name}").sample(lines, n)
        for ids in sp.encode(picked):
            ids = ([sp.bos_id(), *ids, sp.eos_id()])[: cfg.block_size]
            out.append((ids, list(ids)))
        log.info("%s: %d lines replayed", f, n)
    return out


class BatchOrder:
    """The examples of each global batch: epochs of a seeded shuffle, a function of (seed, step) alone, so a
    resumed run takes the same batches. With ``lengths`` (SFT), batches are grouped by length as
    transformers' group_by_length does: each window of 64 batches is sorted by length and cut into batches,
    and the batches are shuffled, so a batch pads to similar lengths and no attention crosses examples."""

    WINDOW = 64

    def __init__(self, n: int, batch: int, seed: int, lengths: list[int] | None = None) -> None:
        self.n, self.batch, self.seed, self.lengths = n, batch, seed, lengths
        self.per_epoch = max(1, n // batch)
        self._epoch, self._batches = -1, []

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1000003 + epoch)
        order = list(range(self.n))
        rng.shuffle(order)
        if self.lengths is None:
            return [order[k * self.batch : (k + 1) * self.batch] for k in range(self.per_epoch)]
        used = order[: self.per_epoch * self.batch] if self.n >= self.batch else order
        batches = []
        for s in range(0, len(used), self.batch * self.WINDOW):
            window = sorted(used[s : s + self.batch * self.WINDOW], key=lambda i: -self.lengths[i])
            batches += [window[j : j + self.batch] for j in range(0, len(window), self.batch)]
        rng.shuffle(batches)
        return batches

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return self._batches[k]


def token_chunks(idx: list[int], lengths, budget: int) -> list[list[int]]:
    """Consecutive runs of ``idx`` whose padded size (examples x the longest, ``lengths[i]`` the length of example i)
    stays within ``budget`` tokens (a longer example goes alone)."""
    chunks: list[list[int]] = []
    longest = 0
    for i in idx:
        if chunks and (len(chunks[-1]) + 1) * max(longest, lengths[i]) <= budget:
            chunks[-1].append(i)
            longest = max(longest, lengths[i])
        else:
            chunks.append([i])
            longest = lengths[i]
    return chunks


def _micro_batches(cfg: TrainConfig, idx: list[int], examples, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches of one step. ``grad_accum`` equal parts of its share; with ``micro_tokens``
    (SFT) runs of the step's examples of at most that many padded tokens a process, cut the same way on every
    process (so under FSDP all take part in the same number of passes), each process taking its share of each."""
    if cfg.micro_tokens is None:
        mine = idx[rank::world] or idx[:1]
        micro = max(1, math.ceil(len(mine) / cfg.grad_accum))
        return [mine[m : m + micro] for m in range(0, len(mine), micro)]
    lengths = {i: len(examples[i][0]) for i in idx}
    ordered = sorted(idx, key=lambda i: -lengths[i])
    chunks = token_chunks(ordered, lengths, cfg.micro_tokens * world)
    return [c[rank::world] or c[:1] for c in chunks]


def _collate(examples, idx: list[int], pad_id: int):
    """A batch of examples ``idx``: packed blocks need no mask (every position is text); SFT examples are
    right-padded with a mask and -100 labels."""
    torch = _torch()
    if isinstance(examples, torch.Tensor):
        ids = examples[idx].long()
        return {"input_ids": ids, "labels": ids}
    chosen = [examples[i] for i in idx]
    width = max(len(ids) for ids, _ in chosen)
    ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
    labels = torch.full((len(chosen), width), -100, dtype=torch.long)
    mask = torch.zeros((len(chosen), width), dtype=torch.long)
    for i, (x, y) in enumerate(chosen):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _check_output_dir(cfg: TrainConfig, out: Path) -> bool:
    """True when ``out`` holds a checkpoint of this same run (resume); refuse a folder of another run, and one that
    is, contains or lies inside an input (the base model, the tokenizer, the text)."""
    from tiblocal.fsutil import check_not_an_input

    inputs = [None if cfg.base_model == "scratch" else cfg.base_model, cfg.tokenizer, *cfg.train_files, *cfg.eval_files,
              *cfg.replay]
    check_not_an_input(out, inputs, option="output_dir")
    saved = out / "run_config.yaml"
    if not saved.is_file():
        if out.exists() and any(out.iterdir()):
            raise TiblocalError(f"{out} is not empty and holds no tiblocal run; choose another output_dir")
        return False
    try:
        old = read_yaml(saved)
    except InputFileError as e:
        raise TiblocalError(f"{e}; it is the run's saved recipe: choose another output_dir, or delete {out} to "
                            "start again") from None
    if not isinstance(old, dict):
        raise TiblocalError(f"{saved} holds no recipe (a YAML {type(old).__name__}); choose another output_dir, or "
                            f"delete {out} to start again")
    new = to_dict(cfg)
    ignore = {"max_steps", "eval_every", "save_every", "log_every"}  # may change between a run and its resume
    # a setting a run saved before it existed had its default then
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    differ = sorted(k for k in set(old) | set(new)
                    if k not in ignore and old.get(k, defaults.get(k)) != new.get(k))
    if differ:
        raise TiblocalError(
            f"{out} holds a different run ({', '.join(differ)} differ); choose another output_dir or delete it"
        )
    return (out / CHECKPOINT / "state.pt").is_file()


def train(cfg: TrainConfig, *, progress=None) -> RunResult:
    torch = _torch()
    from accelerate import Accelerator
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its bar at every save_pretrained: the run's own progress is tiblocal's
    out = Path(cfg.output_dir)
    if cfg.tensorboard:
        _tensorboard(None)  # before anything is written: is the package there?
    resume = _check_output_dir(cfg, out)
    # Accumulation is done here, per step (accelerate's own counter would skip optimizer steps whenever a step
    # has fewer micro-batches than grad_accum).
    accel = Accelerator(mixed_precision=cfg.mixed_precision)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    sp, model_file, tok_dir, n_base = _load_tokenizer(cfg)
    # a model from scratch: its settings checked before the data is read
    scratch = _scratch_config(cfg, sp, n_base, accel.device) if cfg.base_model == "scratch" else None
    train_ex = _examples(cfg, sp, cfg.train_files, weights=cfg.train_weights)
    if cfg.replay:
        train_ex += _replay(cfg, sp)
    if cfg.holdout:  # the held-out lines of the training files
        eval_ex = _blocks(cfg, sp, tuple(cfg.holdout), cfg.eval_blocks, {}, held=True)
    else:
        eval_ex = _examples(cfg, sp, cfg.eval_files, limit=cfg.eval_blocks)
    if not len(train_ex):
        raise InputFileError(
            f"no training examples from {', '.join(cfg.train_files) or 'train_files (empty)'}"
            + (f"; the text is shorter than one block of {cfg.block_size} tokens" if cfg.stage == "pretrain" else "")
        )
    from .loss import CausalLMWithLoss

    model = CausalLMWithLoss(_build_model(cfg, sp, model_file, n_base, accel.device, scratch)).to(accel.device)
    embed_names = ("embed_tokens", "lm_head")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if not any(e in n for e in embed_names)], "lr": cfg.lr},
        {"params": [p for n, p in trainable if any(e in n for e in embed_names)], "lr": cfg.embed_lr or cfg.lr},
    ]
    groups = [g for g in groups if g["params"]]
    opt = make_optimizer(groups, cfg)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.scheduler == "constant":
            return 1.0
        t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model, opt = accel.prepare(model, opt)
    start = 0
    best = (math.inf, 0)  # keep_best: the lowest eval loss so far and its step (0: none yet)
    if resume:
        state = torch.load(out / CHECKPOINT / "state.pt", map_location="cpu", weights_only=False)
        _load_training_state(accel, model, opt, state, out)
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["py_rng"])
        start = state["step"]
        best = (state.get("best_eval_loss", math.inf), state.get("best_step", 0))
    elif accel.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.yaml").write_text(dump(cfg), encoding="utf-8")
    pad = sp.eos_id()
    global_batch = cfg.batch_size * accel.num_processes
    metrics = open(out / "metrics.jsonl", "a", encoding="utf-8") if accel.is_main_process else None
    board = _tensorboard(out) if cfg.tensorboard and accel.is_main_process else None
    tokens = 0
    loss_value = float("nan")
    eval_loss = None
    saved = start  # the step of the checkpoint on disk (0: none)
    t0 = time.perf_counter()
    model.train()
    lengths = [len(ids) for ids, _ in train_ex] if cfg.stage == "sft" and cfg.group_by_length else None
    order = BatchOrder(len(train_ex), global_batch, cfg.seed, lengths)
    for step in range(start, cfg.max_steps):
        # the random draws of a step (LoRA dropout masks) are a function of (seed, step, process), on every device,
        # so a resumed run draws what the uninterrupted run drew, under DDP and FSDP too
        torch.manual_seed((cfg.seed * 1_000_003 + step) * 64 + accel.process_index)
        idx = order.indices(step)
        parts = _micro_batches(cfg, idx, train_ex, accel.process_index, accel.num_processes)
        n_mine = sum(len(part) for part in parts)
        losses = []
        for i, chunk in enumerate(parts):
            cpu = _collate(train_ex, chunk, pad)  # counted here, before the copy: no wait on the GPU
            tokens += int(cpu["attention_mask"].sum()) if "attention_mask" in cpu else cpu["input_ids"].numel()
            batch = {k: v.to(accel.device, non_blocking=True) for k, v in cpu.items()}
            # gradients are synchronised across processes on the last micro-batch only
            sync = contextlib.nullcontext() if i == len(parts) - 1 else accel.no_sync(model)
            with sync:
                with accel.autocast():
                    loss = model(**batch)
                accel.backward(loss * (len(chunk) / n_mine))
            losses.append(loss.detach() * (len(chunk) / n_mine))
        opt.step()
        sched.step()
        opt.zero_grad()
        loss_value = float(torch.stack(losses).sum())
        done = step + 1
        if progress:
            progress(done, cfg.max_steps, loss_value)
        record = {"step": done, "loss": round(loss_value, 5), "lr": sched.get_last_lr()[0]}
        if len(eval_ex) and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            eval_loss = _evaluate(model, eval_ex, pad, cfg.batch_size, accel)
            record.update(eval_loss=round(eval_loss, 5), eval_ppl=round(math.exp(min(eval_loss, 50)), 3))
            if cfg.keep_best and eval_loss < best[0]:
                best = (eval_loss, done)
                _save_model(accel, model, out / BEST, tok_dir, cfg.generation, whole_or_none=True)
                record["kept"] = True
            model.train()
        if metrics and (done % cfg.log_every == 0 or "eval_loss" in record or done == cfg.max_steps):
            seconds = time.perf_counter() - t0
            record["seconds"] = round(seconds, 2)
            record["tokens_per_s"] = round(tokens * accel.num_processes / max(seconds, 1e-9))
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if board:
                for key in ("loss", "lr", "eval_loss", "eval_ppl", "tokens_per_s"):
                    if key in record:
                        board.add_scalar(f"{cfg.stage}/{key}", record[key], done)
        if not math.isfinite(loss_value):  # the weights are now NaN: no checkpoint of them, no model that looks done
            raise TiblocalError(
                f"the training loss is {loss_value} at step {done} (lr {cfg.lr:g}): the training diverged; lower lr, "
                "or check the data" + (f"; the checkpoint of step {saved} stays in {out}" if saved else "")
                + "; no model was written")
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            _save_checkpoint(accel, model, opt, sched, done, out, best)
            saved = done
    if metrics:
        metrics.close()
    if board:
        board.close()
    if cfg.keep_best and best[1]:
        # the model of the best evaluation becomes the run's model; output_dir/best stays, for a run continued with
        # a larger max_steps
        kept = [out / BEST / name for name in ("model", "adapter") if (out / BEST / name).is_dir()]
        if not kept:  # every process sees it (one output_dir), so none waits below for the others
            raise TiblocalError(f"{out / BEST} should hold the model of step {best[1]} (eval loss {best[0]:.4f}) "
                                "and does not; run again with another output_dir")
        if accel.is_main_process:
            for folder in kept:
                with atomic_dir(out / folder.name, replace=True) as tmp:
                    shutil.copytree(folder, tmp, dirs_exist_ok=True)
        accel.wait_for_everyone()
        return RunResult(out, cfg.max_steps, loss_value, best[0], start, best_step=best[1], examples=len(train_ex))
    _save_model(accel, model, out, tok_dir, cfg.generation)
    return RunResult(out, cfg.max_steps, loss_value, eval_loss, start, examples=len(train_ex))


def _save_model(accel, model, out: Path, tok_dir: Path, generation: dict, *, whole_or_none: bool = False) -> None:
    """The model (or adapter) as the run saves it, into ``out``; every process takes part (FSDP gathers the shards).
    ``whole_or_none``: ``out`` is written beside and swapped in when complete (the kept best model, replaced during
    the run: a kill leaves the previous one whole)."""
    state = _full_state(accel, model)
    if accel.is_main_process:
        inner = accel.unwrap_model(model).inner
        if whole_or_none:
            with atomic_dir(out, replace=True) as tmp:
                _save_final(inner, state, tmp, tok_dir, generation)
        else:
            _save_final(inner, state, out, tok_dir, generation)
    accel.wait_for_everyone()


def _evaluate(model, examples, pad: int, batch: int, accel) -> float:
    torch = _torch()
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            b = {k: v.to(accel.device) for k, v in _collate(examples, list(range(i, min(i + batch, len(examples)))), pad).items()}
            n = int((b["labels"][:, 1:] != -100).sum())
            with accel.autocast():
                total += model(**b).item() * n
            count += n
    return total / max(count, 1)


def _tensorboard(out: Path | None):
    """A SummaryWriter into ``out``/tensorboard (None: only check that tensorboard is installed)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TiblocalError("tensorboard: true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(out / "tensorboard")) if out is not None else None


def _sharded(accel) -> bool:
    from accelerate.utils import DistributedType

    return accel.distributed_type == DistributedType.FSDP


def _optimizer_state(accel, model, opt) -> dict:
    """The optimizer's whole state: under FSDP gathered from every shard (keyed by parameter name; every process
    takes part, the main one gets it), else the optimizer's own state dict."""
    if not _sharded(accel):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_training_state(accel, model, opt, state: dict, out: Path) -> None:
    """Put a checkpoint's trained parameters and optimizer state back, sharding them again under FSDP."""
    fmt = "fsdp" if _sharded(accel) else "plain"
    if state.get("format", "plain") != fmt:
        raise TiblocalError(
            f"{out / CHECKPOINT} was written {'under FSDP' if fmt == 'plain' else 'without FSDP'}; resume it the way it "
            "was started (the same accelerate config), or choose another output_dir"
        )
    if fmt == "plain":
        accel.unwrap_model(model).inner.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)  # every process holds the whole checkpoint
    set_model_state_dict(model, {f"inner.{k}": v for k, v in state["model"].items()}, options=options)
    set_optimizer_state_dict(model, opt.optimizer, state["optimizer"], options=options)


def _save_checkpoint(accel, model, opt, sched, step: int, out: Path, best: tuple[float, int] = (math.inf, 0)) -> None:
    """The training state at ``step`` (``best``: keep_best's lowest eval loss and its step, 0 for none)."""
    torch = _torch()
    accel.wait_for_everyone()
    full = _full_state(accel, model)
    optimizer = _optimizer_state(accel, model, opt)  # collective under FSDP
    if not accel.is_main_process:
        return
    inner = accel.unwrap_model(model).inner
    trainable = {n for n, p in inner.named_parameters() if p.requires_grad}
    state = {
        "model": {k: v.detach().cpu() for k, v in full.items() if k in trainable},
        "optimizer": optimizer,
        "format": "fsdp" if _sharded(accel) else "plain",
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "py_rng": random.getstate(),
        "step": step,
        "best_eval_loss": best[0],
        "best_step": best[1],
    }
    folder = out / CHECKPOINT
    folder.mkdir(parents=True, exist_ok=True)
    remove_partials(folder / "state.pt")  # left by a save that was killed
    # written beside, then renamed over the old one: a kill at any moment leaves the previous checkpoint or this one,
    # whole (removing the old one first left none for an instant, and a kill then restarted the run from step 0)
    with atomic_path(folder / "state.pt", option="output_dir=") as tmp:
        torch.save(state, tmp)


def _full_state(accel, model) -> dict:
    """The model's whole state dict (keys as in the unwrapped model), gathered under FSDP."""
    return {k.removeprefix("inner."): v for k, v in accel.get_state_dict(model).items()}


def _save_final(model, state: dict, out: Path, tok_dir: Path, generation: dict) -> None:
    """The adapter (with its trained embed_tokens / lm_head) or the full model, and the tokenizer beside it;
    ``generation`` goes into the model's generation_config.json (convert turns sampling into GGUF metadata)."""
    target = out / ("adapter" if hasattr(model, "peft_config") else "model")
    if generation:
        for key, value in generation.items():
            setattr(model.generation_config, key, value)
    model.save_pretrained(target, state_dict=state)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tiblocal_vocab.json"):
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, target / name)
