"""The conversion stage's verbs: convert (Hugging Face -> GGUF) and merge (LoRA adapters into a base model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tiblocal.options import Result, option


def _template_choices() -> list[str]:
    from tiblocal.templates import TEMPLATES

    return [*TEMPLATES, "none"]


@dataclass(frozen=True)
class ConvertOptions:
    model_dir: Path = option(positional=True,
                             help="Hugging Face model folder (config.json, *.safetensors, tokenizer.model)")
    out: Path = option(help="output .gguf file")
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = option("f16", help="tensor type (default f16)")
    vocab_only: bool = option(False, help="write only the tokenizer (for tokenizer tests)")
    template: str = option("alpaca", choices=_template_choices,
                           help="chat template written as tokenizer.chat_template (default alpaca; none writes no "
                                "template)")
    force: bool = option(False, help="overwrite --out if it exists")
    as_json: bool = option(False, flag="--json", help="print the result as JSON")


def convert(o: ConvertOptions) -> Result:
    from tiblocal.progress import progress

    from .hf_to_gguf import hf_to_gguf

    with progress(f"writing {o.out.name}", unit="bytes") as report:
        r = hf_to_gguf(o.model_dir, o.out, outtype=o.outtype, vocab_only=o.vocab_only,
                       template=None if o.template == "none" else o.template, force=o.force, progress=report)
    summary = {"path": str(r.path), "outtype": r.outtype, "n_tensors": r.n_tensors, "n_vocab": r.n_vocab,
               "size_bytes": r.size}
    return Result(summary, f"wrote {r.path} ({r.outtype}, {r.n_tensors} tensors, {r.n_vocab} tokens, "
                           f"{r.size / 2**20:.1f} MiB)", to="stderr")


@dataclass(frozen=True)
class MergeOptions:
    base: Path = option(positional=True, help="base Hugging Face model folder")
    adapters: list[Path] = option(positional=True, metavar="ADAPTER",
                                  help="peft LoRA adapter folders, applied in order")
    out: Path = option(help="output folder")
    dtype: Literal["f16", "bf16", "f32"] = option("f16", help="tensor type written (default f16)")
    force: bool = option(False, help="replace --out if it exists")
    as_json: bool = option(False, flag="--json", help="print the result as JSON")


def merge(o: MergeOptions) -> Result:
    from tiblocal.progress import progress

    from .merge import merge_lora

    with progress(f"merging into {o.out.name}", unit="bytes") as report:
        r = merge_lora(o.base, o.adapters, o.out, dtype=o.dtype, force=o.force, progress=report)
    summary = {"path": str(r.out), "dtype": o.dtype, "n_tensors": r.n_tensors, "n_vocab": r.n_vocab,
               "lora_merged": r.merged_lora, "replaced": r.replaced, "bytes": r.bytes_written}
    return Result(summary, f"wrote {r.out} ({o.dtype}, {r.n_tensors} tensors, vocabulary {r.n_vocab}; "
                           f"{r.merged_lora} LoRA updates merged, {r.replaced} tensors replaced)", to="stderr")
