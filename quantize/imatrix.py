"""Importance matrices (llama.cpp's ``llama-imatrix`` output) for ``tiblocal quantize --imatrix``.

llama.cpp's 1- to 3-bit i-quants (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and the files made of them) and
Q2_K_S refuse to run without one, and every k-quant uses one when it is given. The file is read as llama.cpp's
``common_imatrix_load`` reads it: the GGUF format (``NAME.in_sum2`` and ``NAME.counts`` tensors, ``imatrix.*``
keys) or the legacy binary ``.dat``; each entry is normalised the same way (sums over counts, 1 where a count is
0), handed to ``llama_model_quantize`` as ``llama_model_imatrix_data``, and the output GGUF gets the
``quantize.imatrix.*`` keys that ``llama-quantize --imatrix`` writes.

A matrix for a rotated model (``tiblocal quantize --rotate SEED``) is measured on the Hugging Face model with the
same rotation applied to each matrix's input (``tiblocal imatrix --rotate SEED``); tiblocal's files say which
rotation they were measured in (``tiblocal.imatrix.rotated``, ``tiblocal.rotation.seed``), and quantize refuses a
matrix measured in another basis than the model's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tiblocal.errors import TiblocalError
from tiblocal.imatrix_file import (  # noqa: F401  (the file format, re-exported for the stage's callers)
    KV_CHUNK_COUNT, KV_CHUNK_SIZE, KV_DATASETS, KV_ROTATED, Imatrix, basis_name, is_gguf, load_imatrix, write_imatrix,
)

IMATRIX_CTX = 512  # llama-imatrix's default window
DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}  # --dtype: what the model runs in


def check_dtype(dtype: str, option: str = "--dtype") -> None:
    if dtype not in DTYPES:
        raise TiblocalError(f"{option} {dtype}: expected one of {', '.join(DTYPES)}")


def check_device(device: str | None, option: str = "--device") -> None:
    """Refuse a torch device name tiblocal does not run on, or a device this torch does not see, before any work
    (torch accepts odd names late, and `--device cuda` without a GPU failed in an assertion once the model loaded)."""
    import re

    if device is None:
        return
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?|mps", device)
    if not m:
        raise TiblocalError(f"{option} {device!r}: expected cpu, cuda, cuda:N or mps")
    try:
        import torch
    except ImportError:  # the verb says what to install when it imports torch
        return
    if device.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not n:
            raise TiblocalError(f"{option} {device}, but torch sees no CUDA GPU (a CPU build of torch, or no driver); "
                                "use --device cpu for a small model")
        if m.group(1) is not None and int(m.group(1)) >= n:
            raise TiblocalError(f"{option} {device}, but torch sees {n} CUDA GPU(s): cuda:0 to cuda:{n - 1}")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise TiblocalError(f"{option} mps, but torch sees no Apple GPU; use --device cpu")



def compute_imatrix(
    hf_dir: Path, texts: list[Path], *, chunks: int, ctx: int, device: str | None = None, progress=None,
    windows: list[dict] | None = None, output: bool = True, dtype: str = "f32", rotate: int | None = None,
) -> tuple[Imatrix, dict[str, int]]:
    """What ``llama-imatrix`` measures, from a Hugging Face model run by transformers: for each matrix the mean
    square of each input column over ``chunks`` windows of ``ctx`` SentencePiece ids (BOS first) of the text.

    Returns the importance matrix (the means) and each matrix's row count. Names are the GGUF tensor names; the
    lm_head of a model with tied embeddings is ``token_embd.weight``, as llama.cpp multiplies by that tensor.
    ``windows``: the windows already cut from ``texts`` (``calibration_windows``), when the caller checked them.
    ``output=False`` leaves out the output product (lm_head), as ``llama-imatrix`` does without ``--process-output``;
    tiblocal keeps it by default: on the demo model, whose output is its tied embedding, that lowered Q4_K_M's mean
    KL (0.00794 without it, 0.00773 with it). ``dtype`` (f32, bf16, f16): what the model is loaded and run in,
    straight onto ``device`` (default: cuda when torch sees a GPU); the squares are summed in float64 either way.
    ``rotate``: measure the model as ``tiblocal quantize --rotate ROTATE`` turns it (see ``compute_imatrices``)."""
    return compute_imatrices(hf_dir, texts, [rotate], chunks=chunks, ctx=ctx, device=device, progress=progress,
                             windows=windows, output=output, dtype=dtype)[0]


class _Turn:
    """One rotation of ``quantize --rotate``, applied to activation rows in torch (float64): the residual basis
    Q = Q1 ⊗ Q2 and the per-head H, built from the same seed and sizes as ``rotate_gguf`` builds them."""

    def __init__(self, seed: int, n_embd: int, head_dim: int, device) -> None:
        import torch

        from .rotate import Rotation, head_rotation

        r = Rotation(n_embd, seed)
        self.a, self.b, self.head_dim = r.a, r.b, head_dim
        self.q1 = torch.from_numpy(r.q1).double().to(device)
        self.q2 = torch.from_numpy(r.q2).double().to(device)
        self.h = torch.from_numpy(head_rotation(head_dim, seed).astype(np.float32)).double().to(device)

    def residual(self, x):
        """x · Q for rows x (tokens, n_embd)."""
        import torch

        t = torch.matmul(x.reshape(-1, self.a, self.b), self.q2)
        return torch.matmul(self.q1.T, t).reshape(x.shape)

    def heads(self, x):
        """Each head's slice of the rows times H: what attn_output's rotated columns are multiplied by."""
        return (x.reshape(x.shape[0], -1, self.head_dim) @ self.h).reshape(x.shape)


def compute_imatrices(
    hf_dir: Path, texts: list[Path], rotations: list[int | None], *, chunks: int, ctx: int, device: str | None = None,
    progress=None, windows: list[dict] | None = None, output: bool = True, dtype: str = "f32",
) -> list[tuple[Imatrix, dict[str, int]]]:
    """``compute_imatrix`` for several bases in one pass over the text: per entry of ``rotations``, None for the
    model as converted, or a seed for the model as ``tiblocal quantize --rotate SEED`` writes it.

    In a rotated model the RMSNorm weights are folded into the matrices, so the input of attn_q/k/v, ffn_gate/up
    and output is the normalised residual turned by Q (its mean squares come from the norm's input here, not from
    the product with the norm's weight); attn_output's input is turned by H per head; ffn_down's is unchanged; and
    the output matrix is always ``output.weight`` (a rotated model is untied), the embedding is only looked up."""
    import torch
    import transformers

    from tiblocal.checkpoint import HFCheckpoint
    from tiblocal.convert.hf_to_gguf import ModelConverter

    from .calibration import calibration_windows
    from .rotate import check_seed

    check_dtype(dtype)
    for seed in rotations:
        if seed is not None:
            check_seed(seed)
    hf_dir = Path(hf_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    conv = ModelConverter.for_checkpoint(HFCheckpoint.open(hf_dir))
    if windows is None:
        windows = calibration_windows(hf_dir, texts, chunks, ctx, ("--text", "--chunks", "--ctx"))
    # loaded onto the device directly: a 7B model in fp32 built on the host first took 42 GB of host memory
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=getattr(torch, DTYPES[dtype]), device_map=device
    ).eval()
    tied = bool(model.config.tie_word_embeddings)
    sums: list[dict[str, torch.Tensor]] = [{} for _ in rotations]
    counts: list[dict[str, int]] = [{} for _ in rotations]

    def add(v: int, names: list[str], x) -> None:
        sq = (x * x).sum(0)
        for name in names:
            sums[v][name] = sums[v].get(name, 0) + sq
            counts[v][name] = counts[v].get(name, 0) + x.shape[0]

    def rows(module, inputs):
        return inputs[0].detach().reshape(-1, module.in_features).double()

    plain = [v for v, r in enumerate(rotations) if r is None]
    handles = []
    if plain:  # as converted: each linear layer's input as it is
        def collect(name: str):
            def hook(module, inputs) -> None:
                x = rows(module, inputs)
                for v in plain:
                    add(v, [name], x)
            return hook

        for hf_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and (output or hf_name != "lm_head"):
                name = "token_embd.weight" if hf_name == "lm_head" and tied else conv.map_name(f"{hf_name}.weight")
                handles.append(module.register_forward_pre_hook(collect(name)))
    if turned := [(v, r) for v, r in enumerate(rotations) if r is not None]:
        handles += _rotated_hooks(model, conv, turned, add, rows, output, device)
    try:
        with torch.inference_mode():
            for i, w in enumerate(windows):
                model(input_ids=torch.tensor([w["input_ids"]], device=device))
                if progress:
                    progress(i + 1, len(windows))
    finally:
        for h in handles:
            h.remove()
    out = []
    for r, s, c in zip(rotations, sums, counts):
        entries = {name: (total / c[name]).float().cpu().numpy() for name, total in s.items()}
        out.append((Imatrix(Path(), entries, [t.name for t in texts], len(windows), [] if r is None else [r]), c))
    return out


def _rotated_hooks(model, conv, turned: list[tuple[int, int]], add, rows, output: bool, device) -> list:
    """The forward hooks that measure the inputs of the rotated model's matrices (see ``compute_imatrices``)."""
    cfg = model.config
    try:
        layers = list(model.model.layers)
        final_norm, lm_head = model.model.norm, model.lm_head
        parts = [(layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn, layer.mlp) for layer in layers]
    except AttributeError as e:
        raise TiblocalError(f"an importance matrix for --rotate needs a Llama model's layers ({e}); measure this "
                            "model without --rotate") from None
    head_dim = parts[0][2].o_proj.in_features // cfg.num_attention_heads
    turns = [(v, _Turn(seed, cfg.hidden_size, head_dim, device)) for v, seed in turned]

    def normed(module, inputs):  # the RMSNorm's output before its weight: what the rotated model's norm gives
        import torch

        x = inputs[0].detach().double().reshape(-1, cfg.hidden_size)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", cfg.rms_norm_eps))
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def after_norm(names: list[str]):
        def hook(module, inputs) -> None:
            x = normed(module, inputs)
            for v, t in turns:
                add(v, names, t.residual(x))
        return hook

    def attn_output(name: str):
        def hook(module, inputs) -> None:
            x = rows(module, inputs)
            for v, t in turns:
                add(v, [name], t.heads(x))
        return hook

    def unchanged(name: str):
        def hook(module, inputs) -> None:
            x = rows(module, inputs)
            for v, _ in turns:
                add(v, [name], x)
        return hook

    def gguf(hf_name: str) -> str:
        return conv.map_name(f"{hf_name}.weight")

    handles = []
    for i, (attn_norm, ffn_norm, attn, mlp) in enumerate(parts):
        pre = f"model.layers.{i}"
        handles.append(attn_norm.register_forward_pre_hook(
            after_norm([gguf(f"{pre}.self_attn.{p}_proj") for p in "qkv"])))
        handles.append(ffn_norm.register_forward_pre_hook(
            after_norm([gguf(f"{pre}.mlp.{p}_proj") for p in ("gate", "up")])))
        handles.append(attn.o_proj.register_forward_pre_hook(attn_output(gguf(f"{pre}.self_attn.o_proj"))))
        handles.append(mlp.down_proj.register_forward_pre_hook(unchanged(gguf(f"{pre}.mlp.down_proj"))))
    if output and lm_head is not None:
        handles.append(final_norm.register_forward_pre_hook(after_norm(["output.weight"])))
    return handles
