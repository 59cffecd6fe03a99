"""Tokens/s and MFU of the 7B-shaped LoRA pretraining step: plain transformers + peft against tiblocal's step.

The setup of issue 6: a Llama-2-7B-shaped model with random bf16 weights and a 55,296-row vocabulary, LoRA r 64 /
alpha 128 / dropout 0.05 on q,k,v,o,gate,up,down, embed_tokens and lm_head trained in full (peft
modules_to_save), sequences of 1024, AdamW. Every mode runs in this one process on the same model:
- ``plain:B``: ``model(input_ids, labels=labels).loss`` (transformers computes full fp32 logits), torch's
  default AdamW; this is the loop the issue measured (9,213 tokens/s at batch 4 without checkpointing);
- ``loss:B``: peft's own LoRA forward with finetune.loss.CausalLMWithLoss (the head and the cross-entropy
  chunked, no full logits) and fused AdamW;
- ``tiblocal:B``: the step `tiblocal pretrain` takes: the same plus finetune.fused_lora (LoRA in bf16 from
  fp32 masters, one autograd function per projection, the dropout mask kept as bool);
- ``tiblocal-compile:B``: the same with the decoder layers compiled (recipe key ``compile: true``; put these
  runs last, compiling is not undone).
Tokens/s is the median over the timed steps; MFU counts the model FLOPs of a step (forward 2 N, backward
2 N for activations + 2 N_trainable for weight gradients, causal attention) against the GPU's dense bf16 peak.

    python benchmarks/bench_train_step.py --modes plain:4,loss:4,tiblocal:4,tiblocal:8,tiblocal-compile:8 --out r.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of the script with a tiny shape


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build(args):
    import peft
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, vocab_size=args.vocab, max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    lc = peft.LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05, task_type="CAUSAL_LM",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                         modules_to_save=["embed_tokens", "lm_head"])
    return peft.get_peft_model(model, lc)


def step_flops(model, tokens: int, args) -> float:
    n_all = sum(p.numel() for n, p in model.named_parameters() if "original_module" not in n)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attn = 2 * args.layers * args.seq * args.hidden  # QK^T and AV per token, causal half, forward
    return tokens * (4 * n_all + 2 * n_train + 3 * attn)


def run_mode(model, mode: str, batch: int, args) -> dict:
    from tiblocal.finetune.fused_lora import fuse_lora
    from tiblocal.finetune.loss import CausalLMWithLoss
    from tiblocal.finetune.train import compile_layers

    trainable = [p for p in model.parameters() if p.requires_grad]
    for module in model.modules():  # undo fuse_lora of an earlier mode
        module.__dict__.pop("forward", None)
    if mode.startswith("tiblocal"):
        fuse_lora(model)
    if mode == "plain":
        opt = torch.optim.AdamW(trainable, lr=1e-5)
        forward = lambda ids: model(input_ids=ids, labels=ids).loss  # noqa: E731
    else:
        if mode == "tiblocal-compile":
            compile_layers(model)
        wrapped = CausalLMWithLoss(model)
        opt = torch.optim.AdamW(trainable, lr=1e-5, fused=DEVICE == "cuda" or None)
        forward = lambda ids: wrapped(ids, ids)  # noqa: E731
    model.train()
    g = torch.Generator(device=DEVICE).manual_seed(1)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    try:
        for i in range(args.warmup + args.steps):
            ids = torch.randint(0, args.vocab, (batch, args.seq), device=DEVICE, generator=g)
            sync()
            t0 = time.perf_counter()
            loss = forward(ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        if args.profile and DEVICE == "cuda":  # two more steps under the profiler: where the time goes
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(2):
                    ids = torch.randint(0, args.vocab, (batch, args.seq), device=DEVICE, generator=g)
                    forward(ids).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                sync()
            try:
                table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=70)
            except (KeyError, AttributeError, ValueError):
                table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70)
            args.profile.mkdir(parents=True, exist_ok=True)
            (args.profile / f"{mode}-{batch}.txt").write_text(table)
    except torch.OutOfMemoryError:
        return {"mode": mode, "batch": batch, "error": "out of memory"}
    finally:
        del opt
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    t = statistics.median(times)
    tokens = batch * args.seq
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    flops = step_flops(model, tokens, args)
    return {
        "mode": mode, "batch": batch, "step_s": round(t, 4), "tokens_per_s": round(tokens / t, 1),
        "tflops": round(flops / t / 1e12, 1), "mfu": round(flops / t / peak, 4) if peak else None,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if DEVICE == "cuda" else None, "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="plain:4,loss:4,tiblocal:4,tiblocal:8,tiblocal-compile:8")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=55296)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--profile", type=Path, help="also write a torch.profiler kernel table per mode to this folder")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = build(args)
    result = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "build_s": round(time.perf_counter() - t0, 1),
              "shape": {k: getattr(args, k) for k in ("hidden", "ffn", "layers", "heads", "vocab", "seq")}, "runs": []}
    for spec in args.modes.split(","):
        mode, _, batch = spec.partition(":")
        if mode not in ("plain", "loss", "tiblocal", "tiblocal-compile") or not batch.isdigit():
            ap.error(f"mode {spec!r}: expected plain|loss|tiblocal|tiblocal-compile:BATCH")
        r = run_mode(model, mode, int(batch), args)
        print(json.dumps(r), flush=True)
        result["runs"].append(r)
    plain = next((r for r in result["runs"] if r["mode"] == "plain" and "tokens_per_s" in r), None)
    if plain:
        for r in result["runs"]:
            if "tokens_per_s" in r:
                r["ratio_to_plain"] = round(r["tokens_per_s"] / plain["tokens_per_s"], 3)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
