"""Load on `tiblocal serve`: K clients × M requests, streamed and not, with hostile requests mixed in.

Starts the server itself (any `tiblocal serve` options after ``--``), then for each client count runs a round in which
every client sends its requests one after another, all clients together (a wave per request): a prompt of about ``--prompt-tokens`` tokens and answers of exactly
``--max-tokens`` tokens (``ignore_eos``), alternately streamed and whole. With ``--chaos`` (default on) some requests are
instead a client that goes away mid-stream, a prompt over the context, or a body that is not valid; each must get its
status and error object. It asserts, and fails loudly otherwise, that

- every valid request is answered, with usage that matches (exactly max_tokens generated, the same prompt count for
  the same prompt, the server's own token counter moved by the answers' sum);
- every slot is free and the queue empty at the end of each round;
- the server's memory does not grow over repeated rounds of the largest client count (``--repeat``; the first of
  them warms up);

and reports requests/s, tokens/s over the round's wall time, aggregate decode tokens/s and p50/p95 time to first
token per client count. Aggregate decode tokens/s is, for each wave, the sum of its answers' own decode speeds
(tokens over the server's time from an answer's first token to its last), the median over the waves: with as many
clients as slots and equal answers, llama-batched-bench's S_TG for that batch size is its reference (`--batched-bench`
runs it on the same model in the same run and prints the ratios). Answers of one wave whose prompts are evaluated in
different steps do not decode side by side for all their length, so that sum is an upper bound of the aggregate; the
"wave tok/s" column is the lower bound, a wave's tokens over the time from its first text to its last end, and
bench_slots.py measures the steady state of N slots without HTTP. Hostile requests (--chaos) leave fewer answers in a
wave, so measure speed with --no-chaos.

    python benchmarks/bench_serve.py --clients 1,2,4,8 --requests 6 -- --parallel 8
    python benchmarks/bench_serve.py MODEL.gguf --clients 1,2,4,8,16 --requests 4 --prompt-tokens 128 --max-tokens 128 \
        --batched-bench build/bin/llama-batched-bench -- --parallel 16 --n-gpu-layers -1 --flash-attn on
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

from tiblocal.serve.process import Server

SEED_TEXT = ("བོད་ཀྱི་ལོ་རྒྱུས་ནི་ལོ་ངོ་སྟོང་ཕྲག་མང་པོའི་གོང་ནས་འགོ་ཚུགས་ཤིང་། རྒྱལ་རབས་དང་ཆོས་ལུགས་ཀྱི་འཕེལ་རིམ་"
             "ལ་ཞིབ་འཇུག་བྱེད་པ་ནི་ཤེས་ཡོན་གྱི་ལས་དོན་གལ་ཆེན་ཞིག་ཡིན། ")


@dataclass
class Outcome:
    kind: str  # whole | stream | gone | too_long | invalid
    ok: bool = False
    status: int = 0
    ttft: float | None = None  # seconds from sending to the first text
    first: float | None = None  # perf_counter of the first text
    end: float | None = None
    predicted_ms: float = 0.0  # the server's time from this answer's first token to its last
    wave: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    problem: str = ""


@dataclass
class Round:
    clients: int
    outcomes: list[Outcome] = field(default_factory=list)
    wall: float = 0.0


def prompt_of(server: Server, n_tokens: int) -> str:
    """A Tibetan user message whose rendered prompt is about ``n_tokens`` tokens."""
    text = SEED_TEXT
    while len(httpx.post(server.url + "/tokenize", json={"content": text}).json()["tokens"]) < n_tokens:
        text += SEED_TEXT
    ids = httpx.post(server.url + "/tokenize", json={"content": text}).json()["tokens"][: max(1, n_tokens - 30)]
    return httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["content"]


def one(server: Server, kind: str, body: dict, timeout: float) -> Outcome:
    o = Outcome(kind)
    url = server.api + "/chat/completions"
    t0 = time.perf_counter()
    try:
        if kind == "invalid":
            r = httpx.post(url, content=b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
                           headers={"Content-Type": "application/json"}, timeout=timeout)
            o.status = r.status_code
            o.ok = r.status_code == 400 and "temperature" in r.json()["error"]["message"]
        elif kind == "too_long":
            r = httpx.post(url, json={**body, "messages": [{"role": "user", "content": SEED_TEXT * 400}]},
                           timeout=timeout)
            o.status = r.status_code
            o.ok = r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        elif kind == "whole":
            r = httpx.post(url, json=body, timeout=timeout)
            o.status, o.end = r.status_code, time.perf_counter()
            data = r.json()
            u = data["usage"]
            o.prompt_tokens, o.completion_tokens = u["prompt_tokens"], u["completion_tokens"]
            o.predicted_ms = data["timings"]["predicted_ms"]
            o.first = o.end - o.predicted_ms / 1000
            o.ttft = data["timings"]["first_token_ms"] / 1000
            o.ok = r.status_code == 200 and data["choices"][0]["finish_reason"] == "length"
        else:  # stream, or gone: a stream abandoned after its first text
            with httpx.stream("POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                              timeout=timeout) as r:
                o.status = r.status_code
                lines = r.iter_lines()
                finish = None
                for line in lines:
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        o.prompt_tokens = chunk["usage"]["prompt_tokens"]
                        o.completion_tokens = chunk["usage"]["completion_tokens"]
                        o.predicted_ms = chunk["timings"]["predicted_ms"]
                    elif chunk["choices"] and chunk["choices"][0]["delta"].get("content") and o.first is None:
                        o.first = time.perf_counter()
                        o.ttft = o.first - t0
                        if kind == "gone":
                            o.ok = True
                            return o  # leaving the with-block closes the connection mid-answer
                    elif chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                        finish = chunk["choices"][0]["finish_reason"]
                o.end = time.perf_counter()
                o.ok = o.status == 200 and finish == "length"
    except httpx.HTTPError as e:
        o.problem = f"{type(e).__name__}: {e}"
    return o


def run_round(server: Server, clients: int, requests: int, body: dict, chaos: bool, rng: random.Random,
              timeout: float) -> Round:
    plan = []
    for c in range(clients):
        kinds = []
        for i in range(requests):
            roll = rng.random() if chaos else 1.0
            kinds.append("gone" if roll < 0.1 else "too_long" if roll < 0.15 else "invalid" if roll < 0.2
                         else ("stream" if (c + i) % 2 else "whole"))
        plan.append(kinds)
    rnd = Round(clients)
    lock = threading.Lock()
    barrier = threading.Barrier(clients)  # each wave: every client sends at once, as batched-bench's B sequences start

    def client(kinds: list[str]) -> None:
        for wave, kind in enumerate(kinds):
            barrier.wait()
            o = one(server, kind, body, timeout)
            o.wave = wave
            with lock:
                rnd.outcomes.append(o)

    threads = [threading.Thread(target=client, args=(k,)) for k in plan]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rnd.wall = time.perf_counter() - t0
    return rnd


def metric(server: Server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def batched_bench(binary: str, model: str, clients: list[int], pp: int, tg: int, extra: list[str]) -> dict[int, float]:
    """llama-batched-bench's S_TG (decode tokens/s) for each batch size, on the same model."""
    cmd = [binary, "-m", model, "-npp", str(pp), "-ntg", str(tg), "-npl", ",".join(map(str, clients)),
           "-c", str(max(clients) * (pp + tg) + 256), *extra]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=True).stdout
    result = {}
    for line in out.splitlines():  # |    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s | ...
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and re.fullmatch(r"\d+", cells[0] or "x"):
            result[int(cells[2])] = float(cells[7])
    print(out, file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="a .gguf (default: the bundled model)")
    ap.add_argument("--clients", default="1,2,4,8", help="client counts, one round each (default 1,2,4,8)")
    ap.add_argument("--requests", type=int, default=6, help="requests per client per round (default 6)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--no-chaos", dest="chaos", action="store_false", help="only valid requests")
    ap.add_argument("--warmup-rounds", type=int, default=1, help="rounds before the measured ones (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds with the largest client count run again this many times, for the memory check")
    ap.add_argument("--rss-growth", type=float, default=0.02,
                    help="largest RSS growth allowed over the repeated rounds, as a share (default 0.02)")
    ap.add_argument("--batched-bench", default=None, metavar="BIN", help="llama-batched-bench, run on the same model")
    ap.add_argument("--batched-bench-args", default="", help="its extra arguments, e.g. '-ngl 99 -fa on'")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    clients = [int(c) for c in a.clients.split(",")]
    rng = random.Random(a.seed)
    server = Server(*([a.model] if a.model else []), "--ctx", str(max(512, 2 * (a.prompt_tokens + a.max_tokens))),
                    *serve_args, timeout=300)
    failures: list[str] = []
    rows = []
    try:
        body = {"messages": [{"role": "user", "content": prompt_of(server, a.prompt_tokens)}],
                "max_tokens": a.max_tokens, "ignore_eos": True, "temperature": 0.7, "seed": 1}
        for _ in range(a.warmup_rounds):
            run_round(server, max(clients), 1, body, False, rng, a.timeout)
        rss = []  # after each round
        for c in clients + [max(clients)] * a.repeat:
            before = metric(server, "tiblocal_completion_tokens_total")
            rnd = run_round(server, c, a.requests, body, a.chaos, rng, a.timeout)
            served = [o for o in rnd.outcomes if o.kind in ("whole", "stream")]
            for o in rnd.outcomes:
                if not o.ok:
                    failures.append(f"{c} clients: a {o.kind} request failed (status {o.status}) {o.problem}")
            for o in served:
                if o.completion_tokens != a.max_tokens:
                    failures.append(f"{c} clients: usage says {o.completion_tokens} tokens, asked {a.max_tokens}")
            if len({o.prompt_tokens for o in served}) > 1:
                failures.append(f"{c} clients: one prompt counted as {sorted({o.prompt_tokens for o in served})}")
            # The server counts what it sent whole: the answers, and those of clients that left after the answer
            # was complete (a short answer can end before the client goes)
            counted = metric(server, "tiblocal_completion_tokens_total") - before
            answered = sum(o.completion_tokens for o in served)
            gone = sum(1 for o in rnd.outcomes if o.kind == "gone")
            if not answered <= counted <= answered + gone * a.max_tokens or (counted - answered) % a.max_tokens:
                failures.append(f"{c} clients: the server counted {counted:.0f} tokens, the answers say {answered} "
                                f"(and {gone} clients left early)")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                h = httpx.get(server.url + "/health").json()
                if h["slots_processing"] == 0 and h["queue"] == 0:
                    break
                time.sleep(0.05)
            else:
                failures.append(f"{c} clients: slots still busy after the round: {h}")
            rss.append(server.rss_bytes)
            # A wave's answers decode side by side: its aggregate decode speed is the sum of their own speeds (tokens
            # over the server's time from their first token to their last), as batched-bench's S_TG is for B sequences.
            waves = [sum(o.completion_tokens / (o.predicted_ms / 1000) for o in served if o.wave == w and o.predicted_ms)
                     for w in range(a.requests)]
            # The same wave as the client saw it: its tokens over the time from its first text to its last answer's
            # end. Answers whose prompts were evaluated in a later step start later and decode beside fewer others,
            # so the sum of speeds above is an upper bound of the aggregate, this a lower one.
            spans = []
            for w in range(a.requests):
                ws = [o for o in served if o.wave == w and o.first is not None and o.end is not None]
                if ws:
                    spans.append(sum(o.completion_tokens for o in ws) / (max(o.end for o in ws) - min(o.first for o in ws)))
            tokens = sum(o.completion_tokens for o in served)
            ttfts = [o.ttft for o in served if o.ttft is not None]
            rows.append({
                "clients": c, "requests": len(rnd.outcomes), "served": len(served),
                "hostile": len(rnd.outcomes) - len(served), "requests_per_s": len(served) / rnd.wall,
                "tokens_per_s": tokens / rnd.wall,
                "decode_tokens_per_s": statistics.median([w for w in waves if w] or [float("nan")]),
                "wave_tokens_per_s": statistics.median(spans or [float("nan")]),
                "ttft_p50_ms": pct(ttfts, 0.5) * 1000, "ttft_p95_ms": pct(ttfts, 0.95) * 1000, "rss_mb": rss[-1] / 2**20,
            })
        # The same load again and again must not need more memory each time. More clients at once may need more
        # (connections, sampler threads), and the allocator keeps its high-water mark (an oversized prompt's text),
        # so the first round of the largest client count is the warm-up and the later ones are compared with the
        # second: a leak grows every round.
        same = [r for r, c in zip(rss, clients + [max(clients)] * a.repeat) if c == max(clients)]
        if len(same) > 2 and same[-1] > same[1] * (1 + a.rss_growth):
            failures.append(f"memory grew from {same[1] / 2**20:.1f} MB to {same[-1] / 2**20:.1f} MB over "
                            f"{len(same) - 1} rounds of {max(clients)} clients")
    finally:
        rc = server.stop()
        log = server.stderr
        if rc != 0 or "Traceback" in log:
            failures.append(f"the server ended with {rc}" + (" and a traceback in its log" if "Traceback" in log else ""))
    reference = {}
    if a.batched_bench:
        reference = batched_bench(a.batched_bench, a.model, clients, a.prompt_tokens, a.max_tokens,
                                  a.batched_bench_args.split())
    print(f"{'clients':>7} {'requests':>8} {'hostile':>7} {'req/s':>7} {'tok/s':>8} {'decode tok/s':>12} {'wave tok/s':>10} "
          f"{'TTFT p50 ms':>11} {'p95 ms':>8} {'RSS MB':>7}" + ("  batched-bench S_TG  ratio" if reference else ""))
    for r in rows:
        ref = reference.get(r["clients"])
        if ref:
            r["batched_bench_s_tg"] = ref
            r["ratio"] = r["decode_tokens_per_s"] / ref
        print(f"{r['clients']:>7} {r['requests']:>8} {r['hostile']:>7} {r['requests_per_s']:>7.2f} "
              f"{r['tokens_per_s']:>8.1f} {r['decode_tokens_per_s']:>12.1f} {r['wave_tokens_per_s']:>10.1f} {r['ttft_p50_ms']:>11.1f} "
              f"{r['ttft_p95_ms']:>8.1f} {r['rss_mb']:>7.1f}" + (f"  {ref:>18.1f}  {r['ratio']:.2f}" if ref else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "failures": failures, "args": vars(a), "serve_args": serve_args}, f, indent=1)
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
