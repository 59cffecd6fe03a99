"""Training data uses the runtime's token ids; SFT loss masks; instruction files; the Tibetan instruction set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from conftest import DATA, shared_data
from tiblocal.engine import Engine, EngineConfig
from tiblocal.errors import InputFileError
from tiblocal.finetune.data import IGNORE, Instruction, encode_with_specials, pack_blocks, read_instructions, sft_example
from tiblocal.templates import TEMPLATES, get_template

CONVERSATION = [
    {"role": "system", "content": "ཁྱེད་ནི་རོགས་རམ་པ་ཡིན།"},
    {"role": "user", "content": "བཀྲ་ཤིས་བདེ་ལེགས། Hello"},
    {"role": "assistant", "content": "ལགས། བཀྲ་ཤིས་  བདེ་ལེགས།"},
    {"role": "user", "content": "  ང་ཚོ་ལྷ་སར་འགྲོ།"},
]


@pytest.fixture(scope="module")
def sp(tiny_tokenizer):
    return spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    with Engine(tiny_gguf, EngineConfig(ctx=512)) as e:
        yield e


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_training_ids_equal_llama_cpp_ids_for_rendered_prompts(name, sp, engine) -> None:
    text = get_template(name).render(CONVERSATION)
    assert encode_with_specials(sp, text) == engine.tokenize(text, add_bos=False, special=True)


def test_sft_example_masks_the_prompt_and_ends_with_eos(sp, engine) -> None:
    row = Instruction("འགྲོ-བྱ་ཚིག་འདིའི་དུས་གསུམ་ནི་གང་དག་ཡིན།", "ད་ལྟ་བ། འགྲོ", input="")
    ids, labels = sft_example(get_template("alpaca"), sp, row)
    n_prompt = labels.count(IGNORE)
    prompt = get_template("alpaca").render([{"role": "user", "content": row.instruction}])
    assert ids[:n_prompt] == engine.tokenize(prompt)  # exactly what the chat feeds the model
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == sp.eos_id() and sp.decode(ids[n_prompt:-1]) == "ད་ལྟ་བ། འགྲོ"
    assert len(ids) == len(labels)


def test_instruction_and_input_are_joined_like_generate(sp) -> None:
    ids, labels = sft_example(get_template("raw"), sp, Instruction("Q", "A", input="ctx"))
    assert sp.decode(ids[1 : labels.count(IGNORE)]) == "Q\nctx"


def test_read_alpaca_json_jsonl_and_csv(tmp_path: Path) -> None:
    j = tmp_path / "a.json"
    j.write_text(json.dumps([{"instruction": "q", "input": "i", "output": "a"}, {"instruction": "q2", "output": "a2"}]), encoding="utf-8")
    rows, rep = read_instructions(j)
    assert rows == [Instruction("q", "a", "i"), Instruction("q2", "a2")] and rep.bad == 0
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join([json.dumps({"instruction": f"q{i}", "output": "a"}) for i in range(20)] + ['{"instruction": "x"}', "{bad"]), encoding="utf-8")
    rows, rep = read_instructions(jl)
    assert len(rows) == 20 and rep.bad == 2 and rep.reasons == {"no output": 1, "not valid JSON": 1}
    c = tmp_path / "a.csv"
    c.write_text('text\n"<s>Human: བཀྲ་ཤིས།\n</s><s>Assistant: ལགས།\n</s>"\n', encoding="utf-8")
    rows, _ = read_instructions(c)
    assert rows == [Instruction("བཀྲ་ཤིས།", "ལགས།")]


def test_too_many_bad_rows_are_refused(tmp_path: Path) -> None:
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"instruction": "q", "output": "a"}\n{"instruction": ""}\n{"output": "a"}\n', encoding="utf-8")
    with pytest.raises(InputFileError, match=r"2 of 3 rows are bad \(2 no instruction\); more than 10%, so the file is refused"):
        read_instructions(jl)
    with pytest.raises(InputFileError, match="no such instruction file"):
        read_instructions(tmp_path / "none.json")


def test_packed_blocks_keep_every_token(sp) -> None:
    lines = (DATA / "tibetan_sample.txt").read_text(encoding="utf-8").splitlines()
    stream = [t for line in lines if line.strip() for t in (*sp.encode(line), sp.eos_id())]
    blocks = list(pack_blocks(sp, lines, 64))
    assert list(pack_blocks(sp, lines, 64, batch_lines=7)) == blocks  # batches of lines change nothing
    assert all(len(b) == 64 for b in blocks)
    assert [t for b in blocks for t in b] == stream[: len(blocks) * 64]
    assert len(stream) - len(blocks) * 64 < 64


@pytest.mark.shared_data
def test_instruction_set_from_shared_data(tmp_path: Path) -> None:
    from tiblocal.finetune.instructions import main

    data = shared_data()
    assert main(["--data", str(data), "--out", str(tmp_path)]) == 0
    train = [json.loads(l) for l in (tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    dev = [json.loads(l) for l in (tmp_path / "dev.jsonl").read_text(encoding="utf-8").splitlines()]
    tasks = {t: sum(r["task"] == t for r in train) for t in ("tense", "qa", "news", "continue", "classify")}
    assert 3500 < tasks["tense"] + tasks["qa"] <= 2491 + 1500 and tasks["news"] == tasks["continue"] == tasks["classify"] == 2000
    assert max(tasks.values()) / len(train) < 0.25  # balanced: no task takes over the answers
    assert 0.02 < len(dev) / (len(train) + len(dev)) < 0.1 and {r["task"] for r in dev} == set(tasks)
    kinds = {r["output"] for r in train if r["task"] == "classify"}
    assert len(kinds) == 5 and all(r["instruction"].startswith("ཚན་པ་འདིའི་ནང་དོན་") for r in train if r["task"] == "classify")
    # the held-out rows, as `eval tasks` reads them, are none of the tuning set's
    held_qa = [json.loads(l) for l in (tmp_path / "heldout_qa.jsonl").read_text(encoding="utf-8").splitlines()]
    held_tense = [json.loads(l) for l in (tmp_path / "heldout_tense.jsonl").read_text(encoding="utf-8").splitlines()]
    assert 50 < len(held_qa) < 150 and 50 < len(held_tense) < 150
    assert {r["context"].strip() for r in held_qa}.isdisjoint({r["input"] for r in train if r["task"] == "qa"})
    for name, fields in (("news", {"title", "article"}), ("continue", {"text", "continuation"}), ("classify", {"text", "label"})):
        held = [json.loads(l) for l in (tmp_path / f"heldout_{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        assert len(held) == sum(r["task"] == name for r in dev) > 50 and all(set(r) == fields for r in held)
    trained_verbs = {r["instruction"].split("-བྱ་ཚིག")[0] for r in train if r["task"] == "tense"}
    assert not {r["present"].strip() for r in held_tense} & trained_verbs
    news = next(r for r in train if r["task"] == "news")
    assert news["instruction"].startswith('ཁ་བྱང་ནི་"') and len(news["output"]) >= 250
    cont = next(r for r in train if r["task"] == "continue")
    head = cont["instruction"].split("\n", 1)[1]
    assert head.endswith("།") and len(cont["output"]) > len(head)
    # the corpus tasks' dev half comes from corpus/dev, which pretraining never reads
    assert not {r["output"] for r in dev if r["task"] == "news"} & {r["output"] for r in train if r["task"] == "news"}
    tense = next(r for r in train if r["task"] == "tense")
    assert tense["instruction"].endswith("-བྱ་ཚིག་འདིའི་དུས་གསུམ་ནི་གང་དག་ཡིན།") and tense["output"].count("\n") in (2, 3)
    assert {r["input"] for r in train if r["task"] == "qa"}.isdisjoint({r["input"] for r in dev if r["task"] == "qa"})
    # the split is fixed
    again = tmp_path / "again"
    main(["--data", str(data), "--out", str(again)])
    assert (again / "dev.jsonl").read_bytes() == (tmp_path / "dev.jsonl").read_bytes()
    assert main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 1
