"""Multiple-choice evaluation in TLUE's Ti-MMLU format (`tiblocal eval mcq`), on a GGUF or a Hugging Face folder.

Rows: ``subject``, ``loc``, ``polished_ti_content`` (the question with its options A-D) and ``answer`` (A-D). The
prompt is TLUE's (its ``config.example.yaml``): a Tibetan instruction to answer with one of A B C D, ``--shots`` solved
examples of the same subject from the few-shot file (``དྲི་བ།`` question, ``ལན་ནི།`` answer), then the question; put
into the model's chat template with TLUE's system message. Two scorers:

- log-likelihood, as lm-evaluation-harness scores multiple choice: the log-probability of each option's letter as the
  answer's continuation (its tokens where the prompt's end), the best option chosen; also normalised by the
  continuation's length in bytes (lm-eval's ``acc_norm``; equal for one-letter answers);
- generation: the model answers greedily and the letter is extracted with TLUE's two rules (``auto_evaluate.py``):
  *direct* (exactly one of A-D in the answer, else exactly one of the Tibetan ཀ ཁ ག ང), and *concern all* (every
  option letter in order, Latin first else Tibetan, a run of all four in any order dropped, then one distinct letter
  left); each gives the response rate, the accuracy, and the accuracy among the answers that gave a letter.

Both sources tokenize with the model's SentencePiece vocabulary (llama.cpp's equals it), so a GGUF and the Hugging Face
folder it came from see the same ids.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tiblocal.errors import InputFileError, TiblocalError
from tiblocal.jsonlines import json_rows

LETTERS = ("A", "B", "C", "D")
TIBETAN_LETTERS = {"ཀ": "A", "ཁ": "B", "ག": "C", "ང": "D"}
SYSTEM = ("ང་ནི་ཤེས་བྱའི་སྡེ་ཚན་འདྲ་མིན་གྱི་དྲི་བར་ལན་འདེབས་བྱེད་མཁན་གྱི་རིག་ནུས་ཅན་གྱི་འཕྲུལ་ཆས་ཤིག་ཡིན། "
          "ངས་དྲི་བ་རེ་རེར་ཞིབ་ཚགས་པོས་བསམ་བློ་བཏང་སྟེ་ལན་འདེབས་བྱེད་ཀྱི་ཡོད།")
INSTRUCTION = ("གཤམ་གསལ་འདི་འདེམས་ཀ་གཅིག་མའི་དྲི་བ་ཡིན་པས། ལན་འདེམས་ཀ་ཡང་དག་པ་དེ་ཐད་ཀར་སྟོན་རོགས། "
               "ལན་འདེམས་ཀ་ A B C D བཞིའི་ནང་ནས་གཅིག་འདེམས་རོགས།")
QUESTION, ANSWER = "དྲི་བ།", "ལན་ནི།"
COT_TAGS = ("think", "reasoning", "thought", "analysis", "step")  # TLUE strips these blocks before extracting


@dataclass(frozen=True)
class Question:
    index: int
    subject: str
    loc: str
    text: str
    answer: str


def read_questions(path: Path, what: str = "--data") -> list[Question]:
    """TLUE rows from a .jsonl (or .jsonl.xz) file, each checked: one line names the file, the line and the problem."""
    rows = []
    for where, row in json_rows(path, what, "subject, loc, polished_ti_content and answer"):
        missing = [k for k in ("polished_ti_content", "answer") if not isinstance(row.get(k), str)
                   or (k == "answer" and not row[k].strip())]
        if missing:
            raise InputFileError(f"{where} has no {' or '.join(missing)} (TLUE's rows: subject, loc, "
                                 "polished_ti_content, answer)")
        answer = row["answer"].strip()
        if answer not in LETTERS:
            raise InputFileError(f"{where}: answer {row['answer']!r} is not one of A, B, C, D")
        loc = row.get("loc") if isinstance(row.get("loc"), str) else ""
        subject = row.get("subject") if isinstance(row.get("subject"), str) and row["subject"] else \
            loc.split(" ")[0].rstrip("0123456789")
        if not subject:
            raise InputFileError(f"{where} names no subject (neither subject nor loc)")
        rows.append(Question(len(rows), subject, loc, row["polished_ti_content"], answer))  # empty: skipped, counted
    if not rows:
        raise InputFileError(f"{what} {path} holds no questions")
    return rows


def fewshot_text(examples: list[Question]) -> str:
    return "".join(f"{QUESTION}\n{e.text}\n{ANSWER} {e.answer}\n" for e in examples)


def user_prompt(q: Question, examples: list[Question]) -> str:
    return f"{INSTRUCTION}\n\n{fewshot_text(examples)}{QUESTION}\n{q.text}\n{ANSWER}"


def pick_shots(q: Question, pool: dict[str, list[Question]], shots: int) -> list[Question]:
    """The first ``shots`` examples of the question's subject (never the question itself): deterministic, where TLUE
    draws them at random."""
    if shots == 0:
        return []
    same = [e for e in pool.get(q.subject, []) if e.text != q.text]
    if len(same) < shots:
        raise InputFileError(f"the few-shot file has {len(same)} examples of subject {q.subject!r}, fewer than "
                             f"--shots {shots}; give a few-shot file with {shots} per subject, or --shots 0")
    return same[:shots]


def shot_pool(questions: list[Question], fewshot: list[Question], shots: int) -> dict[str, list[Question]]:
    """The few-shot examples by subject, every question's subject checked to have ``shots`` of them."""
    pool: dict[str, list[Question]] = defaultdict(list)
    for e in fewshot:
        pool[e.subject].append(e)
    for q in questions if shots else ():
        pick_shots(q, pool, shots)
    return pool


# --- TLUE's answer extraction ------------------------------------------------------------------------------------


def _strip_reasoning(text: str) -> str:
    for tag in COT_TAGS:
        text = re.sub(f"<{tag}>.*?</{tag}>", "", text, flags=re.DOTALL)
    return text


def extract_direct(text: str) -> str | None:
    """TLUE's first rule: the one Latin option letter the answer holds (several different ones: none); if none, the
    one Tibetan option letter."""
    text = _strip_reasoning(text)
    latin = {c for c in LETTERS if c in text}
    if len(latin) == 1:
        return latin.pop()
    tibetan = {TIBETAN_LETTERS[c] for c in TIBETAN_LETTERS if c in text}
    return tibetan.pop() if len(tibetan) == 1 else None


def extract_concern_all(text: str) -> str | None:
    """TLUE's second rule: the option letters in the order they appear (Latin ones, else the Tibetan ones as A-D),
    each run of four that holds all of A-D (a restated option list) taken out, and one distinct letter left."""
    text = _strip_reasoning(text)
    letters = [c for c in text if c in LETTERS] or [TIBETAN_LETTERS[c] for c in text if c in TIBETAN_LETTERS]
    kept: list[str] = []
    window: list[str] = []
    for c in letters:
        window.append(c)
        if len(window) == 4 and set(window) == set(LETTERS):
            window = []
        elif len(window) > 4:
            kept += window[:-3]
            window = window[-3:]
    kept += window
    distinct = set(kept)
    return distinct.pop() if len(distinct) == 1 else None


# --- scoring -----------------------------------------------------------------------------------------------------


def option_loglikelihoods(source, prompt_ids: list[int], prompt_text: str) -> list[float]:
    """Each option letter's log-probability as the continuation of the prompt: its tokens where the prompt's tokens
    end (the whole text tokenized at once, as lm-evaluation-harness splits context and continuation)."""
    conts = []
    for letter in LETTERS:
        full = source.tokenize(prompt_text + " " + letter)
        body = prompt_ids[1:]  # without the BOS
        cont = full[len(body):] if full[: len(body)] == body else source.tokenize(" " + letter)
        conts.append(cont or source.tokenize(letter))
    if all(len(c) == 1 for c in conts):  # one pass: the next-token distribution after the prompt
        logits = source.next_logits(prompt_ids).astype(np.float64)
        logp = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        return [float(logp[c[0]]) for c in conts]
    out = []
    for cont in conts:
        logits = source.logits(prompt_ids + cont[:-1])[len(prompt_ids) - 1:].astype(np.float64)
        logp = logits - (logits.max(axis=1, keepdims=True)
                         + np.log(np.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True)))
        out.append(float(sum(logp[i, t] for i, t in enumerate(cont))))
    return out


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class McqResult:
    n: int = 0
    correct: int = 0
    correct_norm: int = 0
    skipped_too_long: int = 0
    skipped_empty: int = 0
    by_subject: dict = field(default_factory=dict)
    generation: dict = field(default_factory=dict)
    predictions: list = field(default_factory=list)

    def as_dict(self) -> dict:
        lo, hi = wilson(self.correct, self.n)
        return {"n": self.n, "accuracy": self.correct / self.n if self.n else None, "ci95": [lo, hi],
                "accuracy_norm": self.correct_norm / self.n if self.n else None, "chance": 0.25,
                "skipped_too_long": self.skipped_too_long, "skipped_empty": self.skipped_empty,
                "by_subject": self.by_subject,
                "generation": self.generation}


def evaluate_mcq(source, template, questions: list[Question], fewshot: list[Question], *, shots: int,
                 max_tokens: int = 16, generate: bool = True, progress=None) -> McqResult:
    """Score every question with both scorers. ``source``: a LogitSource that can also ``answer(ids, max_tokens)``
    greedily; ``template``: the chat template the prompt goes into."""
    pool = shot_pool(questions, fewshot, shots)
    r = McqResult()
    per = defaultdict(lambda: [0, 0])
    rules = {"direct": extract_direct, "concern_all": extract_concern_all}
    gen = {name: [0, 0] for name in rules}  # answered, correct
    for done, q in enumerate(questions, 1):
        if not q.text.strip():  # a row whose question is empty (one of TLUE's public 335): nothing to ask
            r.skipped_empty += 1
            continue
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_prompt(q, pick_shots(q, pool, shots))}]
        text = template.render(messages, bos_token="", eos_token="")
        ids = [source.bos_id, *source.tokenize(text)]
        if len(ids) + max(max_tokens, 4) > source.ctx:
            r.skipped_too_long += 1
            if progress:
                progress(done, len(questions))
            continue
        ll = option_loglikelihoods(source, ids, text)
        choice = LETTERS[int(np.argmax(ll))]
        norm = LETTERS[int(np.argmax([v / len((" " + c).encode()) for v, c in zip(ll, LETTERS)]))]
        rec = {"index": q.index, "loc": q.loc, "subject": q.subject, "choice": choice, "answer": q.answer,
               "correct": choice == q.answer, "loglikelihoods": dict(zip(LETTERS, ll))}
        r.n += 1
        r.correct += choice == q.answer
        r.correct_norm += norm == q.answer
        per[q.subject][0] += 1
        per[q.subject][1] += choice == q.answer
        if generate:
            # one at a time, not batched: the prompt is in the cache from the log-likelihoods, so only the answer's
            # tokens are decoded (a batch would evaluate every prompt again: 20 s became 32 s on the 2-core CPU)
            reply = source.answer(ids, max_tokens)
            rec["generated"] = reply
            for name, rule in rules.items():
                letter = rule(reply)
                rec[f"extracted_{name}"] = letter
                gen[name][0] += letter is not None
                gen[name][1] += letter == q.answer
        r.predictions.append(rec)
        if progress:
            progress(done, len(questions))
    r.by_subject = {s: {"n": n, "accuracy": c / n} for s, (n, c) in sorted(per.items())}
    if generate and r.n:
        r.generation = {name: {"response_rate": a / r.n, "accuracy": c / r.n,
                               "conditional_accuracy": c / a if a else None} for name, (a, c) in gen.items()}
    return r


# --- sources that can also answer --------------------------------------------------------------------------------


def chat_template_of(source, name: str | None):
    """``--template NAME``, else the GGUF's own template, else alpaca (an HF folder's prompts)."""
    from tiblocal.templates import get_template, resolve_chat_template

    if name is not None:
        return get_template(name)
    if getattr(source, "engine", None) is not None:
        return resolve_chat_template(source.engine.chat_template, None)[0]
    return get_template("alpaca")


def trained_context(path: Path) -> int:
    """The context a model was trained on (GGUF: ARCH.context_length; HF: max_position_embeddings), 2048 if unsaid."""
    path = Path(path)
    if path.is_dir():
        from tiblocal.checkpoint import load_config

        value = load_config(path).get("max_position_embeddings")
    else:
        from tiblocal.gguf_file import read_gguf

        info = read_gguf(path, with_tokens=False)
        value = info.metadata.get(f"{info.architecture}.context_length")
    return int(value) if isinstance(value, int) and value > 0 else 2048


def open_mcq_source(path: Path, *, ctx: int | None, threads: int | None, n_gpu_layers: int, parallel: int = 1):
    """``ctx`` None: the context the model was trained on. The source answers greedily, one prompt at a time
    (``answer``), and a GGUF several (``answer_many``: up to ``parallel`` answers in each llama_decode, each in a cache
    of ``ctx`` tokens)."""
    from .evaluate import GGUFSource, HFSource

    path = Path(path)
    ctx = ctx or trained_context(path)
    if path.is_dir():
        source = HFSource(path)
        source.ctx = ctx

        def answer(ids: list[int], max_tokens: int) -> str:
            torch = source.torch
            with torch.no_grad():
                out = source.model.generate(torch.tensor([ids], device=source.device), max_new_tokens=max_tokens,
                                            do_sample=False, pad_token_id=source.sp.eos_id())
            new = [int(t) for t in out[0, len(ids):] if int(t) != source.sp.eos_id()]
            return source.sp.decode(new)

        source.answer = answer
        return source
    if parallel < 1:
        raise TiblocalError(f"--parallel {parallel}: expected at least 1 answer at a time")
    source = GGUFSource(path, ctx, threads, n_gpu_layers, parallel)
    source.ctx = source.engine.n_ctx

    def answer_many(prompts: list[list[int]], max_tokens: int) -> list[str]:
        from tiblocal.text import Utf8Stream

        texts = []
        for toks in source.engine.greedy_many(prompts, max_tokens):
            stream = Utf8Stream()  # as stream() makes the text: the first piece without its leading space
            texts.append("".join(stream.feed(source.engine.piece(t, lstrip=1 if i == 0 else 0))
                                 for i, t in enumerate(toks)) + stream.finish())
        return texts

    def answer(ids: list[int], max_tokens: int) -> str:
        from tiblocal.engine import Generation, Sampling

        g = Generation()
        return "".join(source.engine.stream(ids, Sampling(temperature=0, max_tokens=max_tokens, repeat_penalty=1.0), (), g))

    source.answer = answer
    source.answer_many = answer_many
    source.parallel = source.engine.parallel
    return source
