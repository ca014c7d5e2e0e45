"""A lean webhook destination with fixed latency, for the execution benchmark.

Every POST waits ``--latency-ms`` (20 ms by default, ``asyncio.sleep``) and answers 200. It counts
requests and distinct ``Idempotency-Key`` headers; ``GET /stats`` returns those counts as JSON.
A POST to a path ending in ``/poll`` (the workflow benchmark's poll step) answers the JSON
``{"ready": ...}`` instead of ``ok``: true on an entity's second poll, and on its first for about
half the entities (a hash of ``entity_id``); every other path answers as before.
It binds 127.0.0.1 only, prints ``PORT <n>`` once it listens, and stops by itself after
``--max-seconds`` or as soon as its parent process goes away.

Run it alone with ``python -m bench.slow_server --port 0``; benchmarks use :class:`SlowServer`,
which starts it as a separate process and always stops it. It stays a process of its own, unlike
the tests' receivers: in the benchmark's process it would compete for the GIL with the executor it
measures, and its CPU time (:meth:`SlowServer.cpu_seconds`) could not be told apart. Inside that
process it is a :class:`resources.local_servers.AiohttpServer` like the other local servers.
"""

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from resources.local_servers import AiohttpServer

REPO_ROOT = Path(__file__).resolve().parent.parent
_START_TIMEOUT = 30.0


class _LatencyServer(AiohttpServer):
    """The destination itself: answers every POST after ``latency`` seconds."""

    name = "slow-server"
    # Thousands of concurrent connections arrive at once when a benchmark starts.
    backlog = 4096

    def __init__(self, port: int, latency: float) -> None:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            loop_factory = None
        super().__init__(port, loop_factory=loop_factory)
        self.latency = latency
        # Touched only on the server's own loop, so no lock.
        self.requests = 0
        self.keys: set[str] = set()
        self.polls = 0
        self.ready = 0
        self.polled: set[str] = set()

    def _handler(self) -> web.Server:
        # The low-level server: no router, no middlewares, no access log.
        return web.Server(self._handle, access_log=None)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "GET" and request.path == "/stats":
            payload = {
                "requests": self.requests,
                "unique_keys": len(self.keys),
                "polls": self.polls,
                "ready": self.ready,
            }
            return web.Response(text=json.dumps(payload), content_type="application/json")
        body = await request.read()
        self.requests += 1
        key = request.headers.get("Idempotency-Key")
        if key:
            self.keys.add(key)
        answer = self._poll_answer(body) if request.path.endswith("/poll") else None
        # The simulated destination latency this benchmark is about, not a synchronisation.
        await asyncio.sleep(self.latency)
        if answer is None:
            return web.Response(text="ok")
        return web.Response(text=answer, content_type="application/json")

    def _poll_answer(self, body: bytes) -> str:
        entity = str(json.loads(body).get("entity_id", ""))
        # crc32, not hash(): the same half of the entities is ready at once in every run.
        ready = entity in self.polled or zlib.crc32(entity.encode()) % 2 == 0
        self.polled.add(entity)
        self.polls += 1
        self.ready += ready
        return '{"ready":true}' if ready else '{"ready":false}'


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and serve until the lifetime ends, SIGTERM, or the parent goes away."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="hard lifetime")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    parent = os.getppid()
    deadline = time.monotonic() + args.max_seconds
    with _LatencyServer(args.port, args.latency_ms / 1000.0) as server:
        print(f"PORT {server.port}", flush=True)
        # Woken every half second to notice the parent's exit (the process is re-parented).
        while not stop.wait(0.5):
            if time.monotonic() >= deadline or os.getppid() != parent or not server.running:
                break


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

    def command(self) -> list[str]:
        """The server process's command line (a subclass serves its own kind of server)."""
        return [
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

    def __enter__(self) -> Self:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self._process = subprocess.Popen(
            self.command(), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True
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
        """Requests received, distinct idempotency keys, polls and ready answers so far."""
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
