"""`tiblocal serve` through real clients: the `openai` SDK, httpx for the raw event stream, subprocess servers.

Two servers live for the whole module (a tiny random model, and the bundled model); tests that need other flags start
their own. Every server must stop on SIGTERM with exit 0 and no traceback in its log.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from conftest import rewrite_gguf, run_cli
from tiblocal.serve.process import Server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

TIBETAN_PROMPTS = [
    "བོད་ཀྱི་ལོ་རྒྱུས་སྐོར་ཅུང་ཙམ་ཤོད།",
    "བཀྲ་ཤིས་བདེ་ལེགས། ཁྱེད་རང་སྐུ་ཁམས་བཟང་ངམ།",
    "ལྷ་ས་ནི་གང་འདྲ་ཞིག་ཡིན།",
    "སློབ་གྲྭའི་སྐོར་ལ་རྩོམ་ཐུང་ཞིག་འབྲི་རོགས།",
]


def _finish(server: Server) -> None:
    rc = server.stop()
    log = server.stderr
    assert rc == 0, log
    assert "Traceback" not in log, log
    assert "tiblocal serve: stopped" in log


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    s = Server(str(tiny_gguf), "--parallel", "4", "--ctx", "256", "--max-body", "65536")
    yield s
    _finish(s)


@pytest.fixture(scope="module")
def demo():
    s = Server("--parallel", "4", "--ctx", "1024")
    yield s
    _finish(s)


def client(server: Server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def _raw(server: Server, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, server.url + path, timeout=60, **kw)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- the API through the openai SDK ------------------------------------------------------------------------


def test_models_lists_the_gguf(tiny, tiny_gguf) -> None:
    models = client(tiny).models.list()
    assert [m.id for m in models.data] == [tiny_gguf.stem]
    assert client(tiny).models.retrieve(tiny_gguf.stem).id == tiny_gguf.stem


def test_chat_answer_is_the_chat_commands_answer(demo) -> None:
    """temperature 0: the server's answer is `tiblocal generate`'s (same template, BOS, ids and sampling)."""
    c = client(demo)
    r = c.chat.completions.create(model="tiblocal-demo", messages=[{"role": "user", "content": TIBETAN_PROMPTS[0]}],
                                  temperature=0, max_tokens=48)
    text = r.choices[0].message.content
    assert text and "\ufffd" not in text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 48
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    p = run_cli("generate", "--prompt", TIBETAN_PROMPTS[0], "--temp", "0", "--max-tokens", "48", "--json")
    assert p.returncode == 0, p.stderr.decode()
    ref = json.loads(p.stdout)
    assert text == ref["text"]
    assert r.usage.prompt_tokens == ref["prompt_tokens"]
    assert r.usage.completion_tokens == ref["completion_tokens"]


def test_stream_equals_whole_answer_and_reports_usage(demo) -> None:
    c = client(demo)
    kw = dict(model="tiblocal-demo", messages=[{"role": "system", "content": "ཁྱེད་ནི་རོགས་པ་ཡིན།"},
                                              {"role": "user", "content": TIBETAN_PROMPTS[1]}],
              temperature=0, max_tokens=40)
    whole = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    for ch in chunks:  # every chunk is whole characters: no piece of a split UTF-8 sequence
        assert "\ufffd" not in (ch.choices[0].delta.content or "" if ch.choices else "")


def test_raw_event_stream_ends_with_done(tiny) -> None:
    body = {"messages": [{"role": "user", "content": "hello"}], "stream": True, "max_tokens": 5, "ignore_eos": True}
    with httpx.stream("POST", tiny.api + "/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length"
    assert sum(1 for e in events[1:-2] if json.loads(e[6:])["choices"][0]["delta"].get("content")) <= 5


def test_completions_endpoint_continues_a_raw_prompt(demo) -> None:
    c = client(demo)
    r = c.completions.create(model="tiblocal-demo", prompt="བོད་ནི་", max_tokens=16, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiblocal-demo", prompt="བོད་ནི་", max_tokens=16, temperature=0, stream=True))
    assert streamed == r.choices[0].text
    assert r.usage.prompt_tokens == len(_raw(demo, "POST", "/tokenize", json={"content": "བོད་ནི་", "add_special": True}).json()["tokens"])


def test_max_tokens_and_max_completion_tokens_and_stop(tiny) -> None:
    c = client(tiny)
    msgs = [{"role": "user", "content": "hello"}]
    r = c.chat.completions.create(model=c.models.list().data[0].id, messages=msgs, max_completion_tokens=7, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    full = c.chat.completions.create(model=c.models.list().data[0].id, messages=msgs, temperature=0, max_tokens=30,
                                     extra_body={"ignore_eos": True}).choices[0].message.content
    assert len(full) > 4
    stop = full[2:4]
    cut = c.chat.completions.create(model=c.models.list().data[0].id, messages=msgs, temperature=0, max_tokens=30,
                                    stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)]


def test_seed_makes_sampling_repeatable(tiny) -> None:
    c = client(tiny)
    mid = c.models.list().data[0].id
    kw = dict(model=mid, messages=[{"role": "user", "content": "hi"}], temperature=1.0, top_p=0.95, seed=42,
              max_tokens=20, frequency_penalty=0.5, presence_penalty=0.2, extra_body={"top_k": 50, "repeat_penalty": 1.2})
    a = c.chat.completions.create(**kw).choices[0].message.content
    b = c.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_json_schema_answer_parses(tiny) -> None:
    c = client(tiny)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    r = c.chat.completions.create(
        model=c.models.list().data[0].id, messages=[{"role": "user", "content": "give json"}], max_tokens=200,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"n", "ok"} and isinstance(data["n"], int) and isinstance(data["ok"], bool)
    r = c.chat.completions.create(model=c.models.list().data[0].id, messages=[{"role": "user", "content": "json"}],
                                  max_tokens=60, temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].message.content.lstrip().startswith("{")


def test_tokenize_gives_sentencepiece_ids_and_detokenize_inverts(demo) -> None:
    import sentencepiece as spm

    from tiblocal.vocab import tokenizer_model

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model("bundled")))
    text = "བཀྲ་ཤིས་བདེ་ལེགས། hello 2026"
    ids = _raw(demo, "POST", "/tokenize", json={"content": text}).json()["tokens"]
    assert ids == sp.encode(text)
    with_bos = _raw(demo, "POST", "/tokenize", json={"content": text, "add_special": True}).json()["tokens"]
    assert with_bos == [sp.bos_id(), *ids]
    pieces = _raw(demo, "POST", "/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids
    assert _raw(demo, "POST", "/detokenize", json={"tokens": ids}).json()["content"] == sp.decode(ids)


def test_next_turn_reuses_the_cached_prefix(demo) -> None:
    c = client(demo)
    msgs = [{"role": "user", "content": TIBETAN_PROMPTS[2]}]
    first = c.chat.completions.create(model="tiblocal-demo", messages=msgs, temperature=0, max_tokens=20)
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": TIBETAN_PROMPTS[3]}]
    second = c.chat.completions.with_raw_response.create(model="tiblocal-demo", messages=msgs, temperature=0,
                                                         max_tokens=20)
    timings = json.loads(second.text)["timings"]
    assert timings["cache_n"] >= first.usage.prompt_tokens - 1  # only the new turn was evaluated
    assert timings["prompt_n"] + timings["cache_n"] == json.loads(second.text)["usage"]["prompt_tokens"]


def test_concurrent_greedy_answers_equal_one_at_a_time(demo) -> None:
    """--parallel 4: four requests batched together give exactly what each gives alone."""
    c = client(demo)

    def ask(prompt: str) -> str:
        return c.chat.completions.create(model="tiblocal-demo", messages=[{"role": "user", "content": prompt}],
                                         temperature=0, max_tokens=64).choices[0].message.content

    alone = [ask(p) for p in TIBETAN_PROMPTS]
    together: list[str | None] = [None] * len(TIBETAN_PROMPTS)
    steps_before = _metric(demo, "tiblocal_decode_steps_total")

    def run(i: int) -> None:
        together[i] = ask(TIBETAN_PROMPTS[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(TIBETAN_PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    tokens = sum(len(_raw(demo, "POST", "/tokenize", json={"content": a}).json()["tokens"]) for a in alone)
    # batched: fewer decode calls than one per generated token
    assert _metric(demo, "tiblocal_decode_steps_total") - steps_before < tokens


def _metric(server: Server, name: str) -> float:
    for line in _raw(server, "GET", "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


def test_health_props_metrics_and_the_log(tiny) -> None:
    assert _raw(tiny, "GET", "/health").json()["status"] == "ok"
    props = _raw(tiny, "GET", "/props").json()
    assert props["n_ctx"] == 256 and props["parallel"] == 4 and {t["name"] for t in props["tasks"]} >= {"summary", "tense"}
    client(tiny).chat.completions.create(model=props["model"], messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                         extra_body={"ignore_eos": True})
    text = _raw(tiny, "GET", "/metrics").text
    for name in ("tiblocal_requests_total{status=\"200\"}", "tiblocal_completion_tokens_total", "tiblocal_slots_busy",
                 "tiblocal_queue_length", "tiblocal_prompt_tokens_total"):
        assert name in text
    assert _metric(tiny, "tiblocal_completion_tokens_total") >= 3
    time.sleep(0.2)
    lines = [line for line in tiny.stderr.splitlines() if "POST /v1/chat/completions 200" in line]
    assert lines and lines[-1].split()[-2:] == [lines[-1].split()[-2], "ms"] and "+3 tokens" in lines[-1]


# --- refusals: each with its status and OpenAI's error object, the server serving on -----------------------


BAD_BODIES = [
    ("invalid JSON", b'{"messages": [', "not valid JSON"),
    ("a JSON list", b"[1, 2]", "JSON list"),
    ("wrong type", {"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}, "max_tokens"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("empty messages", {"messages": []}, "messages"),
    ("no messages", {"model": "x"}, "messages"),
    ("n=2", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "n is 2"),
    ("negative max_tokens", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, "max_tokens"),
    ("zero max_completion_tokens", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("NaN temperature", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "temperature"),
    ("infinite top_p", b'{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}', "top_p"),
    ("top_p 0", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ("seed too large", {"messages": [{"role": "user", "content": "x"}], "seed": 2**40}, "seed"),
    ("top_k past int32", {"messages": [{"role": "user", "content": "x"}], "top_k": 2**32 + 1}, "top_k 4294967297"),
    ("temperature past a C float", {"messages": [{"role": "user", "content": "x"}], "temperature": 1e308},
     "temperature 1e+308 (expected a finite number; llama.cpp takes it as a 32-bit float"),
    ("repeat_penalty 0 as a C float", {"messages": [{"role": "user", "content": "x"}], "repeat_penalty": 1e-320},
     "repeat_penalty 1e-320 (expected > 0; 1 disables it; it is 0 as the 32-bit float"),
    ("stop of a wrong type", {"messages": [{"role": "user", "content": "x"}], "stop": 5}, "stop"),
    ("penalty out of range", {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 3}, "presence_penalty"),
    ("system not first", {"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"},
                                       {"role": "user", "content": "z"}]}, "system message must come first"),
    ("assistant last", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "last message must be the user's"),
    ("logprobs", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ("image content", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ("json_schema without a schema", {"messages": [{"role": "user", "content": "x"}],
                                      "response_format": {"type": "json_schema"}}, "json_schema"),
    *(("nested too deeply", b"[" * 5000 + b"]" * 5000, "nested too deeply"),
      ("a number of 5,000 digits", b'{"messages": [{"role": "user", "content": "x"}], "seed": 1' + b"0" * 4999 + b"}",
       "4300 digits"),
      ("a lone surrogate", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
       "lone UTF-16 surrogate (\\ud800)")),
]


@pytest.mark.parametrize("body,expected", [(b, e) for _, b, e in BAD_BODIES], ids=[n for n, _, _ in BAD_BODIES])
def test_bad_chat_request_is_a_400(tiny, body, expected) -> None:
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    err = _error(_raw(tiny, "POST", "/v1/chat/completions", **kw), 400)
    assert expected in err["message"] and err["type"] == "invalid_request_error"
    assert _raw(tiny, "GET", "/health").json()["status"] == "ok"


@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize", "/detokenize"])
def test_bodies_json_reads_but_python_cannot_hold_are_a_400_on_every_route(tiny, path) -> None:
    """Nesting deeper than the parser's recursion, a number past Python's 4,300 digits, and a lone surrogate escape
    (text that cannot be tokenized) are each a 400 naming the problem, not a 500."""
    ok = {"/v1/completions": b'"prompt": "a", "max_tokens": 1', "/tokenize": b'"content": "a"',
          "/detokenize": b'"tokens": [1]'}[path]
    for body, expected in [(b"{" + ok + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
                           (b"{" + ok + b', "x": 1' + b"0" * 4999 + b"}", "4300 digits"),
                           (b"{" + ok + b', "x": {"y": ["\\uDC00"]}}', "lone UTF-16 surrogate (\\udc00)")]:
        err = _error(_raw(tiny, "POST", path, content=body, headers={"Content-Type": "application/json"}), 400)
        assert expected in err["message"], err
    pair = b"{" + ok + b', "x": "\\ud83d\\ude00"}'  # a surrogate pair is a character
    assert _raw(tiny, "POST", path, content=pair, headers={"Content-Type": "application/json"}).status_code == 200


def test_bad_requests_raise_the_sdks_exceptions(tiny) -> None:
    c = client(tiny)
    mid = c.models.list().data[0].id
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=mid, messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")
    with pytest.raises(openai.BadRequestError) as e:  # ~4 characters a token: far over 256 tokens
        c.chat.completions.create(model=mid, messages=[{"role": "user", "content": "hello world " * 300}])
    assert e.value.code == "context_length_exceeded" and "context holds 256" in e.value.message
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=mid, prompt=["a", "b"])
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=mid, prompt="a", echo=True)


def test_unknown_route_method_and_token_ids(tiny) -> None:
    assert "unknown route" in _error(_raw(tiny, "GET", "/v1/nothing"), 404)["message"]
    _error(_raw(tiny, "GET", "/v1/chat/completions"), 405)
    assert "not a token id" in _error(_raw(tiny, "POST", "/detokenize", json={"tokens": [1, -3]}), 400)["message"]
    _error(_raw(tiny, "POST", "/tokenize", json={"content": 5}), 400)


def test_body_over_the_limit_is_a_413(tiny) -> None:
    big = {"messages": [{"role": "user", "content": "x" * 70000}]}
    err = _error(_raw(tiny, "POST", "/v1/chat/completions", json=big), 413)
    assert "65,536" in err["message"]

    def chunked():  # no Content-Length: counted while it arrives
        for _ in range(20):
            yield b"x" * 8192

    _error(_raw(tiny, "POST", "/v1/chat/completions", content=chunked()), 413)
    with pytest.raises(openai.APIStatusError) as e:
        client(tiny).chat.completions.create(model="x", messages=[{"role": "user", "content": "x" * 70000}])
    assert e.value.status_code == 413


def _slots_free_soon(server: Server) -> bool:
    deadline = time.monotonic() + 10
    while _raw(server, "GET", "/health").json()["slots_processing"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return _raw(server, "GET", "/health").json()["slots_processing"] == 0


# The bundled model answers about 400 tokens/s on 2 cores: a 1,000-token answer keeps its slot busy for seconds.
LONG = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 100000, "ignore_eos": True}


def _first_token(r: httpx.Response):
    """Read a stream up to its first generated text (the first chunk, the role, comes before the slot is taken).
    Returns the line iterator, to be kept: closing it (as a `break` out of it would) closes the connection."""
    lines = r.iter_lines()
    for line in lines:
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            return lines
    raise AssertionError("the stream ended before any text")


def test_client_gone_mid_stream_frees_its_slot(demo) -> None:
    before = _metric(demo, "tiblocal_completion_tokens_total")
    for _ in range(3):
        with httpx.stream("POST", demo.api + "/chat/completions", json={**LONG, "stream": True}, timeout=30) as r:
            lines = _first_token(r)  # noqa: F841 (kept open)
            assert _raw(demo, "GET", "/health").json()["slots_processing"] >= 1
    t0 = time.monotonic()
    assert _slots_free_soon(demo)
    assert time.monotonic() - t0 < 1.0  # freed at once, not when the 1,000 tokens would have been done
    assert _metric(demo, "tiblocal_completion_tokens_total") == before  # abandoned answers are not counted as served
    assert client(demo).chat.completions.create(model="tiblocal-demo", messages=[{"role": "user", "content": "x"}],
                                                max_tokens=2).choices


def test_client_gone_before_a_whole_answer_frees_its_slot(demo) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(demo.api + "/chat/completions", json=LONG, timeout=0.5)
    t0 = time.monotonic()
    assert _slots_free_soon(demo)
    assert time.monotonic() - t0 < 1.0


def test_api_key(tiny_gguf) -> None:
    with Server(str(tiny_gguf), "--api-key", "s3cret") as s:
        with pytest.raises(openai.AuthenticationError) as e:
            client(s).models.list()
        assert "no API key" not in e.value.message and "wrong" in e.value.message
        assert "no API key was given" in _error(_raw(s, "GET", "/v1/models"), 401)["message"]
        _error(_raw(s, "GET", "/metrics"), 401)
        _error(_raw(s, "GET", "/v1/models", headers={"Authorization": "Bearer s3cretX"}), 401)
        assert client(s, api_key="s3cret").models.list().data
        assert _raw(s, "GET", "/health").status_code == 200  # public, as llama-server's
        assert _raw(s, "GET", "/").status_code == 200  # the page asks for the key itself
        assert _raw(s, "GET", "/props").json()["api_key_required"] is True
    with Server(str(tiny_gguf), env={"TIBLOCAL_API_KEY": "fromenv"}) as s:
        _error(_raw(s, "GET", "/v1/models"), 401)
        assert client(s, api_key="fromenv").models.list().data
        _finish(s)


def test_burst_beyond_the_queue_is_a_503_with_retry_after() -> None:
    with Server("--parallel", "1", "--queue", "1") as s:
        with httpx.stream("POST", s.api + "/chat/completions", json={**LONG, "stream": True}, timeout=30) as r1:
            lines = _first_token(r1)  # noqa: F841 (the slot is taken; kept open)
            waiting = threading.Thread(target=lambda: httpx.post(s.api + "/chat/completions", json={
                "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}, timeout=30))
            waiting.start()
            deadline = time.monotonic() + 10
            while _raw(s, "GET", "/health").json()["queue"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            r = _raw(s, "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            err = _error(r, 503)
            assert r.headers["Retry-After"] == "1" and "busy" in err["message"]
            with pytest.raises(openai.InternalServerError) as e:
                client(s).chat.completions.create(model=None, messages=[{"role": "user", "content": "x"}])
            assert e.value.status_code == 503
        waiting.join()
        assert _metric(s, 'tiblocal_requests_total{status="503"}') == 2
        _finish(s)


HOSTILE_TEMPLATES = [
    ("escapes the sandbox", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "cannot be rendered"),
    ("never ends", "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}x"
                   "{% endfor %}{% endfor %}{% endfor %}", "exceeds its budget"),
    ("divides by zero", "{{ 1/0 }}", "ZeroDivisionError"),
    ("asks for 100 GB", "{{ 'a' * 10**11 }}", "exceeds its budget"),
]


def test_hostile_chat_templates_are_400s(tmp_path, tiny_gguf) -> None:
    for i, (_, jinja, expected) in enumerate(HOSTILE_TEMPLATES):
        model = rewrite_gguf(tiny_gguf, tmp_path / f"t{i}.gguf", values={"tokenizer.chat_template": jinja})
        with Server(str(model)) as s:
            assert "warning: chat template" in s.stderr
            t0 = time.monotonic()
            err = _error(_raw(s, "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}),
                         400)
            assert expected in err["message"] and err["code"] == "template_error"
            assert time.monotonic() - t0 < 10
            # the server serves on: raw completions need no template
            assert _raw(s, "POST", "/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
            _finish(s)


# --- start and stop ----------------------------------------------------------------------------------------


def test_sigterm_mid_answer_ends_cleanly() -> None:
    s = Server()
    with httpx.stream("POST", s.api + "/chat/completions", json={**LONG, "stream": True}, timeout=30) as r:
        lines = _first_token(r)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        try:
            for _ in lines:
                pass
        except httpx.HTTPError:
            pass  # the stream was cut after the grace period: also a clean end
    assert s.proc.wait(timeout=30) == 0
    assert time.monotonic() - t0 < 15
    _finish(s)


def test_ctrl_c_stops_an_idle_server(tiny_gguf) -> None:
    s = Server(str(tiny_gguf))
    assert s.stop(signal.SIGINT) == 0
    assert "Traceback" not in s.stderr


def test_port_in_use_and_bad_options_are_one_line(tiny_gguf) -> None:
    with Server(str(tiny_gguf)) as s:
        port = s.url.rsplit(":", 1)[1]
        p = run_cli("serve", str(tiny_gguf), "--port", port, timeout=60)
        assert p.returncode == 1 and p.stderr.decode().count("\n") == 1
        assert f"cannot listen on 127.0.0.1:{port}" in p.stderr.decode()
    for args, expected in [
        (["--port", "70000"], "is not a port number"),
        (["--parallel", "0"], "--parallel 0 is out of range"),
        (["--queue", "-1"], "--queue -1 is negative"),
        (["--max-body", "10"], "--max-body 10 is too small"),
        (["--host", "no.such.host.invalid"], "does not resolve"),
        # an empty key required "Bearer " and nothing after it; these could never be sent or matched
        (["--api-key", ""], "--api-key '': expected printable ASCII, not empty"),
        (["--api-key", " k"], "--api-key ' k': expected printable ASCII"),
        (["--api-key", "ཀ"], "--api-key 'ཀ': expected printable ASCII"),
    ]:
        p = run_cli("serve", str(tiny_gguf), *args, timeout=60)
        assert p.returncode == 1, p.stderr
        err = p.stderr.decode()
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    for model, expected in [("/nonexistent/model.gguf", "no such file"), (__file__, "is not a GGUF file")]:
        p = run_cli("serve", model, "--port", "0", timeout=60)
        assert p.returncode == 1 and expected in p.stderr.decode() and p.stderr.decode().count("\n") == 1
    p = run_cli("serve", str(tiny_gguf), "--parallel", "two")
    assert p.returncode == 2


def test_listening_beyond_loopback_without_a_key_warns(tiny_gguf) -> None:
    with Server(str(tiny_gguf), "--host", "0.0.0.0") as s:
        assert "without --api-key" in s.stderr
        assert s.url.startswith("http://0.0.0.0:")


def test_cors_is_off_unless_asked(tiny, tiny_gguf) -> None:
    h = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in _raw(tiny, "OPTIONS", "/v1/chat/completions", headers=h).headers
    with Server(str(tiny_gguf), "--cors-origin", "http://example.test", "--api-key", "k") as s:
        r = _raw(s, "OPTIONS", "/v1/chat/completions", headers=h)
        assert r.headers["access-control-allow-origin"] == "http://example.test"
        r = _raw(s, "GET", "/v1/models", headers={"Origin": "http://example.test", "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://example.test"
