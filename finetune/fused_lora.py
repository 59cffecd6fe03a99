"""A leaner LoRA linear for training: one autograd function in place of peft's per-layer forward.

peft's ``lora.Linear`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``. With a bf16 model and
peft's default fp32 adapters (``autocast_adapter_dtype``) that casts ``x`` to fp32, applies dropout to the
fp32 copy and runs the adapter matmuls in full fp32, and autograd keeps the fp32 copy, its dropped-out
twin and the mask for the backward pass: about 10 bytes per input element for every projection, on top of
``x`` itself, which the frozen base layer already keeps. At 7B and 4,096 tokens per step that is about 20 GB
of activations and slow fp32 GEMMs.

Here the same function is one ``torch.autograd.Function``:
- the adapter matmuls run in the input's dtype (bf16), from bf16 views of the fp32 master weights; their
  gradients come back in fp32 to the fp32 masters (the usual mixed-precision arrangement);
- the only tensors kept for backward are ``x`` (shared with nothing new: the same storage), the boolean
  dropout mask (1 byte per element) and the rank-r product ``dropout(x) @ A.T``; the dropped-out input is
  rebuilt from ``x`` and the mask when the gradient of A is formed;
- the base product and the adapter's are summed in place (``addmm_``).
The dropout is the same distribution as peft's (an independent Bernoulli keep-mask per element and per
projection, scaled by 1 / (1 - p)); with the same mask the results equal peft's (tests check values and
gradients). The parameters stay peft's own, so saving, loading and merging adapters are unchanged.

``fuse_lora(model)`` switches every eligible peft LoRA linear of a model to this path; anything it does
not cover (several active adapters, DoRA and other variants, a LoRA bias, merged or disabled adapters, a trained
bias, ``adapter_names`` in the call) goes through peft's own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .loss import compute_dtype


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + scale * (drop(x) A^T) B^T, computed in ``dtype``; W and b frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, p, mask, dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        w = weight.to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        if mask is None and p > 0:
            mask = torch.empty(x2.shape, dtype=torch.bool, device=x2.device).bernoulli_(1.0 - p)
        keep = 1.0 / (1.0 - p) if mask is not None else 1.0
        xd = x2 if mask is None else x2.mul(mask).mul_(keep)
        h = xd @ a.t()  # (N, r)
        del xd
        out = F.linear(x2, w, None if bias is None else bias.to(dtype))
        out.addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, h, mask)
        ctx.scale, ctx.keep, ctx.dtype, ctx.in_dtype, ctx.shape = scale, keep, dtype, x.dtype, shape
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, lora_a, lora_b, h, mask = ctx.saved_tensors
        dtype, scale = ctx.dtype, ctx.scale
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        gh = (g @ b).mul_(scale)  # d loss / d h, (N, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            gx = gh @ a  # through the adapter, (N, in)
            if mask is not None:
                gx.mul_(mask).mul_(ctx.keep)
            gx.addmm_(g, weight.to(dtype))  # plus through the frozen base weight
            grad_x = gx.view(ctx.shape).to(ctx.in_dtype)
        if ctx.needs_input_grad[3]:
            xd = x2 if mask is None else x2.mul(mask).mul_(ctx.keep)
            grad_a = (gh.t() @ xd).to(lora_a.dtype)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ h).mul_(scale).to(lora_b.dtype)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None


def lora_linear(x, weight, bias, lora_a, lora_b, scale: float, p: float = 0.0, mask: torch.Tensor | None = None):
    """The fused LoRA linear as a function; ``mask`` (bool, x's shape flattened to 2-D) fixes the dropout."""
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, float(scale), float(p), mask, compute_dtype(x))


def _eligible_call(layer, x, args, kwargs) -> str | None:
    """The adapter name when the fused path computes what peft's forward would, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [n for n in layer.active_adapters if n in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "fan_in_fan_out", False):
        return None
    if layer.lora_A[name].bias is not None or layer.lora_B[name].bias is not None:  # peft's lora_bias
        return None
    base = layer.get_base_layer()
    if type(base) is not torch.nn.Linear or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    if not torch.is_grad_enabled():  # inference: peft's path is as good and keeps its exact behaviour
        return None
    return name


def _fused_forward(self, x, *args, **kwargs):
    name = _eligible_call(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    drop = self.lora_dropout[name]
    p = float(drop.p) if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
    return lora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p)


def fuse_lora(model) -> int:
    """Route every peft LoRA ``Linear`` of ``model`` through the fused function; returns how many."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n
