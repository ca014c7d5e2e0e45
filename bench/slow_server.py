"""A lean webhook destination with fixed latency, for the execution benchmark.

Every POST waits ``--latency-ms`` (20 ms by default, ``asyncio.sleep``) and answers 200. It counts
requests and distinct ``Idempotency-Key`` headers; ``GET /stats`` returns those counts as JSON.
It binds 127.0.0.1 only, prints ``PORT <n>`` once it listens, and stops by itself after
``--max-seconds`` or as soon as its parent process goes away.

Run it alone with ``python -m bench.slow_server --port 0``; benchmarks use :class:`SlowServer`,
which starts it as a separate process and always stops it.
"""

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

REPO_ROOT = Path(__file__).resolve().parent.parent
_START_TIMEOUT = 30.0


class _Counters:
    """Requests seen and distinct idempotency keys."""

    def __init__(self) -> None:
        self.requests = 0
        self.keys: set[str] = set()


async def _serve(port: int, latency: float, max_seconds: float) -> None:
    """Serve until the lifetime ends or the parent process disappears."""
    counters = _Counters()
    parent = os.getppid()

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "GET" and request.path == "/stats":
            payload = {"requests": counters.requests, "unique_keys": len(counters.keys)}
            return web.Response(text=json.dumps(payload), content_type="application/json")
        await request.read()
        counters.requests += 1
        key = request.headers.get("Idempotency-Key")
        if key:
            counters.keys.add(key)
        await asyncio.sleep(latency)
        return web.Response(text="ok")

    # The low-level server: no router, no middlewares, no access log.
    server = web.Server(handle, access_log=None)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    site = web.SockSite(runner, sock, backlog=4096)
    await site.start()
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    deadline = time.monotonic() + max_seconds
    try:
        while time.monotonic() < deadline and os.getppid() == parent:
            await asyncio.sleep(0.5)
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and serve (with uvloop when it is installed, to stay out of the way)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="hard lifetime")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    coroutine = _serve(args.port, args.latency_ms / 1000.0, args.max_seconds)
    try:
        import uvloop

        uvloop.run(coroutine)
    except ImportError:
        asyncio.run(coroutine)


class SlowServer:
    """Start ``bench.slow_server`` in its own process; stop it on exit, whatever happens.

    Args:
        latency_ms: Latency of every POST.
        max_seconds: Lifetime after which the server stops by itself.
    """

    def __init__(self, *, latency_ms: float = 20.0, max_seconds: float = 900.0):
        self.latency_ms = latency_ms
        self.max_seconds = max_seconds
        self.port = 0
        self._process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        """The webhook URL."""
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def pid(self) -> int:
        """Process id of the server."""
        if self._process is None:
            raise RuntimeError("the server is not running")
        return self._process.pid

    def __enter__(self) -> "SlowServer":
        command = [
            sys.executable,
            "-m",
            "bench.slow_server",
            "--port",
            "0",
            "--latency-ms",
            str(self.latency_ms),
            "--max-seconds",
            str(self.max_seconds),
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self._process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            self.port = self._read_port(self._process)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @staticmethod
    def _read_port(process: "subprocess.Popen[str]") -> int:
        """Wait for the ``PORT <n>`` line."""
        assert process.stdout is not None
        started = time.monotonic()
        while time.monotonic() - started < _START_TIMEOUT:
            line = process.stdout.readline()
            if not line:
                break
            if line.startswith("PORT "):
                return int(line.split()[1])
        raise RuntimeError(f"slow_server did not start (exit code {process.poll()})")

    def stop(self) -> None:
        """Terminate the server process (kill it if it lingers)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if process.stdout is not None:
            process.stdout.close()

    def stats(self) -> dict[str, int]:
        """Requests received and distinct idempotency keys seen so far."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as answer:
            data: dict[str, Any] = json.loads(answer.read())
        return {k: int(v) for k, v in data.items()}

    def cpu_seconds(self) -> float:
        """User plus system CPU time the server process has used (Linux ``/proc``)."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks = os.sysconf("SC_CLK_TCK")
            return (int(fields[11]) + int(fields[12])) / ticks
        return float("nan")


if __name__ == "__main__":
    main()
