"""`tiblocal eval mcq`: TLUE's multiple choice on a GGUF and on the Hugging Face folder it came from, both scorers,
TLUE's extraction rules, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from tiblocal.errors import TiblocalError
from tiblocal.quantize.mcq import (LETTERS, Question, evaluate_mcq, extract_concern_all, extract_direct,
                                   option_loglikelihoods, read_questions, wilson)
from tiblocal.templates import get_template

ROWS = [
    {"subject": "agronomy", "loc": "agronomy0", "polished_ti_content": "ཞིང་ལས་ནང་གལ་ཆེ་ཤོས་གང་ཡིན།\nA. ཡོ་བྱད།\nB. ས་ཞིང་།\nC. ནུས་ཤུགས།\nD. དངུལ།", "answer": "B"},
    {"subject": "agronomy", "loc": "agronomy1", "polished_ti_content": "ཆུ་ཚད་གང་ཡིན།\nA. 36°\nB. 37.8°\nC. 36.5°\nD. 37°", "answer": "B"},
    {"subject": "arts", "loc": "arts0", "polished_ti_content": "རི་མོ་གང་ཡིན།\nA. ཀ\nB. ཁ\nC. ག\nD. ང", "answer": "D"},
]


def _example(row: dict, i: int) -> dict:
    """A solved example of the row's subject, another question than the row's."""
    return dict(row, loc=f"{row['subject']}{i + 10}", polished_ti_content=f"{i} " + row["polished_ti_content"])


def _write(path: Path, rows) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("text, direct, concern", [
    ("B", "B", "B"),
    ("ལན་ནི། C", "C", "C"),
    ("A B C D ལས་ B", None, "B"),  # the option list restated, then the choice
    ("A ཡིན་མིན་ B ཡིན།", None, None),  # two different letters
    ("ལན་ནི་ ག", "C", "C"),  # Tibetan option letters when there is no Latin one
    ("<think>maybe A</think> D", "D", "D"),  # reasoning blocks are stripped first, as TLUE does
    ("མི་ཤེས།", None, None),  # no letter: no response
    ("ཤེས་ཀྱི་མེད།", "A", "A"),  # TLUE's rules look for the letters anywhere: ཀ inside ཀྱི counts as A
])
def test_tlue_extraction_rules_on_hand_written_answers(text, direct, concern) -> None:
    assert extract_direct(text) == direct
    assert extract_concern_all(text) == concern


def test_wilson_interval() -> None:
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0, 0) == (0.0, 0.0)


class AnswerInPrompt:
    """A stand-in model that reads the answer from its prompt ("KEY: X") and puts all its probability on it; it
    answers with the letter too. Checks the scoring's plumbing end to end: a model given the answer scores 100%."""

    bos_id, n_vocab, ctx = 1, 16, 4096

    def __init__(self) -> None:
        self.vocab = {c: i + 2 for i, c in enumerate(LETTERS)}

    def tokenize(self, text: str) -> list[int]:
        ids = [self.vocab.get(c, 10 + ord(c) % 5) for c in text if not c.isspace()]
        self.keys = getattr(self, "keys", {})
        self.keys.setdefault(tuple(ids), self.key)  # the prompt's key, for its answer
        return ids

    def logits(self, ids: list[int]) -> np.ndarray:
        out = np.zeros((len(ids), self.n_vocab), dtype=np.float32)
        key = self.key
        out[-1, self.vocab[key]] = 20.0
        return out

    def next_logits(self, ids: list[int]) -> np.ndarray:
        return self.logits(ids)[-1]

    def answer(self, ids: list[int], max_tokens: int) -> str:
        return f"ལན་ནི། {self.keys[tuple(ids[1:])]}"


def test_a_model_given_the_answer_scores_100_percent(tmp_path) -> None:
    questions = read_questions(_write(tmp_path / "q.jsonl", ROWS))
    model = AnswerInPrompt()

    class Template:
        def render(self, messages, **kw):
            model.key = next(q.answer for q in questions if q.text in messages[-1]["content"])
            return messages[-1]["content"]

    r = evaluate_mcq(model, Template(), questions, [], shots=0)
    d = r.as_dict()
    assert d["n"] == 3 and d["accuracy"] == 1.0 and d["accuracy_norm"] == 1.0
    assert d["generation"]["direct"] == {"response_rate": 1.0, "accuracy": 1.0, "conditional_accuracy": 1.0}
    assert d["by_subject"] == {"agronomy": {"n": 2, "accuracy": 1.0}, "arts": {"n": 1, "accuracy": 1.0}}


def test_gguf_and_hf_make_the_same_choices_and_loglikelihoods(tiny_gguf, tiny_hf, tmp_path) -> None:
    """One f32 model as GGUF (llama.cpp) and as its Hugging Face folder (transformers): the same ids, each option's
    log-likelihood within float tolerance, the same choice on every question; and the scorer equals a hand
    computation from transformers' logits."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiblocal.quantize.mcq import open_mcq_source, user_prompt

    questions = read_questions(_write(tmp_path / "q.jsonl", ROWS))
    tmpl = get_template("alpaca")
    gg = open_mcq_source(tiny_gguf, ctx=512, threads=1, n_gpu_layers=0)
    hf = open_mcq_source(tiny_hf, ctx=512, threads=1, n_gpu_layers=0)
    try:
        for q in questions:
            text = tmpl.render([{"role": "user", "content": user_prompt(q, [])}], bos_token="", eos_token="")
            ids_g, ids_h = [gg.bos_id, *gg.tokenize(text)], [hf.bos_id, *hf.tokenize(text)]
            assert ids_g == ids_h
            ll_g, ll_h = option_loglikelihoods(gg, ids_g, text), option_loglikelihoods(hf, ids_h, text)
            assert np.allclose(ll_g, ll_h, atol=2e-3), (ll_g, ll_h)
            assert int(np.argmax(ll_g)) == int(np.argmax(ll_h))
            # by hand: transformers' logits over prompt + continuation, log-softmax, summed over the letter's tokens
            for letter, value in zip(LETTERS, ll_h):
                cont = hf.tokenize(text + " " + letter)[len(ids_h) - 1:]
                with torch.no_grad():
                    logits = hf.model(torch.tensor([ids_h + cont[:-1]])).logits[0, len(ids_h) - 1:].double()
                logp = torch.log_softmax(logits, -1)
                by_hand = sum(float(logp[i, t]) for i, t in enumerate(cont))
                assert value == pytest.approx(by_hand, abs=1e-5)
        rg = evaluate_mcq(gg, tmpl, questions, [], shots=0, max_tokens=4)
        rh = evaluate_mcq(hf, tmpl, questions, [], shots=0, max_tokens=4)
        assert [p["choice"] for p in rg.predictions] == [p["choice"] for p in rh.predictions]
    finally:
        gg.close()
        hf.close()


def test_eval_mcq_command_writes_predictions_and_json(tiny_gguf, tmp_path) -> None:
    data = _write(tmp_path / "q.jsonl", ROWS + [{"subject": "arts", "loc": "arts1", "polished_ti_content": "",
                                                 "answer": "A"}])
    shots = _write(tmp_path / "s.jsonl", [_example(ROWS[0], i) for i in range(5)] + [_example(ROWS[2], i) for i in range(5)])
    out = tmp_path / "pred.jsonl"
    p = run_cli("eval", "mcq", str(tiny_gguf), "--data", str(data), "--fewshot", str(shots), "--shots", "5",
                "--out", str(out), "--max-tokens", "4", "--ctx", "2048", "--json")
    assert p.returncode == 0, p.stderr.decode()
    d = json.loads(p.stdout)
    assert d["n"] == 3 and d["skipped_empty"] == 1 and d["chance"] == 0.25 and 0 <= d["accuracy"] <= 1
    assert set(d["generation"]) == {"direct", "concern_all"}
    preds = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [p["index"] for p in preds] == [0, 1, 2]
    assert all({"choice", "answer", "correct"} <= set(p) and p["correct"] == (p["choice"] == p["answer"]) for p in preds)


@pytest.mark.parametrize("rows, match", [
    ([{"subject": "x", "loc": "x0", "answer": "A"}], "line 1 has no polished_ti_content"),
    ([{"subject": "x", "loc": "x0", "polished_ti_content": "q", "answer": "E"}], "answer 'E' is not one of A, B, C, D"),
    ([{"polished_ti_content": "q", "answer": "A"}], "names no subject"),
    (["not an object"], "expected an object"),
])
def test_bad_rows_are_one_line(tmp_path, tiny_gguf, rows, match) -> None:
    data = _write(tmp_path / "q.jsonl", rows)
    p = run_cli("eval", "mcq", str(tiny_gguf), "--data", str(data))
    err = p.stderr.decode().strip()
    assert p.returncode == 1 and len(err.splitlines()) == 1 and match in err, err


def test_too_few_shots_and_a_fewshot_file_without_the_subject(tmp_path, tiny_gguf) -> None:
    data = _write(tmp_path / "q.jsonl", ROWS)
    few = _write(tmp_path / "s.jsonl", [_example(ROWS[0], i) for i in range(5)])
    for args, match in ((["--fewshot", str(few)], "0 examples of subject 'arts', fewer than --shots 5"),
                        ([], "--shots 5 needs --fewshot FILE"),
                        (["--fewshot", str(tmp_path)], "is a folder; give the file")):
        p = run_cli("eval", "mcq", str(tiny_gguf), "--data", str(data), "--shots", "5", *args)
        err = p.stderr.decode()
        # one line, before the model loads (no notice of llama.cpp's, no progress bar's blank line)
        assert p.returncode == 1 and err.count("\n") == 1 and match in err, err


def test_a_prompt_longer_than_the_context_is_skipped_and_counted(tmp_path, tiny_gguf) -> None:
    long = dict(ROWS[0], polished_ti_content="ཞིང་ལས་ " * 400 + "\nA. ཀ\nB. ཁ\nC. ག\nD. ང")
    data = _write(tmp_path / "q.jsonl", [long, ROWS[1]])
    p = run_cli("eval", "mcq", str(tiny_gguf), "--data", str(data), "--ctx", "256", "--max-tokens", "2", "--json")
    assert p.returncode == 0, p.stderr.decode()
    d = json.loads(p.stdout)
    assert d["n"] == 1 and d["skipped_too_long"] == 1


@pytest.mark.shared_data
def test_questions_from_the_shared_tlue_file_read(tmp_path) -> None:
    from conftest import shared_data

    qs = read_questions(shared_data("eval", "tlue_mcq.jsonl.xz"))
    assert len(qs) == 335 and {q.answer for q in qs} <= set(LETTERS) and len({q.subject for q in qs}) == 67
    assert isinstance(qs[0], Question)
    with pytest.raises(TiblocalError, match="no such file"):
        read_questions(tmp_path / "missing.jsonl")
