"""A minimal headless Chromium driver over the Chrome DevTools Protocol (aiohttp websockets).

Enough to load a page, run JavaScript in it, poll the DOM for a condition and take a screenshot;
used by the UI end-to-end test. Chromium runs with a fresh profile in a folder the caller owns,
listens for DevTools on a port it picks itself (read back from ``DevToolsActivePort``), binds
nothing else, and is stopped by :meth:`Chromium.close` (or the ``async with`` block).
"""

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "/usr/bin/chromium")
# Headless in a container: no sandbox (root), no GPU, and no traffic to Google's services.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1600,1000",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


def find_chromium() -> str | None:
    """The Chromium executable on this machine, or None."""
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


class DevToolsError(RuntimeError):
    """Chromium answered a DevTools command with an error, or did not start."""


class Chromium:
    """One headless Chromium with one page, driven over DevTools.

    Args:
        executable: The Chromium binary.
        profile: A fresh, empty folder for the browser profile.
        log: File that receives Chromium's output.
    """

    def __init__(self, executable: str, profile: Path, log: Path) -> None:
        self.executable = executable
        self.profile = profile
        self.log = log
        self._proc: subprocess.Popen | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self, timeout: float = 60.0) -> None:
        """Launch Chromium and attach to its first page.

        Raises:
            DevToolsError: Chromium exited or did not open DevTools before the deadline.
        """
        self.profile.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self._proc = subprocess.Popen(
                [
                    self.executable,
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={self.profile}",
                    "about:blank",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self._proc.poll() is not None:
                raise DevToolsError(f"chromium exited with {self._proc.returncode}: {self._tail()}")
            if time.monotonic() > deadline:
                raise DevToolsError(f"chromium opened no DevTools port in {timeout:.0f} s")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession()
        targets: list[dict[str, Any]] = []
        while not targets:
            async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = [t for t in await response.json() if t.get("type") == "page"]
            if not targets:
                if time.monotonic() > deadline:
                    raise DevToolsError("chromium has no page to attach to")
                await asyncio.sleep(0.1)
        # Screenshots arrive as one large base64 message.
        self._ws = await self._session.ws_connect(
            targets[0]["webSocketDebuggerUrl"], max_msg_size=0
        )
        await self.send("Page.enable")
        await self.send("Runtime.enable")

    async def send(self, method: str, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        """Send a DevTools command and return its result (events in between are ignored).

        Raises:
            DevToolsError: The command failed or got no answer in time.
        """
        if self._ws is None:
            raise DevToolsError("not started")
        ws = self._ws
        ident = next(self._ids)
        await ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))

        async def answer() -> dict[str, Any]:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                data = json.loads(message.data)
                if data.get("id") != ident:
                    continue  # an event, or the answer to an earlier command
                if "error" in data:
                    raise DevToolsError(f"{method}: {data['error']}")
                return data.get("result", {})
            raise DevToolsError(f"DevTools connection closed during {method}")

        try:
            return await asyncio.wait_for(answer(), timeout)
        except TimeoutError:
            raise DevToolsError(f"{method}: no answer within {timeout:.0f} s") from None

    async def navigate(self, url: str) -> None:
        """Start loading ``url`` (poll the DOM for what should appear)."""
        await self.send("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        """Evaluate a JavaScript expression in the page and return its JSON value.

        Raises:
            DevToolsError: The expression threw.
        """
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise DevToolsError(f"JavaScript failed: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    async def screenshot(self, path: Path) -> None:
        """Save a PNG of the viewport."""
        result = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(result["data"]))

    async def close(self) -> None:
        """Close the connection and stop Chromium and its helper processes."""
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Renderer and GPU helpers share the browser's process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
