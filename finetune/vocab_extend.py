"""Vocabulary extension: train a Tibetan SentencePiece model and merge its pieces into a Llama-2 base.

The classic recipe (Chinese-LLaMA's merge_tokenizers.py) appends the new pieces with score 0. All
those ties are broken differently by SentencePiece, llama.cpp and Hugging Face's fast tokenizer, so
a model trained through one runtime sees other ids in another. Here every added piece gets its own
score, strictly below every base piece and strictly decreasing in the Tibetan model's merge order
(BPE: the order the merges were learned), so the merge priority is the same total order everywhere.
Only pieces made entirely of Tibetan characters (optionally after the word-start mark ▁) are added,
so a line without Tibetan tokenizes exactly as with the base; base pieces and ids never change.
A unigram Tibetan model is accepted too: its pieces are added in score order, each only once it can
be built from two pieces already in the vocabulary (a BPE base cannot reach any other piece).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tiblocal.errors import InputFileError, ModelFormatError, TiblocalError
from tiblocal.fsutil import atomic_dir, check_output_path
from tiblocal.gguf_vocab import load_sentencepiece
from tiblocal.text import tibetan_share
from tiblocal.vocab import SIDECAR, processor_from_proto, read_lines, token_stats, tokenizer_model, write_tokenizer_json

log = logging.getLogger(__name__)

WORD_START = "\u2581"
_TIBETAN_PIECE = re.compile(f"^{WORD_START}?[\u0f00-\u0fff]+$")
# with split_by_whitespace off: Tibetan characters and spaces in any order (e.g. "ནོ།▁།"), at least one Tibetan
_TIBETAN_SPAN = re.compile(f"^(?=.*[\u0f00-\u0fff])[\u0f00-\u0fff{WORD_START}]+$")
MIN_TIBETAN_SHARE = 0.3  # of the sampled characters, or the corpus is refused as not Tibetan


@dataclass(frozen=True)
class ExtendConfig:
    add: int  # pieces to add to the base
    model_type: str = "bpe"  # bpe | unigram
    sample_chars: int = 50_000_000  # memory budget of the training sample, in characters
    eval_chars: int = 2_000_000  # held-out characters for the report (lines not in the sample)
    max_piece_length: int = 24  # characters; Tibetan words of 3-5 syllables need more than the default 16
    seed: int = 1234
    threads: int = 0  # 0: all cores
    weights: tuple[tuple[str, float], ...] = ()  # (file stem, factor): down- or up-weight a source
    curve: tuple[int, ...] = ()  # also measure these sizes (BPE: the first k merges are the k-piece model)
    split_by_whitespace: bool = True  # False: pieces may span spaces ("།▁།" of verse, "ཡིན།▁"): about 3% fewer tokens


def _source_name(path: Path) -> str:
    """The name ``--weight NAME=FACTOR`` gives a corpus file: its name without .txt or .xz."""
    return path.name.removesuffix(".xz").removesuffix(".txt")


def _weight_of(path: Path, weights: dict[str, float]) -> float:
    return weights.get(_source_name(path), 1.0)


WEIGHT_MAX = 1000.0  # a larger factor only overflows the weighted size (1e308 sampled nothing)


def check_weights(weights: tuple[tuple[str, float], ...], files: list[Path]) -> None:
    """Each ``--weight NAME=FACTOR`` names a corpus file and gives a factor from 0 to WEIGHT_MAX; a misspelt name
    would otherwise be ignored without a word."""
    names = sorted({_source_name(f) for f in files})
    for name, factor in weights:
        if not (math.isfinite(factor) and 0 <= factor <= WEIGHT_MAX):
            raise TiblocalError(f"--weight {name}={factor:g}: expected a factor from 0 to {WEIGHT_MAX:g} (0 leaves the "
                                "file out, 0.3 samples it at 30%, 2 twice)")
        if name not in names:
            raise TiblocalError(f"--weight {name}={factor}: no --corpus file is named {name!r}; expected one of "
                                f"{', '.join(names)} (a file's name without .txt or .xz)")


def sample_corpus(
    files: list[Path], cfg: ExtendConfig, train_out: Path, progress: Callable[[str, int, int], None] | None = None,
    *, hold_out: bool = False,
) -> tuple[int, list[str]]:
    """Write a sample of the corpus lines to ``train_out`` within ``cfg.sample_chars``.

    Two passes: count the characters of each file, then keep each line with the probability that
    fills the budget (times the file's weight). Returns the characters written and held-out lines: about 5% of the
    lines left out of the sample (at most ``cfg.eval_chars``). Where that leaves none (the corpus fits the budget, or
    nearly) and ``hold_out`` (no other text to measure on), the sampling pass runs again with the held-out lines
    drawn first and kept out of the sample, so that the report measures text SentencePiece did not see; a corpus
    that leaves some samples exactly as before.
    """
    weights = dict(cfg.weights)
    sizes = {}
    for i, f in enumerate(files):
        sizes[f] = sum(len(line) for line in read_lines([f]))
        if progress:
            progress("counting", i + 1, len(files))
    weighted = sum(sizes[f] * _weight_of(f, weights) for f in files)
    if weighted == 0 and any(sizes.values()):
        raise TiblocalError("every --corpus file with text has --weight 0; give one of them a factor above 0")
    if weighted == 0:
        raise InputFileError(f"the corpus is empty ({', '.join(str(f) for f in files)}); give Tibetan text files")
    rate = min(1.0, cfg.sample_chars / weighted)

    def sample(hold_first: bool) -> tuple[int, list[str]]:
        rng = random.Random(cfg.seed)
        written = 0
        held: list[str] = []
        held_chars = 0
        with open(train_out, "w", encoding="utf-8") as out:
            for i, f in enumerate(files):
                p = min(1.0, rate * _weight_of(f, weights))
                room = cfg.eval_chars * (i + 1) / len(files)
                for line in read_lines([f]):
                    if not line.strip():
                        continue
                    if hold_first and held_chars < room and rng.random() < 0.05:
                        held.append(line)
                        held_chars += len(line)
                    elif rng.random() < p:
                        out.write(line + "\n")
                        written += len(line)
                    elif not hold_first and held_chars < room and rng.random() < 0.05:
                        held.append(line)
                        held_chars += len(line)
                if progress:
                    progress("sampling", i + 1, len(files))
        return written, held

    written, held = sample(hold_first=False)
    if not held and hold_out:
        written, held = sample(hold_first=True)
    return written, held


SP_VOCAB_MAX = 2**31 - 1  # SentencePiece's trainer_spec.vocab_size is an int32


def _sp_vocab_size(add: int) -> int:
    """The SentencePiece vocabulary trained first for ``add`` new pieces: room for the single characters, the meta
    pieces and the pieces the base already has or that are not Tibetan."""
    return int(add * 1.15) + 300


class CorpusBoundError(TiblocalError):
    """SentencePiece's "Vocabulary size too high": the sample gives at most ``limit`` pieces."""

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


def train_sentencepiece(sample: Path, vocab_size: int, cfg: ExtendConfig, prefix: Path) -> Path:
    import os

    import sentencepiece as spm

    try:
        spm.SentencePieceTrainer.train(
            input=str(sample),
            model_prefix=str(prefix),
            model_type=cfg.model_type,
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=False,  # the base has the byte pieces
            split_digits=True,
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            max_sentencepiece_length=cfg.max_piece_length,
            split_by_whitespace=cfg.split_by_whitespace,
            max_sentence_length=1 << 16,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            train_extremely_large_corpus=False,
            num_threads=cfg.threads or os.cpu_count() or 1,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
        if m:
            raise CorpusBoundError(
                f"the corpus can give at most {m.group(2)} SentencePiece pieces but {m.group(1)} were needed for "
                f"--add {cfg.add}; ask for fewer pieces or give more text", int(m.group(2))
            ) from None
        raise TiblocalError(f"SentencePiece training failed: {msg}") from None
    return prefix.with_suffix(".model")


def _proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    load_sentencepiece(path)  # a clear error when it is not a SentencePiece model
    proto = pb.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def new_pieces(base_proto, tib_proto, model_type: str, *, spans: bool = False) -> list[str]:
    """Tibetan pieces of the Tibetan model that the base lacks, in the order they should rank (``spans``: pieces
    may hold spaces anywhere, as a model trained without split_by_whitespace makes them)."""
    have = {p.piece for p in base_proto.pieces}
    normal = 1
    pattern = _TIBETAN_SPAN if spans else _TIBETAN_PIECE
    cand = [p for p in tib_proto.pieces if p.type == normal and pattern.match(p.piece) and p.piece not in have]
    chars = [p.piece for p in cand if len(p.piece.lstrip(WORD_START)) == 1 and not p.piece.startswith(WORD_START)]
    rest = [p for p in cand if p.piece not in chars]
    rest.sort(key=lambda p: -p.score)  # BPE: merge order; unigram: likelihood
    ordered: list[str] = []
    known = have | set(chars)

    def buildable(s: str) -> bool:
        return any(s[:k] in known and s[k:] in known for k in range(1, len(s)))

    if model_type == "bpe":
        for p in rest:
            if buildable(p.piece):
                ordered.append(p.piece)
                known.add(p.piece)
    else:  # unigram: repeat passes until no further piece becomes reachable
        pending = [p.piece for p in rest]
        while pending:
            left = []
            for s in pending:
                if buildable(s):
                    ordered.append(s)
                    known.add(s)
                else:
                    left.append(s)
            if len(left) == len(pending):
                break
            pending = left
    return chars + ordered


def merge_pieces(base_proto, pieces_in_order: list[str], n_chars: int):
    """The base with ``pieces_in_order`` appended: merges first-to-last with strictly decreasing scores
    below every base score, then the single characters (whose scores never take part in a merge)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    merged = pb.ModelProto()
    merged.CopyFrom(base_proto)
    floor = min(p.score for p in base_proto.pieces if p.score > -1e8)  # Llama-2 gives "▁▁" and kin -1e9
    chars, merges = pieces_in_order[:n_chars], pieces_in_order[n_chars:]
    for k, piece in enumerate(merges + chars):
        sp = merged.pieces.add()
        sp.piece = piece
        sp.score = float(floor - 1 - k)
        sp.type = pb.ModelProto.SentencePiece.Type.NORMAL
    merged.trainer_spec.vocab_size = len(merged.pieces)
    return merged


@dataclass(frozen=True)
class ExtendResult:
    out: Path
    base_pieces: int
    added: int
    report: dict


def extend_vocabulary(
    base: Path,
    corpus: list[Path],
    out: Path,
    cfg: ExtendConfig,
    *,
    eval_files: list[Path] | None = None,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> ExtendResult:
    base, out = tokenizer_model(base), Path(out)  # a path, a folder, or "bundled"
    if cfg.add < 1:
        raise TiblocalError(f"--add {cfg.add}: expected a positive number of pieces")
    largest = max((cfg.add, *cfg.curve))
    if _sp_vocab_size(largest) > SP_VOCAB_MAX:  # before the corpus is read
        flag = "--add" if largest == cfg.add else "--curve"
        raise TiblocalError(f"{flag} {largest}: more pieces than SentencePiece can train (it would be asked for "
                            f"{_sp_vocab_size(largest):,}; its vocabulary size is a 32-bit integer, at most "
                            f"{SP_VOCAB_MAX:,}); ask for fewer pieces")
    if cfg.model_type not in ("bpe", "unigram"):
        raise TiblocalError(f"--model-type {cfg.model_type!r}: expected bpe or unigram")
    check_output_path(out, force=force, folder=True, inputs=[base, *(corpus or []), *(eval_files or [])])
    base_proto = _proto(base)
    if base_proto.trainer_spec.model_type != 2:  # BPE
        raise ModelFormatError(f"{base} is not a BPE SentencePiece model (Llama-2's is); tiblocal extends BPE bases")
    if not corpus:
        raise InputFileError("give at least one corpus file with --corpus")
    check_weights(cfg.weights, corpus)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "sample.txt"
        sampled_chars, held = sample_corpus(corpus, cfg, sample, progress, hold_out=not eval_files)
        if sampled_chars == 0:
            raise InputFileError(f"the corpus is empty ({', '.join(map(str, corpus))}); give Tibetan text files")
        with open(sample, encoding="utf-8") as f:
            share = tibetan_share(f.read(5_000_000))
        if share < MIN_TIBETAN_SHARE:
            raise InputFileError(
                f"the corpus is not Tibetan: {share:.0%} of its characters are Tibetan (U+0F00-U+0FFF); "
                "give Tibetan text"
            )
        if progress:
            progress("training", 0, 1)
        if cfg.curve and cfg.model_type != "bpe":
            raise TiblocalError("--curve needs --model-type bpe (a unigram model's prefixes are not smaller models)")
        # Room for the single characters, the meta pieces and the pieces the base already has or that
        # are not Tibetan; trained again, larger, when that was not enough (a base that already knows
        # much Tibetan), until SentencePiece says the corpus can give no more.
        vocab_size = _sp_vocab_size(largest)
        for attempt in range(4):
            at_bound = False
            try:
                tib = train_sentencepiece(sample, vocab_size, cfg, Path(tmp) / "tibetan")
            except CorpusBoundError as e:
                if attempt == 0:  # asked beyond the corpus at once: said now, not after a long training at its bound
                    raise
                # grown past the corpus's bound by the retries: train at the bound, and say below what it gives
                vocab_size, at_bound = e.limit, True
                tib = train_sentencepiece(sample, vocab_size, cfg, Path(tmp) / "tibetan")
            ordered = new_pieces(base_proto, _proto(tib), cfg.model_type, spans=not cfg.split_by_whitespace)
            if len(ordered) >= largest or at_bound:
                break
            # at most SentencePiece's limit: past it, the corpus's own bound is the message
            vocab_size = min(int(vocab_size * 1.1 * largest / max(len(ordered), 1)) + 100, SP_VOCAB_MAX)
        if progress:
            progress("training", 1, 1)
        t_train = time.perf_counter() - t0
        n_chars = sum(1 for p in ordered if len(p) == 1)
        if len(ordered) < largest:
            raise TiblocalError(
                f"the corpus gives only {len(ordered)} new Tibetan pieces; ask for at most {len(ordered)} with --add "
                "or give more text"
            )
        chosen = ordered[: cfg.add] if cfg.add >= n_chars else ordered[:n_chars]
        merged = merge_pieces(base_proto, chosen, n_chars)
        with atomic_dir(out, replace=force) as d:
            (d / "tokenizer.model").write_bytes(merged.SerializeToString())
            write_hf_files(d)
            ext_sp = load_sentencepiece(d / "tokenizer.model")
            base_sp = load_sentencepiece(base)
            lines = held
            if eval_files:
                lines = list(read_lines(eval_files))
            report = {
                "base": str(base),
                "base_pieces": len(base_proto.pieces),
                "added_pieces": len(chosen),
                "added_characters": n_chars,
                "total_pieces": len(merged.pieces),
                "model_type": cfg.model_type,
                "split_by_whitespace": cfg.split_by_whitespace,
                "corpus": [str(c) for c in corpus],
                "weights": dict(cfg.weights),
                "sample_characters": sampled_chars,
                "train_seconds": round(t_train, 1),
                "eval": {
                    "source": [str(e) for e in eval_files] if eval_files else "held-out corpus lines",
                    "base": token_stats(base_sp, lines).as_dict(),
                    "extended": token_stats(ext_sp, lines).as_dict(),
                },
            }
            if cfg.curve:
                report["curve"] = []
                for k in sorted(cfg.curve):
                    sp_k = processor_from_proto(merge_pieces(base_proto, ordered[:k], n_chars))
                    report["curve"].append({"added": k, **token_stats(sp_k, lines).as_dict()})
            (d / SIDECAR).write_text(json.dumps({"base_pieces": len(base_proto.pieces), "added": len(chosen)}, indent=2))
            (d / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return ExtendResult(out, len(base_proto.pieces), len(chosen), report)


def write_hf_files(folder: Path) -> None:
    """Hugging Face tokenizer files that tokenize exactly as ``tokenizer.model`` does.

    ``tokenizer.json`` carries the merges in SentencePiece's order; ``PreTrainedTokenizerFast`` loads it
    as it is (transformers 5's LlamaTokenizer would rebuild the pipeline with its own pre-tokenizer,
    which drops the dummy prefix before a leading space). ``split_special_tokens``: a text holding the
    literal ``<s>`` or ``</s>`` is text, as SentencePiece and llama.cpp read it; without it transformers turns
    the literal into the special token (a user's text could end a sequence). BOS and EOS still come from
    ``add_special_tokens`` and from the ids.
    """
    write_tokenizer_json(folder)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "model_max_length": 4096,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2)
    )
