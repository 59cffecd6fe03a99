"""Chat templates, defined once.

Each template is Jinja text in Hugging Face's chat-template convention (``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token``). The same text is written into GGUF files as
``tokenizer.chat_template`` by ``tiblocal convert``, rendered by the chat and ``generate`` at inference
time, and used by SFT to build training examples, so the three can never drift apart.

The first BOS is not part of any template: llama.cpp adds it when it tokenizes (``add_bos``), as
llama-server and Ollama do.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .errors import TiblocalError

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
# Chinese-Alpaca-2's DEFAULT_SYSTEM_PROMPT (ymcui/Chinese-LLaMA-Alpaca-2, scripts/inference/inference_hf.py).
LLAMA2_DEFAULT_SYSTEM = "You are a helpful assistant. 你是一个乐于助人的助手。"

# Shared head of every template: an optional leading system message replaces the default one.
_SYSTEM_HEAD = (
    "{%- set system = default_system -%}\n"
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "{%- set system = messages[0]['content'] -%}\n"
    "{%- set messages = messages[1:] -%}\n"
    "{%- endif -%}\n"
)


def _with_default_system(default: str, body: str) -> str:
    return "{%- set default_system = " + _jinja_string(default) + " -%}\n" + _SYSTEM_HEAD + body


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    description: str
    jinja: str
    stop: tuple[str, ...] = field(default=())

    def render(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
    ) -> str:
        return render_jinja(
            self.jinja,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )


_ALPACA = _with_default_system(
    ALPACA_PREAMBLE,
    "{{- system -}}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'user' -%}\n"
    "{{- '\\n\\n### Instruction:\\n' + message['content'] + '\\n\\n' -}}\n"
    "{%- elif message['role'] == 'assistant' -%}\n"
    "{{- '### Response: ' + message['content'] + eos_token -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '### Response: ' -}}{%- endif -%}",
)

_LLAMA2 = _with_default_system(
    LLAMA2_DEFAULT_SYSTEM,
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'user' -%}\n"
    "{%- if not loop.first -%}{{- bos_token -}}{%- endif -%}\n"
    "{{- '[INST] ' -}}\n"
    "{%- if loop.first and system -%}{{- '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' -}}{%- endif -%}\n"
    "{{- message['content'] + ' [/INST]' -}}\n"
    "{%- elif message['role'] == 'assistant' -%}\n"
    "{{- ' ' + message['content'] + ' ' + eos_token -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}",
)

_HUMAN_ASSISTANT = _with_default_system(
    "",
    "{%- if system -%}{{- system + '\\n' -}}{%- endif -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'user' -%}\n"
    "{%- if not loop.first -%}{{- bos_token -}}{%- endif -%}\n"
    "{{- 'Human: ' + message['content'] + '\\n' + eos_token -}}\n"
    "{%- elif message['role'] == 'assistant' -%}\n"
    "{{- bos_token + 'Assistant: ' + message['content'] + '\\n' + eos_token -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- bos_token + 'Assistant: ' -}}{%- endif -%}",
)

_RAW = _with_default_system(
    "",
    "{{- system -}}\n{%- for message in messages -%}{{- message['content'] -}}{%- endfor -%}",
)

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            "alpaca",
            "Tibetan-Alpaca, Chinese-Alpaca v1: '### Instruction: / ### Response:'",
            _ALPACA,
            stop=("### Instruction:",),
        ),
        ChatTemplate(
            "llama-2",
            "Llama-2 chat, Chinese-Alpaca-2: '[INST] <<SYS>> ... <</SYS>> ... [/INST]'",
            _LLAMA2,
            stop=("[INST]",),
        ),
        ChatTemplate(
            "human-assistant",
            "Llama2-Chinese / Atom: '<s>Human: ...\\n</s><s>Assistant: '",
            _HUMAN_ASSISTANT,
            stop=("Human:",),
        ),
        ChatTemplate("raw", "plain continuation for base models", _RAW),
    )
}

DEFAULT_TEMPLATE = "alpaca"


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TiblocalError(
            f"unknown chat template {name!r}; expected one of: {', '.join(TEMPLATES)}"
        ) from None


def template_name_of(jinja_text: str | None) -> str | None:
    """The name of the built-in template whose Jinja text is exactly ``jinja_text``, else None."""
    if not jinja_text:
        return None
    for t in TEMPLATES.values():
        if t.jinja == jinja_text:
            return t.name
    return None


def _raise(message: str) -> None:
    raise TiblocalError(f"chat template error: {message}")


# A template comes from a GGUF, which anyone may have written: rendering runs in Jinja's sandbox (no attribute of
# Python internals, no mutation of the messages) under a budget, so that a template cannot hang or exhaust a chat or
# the server. Jinja's sandbox already caps range() at 100,000 items; the rest is here.
RENDER_SECONDS = 2.0  # the longest a rendering may run
RENDER_CHARS = 4_000_000  # the longest text a rendering, or one string made inside it, may give
_GROWING_STR_METHODS = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs", "format", "format_map"})
_GROWING_FILTERS = ("center", "indent", "wordwrap", "format")


def _size(value) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


@functools.cache
def _jinja_env():
    """The sandboxed environment, made on first use: commands that render no template skip importing jinja2."""
    import jinja2.sandbox

    class BudgetSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+"})

        def call_binop(self, context, operator, left, right):
            # 'a' * 10**11 or 10**10**10 would run for minutes in one C call, where no time check can stop it.
            if operator == "*" and isinstance(right, int) and _size(left) * right > RENDER_CHARS:
                raise TemplateBudgetError(f"a string of {_size(left) * right:,} characters")
            if operator == "*" and isinstance(left, int) and _size(right) * left > RENDER_CHARS:
                raise TemplateBudgetError(f"a string of {_size(right) * left:,} characters")
            if operator == "**" and isinstance(right, int) and abs(right) > 64 and left not in (0, 1, -1):
                raise TemplateBudgetError(f"a power of {right}")
            if operator == "+" and _size(left) + _size(right) > RENDER_CHARS:
                raise TemplateBudgetError(f"a string of {_size(left) + _size(right):,} characters")
            return super().call_binop(context, operator, left, right)

        def wrap_str_format(self, value):
            return None  # str.format and format_map: refused below, not run through Jinja's formatter

        def is_safe_attribute(self, obj, attr, value):
            if isinstance(obj, str) and attr in _GROWING_STR_METHODS:
                return False  # '{:>9999999999}'.format(1), 'a'.ljust(10**10): padding as large as asked
            return super().is_safe_attribute(obj, attr, value)

    env = BudgetSandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    for name in _GROWING_FILTERS:
        env.filters[name] = _refused_filter(name)
    return env


@functools.lru_cache(maxsize=16)
def _compiled(jinja_text: str):
    """A template compiled once for all its renderings (the server renders one for every request): compiling the
    bundled model's takes 6.7 ms on this 2-core machine, rendering it 0.04 ms. Jinja's templates may be rendered from
    several threads at once; one that does not compile raises here, every time."""
    return _jinja_env().from_string(jinja_text)


def _refused_filter(name: str):
    def refuse(*args, **kwargs):
        raise TemplateBudgetError(f"the '{name}' filter, which pads text to any width it is given")

    return refuse


class TemplateBudgetError(Exception):
    """A template asked for more time or text than a rendering is given."""


class _Deadline:
    """A trace function that stops the template's own code once ``seconds`` have passed (each line it runs is
    checked; Python code outside the template, Jinja's runtime included, is not traced line by line)."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def __call__(self, frame, event, arg):
        if event == "call" and frame.f_code.co_filename == "<template>":
            return self._line
        return None

    def _line(self, frame, event, arg):
        if time.perf_counter() > self.end:
            raise TemplateBudgetError(f"more than {RENDER_SECONDS:g} s")
        return self._line


def render_jinja(
    jinja_text: str,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
) -> str:
    """Render any chat template (built-in or read from a GGUF) the way Hugging Face does, in the sandbox and within
    the budget above; any failure is one TiblocalError."""
    import jinja2

    previous = sys.gettrace()
    sys.settrace(_Deadline(RENDER_SECONDS))
    try:
        template = _compiled(jinja_text)
        text = template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except TiblocalError:
        raise
    except TemplateBudgetError as e:
        raise TiblocalError(f"chat template exceeds its budget: it asked for {e}; fix the template or pass --template") from None
    except jinja2.TemplateError as e:
        raise TiblocalError(f"chat template cannot be rendered: {e}") from None
    except Exception as e:  # the template's own arithmetic or calls: 1/0, int('x'), a recursion
        raise TiblocalError(f"chat template cannot be rendered: {type(e).__name__}: {e}") from None
    finally:
        sys.settrace(previous)
    if len(text) > RENDER_CHARS:
        raise TiblocalError(
            f"chat template exceeds its budget: it gave {len(text):,} characters (at most {RENDER_CHARS:,})"
        )
    return text


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    pattern: str  # {text} is the user's input

    def wrap(self, text: str) -> str:
        return self.pattern.replace("{text}", text)


# Tibetan-Alpaca's task prompts (from its README); SFT data for these tasks uses the same patterns.
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("summary", "summarise the text", "གཤམ་གྱི་ཚན་པ་འདིའི་ནང་དོན་གཞིར་བཟུང་ནས་ནང་དོན་གནད་བསྡུས་ཞིག་འབྲི་རོགས།\n{text}"),
        Task("news", "write a short article with the input as its title", 'ཁ་བྱང་ནི་"{text}"ཡིན་པའི་རྩོམ་ཐུང་ཞིག་འབྲི་རོགས།'),
        Task("tense", "the three tenses of the input verb", "{text}-བྱ་ཚིག་འདིའི་དུས་གསུམ་ནི་གང་དག་ཡིན།"),
        Task("define", "explain the input term", "{text}-མདུན་གྱི་ཐ་སྙད་འདི་ལ་འགྲེལ་བཤད་རྒྱག་རོགས།"),
        Task("classify", "which category the text belongs to", "ཚན་པ་འདིའི་ནང་དོན་རིགས་གང་ལ་གཏོགས།\n{text}"),
        Task("continue", "continue the text", "གཤམ་གྱི་ཡི་གེ་འདི་མུ་མཐུད་དུ་འབྲི་རོགས།\n{text}"),
        Task("question", "the input as it is", "{text}"),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise TiblocalError(f"unknown task {name!r}; expected one of: {', '.join(TASKS)}") from None


def resolve_chat_template(gguf_template: str | None, override: str | None) -> tuple[ChatTemplate, str | None]:
    """The template to use and a notice for the user (or None).

    ``--template NAME`` wins; otherwise the GGUF's own ``tokenizer.chat_template`` (recognised as a
    built-in when its text is one); otherwise the default, with a notice saying so.
    """
    if override:
        return get_template(override), None
    if gguf_template:
        name = template_name_of(gguf_template)
        if name:
            return TEMPLATES[name], None
        return ChatTemplate("gguf", "the model's own chat template", gguf_template), None
    return TEMPLATES[DEFAULT_TEMPLATE], (
        f"the model has no chat template; using {DEFAULT_TEMPLATE!r} (choose another with --template)"
    )
