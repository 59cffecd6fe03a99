"""The fused LoRA linear (finetune/fused_lora.py) against peft's own forward and against the formula."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tiblocal.finetune.fused_lora import fuse_lora, lora_linear  # noqa: E402


def _reference(x, w, a, b, scale, p, mask):
    xd = x if mask is None else x * mask.view(x.shape) / (1 - p)
    return x @ w.t() + (xd @ a.t()) @ b.t() * scale


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_function_matches_formula_values_and_gradients(p):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, 16, generator=g, dtype=torch.float64)
    a = torch.randn(4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(10, 16, generator=g) > p) if p else None
    ours = lora_linear(x, w, None, a, b, 2.0, p, mask)
    ref = _reference(x, w, a, b, 2.0, p, mask)
    torch.testing.assert_close(ours, ref)
    up = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((ours * up).sum(), (x, a, b))
    want = torch.autograd.grad((ref * up).sum(), (x, a, b))
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww)


def test_dropout_is_an_unbiased_bernoulli_mask():
    p, n = 0.25, 200_000
    x = torch.ones(n, 1)
    one = torch.ones(1, 1)
    torch.manual_seed(0)
    lora = lora_linear(x, torch.zeros(1, 1), None, one, one, 1.0, p).squeeze(1)
    dropped = (lora == 0).float().mean().item()
    assert abs(dropped - p) < 0.01
    assert abs(lora.mean().item() - 1.0) < 0.01  # kept inputs are scaled by 1 / (1 - p)
    again = lora_linear(x, torch.zeros(1, 1), None, one, one, 1.0, p).squeeze(1)
    assert not torch.equal(lora, again)  # a fresh mask every call


def _tiny_peft(dtype, dropout):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    lc = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, task_type="CAUSAL_LM",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                         modules_to_save=["embed_tokens", "lm_head"])
    model = peft.get_peft_model(model, lc)
    with torch.no_grad():  # B starts at zero; give it values so the adapters matter
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.1)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_model_equals_peft_without_dropout(dtype):
    model = _tiny_peft(dtype, 0.0)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    model.train()
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    assert fuse_lora(model) == 14
    loss, grads = _loss_and_grads(model, ids)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0.05, atol=0.02)
    torch.testing.assert_close(loss.float(), ref_loss.float(), **tol)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert grads[n].dtype == ref_grads[n].dtype, n  # fp32 masters get fp32 gradients
        if dtype == torch.float32:
            torch.testing.assert_close(grads[n], ref_grads[n], **tol, msg=n)
        else:  # bf16 compute against peft's fp32 adapter compute: close in direction and size
            cos = torch.nn.functional.cosine_similarity(grads[n].float().flatten(), ref_grads[n].float().flatten(), dim=0)
            assert cos > 0.99, (n, cos)


def test_fused_model_under_autocast_matches_peft():
    """fp32 weights with bf16 autocast (recipe key mixed_precision: bf16): the function computes in bf16 too."""
    model = _tiny_peft(torch.float32, 0.0)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = _loss_and_grads(model, ids)
    fuse_lora(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=0.02, atol=0.02)
    for n in grads:
        assert grads[n].dtype == torch.float32, n
        cos = torch.nn.functional.cosine_similarity(grads[n].flatten(), ref_grads[n].flatten(), dim=0)
        assert cos > 0.99, (n, cos)


def test_fused_model_draws_the_same_dropout_as_peft_on_the_cpu():
    """On the CPU both take one Bernoulli draw of the input's shape per projection, in the same order: with the
    same seed the losses are equal, dropout included (on CUDA the kernels differ, the distribution does not)."""
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    losses = []
    for fuse in (False, True):
        model = _tiny_peft(torch.float32, 0.5)
        if fuse:
            fuse_lora(model)
        model.train()
        torch.manual_seed(7)
        losses.append([model(input_ids=ids, labels=ids).loss.item() for _ in range(3)])
    assert len(set(losses[0])) == 3  # dropout is on: three draws, three losses
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_variants_it_does_not_cover_go_through_peft():
    from tiblocal.finetune.fused_lora import _eligible_call

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(5))
    for extra in ({"use_dora": True}, {"lora_bias": True}):
        torch.manual_seed(0)
        model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **extra))
        with torch.no_grad():
            for n, prm in model.named_parameters():
                if "lora_B" in n:
                    prm.normal_(0, 0.1)
        model.train()
        ref = model(input_ids=ids).logits
        fuse_lora(model)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert _eligible_call(layer, ids, (), {}) is None, extra
        torch.testing.assert_close(model(input_ids=ids).logits, ref)


def test_fused_model_with_dropout_trains_and_falls_back_where_it_must():
    model = _tiny_peft(torch.float32, 0.05)
    fuse_lora(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # eval (no grad, dropout off) and disabled adapters go through peft's forward, and give its results
    model.eval()
    with torch.no_grad():
        fused_eval = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert not torch.allclose(fused_eval, base)
    with torch.enable_grad():
        train_path = model(input_ids=ids).logits  # eval mode, grad on: fused, no dropout
    torch.testing.assert_close(train_path, fused_eval, rtol=1e-5, atol=1e-5)
