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


@functools.cache
def _jinja_env():
    """The sandboxed environment, made on first use: commands that render no template skip importing jinja2."""
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env


def render_jinja(
    jinja_text: str,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
) -> str:
    """Render any chat template (built-in or read from a GGUF) the way Hugging Face does."""
    import jinja2

    try:
        template = _jinja_env().from_string(jinja_text)
        return template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except jinja2.TemplateError as e:
        raise TiblocalError(f"chat template cannot be rendered: {e}") from None


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
