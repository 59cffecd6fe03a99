"""Causal-LM loss over a large vocabulary without the full fp32 logits.

Hugging Face's LlamaForCausalLM computes ``lm_head(hidden)`` for every position, upcasts the logits to
fp32 and then takes the cross-entropy: with a 55k-row head and batch × 1024 positions that is gigabytes
of activations kept for the backward pass (batch 4 at 7B: 0.9 GB of fp32 logits and as much again for
their gradient). Here the head and the loss are one autograd function that walks the positions in
chunks: for each chunk it forms the logits, the loss and, at once, the gradients for the hidden states
and for the head's weight, and keeps only those gradients. Peak extra memory is one chunk's logits.
The decoder still runs through its own forward, so LoRA (peft), gradient checkpointing, DDP and autocast
work as usual; the result equals ``model(input_ids, labels=labels).loss`` (tests check it and its
gradients).
"""

from __future__ import annotations

import torch

IGNORE = -100
CHUNK_BYTES = 1 << 30  # fp32 logits of one chunk


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls of ``t`` run in: autocast's when it is on, else ``t``'s own."""
    device = t.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, n_valid, dtype, need_grad):
        # hidden (N, H), weight (V, H), labels (N,); the mean over the n_valid labelled positions
        rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad and ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], rows):
            h = hidden[s : s + rows].to(dtype)
            y = labels[s : s + rows]
            valid = y != IGNORE
            target = y.clamp(min=0)
            logits = (h @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if need_grad:
                # d(loss)/d(logits) = (softmax - onehot) / n_valid on labelled rows
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(g.shape[0], device=g.device), target] -= 1
                g.mul_((valid.float() / n_valid)[:, None])
                g = g.to(dtype)
                grad_h[s : s + rows] = (g @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w += (g.t() @ h).float()
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
            ctx.weight_dtype = weight.dtype
            ctx.has_grad_w = grad_w is not None
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype)
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if ctx.has_grad_w else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` (-100: no loss), chunked."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    n_valid = max(int((labels != IGNORE).sum()), 1)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, labels, n_valid, compute_dtype(hidden), need_grad)


def _head_weight(head: torch.nn.Module) -> torch.Tensor:
    """The weight the head applies: a plain Linear's, or the active copy of peft's ModulesToSaveWrapper."""
    copies = getattr(head, "modules_to_save", None)
    if copies is not None:
        active = head.active_adapters[0] if not getattr(head, "disable_adapters", False) else None
        if active in copies:
            return copies[active].weight
        return head.original_module.weight
    return head.weight


class CausalLMWithLoss(torch.nn.Module):
    """A Llama causal LM (plain or peft) whose forward returns the chunked shifted cross-entropy."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not hasattr(core, "model") or not hasattr(core, "lm_head"):
            raise TypeError(f"{type(core).__name__} is not a decoder with an lm_head")
        self._core = [core]  # not a submodule: the parameters are registered once, through inner

    def forward(self, input_ids, labels, attention_mask=None):
        core = self._core[0]
        # no KV cache in training (a cache object in each layer's call would also defeat compiled layers)
        hidden = core.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return linear_cross_entropy(hidden[:, :-1], _head_weight(core.lm_head), labels[:, 1:])
