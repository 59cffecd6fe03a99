"""`tiblocal vocab stats` and `tiblocal vocab parity`: Tibetan figures of a tokenizer, and the same ids everywhere."""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .gguf_vocab import load_sentencepiece
from .vocab import base_pieces, load_hf_tokenizer, parity, read_lines, token_stats, tokenizer_dir, tokenizer_model, truncated_model
from tiblocal.jsonout import print_json


def run_stats(tokenizer: str, text: list[Path], *, as_json: bool) -> int:
    model = tokenizer_model(tokenizer)
    sp = load_sentencepiece(model)
    lines = list(read_lines(text))
    rows = {"tokenizer": token_stats(sp, lines).as_dict()}
    n_base = base_pieces(tokenizer)
    if n_base:
        rows["base"] = token_stats(truncated_model(model, n_base), lines).as_dict()
    out = {"tokenizer": str(model), "pieces": sp.vocab_size(), "base_pieces": n_base, "stats": rows}
    if as_json:
        print_json(out)
        return 0
    t = Table(title=f"{model} ({sp.vocab_size()} pieces)", title_justify="left")
    for col in ("", "tokens/syllable", "chars/token", "byte fallback", "tokens", "syllables"):
        t.add_column(col)
    for name, s in rows.items():
        label = name if name == "tokenizer" else f"base ({n_base} pieces)"
        tps = f"{s['tokens_per_syllable']:.3f}" if s["tokens_per_syllable"] is not None else "-"
        cpt = f"{s['chars_per_token']:.2f}" if s["chars_per_token"] is not None else "-"
        bf = f"{s['byte_fallback_share']:.1%}" if s["byte_fallback_share"] is not None else "-"
        t.add_row(label, tps, cpt, bf, f"{s['tokens']:,}", f"{s['syllables']:,}")
    Console(highlight=False).print(t)
    return 0


def run_parity(tokenizer: str, text: list[Path], *, as_json: bool, show: int) -> int:
    """Exit 0 when every runtime gives SentencePiece's ids on every line, 1 otherwise."""
    folder = tokenizer_dir(tokenizer)
    sp = load_sentencepiece(folder / "tokenizer.model")
    lines = [l for l in read_lines(text)]
    runtimes = {}
    with tempfile.TemporaryDirectory() as tmp:
        from .engine import LlamaVocab
        from .gguf_vocab import write_vocab_gguf  # what `tiblocal convert --vocab-only` writes

        gguf_path = Path(tmp) / "vocab.gguf"
        write_vocab_gguf(folder, gguf_path)
        vocab = LlamaVocab(gguf_path)
        runtimes["llama.cpp"] = lambda t: vocab.tokenize(t, add_bos=False, special=False)
        hf = load_hf_tokenizer(folder)
        if hf is not None:
            runtimes["huggingface"] = lambda t: hf.encode(t, add_special_tokens=False)
        counts, report = parity(sp, lines, runtimes, max_report=show)
        vocab.close()
    result = {
        "tokenizer": str(folder),
        "lines": len(lines),
        "mismatching_lines": counts,
        "huggingface": "compared" if hf is not None else "transformers is not installed",
        "mismatches": [m.__dict__ for m in report],
    }
    if as_json:
        print_json(result, ensure_ascii=False)
    else:
        con = Console(highlight=False)
        t = Table(title=f"parity with SentencePiece on {len(lines)} lines", title_justify="left")
        t.add_column("runtime")
        t.add_column("mismatching lines")
        for name, n in counts.items():
            t.add_row(name, str(n))
        if hf is None:
            t.add_row("huggingface", "not compared (transformers is not installed)")
        con.print(t)
        for m in report:
            con.print(f"line {m.line_no} ({m.runtime}): first difference at token {m.position}: "
                      f"sentencepiece {m.expected} vs {m.got}: {m.text[:80]!r}", markup=False)
    return 0 if not any(counts.values()) else 1
