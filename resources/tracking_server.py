"""The campaign story's local tracking endpoint: where the emails' open pixel, links and unsubscribe
links lead.

==========================  ===============================================================
endpoint                    what it does; reply
==========================  ===============================================================
``GET /o/<token>.gif``      records an open (the pixel a mail client loads); 200, a 1x1 GIF
``GET /c/<token>``          records a click; 302 to the landing page
``GET /u/<token>``          records an unsubscribe; 200, a page that says so
``GET /landing``            the landing page a click ends on; 200
``GET /healthz``            200 ``ok``
==========================  ===============================================================

A token names one email: the recipient, the campaign and the action's idempotency key, signed
with HMAC-SHA256 (:func:`sign_token`, :func:`verify_token`); the channel that sends the email
makes it (:mod:`resources.campaign_channels`). A token that does not verify (tampered, cut short,
signed with another secret) is refused with 403 and records nothing.

Events go to the SQLite table ``events`` (see ``_SCHEMA``): kind (``open``, ``click``,
``unsubscribe``), recipient, campaign, key, the time the event occurred and the wall-clock time
it arrived. Mail clients load a pixel again whenever the email is shown: an open of the same
token within ``dedupe_seconds`` (a minute) of its last recorded open is not recorded again
(:attr:`TrackingServer.deduplicated` counts them).

Time. An event occurs at the server's ``clock`` (real UTC time by default). A server started with
``simulated_time=True`` (the demo's simulated audience) takes the time from the request's
``X-Sim-Time`` header (ISO 8601) instead; without that flag the header is refused with 400, so a
real deployment's events cannot be back- or forward-dated by a client.

Run in-process (``start()``/``stop()`` or ``with``) or as its own process::

    CAMPAIGN_TRACKING_SECRET=... python -m resources.tracking_server --port 9300 \\
        --db var/campaign_tracking.sqlite

which prints one JSON line with the port and URLs once it listens and stops on SIGTERM, SIGINT
or the exit of the process that started it.
"""

import argparse
import base64
import binascii
import datetime as dt
import hashlib
import hmac
import logging
import os
import sqlite3
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from resources.local_servers import (
    LOOPBACK,
    SqliteAiohttpServer,
    add_lifetime_arguments,
    serve_in_foreground,
)

__all__ = [
    "DEFAULT_SECRET_ENV",
    "SIM_TIME_HEADER",
    "TrackingServer",
    "TrackingToken",
    "main",
    "sign_token",
    "verify_token",
]

DEFAULT_SECRET_ENV = "CAMPAIGN_TRACKING_SECRET"
DEFAULT_PORT = 9300
SIM_TIME_HEADER = "X-Sim-Time"
DEDUPE_SECONDS = 60.0
_SEP = "\x1f"
# 128 bits of HMAC are plenty for a link and keep the URL short.
_SIGNATURE_BYTES = 16
# The smallest transparent GIF.
PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,             -- open | click | unsubscribe
    recipient_id TEXT NOT NULL,
    campaign_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,  -- the email's action
    token_sha256 TEXT NOT NULL,     -- which email (the token itself is not kept)
    occurred_at TEXT NOT NULL,      -- ISO 8601 UTC, the server's (or the simulated) clock
    received_at TEXT NOT NULL       -- wall-clock time of arrival
);
CREATE INDEX IF NOT EXISTS events_by_time ON events (occurred_at);
CREATE INDEX IF NOT EXISTS events_by_token ON events (token_sha256, kind, occurred_at);
"""


@dataclass(frozen=True)
class TrackingToken:
    """What a verified token names."""

    recipient_id: str
    campaign_id: str
    idempotency_key: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(secret: str, body: str) -> bytes:
    return hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()[:_SIGNATURE_BYTES]


def sign_token(secret: str, *, recipient_id: str, campaign_id: str, idempotency_key: str) -> str:
    """The tracking token of one email: URL-safe, ``<payload>.<signature>``.

    Args:
        secret: The tracking secret the server checks with.
        recipient_id: The recipient.
        campaign_id: The campaign.
        idempotency_key: The email's action.

    Returns:
        The token (letters, digits, ``-``, ``_`` and one ``.``).

    Raises:
        ValueError: The secret is empty or a part holds the separator character.
    """
    if not secret:
        raise ValueError("the tracking secret is empty")
    parts = (recipient_id, campaign_id, idempotency_key)
    if any(_SEP in part for part in parts):
        raise ValueError("a token part holds the separator character")
    body = _b64(_SEP.join(parts).encode())
    return f"{body}.{_b64(_signature(secret, body))}"


def verify_token(secret: str, token: str) -> TrackingToken | None:
    """What ``token`` names, or None when it does not verify against ``secret``."""
    body, dot, signature = token.partition(".")
    if not dot or not body or not signature:
        return None
    try:
        given = _unb64(signature)
        if not hmac.compare_digest(given, _signature(secret, body)):
            return None
        parts = _unb64(body).decode().split(_SEP)
    except (binascii.Error, ValueError):
        return None
    if len(parts) != 3 or not all(parts):
        return None
    return TrackingToken(*parts)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(when: dt.datetime) -> str:
    # Microseconds kept: the dedupe and the day boundaries compare these strings.
    return when.astimezone(dt.UTC).isoformat(timespec="microseconds")


_LANDING_PAGE = """<!doctype html>
<html><head><title>Northwind</title></head>
<body><h1>Welcome to Northwind</h1><p>Thank you for visiting from our email.</p></body></html>
"""
_UNSUBSCRIBED_PAGE = """<!doctype html>
<html><head><title>Unsubscribed</title></head>
<body><h1>You are unsubscribed</h1><p>You will not receive this campaign again.</p></body></html>
"""


class TrackingServer(SqliteAiohttpServer):
    """An HTTP server on 127.0.0.1 that records the opens, clicks and unsubscribes of campaign
    emails; see the module docstring.

    Args:
        secret: The tracking secret the tokens are signed with.
        db_path: SQLite file of the ``events`` table; created if missing, kept between runs.
        port: Port to listen on; 0 lets the OS choose.
        clock: The time an event occurs at (aware); real UTC time when None.
        simulated_time: Take the time from the ``X-Sim-Time`` header when a request carries it
            (the demo's simulated audience); refused with 400 otherwise.
        dedupe_seconds: Repeated opens of one token within this long are recorded once.
        landing_url: Where a click is redirected; this server's ``/landing`` when None.

    Raises:
        ValueError: The secret is empty, or ``dedupe_seconds`` is negative.
    """

    name = "tracking-server"
    schema = _SCHEMA

    def __init__(
        self,
        secret: str,
        db_path: str | os.PathLike[str],
        port: int = 0,
        *,
        clock: Callable[[], dt.datetime] | None = None,
        simulated_time: bool = False,
        dedupe_seconds: float = DEDUPE_SECONDS,
        landing_url: str | None = None,
    ) -> None:
        if not secret:
            raise ValueError("the tracking secret is empty")
        if dedupe_seconds < 0:
            raise ValueError(f"dedupe_seconds must be >= 0, got {dedupe_seconds}")
        super().__init__(db_path, port)
        self._secret = secret
        self._clock = clock or _utc_now
        self.simulated_time = simulated_time
        self.dedupe_seconds = dedupe_seconds
        self._landing_url = landing_url
        self._counts_lock = threading.Lock()
        self._deduplicated = 0
        self._refused = 0

    # -- URLs --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL, ``http://127.0.0.1:<port>``."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def landing_url(self) -> str:
        """Where a click ends."""
        return self._landing_url or f"{self.url}/landing"

    # -- counters ------------------------------------------------------------------------------

    @property
    def deduplicated(self) -> int:
        """Opens not recorded because the same token's open was recorded within the window."""
        with self._counts_lock:
            return self._deduplicated

    @property
    def refused(self) -> int:
        """Requests answered 4xx (a bad token or a refused header)."""
        with self._counts_lock:
            return self._refused

    def event_counts(self) -> dict[str, int]:
        """Recorded events per kind, read from the database file."""
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall()
        return {str(kind): int(n) for kind, n in rows}

    # -- serving -------------------------------------------------------------------------------

    def _handler(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/o/{token}.gif", self._on_open)
        app.router.add_get("/c/{token}", self._on_click)
        app.router.add_get("/u/{token}", self._on_unsubscribe)
        app.router.add_get("/landing", self._on_landing)
        app.router.add_get("/healthz", self._on_health)
        return app

    async def _on_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _on_landing(self, request: web.Request) -> web.Response:
        return web.Response(text=_LANDING_PAGE, content_type="text/html")

    async def _on_open(self, request: web.Request) -> web.StreamResponse:
        refused = self._record(request, "open")
        if refused is not None:
            return refused
        return web.Response(
            body=PIXEL_GIF, content_type="image/gif", headers={"Cache-Control": "no-store"}
        )

    async def _on_click(self, request: web.Request) -> web.StreamResponse:
        refused = self._record(request, "click")
        if refused is not None:
            return refused
        raise web.HTTPFound(self.landing_url)

    async def _on_unsubscribe(self, request: web.Request) -> web.StreamResponse:
        refused = self._record(request, "unsubscribe")
        if refused is not None:
            return refused
        return web.Response(text=_UNSUBSCRIBED_PAGE, content_type="text/html")

    def _refuse(self, status: int, message: str) -> web.Response:
        with self._counts_lock:
            self._refused += 1
        return web.json_response({"error": message}, status=status)

    def _occurred_at(self, request: web.Request) -> dt.datetime | web.Response:
        header = request.headers.get(SIM_TIME_HEADER)
        if header is None:
            return self._clock()
        if not self.simulated_time:
            return self._refuse(400, f"{SIM_TIME_HEADER} is only accepted in simulated time")
        try:
            when = dt.datetime.fromisoformat(header)
        except ValueError:
            return self._refuse(400, f"{SIM_TIME_HEADER} is not an ISO 8601 time")
        if when.tzinfo is None:
            return self._refuse(400, f"{SIM_TIME_HEADER} needs a UTC offset")
        return when

    def _record(self, request: web.Request, kind: str) -> web.Response | None:
        """Record one event; returns the refusal when there is one."""
        raw = request.match_info["token"]
        token = verify_token(self._secret, raw)
        if token is None:
            return self._refuse(403, "the tracking token does not verify")
        when = self._occurred_at(request)
        if isinstance(when, web.Response):
            return when
        digest = hashlib.sha256(raw.encode()).hexdigest()
        db = self._db
        assert db is not None  # open while serving
        occurred = _iso(when)
        # The handlers run on the server's one event loop, so check-then-insert is not raced.
        if kind == "open" and self.dedupe_seconds > 0:
            since = _iso(when - dt.timedelta(seconds=self.dedupe_seconds))
            recent = db.execute(
                "SELECT 1 FROM events WHERE token_sha256 = ? AND kind = 'open' "
                "AND occurred_at > ? AND occurred_at <= ? LIMIT 1",
                (digest, since, occurred),
            ).fetchone()
            if recent is not None:
                with self._counts_lock:
                    self._deduplicated += 1
                return None
        db.execute(
            "INSERT INTO events (kind, recipient_id, campaign_id, idempotency_key, token_sha256, "
            "occurred_at, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                kind,
                token.recipient_id,
                token.campaign_id,
                token.idempotency_key,
                digest,
                occurred,
                _iso(_utc_now()),
            ),
        )
        return None


# -- the standalone process --------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m resources.tracking_server",
        description="Run the campaign story's tracking endpoint (opens, clicks, unsubscribes) "
        "on 127.0.0.1.",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--db", type=Path, default=Path("var/campaign_tracking.sqlite"))
    parser.add_argument(
        "--secret-env",
        default=DEFAULT_SECRET_ENV,
        help="environment variable holding the tracking secret (never pass it as an argument: "
        "arguments are visible to every user of the machine)",
    )
    parser.add_argument(
        "--simulated-time",
        action="store_true",
        help=f"accept the event time from the {SIM_TIME_HEADER} header (demos only)",
    )
    add_lifetime_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the tracking endpoint until SIGTERM, SIGINT or the parent's exit.

    Prints one JSON line to stdout once it listens: ``port``, ``url``, ``landing_url``, ``db``
    and ``pid``.

    Args:
        argv: Command-line arguments; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0 after a clean stop, 1 when the server stopped by itself, 2 when the
        configuration is unusable.
    """
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    secret = os.environ.get(args.secret_env, "")
    if not secret:
        print(f"error: set the tracking secret in ${args.secret_env}", file=sys.stderr)
        return 2
    server = TrackingServer(secret, args.db, port=args.port, simulated_time=args.simulated_time)
    return serve_in_foreground(
        [server],
        ready=lambda: {
            "port": server.port,
            "url": server.url,
            "landing_url": server.landing_url,
            "db": str(args.db.resolve()),
            "pid": os.getpid(),
        },
        what="tracking endpoint",
        exit_with_parent=args.exit_with_parent,
        owner_pid=args.owner_pid,
    )


if __name__ == "__main__":
    sys.exit(main())
