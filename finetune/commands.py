"""The training stage's verbs: pretrain and sft (a YAML recipe under accelerate launch), and vocab (extend a tokenizer
for Tibetan, its figures, its parity across SentencePiece, llama.cpp and Hugging Face)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tiblocal.errors import InputFileError, TiblocalError
from tiblocal.options import Result, nonnegative_int, option, positive_int

JSON_HELP = "print the result as JSON"


# --- pretrain, sft -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainOptions:
    config: str = option(positional=True,
                         help="a YAML recipe, or a name in finetune/configs (e.g. tiny-pretrain)")
    overrides: list[str] = option([], positional=True, metavar="KEY=VALUE",
                                  help="change a setting, e.g. output_dir=runs/x lora.r=16")
    as_json: bool = option(False, flag="--json", help=JSON_HELP)


@dataclass(frozen=True)
class SftOptions(PretrainOptions):
    config: str = option(positional=True, help="a YAML recipe, or a name in finetune/configs (e.g. tiny-sft)")


def _train(stage: str, o: PretrainOptions) -> Result | int:
    import contextlib
    import os

    from tiblocal.jsonout import stdout_to_stderr
    from tiblocal.progress import progress

    from .config import load_config
    from .train import train

    cfg = load_config(o.config, o.overrides, stage=stage)
    main = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch, one process reports
    with progress(stage, total=cfg.max_steps) if main else contextlib.nullcontext() as report:
        # stdout is the command's own (--json); libraries that print there (gptqmodel's banner, imported by peft
        # when it is installed) go to stderr
        with stdout_to_stderr():
            r = train(cfg, progress=(lambda done, total, loss: report(done, total, loss=f"loss {loss:.4f}"))
                      if main else None)
    if not main:
        return 0
    summary = {"output_dir": str(r.output_dir), "steps": r.steps, "resumed_from": r.resumed_from,
               "train_loss": r.train_loss, "eval_loss": r.eval_loss, "best_step": r.best_step, "examples": r.examples}
    ev = f", eval loss {r.eval_loss:.4f}" if r.eval_loss is not None else ""
    ev += f" (the model of step {r.best_step}, the lowest; keep_best)" if r.best_step else ""
    resumed = f" (resumed at step {r.resumed_from})" if r.resumed_from else ""
    return Result(summary, f"{stage}: {r.steps} steps{resumed}, train loss {r.train_loss:.4f}{ev}; wrote "
                           f"{Path(r.output_dir)}", to="stderr")


def pretrain(o: PretrainOptions) -> Result | int:
    return _train("pretrain", o)


def sft(o: SftOptions) -> Result | int:
    return _train("sft", o)


# --- vocab extend, stats, parity ---------------------------------------------------------------------------------


def _stat_cells(s: dict) -> tuple[str, str, str]:
    """Tokens per syllable, characters per token and the byte-fallback share of ``token_stats(...).as_dict()``, as
    table cells; "-" where the text had none to divide by (no syllables, no tokens)."""
    return tuple("-" if s[k] is None else format(s[k], f) for k, f in
                 (("tokens_per_syllable", ".3f"), ("chars_per_token", ".2f"), ("byte_fallback_share", ".1%")))


def parse_weights(weights: list[str]) -> tuple[tuple[str, float], ...]:
    """``--weight NAME=FACTOR`` options as (file stem, factor) pairs."""
    pairs = []
    for w in weights:
        name, _, factor = w.partition("=")
        try:
            pairs.append((name, float(factor)))
        except ValueError:
            raise TiblocalError(f"--weight {w!r}: expected NAME=FACTOR, e.g. derge_kangyur=0.3") from None
    return tuple(pairs)


@dataclass(frozen=True)
class ExtendOptions:
    base: str = option(help="the base tokenizer.model (Llama-2's), its folder, or 'bundled'")
    corpus: list[Path] = option(help="text files, plain or .xz")
    add: int = option(help="pieces to add")
    out: Path = option(help="output folder")
    model_type: Literal["bpe", "unigram"] = option(
        "bpe", help="SentencePiece model of the new pieces (default bpe, as Llama-2's)")
    sample_chars: int = option(50_000_000, parse=positive_int,
                               help="memory budget of the training sample (characters)")
    weight: list[str] = option([], repeat=True, metavar="NAME=FACTOR",
                               help="sample a corpus file (its name without .txt/.xz) more or less, 0 to 1000, "
                                    "e.g. derge_kangyur=0.3 (repeatable)")
    eval: list[Path] | None = option(None, help="held-out text for the report (default: about 5%% of the corpus "
                                                "lines, kept out of the sample)")
    curve: str | None = option(None, metavar="N,N,...",
                               help="also measure these sizes (bpe), e.g. 8000,16000,24000,32000")
    split_by_whitespace: bool = option(
        True, flag="--no-split-whitespace", negate=True,
        help="let pieces span spaces (the '། །' of verse): about 3%% fewer tokens on Tibetan text")
    force: bool = option(False, help="replace --out if it exists")
    as_json: bool = option(False, flag="--json", help=JSON_HELP)


def vocab_extend(o: ExtendOptions) -> Result:
    from tiblocal.progress import stages

    from .vocab_extend import ExtendConfig, extend_vocabulary

    pairs = parse_weights(o.weight)
    try:
        sizes = tuple(int(x) for x in o.curve.split(",")) if o.curve else ()
    except ValueError:
        raise TiblocalError(f"--curve {o.curve!r}: expected sizes like 8000,16000,24000") from None
    cfg = ExtendConfig(add=o.add, model_type=o.model_type, sample_chars=o.sample_chars, weights=pairs, curve=sizes,
                       split_by_whitespace=o.split_by_whitespace)
    label = {"counting": "counting the corpus", "sampling": "sampling", "training": "training SentencePiece"}
    with stages("vocab extend") as report:
        r = extend_vocabulary(o.base, o.corpus, o.out, cfg, eval_files=o.eval, force=o.force,
                              progress=lambda stage, done, total: report(label.get(stage, stage), done, total))

    def show(console) -> None:
        from rich.table import Table

        ev = r.report["eval"]
        table = Table(title=f"{o.out}: {r.base_pieces} + {r.added} pieces", title_justify="left")
        for col in ("", "tokens/syllable", "chars/token", "byte fallback"):
            table.add_column(col)
        for name in ("base", "extended"):
            table.add_row(name, *_stat_cells(ev[name]))
        for point in r.report.get("curve", []):
            table.add_row(f"+{point['added']}", *_stat_cells(point))
        console.print(table)
        if not ev["extended"]["syllables"]:
            console.print(f"no Tibetan syllables to measure on ({ev['extended']['lines']} lines); give text the "
                          "tokenizer did not see with --eval FILE")

    return Result(r.report, show)


@dataclass(frozen=True)
class StatsOptions:
    tokenizer: str = option(positional=True, help="a tokenizer.model, its folder, or 'bundled'")
    text: list[Path] = option(help="text files, plain or .xz")
    as_json: bool = option(False, flag="--json", help=JSON_HELP)


def vocab_stats(o: StatsOptions) -> Result:
    from tiblocal.gguf_vocab import load_sentencepiece
    from tiblocal.vocab import base_pieces, read_lines, token_stats, tokenizer_model, truncated_model

    model = tokenizer_model(o.tokenizer)
    sp = load_sentencepiece(model)
    lines = list(read_lines(o.text))
    rows = {"tokenizer": token_stats(sp, lines).as_dict()}
    n_base = base_pieces(o.tokenizer)
    if n_base:
        rows["base"] = token_stats(truncated_model(model, n_base), lines).as_dict()

    def show(console) -> None:
        from rich.table import Table

        t = Table(title=f"{model} ({sp.vocab_size()} pieces)", title_justify="left")
        for col in ("", "tokens/syllable", "chars/token", "byte fallback", "tokens", "syllables"):
            t.add_column(col)
        for name, s in rows.items():
            label = name if name == "tokenizer" else f"base ({n_base} pieces)"
            t.add_row(label, *_stat_cells(s), f"{s['tokens']:,}", f"{s['syllables']:,}")
        console.print(t)

    return Result({"tokenizer": str(model), "pieces": sp.vocab_size(), "base_pieces": n_base, "stats": rows}, show)


@dataclass(frozen=True)
class ParityOptions(StatsOptions):
    show: int = option(20, parse=nonnegative_int,
                       help="mismatching lines to show (default 20)")


def vocab_parity(o: ParityOptions) -> Result:
    """Exit 0 when every runtime gives SentencePiece's ids on every line, 1 otherwise."""
    import tempfile

    from tiblocal.engine import LlamaVocab
    from tiblocal.gguf_vocab import load_sentencepiece, write_vocab_gguf  # what `tiblocal convert --vocab-only` writes
    from tiblocal.vocab import load_hf_tokenizer, parity, read_lines, tokenizer_dir

    folder = tokenizer_dir(o.tokenizer)
    given = Path(o.tokenizer)
    if str(o.tokenizer) != "bundled" and given.is_file() and given.name != "tokenizer.model":
        # the runtimes read a folder (tokenizer.model, tokenizer.json): another file there would be compared instead
        raise InputFileError(f"{given}: vocab parity compares a tokenizer folder's files (tokenizer.model, and "
                             "tokenizer.json for Hugging Face); give its folder, or put the model in a folder as "
                             "tokenizer.model")
    sp = load_sentencepiece(folder / "tokenizer.model")
    lines = list(read_lines(o.text))
    runtimes = {}
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = Path(tmp) / "vocab.gguf"
        write_vocab_gguf(folder, gguf_path)
        vocab = LlamaVocab(gguf_path)
        runtimes["llama.cpp"] = lambda t: vocab.tokenize(t, add_bos=False, special=False)
        hf = load_hf_tokenizer(folder)
        if hf is not None:
            runtimes["huggingface"] = lambda t: hf.encode(t, add_special_tokens=False)
        counts, report = parity(sp, lines, runtimes, max_report=o.show)
        vocab.close()
    result = {"tokenizer": str(folder), "lines": len(lines), "mismatching_lines": counts,
              "huggingface": "compared" if hf is not None else "transformers is not installed",
              "mismatches": [m.__dict__ for m in report]}

    def show(console) -> None:
        from rich.table import Table

        t = Table(title=f"parity with SentencePiece on {len(lines)} lines", title_justify="left")
        t.add_column("runtime")
        t.add_column("mismatching lines")
        for name, n in counts.items():
            t.add_row(name, str(n))
        if hf is None:
            t.add_row("huggingface", "not compared (transformers is not installed)")
        console.print(t)
        for m in report:
            console.print(f"line {m.line_no} ({m.runtime}): first difference at token {m.position}: "
                          f"sentencepiece {m.expected} vs {m.got}: {m.text[:80]!r}", markup=False)

    return Result(result, show, code=0 if not any(counts.values()) else 1)
