"""Calibration text for the quantizers that measure the model on Tibetan text (GPTQ, importance matrices,
rotations): the bundled excerpt (tiblocal/data/calibration) or the user's files, cut into windows of the model's own
SentencePiece ids, spread evenly through the text."""

from __future__ import annotations

from pathlib import Path

from tiblocal.errors import InputFileError, TiblocalError


def default_calibration() -> Path:
    from tiblocal.models import DATA_DIR

    return DATA_DIR / "calibration" / "tibetan.txt.xz"


def calibration_texts(paths: list[Path], option: str = "--calib") -> list[Path]:
    """The text files given with ``option``, or the bundled Tibetan excerpt when none are; each must exist."""
    texts = [Path(p) for p in paths] or [default_calibration()]
    for t in texts:
        if not t.is_file():
            raise InputFileError(f"{t}: no such calibration text file; give plain or .xz text with {option}")
    return texts


def calibration_windows(
    hf_dir: Path, texts: list[Path], samples: int, seq_len: int,
    options: tuple[str, str, str | None] = ("--calib", "--samples", "--seq-len"),
) -> list[dict]:
    """``samples`` windows of ``seq_len`` SentencePiece ids (BOS first), spread evenly through the text.

    ``options``: the command's names for the text, the window count and the window length (None where it has
    none), for the error."""
    from tiblocal.gguf_vocab import load_sentencepiece
    from tiblocal.vocab import read_lines

    if seq_len < 2:  # BOS and one token of the text at least (gptq --seq-len 1 divided by zero)
        raise TiblocalError(f"{options[2] or 'the window length'} {seq_len}: expected windows of at least 2 tokens")
    model_file = hf_dir / "tokenizer.model"
    if not model_file.is_file():
        raise InputFileError(f"{hf_dir}: no tokenizer.model; copy the model's SentencePiece tokenizer into the folder")
    sp = load_sentencepiece(model_file)
    ids: list[int] = []
    for line in read_lines(texts):
        if line.strip():
            ids.extend(sp.encode(line))
            ids.append(sp.eos_id())
    span = seq_len - 1
    available = len(ids) // span
    if available < samples:
        raise TiblocalError(
            f"the calibration text ({', '.join(str(t) for t in texts)}) has {len(ids)} tokens: {available} windows of "
            f"{seq_len}, fewer than {options[1]} {samples}; give more text with {options[0]}, or lower {options[1]}"
            + (f" or {options[2]}" if options[2] else "")
        )
    step = available // samples
    out = []
    for k in range(samples):
        window = [sp.bos_id()] + ids[k * step * span : k * step * span + span]
        out.append({"input_ids": window, "attention_mask": [1] * len(window)})
    return out
