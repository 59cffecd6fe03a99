"""`tiblocal serve`: load the model, start the decode loop, listen, and shut down cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from ..chat import render_prompt
from ..engine import Engine, EngineConfig
from ..errors import TiblocalError
from ..models import resolve_model
from ..templates import resolve_chat_template
from .api import ServerState
from .app import create_app
from .slots import Scheduler

log = logging.getLogger("tiblocal.serve")

API_KEY_ENV = "TIBLOCAL_API_KEY"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SHUTDOWN_GRACE_S = 5  # in-flight answers get this long to finish after Ctrl-C or SIGTERM, then they are cancelled


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so that a port in use is one line, not a traceback."""
    if not 0 <= port <= 65535:
        raise TiblocalError(f"--port {port} is not a port number; expected 0 to 65535 (0: any free port)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise TiblocalError(f"--host {host!r} does not resolve ({e.strerror}); give an address such as 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise TiblocalError(
            f"cannot listen on {host}:{port} ({e.strerror}); choose another --port (0 picks a free one)"
        ) from None
    sock.set_inheritable(True)
    return sock


def run_serve(
    model: Path | None,
    *,
    host: str,
    port: int,
    engine_config: EngineConfig,
    template: str | None,
    api_key: str | None,
    queue: int,
    max_body: int,
    cors_origins: list[str],
) -> int:
    import uvicorn

    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    # clients send the key in an HTTP header: printable ASCII; an empty one (`--api-key ""`) would require the
    # header "Bearer " and nothing after it, and one with spaces at its ends or a Tibetan letter could never match
    if api_key is not None and not (api_key.strip() == api_key != "" and api_key.isascii() and api_key.isprintable()):
        raise TiblocalError(f"--api-key {api_key!r}: expected printable ASCII, not empty and without spaces at its "
                            "ends (clients send it as 'Authorization: Bearer KEY'); leave it out for no key")
    if queue < 0:
        raise TiblocalError(f"--queue {queue} is negative; expected the number of requests that may wait (0: none)")
    if max_body < 1024:
        raise TiblocalError(f"--max-body {max_body} is too small; expected at least 1024 bytes")
    request_log = logging.getLogger("tiblocal.serve")
    if not request_log.handlers:  # one line per request on stderr: time, method, path, status, tokens, milliseconds
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        request_log.addHandler(handler)
        request_log.propagate = False
    request_log.setLevel(logging.INFO)
    path = resolve_model(model)
    sock = bind(host, port)
    try:
        engine = Engine(path, engine_config)
    except BaseException:
        sock.close()
        raise
    scheduler = Scheduler(engine, queue_size=queue)
    # The decode loop and the HTTP thread share the GIL, and the loop takes it back after every llama.cpp call: while
    # the HTTP thread runs Python, that can take up to the switch interval (5 ms by default, against a step of 3.5 to
    # 7 ms for a 7B model on the GPU). 0.5 ms bounds that wait.
    sys.setswitchinterval(0.0005)
    try:
        tmpl, notice = resolve_chat_template(engine.chat_template, template)
        if notice:
            print(f"note: {notice}", file=sys.stderr)
        try:  # a broken template is the model's: say so now; each chat request will get a 400 naming it
            render_prompt(engine, tmpl, [{"role": "user", "content": "hello"}])
        except TiblocalError as e:
            print(f"warning: {e}; chat requests will fail, pass --template NAME", file=sys.stderr)
        state = ServerState(engine, scheduler, tmpl, model_id=path.stem, model_file=path.name, api_key=api_key)
        app = create_app(state, max_body=max_body, cors_origins=cors_origins)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        if not is_loopback(host) and api_key is None:
            print(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use the "
                  f"model; pass --api-key KEY (or set {API_KEY_ENV})", file=sys.stderr)
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", log_config=None,
            # our own grace ends every answer first (scheduler.close); uvicorn's is the backstop
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S + 5,
        )

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:  # SIGINT or SIGTERM: the answers in flight get the grace
                super().handle_exit(sig, frame)
                scheduler.close(SHUTDOWN_GRACE_S)

        server = Server(config)

        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the handler that was there
        # before it: with Python's defaults that kills the process (SIGTERM) or raises KeyboardInterrupt (SIGINT)
        # before the slots and the model are freed. A handler of ours takes that second delivery, so the stop is clean,
        # and a signal that comes before uvicorn has installed its own handler stops the server all the same.
        def before_and_after_uvicorn(sig, frame) -> None:
            if not server.should_exit:
                server.should_exit = True
                scheduler.close(SHUTDOWN_GRACE_S)

        previous = {sig: signal.signal(sig, before_and_after_uvicorn) for sig in STOP_SIGNALS}
        try:
            scheduler.start()
            print(f"tiblocal serve: {path.name} ({engine.parallel} slots, {engine.n_ctx} tokens each, template "
                  f"{tmpl.name}); listening on http://{shown}:{bound_port} (the chat page is at /, the API at /v1)",
                  flush=True)
            server.run(sockets=[sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        scheduler.stop()
        engine.close()
        sock.close()
    print("tiblocal serve: stopped", file=sys.stderr, flush=True)
    return 0
