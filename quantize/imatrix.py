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

import ctypes
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tiblocal.errors import InputFileError, TiblocalError
from tiblocal.jsonout import print_json

KV_DATASETS, KV_CHUNK_COUNT, KV_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
# in every matrix tiblocal writes: whether it was measured in a rotated basis (the seeds then under ROTATION_KEY)
KV_ROTATED = "tiblocal.imatrix.rotated"
IMATRIX_CTX = 512  # llama-imatrix's default window
DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}  # --dtype: what the model runs in


def check_dtype(dtype: str, option: str = "--dtype") -> None:
    if dtype not in DTYPES:
        raise TiblocalError(f"{option} {dtype}: expected one of {', '.join(DTYPES)}")


@dataclass
class Imatrix:
    path: Path
    entries: dict[str, np.ndarray]  # tensor name -> float32 importance per input column (per expert, flattened)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    # the rotation seeds of the model it was measured on ([]: unrotated); None where the file does not say
    # (llama-imatrix's files, which may have been measured on any GGUF)
    rotation: list[int] | None = None

    def basis(self) -> str:
        return basis_name(self.rotation)


def basis_name(seeds: list[int] | None) -> str:
    """The basis a matrix was measured in, or a model is written in, as messages name it."""
    if seeds is None:
        return "an unknown basis"
    return f"the basis of --rotate {','.join(map(str, seeds))}" if seeds else "the unrotated basis"


def _bad(path: Path, what: str) -> InputFileError:
    return InputFileError(
        f"{path} is not a usable importance matrix: {what}; give a file written by `tiblocal imatrix` or llama.cpp's "
        "llama-imatrix (GGUF or legacy .dat)"
    )


def is_gguf(path: Path) -> bool:
    """Whether the file is in the GGUF format (else llama-imatrix's legacy .dat)."""
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_imatrix(path: Path) -> Imatrix:
    path = Path(path)
    if not path.is_file():
        raise InputFileError(
            f"no such importance matrix file: {path}; make one with `tiblocal imatrix HF_DIR --out FILE` or llama.cpp's "
            "llama-imatrix"
        )
    return _load_gguf(path) if is_gguf(path) else _load_legacy(path)


def _load_gguf(path: Path) -> Imatrix:
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf-py raises plain ValueError/struct errors on damaged files
        raise _bad(path, f"its GGUF header does not read ({e})") from None
    keys = {f.name: f for f in reader.fields.values()}
    missing = [k for k in (KV_DATASETS, KV_CHUNK_COUNT, KV_CHUNK_SIZE) if k not in keys]
    if missing:  # llama-quantize stops here too ("missing imatrix metadata")
        raise _bad(path, f"it lacks the keys {', '.join(missing)}")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        for suffix, into in ((".in_sum2", sums), (".counts", counts)):
            if t.name.endswith(suffix):
                if t.tensor_type != GGMLQuantizationType.F32:
                    raise _bad(path, f"tensor {t.name} is {t.tensor_type.name}, not F32")
                into[t.name.removesuffix(suffix)] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    if not sums and not counts:
        raise _bad(path, "it holds no .in_sum2/.counts tensors")
    if unpaired := sorted(set(sums) ^ set(counts)):
        raise _bad(path, f"sums and counts do not pair up for {unpaired[0]}")
    entries = {}
    for name, s in sums.items():
        c = np.rint(counts[name]).astype(np.float32)
        if len(c) == 0 or len(s) % len(c):
            raise _bad(path, f"{name} has {len(s)} sums for {len(c)} counts")
        per = s.reshape(len(c), -1)
        entries[name] = np.where(c[:, None] > 0, per / np.where(c > 0, c, 1)[:, None], 1).astype(np.float32).reshape(-1)
    datasets = [str(bytes(keys[KV_DATASETS].parts[i]), "utf-8") for i in keys[KV_DATASETS].data]
    chunk_count = int(keys[KV_CHUNK_COUNT].parts[keys[KV_CHUNK_COUNT].data[0]][0])
    rotation = None
    if KV_ROTATED in keys:
        from tiblocal.gguf_file import ROTATION_KEY

        rotated = bool(keys[KV_ROTATED].contents())
        rotation = [int(x) for x in keys[ROTATION_KEY].contents()] if rotated and ROTATION_KEY in keys else []
        if rotated and not rotation:
            raise _bad(path, f"{KV_ROTATED} is true but {ROTATION_KEY} does not name the rotation")
    return Imatrix(path, entries, datasets, chunk_count, rotation)


def _load_legacy(path: Path) -> Imatrix:
    buf = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(buf):
            raise _bad(path, f"it ends at byte {len(buf)} inside an entry")
        out = struct.unpack_from(fmt, buf, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise _bad(path, "it is neither GGUF nor a legacy .dat with entries")
    entries = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length <= 4096:
            raise _bad(path, f"an entry name of {length} bytes")
        name = take(f"<{length}s")[0].decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise _bad(path, f"entry {name} has {nval} values")
        if pos + 4 * nval > len(buf):
            raise _bad(path, f"it ends at byte {len(buf)} inside an entry")
        values = np.frombuffer(buf, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        entries[name] = values / ncall if ncall > 0 else values
    datasets, chunk_count = [], 0
    if pos < len(buf):  # optional: chunk count and dataset name
        (chunk_count,) = take("<i")
        if pos + 4 <= len(buf):
            (length,) = take("<i")
            if length > 0:
                datasets.append(take(f"<{length}s")[0].decode("utf-8", errors="replace"))
    return Imatrix(path, entries, datasets, chunk_count)


class QuantizeImatrixArgs:
    """The ctypes arrays for ``llama_model_quantize_params``: imatrix entries and the ``quantize.imatrix.*`` keys.

    Holds every buffer the C side points into, so they live as long as this object."""

    def __init__(self, lib, im: Imatrix) -> None:
        self._arrays = [np.ascontiguousarray(v, dtype=np.float32) for v in im.entries.values()]
        self._names = [n.encode() for n in im.entries]
        data = (lib.llama_model_imatrix_data * (len(self._arrays) + 1))()  # the last one, all zero, ends the list
        for i, (name, arr) in enumerate(zip(self._names, self._arrays)):
            data[i].name = name
            data[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            data[i].size = arr.size
        self.imatrix = ctypes.cast(data, ctypes.POINTER(lib.llama_model_imatrix_data))
        self._data = data
        kvs: list[tuple[str, object]] = [("quantize.imatrix.file", str(im.path))]
        if im.datasets:
            kvs.append(("quantize.imatrix.dataset", im.datasets[0]))
        kvs.append(("quantize.imatrix.entries_count", len(im.entries)))
        if im.chunk_count > 0:
            kvs.append(("quantize.imatrix.chunks_count", im.chunk_count))
        over = (lib.llama_model_kv_override * (len(kvs) + 1))()  # an empty key ends the list
        for o, (key, value) in zip(over, kvs):
            o.key = key.encode()
            if isinstance(value, str):
                o.tag = lib.LLAMA_KV_OVERRIDE_TYPE_STR
                o.value.val_str = value.encode()[:127]
            else:
                o.tag = lib.LLAMA_KV_OVERRIDE_TYPE_INT
                o.value.val_i64 = int(value)
        self.kv_overrides = ctypes.cast(over, ctypes.POINTER(lib.llama_model_kv_override))
        self._over = over


def check_device(device: str | None, option: str = "--device") -> None:
    """Refuse a torch device name tiblocal does not run on, before torch is asked (it accepts odd names late)."""
    import re

    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise TiblocalError(f"{option} {device!r}: expected cpu, cuda, cuda:N or mps")


def write_imatrix(path: Path, im: Imatrix, counts: dict[str, int], chunk_size: int) -> None:
    """The GGUF format ``llama-imatrix`` writes: per matrix the summed squares (``NAME.in_sum2``, ``entries`` times
    the count) and the count of rows (``NAME.counts``), and the ``imatrix.*`` keys; atomically."""
    import gguf

    from tiblocal.fsutil import atomic_path

    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_string("general.type", "imatrix")
        w.add_array(KV_DATASETS, im.datasets)
        w.add_uint32(KV_CHUNK_COUNT, im.chunk_count)
        w.add_uint32(KV_CHUNK_SIZE, chunk_size)
        w.add_bool(KV_ROTATED, bool(im.rotation))
        if im.rotation:
            from tiblocal.gguf_file import ROTATION_KEY

            w.add_array(ROTATION_KEY, [int(x) for x in im.rotation])
        for name, values in im.entries.items():
            w.add_tensor(f"{name}.in_sum2", (values * counts[name]).astype(np.float32).reshape(1, -1))
            w.add_tensor(f"{name}.counts", np.array([[counts[name]]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


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

    from .gptq import calibration_windows

    check_dtype(dtype)
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


def run_imatrix(hf_dir: Path, out: Path, *, texts: list[Path], chunks: int, ctx: int, device: str | None,
                force: bool, as_json: bool, output: bool = True, dtype: str = "f32", rotate: int | None = None) -> int:

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tiblocal.fsutil import check_output_path

    from .gptq import calibration_texts

    if chunks < 1 or ctx < 2:
        raise TiblocalError(f"--chunks {chunks} --ctx {ctx}: expected at least 1 window of at least 2 tokens")
    check_device(device)
    check_output_path(Path(out), force=force, inputs=[hf_dir, *texts])
    texts = calibration_texts(texts, "--text")
    err = Console(stderr=True, highlight=False)
    columns = (TextColumn("imatrix"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("imatrix", total=chunks)
        im, counts = compute_imatrix(hf_dir, texts, chunks=chunks, ctx=ctx, device=device, output=output, dtype=dtype,
                                     rotate=rotate,
                                     progress=lambda done, total: bar.update(task, completed=done, total=total))
    write_imatrix(Path(out), im, counts, ctx)
    summary = {"out": str(out), "entries": len(im.entries), "chunks": im.chunk_count, "ctx": ctx,
               "tokens": max(counts.values()), "datasets": im.datasets, "rotation_seed": rotate}
    if as_json:
        print_json(summary)
    else:
        err.print(f"wrote {out}: {len(im.entries)} matrices, {im.chunk_count} chunks of {ctx} tokens"
                  + (f", in {basis_name([rotate])}" if rotate is not None else ""))
    return 0
