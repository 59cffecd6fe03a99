"""`tiblocal quantize --rotate`: quantize a model in a rotated basis (``rotate.py`` turns it), with --rotate-trials a
search over seeds that keeps, per type, the file with the lowest perplexity on the calibration text (SpinQuant's
criterion, with a search instead of its training), and an importance matrix measured in that basis."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tiblocal.errors import TiblocalError
from tiblocal.fsutil import check_output_path

from .rotate import check_seed, rotate_gguf


def _embedding_as_tied(rotated: Path, r, threads: int | None, quant_options: dict):
    """A tied model's embedding is also its output matrix, and llama.cpp quantizes it as the output (Q8_0 where the
    demo model's layers get Q4_0); once untied by the rotation, it would get the embedding's lower default
    type. So the embedding keeps the type llama.cpp gives the output matrix: quantized again with it, if needed."""
    from tiblocal.gguf_file import read_gguf

    from .gguf_quant import QuantResult, quantize_gguf

    types = {t.name: t.type for t in read_gguf(r.path, with_tokens=False).tensors}
    if types["token_embd.weight"] == types["output.weight"]:
        return r
    options = {**quant_options, "token_embedding_type": types["output.weight"]}
    (again,) = quantize_gguf(rotated, r.path, [r.type], threads=threads, force=True, **options)
    return QuantResult(r.type, again.path, again.size, r.seconds + again.seconds)


@dataclass(frozen=True)
class Trial:
    seed: int
    type: str
    calib_ppl: float | None  # perplexity of the quantized candidate on the calibration text; None with one trial


def quantize_rotated(
    inp: Path, out: Path, types: list[str], *, seed: int = 0, trials: int = 1, calib: list[Path] | None = None,
    calib_windows: int = 32, ctx: int = 512, threads: int | None = None, n_gpu_layers: int = 0, force: bool = False,
    on_stage: Callable[[str], None] | None = None, **quant_options,
) -> tuple[list, dict[str, int], list[Trial]]:
    """Rotate ``inp`` (seed ``seed``), quantize it to each type; with ``trials`` > 1 try seeds seed .. seed+trials-1
    and keep, per type, the file with the lowest perplexity on the calibration text (SpinQuant's criterion, with
    a search instead of its training). Returns (QuantResult per type, the seed kept per type, every trial).

    Nothing is written at the output paths until every trial is done; the work files (the rotated f16 GGUF, the
    candidates) live in a hidden folder beside the output and are removed."""
    import shutil
    import tempfile

    from .evaluate import GGUFSource, perplexity_of_ids, read_text
    from .gguf_quant import QuantResult, output_paths, quantize_gguf
    from .calibration import calibration_texts

    inp, out = Path(inp), Path(out)
    if trials < 1:
        raise TiblocalError(f"--rotate-trials {trials}: give 1 or more rotations to try")
    check_seed(seed)
    if trials > 1:  # before the first trial's work, not at the last
        check_seed(seed + trials - 1, f"--rotate {seed} with --rotate-trials {trials}: the last seed,")
    if not inp.is_file():
        raise TiblocalError(f"{inp}: no such GGUF file")
    if quant_options.get("imatrix") is not None:  # it must have been measured in this rotation (tiblocal imatrix --rotate)
        from tiblocal.gguf_file import read_gguf

        from .gguf_quant import check_imatrix_basis
        from tiblocal.imatrix_file import Imatrix, load_imatrix

        if trials > 1:
            raise TiblocalError(f"--imatrix with --rotate-trials {trials}: a matrix fits one rotation only; give "
                                "--rotate SEED with the matrix of that seed (tiblocal imatrix HF_DIR --rotate SEED)")
        im = quant_options["imatrix"]
        im = im if isinstance(im, Imatrix) else load_imatrix(im)
        if im.rotation is None:
            raise TiblocalError(f"{im.path} does not say which basis it was measured in (llama-imatrix's files do "
                                f"not); with --rotate {seed} give the matrix of `tiblocal imatrix HF_DIR --rotate {seed}`")
        check_imatrix_basis(im, inp, [*read_gguf(inp, with_tokens=False).rotation_seeds, seed])  # the one check
        quant_options.update(imatrix=im, basis_checked=True)
    if calib and trials == 1:
        raise TiblocalError("--calib is the text that ranks the rotations of --rotate-trials K; give K of 2 or more")
    ids: list[int] = []  # the calibration text, tokenized once by the model's vocabulary (the rotation keeps it)
    if trials > 1:
        from tiblocal.engine import LlamaVocab

        files = calibration_texts(calib or [], "--calib")
        if calib_windows < 1:
            raise TiblocalError(f"--calib-windows {calib_windows}: give 1 or more")
        vocab = LlamaVocab(inp)
        try:
            ids = vocab.tokenize(read_text(files), add_bos=False)
        finally:
            vocab.close()
        n = len(ids)
        if n // ctx < calib_windows:
            raise TiblocalError(
                f"the calibration text ({', '.join(map(str, files))}) has {n} tokens: {n // ctx} windows of {ctx}, "
                f"fewer than --calib-windows {calib_windows}; give more text with --calib or lower --calib-windows")
    paths = output_paths(inp, out, types)
    if len(paths) > 1 and "{type}" not in str(out):
        out.mkdir(parents=True, exist_ok=True)
    for p in paths.values():
        check_output_path(p, force=force, inputs=[inp, *(calib or [])])
    first = next(iter(paths.values()))
    parent = first.parent if str(first.parent) else Path(".")
    work = Path(tempfile.mkdtemp(prefix=f".{first.name}.rotate-", suffix=".partial", dir=parent))
    stage = on_stage or (lambda _: None)
    try:
        best: dict[str, tuple[float, Path, int, float]] = {}
        history: list[Trial] = []
        for s in range(seed, seed + trials):
            stage(f"rotating {inp.name} (seed {s})")
            turned = rotate_gguf(inp, work / f"rotated-{s}.gguf", seed=s, force=True)
            rotated = turned.path
            for r in quantize_gguf(rotated, work / f"{{type}}-{s}.gguf", types, threads=threads, force=True,
                                   on_start=lambda t, p: stage(f"quantizing seed {s} to {t}"), **quant_options):
                if turned.untied and quant_options.get("token_embedding_type") is None:
                    r = _embedding_as_tied(rotated, r, threads, quant_options)
                score = None
                if trials > 1:
                    stage(f"seed {s} {r.type}: perplexity on the calibration text")
                    src = GGUFSource(r.path, ctx, threads, n_gpu_layers)
                    try:
                        score = perplexity_of_ids(src, ids, ctx, max_windows=calib_windows).ppl
                    finally:
                        src.close()
                history.append(Trial(s, r.type, score))
                kept = best.get(r.type)
                if kept is None or (score is not None and score < kept[0]):
                    if kept is not None:
                        kept[1].unlink()
                    best[r.type] = (score if score is not None else 0.0, r.path, s, r.seconds)
                else:
                    r.path.unlink()
            rotated.unlink()
        results, seeds = [], {}
        for qtype, path in paths.items():
            _, cand, seeds[qtype], seconds = best[qtype]
            os.replace(cand, path)
            results.append(QuantResult(qtype, path, path.stat().st_size, seconds))
        return results, seeds, history
    finally:
        shutil.rmtree(work, ignore_errors=True)
