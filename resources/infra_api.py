"""The host-remediation demo's local infrastructure API: the system the remediation steps act on.

It stands in for a real fleet manager so the workflow executes real calls without leaving the
machine. Each workflow step is one signed JSON ``POST`` from the library's ``WebhookChannel``
(Standard Webhooks headers; ``webhook-id`` and ``Idempotency-Key`` carry the step attempt's
idempotency key), checked with :func:`~autoexec_dagster.channels.webhook.verify_signature`:

=================  =========================================================================
endpoint           reply (JSON object; every reply names ``host_id``)
=================  =========================================================================
``/isolate``       ``{"host_id", "state": "isolated"}``
``/diagnostics``   ``{"host_id", "cause", "partition_hour", "detail"}``; ``cause`` is the
                   injected fault (``service_hung``, ``disk_full``, ``hardware``) or ``none``
``/restart``       ``{"host_id", "restarted": true, "restarted_at"}``; a hung service answers
                   again ``restart_delay_seconds`` after the (last) restart
``/clean_disk``    ``{"host_id", "cleaned": true, "cleaned_at"}``; a full disk counts as fixed
                   ``clean_disk_delay_seconds`` after the clean-up (0 by default: at once)
``/health``        ``{"host_id", "status": "healthy" | "degraded", "state", "checked_at"}``
``/reinstate``     ``{"host_id", "state": "in_service"}``; 409 while the host is degraded
=================  =========================================================================

The request body is the channel's payload: ``entity_id`` (or ``host_id``) names the host, and the
hour of the incident comes from ``partition_hour`` (a column of ``host_anomalies``) or, failing
that, ``partition_key`` (which every payload of the channel carries). Both take Dagster's hourly
key (``2026-12-01-10:00``) or ISO 8601. Nothing fixes a hardware fault: such a host stays degraded.

The host model. A host has one current incident: the fault :func:`assets.hosts.injected_faults`
reports for it in the latest partition a request named (a request naming an earlier hour than
the current incident's is answered about the current incident). Health is the truth: healthy when
the incident's fault is ``none`` or its remedy has taken effect on the API's clock.

Delivery semantics, what the demo and the tests check against the ledger:

- A repeated idempotency key gets the recorded reply (same status and body) and does nothing
  again; a key reused on another endpoint is refused with 422.
- A seeded share of requests (``failure_rate``) fails with 503 before anything happens, and a
  share (``lost_reply_rate``) fails with 503 after the action was done and recorded (a lost
  reply: the retry with the same key gets the recorded reply). Whether a request fails is a hash
  of (seed, key, attempt), so the same traffic fails the same way whatever the arrival order.
- Every request is a row of the ``calls`` table (see ``_SCHEMA``): key, endpoint, host, attempt
  (the n-th arrival of that key), the API's clock, the status and the outcome (``executed``,
  ``executed_reply_lost``, ``replayed``, ``failed_transient``, ``refused`` for other 4xx,
  ``rejected`` for a bad signature). The ``replies`` table holds one row per key that was executed,
  so "each step of each host executed once per attempt" is: the ledger's succeeded step keys equal
  ``SELECT idempotency_key FROM replies``, and no key has two ``executed*`` calls.

Time comes from an injectable ``clock`` (real UTC time by default), so tests move time instead of
sleeping; signature freshness is always checked against real time, since senders sign with it.

Run in-process (``start()``/``stop()`` or ``with``) or as its own process::

    INFRA_API_SECRET=whsec_... python -m resources.infra_api --port 9100 --db var/infra.sqlite

which prints one JSON line with the port and the endpoint URLs once it listens and stops on
SIGTERM, SIGINT or the exit of the process that started it.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import sqlite3
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from resources.local_servers import (
    LOOPBACK,
    SqliteAiohttpServer,
    add_lifetime_arguments,
    serve_in_foreground,
)

__all__ = [
    "ACTION_ENDPOINTS",
    "ENDPOINTS",
    "FileClock",
    "InfraApi",
    "main",
]

DEFAULT_SECRET_ENV = "INFRA_API_SECRET"
DEFAULT_PORT = 9100
DEFAULT_TOLERANCE_SECONDS = 300.0
DEFAULT_RESTART_DELAY_SECONDS = 45.0
DEFAULT_FAILURE_RATE = 0.05

ENDPOINTS = ("isolate", "diagnostics", "restart", "clean_disk", "health", "reinstate")
# The channel (action) names of the host-remediation playbook -> the endpoint each one posts to.
ACTION_ENDPOINTS = {
    "isolate_host": "isolate",
    "run_diagnostics": "diagnostics",
    "restart_service": "restart",
    "clean_disk": "clean_disk",
    "host_health": "health",
    "reinstate_host": "reinstate",
}
CAUSES = ("service_hung", "disk_full", "hardware", "none")
# What the diagnostics of each cause report beside the cause: the evidence a person reads.
_DETAIL = {
    "service_hung": "service not answering its health probe; worker threads blocked, CPU idle",
    "disk_full": "data volume 99% used; writes failing with ENOSPC",
    "hardware": "corrected and uncorrected ECC memory errors and disk I/O errors in the kernel log",
    "none": "no fault found",
}

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hosts (
    host_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,            -- in_service | isolated
    partition_hour TEXT NOT NULL,   -- the hour of the current incident (Dagster partition key)
    fault TEXT NOT NULL,            -- the incident's injected fault, or none
    restarted_at TEXT,              -- last restart, on the API's clock
    disk_cleaned_at TEXT,           -- last disk clean-up, on the API's clock
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS calls (
    call_id INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT,           -- the webhook-id header (unverified when rejected)
    endpoint TEXT NOT NULL,
    host_id TEXT,
    attempt INTEGER,                -- n-th arrival of this key with a valid signature
    step_attempt INTEGER,           -- the body's "attempt", when the sender sends one
    at TEXT NOT NULL,               -- the API's clock
    received_at TEXT NOT NULL,      -- wall-clock time
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL           -- executed | executed_reply_lost | replayed |
                                    -- failed_transient | refused | rejected
);
CREATE INDEX IF NOT EXISTS calls_by_key ON calls (idempotency_key);
CREATE TABLE IF NOT EXISTS replies (
    idempotency_key TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    host_id TEXT NOT NULL,
    status INTEGER NOT NULL,
    reply TEXT NOT NULL,
    at TEXT NOT NULL
);
"""


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="milliseconds")


class FileClock:
    """A clock another process moves: the time is read from a file holding ISO 8601 text.

    A demo that drives its ledger with an injected clock writes the same time here, so the API
    (in its own process) and the workflow agree on when a restart has taken effect. While the
    file is missing or empty, real UTC time is used.

    Args:
        path: The file; a naive time in it is taken as UTC.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __call__(self) -> dt.datetime:
        """The time in the file, or real UTC time while there is none.

        Raises:
            ValueError: The file holds text that is not an ISO 8601 time.
        """
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            text = ""
        if not text:
            return _utc_now()
        when = dt.datetime.fromisoformat(text)
        return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


@dataclasses.dataclass(frozen=True)
class _Call:
    """What the ``calls`` table records of one request, besides its answer."""

    endpoint: str
    key: str | None
    now: dt.datetime
    host_id: str | None = None
    attempt: int | None = None
    step_attempt: int | None = None


class _Refused(Exception):
    """A request the API answers with a 4xx and does nothing for."""

    def __init__(self, http_status: int, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.status = http_status
        self.body = {"error": message, **fields}


def _default_faults(partition_key: str) -> Mapping[str, str]:
    # Imported on first use: assets.hosts pulls in scikit-learn and Dagster, which a standalone
    # API process refused for its configuration should not wait for.
    from assets.hosts import injected_faults

    return injected_faults(partition_key)


def _default_hosts() -> Iterable[str]:
    from assets.hosts import host_inventory

    return host_inventory()["host_id"].tolist()


def _default_partition_hour(text: str) -> str:
    from assets.hosts import partition_hour, partition_key_of

    return partition_key_of(partition_hour(text))


class InfraApi(SqliteAiohttpServer):
    """An HTTP server on 127.0.0.1 that keeps each host's state and answers remediation steps.

    See the module docstring for the endpoints, the host model and the delivery semantics.

    Args:
        secret: The signing secret, ``whsec_<base64>`` or a plain string.
        db_path: SQLite database file (tables ``hosts``, ``calls``, ``replies``); created if
            missing, kept between runs.
        port: Port to listen on; 0 lets the OS choose.
        clock: The API's time (an aware datetime); real UTC time when None.
        restart_delay_seconds: How long after a restart a hung service answers again.
        clean_disk_delay_seconds: How long after a clean-up a full disk counts as fixed.
        failure_rate: Share of requests answered 503 before anything is done.
        lost_reply_rate: Share of requests answered 503 after the action was done and recorded.
        seed: Seed of the failure draws.
        tolerance_seconds: Largest accepted distance of ``webhook-timestamp`` from real time.
        latency_seconds: Delay added to every accepted request, to act like a remote system.
        faults: partition key -> {host_id: fault} (the ground truth); ``assets.hosts``'s
            :func:`~assets.hosts.injected_faults` when None.
        hosts: The known host ids; the ``assets.hosts`` inventory when None. Others get 404.
        partition_hour: Normalises a partition key or ISO time to the hourly partition key;
            ``assets.hosts``'s when None.

    Raises:
        ValueError: A malformed secret, or a rate or delay out of range.
    """

    schema = _SCHEMA

    name = "infra-api"

    def __init__(
        self,
        secret: str,
        db_path: str | os.PathLike[str],
        port: int = 0,
        *,
        clock: Callable[[], dt.datetime] | None = None,
        restart_delay_seconds: float = DEFAULT_RESTART_DELAY_SECONDS,
        clean_disk_delay_seconds: float = 0.0,
        failure_rate: float = DEFAULT_FAILURE_RATE,
        lost_reply_rate: float = 0.0,
        seed: int = 0,
        tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
        latency_seconds: float = 0.0,
        faults: Callable[[str], Mapping[str, str]] | None = None,
        hosts: Iterable[str] | None = None,
        partition_hour: Callable[[str], str] | None = None,
    ) -> None:
        # Imported here: the library pulls in Dagster, which `--help` should not wait for.
        from autoexec_dagster.channels.webhook import signing_key, verify_signature

        super().__init__(db_path, port)
        signing_key(secret)  # a malformed secret fails here (ValueError), not on each request
        for label, rate in (("failure_rate", failure_rate), ("lost_reply_rate", lost_reply_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{label} must be within [0, 1], got {rate}")
        if failure_rate + lost_reply_rate > 1.0:
            raise ValueError("failure_rate + lost_reply_rate must not exceed 1")
        if restart_delay_seconds < 0 or clean_disk_delay_seconds < 0:
            raise ValueError("delays must be >= 0 seconds")
        self._secret = secret
        self._verify = verify_signature
        self.clock = clock or _utc_now
        self.restart_delay = dt.timedelta(seconds=restart_delay_seconds)
        self.clean_disk_delay = dt.timedelta(seconds=clean_disk_delay_seconds)
        self.failure_rate = failure_rate
        self.lost_reply_rate = lost_reply_rate
        self.seed = seed
        self.tolerance_seconds = tolerance_seconds
        self.latency_seconds = latency_seconds
        self._faults = faults or _default_faults
        self._hosts = frozenset(hosts if hosts is not None else _default_hosts())
        self._partition_hour = partition_hour or _default_partition_hour
        self._counts_lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def __repr__(self) -> str:
        # Never the secret.
        return f"InfraApi(db_path={str(self.db_path)!r}, port={self._port})"

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:9100``."""
        return f"http://{LOOPBACK}:{self.port}"

    def url_for(self, endpoint: str) -> str:
        """The URL of one endpoint (``isolate``, ``diagnostics``, ...) or action name.

        Raises:
            KeyError: Neither an endpoint nor an action of ``ACTION_ENDPOINTS``.
        """
        path = ACTION_ENDPOINTS.get(endpoint, endpoint)
        if path not in ENDPOINTS:
            raise KeyError(f"no endpoint {endpoint!r}; endpoints are {', '.join(ENDPOINTS)}")
        return f"{self.url}/{path}"

    @property
    def counts(self) -> dict[str, int]:
        """Requests answered so far, per outcome (``executed``, ``replayed``, ...)."""
        with self._counts_lock:
            return dict(self._counts)

    def calls(self) -> list[dict[str, Any]]:
        """Every row of ``calls`` in arrival order, read through a connection of the caller's own."""
        return self._read("SELECT * FROM calls ORDER BY call_id")

    def host_row(self, host_id: str) -> dict[str, Any] | None:
        """A host's row of ``hosts`` (None before any request named it)."""
        rows = self._read("SELECT * FROM hosts WHERE host_id = ?", (host_id,))
        return rows[0] if rows else None

    def _read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        if not self.db_path.exists():
            return []
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=5.0)) as db:
            db.row_factory = sqlite3.Row
            return [dict(row) for row in db.execute(sql, parameters)]

    def _count(self, outcome: str) -> None:
        with self._counts_lock:
            self._counts[outcome] = self._counts.get(outcome, 0) + 1

    # -- serving -----------------------------------------------------------------------------

    def _handler(self) -> web.Application:
        app = web.Application()
        for endpoint in ENDPOINTS:
            app.router.add_post(f"/{endpoint}", self._endpoint_handler(endpoint))
        return app

    def _endpoint_handler(self, endpoint: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            return await self._handle(endpoint, request)

        return handle

    def _fails(self, key: str, attempt: int) -> str | None:
        """Whether this arrival of a key fails, and how: a hash, not a shared random stream."""
        digest = hashlib.blake2b(f"{self.seed}\x00{key}\x00{attempt}".encode(), digest_size=8)
        draw = int.from_bytes(digest.digest(), "big") / 2.0**64
        if draw < self.failure_rate:
            return "before"
        if draw < self.failure_rate + self.lost_reply_rate:
            return "after"
        return None

    async def _handle(self, endpoint: str, request: web.Request) -> web.Response:
        body = await request.read()
        # One mapping for checking and for reading the key: with a repeated webhook-id header,
        # the key recorded must be the one the signature covers.
        headers = {k.lower(): v for k, v in request.headers.items()}
        key = headers.get("webhook-id")
        if not self._verify(self._secret, headers, body, tolerance_seconds=self.tolerance_seconds):
            error = "missing, malformed, stale or wrong Standard Webhooks signature"
            return self._answer(
                _Call(endpoint, key, self.clock()), 401, "rejected", {"error": error}
            )
        assert key is not None  # verify_signature refuses a request without one
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            payload = None
        if not isinstance(payload, dict):
            payload = {}
        host_id = payload.get("entity_id", payload.get("host_id"))
        step_attempt = payload.get("attempt")
        attempt = self._arrival(key)
        call = _Call(
            endpoint,
            key,
            self.clock(),
            host_id=None if host_id is None else str(host_id),
            attempt=attempt,
            step_attempt=step_attempt if isinstance(step_attempt, int) else None,
        )
        failure = self._fails(key, attempt)
        if failure == "before":
            error = "temporarily unavailable (injected transient failure)"
            return self._answer(call, 503, "failed_transient", {"error": error})
        if self.latency_seconds:
            await asyncio.sleep(self.latency_seconds)
            call = dataclasses.replace(call, now=self.clock())
        # From here to the answer nothing awaits, so each request's read-decide-write runs alone
        # on the event loop; the transaction makes the action and its recorded reply one commit.
        db = self._require_db()
        recorded = db.execute(
            "SELECT endpoint, status, reply FROM replies WHERE idempotency_key = ?", (key,)
        ).fetchone()
        if recorded is not None:
            if recorded[0] != endpoint:
                error = f"idempotency key already used on /{recorded[0]}"
                return self._answer(call, 422, "refused", {"error": error})
            return self._answer(call, int(recorded[1]), "replayed", json.loads(recorded[2]))
        db.execute("BEGIN IMMEDIATE")
        try:
            reply = self._act(endpoint, call.host_id, payload, call.now)
            db.execute(
                "INSERT INTO replies (idempotency_key, endpoint, host_id, status, reply, at)"
                " VALUES (?, ?, ?, 200, ?, ?)",
                (
                    key,
                    endpoint,
                    reply["host_id"],
                    json.dumps(reply, sort_keys=True),
                    _iso(call.now),
                ),
            )
            db.execute("COMMIT")
        except _Refused as refused:
            db.execute("ROLLBACK")
            return self._answer(call, refused.status, "refused", refused.body)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if failure == "after":
            error = "temporarily unavailable (injected: the action was done, its reply lost)"
            return self._answer(call, 503, "executed_reply_lost", {"error": error})
        return self._answer(call, 200, "executed", reply)

    def _require_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("infra-api is not serving")
        return self._db

    def _arrival(self, key: str) -> int:
        row = (
            self._require_db()
            .execute(
                "SELECT count(*) FROM calls WHERE idempotency_key = ? AND attempt IS NOT NULL",
                (key,),
            )
            .fetchone()
        )
        return int(row[0]) + 1

    def _answer(
        self, call: _Call, status: int, outcome: str, reply: Mapping[str, Any]
    ) -> web.Response:
        self._require_db().execute(
            "INSERT INTO calls (idempotency_key, endpoint, host_id, attempt, step_attempt, at,"
            " received_at, status, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                call.key,
                call.endpoint,
                call.host_id,
                call.attempt,
                call.step_attempt,
                _iso(call.now),
                _iso(_utc_now()),
                status,
                outcome,
            ),
        )
        self._count(outcome)
        return web.json_response(dict(reply), status=status)

    # -- the host model ----------------------------------------------------------------------

    def _incident(
        self, host_id: str | None, payload: Mapping[str, Any], now: dt.datetime
    ) -> dict[str, Any]:
        """The host's row, opening a new incident when the request names a later hour."""
        if host_id is None:
            raise _Refused(400, "the body names no host: send entity_id (or host_id)")
        if host_id not in self._hosts:
            raise _Refused(404, f"unknown host {host_id!r}", host_id=host_id)
        db = self._require_db()
        cursor = db.execute("SELECT * FROM hosts WHERE host_id = ?", (host_id,))
        row = cursor.fetchone()
        columns = [column[0] for column in cursor.description]
        current = None if row is None else dict(zip(columns, row, strict=True))
        hour = self._requested_hour(payload)
        if hour is None:
            if current is None:
                raise _Refused(
                    400,
                    "the body names no hour: send partition_hour or partition_key "
                    "(e.g. '2026-12-01-10:00')",
                    host_id=host_id,
                )
            return current
        # Keys are zero-padded "%Y-%m-%d-%H:%M", so text order is time order.
        if current is not None and hour <= current["partition_hour"]:
            return current
        fault = str(self._faults(hour).get(host_id, "none"))
        state = "in_service" if current is None else current["state"]
        fresh = {
            "host_id": host_id,
            "state": state,
            "partition_hour": hour,
            "fault": fault,
            "restarted_at": None,
            "disk_cleaned_at": None,
            "updated_at": _iso(now),
        }
        db.execute(
            "INSERT INTO hosts (host_id, state, partition_hour, fault, restarted_at,"
            " disk_cleaned_at, updated_at) VALUES (:host_id, :state, :partition_hour, :fault,"
            " NULL, NULL, :updated_at) ON CONFLICT (host_id) DO UPDATE SET"
            " partition_hour = excluded.partition_hour, fault = excluded.fault,"
            " restarted_at = NULL, disk_cleaned_at = NULL, updated_at = excluded.updated_at",
            fresh,
        )
        return fresh

    def _requested_hour(self, payload: Mapping[str, Any]) -> str | None:
        for field in ("partition_hour", "partition_key"):
            value = payload.get(field)
            if isinstance(value, str) and value.strip():
                try:
                    return self._partition_hour(value)
                except ValueError as error:
                    raise _Refused(400, f"{field}: {error}") from None
        return None

    def _healthy(self, host: Mapping[str, Any], now: dt.datetime) -> bool:
        fault = host["fault"]
        if fault == "none":
            return True
        if fault == "service_hung" and host["restarted_at"] is not None:
            return now >= dt.datetime.fromisoformat(host["restarted_at"]) + self.restart_delay
        if fault == "disk_full" and host["disk_cleaned_at"] is not None:
            return now >= dt.datetime.fromisoformat(host["disk_cleaned_at"]) + self.clean_disk_delay
        # A hardware fault, or a remedy that does not match the fault.
        return False

    def _update(self, host_id: str, now: dt.datetime, **values: str) -> None:
        assignments = ", ".join(f"{column} = :{column}" for column in values)
        self._require_db().execute(
            f"UPDATE hosts SET {assignments}, updated_at = :updated_at WHERE host_id = :host_id",
            {**values, "updated_at": _iso(now), "host_id": host_id},
        )

    def _act(
        self, endpoint: str, host_id: str | None, payload: Mapping[str, Any], now: dt.datetime
    ) -> dict[str, Any]:
        host = self._incident(host_id, payload, now)
        host_id = str(host["host_id"])
        if endpoint == "isolate":
            self._update(host_id, now, state="isolated")
            return {"host_id": host_id, "state": "isolated"}
        if endpoint == "diagnostics":
            cause = str(host["fault"])
            return {
                "host_id": host_id,
                "cause": cause,
                "partition_hour": host["partition_hour"],
                "detail": _DETAIL.get(cause, cause),
            }
        if endpoint == "restart":
            self._update(host_id, now, restarted_at=_iso(now))
            return {"host_id": host_id, "restarted": True, "restarted_at": _iso(now)}
        if endpoint == "clean_disk":
            self._update(host_id, now, disk_cleaned_at=_iso(now))
            return {"host_id": host_id, "cleaned": True, "cleaned_at": _iso(now)}
        healthy = self._healthy(host, now)
        if endpoint == "health":
            return {
                "host_id": host_id,
                "status": "healthy" if healthy else "degraded",
                "state": host["state"],
                "checked_at": _iso(now),
            }
        if endpoint == "reinstate":
            if not healthy:
                raise _Refused(
                    409,
                    "refusing to put a degraded host back in service",
                    host_id=host_id,
                    status="degraded",
                )
            self._update(host_id, now, state="in_service")
            return {"host_id": host_id, "state": "in_service"}
        raise _Refused(404, f"no endpoint /{endpoint}")


# -- the standalone process --------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m resources.infra_api",
        description="Run the host-remediation demo's infrastructure API on 127.0.0.1.",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--db", type=Path, default=Path("var/infra.sqlite"))
    parser.add_argument(
        "--secret-env",
        default=DEFAULT_SECRET_ENV,
        help="environment variable holding the webhook signing secret (never pass it as an "
        "argument: arguments are visible to every user of the machine)",
    )
    parser.add_argument("--restart-delay", type=float, default=DEFAULT_RESTART_DELAY_SECONDS)
    parser.add_argument("--clean-disk-delay", type=float, default=0.0)
    parser.add_argument("--failure-rate", type=float, default=DEFAULT_FAILURE_RATE)
    parser.add_argument("--lost-reply-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument(
        "--clock-file",
        type=Path,
        default=None,
        help="read the API's time from this file (ISO 8601), for a demo on an injected clock",
    )
    add_lifetime_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the infrastructure API until SIGTERM, SIGINT or the parent's exit.

    Prints one JSON line to stdout once it listens: ``port``, ``url``, ``urls`` (action name ->
    endpoint URL, see ``ACTION_ENDPOINTS``), ``db`` and ``pid``.

    Args:
        argv: Command-line arguments; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0 after a clean stop, 1 when the server stopped by itself, 2 when the
        configuration is unusable.
    """

    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    secret = os.environ.get(args.secret_env)
    if not secret:
        print(f"error: set the webhook secret in ${args.secret_env}", file=sys.stderr)
        return 2
    try:
        api = InfraApi(
            secret,
            args.db,
            port=args.port,
            clock=None if args.clock_file is None else FileClock(args.clock_file),
            restart_delay_seconds=args.restart_delay,
            clean_disk_delay_seconds=args.clean_disk_delay,
            failure_rate=args.failure_rate,
            lost_reply_rate=args.lost_reply_rate,
            seed=args.seed,
            latency_seconds=args.latency_ms / 1000,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return serve_in_foreground(
        [api],
        ready=lambda: {
            "port": api.port,
            "url": api.url,
            "urls": {action: api.url_for(action) for action in ACTION_ENDPOINTS},
            "db": str(args.db.resolve()),
            "pid": os.getpid(),
        },
        what="infrastructure API",
        exit_with_parent=args.exit_with_parent,
        owner_pid=args.owner_pid,
    )


if __name__ == "__main__":
    sys.exit(main())
