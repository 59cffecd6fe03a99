"""Build the Tibetan instruction set from ../shared/data, with a fixed train/dev split.

    python -m tiblocal.finetune.instructions --data ../shared/data --out data/instructions

- verb tenses (tibetan-nlp/tibetan-verbs-database, CC0): the Tibetan-Alpaca tense prompt around the present
  form (the same ``tense`` task the chat's `/task tense` uses); the answer lists present, past, future and,
  where the verb has one, the imperative;
- reading comprehension (CMLI-NLP/TibetanQA, research use): the question as the instruction, its passage
  as the input, the extracted answer as the output;
- news articles from their titles (Tibet Times, in corpus/): the Tibetan-Alpaca ``news`` prompt around a
  headline, the article's first paragraph as the answer;
- continuation (modern essays and written Tibetan, in corpus/): the ``continue`` prompt around the first
  sentences of a paragraph, the rest of the paragraph as the answer;
- kind of text (news, essay, speech, children's story, Kangyur, in corpus/): the ``classify`` prompt around a
  paragraph, the kind its source file holds as the answer (the label is the file's, not a model's guess).
Verbs and QA are split by a hash of the verb / of the passage's document, so no passage is in both halves;
the corpus tasks take their train half from corpus/train and their dev half from corpus/dev. The held-out
verbs and QA rows are also written as they came (heldout_tense.jsonl, heldout_qa.jsonl), and the corpus tasks'
dev rows in `tiblocal eval tasks`' fields (heldout_news.jsonl, heldout_continue.jsonl, heldout_classify.jsonl): a
model tuned on this set is scored on rows it never saw.
Each task is capped (MAX_PER_TASK) so that no task takes over the answers: a small model tuned mostly on one
task answers every prompt in that task's shape.
Nothing else in the shared data has answers that could be built honestly without a model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from tiblocal.errors import InputFileError
from tiblocal.jsonlines import json_rows
from tiblocal.templates import get_task

DEV_PERCENT = 5
# Labels of the four forms (present, past, future, imperative)
FORM_LABELS = (("present", "ད་ལྟ་བ།"), ("past", "འདས་པ།"), ("future", "མ་འོངས་པ།"), ("imperative", "སྐུལ་ཚིག"))


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise InputFileError(f"{path}: no such file; give --data the shared data folder (it has eval/)")
    return [row for _, row in json_rows(path, "eval data", "rows of the shared data")]


def is_dev(key: str) -> bool:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100 < DEV_PERCENT


def tense_examples(rows: list[dict]) -> list[tuple[str, dict]]:
    task = get_task("tense")
    out = []
    for r in rows:
        # present, past and future are required; intransitive verbs have no imperative
        if not all(isinstance(r.get(k), str) and r[k].strip() for k, _ in FORM_LABELS[:3]):
            continue
        answer = "\n".join(f"{label} {r[k].strip()}" for k, label in FORM_LABELS if isinstance(r.get(k), str) and r[k].strip())
        out.append((r["present"], {"instruction": task.wrap(r["present"].strip()), "input": "", "output": answer, "task": "tense"}))
    return out


def qa_examples(rows: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for r in rows:
        q, ctx, a = r.get("question"), r.get("context"), r.get("answer")
        if not all(isinstance(x, str) and x.strip() for x in (q, ctx, a)):
            continue
        out.append((f"doc:{r.get('doc_id')}", {"instruction": q.strip(), "input": ctx.strip(), "output": a.strip(), "task": "qa"}))
    return out


NEWS_FILE = "tibnlp_modern_tibettimes_news.txt.xz"
CONTINUE_FILES = ("tibnlp_modern_tibetcm.txt.xz", "esukhia_nanhai_written.txt.xz")
MAX_PER_TASK = 2000  # train examples of each corpus task (dev: a twentieth of it); tense 2.4k and QA 1.4k in all
# classify: the kind of text each source file holds, in Tibetan (news, essay, speech, children's story, Kangyur)
KIND_FILES = (
    ("tibnlp_modern_tibettimes_news.txt.xz", "གསར་འགྱུར།"),
    ("tibnlp_modern_tibetcm.txt.xz", "རྩོམ་ཡིག"),
    ("esukhia_webcrawl_speech.txt.xz", "ཁ་སྐད།"),
    ("esukhia_childrens_stories.txt.xz", "བྱིས་པའི་སྒྲུང་།"),
    ("derge_kangyur.txt.xz", "བཀའ་འགྱུར།"),
)


def _lines(path: Path) -> list[str]:
    from tiblocal.vocab import read_lines

    if not path.is_file():
        raise InputFileError(f"{path}: no such file; give --data the shared data folder (it has corpus/)")
    return list(read_lines([path]))


def news_examples(lines: list[str], limit: int) -> list[dict]:
    """Headline -> first paragraph: a short line (a title) directly followed by a long one (the article)."""
    task = get_task("news")
    out = []
    for title, body in zip(lines, lines[1:]):
        title, body = title.strip(), body.strip()
        if 8 <= len(title) <= 80 and 250 <= len(body) <= 1500 and not title[0].isdigit() and not title[0] in "༠༡༢༣༤༥༦༧༨༩":
            out.append({"instruction": task.wrap(title.rstrip("།")), "input": "", "output": body, "task": "news"})
            if len(out) >= limit:
                break
    return out


def continue_examples(lines: list[str], limit: int) -> list[dict]:
    """The first sentences of a paragraph -> the rest (cut after a shad, a quarter to a half of the way in)."""
    task = get_task("continue")
    out = []
    for para in lines:
        para = para.strip()
        if not 300 <= len(para) <= 1500:
            continue
        cut = para.find("། ", len(para) // 4)
        if cut < 0 or cut > len(para) // 2:
            continue
        head, rest = para[: cut + 1], para[cut + 2 :].strip()
        out.append({"instruction": task.wrap(head), "input": "", "output": rest, "task": "continue"})
        if len(out) >= limit:
            break
    return out


def classify_examples(lines: list[str], label: str, limit: int) -> list[dict]:
    """A paragraph of one source -> the kind of text that source holds; paragraphs spread over the file."""
    task = get_task("classify")
    paras = [p.strip() for p in lines if 150 <= len(p.strip()) <= 800]
    step = max(1, len(paras) // limit) if limit else 1
    return [{"instruction": task.wrap(p), "input": "", "output": label, "task": "classify"} for p in paras[::step][:limit]]


def build(data: Path, out: Path) -> dict:
    verbs, qa_rows = _rows(data / "eval" / "verb_tense.jsonl.xz"), _rows(data / "eval" / "tibetanqa.jsonl.xz")
    examples = tense_examples(verbs) + qa_examples(qa_rows)
    for split, share in (("train", 1), ("dev", 20)):
        corpus = data / "corpus" / split
        examples += [(split, ex) for ex in news_examples(_lines(corpus / NEWS_FILE), MAX_PER_TASK // share)]
        for name in CONTINUE_FILES:
            examples += [(split, ex) for ex in continue_examples(_lines(corpus / name), MAX_PER_TASK // len(CONTINUE_FILES) // share)]
        for name, label in KIND_FILES:
            examples += [(split, ex) for ex in classify_examples(_lines(corpus / name), label, MAX_PER_TASK // len(KIND_FILES) // share)]
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "dev": 0}
    tasks: dict[str, int] = {}
    files = {split: open(out / f"{split}.jsonl", "w", encoding="utf-8") for split in counts}
    try:
        for key, ex in examples:
            split = key if key in counts else "dev" if is_dev(key) else "train"
            files[split].write(json.dumps(ex, ensure_ascii=False) + "\n")
            counts[split] += 1
            if split == "train":
                tasks[ex["task"]] = tasks.get(ex["task"], 0) + 1
    finally:
        for f in files.values():
            f.close()
    # the rows the tuned model never sees, as `tiblocal eval tasks` reads them
    heldout = {"heldout_tense.jsonl": [r for r in verbs if isinstance(r.get("present"), str) and is_dev(r["present"])],
               "heldout_qa.jsonl": [r for r in qa_rows if is_dev(f"doc:{r.get('doc_id')}")]}
    # the corpus tasks' dev rows (from corpus/dev, which pretraining never reads) in `eval tasks`' fields
    dev = [ex for key, ex in examples if key == "dev"]
    heldout["heldout_news.jsonl"] = [{"title": t.partition('"')[2].rpartition('"')[0], "article": ex["output"]}
                                     for ex in dev if ex["task"] == "news" for t in [ex["instruction"]]]
    heldout["heldout_continue.jsonl"] = [{"text": ex["instruction"].split("\n", 1)[1], "continuation": ex["output"]}
                                         for ex in dev if ex["task"] == "continue"]
    heldout["heldout_classify.jsonl"] = [{"text": ex["instruction"].split("\n", 1)[1], "label": ex["output"]}
                                         for ex in dev if ex["task"] == "classify"]
    for name, rows in heldout.items():
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        counts[name.removesuffix(".jsonl")] = len(rows)
    return {**counts, "train_tasks": tasks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the Tibetan instruction set (train.jsonl, dev.jsonl).")
    ap.add_argument("--data", type=Path, required=True, help="the shared data folder (with eval/ and corpus/)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        counts = build(args.data, args.out)
    except InputFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
