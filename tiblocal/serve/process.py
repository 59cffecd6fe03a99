"""`tiblocal serve` as a subprocess, for the tests, the load benchmark and scripts: started on a free loopback port
(``--port 0``; the banner says which), stopped with SIGTERM, its stderr kept in a file for checks."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class Server:
    """``Server("model.gguf", "--parallel", "4")``: the same arguments as `tiblocal serve`; ``url`` once it listens."""

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 60) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="tiblocal-serve-", suffix=".log", delete=False)
        full_env = dict(os.environ, PYTHONIOENCODING="utf-8", NO_COLOR="1")
        full_env.pop("TIBLOCAL_API_KEY", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tiblocal", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=self.log, env=full_env,
        )
        self.banner = self._first_line(timeout)
        if "listening on http://" not in self.banner:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the server did not start: {self.banner!r}; stderr: {self.stderr}")
        self.url = self.banner.split("listening on ", 1)[1].split()[0]

    def _first_line(self, timeout: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        end = time.monotonic() + timeout
        data = b""
        while b"\n" not in data and time.monotonic() < end:
            if not sel.select(timeout=max(0.0, end - time.monotonic())):
                break
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                break
            data += chunk
        return data.decode("utf-8", "replace").strip()

    @property
    def api(self) -> str:
        return self.url + "/v1"

    @property
    def rss_bytes(self) -> int:
        """The server process's resident memory (Linux)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    @property
    def stderr(self) -> str:
        return Path(self.log.name).read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        Path(self.log.name).unlink(missing_ok=True)
