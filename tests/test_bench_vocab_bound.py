"""benchmarks/bench_vocab_bound.py: its minimum is the shortest segmentation, never above SentencePiece's count, and its
count-optimal selection keeps to the pieces it was given."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

from conftest import DATA

from tiblocal.vocab import load_sentencepiece, read_lines, token_stats, tokenizer_model

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vocab_bound.py"
TEXT = DATA / "tibetan_sample.txt"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_vocab_bound", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks itself up there
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)


def _brute_force(s: str, v) -> int:
    """The fewest tokens over every way of cutting ``s`` (2^(n-1) of them)."""
    best = None
    for cuts in itertools.product((False, True), repeat=len(s) - 1):
        parts, start = [], 0
        for i, cut in enumerate(cuts, 1):
            if cut:
                parts.append(s[start:i])
                start = i
        parts.append(s[start:])
        if all(p in v.pieces or len(p) == 1 for p in parts):
            n = sum(1 if p in v.pieces else v.char_cost(p) for p in parts)
            best = n if best is None else min(best, n)
    return best


def test_min_tokens_is_the_shortest_segmentation() -> None:
    m = _bench_module()
    v = m.Vocab({"ab", "abc", "cd", "bcd", "a", "b", "c", "d", "\u2581a", "\u2581"}, 3, True, True)
    for s in ["abcd", "\u2581abcd", "abcdx", "aébcdabcd", "dcba", "\u2581ab\u2581cd"]:
        assert m.min_tokens(s, v) == _brute_force(s, v), s
    assert m.min_tokens("é", v) == 2  # two byte pieces
    uses = m.Counter()
    assert m.min_tokens("abcdab", v, uses) == 3 and sum(uses.values()) == 3
    assert set(uses) <= v.pieces


def test_the_bench_on_the_bundled_tokenizer(tmp_path: Path) -> None:
    p = _run("bundled", "--sizes", "8000,30000", "--text", str(TEXT), "--json", str(tmp_path / "r.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["tokenizer"], r["added"]) for r in rows] == [("bundled", 24000), ("bundled", 8000)]  # 30000: not there
    lines = list(read_lines([TEXT]))
    assert rows[0]["greedy_tokens"] == token_stats(load_sentencepiece(tokenizer_model("bundled")), lines).tokens
    for r in rows:
        assert 0 < r["min_tokens"] <= r["greedy_tokens"]
    assert rows[1]["min_tokens"] > rows[0]["min_tokens"]


def test_count_optimal_selection_keeps_to_its_pieces(tmp_path: Path) -> None:
    p = _run("bundled", "--text", str(TEXT), "--sizes", "23500", "--prune-from", "bundled", "--prune-to", "23000",
             "--prune-text", str(TEXT), "--prune-chars", "100000", "--json", str(tmp_path / "r.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    full = rows[0]
    sel = [r for r in rows if r["tokenizer"] == "count-optimal selection"]
    assert [r["added"] for r in sel] == [23500, 23000]
    # a subset of the pieces can never spell the text in fewer tokens, and dropping more never helps
    assert full["min_tokens"] <= sel[0]["min_tokens"] <= sel[1]["min_tokens"]
    assert sel[0]["sample_tokens"] <= sel[1]["sample_tokens"]


def test_bench_refusals(tmp_path: Path) -> None:
    english = tmp_path / "en.txt"
    english.write_text("no Tibetan here\n")
    p = _run("bundled", "--text", str(english))
    assert p.returncode != 0 and "no Tibetan syllables" in p.stderr
    p = _run("bundled", "--text", str(TEXT), "--prune-from", "bundled", "--prune-to", "30000", "--prune-text", str(TEXT))
    assert p.returncode != 0 and "not more than --prune-to 30000" in p.stderr
    assert '"tokenizer": "bundled"' not in p.stderr  # refused before any measurement
    p = _run("bundled", "--text", str(TEXT), "--weight", "derge_kangyur:0.3")
    assert p.returncode == 1 and "expected NAME=FACTOR" in p.stderr.splitlines()[-1]
    p = _run("bundled", "--text", str(TEXT), "--sizes", "50")
    assert p.returncode != 0 and "added characters do not fit" in p.stderr
    bogus = tmp_path / "tokenizer.model"
    bogus.write_bytes(b"not a model")
    p = _run(str(bogus), "--text", str(TEXT))
    assert p.returncode == 1 and "is not a SentencePiece model" in p.stderr.splitlines()[-1]
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer_model("bundled").read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = True
    squeezing = tmp_path / "squeeze.model"
    squeezing.write_bytes(proto.SerializeToString())
    p = _run(str(squeezing), "--text", str(TEXT))
    assert p.returncode == 1 and "remove_extra_whitespaces True" in p.stderr.splitlines()[-1]
