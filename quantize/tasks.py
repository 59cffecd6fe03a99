"""Tibetan generation tasks (`tiblocal eval tasks`): reading comprehension and verb tenses, scored over syllables.

- ``qa``: extractive reading comprehension (TibetanQA rows: ``context``, ``question``, ``answer``); the model reads the
  context and the question and answers greedily; the first line of its answer is scored against the reference with
  exact match and F1 over Tibetan syllables, as SQuAD scores words, ROUGE-L over syllables and chrF.
- ``tense``: Tibetan-Alpaca's verb-tense prompt (``{present}-བྱ་ཚིག་འདིའི་དུས་གསུམ་ནི་གང་དག་ཡིན།``) on the verb
  database's rows (``present``, ``past``, ``future``, ``imperative``); each reference form found among the answer's
  syllables counts (a form written with an optional letter, ``ཀེར༼ད༽``, matches with or without it), all three
  found is an exact match, and ROUGE-L and chrF compare the answer with the three forms.
- ``news``, ``continue``, ``classify``: the Tibetan-Alpaca prompts with references taken from the corpus itself (the
  rows ``python -m tiblocal.finetune.instructions`` writes from corpus/dev): a headline and its article (``title``,
  ``article``), the first sentences of a paragraph and the rest (``text``, ``continuation``), a paragraph and the kind
  of text its source holds (``text``, ``label``: news, essay, speech, children's story, Kangyur). The whole answer is
  compared with the article or the continuation (ROUGE-L, chrF); for classify the first line of the answer is an
  exact match when its syllables are the label's. Summary and define have no honest references in the shared data
  (no summaries, no dictionary), so they are not offered.

Syllables: Tibetan text split at the tsheg (་, ༌) and at white space, the shad and other Tibetan punctuation removed,
Latin letters lowercased. ROUGE-L is rouge-score's with that tokenizer (its default tokenizer drops non-Latin script);
chrF is sacrebleu's, on the text as it is (it needs no tokenizer).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from tiblocal.errors import InputFileError, TiblocalError
from tiblocal.jsonlines import json_rows


TASK_NAMES = ("qa", "tense", "news", "continue", "classify")
MAX_TOKENS = {"qa": 64, "tense": 64, "news": 128, "continue": 128, "classify": 16}  # each task's answer length
# each task's fields, and the one the answer is scored against
TASK_FIELDS = {"qa": ("context", "question", "answer"), "tense": ("present",), "news": ("title", "article"),
               "continue": ("text", "continuation"), "classify": ("text", "label")}
FORMS = ("past", "future", "imperative")  # the verb forms the tense task asks for
_PUNCT = re.compile(r"[\u0f04-\u0f0a\u0f0d-\u0f14\u0f3a-\u0f3d\u0f7f\u0f85\u0fd0-\u0fd4\u0fd9\u0fda.,;:!?\"'()\[\]{}«»“”‘’、。，：；！？]")
_TSHEG = re.compile(r"[\u0f0b\u0f0c\s]+")


def syllables(text: str) -> list[str]:
    """The text's syllables for scoring: split at tsheg and white space, punctuation removed, Latin lowercased."""
    return [s for s in _TSHEG.split(_PUNCT.sub(" ", text.lower())) if s]


def exact_match(pred: str, ref: str) -> float:
    return float(syllables(pred) == syllables(ref))


def f1(pred: str, ref: str) -> float:
    """SQuAD's F1, over syllables instead of words."""
    p, r = syllables(pred), syllables(ref)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


class _SyllableTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return syllables(text)


def _scorers():
    try:
        from rouge_score import rouge_scorer
        from sacrebleu.metrics import CHRF
    except ImportError as e:
        raise TiblocalError(f"eval tasks needs rouge-score and sacrebleu ({e.name} is not installed here); install them "
                            "with pip install 'tiblocal[eval]'") from None
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_SyllableTokenizer()), CHRF()


def rouge_l(pred: str, ref: str) -> float:
    return _scorers()[0].score(ref, pred)["rougeL"].fmeasure


def chrf(preds: list[str], refs: list[str]) -> float:
    return _scorers()[1].corpus_score(preds, [refs]).score / 100


def form_variants(form: str) -> set[str]:
    """A dictionary form with an optional part in ༼ ༽ (ཀེར༼ད༽): with and without it, as syllable strings."""
    bare = re.sub(r"\u0f3c[^\u0f3d]*\u0f3d", "", form)
    full = form.replace("\u0f3c", "").replace("\u0f3d", "")
    return {"་".join(syllables(v)) for v in (bare, full) if syllables(v)}


def read_rows(path: Path, task: str) -> tuple[list[dict], int]:
    """The task's rows, each checked, and how many verbs were left out for having no form to ask for."""
    need = TASK_FIELDS[task]
    rows: list[dict] = []
    no_forms = 0
    for where, row in json_rows(path, "--data", ", ".join(need)):
        missing = [k for k in need if not isinstance(row.get(k), str) or not row[k].strip()]
        if missing:
            raise InputFileError(f"{where} has no {', '.join(missing)} (the {task} task's rows: {', '.join(need)}"
                                 + (", and past, future or imperative)" if task == "tense" else ")"))
        if task == "tense" and not any(isinstance(row.get(k), str) and row[k].strip() for k in FORMS):
            no_forms += 1  # a verb the database gives no other form of: nothing to score
            continue
        rows.append(row)
    if not rows:
        raise InputFileError(f"--data {path} holds no rows")
    return rows, no_forms


def prompt_of(task: str, row: dict) -> str:
    from tiblocal.templates import get_task

    if task == "qa":
        return f"{row['context']}\n{row['question']}"
    if task == "tense":
        return get_task("tense").wrap(row["present"])
    if task == "news":
        return get_task("news").wrap(row["title"].strip().rstrip("།"))
    return get_task(task).wrap(row["text"].strip())


def score_row(task: str, row: dict, answer: str) -> dict:
    if task == "qa":
        first = next((line for line in answer.splitlines() if line.strip()), "")
        return {"prediction": first, "exact_match": exact_match(first, row["answer"]), "f1": f1(first, row["answer"]),
                "rouge_l": rouge_l(first, row["answer"]), "reference": row["answer"]}
    if task in ("news", "continue"):
        ref = row["article" if task == "news" else "continuation"]
        return {"prediction": answer, "exact_match": exact_match(answer, ref), "rouge_l": rouge_l(answer, ref),
                "reference": ref}
    if task == "classify":
        first = next((line for line in answer.splitlines() if line.strip()), "")
        return {"prediction": first, "exact_match": exact_match(first, row["label"]),
                "rouge_l": rouge_l(first, row["label"]), "reference": row["label"]}
    said = "་".join(syllables(answer))
    forms = {k: row[k] for k in FORMS if isinstance(row.get(k), str) and row[k].strip()}
    found = {k: any(f"་{v}་" in f"་{said}་" for v in form_variants(form)) for k, form in forms.items()}
    reference = " ".join(sorted(form_variants(f))[0] for f in forms.values())
    return {"prediction": answer, "found": found, "exact_match": float(all(found.values())),
            "rouge_l": rouge_l(answer, reference), "reference": reference}


def answers(source, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """Greedy answers to ``prompts``: batched where the source can (``answer_many``), else one by one."""
    many = getattr(source, "answer_many", None)
    return many(prompts, max_tokens) if many else [source.answer(p, max_tokens) for p in prompts]


def evaluate_task(source, template, task: str, rows: list[dict], *, max_tokens: int, progress=None) -> dict:
    """Greedy answers and their scores; ``source`` answers as eval mcq's sources do."""
    _scorers()  # before the first answer: the libraries are there
    records, skipped, todo = [], 0, []
    step = 4 * getattr(source, "parallel", 1)  # rows answered together (batched where the source can)
    for done, row in enumerate(rows, 1):
        text = template.render([{"role": "user", "content": prompt_of(task, row)}], bos_token="", eos_token="")
        ids = [source.bos_id, *source.tokenize(text)]
        if len(ids) + max_tokens > source.ctx:
            skipped += 1
        else:
            todo.append((done - 1, row, ids))
        if len(todo) >= step or done == len(rows):
            for (index, r, _), answer in zip(todo, answers(source, [ids for _, _, ids in todo], max_tokens)):
                records.append({"index": index, **score_row(task, r, answer)})
            todo = []
            if progress:
                progress(done, len(rows))
    n = len(records)
    result: dict = {"task": task, "n": n, "skipped_too_long": skipped}
    if n:
        result["exact_match"] = sum(r["exact_match"] for r in records) / n
        result["rouge_l"] = sum(r["rouge_l"] for r in records) / n
        result["chrf"] = chrf([r["prediction"] for r in records], [r["reference"] for r in records])
        if task == "qa":
            result["f1"] = sum(r["f1"] for r in records) / n
        elif task == "tense":
            for k in FORMS:
                with_form = [r for r in records if k in r["found"]]
                result[f"{k}_found"] = sum(r["found"][k] for r in with_form) / len(with_form) if with_form else None
    return {"result": result, "records": records}
