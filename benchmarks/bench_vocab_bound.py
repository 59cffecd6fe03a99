"""How far a tokenizer is from the fewest tokens its pieces allow, and whether another choice of the same number of
pieces does better (issue #3's target of at most 0.66 tokens per Tibetan syllable with 24,000 added pieces).

For each tokenizer, and for each --sizes prefix of a tiblocal extension (the first k added pieces, as
`vocab extend --curve` counts them; sizes the extension does not reach are left out), on the --text lines:

- greedy: the tokens SentencePiece gives (llama.cpp and Hugging Face give the same on tiblocal's tokenizers): BPE
  merges in score order;
- minimum: the fewest pieces of the same vocabulary that spell each line, a shortest path over the line's characters
  (a character without a piece costs its UTF-8 bytes, as byte fallback does). No order of the pieces' scores can
  give fewer tokens.

    python benchmarks/bench_vocab_bound.py bundled DIR --sizes 24000,32000 --text DEV1.txt.xz DEV2.txt.xz

--prune-from DIR --prune-to N selects N pieces among a larger extension's added pieces for the fewest tokens
(count-optimal selection, as PathPiece and unigram training prune): on a sample of --prune-text (sampled as `vocab
extend` samples, --weight applies), each round drops the 15% of multi-character added pieces whose removal costs the
fewest tokens (a piece's uses in the minimum segmentation times the tokens its own string then takes, less one),
stopping at N and at each --sizes point, where it reports the minimum on --text. The selected set's minimum is a lower
bound on what SentencePiece would give with those pieces; the rows say whether the selection beats the extension's
own first N pieces.

Needs the tokenizers' SentencePiece models with the identity normalizer and spaces kept (Llama-2's). Pure Python:
about 7 s a row on the 2.6M-character dev split, and 13-17 s a round for a 5M-character pruning sample (2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

WORD_START = "\u2581"


@dataclass
class Vocab:
    """The pieces a line may be spelt with, and how SentencePiece turns a line into the string it segments."""

    pieces: set[str]
    max_len: int
    dummy_prefix: bool
    byte_fallback: bool

    def normalize(self, line: str) -> str:
        return (WORD_START if self.dummy_prefix else "") + line.replace(" ", WORD_START)

    def char_cost(self, ch: str) -> int:
        return len(ch.encode("utf-8")) if self.byte_fallback else 1  # byte pieces, or one <unk>


def load_proto(model: Path):
    from tiblocal.finetune.vocab_extend import _proto  # a clear error when it is not a SentencePiece model

    proto = _proto(model)
    spec = proto.normalizer_spec
    suffix = proto.trainer_spec.treat_whitespace_as_suffix
    if spec.name not in ("identity", "") or spec.remove_extra_whitespaces or suffix:
        raise SystemExit(
            f"{model}: normalizer {spec.name!r}, remove_extra_whitespaces {spec.remove_extra_whitespaces}, "
            f"treat_whitespace_as_suffix {suffix}; expected identity, False, False (Llama-2's), as this bench spells "
            "lines the way Llama-2's tokenizer normalizes them; give a Llama-style tokenizer"
        )
    return proto


def vocab_of(proto) -> Vocab:
    normal, user = 1, 4
    pieces = {p.piece for p in proto.pieces if p.type in (normal, user)}
    return Vocab(pieces, max(map(len, pieces)), proto.normalizer_spec.add_dummy_prefix,
                 any(p.type == 6 for p in proto.pieces))


def min_tokens(s: str, v: Vocab, uses: Counter | None = None) -> int:
    """The fewest pieces of ``v`` that spell the normalized string ``s`` (counting ``uses`` of each piece if given)."""
    n = len(s)
    best = [0] + [1 << 30] * n
    back = [0] * (n + 1)
    pieces, max_len = v.pieces, v.max_len
    for i in range(n):
        b = best[i] + 1
        if s[i] not in pieces:
            c = best[i] + v.char_cost(s[i])
            if c < best[i + 1]:
                best[i + 1], back[i + 1] = c, i
        for j in range(i + 1, min(n, i + max_len) + 1):
            if b < best[j] and s[i:j] in pieces:
                best[j], back[j] = b, i
    if uses is not None:
        j = n
        while j > 0:
            i = back[j]
            uses[s[i:j]] += 1
            j = i
    return best[n]


def prefix_indices(proto, n_base: int, k: int) -> list[int]:
    """The pieces of the extension cut to its first ``k`` added pieces: the merged model lists the added multi-character
    pieces first and the single characters last, and a --curve point of k keeps every character."""
    added = range(n_base, len(proto.pieces))
    chars = [i for i in added if len(proto.pieces[i].piece) == 1]
    merges = [i for i in added if len(proto.pieces[i].piece) > 1]
    if k < len(chars):
        raise SystemExit(f"--sizes {k}: the tokenizer's {len(chars)} added characters do not fit; give at least that")
    return [*range(n_base), *merges[: k - len(chars)], *chars]


def measure(name: str, k: int | None, proto, keep, lines: list[str], syllables: int) -> dict:
    from tiblocal.vocab import processor_from_proto

    from sentencepiece import sentencepiece_model_pb2 as pb

    t = time.perf_counter()
    sub = pb.ModelProto()
    sub.CopyFrom(proto)
    if keep is not None:
        del sub.pieces[:]
        for i in keep:
            sub.pieces.add().CopyFrom(proto.pieces[i])
        sub.trainer_spec.vocab_size = len(sub.pieces)
    sp = processor_from_proto(sub)
    greedy = sum(len(ids) for ids in sp.encode(lines))
    v = vocab_of(sub)
    minimum = sum(min_tokens(v.normalize(line), v) for line in lines)
    return {"tokenizer": name, "added": k, "greedy_tokens": greedy, "min_tokens": minimum,
            "greedy_per_syllable": greedy / syllables, "min_per_syllable": minimum / syllables,
            "greedy_over_min": greedy / minimum - 1, "seconds": round(time.perf_counter() - t, 1)}


def prune(proto, n_base: int, sample: list[str], stops: list[int], eval_lines: list[str], syllables: int,
          log) -> list[dict]:
    """Count-optimal selection down to min(stops) added pieces; a row (minimum on the eval lines) at each stop."""
    added = range(n_base, len(proto.pieces))
    chars = {proto.pieces[i].piece for i in added if len(proto.pieces[i].piece) == 1}
    order = {proto.pieces[i].piece: i for i in added if len(proto.pieces[i].piece) > 1}
    keep = set(order)
    v = vocab_of(proto)
    rows = []
    stops = sorted({k - len(chars) for k in stops}, reverse=True)
    if stops[-1] < 0:
        raise SystemExit(f"--prune-to: the tokenizer's {len(chars)} added characters do not fit; give at least that")
    sample = [v.normalize(s) for s in sample]
    while True:
        t = time.perf_counter()
        uses: Counter = Counter()
        total = sum(min_tokens(s, v, uses) for s in sample)
        log(f"{len(keep) + len(chars)} added pieces: {total} tokens on the sample ({time.perf_counter() - t:.0f} s)")
        if len(keep) in stops:
            minimum = sum(min_tokens(v.normalize(line), v) for line in eval_lines)
            rows.append({"tokenizer": "count-optimal selection", "added": len(keep) + len(chars),
                         "sample_tokens": total, "min_tokens": minimum, "min_per_syllable": minimum / syllables})
            log(json.dumps(rows[-1]))
        if len(keep) <= stops[-1]:
            return rows
        loss = {}
        for p in keep:
            if uses[p] == 0:
                loss[p] = 0
                continue
            v.pieces.discard(p)
            loss[p] = uses[p] * (min_tokens(p, v) - 1)
            v.pieces.add(p)
        n = max(1, int(len(keep) * 0.15))
        nxt = next(s for s in stops if s < len(keep))
        n = min(n, len(keep) - nxt)
        for p in sorted(keep, key=lambda p: (loss[p], -order[p]))[:n]:  # ties: the latest merge goes first
            keep.discard(p)
            v.pieces.discard(p)


def main() -> int:
    from tiblocal.finetune.commands import parse_weights
    from tiblocal.text import count_syllables
    from tiblocal.vocab import base_pieces, read_lines, tokenizer_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tokenizers", nargs="*", help="tokenizer.model files, folders or 'bundled'")
    ap.add_argument("--text", type=Path, nargs="+", required=True, help="evaluation text (plain or .xz)")
    ap.add_argument("--sizes", default="", help="comma-separated added-piece counts of tiblocal extensions")
    ap.add_argument("--prune-from", default=None, help="a tiblocal extension with more added pieces than --prune-to")
    ap.add_argument("--prune-to", type=int, default=24000)
    ap.add_argument("--prune-text", type=Path, nargs="+", default=None, help="the text to select pieces on")
    ap.add_argument("--prune-chars", type=int, default=5_000_000, help="characters sampled from --prune-text")
    ap.add_argument("--weight", action="append", default=[], help="NAME=FACTOR for the pruning sample")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    try:
        sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--sizes {a.sizes!r}: expected added-piece counts like 24000,32000") from None
    weights = parse_weights(a.weight)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    lines = [line for line in read_lines(a.text) if line]
    syllables = sum(count_syllables(line) for line in lines)
    if syllables == 0:
        raise SystemExit(f"--text {' '.join(map(str, a.text))}: no Tibetan syllables; give Tibetan text")
    log(f"{len(lines)} lines, {syllables} syllables")
    if a.prune_from:  # checked before the measurements, which take minutes
        if not a.prune_text:
            raise SystemExit("--prune-from needs --prune-text (the text to select pieces on)")
        prune_base = base_pieces(a.prune_from)
        if prune_base is None:
            raise SystemExit(f"{a.prune_from}: --prune-from needs a tiblocal extension (tiblocal_vocab.json)")
        prune_proto = load_proto(tokenizer_model(a.prune_from))
        prune_added = len(prune_proto.pieces) - prune_base
        if prune_added <= a.prune_to:
            raise SystemExit(f"--prune-from {a.prune_from} adds {prune_added} pieces, not more than "
                             f"--prune-to {a.prune_to}; give a larger extension (vocab extend --add)")
    rows = []
    for spec in a.tokenizers:
        proto = load_proto(tokenizer_model(spec))
        n_base = base_pieces(spec)
        n_added = len(proto.pieces) - n_base if n_base is not None else None
        rows.append(measure(str(spec), n_added, proto, None, lines, syllables))
        log(json.dumps(rows[-1]))
        if sizes and n_base is None:
            log(f"{spec}: no --sizes rows (not a tiblocal extension: no tiblocal_vocab.json says where its base ends)")
            continue
        for k in sizes:
            if k >= n_added:
                continue  # the whole tokenizer's row, or more than it adds
            rows.append(measure(str(spec), k, proto, prefix_indices(proto, n_base, k), lines, syllables))
            log(json.dumps(rows[-1]))
    if a.prune_from:
        from tiblocal.finetune.vocab_extend import ExtendConfig, sample_corpus

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "sample.txt"
            sample_corpus(a.prune_text, ExtendConfig(add=1, sample_chars=a.prune_chars, weights=weights), out)
            sample = [line for line in out.read_text(encoding="utf-8").splitlines() if line]
        log(f"pruning sample: {len(sample)} lines, {sum(map(len, sample))} characters")
        stops = [k for k in sizes if a.prune_to <= k < prune_added] + [a.prune_to]
        rows += prune(prune_proto, prune_base, sample, stops, lines, syllables, log)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tokens per syllable on {syllables} syllables")
    for col in ("tokenizer", "added", "greedy", "minimum", "greedy / minimum"):
        table.add_column(col)
    for r in rows:
        g = r.get("greedy_per_syllable")
        added = "-" if r["added"] is None else str(r["added"])
        table.add_row(r["tokenizer"], added, f"{g:.4f}" if g else "-", f"{r['min_per_syllable']:.4f}",
                      f"{r['greedy_over_min']:+.1%}" if g else "-")
    Console(stderr=True).print(table)
    result = {"text": [str(t) for t in a.text], "lines": len(lines), "syllables": syllables, "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    from tiblocal.errors import TiblocalError

    try:
        sys.exit(main())
    except TiblocalError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
