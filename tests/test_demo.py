"""The bundled demo model: llama.cpp loads it on its own, it tokenizes as the bundled tokenizer does, it answers
Tibetan prompts in Tibetan without loops, and `tiblocal chat` opens it when no model is named."""

from __future__ import annotations

import os
import sys

import pytest

from conftest import run_cli, shared_data
from tiblocal.models import BUNDLED_MODEL

pytestmark = pytest.mark.skipif(not BUNDLED_MODEL.is_file(), reason=f"no bundled model at {BUNDLED_MODEL}")

# Tibetan prompts of the kinds the model was tuned on and free questions it was not
PROMPTS = [
    "བོད་ཀྱི་ལོ་རྒྱུས་སྐོར་ལ་ཅུང་ཙམ་བཤད་རོགས།",
    'ཁ་བྱང་ནི་"ལྷ་སར་ཆར་པ་ཆེན་པོ་བབས།"ཡིན་པའི་རྩོམ་ཐུང་ཞིག་འབྲི་རོགས།',
    "གཤམ་གྱི་ཡི་གེ་འདི་མུ་མཐུད་དུ་འབྲི་རོགས།\nདེ་རིང་ང་ཚོ་སློབ་གྲྭར་ཕྱིན་པ་ཡིན།",
    "ཁྱེད་རང་སུ་ཡིན།",
    "བོད་ཡིག་སློབ་སྦྱོང་བྱེད་ཐབས་གང་ཡིན།",
    'ཁ་བྱང་ནི་"བོད་ཀྱི་སློབ་གསོ"ཡིན་པའི་རྩོམ་ཐུང་ཞིག་འབྲི་རོགས།',
    "བཀྲ་ཤིས་བདེ་ལེགས། ཁྱེད་རང་སྐུ་གཟུགས་བདེ་པོ་ཡིན་པས།",
    "ལྷ་ས་ནི་ག་པར་ཡོད།",
]


def test_llama_cpp_loads_it_alone_and_tokenizes_like_the_bundled_tokenizer() -> None:
    import lzma

    import llama_cpp
    import sentencepiece as spm

    from tiblocal.vocab import tokenizer_model

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model("bundled")))
    llm = llama_cpp.Llama(str(BUNDLED_MODEL), n_ctx=256, verbose=False)  # llama-cpp-python's own API, no tiblocal
    assert llm.n_vocab() == sp.vocab_size() == 56000
    lines = ["བཀྲ་ཤིས་བདེ་ལེགས།", "ལྷ་ས་ནི་བོད་ཀྱི་རྒྱལ་ས་ཡིན། Lhasa 2024  ༢༠༢༤", " ཁ་བྱང་  \n\nའདི།"]
    try:
        dev = shared_data("corpus", "dev", "tibnlp_modern_tibettimes_news.txt.xz")
        with lzma.open(dev, "rt", encoding="utf-8") as f:
            lines += [line.rstrip("\n") for _, line in zip(range(300), f) if line.strip()]
    except pytest.skip.Exception:
        pass  # the shared data is absent: the built-in lines only
    for line in lines:
        assert llm.tokenize(line.encode(), add_bos=False, special=False) == sp.encode(line), line[:40]
    out = llm.create_completion("ལྷ་ས་", max_tokens=8, temperature=0)
    assert out["choices"][0]["text"]


def test_answers_are_tibetan_without_loops() -> None:
    from tiblocal.engine import Engine, EngineConfig, Generation, Sampling
    from tiblocal.templates import get_template
    from tiblocal.text import distinct_bigram_share, tibetan_share

    template = get_template("alpaca")
    texts, shares = [], []
    with Engine(BUNDLED_MODEL, EngineConfig(ctx=1024, threads=2)) as e:
        for i, prompt in enumerate(PROMPTS):
            sampling = Sampling.for_model(BUNDLED_MODEL, max_tokens=200, seed=100 + i)
            ids = e.tokenize(template.render([{"role": "user", "content": prompt}], add_generation_prompt=True))
            out = list(e.generate_tokens(ids, sampling, Generation()))
            text = e.detokenize(out)
            assert "\ufffd" not in text, (prompt, text)
            texts.append(text)
            shares.append(distinct_bigram_share(out))
    joined = "".join(texts)
    assert len(joined) > 400  # it does answer, at length for the writing tasks
    assert tibetan_share(joined) >= 0.95, joined
    assert sum(shares) / len(shares) >= 0.5 and min(shares) >= 0.3, list(zip(shares, texts))


@pytest.mark.xfail(strict=True, reason="the first bundled model loops (a phrase 3 times in a row on the history prompt); "
                   "its successor must pass (issue 28): remove this mark with the new model")
def test_answers_repeat_no_phrase_more_than_twice_in_a_row() -> None:
    """No phrase of 3+ syllables more than twice in a row in any answer to the eight prompts (200 tokens, the model's
    own sampling, the same seeds as above)."""
    from tiblocal.engine import Engine, EngineConfig, Generation, Sampling
    from tiblocal.templates import get_template
    from tiblocal.text import longest_phrase_run

    template = get_template("alpaca")
    runs = []
    with Engine(BUNDLED_MODEL, EngineConfig(ctx=1024, threads=2)) as e:
        for i, prompt in enumerate(PROMPTS):
            sampling = Sampling.for_model(BUNDLED_MODEL, max_tokens=200, seed=100 + i)
            ids = e.tokenize(template.render([{"role": "user", "content": prompt}], add_generation_prompt=True))
            text = e.detokenize(list(e.generate_tokens(ids, sampling, Generation())))
            runs.append((longest_phrase_run(text), prompt))
    assert all(run[0] <= 2 for run, _ in runs), runs


def test_generate_uses_the_bundled_model_and_its_sampling() -> None:
    """No model given: the bundled one, sampled with the settings it suggests (temperature 0.8, top-k 40, top-p 0.9,
    repeat penalty 1.1 in its GGUF): the same answer as naming the file and those settings, seed for seed, and not
    the answer at tiblocal's own default temperature (0.2)."""
    import json

    def answer(*args: str) -> dict:
        p = run_cli("generate", *args, "--prompt", "ལྷ་ས་ནི་ག་པར་ཡོད།", "--max-tokens", "16", "--seed", "1", "--json")
        assert p.returncode == 0, p.stderr.decode()
        return json.loads(p.stdout)

    row = answer()
    assert row["text"] and row["completion_tokens"] <= 16
    explicit = answer(str(BUNDLED_MODEL), "--temp", "0.8", "--top-k", "40", "--top-p", "0.9", "--repeat-penalty", "1.1")
    assert explicit["text"] == row["text"]
    assert answer(str(BUNDLED_MODEL), "--temp", "0.2")["text"] != row["text"]


def test_chat_on_the_bundled_model_in_a_terminal() -> None:
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, NO_COLOR="1", TERM="dumb", COLUMNS="200", PYTHONIOENCODING="utf-8", LANG="C.UTF-8")
    child = pexpect.spawn(sys.executable, ["-m", "tiblocal", "chat", "--max-tokens", "40", "--seed", "3"], env=env,
                          timeout=60, dimensions=(40, 200), encoding="utf-8", codec_errors="replace")
    child.expect("tiblocal-demo")
    child.expect(">>> ")
    child.sendline("བོད་ཀྱི་ལོ་རྒྱུས་སྐོར་ལ་ཅུང་ཙམ་བཤད་རོགས།")
    child.expect(r"(\d+) tokens · [\d.]+ tokens/s · [\d.]+ syllables/s")
    answer = child.before
    assert int(child.match.group(1)) > 0
    assert sum("\u0f00" <= c <= "\u0fff" for c in answer) > 5
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
