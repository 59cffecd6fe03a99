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
  sentences of a paragraph, the rest of the paragraph as the answer.
Verbs and QA are split by a hash of the verb / of the passage's document, so no passage is in both halves;
the corpus tasks take their train half from corpus/train and their dev half from corpus/dev.
Nothing else in the shared data has answers that could be built honestly without a model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import sys
from pathlib import Path

from tiblocal.errors import InputFileError
from tiblocal.templates import get_task

DEV_PERCENT = 5
# Labels of the four forms (present, past, future, imperative)
FORM_LABELS = (("present", "ད་ལྟ་བ།"), ("past", "འདས་པ།"), ("future", "མ་འོངས་པ།"), ("imperative", "སྐུལ་ཚིག"))


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise InputFileError(f"{path}: no such file; give --data the shared data folder (it has eval/)")
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
MAX_NEWS, MAX_CONTINUE = 4000, 3000  # train examples of each corpus task (dev: a twentieth of it)


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


def build(data: Path, out: Path) -> dict:
    examples = tense_examples(_rows(data / "eval" / "verb_tense.jsonl.xz")) + qa_examples(_rows(data / "eval" / "tibetanqa.jsonl.xz"))
    for split, share in (("train", 1), ("dev", 20)):
        corpus = data / "corpus" / split
        examples += [(split, ex) for ex in news_examples(_lines(corpus / NEWS_FILE), MAX_NEWS // share)]
        for name in CONTINUE_FILES:
            examples += [(split, ex) for ex in continue_examples(_lines(corpus / name), MAX_CONTINUE // len(CONTINUE_FILES) // share)]
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "dev": 0}
    files = {split: open(out / f"{split}.jsonl", "w", encoding="utf-8") for split in counts}
    try:
        for key, ex in examples:
            split = key if key in counts else "dev" if is_dev(key) else "train"
            files[split].write(json.dumps(ex, ensure_ascii=False) + "\n")
            counts[split] += 1
    finally:
        for f in files.values():
            f.close()
    return counts


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
