"""`tiblocal eval tasks`: syllable metrics on hand-checked Tibetan pairs, the scoring of both tasks, the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("rouge_score")
pytest.importorskip("sacrebleu")

from conftest import run_cli  # noqa: E402
from tiblocal.quantize.tasks import (evaluate_task, exact_match, f1, form_variants, read_rows, rouge_l,  # noqa: E402
                                     score_row, syllables)


def test_syllables_split_at_tsheg_and_drop_shad() -> None:
    assert syllables("བཀྲ་ཤིས་བདེ་ལེགས།") == ["བཀྲ", "ཤིས", "བདེ", "ལེགས"]
    assert syllables("ལྷ་ས། ༄༅། །Lhasa, 2024") == ["ལྷ", "ས", "lhasa", "2024"]
    assert syllables("ཀ༌ཁ") == ["ཀ", "ཁ"]  # the non-breaking tsheg too


@pytest.mark.parametrize("pred, ref, em, f, r", [
    ("བཀྲ་ཤིས་བདེ་ལེགས།", "བཀྲ་ཤིས་བདེ་ལེགས", 1.0, 1.0, 1.0),  # the shad does not count
    ("བཀྲ་ཤིས།", "བཀྲ་ཤིས་བདེ་ལེགས།", 0.0, 2 * (1 * 0.5) / 1.5, 2 * (1 * 0.5) / 1.5),  # P 1, R 1/2
    ("བདེ་ལེགས་བཀྲ་ཤིས", "བཀྲ་ཤིས་བདེ་ལེགས", 0.0, 1.0, 0.5),  # the same syllables, another order: F1 1, LCS 2 of 4
    ("ཁ་ལག", "བཀྲ་ཤིས", 0.0, 0.0, 0.0),
])
def test_metrics_on_hand_checked_tibetan_pairs(pred, ref, em, f, r) -> None:
    assert exact_match(pred, ref) == em
    assert f1(pred, ref) == pytest.approx(f)
    assert rouge_l(pred, ref) == pytest.approx(r)


def test_tense_forms_with_an_optional_letter_and_scoring() -> None:
    assert form_variants("ཀེར༼ད༽") == {"ཀེར", "ཀེརད"}
    row = {"present": "སྒྲུབ", "past": "བསྒྲུབས", "future": "བསྒྲུབ", "imperative": "སྒྲུབས"}
    full = score_row("tense", row, "འདས་པ། བསྒྲུབས\nམ་འོངས་པ། བསྒྲུབ\nསྐུལ་ཚིག སྒྲུབས")
    assert full["found"] == {"past": True, "future": True, "imperative": True} and full["exact_match"] == 1.0
    part = score_row("tense", row, "བསྒྲུབསས་ཀྱི་")  # a syllable that only begins with the form is not the form
    assert part["found"] == {"past": False, "future": False, "imperative": False}
    qa = score_row("qa", {"context": "c", "question": "q", "answer": "ལྷ་ས།"}, "\nལྷ་ས།\nམཐའ་མ།")
    assert qa["prediction"] == "ལྷ་ས།" and qa["exact_match"] == 1.0


class Echo:
    """A stand-in model that answers with the reference: every score is perfect."""

    bos_id, ctx = 1, 4096

    def __init__(self, answers):
        self.answers = iter(answers)

    def tokenize(self, text):
        return [3] * len(syllables(text))

    def answer(self, ids, max_tokens):
        return next(self.answers)


class Plain:
    def render(self, messages, **kw):
        return messages[-1]["content"]


def test_a_model_that_answers_with_the_reference_scores_1() -> None:
    rows = [{"context": "ལྷ་ས་ནི་བོད་ཀྱི་རྒྱལ་ས་ཡིན།", "question": "བོད་ཀྱི་རྒྱལ་ས་གང་ཡིན།", "answer": "ལྷ་ས"},
            {"context": "c", "question": "q", "answer": "གཞིས་ཀ་རྩེ"}]
    r = evaluate_task(Echo([row["answer"] for row in rows]), Plain(), "qa", rows, max_tokens=8)["result"]
    assert r["n"] == 2 and r["exact_match"] == r["f1"] == r["rouge_l"] == 1.0 and r["chrf"] == pytest.approx(1.0)


def test_corpus_tasks_prompts_and_scores() -> None:
    """news, continue, classify: the Tibetan-Alpaca prompt around the row's text, the whole answer against the article
    or continuation, the first line of the answer against the kind of text; the reference given back scores 1."""
    from tiblocal.quantize.tasks import prompt_of, score_row

    news = {"title": "ལྷ་སར་ཆར་པ་བབས།", "article": "དེ་རིང་ལྷ་སར་ཆར་པ་ཆེན་པོ་བབས། མི་མང་པོ་ཁྱིམ་དུ་བསྡད།"}
    cont = {"text": "ང་ཚོ་ལྷ་སར་འགྲོ།", "continuation": "དེ་ནས་ཕྱིར་ལོག་ཡོང་།"}
    kind = {"text": "བཅོམ་ལྡན་འདས་མཉན་ཡོད་ན་བཞུགས་ཏེ།", "label": "བཀའ་འགྱུར།"}
    assert prompt_of("news", news) == 'ཁ་བྱང་ནི་"ལྷ་སར་ཆར་པ་བབས"ཡིན་པའི་རྩོམ་ཐུང་ཞིག་འབྲི་རོགས།'
    assert prompt_of("continue", cont).endswith("\nང་ཚོ་ལྷ་སར་འགྲོ།") and prompt_of("classify", kind).endswith(kind["text"])
    half = score_row("news", news, "དེ་རིང་ལྷ་སར་ཆར་པ་ཆེན་པོ་བབས།")
    assert half["exact_match"] == 0.0 and 0.3 < half["rouge_l"] < 1.0
    assert score_row("continue", cont, cont["continuation"])["rouge_l"] == 1.0
    assert score_row("classify", kind, "བཀའ་འགྱུར།\nམདོ་སྡེ།")["exact_match"] == 1.0  # the first line is the answer
    assert score_row("classify", kind, "གསར་འགྱུར།")["exact_match"] == 0.0
    rows = [news, news]
    r = evaluate_task(Echo([news["article"]] * 2), Plain(), "news", rows, max_tokens=8)["result"]
    assert r["n"] == 2 and r["exact_match"] == r["rouge_l"] == 1.0


def _write(path: Path, rows) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def test_eval_tasks_command(tiny_gguf, tmp_path) -> None:
    data = _write(tmp_path / "qa.jsonl", [{"context": "ལྷ་ས་ནི་རྒྱལ་ས་ཡིན།", "question": "གང་ཡིན།", "answer": "ལྷ་ས"}] * 2)
    out = tmp_path / "pred.jsonl"
    p = run_cli("eval", "tasks", str(tiny_gguf), "--task", "qa", "--data", str(data), "--max-tokens", "4",
                "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr.decode()
    d = json.loads(p.stdout)
    assert d["task"] == "qa" and d["n"] == 2 and {"exact_match", "f1", "rouge_l", "chrf"} <= set(d)
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    verbs = _write(tmp_path / "v.jsonl", [{"present": "སྒྲུབ", "past": "བསྒྲུབས", "future": "བསྒྲུབ", "imperative": "སྒྲུབས"},
                                          {"present": "ཀེར", "past": "", "future": "", "imperative": ""}])
    p = run_cli("eval", "tasks", str(tiny_gguf), "--task", "tense", "--data", str(verbs), "--max-tokens", "4", "--json")
    assert p.returncode == 0, p.stderr.decode()
    d = json.loads(p.stdout)
    assert d["n"] == 1 and d["skipped_no_forms"] == 1 and {"past_found", "future_found", "imperative_found"} <= set(d)
    # batched answers (--parallel 3) are the answers one at a time gives (--parallel 1): the same scores and predictions
    many = _write(tmp_path / "many.jsonl", [{"context": f"ལྷ་ས་ནི་རྒྱལ་ས་ཡིན། {'ཀ་' * i}", "question": "གང་ཡིན།",
                                              "answer": "ལྷ་ས"} for i in range(7)])
    preds = {}
    for n in ("1", "3"):
        out_n = tmp_path / f"p{n}.jsonl"
        p = run_cli("eval", "tasks", str(tiny_gguf), "--task", "qa", "--data", str(many), "--max-tokens", "6",
                    "--parallel", n, "--out", str(out_n), "--json")
        assert p.returncode == 0, p.stderr.decode()
        preds[n] = (json.loads(p.stdout), out_n.read_text(encoding="utf-8"))
    assert preds["1"] == preds["3"] and preds["1"][0]["n"] == 7
    kinds = _write(tmp_path / "k.jsonl", [{"text": "ལྷ་ས་ནི་རྒྱལ་ས་ཡིན།", "label": "གསར་འགྱུར།"}])
    p = run_cli("eval", "tasks", str(tiny_gguf), "--task", "classify", "--data", str(kinds), "--max-tokens", "4", "--json")
    assert p.returncode == 0, p.stderr.decode()
    assert json.loads(p.stdout)["n"] == 1


@pytest.mark.parametrize("task, rows, match", [
    ("qa", [{"context": "c", "answer": "a"}], "line 1 has no question"),
    ("qa", [[1, 2]], "expected an object"),
    ("tense", [{"past": "x"}], "line 1 has no present"),
    ("qa", [], "holds no rows"),
    ("news", [{"title": "t"}], "line 1 has no article"),
    ("classify", [{"text": "t", "label": " "}], "line 1 has no label"),
])
def test_bad_rows_are_one_line(tiny_gguf, tmp_path, task, rows, match) -> None:
    data = _write(tmp_path / "d.jsonl", rows)
    p = run_cli("eval", "tasks", str(tiny_gguf), "--task", task, "--data", str(data))
    err = p.stderr.decode().strip()
    assert p.returncode == 1 and len(err.splitlines()) == 1 and match in err, err


@pytest.mark.shared_data
def test_the_shared_files_read(tmp_path) -> None:
    from conftest import shared_data

    qa, _ = read_rows(shared_data("eval", "tibetanqa.jsonl.xz"), "qa")
    verbs, no_forms = read_rows(shared_data("eval", "verb_tense.jsonl.xz"), "tense")
    assert len(qa) == 1500 and len(verbs) + no_forms == 2491


def test_parallel_below_one_is_refused(tiny_gguf) -> None:
    from tiblocal.errors import TiblocalError
    from tiblocal.quantize.mcq import open_mcq_source

    with pytest.raises(TiblocalError, match="--parallel 0: expected at least 1"):
        open_mcq_source(tiny_gguf, ctx=None, threads=2, n_gpu_layers=0, parallel=0)
