"""Chat templates render exactly the strings the original projects used, from one Jinja definition."""

from __future__ import annotations

import pytest

from tiblocal.errors import TiblocalError
from tiblocal.templates import (
    TASKS,
    TEMPLATES,
    get_task,
    get_template,
    render_jinja,
    resolve_chat_template,
    template_name_of,
)

ONE = [{"role": "user", "content": "Q1"}]
MULTI = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "Q2"},
]


def test_alpaca_matches_tibetan_alpaca_prompt() -> None:
    assert get_template("alpaca").render(ONE) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nQ1\n\n### Response: "
    )


def test_alpaca_multi_turn_and_system() -> None:
    assert get_template("alpaca").render(MULTI) == (
        "S\n\n### Instruction:\nQ1\n\n### Response: A1</s>\n\n### Instruction:\nQ2\n\n### Response: "
    )


def test_alpaca_training_example_without_generation_prompt() -> None:
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    text = get_template("alpaca").render(msgs, add_generation_prompt=False)
    assert text.endswith("### Instruction:\nQ\n\n### Response: A</s>")


def test_llama2_matches_chinese_alpaca_2() -> None:
    assert get_template("llama-2").render(ONE) == (
        "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\nQ1 [/INST]"
    )
    assert get_template("llama-2").render(MULTI) == "[INST] <<SYS>>\nS\n<</SYS>>\n\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]"


def test_human_assistant_matches_llama2_chinese() -> None:
    # The first <s> is the BOS that llama.cpp adds when it tokenizes.
    assert get_template("human-assistant").render(ONE) == "Human: Q1\n</s><s>Assistant: "
    assert get_template("human-assistant").render(MULTI[1:]) == (
        "Human: Q1\n</s><s>Assistant: A1\n</s><s>Human: Q2\n</s><s>Assistant: "
    )


def test_raw_is_plain_continuation() -> None:
    assert get_template("raw").render([{"role": "user", "content": "ཁ་སང་"}]) == "ཁ་སང་"


def test_special_tokens_come_from_the_model() -> None:
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "R"}]
    text = get_template("llama-2").render(msgs, bos_token="<BOS>", eos_token="<EOS>")
    assert "A <EOS><BOS>[INST] R" in text


def test_each_template_is_recognised_from_its_jinja_text() -> None:
    for name, t in TEMPLATES.items():
        assert template_name_of(t.jinja) == name
        assert render_jinja(t.jinja, MULTI) == t.render(MULTI)
    assert template_name_of("{{ messages }}") is None
    assert template_name_of(None) is None


def test_resolution_order() -> None:
    alpaca = TEMPLATES["alpaca"].jinja
    assert resolve_chat_template(alpaca, "llama-2")[0].name == "llama-2"
    assert resolve_chat_template(alpaca, None) == (TEMPLATES["alpaca"], None)
    custom, notice = resolve_chat_template("{% for m in messages %}<{{ m['content'] }}>{% endfor %}", None)
    assert custom.name == "gguf" and notice is None
    assert custom.render(ONE) == "<Q1>"
    default, notice = resolve_chat_template(None, None)
    assert default.name == "alpaca" and "no chat template" in notice


def test_unknown_names_list_the_choices() -> None:
    with pytest.raises(TiblocalError, match="expected one of: alpaca, llama-2, human-assistant, raw"):
        get_template("chatml")
    with pytest.raises(TiblocalError, match="summary"):
        get_task("poem")


def test_broken_gguf_template_is_a_clear_error() -> None:
    with pytest.raises(TiblocalError, match="cannot be rendered"):
        render_jinja("{% for m in messages %}", ONE)
    with pytest.raises(TiblocalError, match="chat template error: no system"):
        render_jinja("{{ raise_exception('no system') }}", ONE)


def test_tasks_wrap_like_tibetan_alpaca() -> None:
    assert get_task("tense").wrap("འགྲོ") == "འགྲོ-བྱ་ཚིག་འདིའི་དུས་གསུམ་ནི་གང་དག་ཡིན།"
    assert get_task("news").wrap("ཁ་བྱང") == 'ཁ་བྱང་ནི་"ཁ་བྱང"ཡིན་པའི་རྩོམ་ཐུང་ཞིག་འབྲི་རོགས།'
    assert get_task("summary").wrap("TEXT").endswith("འབྲི་རོགས།\nTEXT")
    assert get_task("question").wrap("x") == "x"
    assert get_task("continue").wrap("ཡི་གེ།") == "གཤམ་གྱི་ཡི་གེ་འདི་མུ་མཐུད་དུ་འབྲི་རོགས།\nཡི་གེ།"
    assert set(TASKS) == {"summary", "news", "tense", "define", "classify", "continue", "question"}
