"""Tokenizers: loading (a path or the name ``bundled``), Tibetan statistics, parity across runtimes,
and the initial embedding rows of pieces added by a vocabulary extension.

SentencePiece is the truth. An extended tokenizer made by ``tiblocal vocab extend`` carries
``tiblocal_vocab.json`` beside ``tokenizer.model``, which records how many pieces came from the base;
the base tokenizer is then exactly the first ``base_pieces`` pieces, so its figures can be shown
beside the extension's without the base file.
"""

from __future__ import annotations

import json
import lzma
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import InputFileError, ModelFormatError, TiblocalError
from .gguf_vocab import load_sentencepiece
from .jsonin import loads
from .text import count_syllables

BUNDLED_DIR = Path(__file__).parent / "data" / "tokenizer"
SIDECAR = "tiblocal_vocab.json"


def tokenizer_dir(spec: str | Path) -> Path:
    """The folder of a tokenizer given as ``bundled``, a folder, or a tokenizer.model file."""
    if str(spec) == "bundled":
        if not (BUNDLED_DIR / "tokenizer.model").is_file():
            raise InputFileError(f"this install has no bundled tokenizer ({BUNDLED_DIR}); give a tokenizer path")
        return BUNDLED_DIR
    p = Path(spec)
    if p.is_dir():
        if not (p / "tokenizer.model").is_file():
            raise InputFileError(f"{p} has no tokenizer.model; give a SentencePiece tokenizer folder or file")
        return p
    if p.is_file():
        return p.parent
    raise InputFileError(f"{p}: no such tokenizer; give a tokenizer.model, its folder, or 'bundled'")


def tokenizer_model(spec: str | Path) -> Path:
    p = Path(spec)
    return p if p.is_file() and str(spec) != "bundled" else tokenizer_dir(spec) / "tokenizer.model"


def read_sidecar(spec: str | Path) -> dict | None:
    """tiblocal_vocab.json, written with an extended tokenizer (base_pieces, added, ...), if there is one. It
    describes its folder's tokenizer.model: a model file of another name in that folder has none."""
    given = Path(spec)
    if str(spec) != "bundled" and given.is_file() and given.name != "tokenizer.model":
        return None
    side = tokenizer_dir(spec) / SIDECAR
    if not side.is_file():
        return None
    try:
        data = loads(side.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("base_pieces"), int):
            raise ValueError("no base_pieces number")
        return data
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError included
        raise ModelFormatError(f"{side} is damaged ({e}); write the tokenizer again") from None


def base_pieces(spec: str | Path) -> int | None:
    """How many leading pieces come from the base tokenizer (from tiblocal_vocab.json), if known."""
    side = read_sidecar(spec)
    return None if side is None else side["base_pieces"]


def processor_from_proto(proto):
    """A SentencePieceProcessor of a ModelProto held in memory."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto.SerializeToString())
    return sp


def truncated_model(model_file: Path, n_pieces: int, *, dummy_prefix: bool = True):
    """A SentencePieceProcessor of the first ``n_pieces`` pieces of ``model_file`` (the base of an extension)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    del proto.pieces[n_pieces:]
    proto.normalizer_spec.add_dummy_prefix = dummy_prefix
    return processor_from_proto(proto)


def read_lines(paths: Iterable[Path]) -> Iterator[str]:
    """Lines of plain or .xz text files, without their newline, nor the byte-order mark that Windows' Notepad writes
    at the start of a UTF-8 file (it would be the first line's first character: text to tokenize, JSON that does not
    parse)."""
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise InputFileError(f"{p}: no such text file")
        opener = lzma.open if p.suffix == ".xz" else open
        try:
            with opener(p, "rt", encoding="utf-8-sig") as f:
                for line in f:
                    yield line.rstrip("\n")
        except UnicodeDecodeError as e:
            raise InputFileError(f"{p} is not valid UTF-8 (byte offset {e.start}); save it as UTF-8") from None
        except (lzma.LZMAError, EOFError) as e:  # EOFError: an .xz file cut short
            raise InputFileError(f"{p} is not a valid .xz file ({e}); download or compress it again") from None


@dataclass
class TokenStats:
    lines: int
    characters: int
    syllables: int
    tokens: int
    byte_tokens: int

    @property
    def tokens_per_syllable(self) -> float | None:
        return self.tokens / self.syllables if self.syllables else None

    @property
    def chars_per_token(self) -> float | None:
        return self.characters / self.tokens if self.tokens else None

    @property
    def byte_fallback_share(self) -> float | None:
        return self.byte_tokens / self.tokens if self.tokens else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(
            tokens_per_syllable=self.tokens_per_syllable,
            chars_per_token=self.chars_per_token,
            byte_fallback_share=self.byte_fallback_share,
        )
        return d


def token_stats(sp, lines: Iterable[str]) -> TokenStats:
    is_byte = np.array([sp.IsByte(i) for i in range(sp.vocab_size())], dtype=bool)
    s = TokenStats(0, 0, 0, 0, 0)
    batch: list[str] = []

    def flush() -> None:
        for ids in sp.encode(batch):
            s.tokens += len(ids)
            s.byte_tokens += int(is_byte[ids].sum()) if ids else 0
        batch.clear()

    for line in lines:
        if not line:
            continue
        s.lines += 1
        s.characters += len(line)
        s.syllables += count_syllables(line)
        batch.append(line)
        if len(batch) >= 2048:
            flush()
    flush()
    return s


# --- parity ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    line_no: int
    runtime: str
    position: int  # first differing index
    expected: list[int]  # SentencePiece ids around the position
    got: list[int]
    text: str


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def load_hf_tokenizer(folder: Path):
    """What ``AutoTokenizer.from_pretrained(folder)`` gives, or None when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def parity(
    sp, lines: list[str], runtimes: dict[str, callable], *, max_report: int = 50
) -> tuple[dict[str, int], list[Mismatch]]:
    """Compare each runtime's ids (without BOS) with SentencePiece's on every line.

    Returns the mismatch count per runtime and the first ``max_report`` mismatches.
    """
    counts = {name: 0 for name in runtimes}
    report: list[Mismatch] = []
    for n, line in enumerate(lines, 1):
        ref = sp.encode(line)
        for name, encode in runtimes.items():
            got = encode(line)
            pos = first_difference(ref, got)
            if pos is not None:
                counts[name] += 1
                if len(report) < max_report:
                    report.append(Mismatch(n, name, pos, ref[max(0, pos - 2) : pos + 3], got[max(0, pos - 2) : pos + 3], line[:200]))
    return counts, report


# --- new embedding rows ---------------------------------------------------------------------------------


def init_new_rows(weight: np.ndarray, ext_model_file: Path, n_base: int) -> np.ndarray:
    """Rows for the pieces an extension added: each the mean of the base rows of the pieces the base
    tokenizer splits its text into. Rows ``n_base:`` are replaced; the base rows are unchanged.

    ``weight`` has one row per extended id (embed_tokens or lm_head, already resized). The base is the
    first ``n_base`` pieces of the extended model (every extension keeps the base pieces and ids).
    """
    ext = load_sentencepiece(ext_model_file)
    if weight.shape[0] < ext.vocab_size():
        raise TiblocalError(f"the weight has {weight.shape[0]} rows but {ext_model_file} has {ext.vocab_size()} pieces")
    # The piece's own text, without the dummy prefix a tokenizer adds at the start of a text.
    base = truncated_model(ext_model_file, n_base, dummy_prefix=False)
    out = np.array(weight, copy=True)
    base_rows = out[:n_base].astype(np.float32)
    fallback = base_rows.mean(0)
    for i in range(n_base, ext.vocab_size()):
        ids = base.encode(ext.IdToPiece(i).replace("\u2581", " "))
        out[i] = base_rows[ids].mean(0) if ids else fallback
    return out


# --- tokenizer.json ------------------------------------------------------------------------------------


def tokenizer_json(model_file: Path) -> dict:
    """A Hugging Face ``tokenizer.json`` that tokenizes exactly as the SentencePiece BPE model does.

    The layout is what transformers' Llama converter produces, with two changes. The merges are ranked
    by the SentencePiece score of the merged piece (SentencePiece's own rule), where the converter ranks
    them by id: with Llama-2 that puts "▁▁" (id 259, score -1e9) first instead of last, so the stock
    conversion splits runs of spaces differently. And the dummy prefix is a normalizer, as in the
    older Llama layout, so a text that starts with a space gets it too.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if proto.trainer_spec.model_type != 2:
        raise ModelFormatError(f"{model_file} is not a BPE SentencePiece model; tokenizer.json is written for BPE models")
    T = pb.ModelProto.SentencePiece.Type
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    ranked = []
    for i, p in enumerate(proto.pieces):
        if p.type not in (T.NORMAL, T.USER_DEFINED) or len(p.piece) < 2:
            continue
        for k in range(1, len(p.piece)):
            a, b = p.piece[:k], p.piece[k:]
            if a in vocab and b in vocab:
                ranked.append((-p.score, i, k, a, b))
    ranked.sort()
    special = [
        {"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i, p in enumerate(proto.pieces)
        if p.type in (T.CONTROL, T.UNKNOWN)
    ]
    bos = proto.trainer_spec.bos_id
    bos_piece = proto.pieces[bos].piece
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        # SentencePiece's dummy prefix is added to every text, also one that starts with a space; the
        # Metaspace pre-tokenizer transformers uses now skips it then, so the older Llama normalizer is used.
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos_piece, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos_piece, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos_piece, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos_piece: {"id": bos_piece, "ids": [bos], "tokens": [bos_piece]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE", "dropout": None, "unk_token": proto.pieces[proto.trainer_spec.unk_id].piece,
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
            "ignore_merges": False, "vocab": vocab, "merges": [[a, b] for *_, a, b in ranked],
        },
    }


def write_tokenizer_json(folder: Path) -> Path:
    path = Path(folder) / "tokenizer.json"
    path.write_text(json.dumps(tokenizer_json(Path(folder) / "tokenizer.model"), ensure_ascii=False), encoding="utf-8")
    return path
