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


HOSTILE = [
    ("never ends", "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}x"
                   "{% endfor %}{% endfor %}{% endfor %}", "exceeds its budget: it asked for more than 2 s"),
    ("a 100 GB string", "{{ 'a' * 10**11 }}", "exceeds its budget: it asked for a string of 100,000,000,000"),
    ("the same, reversed", "{{ 10**11 * 'a' }}", "exceeds its budget"),
    ("a huge power", "{{ 7 ** 100000000 }}", "exceeds its budget: it asked for a power"),
    ("doubling by concatenation", "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                                  "{% endfor %}{{ ns.s | length }}", "exceeds its budget: it asked for a string"),
    ("padding by a method", "{{ 'a'.ljust(10**10) }}", "cannot be rendered"),
    ("padding by format", "{{ '{:>9999999999}'.format(1) }}", "cannot be rendered"),
    ("padding by format_map", "{{ '{x:>9999999999}'.format_map({'x': 1}) }}", "cannot be rendered"),
    ("padding by the format filter", "{{ '%9999999999s' | format(1) }}", "the 'format' filter"),
    ("padding by a filter", "{{ 'a' | center(10**10) }}", "exceeds its budget: it asked for the 'center' filter"),
    ("escaping the sandbox", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "cannot be rendered"),
    ("dividing by zero", "{{ 1/0 }}", "ZeroDivisionError"),
    ("a bad int", "{{ int('x') }}", "cannot be rendered"),
    ("a recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "cannot be rendered"),
]


@pytest.mark.parametrize("jinja,expected", [(j, e) for _, j, e in HOSTILE], ids=[n for n, _, _ in HOSTILE])
def test_hostile_templates_fail_fast_with_one_error(jinja: str, expected: str) -> None:
    """A template read from a GGUF runs in the sandbox under a time and size budget: a chat or the server survives."""
    import time

    t0 = time.monotonic()
    with pytest.raises(TiblocalError) as e:
        render_jinja(jinja, ONE)
    assert expected in str(e.value)
    assert time.monotonic() - t0 < 10
    assert "\n" not in str(e.value)


def test_the_budget_leaves_ordinary_templates_alone() -> None:
    """Loops, string building and filters of an ordinary size still render (HF templates use them)."""
    jinja = ("{% set ns = namespace(s='') %}{% for m in messages %}{% set ns.s = ns.s + m['content'] * 3 %}{% endfor %}"
             "{{ ns.s | upper | trim }}{{ 2 ** 10 }}{% for i in range(1000) %}.{% endfor %}")
    assert render_jinja(jinja, MULTI) == "SSSQ1Q1Q1A1A1A1Q2Q2Q2" + "1024" + "." * 1000
    import sys

    assert sys.gettrace() is None  # the deadline's trace function is removed again
