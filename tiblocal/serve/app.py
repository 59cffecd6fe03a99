"""The ASGI application of `tiblocal serve`: routes (Starlette), and the gate in front of them.

The gate is a plain ASGI wrapper, outermost, so that it sees every request and every failure: it checks the API key
(compared in constant time), refuses bodies over the limit (413) before the app reads them, writes one log line per
request (method, path, status, tokens, milliseconds), counts statuses for /metrics, and turns anything unexpected into
OpenAI's error object with a one-line log entry instead of a traceback.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from . import api
from .api import APIError, ServerState

log = logging.getLogger("tiblocal.serve")

PUBLIC = ("/", "/index.html", "/app.js", "/style.css", "/health", "/v1/health", "/props", "/favicon.ico")
PAGE = {  # the chat page: name -> media type
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page loads nothing from anywhere else: no CDN, no font service (it works with no network).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def create_app(state: ServerState, *, max_body: int, cors_origins: list[str] | None = None) -> Gate:
    pages = {name: api.page_file(name) for name in PAGE}

    def page(name: str) -> Callable:
        async def handler(request: Request) -> Response:
            return Response(pages[name], media_type=PAGE[name], headers=PAGE_HEADERS)

        return handler

    def endpoint(fn) -> Callable:
        async def handler(request: Request) -> Response:
            try:
                return await fn(request)
            except APIError as e:
                return e.response()

        return handler

    async def chat(request: Request) -> Response:
        return await api.chat_completions(state, request)

    async def completions(request: Request) -> Response:
        return await api.completions(state, request)

    async def tokenize(request: Request) -> Response:  # in a thread: a large text takes a while
        return JSONResponse(await run_in_threadpool(api.tokenize, state, await request.body()))

    async def detokenize(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(api.detokenize, state, await request.body()))

    async def models(request: Request) -> Response:
        return JSONResponse(api.models(state))

    async def model(request: Request) -> Response:
        state.check_model(request.path_params["name"])
        return JSONResponse(api.models(state)["data"][0])

    async def health(request: Request) -> Response:
        return JSONResponse(api.health(state))

    async def props(request: Request) -> Response:
        return JSONResponse(api.props(state))

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(state.metrics.text(state.scheduler), media_type="text/plain; version=0.0.4")

    routes = [
        Route("/", page("index.html")),
        *(Route(f"/{name}", page(name)) for name in PAGE),
        Route("/v1/chat/completions", endpoint(chat), methods=["POST"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/models", endpoint(models)),
        Route("/v1/models/{name:path}", endpoint(model)),
        Route("/tokenize", endpoint(tokenize), methods=["POST"]),
        Route("/detokenize", endpoint(detokenize), methods=["POST"]),
        Route("/health", endpoint(health)),
        Route("/v1/health", endpoint(health)),
        Route("/props", endpoint(props)),
        Route("/metrics", endpoint(metrics)),
    ]

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return APIError(404, f"unknown route {request.method} {request.url.path}; the API is under /v1 "
                                 "(GET /v1/models, POST /v1/chat/completions, POST /v1/completions)",
                            code="unknown_url").response()
        if exc.status_code == 405:
            return APIError(405, f"{request.method} is not allowed on {request.url.path}",
                            code="method_not_allowed").response()
        return APIError(exc.status_code, str(exc.detail)).response()

    middleware = []
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error})
    return Gate(app, state, max_body=max_body, cors=bool(cors_origins))


class Gate:
    """Key, body limit, log line, metrics and the last-resort error answer, around the app."""

    def __init__(self, app, state: ServerState, *, max_body: int, cors: bool) -> None:
        self.app, self.state, self.max_body, self.cors = app, state, max_body, cors

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan: the server's start and stop are run_serve's
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
            return
        t0 = time.perf_counter()
        status = [0]
        started = [False]
        scope.setdefault("state", {})

        async def send_logged(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                started[0] = True
            await send(message)

        try:
            error = self._refusal(scope)
            if error is None:
                receive, error = await self._read_body(scope, receive)
            if error is not None:
                await error.response()(scope, receive, send_logged)
            else:
                await self.app(scope, receive, send_logged)
        except Exception as e:  # a bug: one log line and an error object, never a traceback or a dropped request
            log.error("%s %s failed: %s: %s", scope["method"], scope["path"], type(e).__name__, e)
            if not started[0]:
                await APIError(500, f"internal error ({type(e).__name__}); the server log has a line about it",
                               type="server_error").response()(scope, receive, send_logged)
        finally:
            self._account(scope, status[0], t0)

    def _refusal(self, scope) -> APIError | None:
        if self.state.api_key is None or scope["path"] in PUBLIC:
            return None
        if self.cors and scope["method"] == "OPTIONS":  # a CORS preflight carries no key
            return None
        given = ""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value.decode("latin-1")
                break
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.state.api_key.encode())
        if ok:
            return None
        what = "no API key was given" if not given else "the API key is wrong"
        return APIError(401, f"{what}; send the header 'Authorization: Bearer KEY' with the server's --api-key",
                        code="invalid_api_key")

    async def _read_body(self, scope, receive):
        """The whole body, up to the limit, replayed to the app; (receive, None) or (receive, the 413 error)."""
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                return receive, self._too_large(int(value))
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return receive, None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                chunks = None
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return receive, self._too_large(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = [False]

        async def replay():
            if not replayed[0]:
                replayed[0] = True
                if chunks is None:
                    return {"type": "http.disconnect"}
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return replay, None

    def _too_large(self, size: int) -> APIError:
        return APIError(413, f"the request body has {size:,}+ bytes, over this server's limit of {self.max_body:,}; "
                             "send less, or restart the server with a larger --max-body", code="request_too_large")

    def _account(self, scope, status: int, t0: float) -> None:
        m = self.state.metrics
        m.requests[status] = m.requests.get(status, 0) + 1
        st = scope.get("state", {})
        tokens = st.get("tokens")
        ms = (time.perf_counter() - t0) * 1000
        log.info("%s %s %d %s %.1f ms", scope["method"], scope["path"], status,
                 f"{st.get('prompt_tokens', 0)}+{tokens} tokens" if tokens is not None else "-", ms)


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
