"""`tiblocal quantize` (llama.cpp's quantizer) and `tiblocal eval` (perplexity, KL) on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DATA, run_cli
from tiblocal.errors import InputFileError, TiblocalError
from tiblocal.gguf_file import read_gguf
from tiblocal.quantize.evaluate import GGUFSource, LogitSource, compare, read_text, windows
from tiblocal.quantize.gguf_quant import quantize_gguf

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"]
TEXT = DATA / "tibetan_sample.txt"


@pytest.fixture(scope="module")
def quants(tmp_path_factory, tiny256) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("q")
    results = quantize_gguf(tiny256[1], out, TYPES, threads=2)
    return {r.type: r.path for r in results}


def test_every_listed_type_quantizes_loads_and_says_its_type(quants) -> None:
    from tiblocal.engine import Engine, EngineConfig

    assert set(quants) == set(TYPES)
    for qtype, path in quants.items():
        info = read_gguf(path)
        assert info.file_type == qtype
        assert info.metadata["general.quantization_version"] >= 2
        with Engine(path, EngineConfig(ctx=64)) as e:
            assert e.tokenize("བཀྲ་ཤིས་")
    assert read_gguf(quants["Q4_K_M"]).tensor_type_counts().get("Q4_K", 0) > 0


def test_q8_0_is_closer_to_f32_than_q4_k_m(tiny256, quants) -> None:
    text = read_text([TEXT])
    ref = GGUFSource(tiny256[1], ctx=128, threads=2, n_gpu_layers=0)
    kl = {}
    for qtype in ("Q8_0", "Q4_K_M"):
        q = GGUFSource(quants[qtype], ctx=128, threads=2, n_gpu_layers=0)
        kl[qtype] = compare(ref, q, text, 128, max_windows=8).mean_kl
        q.close()
    assert 0 <= kl["Q8_0"] < kl["Q4_K_M"]


def test_ppl_of_gguf_f32_equals_ppl_of_its_hf_model(tiny256) -> None:
    pytest.importorskip("torch")
    p_gguf = run_cli("eval", "ppl", str(tiny256[1]), "--text", str(TEXT), "--ctx", "128", "--max-windows", "6", "--json")
    p_hf = run_cli("eval", "ppl", str(tiny256[0]), "--text", str(TEXT), "--ctx", "128", "--max-windows", "6", "--json")
    assert p_gguf.returncode == 0 and p_hf.returncode == 0, (p_gguf.stderr, p_hf.stderr)
    a, b = json.loads(p_gguf.stdout), json.loads(p_hf.stdout)
    assert a["tokens_scored"] == b["tokens_scored"] == 6 * 63
    assert abs(a["ppl"] - b["ppl"]) / b["ppl"] < 1e-4
    # a window exactly as long as llama.cpp's context (256 is not padded further) fits: scoring needs no extra slot
    p = run_cli("eval", "ppl", str(tiny256[1]), "--text", str(TEXT), "--ctx", "256", "--max-windows", "1", "--json")
    assert p.returncode == 0, p.stderr.decode()
    assert json.loads(p.stdout)["tokens_scored"] == 127


def test_compare_cli(tiny256, quants) -> None:
    p = run_cli("eval", "compare", str(tiny256[1]), str(quants["Q8_0"]), "--text", str(TEXT), "--ctx", "64", "--max-windows", "4", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["windows"] == 4 and 0.5 < r["top1_agreement"] <= 1 and r["mean_kl"] >= 0
    assert abs(r["delta_ppl_pct"]) < 5


class _Fixed(LogitSource):
    """Logits from a seeded table: position p of any window gets row p (plus noise for the 'quantized' one)."""

    def __init__(self, name: str, noise: float) -> None:
        import numpy as np

        self.name, self.n_vocab, self.bos_id = name, 16, 1
        rng = np.random.default_rng(0)
        self.table = rng.normal(size=(32, 16)).astype(np.float32)
        self.table += noise * rng.normal(size=(32, 16)).astype(np.float32)

    def tokenize(self, text: str) -> list[int]:
        return [i % 16 for i in range(len(text))]

    def logits(self, ids):
        return self.table[: len(ids)]


def test_compare_gives_the_uncertainty_of_delta_ppl() -> None:
    import math

    import numpy as np

    ref, quant = _Fixed("ref", 0.0), _Fixed("q", 0.3)
    text = "x" * 200
    r = compare(ref, quant, text, 32, max_windows=4)
    # by hand: the per-token differences of log-probabilities over the same scored positions
    d = []
    for win in windows(ref.tokenize(text), 32, 1, 4):
        lr = ref.table - np.log(np.exp(ref.table).sum(-1, keepdims=True))
        lq = quant.table - np.log(np.exp(quant.table).sum(-1, keepdims=True))
        for pos in range(16, 31):
            d.append(lr[pos, win[pos + 1]] - lq[pos, win[pos + 1]])
    d = np.asarray(d, dtype=np.float64)
    assert r.tokens_scored == len(d)
    assert r.delta_ppl_pct == pytest.approx(100 * (math.exp(d.mean()) - 1), rel=1e-4)
    assert r.delta_ppl_pct_se == pytest.approx(100 * math.exp(d.mean()) * d.std(ddof=0) / math.sqrt(len(d) - 1), rel=1e-3)
    assert compare(ref, ref, text, 32, max_windows=4).delta_ppl_pct_se == 0


def test_windows_are_llama_perplexity_windows() -> None:
    wins = list(windows(list(range(10, 30)), 8, bos_id=1))
    assert wins == [[1, 11, 12, 13, 14, 15, 16, 17], [1, 19, 20, 21, 22, 23, 24, 25]]
    with pytest.raises(TiblocalError, match="fewer than one window of --ctx 64"):
        list(windows(list(range(10)), 64, 1))


def test_several_types_with_a_name_pattern(tmp_path: Path, tiny256) -> None:
    p = run_cli("quantize", str(tiny256[1]), "--type", "q4_0,Q8_0", "--out", str(tmp_path / "m-{type}.gguf"), "--json")
    assert p.returncode == 0, p.stderr
    assert [r["type"] for r in json.loads(p.stdout)] == ["Q4_0", "Q8_0"]
    assert (tmp_path / "m-Q4_0.gguf").is_file() and (tmp_path / "m-Q8_0.gguf").is_file()


def test_output_and_embedding_tensor_types(tmp_path: Path, tiny256) -> None:
    out = tmp_path / "q.gguf"
    quantize_gguf(tiny256[1], out, ["Q4_K_M"], output_tensor_type="Q8_0", token_embedding_type="F16")
    types = {t.name: t.type for t in read_gguf(out).tensors}
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "F16"


def test_bad_input(tmp_path: Path, tiny256, quants) -> None:
    p = run_cli("quantize", str(tiny256[1]), "--type", "Q9_X", "--out", str(tmp_path / "x.gguf"))
    assert p.returncode == 1 and "unknown quantization type Q9_X; valid types: F32, F16, Q4_0" in p.stderr.decode()
    p = run_cli("quantize", str(tiny256[1]), "--type", " , ", "--out", str(tmp_path / "x.gguf"))
    assert p.returncode == 1 and "--type is empty; give one or more types, e.g. --type Q4_K_M,Q8_0" in p.stderr.decode()
    with pytest.raises(TiblocalError, match=r"is already quantized \(Q4_K_M\).*--allow-requantize"):
        quantize_gguf(quants["Q4_K_M"], tmp_path / "x.gguf", ["Q4_0"])
    quantize_gguf(quants["Q8_0"], tmp_path / "re.gguf", ["Q4_0"], allow_requantize=True)
    assert read_gguf(tmp_path / "re.gguf").file_type == "Q4_0"
    with pytest.raises(TiblocalError, match="unknown tensor type 'Q9' for --output-tensor-type"):
        quantize_gguf(tiny256[1], tmp_path / "y.gguf", ["Q4_0"], output_tensor_type="Q9")
    # llama.cpp's nthread is an int32_t: -1 was its "every core", and -2147483649 wrapped to 2**31 - 1 threads, which
    # ended the process (SIGABRT); the engine's rule now: negative refused, more than the cores used as the cores
    for threads in ("-1", "-2147483649"):
        p = run_cli("quantize", str(tiny256[1]), "--type", "Q8_0", "--out", str(tmp_path / "t.gguf"), "--threads", threads)
        assert p.returncode == 1 and f"--threads {threads} is negative" in p.stderr.decode()
        assert not (tmp_path / "t.gguf").exists()
    p = run_cli("quantize", str(tiny256[1]), "--type", "Q8_0", "--out", str(tmp_path / "t.gguf"), "--threads", str(10**30))
    assert p.returncode == 0 and "using" in p.stderr.decode()
    assert (tmp_path / "t.gguf").read_bytes() == quants["Q8_0"].read_bytes()
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"mine")
    with pytest.raises(TiblocalError, match="already exists; pass --force"):
        quantize_gguf(tiny256[1], existing, ["Q4_0"])
    assert existing.read_bytes() == b"mine"
    with pytest.raises(InputFileError, match="no such text file"):
        read_text([tmp_path / "none.txt"])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(InputFileError, match="is not valid UTF-8"):
        read_text([bad])
    short = tmp_path / "short.txt"
    short.write_text("བཀྲ་ཤིས་", encoding="utf-8")
    p = run_cli("eval", "ppl", str(tiny256[1]), "--text", str(short))
    assert p.returncode == 1 and "fewer than one window of --ctx 512" in p.stderr.decode()


def test_report_table_json_and_markdown(tmp_path: Path, tiny256, quants) -> None:
    out = tmp_path / "report"
    p = run_cli("eval", "report", str(tiny256[1]), str(quants["Q8_0"]), str(quants["Q4_K_M"]), "--text", str(TEXT),
                "--ctx", "64", "--max-windows", "4", "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert [r["file_type"] for r in rows] == ["ALL_F32", "Q8_0", "Q4_K_M"]
    assert rows[0]["delta_ppl"] == 0 and rows[0]["top1_agreement"] == 1
    assert rows[1]["mean_kl"] < rows[2]["mean_kl"]
    assert rows[0]["bits_per_weight"] > rows[1]["bits_per_weight"] > rows[2]["bits_per_weight"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == rows
    md = out.with_suffix(".md").read_text()
    assert md.count("\n|") == 5 and "| Q4_K_M |" in md  # header, separator, three rows
    p = run_cli("eval", "report", str(tiny256[1]), "--text", str(TEXT))
    assert p.returncode == 1 and "at least one quantization" in p.stderr.decode()


def test_atomic_output_is_created_by_the_writer(tmp_path: Path) -> None:
    """The temporary name does not exist until the writer makes it (no empty file for llama.cpp to truncate, which
    ext4 flushes to disk on close); a failed block leaves nothing; the result has the umask's permissions."""
    import os

    from tiblocal.fsutil import atomic_path

    out = tmp_path / "m.gguf"
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            assert tmp.parent == tmp_path and not tmp.exists()
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert list(tmp_path.iterdir()) == []
    old = os.umask(0o027)
    try:
        with atomic_path(out) as tmp:
            assert not tmp.exists()
            tmp.write_bytes(b"whole")
    finally:
        os.umask(old)
    assert out.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [out]
    assert out.stat().st_mode & 0o777 == 0o640


class _Successor(LogitSource):
    """Logits that bet on the next id being this one + 1: a token scored against the wrong target costs 10 nats more."""

    def __init__(self, ctx: int) -> None:
        self.name, self.n_vocab, self.bos_id, self.ctx, self.calls = "succ", 16, 1, ctx, 0

    def tokenize(self, text: str) -> list[int]:
        return [2 + i % 10 for i, c in enumerate(text) if not c.isspace()]

    def logits(self, ids):
        import numpy as np

        assert len(ids) <= self.ctx and ids[0] == self.bos_id
        self.calls += 1
        out = np.zeros((len(ids), self.n_vocab), dtype=np.float32)
        out[np.arange(len(ids)), (np.asarray(ids) + 1) % self.n_vocab] = 10.0
        return out


def test_perplexity_per_syllable_scores_every_token_once_against_its_own_target() -> None:
    import math

    from tiblocal.quantize.evaluate import perplexity_per_syllable
    from tiblocal.text import count_syllables

    lines = ["བཀྲ་ཤིས་བདེ་ལེགས།", "", "ང་ཚོ་ལྷ་སར་འགྲོ་གི་ཡོད། " * 6, "ཀ"]  # the second line is 100 tokens: 8 windows of 24
    src = _Successor(24)
    r = perplexity_per_syllable(src, lines, 24)
    nll, count = 0.0, 0
    for line in filter(str.strip, lines):
        ids = [1, *src.tokenize(line)]
        for p in range(1, len(ids)):  # by hand: every token, the one before it as the model's input
            hit = ids[p] == (ids[p - 1] + 1) % 16
            nll -= (10.0 if hit else 0.0) - math.log(math.exp(10.0) + 15)
            count += 1
    assert r.tokens_scored == count and r.lines == 3 and src.calls > 3
    assert r.syllables == sum(count_syllables(line) for line in lines)
    assert r.ppl_syllable == pytest.approx(math.exp(nll / r.syllables), rel=1e-9)
    assert r.ppl_token == pytest.approx(math.exp(nll / count), rel=1e-9)
    assert r.bits_per_syllable == pytest.approx(nll / r.syllables / math.log(2), rel=1e-9)
    with pytest.raises(TiblocalError, match="no Tibetan syllables"):
        perplexity_per_syllable(src, ["hello world"], 24)
    with pytest.raises(TiblocalError, match="no lines to score"):
        perplexity_per_syllable(src, ["", "  "], 24)
    with pytest.raises(TiblocalError, match="too small"):
        perplexity_per_syllable(src, lines, 4)


def test_ppl_per_syllable_cli(tiny256, tmp_path) -> None:
    p = run_cli("eval", "ppl", str(tiny256[1]), "--text", str(TEXT), "--per-syllable", "--max-windows", "5", "--json")
    assert p.returncode == 0, p.stderr.decode()
    r = json.loads(p.stdout)
    assert r["lines"] == 5 and r["syllables"] > 0 and r["ppl_syllable"] > 1 and r["tokens_scored"] > 5
    english = tmp_path / "english.txt"
    english.write_text("hello world\n", encoding="utf-8")
    p = run_cli("eval", "ppl", str(tiny256[1]), "--text", str(english), "--per-syllable")
    err = p.stderr.decode().strip()
    assert p.returncode == 1 and err == f"tiblocal: error: {english} has no Tibetan syllables; perplexity per syllable needs Tibetan text"
