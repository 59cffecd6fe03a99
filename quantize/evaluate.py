"""Perplexity and what quantization cost: ΔPPL, KL divergence and top-1 agreement against a reference.

The windows are llama-perplexity's (ggml-org/llama.cpp tools/perplexity): the text is tokenized once
into SentencePiece ids, cut into consecutive windows of ``ctx`` tokens, the first token of each window
replaced by BOS, and only the second half of each window scored (every scored token has at least
ctx/2 tokens of context). A GGUF is run through llama.cpp, a Hugging Face (or GPTQ) folder through
transformers, on exactly the same ids and windows, so their figures compare.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tiblocal.errors import ModelFormatError, TiblocalError
from tiblocal.vocab import read_lines


def read_text(paths: list[Path]) -> str:
    """The files' text (plain or .xz), one after the other."""
    return "\n".join(read_lines(paths))


class LogitSource:
    """A model that gives logits for a window of token ids."""

    n_vocab: int
    bos_id: int
    name: str

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def logits(self, ids: list[int]) -> np.ndarray:  # (len(ids), n_vocab) float32
        raise NotImplementedError

    def next_logits(self, ids: list[int]) -> np.ndarray:  # (n_vocab,) float32: after the last id
        return self.logits(ids)[-1]

    def close(self) -> None:
        pass


class GGUFSource(LogitSource):
    def __init__(self, path: Path, ctx: int, threads: int | None, n_gpu_layers: int, parallel: int = 1) -> None:
        from tiblocal.engine import Engine, EngineConfig

        self.engine = Engine(path, EngineConfig(threads=threads, ctx=ctx, n_gpu_layers=n_gpu_layers, batch=ctx,
                                                parallel=parallel))
        self.n_vocab, self.bos_id, self.name = self.engine.n_vocab, self.engine.bos_id, str(path)

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenize(text, add_bos=False, special=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.engine.eval_logits(ids)

    def next_logits(self, ids: list[int]) -> np.ndarray:
        return self.engine.next_logits(ids)

    def close(self) -> None:
        self.engine.close()


class HFSource(LogitSource):
    """A Hugging Face or GPTQ folder through transformers (needs torch: ``pip install tiblocal[train]``)."""

    def __init__(self, path: Path, device: str | None = None) -> None:
        try:
            import torch
            import transformers
        except ImportError:
            raise TiblocalError(f"{path} is a Hugging Face folder; evaluating it needs torch and transformers "
                                "(pip install 'tiblocal[train]'), or convert it to GGUF first") from None
        from tiblocal.gguf_vocab import load_sentencepiece

        tok = Path(path) / "tokenizer.model"
        self.sp = load_sentencepiece(tok)
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float32 if self.device == "cpu" else torch.float16
        with contextlib.redirect_stdout(sys.stderr):  # gptqmodel (GPTQ folders) reports on stdout; --json owns it
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.n_vocab = self.model.get_output_embeddings().weight.shape[0]
        self.bos_id, self.name = self.sp.bos_id(), str(path)

    def tokenize(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def logits(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([ids], device=self.device)).logits[0]
        return out.float().cpu().numpy()

    def next_logits(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():  # the output layer for the last position only
            out = self.model(self.torch.tensor([ids], device=self.device), logits_to_keep=1).logits[0, -1]
        return out.float().cpu().numpy()


def open_source(path: Path, *, ctx: int, threads: int | None = None, n_gpu_layers: int = 0) -> LogitSource:
    path = Path(path)
    if path.is_dir():
        return HFSource(path)
    return GGUFSource(path, ctx, threads, n_gpu_layers)


def windows(ids: list[int], ctx: int, bos_id: int, max_windows: int | None = None) -> Iterator[list[int]]:
    if ctx < 8:
        raise TiblocalError(f"--ctx {ctx} is too small for perplexity; use at least 8 (512 is usual)")
    n = len(ids) // ctx
    if n == 0:
        raise TiblocalError(
            f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}; give more text or a smaller --ctx"
        )
    for w in range(n if max_windows is None else min(n, max_windows)):
        win = list(ids[w * ctx : (w + 1) * ctx])
        win[0] = bos_id
        yield win


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@dataclass
class PPLResult:
    model: str
    ppl: float
    tokens_scored: int
    windows: int
    ctx: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class CompareResult:
    reference: str
    quantized: str
    ppl_ref: float
    ppl_quant: float
    delta_ppl: float
    delta_ppl_pct: float
    mean_kl: float
    max_kl: float
    top1_agreement: float
    tokens_scored: int
    windows: int
    ctx: int
    delta_ppl_pct_se: float = 0.0  # standard error of delta_ppl_pct, from the per-token log-ratios (as llama-perplexity)

    def as_dict(self) -> dict:
        return asdict(self)


def _scored(win: list[int], ctx: int) -> tuple[slice, np.ndarray]:
    first = ctx // 2
    return slice(first, ctx - 1), np.asarray(win[first + 1 : ctx])


def perplexity(
    source: LogitSource, text: str, ctx: int, *, max_windows: int | None = None, progress: Callable[[int, int], None] | None = None
) -> PPLResult:
    return perplexity_of_ids(source, source.tokenize(text), ctx, max_windows=max_windows, progress=progress)


def perplexity_of_ids(
    source: LogitSource, ids: list[int], ctx: int, *, max_windows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PPLResult:
    """``perplexity`` of text already tokenized (by the same vocabulary), for one text scored by many models."""
    wins = list(windows(ids, ctx, source.bos_id, max_windows))
    nll, count = 0.0, 0
    for i, win in enumerate(wins):
        rows, targets = _scored(win, ctx)
        logp = _log_softmax(source.logits(win)[rows])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
        if progress:
            progress(i + 1, len(wins))
    return PPLResult(source.name, math.exp(nll / count), count, len(wins), ctx)


@dataclass
class SyllablePPLResult:
    model: str
    ppl_syllable: float  # exp(total negative log-likelihood / Tibetan syllables)
    bits_per_syllable: float
    ppl_token: float
    syllables: int
    tokens_scored: int
    lines: int
    ctx: int

    def as_dict(self) -> dict:
        return asdict(self)


def perplexity_per_syllable(
    source: LogitSource, lines: list[str], ctx: int, *, progress: Callable[[int, int], None] | None = None,
    text_name: str = "the text",
) -> SyllablePPLResult:
    """Perplexity per Tibetan syllable: each line (a paragraph) is a document, BOS then every token of the line scored
    once; the total negative log-likelihood is divided by the lines' syllables (tiblocal.text.count_syllables), so
    models with different tokenizers compare on the same text. A line longer than the window is scored in windows
    that overlap by half (BOS in each window's first place, as llama-perplexity's windows): every token after the
    first window has at least half a window before it."""
    from tiblocal.text import count_syllables

    if ctx < 8:
        raise TiblocalError(f"--ctx {ctx} is too small for perplexity; use at least 8 (512 is usual)")
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise TiblocalError(f"{text_name} has no lines to score; give a text file with Tibetan paragraphs")
    nll, count, syllables, stride = 0.0, 0, 0, ctx // 2
    for i, line in enumerate(lines):
        ids = [source.bos_id, *source.tokenize(line)]
        done, start = 1, 0  # done: the next position whose token is scored
        while done < len(ids):
            win = list(ids[start : start + ctx])
            win[0] = source.bos_id
            first = done - start - 1  # the row that predicts ids[done]
            logp = _log_softmax(source.logits(win)[first : len(win) - 1])
            targets = np.asarray(win[first + 1 :])
            nll -= float(logp[np.arange(len(targets)), targets].sum())
            count += len(targets)
            done, start = start + len(win), start + stride
        syllables += count_syllables(line)
        if progress:
            progress(i + 1, len(lines))
    if syllables == 0:
        raise TiblocalError(f"{text_name} has no Tibetan syllables; perplexity per syllable needs Tibetan text")
    return SyllablePPLResult(source.name, math.exp(nll / syllables), nll / syllables / math.log(2), math.exp(nll / count),
                             syllables, count, len(lines), ctx)


def compare(
    ref: LogitSource, quant: LogitSource, text: str, ctx: int, *, max_windows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CompareResult:
    if ref.n_vocab != quant.n_vocab:
        raise TiblocalError(
            f"{ref.name} has {ref.n_vocab} tokens but {quant.name} has {quant.n_vocab}; compare a model with its own "
            "quantization"
        )
    ids = ref.tokenize(text)  # one tokenization, fed to both
    wins = list(windows(ids, ctx, ref.bos_id, max_windows))
    nll_r = nll_q = kl_sum = d2_sum = 0.0
    kl_max = 0.0
    same = count = 0
    for i, win in enumerate(wins):
        rows, targets = _scored(win, ctx)
        lr = _log_softmax(ref.logits(win)[rows])
        lq = _log_softmax(quant.logits(win)[rows])
        idx = np.arange(len(targets))
        pr, pq = lr[idx, targets], lq[idx, targets]  # log-probabilities of the next tokens
        nll_r -= float(pr.sum())
        nll_q -= float(pq.sum())
        d2_sum += float(((pr - pq).astype(np.float64) ** 2).sum())
        kl = (np.exp(lr) * (lr - lq)).sum(-1)  # KL(P_ref || P_quant) per position
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        same += int((lr.argmax(-1) == lq.argmax(-1)).sum())
        count += len(targets)
        if progress:
            progress(i + 1, len(wins))
    ppl_r, ppl_q = math.exp(nll_r / count), math.exp(nll_q / count)
    # ln(PPL_q / PPL_r) is the mean of the per-token differences d; its standard error gives that of ΔPPL %
    mean_d = (nll_q - nll_r) / count
    var_d = max(d2_sum / count - mean_d**2, 0.0)
    se_pct = 100 * math.exp(mean_d) * math.sqrt(var_d / max(count - 1, 1))
    return CompareResult(
        ref.name, quant.name, ppl_r, ppl_q, ppl_q - ppl_r, 100 * (ppl_q - ppl_r) / ppl_r, kl_sum / count, kl_max,
        same / count, count, len(wins), ctx, se_pct,
    )


PROMPT = "བོད་ཀྱི་ལོ་རྒྱུས་སྐོར་ལ་ཚིག་ཐུང་ཞིག་འབྲི་རོགས།"


def decode_speed(path: Path, *, threads: int | None, n_gpu_layers: int, tokens: int = 64) -> float:
    """Greedy decode tokens/s of a GGUF on a short Tibetan prompt."""
    from tiblocal.engine import Engine, EngineConfig, Generation, Sampling

    with Engine(path, EngineConfig(threads=threads, ctx=512, n_gpu_layers=n_gpu_layers)) as e:
        r = Generation()
        for _ in e.generate_tokens(e.tokenize(PROMPT), Sampling(temperature=0, max_tokens=tokens, repeat_penalty=1.0), r):
            pass
    return r.tokens_per_s


def _file_facts(path: Path) -> dict:
    """Type, size and bits per weight of a GGUF, or of a quantized Hugging Face folder (GPTQ)."""
    from tiblocal.gguf_file import read_gguf

    if path.is_dir():
        from tiblocal.checkpoint import load_config

        qcfg = load_config(path).get("quantization_config") or {}
        if not isinstance(qcfg, dict):
            raise ModelFormatError(f"{path / 'config.json'}: quantization_config is a {type(qcfg).__name__}, not an "
                                   "object; fix or re-save the model")
        method, bits = str(qcfg.get("quant_method", "hf")).upper(), qcfg.get("bits")
        return {"file_type": f"{method} {bits}-bit" if bits else method,
                "size_bytes": sum(p.stat().st_size for p in path.glob("*.safetensors")), "bits_per_weight": None}
    info = read_gguf(path, with_tokens=False)
    return {"file_type": info.file_type, "size_bytes": info.size,
            "bits_per_weight": round(8 * sum(t.n_bytes for t in info.tensors) / info.n_params, 3)}


SPEED_TOKENS = 64  # tokens decoded for a report's tokens/s


def quant_report(
    ref: Path, quants: list[Path], text: str, ctx: int, *, max_windows: int | None = None, threads: int | None = None,
    n_gpu_layers: int = 0, speed_tokens: int = SPEED_TOKENS, progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """One row per model (the reference GGUF first): size, bits per weight, file type, ΔPPL, KL, top-1, tokens/s.
    A quant may be a GGUF (llama.cpp) or a GPTQ folder (transformers; no bits per weight or tokens/s)."""
    rows = []
    ref_src = GGUFSource(ref, ctx, threads, n_gpu_layers)
    try:
        for path in [ref, *quants]:
            path = Path(path)
            if progress:
                progress(str(path))
            row = {"model": str(path), **_file_facts(path)}
            if path == ref:
                r = perplexity(ref_src, text, ctx, max_windows=max_windows)
                row.update(ppl=r.ppl, delta_ppl=0.0, delta_ppl_pct=0.0, mean_kl=0.0, top1_agreement=1.0)
            else:
                q = open_source(path, ctx=ctx, threads=threads, n_gpu_layers=n_gpu_layers)
                try:
                    c = compare(ref_src, q, text, ctx, max_windows=max_windows)
                finally:
                    q.close()
                row.update(ppl=c.ppl_quant, delta_ppl=c.delta_ppl, delta_ppl_pct=c.delta_ppl_pct,
                           delta_ppl_pct_se=c.delta_ppl_pct_se, mean_kl=c.mean_kl, top1_agreement=c.top1_agreement)
            row["tokens_per_s"] = (
                None if path.is_dir() else decode_speed(path, threads=threads, n_gpu_layers=n_gpu_layers, tokens=speed_tokens)
            )
            rows.append(row)
    finally:
        ref_src.close()
    return rows


REPORT_COLUMNS = (
    ("model", "model", "{}"), ("file_type", "type", "{}"), ("size_bytes", "size (MiB)", None),
    ("bits_per_weight", "bits/weight", "{:.2f}"), ("ppl", "PPL", "{:.4f}"), ("delta_ppl_pct", "ΔPPL", "{:+.3f}%"),
    ("mean_kl", "mean KL", "{:.6f}"), ("top1_agreement", "top-1", "{:.2%}"), ("tokens_per_s", "tokens/s", "{:.1f}"),
)


def format_cell(key: str, fmt: str | None, row: dict) -> str:
    if row.get(key) is None:
        return "—"  # not measured for this row (e.g. tokens/s of a GPTQ folder)
    if key == "size_bytes":
        return f"{row[key] / 2**20:.1f}"
    if key == "model":
        return Path(row[key]).name
    if key == "delta_ppl_pct" and row.get("delta_ppl_pct_se"):
        return f"{row[key]:+.3f}% ± {row['delta_ppl_pct_se']:.3f}%"
    return fmt.format(row[key])


def report_markdown(rows: list[dict], title: str) -> str:
    head = "| " + " | ".join(label for _, label, _ in REPORT_COLUMNS) + " |"
    sep = "|" + "---|" * len(REPORT_COLUMNS)
    body = ["| " + " | ".join(format_cell(k, f, r) for k, _, f in REPORT_COLUMNS) + " |" for r in rows]
    return "\n".join([f"## {title}", "", head, sep, *body, ""])
