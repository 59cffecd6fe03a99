"""Vocabulary extension: base kept, Tibetan only, the same ids in SentencePiece, llama.cpp and Hugging Face."""

from __future__ import annotations

import re

import json
import lzma
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2 as pb

from conftest import DATA, run_cli, shared_data, train_tiny_tokenizer
from tiblocal.engine import LlamaVocab
from tiblocal.errors import InputFileError, ModelFormatError, TiblocalError
from tiblocal.finetune.vocab_extend import ExtendConfig, extend_vocabulary
from tiblocal.gguf_vocab import load_sentencepiece, write_vocab_gguf
from tiblocal.vocab import init_new_rows, load_hf_tokenizer, parity, tokenizer_dir, truncated_model

TIBETAN = DATA / "tibetan_sample.txt"
ENGLISH = DATA / "english_sample.txt"
NON_TIBETAN = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello  world   three   spaces",
    "  leading spaces",
    "trailing spaces  ",
    "中文测试，还有標點符號。",
    "123 4567 89",
    "tabs\tand\nnewlines\n\n",
    "     ",
    "Führer ½ émigré",
]
MIXED = ["བཀྲ་ཤིས་བདེ་ལེགས། Hello 2024!", "ང་ཚོ་ལྷ་སར་  འགྲོ་གི་ཡོད།", " བོད་ཡིག", "ཀྵ་ཧཱུྃ་ཨོཾ"]
# the special tokens' literal text is text to SentencePiece and llama.cpp; Hugging Face must agree
SPECIAL_LITERALS = ["<s>", "</s>", "<unk>", "a </s> b", "བོད་<s>ཡིག</s>", " <s>", "<s><s>", "</s>\n<s>"]


def _proto(path: Path):
    m = pb.ModelProto()
    m.ParseFromString(Path(path).read_bytes())
    return m


def _dev_lines(n_per_file: int = 150) -> list[str]:
    lines = []
    for f in sorted(shared_data("corpus", "dev").glob("*.txt.xz")):
        with lzma.open(f, "rt", encoding="utf-8") as fh:
            lines += [l.rstrip("\n") for l in islice(fh, n_per_file)]
    return lines


def _llama_cpp_test_vectors() -> list[str]:
    inp = shared_data("tokenizers", "llama-spm-gguf", "ggml-vocab-llama-spm.gguf.inp")
    return inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")


def _runtimes(folder: Path, tmp: Path) -> dict:
    gguf_path = tmp / "vocab.gguf"
    write_vocab_gguf(folder, gguf_path)
    vocab = LlamaVocab(gguf_path)
    out = {"llama.cpp": lambda t: vocab.tokenize(t, add_bos=False, special=False)}
    hf = load_hf_tokenizer(folder)
    if hf is not None:
        out["huggingface"] = lambda t: hf.encode(t, add_special_tokens=False)
    return out


@pytest.fixture(scope="module")
def small_ext(tmp_path_factory, tiny_tokenizer) -> Path:
    """The tiny base extended by 300 pieces from the Tibetan sample."""
    out = tmp_path_factory.mktemp("ext") / "tok"
    extend_vocabulary(tiny_tokenizer, [TIBETAN], out, ExtendConfig(add=300, sample_chars=10_000_000))
    return out


@pytest.fixture(scope="module")
def llama2_ext(tmp_path_factory) -> Path:
    """Llama-2's real tokenizer extended by 2,000 pieces from the shared corpus (modern written Tibetan)."""
    base = shared_data("tokenizers", "llama2", "tokenizer.model")
    corpus = shared_data("corpus", "train", "esukhia_nanhai_written.txt.xz")
    out = tmp_path_factory.mktemp("ext2") / "tok"
    extend_vocabulary(base, [corpus], out, ExtendConfig(add=2000, sample_chars=1_500_000, eval_chars=200_000))
    return out


def test_base_pieces_ids_and_scores_are_kept(small_ext, tiny_tokenizer) -> None:
    base, ext = _proto(tiny_tokenizer), _proto(small_ext / "tokenizer.model")
    assert len(ext.pieces) == len(base.pieces) + 300
    for a, b in zip(base.pieces, ext.pieces):
        assert (a.piece, a.score, a.type) == (b.piece, b.score, b.type)
    added = ext.pieces[len(base.pieces):]
    assert all(all("\u0f00" <= c <= "\u0fff" for c in p.piece.lstrip("\u2581")) for p in added)
    scores = [p.score for p in added]
    assert max(scores) < min(p.score for p in base.pieces if p.score > -1e8)
    assert all(x > y for x, y in zip(scores, scores[1:]))  # every added piece has its own rank
    side = json.loads((small_ext / "tiblocal_vocab.json").read_text())
    assert side == {"base_pieces": 700, "added": 300}


def test_round_trip_and_fewer_tokens(small_ext, tiny_tokenizer) -> None:
    ext, base = load_sentencepiece(small_ext / "tokenizer.model"), load_sentencepiece(tiny_tokenizer)
    lines = TIBETAN.read_text(encoding="utf-8").splitlines()[:20] + MIXED + NON_TIBETAN
    for line in lines:
        assert ext.decode(ext.encode(line)) == line
    tib = "\n".join(TIBETAN.read_text(encoding="utf-8").splitlines()[:20])
    assert len(ext.encode(tib)) < 0.8 * len(base.encode(tib))


def test_lines_without_tibetan_tokenize_as_with_the_base(small_ext, tiny_tokenizer) -> None:
    ext, base = load_sentencepiece(small_ext / "tokenizer.model"), load_sentencepiece(tiny_tokenizer)
    for line in NON_TIBETAN + ENGLISH.read_text(encoding="utf-8").splitlines():
        assert ext.encode(line) == base.encode(line), line


def test_parity_on_the_small_extension(small_ext, tmp_path: Path) -> None:
    sp = load_sentencepiece(small_ext / "tokenizer.model")
    lines = TIBETAN.read_text(encoding="utf-8").splitlines() + MIXED + NON_TIBETAN + SPECIAL_LITERALS
    counts, report = parity(sp, lines, _runtimes(small_ext, tmp_path))
    assert "huggingface" in counts
    assert counts == {k: 0 for k in counts}, report[:3]


def test_pieces_that_span_spaces_keep_parity_and_the_base(tmp_path: Path, tiny_tokenizer) -> None:
    """--no-split-whitespace: pieces such as "ན།▁།" (the shad, space, shad of verse) are added; every runtime still
    gives the same ids, lines without Tibetan are untouched, base ids are kept, and the new pieces are used."""
    out = tmp_path / "spans"
    extend_vocabulary(tiny_tokenizer, [TIBETAN], out, ExtendConfig(add=300, sample_chars=10_000_000, split_by_whitespace=False))
    base, ext = _proto(tiny_tokenizer), _proto(out / "tokenizer.model")
    assert [(p.piece, p.score) for p in base.pieces] == [(p.piece, p.score) for p in ext.pieces[: len(base.pieces)]]
    spans = [p.piece for p in ext.pieces[len(base.pieces):] if "\u2581" in p.piece[1:]]
    assert "།\u2581།" in spans
    assert json.loads((out / "report.json").read_text())["split_by_whitespace"] is False
    sp, sp_base = load_sentencepiece(out / "tokenizer.model"), load_sentencepiece(tiny_tokenizer)
    for line in NON_TIBETAN + ENGLISH.read_text(encoding="utf-8").splitlines():
        assert sp.encode(line) == sp_base.encode(line), line
    lines = TIBETAN.read_text(encoding="utf-8").splitlines() + MIXED + NON_TIBETAN + SPECIAL_LITERALS
    assert all(sp.decode(sp.encode(line)) == line for line in lines)
    counts, report = parity(sp, lines, _runtimes(out, tmp_path))
    assert counts == {k: 0 for k in counts} and "huggingface" in counts, report[:3]
    used = {p for line in TIBETAN.read_text(encoding="utf-8").splitlines() for p in sp.encode(line, out_type=str)}
    assert used & set(spans)  # the runtimes do reach them (the dev-split gain is measured in the README)


@pytest.mark.shared_data
def test_llama2_extension_parity_on_dev_text_and_llama_cpp_vectors(llama2_ext, tmp_path: Path) -> None:
    sp = load_sentencepiece(llama2_ext / "tokenizer.model")
    lines = _dev_lines() + _llama_cpp_test_vectors() + MIXED + NON_TIBETAN + SPECIAL_LITERALS
    counts, report = parity(sp, lines, _runtimes(llama2_ext, tmp_path))
    assert counts == {k: 0 for k in counts}, report[:3]


@pytest.mark.shared_data
def test_llama2_extension_keeps_english_and_chinese(llama2_ext) -> None:
    base = load_sentencepiece(shared_data("tokenizers", "llama2", "tokenizer.model"))
    ext = load_sentencepiece(llama2_ext / "tokenizer.model")
    for line in NON_TIBETAN + _llama_cpp_test_vectors():
        assert ext.encode(line) == base.encode(line)
    # the base derived from the extension's first pieces is the real base
    derived = truncated_model(llama2_ext / "tokenizer.model", 32000)
    assert all(derived.encode(l) == base.encode(l) for l in _dev_lines(20))


@pytest.mark.shared_data
def test_llama2_extension_report(llama2_ext) -> None:
    report = json.loads((llama2_ext / "report.json").read_text())
    assert report["base_pieces"] == 32000 and report["added_pieces"] == 2000
    base, ext = report["eval"]["base"], report["eval"]["extended"]
    assert base["tokens_per_syllable"] > 4 and base["byte_fallback_share"] > 0.3
    assert ext["tokens_per_syllable"] < 1.2 and ext["byte_fallback_share"] < 0.01


def test_stats_and_parity_commands(small_ext) -> None:
    p = run_cli("vocab", "stats", str(small_ext), "--text", str(TIBETAN), "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["base_pieces"] == 700
    assert d["stats"]["tokenizer"]["tokens_per_syllable"] < d["stats"]["base"]["tokens_per_syllable"]
    p = run_cli("vocab", "parity", str(small_ext), "--text", str(TIBETAN), str(ENGLISH), "--json")
    assert p.returncode == 0, p.stderr
    assert set(json.loads(p.stdout)["mismatching_lines"].values()) == {0}


def test_parity_on_a_model_file_not_named_tokenizer_model_is_refused(small_ext, tiny_tokenizer, tmp_path) -> None:
    """The runtimes read a folder: `vocab parity dir/other.model` compared dir/tokenizer.model instead (another
    tokenizer, without a word), or said "tokenizer.model: no such tokenizer file"."""
    folder = tmp_path / "tk"
    shutil.copytree(small_ext, folder)
    shutil.copyfile(tiny_tokenizer, folder / "other.model")
    p = run_cli("vocab", "parity", str(folder / "other.model"), "--text", str(TIBETAN))
    err = p.stderr.decode()
    assert p.returncode == 1 and f"{folder / 'other.model'}: vocab parity compares a tokenizer folder's files" in err
    assert run_cli("vocab", "parity", str(folder / "tokenizer.model"), "--text", str(TIBETAN)).returncode == 0
    # the folder's tiblocal_vocab.json describes its tokenizer.model, not other.model: `vocab stats` showed a "base
    # (700 pieces)" row cut from other.model, the sidecar's count
    stats = json.loads(run_cli("vocab", "stats", str(folder / "other.model"), "--text", str(TIBETAN), "--json").stdout)
    assert stats["base_pieces"] is None and list(stats["stats"]) == ["tokenizer"]
    stats = json.loads(run_cli("vocab", "stats", str(folder), "--text", str(TIBETAN), "--json").stdout)
    assert stats["base_pieces"] == 700 and list(stats["stats"]) == ["tokenizer", "base"]


def test_parity_command_fails_on_a_mismatch(small_ext, tmp_path: Path) -> None:
    """A tokenizer.json from another tokenizer: Hugging Face disagrees, and parity says where (exit 1)."""
    bad = tmp_path / "bad"
    shutil.copytree(small_ext, bad)
    other = train_tiny_tokenizer(tmp_path / "other", vocab_size=1000)
    from tiblocal.vocab import write_tokenizer_json

    shutil.copyfile(other, bad / "tokenizer.model")
    write_tokenizer_json(bad)
    shutil.copyfile(small_ext / "tokenizer.model", bad / "tokenizer.model")
    p = run_cli("vocab", "parity", str(bad), "--text", str(TIBETAN))
    assert p.returncode == 1
    assert "first difference at token" in p.stdout.decode()


def test_new_rows_are_the_mean_of_their_base_pieces(small_ext) -> None:
    ext = load_sentencepiece(small_ext / "tokenizer.model")
    base = truncated_model(small_ext / "tokenizer.model", 700, dummy_prefix=False)
    w = np.random.default_rng(0).standard_normal((ext.vocab_size(), 16)).astype(np.float32)
    out = init_new_rows(w, small_ext / "tokenizer.model", 700)
    assert np.array_equal(out[:700], w[:700])
    for i in (700, 750, ext.vocab_size() - 1):
        ids = base.encode(ext.IdToPiece(i).replace("\u2581", " "))
        assert len(ids) >= 2 and all(t < 700 for t in ids)
        np.testing.assert_allclose(out[i], w[ids].mean(0), rtol=1e-6)


# --- bad input ----------------------------------------------------------------------------------------


def test_base_that_is_not_sentencepiece(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_text("nope")
    with pytest.raises(ModelFormatError, match="is not a SentencePiece model"):
        extend_vocabulary(bad, [TIBETAN], tmp_path / "out", ExtendConfig(add=10))


def test_empty_corpus(tmp_path: Path, tiny_tokenizer) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(InputFileError, match="the corpus is empty"):
        extend_vocabulary(tiny_tokenizer, [empty], tmp_path / "out", ExtendConfig(add=10))
    assert not (tmp_path / "out").exists()


def test_more_pieces_than_the_corpus_gives(tmp_path: Path, tiny_tokenizer) -> None:
    p = run_cli("vocab", "extend", "--base", str(tiny_tokenizer), "--corpus", str(TIBETAN), "--add", "40000",
                "--out", str(tmp_path / "out"))
    assert p.returncode == 1
    err = p.stderr.decode()
    assert "the corpus can give at most" in err and "ask for fewer pieces or give more text" in err
    assert not (tmp_path / "out").exists()


def test_more_pieces_than_sentencepiece_can_count(tmp_path: Path, tiny_tokenizer) -> None:
    """A count whose SentencePiece vocabulary passes its int32 is one line before the corpus is read (it crashed in
    SentencePiece's option parser); one just inside it gets the corpus's own bound."""
    for flags, line in ((["--add", "99999999999"], "--add 99999999999: more pieces than SentencePiece can train (it "
                         "would be asked for 115,000,000,298; its vocabulary size is a 32-bit integer, at most "
                         "2,147,483,647); ask for fewer pieces"),
                        (["--add", "10", "--curve", "5,2000000000"], "--curve 2000000000: more pieces than"),
                        (["--add", "1867345000"], "the corpus can give at most")):
        p = run_cli("vocab", "extend", "--base", str(tiny_tokenizer), "--corpus", str(TIBETAN), *flags,
                    "--out", str(tmp_path / "out"))
        assert p.returncode == 1 and line in p.stderr.decode() and len(p.stderr.decode().splitlines()) == 1
        assert not (tmp_path / "out").exists()


def test_a_weight_without_a_factor(tmp_path: Path, tiny_tokenizer) -> None:
    p = run_cli("vocab", "extend", "--base", str(tiny_tokenizer), "--corpus", str(TIBETAN), "--add", "10",
                "--weight", "derge_kangyur", "--out", str(tmp_path / "out"))
    assert p.returncode == 1
    assert "--weight 'derge_kangyur': expected NAME=FACTOR" in p.stderr.decode()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weight,line", [
    ("tibetan_sample=nan", "--weight tibetan_sample=nan: expected a factor from 0 to 1000"),
    ("tibetan_sample=-1", "--weight tibetan_sample=-1: expected a factor from 0 to 1000"),
    ("tibetan_sample=1e308", "--weight tibetan_sample=1e+308: expected a factor from 0 to 1000"),  # sampled nothing
    ("tibetan_sampel=0.3", "--weight tibetan_sampel=0.3: no --corpus file is named 'tibetan_sampel'; expected one of "
                           "tibetan_sample"),  # was ignored without a word
    ("tibetan_sample=0", "every --corpus file with text has --weight 0"),  # was "the corpus is empty"
])
def test_weights_are_checked_before_the_corpus_is_sampled(tmp_path: Path, tiny_tokenizer, weight, line) -> None:
    p = run_cli("vocab", "extend", "--base", str(tiny_tokenizer), "--corpus", str(TIBETAN), "--add", "10",
                "--weight", weight, "--out", str(tmp_path / "out"))
    assert p.returncode == 1 and line in p.stderr.decode() and len(p.stderr.decode().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_corpus_within_the_sample_budget_is_measured_on_lines_kept_out(tmp_path: Path, tiny_tokenizer) -> None:
    """The default budget (50M characters) takes every line of a small corpus: no line was left to measure on, and the
    table crashed at the end (None formatted as a number) after the folder was written. About 5% of the lines are
    now kept out of the sample for the report; with --eval the whole corpus is sampled."""
    p = run_cli("vocab", "extend", "--base", str(tiny_tokenizer), "--corpus", str(TIBETAN), "--add", "50",
                "--out", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr.decode()
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    held = report["eval"]["extended"]
    assert held["lines"] > 0 and held["tokens_per_syllable"] is not None
    assert f"{held['tokens_per_syllable']:.3f}" in p.stdout.decode()
    assert report["sample_characters"] < sum(len(x) for x in TIBETAN.read_text(encoding="utf-8").splitlines())
    # text with no syllables to measure (given with --eval): "-" in the table and a line saying why, not a crash
    latin = tmp_path / "latin.txt"
    latin.write_text("no Tibetan here\n", encoding="utf-8")
    p = run_cli("vocab", "extend", "--base", str(tiny_tokenizer), "--corpus", str(TIBETAN), "--add", "50",
                "--eval", str(latin), "--out", str(tmp_path / "out2"))
    assert p.returncode == 0, p.stderr.decode()
    assert "no Tibetan syllables to measure on (1 lines)" in p.stdout.decode()
    report = json.loads((tmp_path / "out2" / "report.json").read_text(encoding="utf-8"))
    assert report["sample_characters"] == sum(len(x) for x in TIBETAN.read_text(encoding="utf-8").splitlines())


def test_retries_that_outgrow_the_corpus_train_at_its_bound_and_say_what_it_gives(tmp_path, tiny_tokenizer,
                                                                                     monkeypatch) -> None:
    """A base that already holds the corpus's common pieces makes the first training give few new ones; the retries
    grow the vocabulary and passed the corpus's bound ("16249 pieces but 19735 were needed for --add 50", though 50
    were there). Past it, one training at the bound now counts what the corpus gives."""
    import tiblocal.finetune.vocab_extend as ve

    sizes = []
    train, pieces = ve.train_sentencepiece, ve.new_pieces
    monkeypatch.setattr(ve, "train_sentencepiece", lambda sample, size, *a: sizes.append(size) or train(sample, size, *a))
    monkeypatch.setattr(ve, "new_pieces", lambda *a, **k: pieces(*a, **k)[:10])  # a corpus that gives 10 at most
    with pytest.raises(TiblocalError, match=r"^the corpus gives only 10 new Tibetan pieces; ask for at most 10 with"):
        ve.extend_vocabulary(tiny_tokenizer, [TIBETAN], tmp_path / "out", ExtendConfig(add=50, sample_chars=10**6),
                             eval_files=[TIBETAN])
    assert sizes[0] == ve._sp_vocab_size(50) and sizes[-1] < sizes[-2]  # the last at the bound SentencePiece named
    assert not (tmp_path / "out").exists()


def test_non_tibetan_corpus(tmp_path: Path, tiny_tokenizer) -> None:
    with pytest.raises(InputFileError, match=r"the corpus is not Tibetan: 0% of its characters"):
        extend_vocabulary(tiny_tokenizer, [ENGLISH], tmp_path / "out", ExtendConfig(add=10))


def test_unknown_tokenizer_names() -> None:
    with pytest.raises(InputFileError, match="no such tokenizer"):
        tokenizer_dir("/nonexistent/tok")


# --- tiblocal check -----------------------------------------------------------------------------------


def test_check_finds_vocabulary_disagreements(tmp_path: Path, tiny_hf, tiny_gguf, small_ext) -> None:
    assert run_cli("check", str(tiny_hf)).returncode == 0
    assert run_cli("check", str(tiny_gguf)).returncode == 0
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf, hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["vocab_size"] = 1000
    (hf / "config.json").write_text(json.dumps(cfg))
    p = run_cli("check", str(hf))
    assert p.returncode == 1
    assert "vocab_size is 1000 but embed_tokens has 700 rows; set vocab_size to 700" in p.stderr.decode()
    cfg["vocab_size"] = 700
    (hf / "config.json").write_text(json.dumps(cfg))
    shutil.copyfile(small_ext / "tokenizer.model", hf / "tokenizer.model")  # 1000 pieces for 700 rows
    p = run_cli("check", str(hf), "--json")
    assert p.returncode == 1
    assert "has 1000 pieces but embed_tokens has 700 rows" in json.loads(p.stdout)["problems"][0]


def test_bundled_tokenizer_gives_the_same_ids_in_every_runtime(tmp_path: Path) -> None:
    """SentencePiece, llama.cpp and Hugging Face give the bundled tokenizer's ids on Tibetan excerpts shipped with the
    tests, llama.cpp's own tokenizer test texts (a copy in tests/data), mixed and non-Tibetan lines; and on 100 lines
    of each dev file where the shared data folder is present."""
    folder = tokenizer_dir("bundled")
    sp = load_sentencepiece(folder / "tokenizer.model")
    lines = [l for l in TIBETAN.read_text(encoding="utf-8").splitlines() if l.strip()]
    # whole lines, and each shad-ended sentence on its own (more starts of a text, where the dummy prefix acts)
    shipped = lines + [p.strip() for l in lines for p in re.split(r"(?<=།)\s+", l) if p.strip()]
    shipped += (DATA / "english_sample.txt").read_text(encoding="utf-8").splitlines()
    vectors = (DATA / "llama_cpp_vocab_vectors.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    try:
        shipped += _dev_lines(100)
    except pytest.skip.Exception:
        pass  # without ../shared: the shipped lines alone
    counts, report = parity(sp, shipped + vectors + MIXED + NON_TIBETAN + SPECIAL_LITERALS, _runtimes(folder, tmp_path))
    assert counts == {k: 0 for k in counts}, report[:3]
    assert len(shipped) > 300


def test_special_token_literals_are_text_in_hugging_face_too() -> None:
    """A line holding the literal "<s>" or "</s>" is text to SentencePiece and llama.cpp; AutoTokenizer on the bundled
    folder reads it the same way (tokenizer_config's split_special_tokens), and BOS and EOS still come as ids."""
    transformers = pytest.importorskip("transformers")
    folder = tokenizer_dir("bundled")
    sp = load_sentencepiece(folder / "tokenizer.model")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    for line in SPECIAL_LITERALS:
        assert hf(line, add_special_tokens=False)["input_ids"] == sp.encode(line), line
        assert 1 not in sp.encode(line) and 2 not in sp.encode(line)
    assert hf("བོད་")["input_ids"][0] == sp.bos_id() == hf.bos_token_id
    assert hf.eos_token_id == sp.eos_id() and hf.decode([sp.bos_id(), *sp.encode("བོད་"), sp.eos_id()], skip_special_tokens=True) == "བོད་"
