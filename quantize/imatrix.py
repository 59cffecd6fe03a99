"""Importance matrices (llama.cpp's ``llama-imatrix`` output) for ``tiblocal quantize --imatrix``.

llama.cpp's 1- to 3-bit i-quants (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and the files made of them) and
Q2_K_S refuse to run without one, and every k-quant uses one when it is given. The file is read as llama.cpp's
``common_imatrix_load`` reads it: the GGUF format (``NAME.in_sum2`` and ``NAME.counts`` tensors, ``imatrix.*``
keys) or the legacy binary ``.dat``; each entry is normalised the same way (sums over counts, 1 where a count is
0), handed to ``llama_model_quantize`` as ``llama_model_imatrix_data``, and the output GGUF gets the
``quantize.imatrix.*`` keys that ``llama-quantize --imatrix`` writes.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tiblocal.errors import InputFileError, TiblocalError

KV_DATASETS, KV_CHUNK_COUNT, KV_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
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
    return Imatrix(path, entries, datasets, chunk_count)


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
        for name, values in im.entries.items():
            w.add_tensor(f"{name}.in_sum2", (values * counts[name]).astype(np.float32).reshape(1, -1))
            w.add_tensor(f"{name}.counts", np.array([[counts[name]]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def compute_imatrix(
    hf_dir: Path, texts: list[Path], *, chunks: int, ctx: int, device: str | None = None, progress=None,
    windows: list[dict] | None = None, output: bool = True, dtype: str = "f32",
) -> tuple[Imatrix, dict[str, int]]:
    """What ``llama-imatrix`` measures, from a Hugging Face model run by transformers: for each matrix the mean
    square of each input column over ``chunks`` windows of ``ctx`` SentencePiece ids (BOS first) of the text.

    Returns the importance matrix (the means) and each matrix's row count. Names are the GGUF tensor names; the
    lm_head of a model with tied embeddings is ``token_embd.weight``, as llama.cpp multiplies by that tensor.
    ``windows``: the windows already cut from ``texts`` (``calibration_windows``), when the caller checked them.
    ``output=False`` leaves out the output product (lm_head), as ``llama-imatrix`` does without ``--process-output``;
    tiblocal keeps it by default: on the demo model, whose output is its tied embedding, that lowered Q4_K_M's mean
    KL (0.00794 without it, 0.00773 with it). ``dtype`` (f32, bf16, f16): what the model is loaded and run in,
    straight onto ``device`` (default: cuda when torch sees a GPU); the squares are summed in float64 either way."""
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
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def collect(name: str):
        def hook(module, inputs) -> None:
            x = inputs[0].detach().reshape(-1, module.in_features).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = []
    for hf_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (output or hf_name != "lm_head"):
            name = "token_embd.weight" if hf_name == "lm_head" and tied else conv.map_name(f"{hf_name}.weight")
            handles.append(module.register_forward_pre_hook(collect(name)))
    try:
        with torch.inference_mode():
            for i, w in enumerate(windows):
                model(input_ids=torch.tensor([w["input_ids"]], device=device))
                if progress:
                    progress(i + 1, len(windows))
    finally:
        for h in handles:
            h.remove()
    entries = {name: (s / counts[name]).float().cpu().numpy() for name, s in sums.items()}
    return Imatrix(Path(), entries, [t.name for t in texts], len(windows)), counts


def run_imatrix(hf_dir: Path, out: Path, *, texts: list[Path], chunks: int, ctx: int, device: str | None,
                force: bool, as_json: bool, output: bool = True, dtype: str = "f32") -> int:
    import json
    import sys

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tiblocal.fsutil import check_output_path

    from .gptq import calibration_texts

    if chunks < 1 or ctx < 2:
        raise TiblocalError(f"--chunks {chunks} --ctx {ctx}: expected at least 1 window of at least 2 tokens")
    check_output_path(Path(out), force=force)
    texts = calibration_texts(texts, "--text")
    err = Console(stderr=True, highlight=False)
    columns = (TextColumn("imatrix"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("imatrix", total=chunks)
        im, counts = compute_imatrix(hf_dir, texts, chunks=chunks, ctx=ctx, device=device, output=output, dtype=dtype,
                                     progress=lambda done, total: bar.update(task, completed=done, total=total))
    write_imatrix(Path(out), im, counts, ctx)
    summary = {"out": str(out), "entries": len(im.entries), "chunks": im.chunk_count, "ctx": ctx,
               "tokens": max(counts.values()), "datasets": im.datasets}
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        err.print(f"wrote {out}: {len(im.entries)} matrices, {im.chunk_count} chunks of {ctx} tokens")
    return 0
