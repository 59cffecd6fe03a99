"""The `tiblocal` command: one table maps each verb to the function that runs it; the function's options dataclass
gives its command line (``tiblocal/options.py``).

Exit status: 0 on success, 1 on a user or data error (one line on stderr, no traceback), 2 on a
usage error (argparse), 130 when interrupted. Stage verbs import their stage only when they run.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import TiblocalError
from .options import Result, add_options, emit, options_from, options_type

WIDE = 200  # the width of tables written to a pipe or a file


@dataclass(frozen=True)
class Verb:
    """A verb: its name, the line the top-level help shows, and where its function lives (``module:function``, a
    function of one options dataclass in a package's ``commands`` module; imported only when the verb runs or its
    options are set up). With ``actions``, the verb is a group of sub-verbs (``eval ppl``, ``vocab extend``)."""

    name: str
    summary: str
    target: str = ""
    actions: tuple[Verb, ...] = ()

    def function(self) -> Callable:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


VERBS = (
    Verb("chat", "chat with a GGUF model in the terminal", "tiblocal.commands:chat"),
    Verb("generate", "generate answers for a prompt or a file of prompts (JSON lines)", "tiblocal.commands:generate"),
    Verb("serve", "serve a GGUF model: OpenAI-compatible API with parallel requests, and a chat page",
         "tiblocal.commands:serve"),
    Verb("inspect", "show what a GGUF file, importance matrix or Hugging Face folder holds", "tiblocal.commands:inspect"),
    Verb("vocab", "extend a tokenizer for Tibetan, and check its figures and its parity across runtimes", actions=(
        Verb("extend", "train a Tibetan SentencePiece model and merge it into a base tokenizer",
             "tiblocal.finetune.commands:vocab_extend"),
        Verb("stats", "tokens per Tibetan syllable, characters per token, byte fallback",
             "tiblocal.finetune.commands:vocab_stats"),
        Verb("parity", "do sentencepiece, llama.cpp and Hugging Face give the same ids?",
             "tiblocal.finetune.commands:vocab_parity"),
    )),
    Verb("check", "check that tokenizer, config, weights (or a GGUF) agree on the vocabulary", "tiblocal.commands:check"),
    Verb("pretrain", "continued pretraining (LoRA or full) from a YAML recipe; runs under accelerate launch",
         "tiblocal.finetune.commands:pretrain"),
    Verb("sft", "instruction tuning from a YAML recipe; runs under accelerate launch", "tiblocal.finetune.commands:sft"),
    Verb("merge", "merge LoRA adapters into a base model, shard by shard", "tiblocal.convert.commands:merge"),
    Verb("release", "f16 + quantized GGUFs, quality table, model card, Ollama Modelfile, SHA256SUMS",
         "tiblocal.pipelines.commands:release"),
    Verb("verify", "check a folder's files against its SHA256SUMS", "tiblocal.commands:verify"),
    Verb("convert", "convert a Hugging Face Llama model to GGUF", "tiblocal.convert.commands:convert"),
    Verb("quantize", "quantize a GGUF with llama.cpp's own quantizer (Q4_K_M, Q8_0, ...)",
         "tiblocal.quantize.commands:quantize"),
    Verb("imatrix", "importance matrix for quantize --imatrix, from a Hugging Face model on Tibetan text",
         "tiblocal.quantize.commands:imatrix"),
    Verb("gptq", "GPTQ 4/8-bit through gptqmodel, calibrated on Tibetan text (loads in transformers)",
         "tiblocal.quantize.commands:gptq"),
    Verb("eval", "perplexity, and what quantization cost (ΔPPL, KL, top-1) on a text", actions=(
        Verb("ppl", "perplexity of a GGUF or a Hugging Face / GPTQ folder on a text",
             "tiblocal.quantize.commands:eval_ppl"),
        Verb("compare", "ΔPPL, KL divergence and top-1 agreement of QUANT against REF",
             "tiblocal.quantize.commands:eval_compare"),
        Verb("report", "a table of size, bits/weight, ΔPPL, KL, top-1 and tokens/s per quant type",
             "tiblocal.quantize.commands:eval_report"),
        Verb("mcq", "TLUE multiple choice (Ti-MMLU rows): log-likelihood and generation accuracy",
             "tiblocal.quantize.commands:eval_mcq"),
        Verb("tasks", "Tibetan generation tasks: reading comprehension, verb tenses, news, continuation, kind of text",
             "tiblocal.quantize.commands:eval_tasks"),
    )),
)


def _set_up(p: argparse.ArgumentParser, verb: Verb) -> None:
    """``verb``'s options, made from its function's options dataclass (sub-verbs: one sub-parser each)."""
    if verb.actions:
        sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
        for a in verb.actions:
            _set_up(sub.add_parser(a.name, help=a.summary, description=a.summary), a)
        return
    run = verb.function()
    kind = options_type(run)
    add_options(p, kind)
    p.set_defaults(_run=run, _options=kind)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, only the options of the verb of that name are set up (none for a name
    that is no verb): the others keep their summary, all that the top-level help shows, and start-up does not pay for
    their modules (chat's and generate's import the runtime for their choices and defaults)."""
    parser = argparse.ArgumentParser(
        prog="tiblocal",
        description="Extended-vocabulary Llama models (Tibetan, Chinese) from training to an offline laptop.",
    )
    parser.add_argument("--version", action="version", version=f"tiblocal {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for v in VERBS:
        p = sub.add_parser(v.name, help=v.summary, description=v.summary)
        if only is None or v.name == only:
            _set_up(p, v)
    return parser


def run_verb(run: Callable, kind: type, args: argparse.Namespace) -> int:
    """Call a verb's function with the options (of dataclass ``kind``) the command line gave, and print what it
    returns (``emit``)."""
    options = options_from(kind, args)
    result = run(options)
    if isinstance(result, Result):
        return emit(result, getattr(options, "as_json", False))
    return int(result or 0)


# Optional dependencies, by the top-level module a verb imports, and the extra that installs them.
EXTRAS = {"torch": "train", "transformers": "train", "peft": "train", "accelerate": "train", "google": "train",
          "yaml": "train", "gptqmodel": "gptq", "optimum": "gptq", "rouge_score": "eval", "sacrebleu": "eval"}
PACKAGES = {"google": "protobuf", "yaml": "pyyaml", "rouge_score": "rouge-score"}  # modules whose package has another name


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def crash_report(argv: list[str]) -> Path | None:
    """Write the traceback being handled, with the command line and versions, to a file of its own; its path, or None
    when no place could be written."""
    import platform
    import time
    import traceback

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tiblocal" / "crashes"
    text = (f"tiblocal {__version__}, Python {platform.python_version()}, {platform.platform()}\n"
            f"command: tiblocal {' '.join(argv)}\n\n{traceback.format_exc()}")
    for folder in (base, Path(__import__("tempfile").gettempdir()) / "tiblocal-crashes"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def _fail(args: argparse.Namespace, message: str) -> int:
    """One line on stderr; under --json, a JSON error object on stdout too (and nothing else there)."""
    message = _one_line(message)
    print(f"tiblocal: error: {message}", file=sys.stderr)
    if getattr(args, "as_json", False):
        from .jsonout import print_json, printed

        if not printed():  # a verb that printed its result and then failed (verify, check) said it there
            print_json({"error": message}, ensure_ascii=False)
    return 1


def main(argv: list[str] | None = None) -> int:
    # tiblocal's own warnings are for the user; the libraries' (torchao's kernels it could not load, ...) only when
    # they are errors
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tiblocal").setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        # rich lays tables out for 80 columns when it cannot ask a terminal: piped or logged, they lost their numbers
        os.environ["COLUMNS"] = str(WIDE)
    named = next((a for a in argv if not a.startswith("-")), "")  # the verb: top-level options take no value
    # what an error reports until the command line is parsed: setting up a verb imports its commands module
    args = argparse.Namespace(verb=named, as_json="--json" in argv)
    try:
        args = build_parser(only=named).parse_args(argv)
        return run_verb(args._run, args._options, args)
    except TiblocalError as e:
        return _fail(args, str(e))
    except KeyboardInterrupt:
        print("tiblocal: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `tiblocal generate ... | head`
        return 0
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in EXTRAS:
            return _last_resort(args, argv, e)
        return _fail(args, f"tiblocal {args.verb} needs {PACKAGES.get(top, top)}, which is not installed here; "
                           f"install it with pip install 'tiblocal[{EXTRAS[top]}]'")
    except MemoryError:
        return _fail(args, f"tiblocal {args.verb} ran out of memory; use a smaller input or a machine with more")
    except Exception as e:  # the last resort: a bug shows up as a report, not a dump
        return _last_resort(args, argv, e)


def _last_resort(args: argparse.Namespace, argv: list[str], e: BaseException) -> int:
    report = crash_report(argv)
    where = f"the traceback is in {report}" if report else "no traceback file could be written"
    return _fail(args, f"unexpected {type(e).__name__} in tiblocal {args.verb}: {e} (a bug in tiblocal: {where}; "
                       f"please report it with that file)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
