"""`tiblocal gptq`: GPTQ at 4 or 8 bits through gptqmodel, calibrated on Tibetan text.

gptqmodel (the maintained successor of auto-gptq) quantizes on the CPU and on CUDA and writes the GPTQ format
that transformers (with optimum) and gptqmodel load. The calibration windows are cut from the text with the
model's SentencePiece tokenizer, so they hold the ids the runtime uses; by default the text is the excerpt
bundled in the package (tiblocal/data/calibration). lm_head stays unquantized unless asked. The output folder
is written atomically and gets the source's tokenizer files (transformers 5 saves no tokenizer.model).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tiblocal.checkpoint import load_config
from tiblocal.errors import InputFileError, TiblocalError
from tiblocal.jsonout import stdout_to_stderr

from .calibration import calibration_texts, calibration_windows
from .imatrix import check_device

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tiblocal_vocab.json")
# GPTQ on the CPU: measured with the demo model (12.4 M parameters in its decoder layers, 128 windows of 512) on
# this project's 2-core machine, gptqmodel 7.6 takes about CPU_SECONDS_PER_MPARAM seconds per million layer
# parameters (it scales about with the cores). Jobs estimated above CPU_MAX_HOURS, or needing more memory than the
# machine has, are refused on the CPU.
CPU_SECONDS_PER_MPARAM = 32.0
CPU_MAX_HOURS = 4.0
NEEDS_GPTQMODEL = "GPTQ needs gptqmodel (and optimum to load the result in transformers): pip install 'tiblocal[gptq]'"


@dataclass(frozen=True)
class GPTQResult:
    out: Path
    bits: int
    group_size: int
    samples: int
    seq_len: int
    seconds: float
    size: int


def _model_params(hf_dir: Path) -> tuple[int, int]:
    """(all parameters, parameters of the decoder layers) from the checkpoint headers."""
    from tiblocal.checkpoint import HFCheckpoint

    ckpt = HFCheckpoint.open(hf_dir)
    total = layers = 0
    for ref in ckpt.tensors.values():
        n = 1
        for d in ref.shape:
            n *= d
        total += n
        if ".layers." in ref.name:
            layers += n
    return total, layers


def _count(n: int) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def check_job(hf_dir: Path, device: str) -> tuple[int, int]:
    """Refuse a CPU job that is too big, with the reason and an estimate; returns the parameter counts."""
    total, layers = _model_params(hf_dir)
    if device != "cpu":
        return total, layers
    import psutil

    cores = max(1, min(os.cpu_count() or 1, 8))
    hours = layers / 1e6 * CPU_SECONDS_PER_MPARAM * 2 / cores / 3600
    need = total * 4 / 2**30  # the model in fp32 while it is quantized
    have = psutil.virtual_memory().total / 2**30
    if hours > CPU_MAX_HOURS or need > have:
        raise TiblocalError(
            f"{hf_dir} has {_count(total)} parameters: GPTQ on this CPU ({cores} cores) would take about {hours:.1f} "
            f"hours and {need:.1f} GiB of memory (this machine has {have:.0f} GiB); quantize it on a GPU "
            f"(--device cuda); the CPU takes jobs of up to {CPU_MAX_HOURS:.0f} hours"
        )
    return total, layers


def preflight(hf_dir: Path, *, bits: int, group_size: int = 128, calib: list[Path] = (), samples: int = 128,
              seq_len: int = 512, device: str | None = None, group_flag: str = "--group-size",
              ) -> tuple[str, list[Path], list[dict]]:
    """Every check of a GPTQ job, before any long work: (device, calibration files, calibration windows).
    ``group_flag``: the option that gave ``group_size``, for the messages (release's is --gptq-group-size)."""
    hf_dir = Path(hf_dir)
    if bits not in (4, 8):
        raise TiblocalError(f"--bits {bits}: expected 4 or 8")
    if group_size != -1 and group_size < 1:  # gptqmodel's QuantizeConfig raised this after the model had loaded
        raise TiblocalError(f"{group_flag} {group_size}: expected a positive size that divides the model's widths "
                            "(e.g. 128), or -1 for one group a row")
    if not (hf_dir / "config.json").is_file():
        raise InputFileError(f"{hf_dir}: no config.json; give a Hugging Face model folder (tiblocal merge's output)")
    if not list(hf_dir.glob("*.safetensors")) and not list(hf_dir.glob("*.bin")):
        raise InputFileError(f"{hf_dir}: no weights (*.safetensors or *.bin); give the merged model folder")
    texts = calibration_texts(calib)
    try:
        import torch
    except ImportError:
        raise TiblocalError("GPTQ needs torch and gptqmodel: pip install 'tiblocal[gptq]'") from None
    check_device(device)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_job(hf_dir, device)
    cfg = load_config(hf_dir)
    for key in ("hidden_size", "intermediate_size"):
        width = int(cfg.get(key, 0))
        if group_size > 0 and width % group_size:
            raise TiblocalError(
                f"{hf_dir}: {key} {width} is not a multiple of {group_flag} {group_size}; choose a group size that "
                f"divides it (e.g. {next((g for g in (128, 64, 32, 16) if width % g == 0), -1)}) or -1 for one group a row"
            )
    windows = calibration_windows(hf_dir, texts, samples, seq_len)
    import importlib.util

    if importlib.util.find_spec("gptqmodel") is None:
        raise TiblocalError(NEEDS_GPTQMODEL)
    return device, texts, windows


def gptq_quantize(
    hf_dir: Path, out: Path, *, bits: int, group_size: int = 128, calib: list[Path] = (), samples: int = 128,
    seq_len: int = 512, desc_act: bool = False, lm_head: bool = False, device: str | None = None,
    batch_size: int = 4, force: bool = False, progress: Callable[[str], None] | None = None,
) -> GPTQResult:
    import time

    from tiblocal.fsutil import atomic_dir, check_output_path

    hf_dir, out = Path(hf_dir), Path(out)
    check_output_path(out, force=force, folder=True, inputs=[hf_dir, *calib])
    device, texts, windows = preflight(hf_dir, bits=bits, group_size=group_size, calib=calib, samples=samples,
                                       seq_len=seq_len, device=device)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 1, 8)))
    # gptqmodel reports on stdout, its banner at import too; keep stdout for our own result (--json), down to the
    # file descriptor; its per-module logs go to a scratch folder instead of ./logs in whatever folder the command
    # was run from
    with stdout_to_stderr():
        try:
            from gptqmodel import GPTQModel, QuantizeConfig
        except ImportError:
            raise TiblocalError(NEEDS_GPTQMODEL) from None
    say = progress or (lambda m: None)
    t0 = time.perf_counter()
    with atomic_dir(out, replace=force) as tmp, stdout_to_stderr(), _gptqmodel_logs_elsewhere():
        say(f"loading {hf_dir}")
        # one group a row (-1) leaves activation-group-aware ordering, on by default, nothing to order: gptqmodel
        # raises on it at the first layer ("act_group_aware=True requires group_size > 0")
        qcfg = QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, lm_head=lm_head,
                              **({"act_group_aware": False} if group_size == -1 else {}))
        model = GPTQModel.load(str(hf_dir), qcfg, device=device)
        say(f"quantizing to {bits} bits on {device} ({samples} windows of {seq_len} tokens)")
        model.quantize(windows, batch_size=batch_size)
        say(f"saving {out}")
        model.save(str(tmp))
        for name in TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, tmp / name)
        (tmp / "tiblocal_gptq.json").write_text(json.dumps({
            "source": str(hf_dir), "bits": bits, "group_size": group_size, "desc_act": desc_act, "lm_head": lm_head,
            "calibration": [str(t) for t in texts], "samples": samples, "seq_len": seq_len, "device": device,
        }, indent=2) + "\n", encoding="utf-8")
        size = sum(p.stat().st_size for p in tmp.iterdir() if p.suffix == ".safetensors")
    return GPTQResult(out, bits, group_size, samples, seq_len, time.perf_counter() - t0, size)


@contextlib.contextmanager
def _gptqmodel_logs_elsewhere():
    import tempfile

    try:
        from gptqmodel.looper import loop_processor
    except ImportError:  # another layout: leave it be
        yield
        return
    if not hasattr(loop_processor, "_PROJECT_LOG_DIR"):
        yield
        return
    old = loop_processor._PROJECT_LOG_DIR
    with tempfile.TemporaryDirectory(prefix="tiblocal-gptq-logs-") as d:
        loop_processor._PROJECT_LOG_DIR = Path(d)
        try:
            yield
        finally:
            loop_processor._PROJECT_LOG_DIR = old
