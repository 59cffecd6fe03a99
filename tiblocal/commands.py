"""The core's verbs: chat, generate, serve, inspect, check, verify. Each is a function of one options dataclass (see
``tiblocal/options.py``); the command line is made from the dataclass. The runtime (llama.cpp, numpy) is imported
inside the functions, and only the chat, generate and serve options ask it for their choices, so that `verify` and
`inspect --help` start without it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .options import Result, option


def _engine():
    from . import engine

    return engine


def _template_names() -> list[str]:
    from .templates import TEMPLATES

    return list(TEMPLATES)


MODEL_HELP = "a .gguf model (default: the bundled model, if installed)"
TEMPLATE_HELP = "chat template (default: the GGUF's own tokenizer.chat_template, else alpaca)"


@dataclass(frozen=True)
class EngineOptions:
    """engine"""

    threads: int | None = option(None, help="CPU threads (default: all available cores)")
    ctx: int | None = option(
        None, help="context window in tokens (default: 2048, or the context the model was trained on if shorter)")
    n_gpu_layers: int = option(
        0, metavar="N", help="layers to offload to the GPU; -1 for all (needs a CUDA/Metal build of llama-cpp-python)")
    flash_attn: str = option("auto", choices=lambda: list(_engine().FLASH_ATTN),
                             help="llama.cpp's flash attention (default auto: on where the backend supports it)")
    rope_scaling: str | None = option(None, choices=lambda: _engine().ROPE_SCALING,
                                      help="RoPE scaling for a context beyond the trained one (default: the model's)")
    rope_scale: float | None = option(
        None, metavar="F",
        help="stretch the trained positions F times, e.g. 2 to run a 4K model at 8K (default: the model's)")
    rope_freq_base: float | None = option(None, metavar="F", help="RoPE base frequency (default: the model's)")
    yarn_orig_ctx: int | None = option(
        None, metavar="N",
        help="with --rope-scaling yarn: the context the model was trained on (default: the model's)")
    cache_type_k: str = option("f16", choices=lambda: _engine().CACHE_TYPES,
                               help="type of the cached keys (default f16; q8_0 halves their memory)")
    cache_type_v: str = option("f16", choices=lambda: _engine().CACHE_TYPES,
                               help="type of the cached values (default f16; a quantized type needs flash attention)")
    backend_sampling: bool = option(
        False,
        help="cut each token's candidates to the top-k inside llama.cpp's graph, on the GPU with the output layer, so "
             "that a hundred candidates instead of the whole vocabulary come back to the CPU (llama.cpp's "
             "--backend-sampling; the same choices; not with a grammar, top-k 0, or penalties below 1)")
    verbose: bool = option(False, help="show llama.cpp's own log")

    def config(self, **more):
        """The engine's settings (``more``: those the command line does not set, e.g. serve's parallel slots)."""
        from dataclasses import asdict

        return _engine().EngineConfig(**asdict(self), **more)


def _sampling_default(name: str):
    from dataclasses import fields

    return next(f.default for f in fields(_engine().Sampling) if f.name == name)


@dataclass(frozen=True)
class SamplingOptions:
    """sampling (default: the model's suggested settings (general.sampling.* in the GGUF), else Chinese-Alpaca's)"""

    temp: float | None = option(None, help=lambda: f"temperature; 0 is greedy (default {_sampling_default('temperature')})")
    top_k: int | None = option(None, help=lambda: f"top-k; 0 disables it (default {_sampling_default('top_k')})")
    top_p: float | None = option(None, help=lambda: f"top-p (default {_sampling_default('top_p')})")
    repeat_penalty: float | None = option(
        None, help=lambda: f"repetition penalty (default {_sampling_default('repeat_penalty')})")
    repeat_last_n: int | None = option(
        None, help=lambda: f"tokens the penalty looks back (default {_sampling_default('repeat_last_n')})")
    max_tokens: int | None = option(
        None, help=lambda: f"most tokens per answer (default {_sampling_default('max_tokens')})")
    seed: int | None = option(
        None, help=lambda: f"random seed; -1 for a new one each time (default {_sampling_default('seed')})")

    def given(self, **more) -> dict:
        """The settings given (checked now, before the model loads); the runtime puts them over the model's suggested
        ones (GGUF general.sampling.*), which are over ours."""
        chosen = {"temperature": self.temp, "top_k": self.top_k, "top_p": self.top_p,
                  "repeat_penalty": self.repeat_penalty, "repeat_last_n": self.repeat_last_n,
                  "max_tokens": self.max_tokens, "seed": self.seed, **more}
        chosen = {k: v for k, v in chosen.items() if v is not None}
        _engine().Sampling(**chosen)  # an invalid value fails here
        return chosen


# --- chat, generate, serve ----------------------------------------------------------------------


@dataclass(frozen=True)
class ChatOptions:
    model: Path | None = option(None, positional=True, help=MODEL_HELP)
    template: str | None = option(None, choices=_template_names, help=TEMPLATE_HELP)
    system: str | None = option(None, help="system prompt (default: the template's)")
    engine: EngineOptions = EngineOptions()
    sampling: SamplingOptions = SamplingOptions()


def chat(o: ChatOptions) -> int:
    """Chat with a GGUF model in the terminal."""
    from .chat import run_chat

    return run_chat(o.model, template=o.template, system=o.system, engine_config=o.engine.config(),
                    sampling=o.sampling.given())


@dataclass(frozen=True)
class GenerateOptions:
    model: Path | None = option(None, positional=True, help=MODEL_HELP)
    prompt: str | None = option(None, exclusive="source", help="one prompt")
    file: Path | None = option(
        None, exclusive="source",
        help="prompts: .txt (one a line) or .jsonl ({\"instruction\"|\"prompt\": ...}); - for stdin")
    out: Path | None = option(None, help="write the results here as JSON lines (default: stdout)")
    force: bool = option(False, help="overwrite --out if it exists")
    as_json: bool = option(False, flag="--json",
                           help="print JSON (with --prompt; files always give JSON lines)")
    ignore_eos: bool = option(
        False, help="do not stop at the end-of-text token: always --max-tokens tokens (for speed measurements)")
    template: str | None = option(None, choices=_template_names, help=TEMPLATE_HELP)
    system: str | None = option(None, help="system prompt (default: the template's)")
    engine: EngineOptions = EngineOptions()
    sampling: SamplingOptions = SamplingOptions()


def generate(o: GenerateOptions) -> int:
    """Answers for one prompt or a file of prompts; the records are JSON lines, written as they come (so this verb
    prints them itself rather than through a Result)."""
    from .generate import run_generate

    return run_generate(
        o.model, prompt=o.prompt, file=o.file, out=o.out, template=o.template, system=o.system, as_json=o.as_json,
        force=o.force, engine_config=o.engine.config(),
        sampling=o.sampling.given(**({"ignore_eos": True} if o.ignore_eos else {})),
    )


@dataclass(frozen=True)
class ServeOptions:
    model: Path | None = option(None, positional=True, help=MODEL_HELP)
    host: str = option("127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for "
                                         "every interface)")
    port: int = option(8080, help="port (default 8080; 0 picks a free one)")
    parallel: int = option(4, metavar="N",
                           help="requests answered at once, batched in one context; each has --ctx tokens (default 4)")
    queue: int = option(64, metavar="N", help="requests that may wait for a slot; beyond it the answer is 503 with "
                                              "Retry-After (default 64)")
    api_key: str | None = option(None, metavar="KEY", help="require 'Authorization: Bearer KEY' on the API (default: "
                                                           "$TIBLOCAL_API_KEY, else none)")
    cors_origin: list[str] = option(
        [], repeat=True, metavar="ORIGIN",
        help="let pages from ORIGIN (e.g. http://localhost:3000, or *) call the API (repeatable; default none)")
    max_body: int = option(4 * 2**20, metavar="BYTES", help="largest request body (default 4 MiB); larger ones get 413")
    template: str | None = option(None, choices=_template_names, help=TEMPLATE_HELP)
    engine: EngineOptions = EngineOptions()


def serve(o: ServeOptions) -> int:
    """The model as a local service until Ctrl-C: it logs each request on stderr and prints no Result."""
    from .serve.server import run_serve

    return run_serve(
        o.model, host=o.host, port=o.port, engine_config=o.engine.config(parallel=o.parallel), template=o.template,
        api_key=o.api_key, queue=o.queue, max_body=o.max_body, cors_origins=o.cors_origin,
    )


# --- inspect, check, verify ---------------------------------------------------------------------


JSON_HELP = "print the result as JSON"


@dataclass(frozen=True)
class InspectOptions:
    path: Path = option(positional=True, help="a .gguf file (a model or an importance matrix), a legacy .dat matrix or "
                                              "a Hugging Face model folder")
    as_json: bool = option(False, flag="--json", help="print JSON")


def inspect(o: InspectOptions) -> Result:
    from .inspect_model import describe, inspect_table
    from .models import resolve_model

    path = resolve_model(o.path)
    d = describe(path)
    return Result(d, lambda console: console.print(inspect_table(path, d)), indent=2)


@dataclass(frozen=True)
class CheckOptions:
    path: Path = option(positional=True, help="a Hugging Face model folder or a .gguf file")
    as_json: bool = option(False, flag="--json", help=JSON_HELP)


def check(o: CheckOptions) -> Result:
    """Exit 1 with the first problem named (all of them under --json) when anything disagrees."""
    from .check import check_gguf, check_hf
    from .errors import InputFileError
    from .models import resolve_model

    path = resolve_model(o.path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file or folder; give a model folder or a .gguf file")
    facts, problems = check_hf(path) if path.is_dir() else check_gguf(path)

    def show(console) -> None:
        console.print(", ".join(f"{k} {v}" for k, v in facts.items()), markup=False)
        console.print("[green]consistent[/]" if not problems else f"[red]{len(problems)} problem(s)[/]")

    problem = None
    if problems:
        problem = problems[0] + (f" (and {len(problems) - 1} more; --json lists them)" if len(problems) > 1 else "")
    return Result({"path": str(path), **facts, "problems": problems}, show, problem=problem)


@dataclass(frozen=True)
class VerifyOptions:
    folder: Path = option(positional=True, help="a folder with SHA256SUMS (from tiblocal merge or release)")
    as_json: bool = option(False, flag="--json", help=JSON_HELP)


def verify(o: VerifyOptions) -> Result:
    """Every file's status (ok, missing, changed, unlisted); exit 1 when one is missing or changed."""
    from .verify import verify as check_sums

    status = check_sums(o.folder)
    bad = {k: v for k, v in status.items() if v in ("missing", "changed")}

    def show(console) -> None:
        for name, s in status.items():
            console.print(f"{s:9} {name}", markup=False)

    problem = None
    if bad:
        first = next(iter(bad.items()))
        problem = (f"{o.folder}: {len(bad)} file(s) do not match SHA256SUMS ({first[0]} is {first[1]}); copy or "
                   f"download them again")
    return Result(status, show, problem=problem)
