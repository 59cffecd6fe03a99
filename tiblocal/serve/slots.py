"""Slots and one decode loop: parallel requests batched into one llama.cpp context (continuous batching).

As llama.cpp's server does it (tools/server/server-context.cpp): the context holds ``parallel`` sequences, one per
slot; every step of the loop puts the next token of each answering slot, and then as much of the waiting prompts as
the batch has room for, into one ``llama_batch`` and decodes it once. A long prompt is thus evaluated in chunks
between decode steps and does not stall the answers already streaming. Each slot keeps the tokens of its cache, so
a conversation's next turn, sent to the slot holding its prefix, evaluates only the new tokens. Requests beyond the
slots wait in a bounded queue.

The loop runs in one thread and is the only caller of llama.cpp's decode and samplers; ``llama_decode`` releases the
GIL, so the HTTP layer keeps serving while it runs. Jobs talk to their caller through ``Job.sink``, called from the
loop's thread with each event.

A sampled token is put in the next batch before its text is made: the loop launches the decode, then turns the
tokens of that batch into text and hands it to the HTTP thread. On a GPU ``llama_decode`` returns as soon as the
work is queued (about 0.5 ms for a 7B model), so the text, its delivery and the HTTP thread's work to send it run
while the GPU computes, instead of between two decodes where the GPU would wait for them. On a CPU the decode has
finished when it returns, and each token is sent one step later. An answer's first token is sent at once (time to
first token), and its last too; a token whose text completes a stop string has been evaluated in vain, which costs
one cache cell.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..engine import Engine, Generation, Sampling, _bindings, common_prefix, put_token
from ..errors import EngineError, TiblocalError
from ..text import CompletionText

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every slot is busy and the queue holds as many requests as it may."""


class ShuttingDown(Exception):
    """The scheduler is stopping and takes no new requests."""


@dataclass
class Event:
    kind: str  # "text": more of the answer; "done": the answer ended (see Job.finish_reason); "error": it failed
    text: str = ""


@dataclass(eq=False)
class Job:
    """One request: a prompt's tokens and how to sample its answer. ``sink`` receives Events from the loop's thread,
    after each step; sinks that share a ``deliver_batch(pairs)`` attribute get the step's (sink, event) pairs in one
    call instead."""

    prompt: Sequence[int]
    sampling: Sampling
    sink: Callable[[Event], None]
    stops: Sequence[str] = ()
    grammar: str | None = None
    result: Generation = field(default_factory=Generation)
    finish_reason: str = ""  # stop | length | cancelled (the client went away) | shutdown | error
    slot: int = -1  # the slot that answered it
    submitted: float = field(default_factory=time.perf_counter)
    _cancel: str = ""  # the reason to stop it at the next step

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop this job at the next step (the client went away, or the server stops); safe from any thread."""
        self._cancel = self._cancel or reason


@dataclass(eq=False)
class _Slot:
    seq: int
    past: list[int] = field(default_factory=list)  # tokens in this sequence's KV cache, in order
    job: Job | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    chain: object = None  # the job's sampler chain
    on_device: bool = False  # the chain's first cut runs in llama.cpp's graph (--backend-sampling)
    text: CompletionText | None = None
    next_token: int = -1  # the sampled token to evaluate in the next step (-1: none)
    unsent: int = -1  # a token in the batch being decoded whose text is still to be made (-1: none)
    out_index: int = -1  # where this slot's logits are in the batch just decoded (-1: none)
    n_prompt_put: int = 0  # prompt tokens put in the batch just decoded
    started: float = 0.0
    sampling_started: float = 0.0
    last_used: float = 0.0


class Scheduler:
    """``parallel`` slots over one Engine's context, fed from a queue of at most ``queue_size`` waiting jobs."""

    def __init__(self, engine: Engine, *, queue_size: int = 64) -> None:
        self.engine = engine
        self.lib = _bindings()
        self.slots = [_Slot(seq) for seq in range(engine.parallel)]
        self.queue_size = queue_size
        self._queue: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._closing = False  # shutting down: no new jobs
        self._thread: threading.Thread | None = None
        self._batch = self.lib.llama_batch_init(engine.n_batch, 0, 1)
        self.steps = 0  # llama_decode calls, for tests and metrics
        # Per token, the loop calls into llama.cpp only to sample: each ctypes call releases the GIL, and taking it back
        # while the HTTP thread runs can cost up to the interpreter's switch interval.
        self._eog = frozenset(engine.eog_tokens)
        self._pieces: dict[int, bytes] = {}
        self._outbox: list[tuple[Job, Event]] = []  # the step's events, delivered together after it
        # The slots' samplers run side by side after each decode: llama_sampler_sample releases the GIL, and the cores
        # that decoded are idle until the next step. One slot, or one core, samples in the loop's own thread.
        workers = min(len(self.slots), os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tiblocal-sample") if workers > 1 else None

    # --- the caller's side ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tiblocal-decode", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._stopping or self._closing:
                raise ShuttingDown("the server is shutting down")
            idle = sum(1 for s in self.slots if s.job is None)  # slots are taken under this lock (_admit)
            if len(self._queue) >= self.queue_size + idle:
                raise QueueFull(f"all {len(self.slots)} slots are busy and {len(self._queue)} requests are waiting")
            self._queue.append(job)
            self._wake.notify()

    def close(self, grace: float) -> None:
        """Take no new jobs; those running or waiting get ``grace`` seconds to finish, then end as ``shutdown``."""
        with self._wake:
            if self._closing:
                return
            self._closing = True
        timer = threading.Timer(grace, self._cut)
        timer.daemon = True
        timer.start()

    def _cut(self) -> None:
        with self._wake:
            for job in self._queue:
                job.cancel("shutdown")
            for s in self.slots:
                if s.job is not None:
                    s.job.cancel("shutdown")
            self._wake.notify()

    def stop(self) -> None:
        """Cancel what is running or waiting, end the loop and free the batch (the engine stays the caller's)."""
        with self._wake:
            self._stopping = True
            for job in self._queue:
                job.cancel()
            for s in self.slots:
                if s.job is not None:
                    s.job.cancel()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._end_all("cancelled")  # what a loop turned by hand (tests, benchmarks) left
        if self._batch is not None:
            self.lib.llama_batch_free(self._batch)
            self._batch = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    @property
    def busy(self) -> int:
        return sum(1 for s in self.slots if s.job is not None)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    # --- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        reason, message = "cancelled", ""
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._queue and not any(s.job for s in self.slots):
                        self._wake.wait()
                    if self._stopping:
                        break
                self.turn()
        except Exception as e:  # a bug, or llama.cpp failing: every job ends with the error, no client waits forever
            log.error("the decode loop failed: %s: %s", type(e).__name__, e)
            reason, message = "error", f"the decode loop failed ({type(e).__name__}: {e})"
            with self._wake:
                self._stopping = True
        self._end_all(reason, message)

    def _end_all(self, reason: str, message: str = "") -> None:
        for s in self.slots:
            if s.job is not None:
                self._end(s, reason, message)
        with self._wake:
            waiting, self._queue = list(self._queue), collections.deque()
        for job in waiting:
            self._finish_waiting(job, reason, message)
        self._deliver()

    def turn(self) -> None:
        """One turn of the loop: end the cancelled jobs, give free slots to waiting ones, decode one step, deliver
        its events. The loop's thread runs it; tests call it to step by hand."""
        self._drop_cancelled()
        with self._wake:
            self._admit()
        if any(s.job for s in self.slots):
            self._step()
        self._deliver()

    def _emit(self, job: Job, event: Event) -> None:
        self._outbox.append((job, event))

    def _deliver(self) -> None:
        """Hand the step's events to their jobs: one batch per step, whatever the number of slots."""
        if not self._outbox:
            return
        box, self._outbox = [(job.sink, event) for job, event in self._outbox], []
        deliver = getattr(box[0][0], "deliver_batch", None)
        if deliver is not None and all(getattr(sink, "deliver_batch", None) is deliver for sink, _ in box):
            deliver(box)  # e.g. one wake-up of the HTTP event loop for all of them
        else:
            for sink, event in box:
                sink(event)

    def _admit(self) -> None:
        """Move waiting jobs into idle slots: the slot whose cache shares the longest prefix, else the least recent."""
        while self._queue:
            idle = [s for s in self.slots if s.job is None]
            if not idle:
                return
            job = self._queue.popleft()
            if job._cancel:
                self._finish_waiting(job, job._cancel)
                continue
            slot = max(idle, key=lambda s: (common_prefix(s.past, job.prompt), -s.last_used))
            try:
                self._start(slot, job)
            except TiblocalError as e:  # a sampler llama.cpp refused (a grammar that does not parse)
                self._finish_waiting(job, "error", str(e))

    def _start(self, slot: _Slot, job: Job) -> None:
        engine = self.engine
        keep = engine.keep_prefix(slot.seq, slot.past, job.prompt)
        chain = engine.backend_sampling and engine.sampler(job.sampling, job.grammar, history=job.prompt, device=True)
        # attached before the prompt's last chunk is decoded, so that every output of this job is cut in the graph
        slot.on_device = bool(chain) and engine.attach_sampler(slot.seq, chain)
        chain = chain or engine.sampler(job.sampling, job.grammar, history=job.prompt)
        slot.job, slot.chain, slot.text = job, chain, CompletionText(job.stops)
        slot.pending = list(job.prompt[keep:])
        slot.next_token, slot.out_index = -1, -1
        slot.started = time.perf_counter()
        job.slot = slot.seq
        job.result.prompt_tokens = len(job.prompt)
        job.result.reused_tokens = keep

    def _drop_cancelled(self) -> None:
        for s in self.slots:
            if s.job is not None and s.job._cancel:
                self._end(s, s.job._cancel)

    def _step(self) -> None:
        """One llama_decode: each answering slot's next token, then prompt chunks in the room left."""
        lib, b = self.lib, self._batch
        n = 0
        for s in self.slots:
            s.out_index, s.n_prompt_put = -1, 0
            if s.job is not None and s.next_token >= 0:
                put_token(b, n, s.next_token, len(s.past), s.seq, True)
                s.out_index = n
                n += 1
        for s in sorted((s for s in self.slots if s.job is not None and s.pending), key=lambda s: s.started):
            room = self.engine.n_batch - n
            if room <= 0:
                break
            chunk = s.pending[:room]
            last = len(chunk) == len(s.pending)
            pos = len(s.past)
            for i, t in enumerate(chunk):
                put_token(b, n, t, pos + i, s.seq, last and i == len(chunk) - 1)
                n += 1
            s.n_prompt_put = len(chunk)
            if last:
                s.out_index = n - 1
        b.n_tokens = n
        rc = lib.llama_decode(self.engine._ctx, b)
        self.steps += 1
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc} on a batch of {n} tokens")
        for s in self.slots:
            if s.job is None:
                continue
            if s.next_token >= 0:
                s.past.append(s.next_token)
                s.next_token = -1
            elif s.n_prompt_put:
                s.past.extend(s.pending[: s.n_prompt_put])
                del s.pending[: s.n_prompt_put]
        # While the device computes: the text of the tokens just put in the batch, sent now (see the module's doc)
        for s in self.slots:
            if s.unsent >= 0:
                self._text(s, s.unsent)
        self._deliver()
        ready = [s for s in self.slots if s.job is not None and s.out_index >= 0 and not s.text.stopped]
        # A chain whose cut ran in the graph samples among a hundred candidates: not worth a thread
        if self._pool is not None and sum(1 for s in ready if not s.on_device) > 1:
            # llama.cpp puts its outputs in batch order on their first read: make that read here, alone, so that the
            # samplers' threads only read
            lib.llama_get_logits(self.engine._ctx)
            tokens = list(self._pool.map(self._sample_token, ready))
        else:
            tokens = [self._sample_token(s) for s in ready]
        for s, tok in zip(ready, tokens):
            self._take(s, tok)
        stopped = [s for s in self.slots if s.job is not None and s.text.stopped]
        if stopped:  # their samplers are freed (or detached from the graph) once the step's work is done
            lib.llama_synchronize(self.engine._ctx)
            for s in stopped:
                self._end(s, "stop")

    def _sample_token(self, s: _Slot) -> int:
        return self.lib.llama_sampler_sample(s.chain, self.engine._ctx, s.out_index)

    def _take(self, s: _Slot, tok: int) -> None:
        """The slot's sampled token: the end of its answer, or the token to evaluate next, whose text is made once that
        evaluation is under way (the first and the last token's text at once)."""
        job, engine = s.job, self.engine
        r = job.result
        now = time.perf_counter()
        if r.completion_tokens == 0 and not r.first_token_ms:
            r.first_token_ms = (now - job.submitted) * 1000
            r.prompt_ms = (now - s.started) * 1000
            s.sampling_started = now
        if tok in self._eog:
            self._end(s, "stop")
            return
        r.completion_tokens += 1
        r.tokens.append(tok)
        last = r.completion_tokens >= job.sampling.max_tokens or len(s.past) + 1 >= engine.n_ctx
        if r.completion_tokens > 1 and not last:
            s.next_token = s.unsent = tok
            return
        self._text(s, tok, first=r.completion_tokens == 1)
        if s.text.stopped:
            self._end(s, "stop")
        elif last:
            self._end(s, "length")
        else:
            s.next_token = tok

    def _text(self, s: _Slot, tok: int, *, first: bool = False, send: bool = True) -> None:
        """Feed the token's text to the slot's stop-string and UTF-8 filter and send what it lets through."""
        s.unsent = -1
        if first:
            piece = self.engine.piece(tok, lstrip=1)  # the answer's first token: no leading space
        else:
            piece = self._pieces.get(tok)
            if piece is None:
                piece = self._pieces[tok] = self.engine.piece(tok)
        text = s.text.feed(piece)
        if text and send:
            self._emit(s.job, Event("text", text))

    def _end(self, s: _Slot, reason: str, message: str = "") -> None:
        job = s.job
        r = job.result
        if s.text is not None and reason != "error":
            if s.unsent >= 0:  # ended before its text was made: in the answer's text, sent only if it ends well
                self._text(s, s.unsent, send=reason not in ("cancelled", "shutdown"))
            tail = s.text.finish()
            if tail and reason not in ("cancelled", "shutdown"):
                self._emit(job, Event("text", tail))
            r.text = s.text.text
        if s.sampling_started:
            r.gen_ms = (time.perf_counter() - s.sampling_started) * 1000
        r.stop_reason = reason
        if s.on_device:
            self.engine.detach_sampler(s.seq)
            s.on_device = False
        if s.chain is not None:
            self.engine.free_sampler(s.chain)
        s.pending = []  # cancelled mid-prompt: the cache holds exactly s.past
        s.job, s.chain, s.text, s.next_token, s.unsent, s.sampling_started = None, None, None, -1, -1, 0.0
        s.last_used = time.perf_counter()
        job.finish_reason = reason
        self._emit(job, Event("error", message) if reason == "error" else Event("done"))

    def _finish_waiting(self, job: Job, reason: str, message: str = "") -> None:
        """End a job that never had a slot."""
        job.finish_reason = reason
        job.result.stop_reason = reason
        self._emit(job, Event("error", message) if reason == "error" else Event("done"))
