"""GGUF quantization through llama.cpp's own quantizer (``llama_model_quantize`` in the bindings).

The same C code as llama.cpp's ``llama-quantize`` tool, so the files are the same; tiblocal adds
the checks (type names, already-quantized input), several types in one call, atomic outputs and a
progress display.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from gguf import GGMLQuantizationType

from tiblocal import bindings, gguf_keys
from tiblocal.engine import resolve_threads
from tiblocal.errors import TiblocalError
from tiblocal.fsutil import atomic_path, check_output_path
from tiblocal.gguf_file import check_supported_architecture, read_gguf

if TYPE_CHECKING:
    from tiblocal.imatrix_file import Imatrix

UNQUANTIZED = ("ALL_F32", "F16", "BF16")


def quant_types() -> dict[str, int]:
    """Every file type the installed bindings expose, by llama-quantize's name (Q4_K_M, Q8_0, ...)."""
    lib = bindings.load()
    out = {}
    for attr in dir(lib):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            out[attr.removeprefix("LLAMA_FTYPE_MOSTLY_")] = int(getattr(lib, attr))
    out["F32"] = int(lib.LLAMA_FTYPE_ALL_F32)
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def parse_types(spec: str, option: str = "--type") -> list[str]:
    """``Q4_K_M,Q8_0`` -> the types, checked; ``option`` is what an error names (release's is --types)."""
    valid = quant_types()
    names = [t.strip().upper() for t in spec.split(",") if t.strip()]
    if not names:
        raise TiblocalError(f"{option} is empty; give one or more types, e.g. {option} Q4_K_M,Q8_0")
    bad = [n for n in names if n not in valid]
    if bad:
        raise TiblocalError(f"unknown quantization type {', '.join(bad)}; valid types: {', '.join(valid)}")
    return list(dict.fromkeys(names))


def tensor_type(name: str | None, option: str) -> int:
    if name is None:
        return -1  # GGML_TYPE_COUNT-like "not set": llama.cpp chooses
    try:
        return int(GGMLQuantizationType[name.upper()])
    except KeyError:
        valid = ", ".join(t.name for t in GGMLQuantizationType)
        raise TiblocalError(f"unknown tensor type {name!r} for {option}; valid types: {valid}") from None


def output_paths(inp: Path, out: Path, types: list[str]) -> dict[str, Path]:
    """One path per type: OUT itself for one type, else OUT/NAME-TYPE.gguf or OUT with {type} filled in."""
    if len(types) == 1 and "{type}" not in str(out) and not out.is_dir():
        return {types[0]: out}
    if "{type}" in str(out):
        return {t: Path(str(out).replace("{type}", t)) for t in types}
    if out.exists() and not out.is_dir():
        raise TiblocalError(f"{out} is a file; with several --type values give a folder or a pattern with {{type}}")
    stem = inp.stem
    for suffix in ("-f32", "-f16", "-bf16", ".f32", ".f16", ".bf16"):
        stem = stem.removesuffix(suffix)
    return {t: out / f"{stem}-{t}.gguf" for t in types}


@dataclass(frozen=True)
class QuantResult:
    type: str
    path: Path
    size: int
    seconds: float


def quantize_gguf(
    inp: Path,
    out: Path,
    types: list[str],
    *,
    threads: int | None = None,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    allow_requantize: bool = False,
    force: bool = False,
    verbose: bool = False,
    imatrix: Path | Imatrix | None = None,
    on_start: Callable[[str, Path], None] | None = None,
    basis_checked: bool = False,
) -> list[QuantResult]:
    """Quantize ``inp`` to each type; ``on_start(type, path)`` runs while llama.cpp works on that type.

    ``imatrix``: a file llama-imatrix or ``tiblocal imatrix`` wrote, or one already loaded (its ``path`` is what
    the output's ``quantize.imatrix.file`` key names); its basis is checked against the model's here
    (``check_imatrix_basis``), unless ``basis_checked``: quantize_rotated checks it before it rotates the model,
    against the basis the rotated file will be in, and says so."""
    inp, out = Path(inp), Path(out)
    info = read_gguf(inp, with_tokens=False)
    check_supported_architecture(info)
    if info.file_type not in UNQUANTIZED and info.file_type is not None and not allow_requantize:
        raise TiblocalError(
            f"{inp} is already quantized ({info.file_type}); quantizing again loses more quality. Quantize the "
            "f16/f32 GGUF instead, or pass --allow-requantize"
        )
    valid = quant_types()
    out_tt = tensor_type(output_tensor_type, "--output-tensor-type")
    emb_tt = tensor_type(token_embedding_type, "--token-embedding-type")
    im = None
    if imatrix is not None:  # read before anything is written; the module only where a matrix is given
        from tiblocal.imatrix_file import Imatrix, load_imatrix

        im = imatrix if isinstance(imatrix, Imatrix) else load_imatrix(imatrix)
        if not basis_checked:
            check_imatrix_basis(im, inp, info.rotation_seeds)
    # llama.cpp's nthread is an int32_t: ctypes wrapped --threads -2147483649 to 2**31 - 1, and llama.cpp ended the
    # process starting that many threads; the engine's rule instead (negative refused, at most the cores; none: 0,
    # which llama.cpp takes as every core)
    nthread = resolve_threads(threads) if threads else 0
    paths = output_paths(inp, out, types)
    if len(paths) > 1 and "{type}" not in str(out):
        out.mkdir(parents=True, exist_ok=True)
    for p in paths.values():
        check_output_path(p, force=force, inputs=[inp, imatrix if isinstance(imatrix, (str, Path)) else None])
    lib = bindings.load(verbose)
    im_args = None
    if im is not None:
        if not hasattr(lib, "llama_model_imatrix_data"):
            raise TiblocalError(
                "this llama-cpp-python is too old to pass an importance matrix (--imatrix); pip install -U llama-cpp-python"
            )
        im_args = QuantizeImatrixArgs(lib, im)
    results = []
    for qtype, path in paths.items():
        params = lib.llama_model_quantize_default_params()
        params.ftype = valid[qtype]
        params.nthread = nthread
        params.allow_requantize = allow_requantize
        if out_tt >= 0:
            params.output_tensor_type = out_tt
        if emb_tt >= 0:
            params.token_embedding_type = emb_tt
        if im_args is not None:
            params.imatrix = im_args.imatrix
            params.kv_overrides = im_args.kv_overrides
        bindings.take_errors()
        t0 = time.perf_counter()
        with atomic_path(path, replace=force) as tmp:
            rc = _run_blocking(
                lambda: lib.llama_model_quantize(str(inp).encode(), str(tmp).encode(), params),
                meanwhile=(lambda: on_start(qtype, path)) if on_start else None,
            )
            if rc != 0:
                raise TiblocalError(_failure(inp, qtype, rc, bindings.take_errors(), im and im.path))
        results.append(QuantResult(qtype, path, path.stat().st_size, time.perf_counter() - t0))
    return results


def check_imatrix_basis(im: Imatrix, model: Path, seeds: list[int]) -> None:
    """Refuse a matrix tiblocal measured in another basis than the model's (``seeds``: the rotations the model
    was written in, [] for none); llama-imatrix's files do not say, and pass."""
    from tiblocal.imatrix_file import basis_name

    if im.rotation is None or im.rotation == seeds:
        return
    where = basis_name(seeds)
    make = f"`tiblocal imatrix HF_DIR --rotate {seeds[-1]} --out FILE`" if len(seeds) == 1 else (
        "`tiblocal imatrix HF_DIR --out FILE`" if not seeds else "llama-imatrix on the model itself")
    raise TiblocalError(f"{im.path} was measured in {im.basis()}, but {model} is quantized in {where}: its importance "
                        f"figures belong to other columns; make the matrix for it with {make}")


def _failure(inp: Path, qtype: str, rc: int, why: str, imatrix: Path | None) -> str:
    why = why.rstrip(".! ")
    msg = f"llama.cpp could not quantize {inp} to {qtype}" + (f": {why}" if why else f" (code {rc})")
    if "importance matrix" in why or "imatrix" in why:
        if imatrix is None:
            return (f"{msg}. Pass --imatrix FILE (made by `tiblocal imatrix HF_DIR --out FILE` or llama.cpp's "
                    "llama-imatrix), or choose a type that needs none (Q2_K, Q3_K_S, IQ3_S, IQ4_XS, ...)")
        return f"{msg}. {imatrix} does not fit this model there: make one from this model with `tiblocal imatrix`"
    return f"{msg}; `tiblocal quantize {inp} --type {qtype} --out OUT --verbose` shows llama.cpp's whole log"


def _run_blocking(fn: Callable[[], int], meanwhile: Callable[[], None] | None = None) -> int:
    """Run a long C call in a worker thread so Ctrl-C reaches the main thread (the output is then discarded).

    ``meanwhile`` runs on the main thread once the call has started: the progress display (rich's import
    among it) then costs no time before llama.cpp begins."""
    box: list[int] = []
    worker = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    worker.start()
    if meanwhile:
        meanwhile()
    while worker.is_alive():
        worker.join(0.2)
    return box[0]


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
        kvs: list[tuple[str, object]] = [(gguf_keys.QUANTIZE_IMATRIX_FILE, str(im.path))]
        if im.datasets:
            kvs.append((gguf_keys.QUANTIZE_IMATRIX_DATASET, im.datasets[0]))
        kvs.append((gguf_keys.QUANTIZE_IMATRIX_ENTRIES, len(im.entries)))
        if im.chunk_count > 0:
            kvs.append((gguf_keys.QUANTIZE_IMATRIX_CHUNKS, im.chunk_count))
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
