"""The server's decode loop (tiblocal.serve.slots), stepped by hand: batching, chunked prompts, cache reuse, the queue."""

from __future__ import annotations

import pytest

from tiblocal.engine import Engine, EngineConfig, Generation, Sampling
from tiblocal.serve.slots import Job, QueueFull, Scheduler, ShuttingDown

GREEDY = Sampling(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture
def engine(tiny_gguf):
    with Engine(tiny_gguf, EngineConfig(ctx=256, threads=1, parallel=2, batch=16)) as e:
        yield e


def _job(prompt, sampling=GREEDY, events=None) -> Job:
    events = events if events is not None else []
    return Job(prompt=prompt, sampling=sampling, sink=events.append)


def _run(sch: Scheduler, steps: int | None = None) -> int:
    """Turn the loop by hand (no thread) until every job ended, or ``steps`` times."""
    n = 0
    while any(s.job for s in sch.slots) or sch._queue:
        sch.turn()
        n += 1
        if steps is not None and n >= steps:
            break
    return n


def test_a_long_prompt_is_evaluated_in_chunks_beside_a_running_answer(engine) -> None:
    assert engine.n_batch == 16 and engine.parallel == 2
    sch = Scheduler(engine)
    try:
        a = _job(engine.tokenize("hello"), Sampling(temperature=0, max_tokens=200, ignore_eos=True))
        sch.submit(a)
        _run(sch, steps=3)
        assert a.result.completion_tokens == 3
        b = _job(engine.tokenize("བཀྲ་ཤིས་བདེ་ལེགས། " * 12))
        assert len(b.prompt) > 100  # more than six batches of 16
        sch.submit(b)
        steps_before = sch.steps
        while b.result.completion_tokens == 0:
            before = a.result.completion_tokens
            _run(sch, steps=1)
            assert a.result.completion_tokens == before + 1  # the answer moved on at every step of b's prompt
        assert sch.steps - steps_before >= len(b.prompt) // 15  # b's prompt took several steps, 15 tokens or fewer each
    finally:
        sch.stop()


def test_batched_answers_equal_answers_alone(engine) -> None:
    prompts = [engine.tokenize("hello world"), engine.tokenize("བཀྲ་ཤིས་བདེ་ལེགས")]
    alone = []
    for p in prompts:
        engine.reset()
        g = Generation()
        alone.append(list(engine.generate_tokens(p, GREEDY, g)))
    sch = Scheduler(engine)
    try:
        jobs = [_job(p) for p in prompts]
        for j in jobs:
            sch.submit(j)
        _run(sch)
    finally:
        sch.stop()
    assert [j.result.tokens for j in jobs] == alone
    assert all(j.finish_reason == "length" and j.result.completion_tokens == 40 for j in jobs)


def test_the_next_turn_goes_to_the_slot_with_its_prefix(engine) -> None:
    sch = Scheduler(engine)
    try:
        first = _job(engine.tokenize("hello there"))
        other = _job(engine.tokenize("བཀྲ་ཤིས"))
        sch.submit(first)
        sch.submit(other)
        _run(sch)
        follow = _job(first.prompt + first.result.tokens + engine.tokenize("and more", add_bos=False))
        sch.submit(follow)
        _run(sch)
        assert follow.slot == first.slot
        assert follow.result.reused_tokens == len(first.prompt) + len(first.result.tokens) - 1
    finally:
        sch.stop()


def test_stop_strings_and_events(engine) -> None:
    sch = Scheduler(engine)
    try:
        events: list = []
        probe = _job(engine.tokenize("hello"), events=events)
        sch.submit(probe)
        _run(sch)
        text = "".join(e.text for e in events if e.kind == "text")
        assert events[-1].kind == "done" and text == probe.result.text and len(text) > 6
        stop = text[3:6]
        events2: list = []
        cut = _job(engine.tokenize("hello"), events=events2)
        cut.stops = [stop]
        sch.submit(cut)
        _run(sch)
        assert cut.finish_reason == "stop" and cut.result.text == text[: text.index(stop)]
        assert "".join(e.text for e in events2 if e.kind == "text") == cut.result.text
    finally:
        sch.stop()


def test_a_tokens_text_is_made_while_the_decode_that_evaluates_it_runs(engine) -> None:
    """Each token but an answer's first and last goes into the next batch first; its text is made and sent once that
    decode is launched and before the step samples (on a GPU, while it computes). The first and the last are sent at
    once."""
    sch = Scheduler(engine)
    timeline: list[str] = []
    real_lib, real_text = sch.lib, sch._text

    class Lib:
        def __getattr__(self, name):
            return getattr(real_lib, name)

        def llama_decode(self, ctx, batch):
            timeline.append("D")
            return real_lib.llama_decode(ctx, batch)

        def llama_sampler_sample(self, chain, ctx, i):
            timeline.append("S")
            return real_lib.llama_sampler_sample(chain, ctx, i)

    def text(s, tok, **kw):
        timeline.append(f"T{s.job.result.tokens.index(tok) + 1 if tok in s.job.result.tokens else '?'}")
        real_text(s, tok, **kw)

    sch.lib, sch._text = Lib(), text
    try:
        events: list = []
        job = _job(engine.tokenize("hello"), Sampling(temperature=0, max_tokens=6, ignore_eos=True), events)
        sch.submit(job)
        _run(sch)
    finally:
        sch.lib = real_lib
        sch.stop()
    tokens = job.result.tokens
    assert len(set(tokens)) == len(tokens), "the timeline names tokens by their value: pick a prompt without repeats"
    assert " ".join(timeline) == "D S T1 D S D T2 S D T3 S D T4 S D T5 S T6"
    assert "".join(e.text for e in events if e.kind == "text") == job.result.text and events[-1].kind == "done"


def test_a_stop_string_leaves_the_cache_as_the_slot_records_it(engine) -> None:
    """The token that completes a stop string was evaluated before its text was made: the slot's record of its cache
    counts it, and the next turn of that conversation, reusing the cache, answers as a fresh context does."""
    sch = Scheduler(engine)
    try:
        probe = _job(engine.tokenize("hello"))
        sch.submit(probe)
        _run(sch)
        cut = _job(engine.tokenize("hello"))
        cut.stops = [probe.result.text[8:11]]
        sch.submit(cut)
        _run(sch)
        assert cut.finish_reason == "stop" and 2 < cut.result.completion_tokens < 40
        slot = sch.slots[cut.slot]
        assert slot.past == cut.prompt + cut.result.tokens  # the last one too: it was in the batch when it stopped
        follow = _job(cut.prompt + cut.result.tokens + engine.tokenize(" and more", add_bos=False))
        sch.submit(follow)
        _run(sch)
        assert follow.slot == cut.slot and follow.result.reused_tokens == len(cut.prompt) + len(cut.result.tokens)
    finally:
        sch.stop()
    engine.reset()
    fresh = list(engine.generate_tokens(follow.prompt, GREEDY, Generation()))
    assert follow.result.tokens == fresh


def test_queue_limit_cancel_and_shutdown(engine) -> None:
    sch = Scheduler(engine, queue_size=1)
    try:
        running = [_job(engine.tokenize("a"), Sampling(temperature=0, max_tokens=200, ignore_eos=True)) for _ in range(2)]
        for j in running:
            sch.submit(j)
        _run(sch, steps=1)
        assert sch.busy == 2
        waiting = _job(engine.tokenize("b"))
        sch.submit(waiting)  # the queue holds one
        with pytest.raises(QueueFull):
            sch.submit(_job(engine.tokenize("c")))
        running[0].cancel()
        _run(sch, steps=1)
        assert running[0].finish_reason == "cancelled" and waiting.slot == running[0].slot
        sch.close(grace=0)
        with pytest.raises(ShuttingDown):
            sch.submit(_job(engine.tokenize("d")))
        sch._cut()  # what close's timer does when the grace is over
        _run(sch)
        assert running[1].finish_reason == "shutdown" and waiting.finish_reason == "shutdown"
        assert sch.busy == 0
    finally:
        sch.stop()


def test_a_failing_loop_ends_every_job_with_an_error(engine, monkeypatch) -> None:
    import threading

    sch = Scheduler(engine)

    def broken() -> None:
        raise RuntimeError("llama_decode failed with code -3")

    monkeypatch.setattr(sch, "_step", broken)
    events: list = []
    got = threading.Event()
    job = Job(prompt=engine.tokenize("a"), sampling=GREEDY, sink=lambda e: (events.append(e), got.set()))
    sch.start()
    try:
        sch.submit(job)
        assert got.wait(10)
        assert [e.kind for e in events] == ["error"] and "code -3" in events[0].text and job.finish_reason == "error"
        with pytest.raises(ShuttingDown):
            sch.submit(_job(engine.tokenize("b")))
    finally:
        sch.stop()


def test_a_grammar_llama_cpp_refuses_ends_its_job_not_the_loop(engine) -> None:
    sch = Scheduler(engine)
    try:
        events: list = []
        bad = Job(prompt=engine.tokenize("a"), sampling=GREEDY, sink=events.append, grammar='root ::= ( "x"')
        good = _job(engine.tokenize("b"))
        sch.submit(bad)
        sch.submit(good)
        _run(sch)
        assert bad.finish_reason == "error" and events[-1].kind == "error" and "grammar does not parse" in events[-1].text
        assert good.finish_reason == "length" and good.result.completion_tokens == 40
    finally:
        sch.stop()


def test_backend_sampling_in_the_slots_gives_the_same_answers(tiny_gguf) -> None:
    """--backend-sampling in the server: each job's cut is attached to its slot's sequence from its start (before its
    prompt is decoded) and detached at its end, more jobs than slots reuse them, and every answer equals the one
    sampled on the CPU."""
    settings = [Sampling(temperature=0.7, seed=3, max_tokens=20), Sampling(temperature=0, max_tokens=20),
                Sampling(temperature=0.8, top_k=0, seed=2, max_tokens=20),  # stays on the CPU
                Sampling(temperature=0.7, seed=9, ignore_eos=True, max_tokens=20), Sampling(seed=4, max_tokens=20)]
    answers = {}
    for backend in (False, True):
        with Engine(tiny_gguf, EngineConfig(ctx=256, threads=1, parallel=2, batch=16, backend_sampling=backend)) as e:
            sch = Scheduler(e)
            jobs = [_job(e.tokenize("hello world " * (i + 1)), s) for i, s in enumerate(settings)]
            for j in jobs:
                sch.submit(j)
            attached = 0
            while any(s.job for s in sch.slots) or sch._queue:
                sch.turn()
                attached = max(attached, len(e._attached))
                assert len(e._attached) == sum(1 for s in sch.slots if s.on_device)
            assert attached == (2 if backend else 0) and not e._attached
            answers[backend] = [j.result.tokens for j in jobs]
            sch.stop()
    assert answers[False] == answers[True]
