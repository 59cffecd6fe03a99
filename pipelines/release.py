"""`tiblocal release`: the artifacts of one model, ready to publish.

From a merged Hugging Face folder it writes, into one new folder (atomically: all of it or nothing):
- ``NAME-f16.gguf`` and ``NAME-TYPE.gguf`` for each chosen llama.cpp quant type; with ``gptq_bits``, the GPTQ
  model folder ``NAME-GPTQ-{bits}bit/`` (tiblocal gptq) for GPU servers;
- with an importance matrix (given, or made from the model on Tibetan text as ``tiblocal imatrix`` makes it),
  ``NAME.imatrix.gguf`` (or ``.dat``, as given): every GGUF quant is made with it, as ``llama-quantize --imatrix``;
  the types quantized in a rotated basis take ``NAME.rotated.imatrix.gguf``, made in the same pass in that basis
  (``tiblocal imatrix --rotate``), or none where the matrix was given;
- ``quantization.json`` / ``.md``: size, bits per weight, ΔPPL, mean KL, top-1 agreement and tokens/s of
  each file against the f16 one, on the given text (`tiblocal eval compare`'s measures);
- an Ollama ``Modelfile`` for the first quant type, with the chat template in Ollama's syntax, its stop
  strings, and the model's suggested sampling;
- ``README.md``, the model card; ``SHA256SUMS`` over every file (`tiblocal verify` checks it).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

from tiblocal.engine import Sampling
from tiblocal.errors import InputFileError, TiblocalError
from tiblocal.gguf_keys import suggested_sampling
from tiblocal.options import comma_list, option, positive_int

# Ollama's Go template for each built-in chat template (the same text the Jinja renders for one turn)
OLLAMA_TEMPLATES = {
    "alpaca": '{{ if .System }}{{ .System }}{{ end }}\n\n### Instruction:\n{{ .Prompt }}\n\n### Response: {{ .Response }}',
    "llama-2": "[INST] {{ if .System }}<<SYS>>\n{{ .System }}\n<</SYS>>\n\n{{ end }}{{ .Prompt }} [/INST] {{ .Response }}",
    "human-assistant": "{{ if .System }}{{ .System }}\n{{ end }}Human: {{ .Prompt }}\n</s><s>Assistant: {{ .Response }}",
    "raw": "{{ if .System }}{{ .System }}{{ end }}{{ .Prompt }}{{ .Response }}",
}
# GGUF general.sampling.* -> Ollama PARAMETER names: Ollama names them as tiblocal's Sampling fields do
OLLAMA_PARAMETERS = Sampling.GGUF_KEYS


@dataclass(frozen=True)
class ReleaseResult:
    out: Path
    files: list[str]
    rows: list[dict]


def _ollama_string(text: str) -> str:
    if '"""' in text:
        raise TiblocalError(f'the text {text[:40]!r} holds """, which an Ollama Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(gguf_name: str, template_name: str, meta: dict) -> str:
    from tiblocal.templates import get_template

    template = get_template(template_name)
    default_system = template.render([], add_generation_prompt=False, bos_token="", eos_token="")
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_ollama_string(OLLAMA_TEMPLATES[template_name])}"]
    if default_system:
        lines.append(f"SYSTEM {_ollama_string(default_system)}")
    for stop in (*template.stop, "</s>"):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    for key, name in OLLAMA_PARAMETERS.items():
        if key in meta:
            value = meta[key]
            lines.append(f"PARAMETER {name} {int(value) if isinstance(value, int) else round(float(value), 6)}")
    return "\n".join(lines) + "\n"


def _model_summary(hf_dir: Path) -> dict:
    from tiblocal.checkpoint import load_config

    cfg = load_config(hf_dir)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "max_position_embeddings", "tie_word_embeddings")
    return {k: cfg.get(k) for k in keys}


def _file_record(path: Path) -> dict:
    """A text the release was measured on, by name, size and digest: not by its path on the machine that made it."""
    from tiblocal.verify import sha256_file

    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _imatrix_line(info: dict, files: str = "The quantized GGUFs") -> str:
    texts = ", ".join(info["datasets"])
    how = f"`tiblocal imatrix --rotate {info['rotation_seed']}`" if info.get("rotation_seed") is not None else "`tiblocal imatrix`"
    source = f"made by {how} from this model on {texts}" if info["made"] else (
        "given" + (f", computed on {texts}" if texts else ""))
    windows = ""
    if info.get("chunks"):
        windows = f", {info['chunks']} windows" + (f" of {info['ctx']} tokens" if info.get("ctx") else "")
    if info.get("dtype", "f32") != "f32":
        windows += f", the model run in {info['dtype']}"
    return f"{files} were made with the importance matrix `{info['file']}` ({source}{windows})."


def model_card(name: str, hf_dir: Path, files: dict[str, int], rows: list[dict], text_names: list[str], ctx: int,
               template_name: str, meta: dict, notes: str | None, *, chat_file: str, imatrix: dict | None = None,
               speed: dict | None = None, rotated: list[str] = (), rotate_seed: int = 0,
               rotated_imatrix: dict | None = None, task_rows: list[dict] = (), vocab: dict | None = None) -> str:
    """``chat_file``: the GGUF the card's "Run it" commands name (the Modelfile's); ``rotated_imatrix``: the matrix
    the ``rotated`` files were made with (measured in their basis), if any; ``vocab``: the extended tokenizer's
    tiblocal_vocab.json, if the model has one."""
    from tiblocal.templates import get_template

    from tiblocal.quantize.evaluate import report_markdown

    summary = _model_summary(hf_dir)
    out = [f"# {name}", ""]
    out += [f"Made with `tiblocal release` from the Hugging Face folder `{hf_dir.name}`.", ""]
    out += ["## Model", "", "| setting | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in summary.items()]
    out += ["", "## Files", "", "| file | size (MiB) |", "|---|---|"]
    out += [f"| {f} | {size / 2**20:.1f} |" for f, size in files.items()]
    out += [""]
    if imatrix:
        plain = "The other quantized GGUFs" if rotated else "The quantized GGUFs"
        out += [_imatrix_line(imatrix, plain)
                + (" The rotated files below were made without it." if rotated and not rotated_imatrix else ""), ""]
    if rotated:
        out += [f"{', '.join(f'`{f}`' for f in rotated)}: quantized in a rotated basis (`tiblocal quantize --rotate "
                f"{rotate_seed}`): the same model, its hidden basis turned by a random orthogonal matrix so the 8-bit "
                "activations and weights lose less; a tied embedding is written a second time as the output matrix."
                + (" " + _imatrix_line(rotated_imatrix, "They") if rotated_imatrix else ""), ""]
    if rows:
        out += [report_markdown(rows, f"What quantization cost on {', '.join(text_names)} (ctx {ctx}, against f16)")]
        if speed:
            where = (f"with {'all' if speed['n_gpu_layers'] < 0 else speed['n_gpu_layers']} layers on the GPU"
                     if speed["n_gpu_layers"] else "on the CPU")
            out += [f"tokens/s: llama.cpp decoding {speed['tokens']} tokens {where}, {speed['threads']} threads.", ""]
    else:
        out += ["Quantization quality was not measured (no --eval-text given).", ""]
    if task_rows:
        out += [tasks_markdown(task_rows)]
    if vocab:
        out += ["## Tokenizer", ""]
        out += [f"- {k}: {val}" for k, val in vocab.items() if isinstance(val, (int, float, str))]
        out += [""]
    t = get_template(template_name)
    out += ["## Chat template", "", f"`{template_name}`: {t.description}. Stop strings: "
            + ", ".join(f"`{s}`" for s in (*t.stop, "</s>")) + ".", ""]
    sampling = suggested_sampling(meta)
    if sampling:
        out += ["Suggested sampling (in the GGUF as general.sampling.*, used by tiblocal and llama.cpp): "
                + ", ".join(f"{k} {v if isinstance(v, int) else round(float(v), 6)}" for k, v in sampling.items()) + ".", ""]
    run = [f"tiblocal chat {chat_file}", "ollama create " + name.lower() + " -f Modelfile", "tiblocal verify .   # checks SHA256SUMS"]
    gptq = next((f for f in files if f.endswith("/")), None)
    if gptq:
        run.append(f"python -c \"import transformers; transformers.AutoModelForCausalLM.from_pretrained('{gptq}')\"  # GPTQ: needs gptqmodel and optimum")
    out += ["## Run it", "", "```", *run, "```", ""]
    if notes:
        out += ["## How it was made", "", notes.strip(), ""]
    return "\n".join(out)


# each task's headline figure in the model card (all of them are in evaluation.json)
_HEADLINE = {"mcq": ("accuracy", "TLUE accuracy (log-likelihood)"), "qa": ("f1", "QA F1"),
             "tense": ("exact_match", "tense exact match"), "news": ("rouge_l", "news ROUGE-L"),
             "continue": ("rouge_l", "continuation ROUGE-L"), "classify": ("exact_match", "kind of text")}


def _task_specs(eval_tasks: list[str], eval_mcq: Path | None, limit: int | None) -> list[tuple[str, Path, list]]:
    """(task, file, rows) for --eval-mcq and each --eval-task NAME=FILE, every file read and checked."""
    from tiblocal.quantize.tasks import TASK_NAMES, _scorers, read_rows

    specs = []
    if eval_mcq is not None:
        from tiblocal.quantize.mcq import read_questions

        specs.append(("mcq", Path(eval_mcq), read_questions(Path(eval_mcq), "--eval-mcq")[:limit]))
    for item in eval_tasks:
        name, sep, file = item.partition("=")
        if not sep or name not in TASK_NAMES or not file:
            raise TiblocalError(f"--eval-task {item!r}: expected NAME=FILE with NAME one of {', '.join(TASK_NAMES)}, "
                                "e.g. tense=heldout_tense.jsonl")
        if any(n == name for n, _, _ in specs):
            raise TiblocalError(f"--eval-task {name} is given twice; give each task once")
        _scorers()
        specs.append((name, Path(file), read_rows(Path(file), name)[0][:limit]))
    return specs


def _score_tasks(models: list[Path], specs: list, *, threads: int | None, n_gpu_layers: int, say) -> list[dict]:
    """One row per model: each task's figures, greedy, through the model's own chat template."""
    from tiblocal.quantize.mcq import chat_template_of, evaluate_mcq, open_mcq_source
    from tiblocal.quantize.tasks import MAX_TOKENS, evaluate_task

    rows = []
    for model in models if specs else []:
        source = open_mcq_source(model, ctx=None, threads=threads, n_gpu_layers=n_gpu_layers, parallel=4)
        try:
            template = chat_template_of(source, None)
            row: dict = {"model": model.name}
            for name, file, items in specs:
                say(f"{name} on {model.name}: {len(items)} rows")
                if name == "mcq":
                    r = evaluate_mcq(source, template, items, [], shots=0, max_tokens=16).as_dict()
                else:
                    r = evaluate_task(source, template, name, items, max_tokens=MAX_TOKENS[name])["result"]
                row[name] = {"file": file.name, **{k: v for k, v in r.items() if k not in ("by_subject", "predictions")}}
            rows.append(row)
        finally:
            source.close()
    return rows


def tasks_markdown(rows: list[dict]) -> str:
    names = [k for k in rows[0] if k != "model"]
    head = ["model", *(f"{_HEADLINE[n][1]} ({rows[0][n]['file']}, {rows[0][n]['n']})" for n in names)]
    lines = ["## Tibetan tasks (greedy, the model's chat template; tiblocal eval mcq / eval tasks)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"]] + [f"{r[n][_HEADLINE[n][0]]:.1%}" if isinstance(r[n].get(_HEADLINE[n][0]), float) else "—"
                                for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _imatrix_dtypes() -> list[str]:
    from tiblocal.quantize.imatrix import DTYPES

    return list(DTYPES)


@dataclass(frozen=True)
class ReleaseOptions:
    """What a release is made from: `tiblocal release`'s options, and ``release()``'s one argument from Python."""

    hf_dir: Path = option(positional=True, help="a merged Hugging Face model folder")
    out: Path = option(help="the release folder to write (new, or --force)")
    types: list[str] = option(
        ["Q4_K_M", "Q8_0"], parse=comma_list,
        help="llama.cpp quant types, each TYPE or TYPE:OUTPUT_TYPE (the type of output.weight, or of token_embd when "
             "embeddings are tied), e.g. Q4_K_M:Q5_0,Q8_0 (default Q4_K_M,Q8_0); the first gets the Modelfile")
    name: str | None = option(None, help="file name stem and model card title (default: the folder's name)")
    template: str = option("alpaca", help="chat template for the GGUFs and the Modelfile (default alpaca)")
    eval_text: list[Path] = option([], metavar="FILE", help="text (plain or .xz) on which to measure ΔPPL, KL and "
                                                            "top-1 of each quant against f16")
    ctx: int = option(512, help="evaluation window (default 512)")
    max_windows: int | None = option(None, parse=positive_int, help="evaluate at most this many windows")
    threads: int | None = option(None, help="threads (default: all cores)")
    n_gpu_layers: int = option(
        0, metavar="N", help="layers llama.cpp runs on the GPU for the --eval-text measurements (-1: all; needs a GPU "
                             "build of llama-cpp-python)")
    notes: Path | None = option(None, help="Markdown for the model card's 'How it was made'")
    gptq_bits: Literal[4, 8] | None = option(
        None, flag="--gptq", metavar="BITS",
        help="also a GPTQ model folder at 4 or 8 bits (tiblocal gptq, bundled Tibetan calibration)")
    gptq_group_size: int = option(128, help="GPTQ group size (default 128)")
    imatrix: Path | None = option(
        None, metavar="FILE", help="quantize the GGUFs with this importance matrix (tiblocal imatrix or "
                                   "llama-imatrix); it is shipped in the release")
    make_imatrix: bool = option(False, help="make the importance matrix from the model on Tibetan text first (as "
                                            "tiblocal imatrix), ship it and quantize with it")
    imatrix_text: list[Path] = option(
        [], metavar="FILE", help="text for --make-imatrix, plain or .xz (implies it; default: the bundled Tibetan "
                                 "calibration excerpt)")
    imatrix_chunks: int = option(100, help="windows of 512 tokens for --make-imatrix (default 100)")
    imatrix_dtype: str = option("f32", choices=_imatrix_dtypes,
                                help="what the model runs in for --make-imatrix (default f32; bf16: 7B in 25 s instead "
                                     "of 42 s on an H100)")
    device: str | None = option(None, help="where --make-imatrix runs: cpu or cuda (default: cuda when torch sees a "
                                           "GPU)")
    rotate: list[str] = option(
        [], parse=comma_list, metavar="TYPES",
        help="quantize these types (e.g. Q8_0) in a rotated basis, as `tiblocal quantize --rotate`; with "
             "--make-imatrix they take a matrix measured in that basis (NAME.rotated.imatrix.gguf), a given "
             "--imatrix they do not")
    rotate_seed: int = option(0, metavar="SEED", help="the rotation's seed (default 0)")
    eval_mcq: Path | None = option(
        None, metavar="FILE",
        help="TLUE multiple-choice rows to score every GGUF of the release on (as tiblocal eval mcq, 0-shot)")
    eval_tasks: list[str] = option(
        [], flag="--eval-task", repeat=True, metavar="NAME=FILE",
        help="a tiblocal eval tasks task and its rows (qa, tense, news, continue, classify), scored on every GGUF; "
             "repeat for more tasks")
    eval_limit: int | None = option(None, parse=positive_int, metavar="N",
                                    help="score the first N rows of each --eval-mcq / --eval-task file")
    force: bool = option(False, help="replace --out if it exists")


def release(o: ReleaseOptions, progress: Callable[[str], None] | None = None) -> ReleaseResult:
    """``imatrix``: an importance matrix file to quantize with; ``make_imatrix`` (implied by ``imatrix_text``): make
    one from the model on ``imatrix_text`` (default: the bundled Tibetan calibration excerpt), ``imatrix_chunks``
    windows of 512 tokens, the model run in ``imatrix_dtype`` (f32, bf16, f16) on ``device`` (default: cuda when
    torch sees a GPU). ``n_gpu_layers``: the layers llama.cpp runs on the GPU for the ``eval_text`` measurements
    (-1: all); it needs bindings built with a GPU backend, checked before any work. ``rotate``: the types quantized
    in a rotated basis (``tiblocal quantize --rotate``, seed ``rotate_seed``); with ``make_imatrix`` they take a
    matrix measured in that basis in the same pass, a given ``imatrix`` (measured on the model as converted) they
    do not take. The shipped f16 GGUF stays as converted, and the measurements compare against it. ``eval_mcq``
    (TLUE rows) and ``eval_tasks`` (``NAME=FILE``, `tiblocal eval tasks`' tasks and rows) are scored on every GGUF
    of the release (``eval_limit``: the first N rows of each), one table row per file in the model card, so what a
    quantization costs on the Tibetan tasks shows beside what it costs in perplexity."""
    from tiblocal.convert.hf_to_gguf import hf_to_gguf
    from tiblocal.quantize.evaluate import quant_report, read_text
    from tiblocal.quantize.gguf_quant import parse_types, quantize_gguf
    from tiblocal.quantize.imatrix import check_device, check_dtype, is_gguf, load_imatrix
    from tiblocal.quantize.rotate import check_seed

    from tiblocal.engine import check_threads
    from tiblocal.fsutil import atomic_dir, check_file_name, check_output_path
    from tiblocal.gguf_file import read_gguf
    from tiblocal.templates import get_template
    from tiblocal.verify import write_sha256sums
    from tiblocal.vocab import SIDECAR, read_sidecar

    hf_dir, out = Path(o.hf_dir), Path(o.out)
    if not (hf_dir / "config.json").is_file():
        raise InputFileError(f"{hf_dir}: no config.json; give the merged Hugging Face model folder (tiblocal merge's output)")
    vocab = read_sidecar(hf_dir) if (hf_dir / SIDECAR).is_file() else None  # a damaged one stops here, not at the end
    if o.template not in OLLAMA_TEMPLATES:
        get_template(o.template)  # names the valid ones
        raise TiblocalError(f"template {o.template!r} has no Ollama form; expected one of: {', '.join(OLLAMA_TEMPLATES)}")
    # TYPE or TYPE:OUTPUT_TYPE (the type of output.weight, or of token_embd when the embeddings are tied)
    specs = [t.strip().partition(":") for t in o.types if t.strip()]
    names = parse_types(",".join(t for t, _, _ in specs), "--types")
    output_types = {n: (t.strip() or None) for n, (_, _, t) in zip(names, specs)}
    rotated = parse_types(",".join(o.rotate), "--rotate") if o.rotate else []
    if extra := sorted(set(rotated) - set(names)):
        raise TiblocalError(f"--rotate {','.join(rotated)}: {', '.join(extra)} is not among --types {','.join(names)}; "
                            "name types the release makes")
    if rotated:
        check_seed(o.rotate_seed, "--rotate-seed")  # before the conversion, not after it
    check_threads(o.threads)  # likewise: the quantizer and the measurements take it after the conversion
    task_specs = _task_specs(o.eval_tasks, o.eval_mcq, o.eval_limit)  # every file read and checked before the long work
    check_output_path(out, force=o.force, folder=True,
                      inputs=[hf_dir, o.notes, o.imatrix, *o.eval_text, *o.imatrix_text, o.eval_mcq, *(f for _, f, _ in task_specs)])
    if o.name is not None:
        check_file_name(o.name, "--name")
    check_device(o.device)
    notes_text = None
    if o.notes is not None:
        if not Path(o.notes).is_file():
            raise InputFileError(f"{o.notes}: no such notes file (Markdown for the model card's 'How it was made')")
        try:
            notes_text = Path(o.notes).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputFileError(f"{o.notes} is not UTF-8 text (byte {e.start}); save the notes as UTF-8") from None
    text = read_text(list(o.eval_text)) if o.eval_text else None
    if text is not None and o.n_gpu_layers:
        from tiblocal.engine import check_gpu_offload

        check_gpu_offload(o.n_gpu_layers)
    make_imatrix = o.make_imatrix or bool(o.imatrix_text)
    if o.imatrix is not None and make_imatrix:
        raise TiblocalError(f"--imatrix {o.imatrix} and --make-imatrix/--imatrix-text both given; give one of them")
    given_im = load_imatrix(o.imatrix) if o.imatrix is not None else None  # a bad file stops here, before any work
    if given_im is not None and given_im.rotation:
        raise TiblocalError(f"--imatrix {o.imatrix} was measured in {given_im.basis()}; a release quantizes its f16 GGUF "
                            "as converted: give a matrix of the unrotated model, or --make-imatrix")
    im_windows = None
    if make_imatrix:  # the text is cut into windows now, so a short text stops here, before the long work
        from tiblocal.quantize.calibration import calibration_texts, calibration_windows
        from tiblocal.quantize.imatrix import IMATRIX_CTX

        if o.imatrix_chunks < 1:
            raise TiblocalError(f"--imatrix-chunks {o.imatrix_chunks}: expected at least 1 window")
        check_dtype(o.imatrix_dtype, "--imatrix-dtype")
        imatrix_text = calibration_texts(list(o.imatrix_text), "--imatrix-text")
        im_windows = calibration_windows(hf_dir, imatrix_text, o.imatrix_chunks, IMATRIX_CTX,
                                         ("--imatrix-text", "--imatrix-chunks", None))
    if o.gptq_bits:  # its checks (group size, calibration, gptqmodel installed) before the long work
        from tiblocal.quantize.gptq import preflight

        preflight(hf_dir, bits=o.gptq_bits, group_size=o.gptq_group_size, group_flag="--gptq-group-size")
    name = o.name or hf_dir.resolve().name
    say = progress or (lambda m: None)
    with atomic_dir(out, replace=o.force) as tmp:
        f16 = tmp / f"{name}-f16.gguf"
        say(f"converting {hf_dir} to {f16.name}")
        hf_to_gguf(hf_dir, f16, outtype="f16", template=o.template)
        im, im_info, rot_im, rot_info = None, None, None, None
        if make_imatrix:
            from tiblocal.quantize.imatrix import compute_imatrices, write_imatrix

            # one pass over the text for both bases: the model as converted, and as --rotate turns it
            bases = ([None] if set(names) - set(rotated) else []) + ([o.rotate_seed] if rotated else [])
            say(f"importance matrix: {o.imatrix_chunks} windows")
            measured = compute_imatrices(
                hf_dir, imatrix_text, bases, chunks=o.imatrix_chunks, ctx=IMATRIX_CTX, device=o.device, dtype=o.imatrix_dtype,
                progress=lambda done, total: say(f"importance matrix: window {done}/{total}"), windows=im_windows)
            for basis, (m, counts) in zip(bases, measured):
                file = f"{name}.imatrix.gguf" if basis is None else f"{name}.rotated.imatrix.gguf"
                write_imatrix(tmp / file, m, counts, IMATRIX_CTX)
                # quantize with the matrix as read back from the shipped file (the sums it stores round differently
                # from the means in memory), so `tiblocal quantize --imatrix` with that file makes the same GGUFs
                m = load_imatrix(tmp / file)
                m.path = Path(file)
                info = {"file": file, "made": True, "datasets": m.datasets, "chunks": m.chunk_count,
                        "ctx": IMATRIX_CTX, "dtype": o.imatrix_dtype}
                if basis is None:
                    im, im_info = m, info
                else:
                    rot_im, rot_info = m, {**info, "rotation_seed": basis}
        elif given_im is not None:
            im = given_im
            im.path = Path(f"{name}.imatrix{'.gguf' if is_gguf(o.imatrix) else '.dat'}")  # the name says the format
            shutil.copyfile(o.imatrix, tmp / im.path)
            im_info = {"file": im.path.name, "made": False, "datasets": im.datasets, "chunks": im.chunk_count,
                       "source": Path(o.imatrix).name}
        quants = []
        for t in names:
            path = tmp / f"{name}-{t}.gguf"
            if t in rotated:
                from tiblocal.quantize.rotated_quant import quantize_rotated

                say(f"rotating and quantizing to {t}")
                quantize_rotated(f16, path, [t], seed=o.rotate_seed, threads=o.threads, output_tensor_type=output_types[t],
                                 imatrix=rot_im)
            else:
                say(f"quantizing to {t}")
                quantize_gguf(f16, path, [t], threads=o.threads, output_tensor_type=output_types[t], imatrix=im)
            quants.append(path)
        gptq_dir = None
        if o.gptq_bits:
            from tiblocal.quantize.gptq import gptq_quantize

            gptq_dir = tmp / f"{name}-GPTQ-{o.gptq_bits}bit"
            say(f"GPTQ {o.gptq_bits}-bit")
            gptq_quantize(hf_dir, gptq_dir, bits=o.gptq_bits, group_size=o.gptq_group_size, progress=say)
        rows = []
        if text is not None:
            # the GPTQ folder runs through transformers, against the same f16 GGUF on the same ids and windows
            measured = [*quants, gptq_dir] if gptq_dir is not None else quants
            rows = quant_report(f16, measured, text, o.ctx, max_windows=o.max_windows, threads=o.threads,
                                n_gpu_layers=o.n_gpu_layers, progress=lambda m: say(f"measuring {Path(m).name}"))
            for r in rows:
                r["model"] = Path(r["model"]).name + ("/" if Path(r["model"]).is_dir() else "")
        task_rows = _score_tasks([f16, *quants], task_specs, threads=o.threads, n_gpu_layers=o.n_gpu_layers, say=say)
        if task_rows:
            (tmp / "evaluation.json").write_text(json.dumps(task_rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        say("writing the model card, Modelfile and SHA256SUMS")
        speed = None
        if rows:
            from tiblocal.quantize.evaluate import SPEED_TOKENS

            from tiblocal.engine import default_threads

            speed = {"tokens": SPEED_TOKENS, "threads": o.threads or default_threads(), "n_gpu_layers": o.n_gpu_layers}
        meta = read_gguf(quants[0], with_tokens=False).metadata
        (tmp / "Modelfile").write_text(modelfile(quants[0].name, o.template, meta), encoding="utf-8")
        (tmp / "quantization.json").write_text(json.dumps({
            "text": [_file_record(Path(p)) for p in o.eval_text], "ctx": o.ctx, "output_tensor_types": output_types, "imatrix": im_info,
            "rotated": {t: o.rotate_seed for t in rotated}, "rotated_imatrix": rot_info, "speed": speed, "rows": rows,
        }, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        files = {p.name: p.stat().st_size for p in [f16, *quants]}
        for m in (im, rot_im):
            if m is not None:
                files[m.path.name] = (tmp / m.path).stat().st_size
        if gptq_dir is not None:
            files[gptq_dir.name + "/"] = sum(p.stat().st_size for p in gptq_dir.iterdir() if p.is_file())
        card = model_card(name, hf_dir, files, rows, [Path(p).name for p in o.eval_text], o.ctx, o.template, meta, notes_text,
                          chat_file=quants[0].name, imatrix=im_info, speed=speed,
                          rotated=[p.name for p, t in zip(quants, names) if t in rotated], rotate_seed=o.rotate_seed,
                          rotated_imatrix=rot_info, task_rows=task_rows, vocab=vocab)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        write_sha256sums(tmp)
        listing = sorted(p.name for p in tmp.iterdir())
    return ReleaseResult(out, listing, rows)
