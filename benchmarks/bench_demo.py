"""The bundled demo model on this machine's CPU: first-token latency, decode speed and answer quality.

For each Tibetan prompt (those of tests/test_demo.py), one answer of up to --tokens tokens with the model's
suggested sampling (the GGUF's general.sampling.*) and a fixed seed: the time from the call to the first
token (prompt evaluation included, model already loaded), tokens/s, the Tibetan share of the characters,
U+FFFD count, the distinct-bigram share of the tokens and the longest run of one phrase of 3+ syllables (issue 28's
repetition check: at most 2). Also the load time of the model.

    python benchmarks/bench_demo.py --threads 2 --out demo.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    from test_demo import PROMPTS

    from tiblocal.engine import Engine, EngineConfig, Generation, Sampling
    from tiblocal.models import BUNDLED_MODEL
    from tiblocal.templates import get_template
    from tiblocal.text import distinct_bigram_share, longest_phrase_run, tibetan_share

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    template = get_template("alpaca")
    t0 = time.perf_counter()
    rows = []
    with Engine(args.model, EngineConfig(ctx=1024, threads=args.threads)) as e:
        load_s = time.perf_counter() - t0
        for i, prompt in enumerate(PROMPTS):
            sampling = Sampling.for_model(args.model, max_tokens=args.tokens, seed=100 + i)
            ids = e.tokenize(template.render([{"role": "user", "content": prompt}], add_generation_prompt=True))
            e.reset()
            g = Generation()
            out = list(e.generate_tokens(ids, sampling, g))
            text = e.detokenize(out)
            rows.append({"prompt": prompt, "prompt_tokens": len(ids), "tokens": len(out), "first_token_ms": round(g.first_token_ms, 1),
                         "tokens_per_s": round(g.tokens_per_s, 1), "tibetan_share": round(tibetan_share(text), 4),
                         "replacement_chars": text.count("\ufffd"), "distinct_bigrams": round(distinct_bigram_share(out), 3),
                         "phrase_run": longest_phrase_run(text)[0], "text": text})
    summary = {
        "model": str(args.model), "size_mib": round(args.model.stat().st_size / 2**20, 1), "load_s": round(load_s, 2),
        "first_token_ms_max": max(r["first_token_ms"] for r in rows),
        "first_token_ms_median": statistics.median(r["first_token_ms"] for r in rows),
        "tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in rows if r["tokens"] > 1), 1),
        "tibetan_share_all": round(tibetan_share("".join(r["text"] for r in rows)), 4),
        "prompts_with_tibetan_share_ge_095": sum(r["tibetan_share"] >= 0.95 for r in rows),
        "prompts_with_distinct_bigrams_ge_05": sum(r["distinct_bigrams"] >= 0.5 for r in rows),
        "prompts": len(rows), "replacement_chars": sum(r["replacement_chars"] for r in rows),
        "longest_phrase_run": max(r["phrase_run"] for r in rows),
    }
    result = {"summary": summary, "rows": rows}
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    for r in rows:
        print(r["tokens"], r["first_token_ms"], r["tibetan_share"], r["distinct_bigrams"], r["text"][:60].replace("\n", " "))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
