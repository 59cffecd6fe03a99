"""The HTTP layer of `tiblocal serve`: OpenAI's API shapes, llama-server's extra endpoints, the chat page.

It only validates, queues and streams (as llama.cpp's server keeps its HTTP layer apart from its slots): prompts are
rendered by the chat's own template code and tokenized by the engine, jobs go to the Scheduler, and its events come
back as one JSON answer or as server-sent events. Every error is OpenAI's error object,
``{"error": {"message", "type", "param", "code"}}``, with the status the ``openai`` SDK maps to its exceptions.

Request bodies are parsed here rather than by FastAPI's body binding so that every refusal (a body that is not JSON,
or JSON that is not an object, a `curl -d` without a JSON content type) is OpenAI's 400 and not FastAPI's 422.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .. import __version__, jsonin
from ..chat import render_prompt
from ..engine import SEED_MAX, Engine, Sampling
from ..errors import TiblocalError
from ..templates import TASKS, ChatTemplate
from .slots import Event, Job, QueueFull, Scheduler, ShuttingDown

log = logging.getLogger("tiblocal.serve")



class APIError(Exception):
    """An answer with OpenAI's error object: ``status``, ``message``, ``type``, ``param``, ``code``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# --- request bodies ------------------------------------------------------------------------------------------

Float = Annotated[float, Field(allow_inf_nan=False)]


class _Body(BaseModel):
    # Fields tiblocal does not know are ignored, as OpenAI-compatible servers do (clients send `user`, `metadata` ...).
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    # developer: OpenAI's newer name for the system message
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


class JSONSchema(_Body):
    name: str = "answer"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None


class _Sampled(_Body):
    """What chat completions and completions share: the model, limits and sampling."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: Float | None = Field(default=None, ge=0)
    top_p: Float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-1, le=SEED_MAX)
    frequency_penalty: Float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: Float | None = Field(default=None, ge=-2, le=2)
    n: int = 1
    # tiblocal's (and llama-server's) extensions
    top_k: int | None = Field(default=None, ge=0)
    repeat_penalty: Float | None = Field(default=None, gt=0)
    repeat_last_n: int | None = Field(default=None, ge=0)
    ignore_eos: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n is {n}; this server gives one choice per request (n=1): send {n} requests instead")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 16 or any(len(s) > 1000 for s in stops)):
            raise ValueError("at most 16 stop strings of at most 1,000 characters each")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())

    def given_sampling(self) -> dict[str, Any]:
        given = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "repeat_penalty": self.repeat_penalty, "repeat_last_n": self.repeat_last_n,
            "frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty, "seed": self.seed,
            "ignore_eos": self.ignore_eos or None,
        }
        return {k: v for k, v in given.items() if v is not None}

    def limit(self) -> int | None:
        return self.max_tokens


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported by this server")
        return v

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampled):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and len(v) != 1:
            raise ValueError(f"give one prompt (a string), not a list of {len(v)}")
        return v

    @field_validator("echo", "logprobs")
    @classmethod
    def _unsupported(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False  # prepend BOS as the model does
    parse_special: bool = True  # "<s>" in the text is the control token
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


def _parse(model: type[BaseModel], raw: bytes) -> Any:
    try:
        data = jsonin.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body is a JSON {type(data).__name__}; send a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        msg = first["msg"].removeprefix("Value error, ")
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise APIError(400, f"{param}: {msg}{more}" if param else msg + more, param=param) from None


# --- the server's state ------------------------------------------------------------------------------------


@dataclass
class Metrics:
    requests: dict[int, int] = field(default_factory=dict)  # by HTTP status
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def text(self, scheduler: Scheduler) -> str:
        """Prometheus' text format. Seven series do not call for prometheus_client, whose global registry would also
        be shared by every app made in one process (the tests make several)."""
        lines = [
            "# HELP tiblocal_requests_total HTTP requests answered, by status.",
            "# TYPE tiblocal_requests_total counter",
            *(f'tiblocal_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.requests.items())),
            "# HELP tiblocal_prompt_tokens_total Prompt tokens of the answered requests.",
            "# TYPE tiblocal_prompt_tokens_total counter",
            f"tiblocal_prompt_tokens_total {self.prompt_tokens}",
            "# HELP tiblocal_completion_tokens_total Tokens generated.",
            "# TYPE tiblocal_completion_tokens_total counter",
            f"tiblocal_completion_tokens_total {self.completion_tokens}",
            "# HELP tiblocal_slots_busy Slots answering a request.",
            "# TYPE tiblocal_slots_busy gauge",
            f"tiblocal_slots_busy {scheduler.busy}",
            "# HELP tiblocal_slots_total Slots (--parallel).",
            "# TYPE tiblocal_slots_total gauge",
            f"tiblocal_slots_total {len(scheduler.slots)}",
            "# HELP tiblocal_queue_length Requests waiting for a slot.",
            "# TYPE tiblocal_queue_length gauge",
            f"tiblocal_queue_length {scheduler.waiting}",
            "# HELP tiblocal_decode_steps_total llama_decode calls (one batch each).",
            "# TYPE tiblocal_decode_steps_total counter",
            f"tiblocal_decode_steps_total {scheduler.steps}",
        ]
        return "\n".join(lines) + "\n"


@dataclass
class ServerState:
    engine: Engine
    scheduler: Scheduler
    template: ChatTemplate
    model_id: str
    model_file: str
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(default_factory=Metrics)

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model_id, self.model_file):
            raise APIError(404, f"the model {name!r} does not exist; this server has {self.model_id!r} (GET /v1/models)",
                           param="model", code="model_not_found")

    def sampling(self, req: _Sampled, n_prompt: int) -> Sampling:
        """The request's settings over the model's suggested ones; max_tokens clamped to the room left."""
        room = self.engine.n_ctx - n_prompt
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {n_prompt} tokens but the context holds {self.engine.n_ctx} per request, with room "
                "for at least one answer token; shorten the prompt, or restart the server with a larger --ctx",
                param="messages" if isinstance(req, ChatRequest) else "prompt", code="context_length_exceeded",
            )
        try:
            s = Sampling.for_metadata(self.engine.info.metadata, **req.given_sampling())
        except TiblocalError as e:
            raise APIError(400, str(e)) from None
        limit = req.limit()
        return replace(s, max_tokens=min(limit if limit is not None else s.max_tokens, room))


def _grammar(fmt: ResponseFormat | None) -> str | None:
    """GBNF for response_format, from llama-cpp-python's port of llama.cpp's json-schema-to-grammar."""
    if fmt is None or fmt.type == "text":
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if fmt.type == "json_object":
        return JSON_GBNF
    if fmt.json_schema is None:
        raise APIError(400, "response_format.json_schema is required with type json_schema",
                       param="response_format.json_schema")
    try:
        return json_schema_to_gbnf(json.dumps(fmt.json_schema.schema_))
    except Exception as e:  # the converter raises plain exceptions on schemas it cannot express
        raise APIError(400, f"response_format.json_schema.schema cannot be turned into a grammar: {e}",
                       param="response_format.json_schema") from None


# --- answers -------------------------------------------------------------------------------------------------


class _Bridge:
    """Events from the decode loop's thread into an asyncio queue of this request's event loop. The loop hands over a
    whole step's events at once (``deliver_batch``, the same function for every bridge of one event loop), so that
    the event loop wakes once per step, not once per token of each slot."""

    _batchers: dict[asyncio.AbstractEventLoop, Callable] = {}

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.deliver_batch = self._batchers.get(self.loop) or self._batchers.setdefault(self.loop, self._batcher(self.loop))

    @staticmethod
    def _batcher(loop: asyncio.AbstractEventLoop) -> Callable:
        def put_all(box) -> None:
            for sink, event in box:
                sink.queue.put_nowait(event)

        def deliver(box) -> None:
            try:
                loop.call_soon_threadsafe(put_all, box)
            except RuntimeError:  # the event loop has closed: the server is gone
                pass

        return deliver

    def __call__(self, event: Event) -> None:
        self.deliver_batch([(self, event)])


def _usage(job: Job) -> dict[str, int]:
    r = job.result
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens}


def _timings(job: Job) -> dict[str, float]:
    """llama-server's `timings` object, which the chat page shows."""
    r = job.result
    return {
        "prompt_n": r.prompt_tokens - r.reused_tokens, "cache_n": r.reused_tokens, "prompt_ms": round(r.prompt_ms, 3),
        "first_token_ms": round(r.first_token_ms, 3), "predicted_n": r.completion_tokens,
        "predicted_ms": round(r.gen_ms, 3), "predicted_per_second": round(r.tokens_per_s, 3),
    }


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Answer:
    """One request's job on the scheduler, answered whole or streamed."""

    def __init__(self, state: ServerState, request: Request, job_args: dict, kind: str) -> None:
        self.state, self.request, self.kind = state, request, kind
        self.bridge = _Bridge()
        self.job = Job(sink=self.bridge, **job_args)
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"

    def submit(self) -> None:
        try:
            self.state.scheduler.submit(self.job)
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e}; retry shortly", type="server_error", code="server_busy",
                           headers={"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down", headers={"Retry-After": "5"}) from None

    def _finished(self) -> None:
        r = self.job.result
        m = self.state.metrics
        m.prompt_tokens += r.prompt_tokens
        m.completion_tokens += r.completion_tokens
        self.request.state.tokens = r.completion_tokens

    def _failed(self, event: Event) -> APIError:
        if event.kind == "done" and self.job.finish_reason == "shutdown":
            return APIError(503, "the server is shutting down; the answer was cut short", type="server_error",
                            code="shutting_down")
        return APIError(500, f"generation failed: {event.text}", type="server_error")

    async def whole(self) -> JSONResponse:
        self.submit()
        watcher = asyncio.ensure_future(_until_disconnect(self.request))
        parts: list[str] = []
        try:
            while True:
                getter = asyncio.ensure_future(self.bridge.queue.get())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:  # the client went away: free the slot now
                    getter.cancel()
                    self.job.cancel()
                    return JSONResponse({}, status_code=499)
                event = getter.result()
                if event.kind == "text":
                    parts.append(event.text)
                elif event.kind == "error" or self.job.finish_reason == "shutdown":
                    raise self._failed(event)
                else:
                    break
        finally:
            watcher.cancel()
            self.job.cancel()  # no-op once done; frees the slot if this task was cancelled
        self._finished()
        text = "".join(parts)
        finish = "length" if self.job.finish_reason == "length" else "stop"
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return JSONResponse({
            "id": self.id, "object": self.object, "created": self.created, "model": self.state.model_id,
            "system_fingerprint": f"tiblocal-{__version__}", "choices": [choice], "usage": _usage(self.job),
            "timings": _timings(self.job),
        })

    def _chunk(self, delta: str | None, finish: str | None, *, role: bool = False, usage: bool = False) -> str:
        base = {"id": self.id, "object": f"{self.object}.chunk" if self.kind == "chat" else self.object,
                "created": self.created, "model": self.state.model_id,
                "system_fingerprint": f"tiblocal-{__version__}"}
        if usage:
            base.update(choices=[], usage=_usage(self.job), timings=_timings(self.job))
        elif self.kind == "chat":
            d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
            base["choices"] = [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]
        else:
            base["choices"] = [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}]
        if finish is not None and not usage:
            base["timings"] = _timings(self.job)
        return f"data: {json.dumps(base, ensure_ascii=False)}\n\n"

    def streamed(self, include_usage: bool) -> StreamingResponse:
        self.submit()

        async def events() -> AsyncIterator[str]:
            try:
                if self.kind == "chat":
                    yield self._chunk(None, None, role=True)
                queue, held = self.bridge.queue, None
                while True:
                    event, held = held or await queue.get(), None
                    if event.kind == "text":
                        text = event.text
                        while not queue.empty():  # the text that came meanwhile goes in the same chunk
                            held = queue.get_nowait()
                            if held.kind != "text":
                                break
                            text, held = text + held.text, None
                        yield self._chunk(text, None)
                    elif event.kind == "error" or self.job.finish_reason == "shutdown":
                        yield f"data: {json.dumps(self._failed(event).body())}\n\n"
                        break
                    else:
                        self._finished()
                        yield self._chunk(None, "length" if self.job.finish_reason == "length" else "stop")
                        if include_usage:
                            yield self._chunk(None, None, usage=True)
                        break
                yield "data: [DONE]\n\n"
            finally:  # also when the client went away mid-stream (the response cancels this generator)
                self.job.cancel()

        return StreamingResponse(
            events(), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


async def chat_completions(state: ServerState, request: Request) -> Response:
    req: ChatRequest = _parse(ChatRequest, await request.body())
    state.check_model(req.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            raise APIError(400, f"messages.{i}: a system message must come first", param=f"messages.{i}.role")
    if messages[-1]["role"] != "user":
        raise APIError(400, f"messages.{len(messages) - 1}: the last message must be the user's (role 'user')",
                       param=f"messages.{len(messages) - 1}.role")
    grammar = _grammar(req.response_format)
    try:
        tokens = await run_in_threadpool(render_prompt, state.engine, state.template, messages)
    except TiblocalError as e:
        raise APIError(400, f"{e} (the model's chat template: {state.template.name})", param="messages",
                       code="template_error") from None
    sampling = state.sampling(req, len(tokens))
    args = {"prompt": tokens, "sampling": sampling, "stops": [*state.template.stop, *req.stops()], "grammar": grammar}
    return await _answer(state, request, args, "chat", req)


async def completions(state: ServerState, request: Request) -> Response:
    req: CompletionRequest = _parse(CompletionRequest, await request.body())
    state.check_model(req.model)
    tokens = await run_in_threadpool(state.engine.tokenize, req.text())
    sampling = state.sampling(req, len(tokens))
    args = {"prompt": tokens, "sampling": sampling, "stops": req.stops()}
    return await _answer(state, request, args, "text", req)


async def _answer(state: ServerState, request: Request, args: dict, kind: str, req: _Sampled) -> Response:
    answer = Answer(state, request, args, kind)
    request.state.prompt_tokens = len(args["prompt"])
    if req.stream:
        return answer.streamed(bool(req.stream_options and req.stream_options.include_usage))
    return await answer.whole()


def tokenize(state: ServerState, body: bytes) -> dict:
    req: TokenizeRequest = _parse(TokenizeRequest, body)
    ids = state.engine.tokenize(req.content, add_bos=req.add_special, special=req.parse_special)
    if not req.with_pieces:
        return {"tokens": ids}
    return {"tokens": [{"id": t, "piece": state.engine.piece(t, special=True).decode("utf-8", "replace")} for t in ids]}


def detokenize(state: ServerState, body: bytes) -> dict:
    req: DetokenizeRequest = _parse(DetokenizeRequest, body)
    bad = [t for t in req.tokens if not 0 <= t < state.engine.n_vocab]
    if bad:
        raise APIError(400, f"tokens: {bad[0]} is not a token id of this model (0 to {state.engine.n_vocab - 1})",
                       param="tokens")
    return {"content": state.engine.detokenize(req.tokens)}


def props(state: ServerState) -> dict:
    """What the chat page needs to know (llama-server's /props): the model, its context, template and tasks."""
    s = Sampling.for_metadata(state.engine.info.metadata)
    return {
        "model": state.model_id, "model_file": state.model_file, "n_ctx": state.engine.n_ctx,
        "parallel": len(state.scheduler.slots), "template": state.template.name,
        "api_key_required": state.api_key is not None,
        "default_generation_settings": {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
                                        "repeat_penalty": s.repeat_penalty, "max_tokens": s.max_tokens},
        "tasks": [{"name": t.name, "description": t.description, "pattern": t.pattern} for t in TASKS.values()],
        "version": __version__,
    }


def models(state: ServerState) -> dict:
    return {"object": "list", "data": [
        {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "tiblocal",
         "meta": {"n_ctx": state.engine.n_ctx, "n_vocab": state.engine.n_vocab, "n_params": state.engine.info.n_params,
                  "file": state.model_file}},
    ]}


def health(state: ServerState) -> dict:
    busy = state.scheduler.busy
    return {"status": "ok", "slots_idle": len(state.scheduler.slots) - busy, "slots_processing": busy,
            "queue": state.scheduler.waiting}


def page_file(name: str) -> bytes:
    return importlib.resources.files("tiblocal.serve").joinpath("web", name).read_bytes()
