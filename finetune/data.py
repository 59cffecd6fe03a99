"""Training data with the runtime's token ids: SFT examples with response-only labels, packed text blocks.

An SFT example is the chat template's prompt (the same definition the chat and the GGUF use), then
the answer and EOS, as Chinese-LLaMA-Alpaca builds them: prompt and answer are tokenized apart and
concatenated, the prompt's labels are -100. The prompt is tokenized as llama.cpp tokenizes a rendered
chat prompt: "<s>" / "</s>" in the text become the BOS / EOS ids, and each piece of text between them
is encoded by SentencePiece with its dummy prefix (llama.cpp's space prefix after a special token), so
training ids and runtime ids are the same.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tiblocal.errors import InputFileError
from tiblocal.jsonin import loads
from tiblocal.templates import ChatTemplate

IGNORE = -100  # label of tokens that carry no loss


def encode_with_specials(sp, text: str, *, bos: str = "<s>", eos: str = "</s>") -> list[int]:
    """SentencePiece ids of ``text`` with "<s>"/"</s>" as the BOS/EOS ids (llama.cpp's special parsing)."""
    ids: list[int] = []
    for part in re.split(f"({re.escape(bos)}|{re.escape(eos)})", text):
        if part == bos:
            ids.append(sp.bos_id())
        elif part == eos:
            ids.append(sp.eos_id())
        elif part:
            ids.extend(sp.encode(part))
    return ids


@dataclass(frozen=True)
class Instruction:
    instruction: str
    output: str
    input: str = ""
    system: str | None = None

    @property
    def user_text(self) -> str:
        # Chinese-Alpaca joins instruction and input with a newline (as `tiblocal generate` does)
        return f"{self.instruction}\n{self.input}" if self.input else self.instruction


def sft_example(template: ChatTemplate, sp, row: Instruction) -> tuple[list[int], list[int]]:
    """(input_ids, labels): BOS + prompt (labels -100), then the answer and EOS (labelled)."""
    messages = ([{"role": "system", "content": row.system}] if row.system else []) + [
        {"role": "user", "content": row.user_text}
    ]
    prompt = template.render(messages, add_generation_prompt=True)
    prompt_ids = [sp.bos_id()] + encode_with_specials(sp, prompt)
    answer_ids = sp.encode(row.output) + [sp.eos_id()]
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


@dataclass
class ReadReport:
    path: str
    rows: int = 0
    bad: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.bad += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


_HUMAN_ASSISTANT = re.compile(r"^(?:<s>)?Human: (?P<q>.*?)\n</s><s>Assistant: (?P<a>.*?)\n?</s>\s*$", re.S)


def read_instructions(path: Path, *, max_bad_share: float = 0.1) -> tuple[list[Instruction], ReadReport]:
    """Alpaca JSON (a list) or JSON lines ({"instruction", "input", "output"}), or the Llama2-Chinese CSV
    format (a "text" column "<s>Human: ...\\n</s><s>Assistant: ...\\n</s>"). Bad rows are counted and
    skipped; past ``max_bad_share`` of the rows the file is refused."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such instruction file")
    report = ReadReport(str(path))
    rows: list[Instruction] = []
    try:
        raw = path.read_text(encoding="utf-8-sig")  # without a byte-order mark (Notepad's) before the first row
    except UnicodeDecodeError as e:
        raise InputFileError(f"{path} is not valid UTF-8 (byte offset {e.start}); save it as UTF-8") from None

    def take(obj) -> None:
        report.rows += 1
        if not isinstance(obj, dict):
            return report.skip("not an object")
        ins, out = obj.get("instruction"), obj.get("output")
        if not isinstance(ins, str) or not ins.strip():
            return report.skip("no instruction")
        if not isinstance(out, str) or not out.strip():
            return report.skip("no output")
        inp = obj.get("input") if isinstance(obj.get("input"), str) else ""
        system = obj.get("system") if isinstance(obj.get("system"), str) else None
        rows.append(Instruction(ins.strip(), out.strip(), inp.strip(), system))

    if path.suffix.lower() == ".csv":
        for rec in csv.DictReader(io.StringIO(raw)):  # quoted fields span lines
            report.rows += 1
            m = _HUMAN_ASSISTANT.match(rec.get("text") or "")
            if not m:
                report.skip("text is not '<s>Human: ...\\n</s><s>Assistant: ...\\n</s>'")
                continue
            rows.append(Instruction(m.group("q").strip(), m.group("a").strip()))
    elif raw.lstrip().startswith("["):
        try:
            data = loads(raw)
        except json.JSONDecodeError as e:
            raise InputFileError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); expected a list of instructions") from None
        for obj in data:
            take(obj)
    else:
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                take(loads(line))
            except json.JSONDecodeError:
                report.rows += 1
                report.skip("not valid JSON")
    if report.rows == 0:
        raise InputFileError(f"{path} holds no instructions")
    if report.bad > max_bad_share * report.rows:
        reasons = ", ".join(f"{n} {r}" for r, n in report.reasons.items())
        raise InputFileError(
            f"{path}: {report.bad} of {report.rows} rows are bad ({reasons}); more than {max_bad_share:.0%}, so the "
            "file is refused. Fix the rows or remove them"
        )
    return rows, report


def pack_blocks(sp, lines: Iterable[str], block_size: int, *, batch_lines: int = 2048) -> Iterator[list[int]]:
    """Consecutive blocks of ``block_size`` ids from the lines of raw text, each line's ids followed by EOS
    (Chinese-LLaMA's group_texts: no padding, no token dropped except the last incomplete block).
    Lines are encoded in batches on all cores; the ids are those of encoding each line alone."""
    buf: list[int] = []
    eos = sp.eos_id()

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for line in lines:
            if line.strip():
                batch.append(line)
                if len(batch) >= batch_lines:
                    yield batch
                    batch = []
        if batch:
            yield batch

    for batch in batches():
        for ids in sp.encode(batch, num_threads=-1):
            buf.extend(ids)
            buf.append(eos)
        start = 0
        while len(buf) - start >= block_size:
            yield buf[start : start + block_size]
            start += block_size
        del buf[:start]
