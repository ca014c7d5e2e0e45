"""The stock-replenishment demo's local supplier API: where purchase orders are drafted, submitted
and followed up.

It stands in for a purchasing gateway that reaches every supplier of the catalogue
(:mod:`resources.suppliers`), so the replenishment workflow executes real calls without leaving
the machine. Requests are the library's ``WebhookChannel`` posts (Standard Webhooks headers;
``webhook-id`` and ``Idempotency-Key`` carry the step attempt's idempotency key), checked with
:func:`~autoexec_dagster.channels.webhook.verify_signature`, as :mod:`resources.infra_api` does.

========================================  ===================================================
endpoint                                  what it does; reply
========================================  ===================================================
``POST /purchase-orders``                 drafts a purchase order (``"submit": true``: and
                                          submits it); 201 with the order, 200 when the
                                          ``client_reference`` already names this order
``POST /purchase-orders/submit``          submits a draft (``po_id``); 200 with the order
``POST /purchase-orders/status``          the order as it stands now (``po_id``); 200
``GET /purchase-orders/{po_id}``          the same, for people and scripts (signed too, over
                                          the empty body)
========================================  ===================================================

Every reply is one JSON object. An order is::

    {"po_id": "PO-000001", "status": "draft" | "submitted" | "confirmed" | "rejected",
     "sku": "SKU-0042", "supplier_id": "SUP-02", "supplier_name": "Contoso Distribution",
     "quantity": 240, "pack_size": 12, "unit_price": 13.07, "total": 3136.8, "currency": "EUR",
     "lead_time_days": 6, "client_reference": "2026-11-01:SKU-0042:SUP-02",
     "created_at": "...", "submitted_at": null, "confirmed_at": null, "rejected_at": null,
     "expected_delivery": null, "reason": null}

(times ISO 8601 on the API's clock; ``expected_delivery`` is the date of confirmation plus the
offer's lead time; ``reason`` says why a supplier declined). An error is ``{"error": "...",
...}`` naming the problem and, where one field is at fault, ``"field"``.

The request body. The workflow's webhook body carries the insight row's columns and the outputs
of earlier steps under ``steps`` (``{"choose_supplier": {"supplier_id": ...}, "draft": {"po_id":
...}}``). Each field is looked up at the top level first, then in ``steps`` from the latest step
back, so a later step's output can supply what the insight row lacks:

- ``sku`` (or ``entity_id``): the SKU; ``supplier_id``: the supplier; ``quantity`` (or
  ``reorder_qty``): units, a positive multiple of the offer's pack size and at most what the
  supplier has available; for ``POST /purchase-orders``.
- ``client_reference`` (optional, text): the order's business key. A second create with the same
  reference returns the same order (200) instead of a second one, and one for another SKU,
  supplier or quantity is refused (409). Without one it is ``<partition_key>:<sku>:<supplier>``
  when the body names a ``partition_key`` (every webhook body does), else the idempotency key.
- ``submit`` (optional, boolean, default false): submit at once.
- ``po_id``: the order, for ``/submit`` and ``/status``.

Refused: a body that is not a JSON object, or a field missing or of the wrong type: 400. An
unknown supplier, SKU, offer or order: 404. A reference reused for another order: 409. A
quantity that is not whole packs or exceeds what the supplier has, an idempotency key reused on
another endpoint: 422. A missing, wrong or stale signature: 401. Nothing is changed by a refused
request.

The suppliers' behaviour (the ``suppliers`` table of the catalogue):

- A submitted order is decided ``confirm_delay_seconds`` after its submission, on the API's
  clock: ``confirmed``, or ``rejected`` (with a reason) for a deterministic share
  (``reject_rate``; a hash of the seed, the supplier and the client reference, so the same
  orders are declined whatever the arrival order).
- A ``silent`` supplier accepts the connection and never answers whatever needs the supplier: a
  submission (``/submit``, or a create with ``"submit": true``) and the status of a submitted
  order. The request is held until the server stops (then answered 503) or, with
  ``silent_hold_seconds``, until that much real time has passed; the client's timeout ends it
  first. Drafting (pricing from the catalogue) is the gateway's and is answered: a draft stays a
  draft, and a create with ``"submit": true`` leaves no order at all. ``holding`` counts the
  requests held right now (their clients may have given up); ``wait_for_held`` lets a test wait
  for one without sleeping.

Delivery semantics, what the demo checks against the ledger and the inventory:

- A repeated idempotency key on a ``POST`` gets the recorded reply (same status and body) and
  does nothing again; a key reused on another endpoint is refused with 422.
- Every request is a row of ``calls`` (see ``_SCHEMA``): key, method, endpoint, order, supplier,
  attempt (the n-th arrival of that key), the API's clock, the HTTP status (NULL while held) and
  the outcome (``created``, ``existing``, ``submitted``, ``answered``, ``replayed``, ``held``,
  ``refused`` for 4xx, ``rejected`` for a bad signature). ``replies`` holds one row per key that
  was answered 2xx; ``purchase_orders`` holds each order as the supplier sees it.
  :meth:`SupplierApi.purchase_orders` and :meth:`SupplierApi.summary` read them with every
  order's status at the clock's time.

Time comes from an injectable ``clock`` (real UTC time by default), so tests move time instead of
sleeping; signature freshness is always checked against real time, since senders sign with it.

Run in-process (``start()``/``stop()`` or ``with``) or as its own process::

    SUPPLIER_API_SECRET=whsec_... python -m resources.supplier_api --port 9200 \\
        --db var/supplier_api.sqlite --catalogue var/suppliers.sqlite

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
import math
import os
import sqlite3
import sys
import threading
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from aiohttp import web

from resources.local_servers import (
    LOOPBACK,
    SqliteAiohttpServer,
    add_lifetime_arguments,
    serve_in_foreground,
)
from resources.suppliers import SupplierCatalogue

__all__ = [
    "ENDPOINTS",
    "ORDER_FIELDS",
    "SupplierApi",
    "main",
]

DEFAULT_SECRET_ENV = "SUPPLIER_API_SECRET"
DEFAULT_PORT = 9200
DEFAULT_TOLERANCE_SECONDS = 300.0
CURRENCY = "EUR"
MAX_REFERENCE_LENGTH = 200

# Endpoint name -> path; the playbook's channels post to these.
ENDPOINTS = {
    "create": "/purchase-orders",
    "submit": "/purchase-orders/submit",
    "status": "/purchase-orders/status",
}
ORDER_FIELDS = (
    "po_id",
    "status",
    "sku",
    "supplier_id",
    "supplier_name",
    "quantity",
    "pack_size",
    "unit_price",
    "total",
    "currency",
    "lead_time_days",
    "client_reference",
    "created_at",
    "submitted_at",
    "confirmed_at",
    "rejected_at",
    "expected_delivery",
    "reason",
)
# What a declining supplier says; one per order, by hash.
_DECLINE_REASONS = (
    "declined by the supplier: the stock is allocated to other orders",
    "declined by the supplier: the item is being discontinued",
    "declined by the supplier: the account's credit limit is reached",
)

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS purchase_orders (
    po_id TEXT PRIMARY KEY,
    client_reference TEXT NOT NULL UNIQUE,
    sku TEXT NOT NULL,
    supplier_id TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    pack_size INTEGER NOT NULL,
    unit_price REAL NOT NULL,
    total REAL NOT NULL,
    lead_time_days INTEGER NOT NULL,
    status TEXT NOT NULL,         -- draft | submitted | confirmed | rejected (as last observed)
    created_at TEXT NOT NULL,     -- the API's clock
    submitted_at TEXT,
    decision TEXT,                -- confirm | reject: drawn at submission, shown when due
    decide_at TEXT,               -- submitted_at + the supplier's confirm delay
    confirmed_at TEXT,
    rejected_at TEXT,
    reason TEXT,
    created_key TEXT NOT NULL     -- the idempotency key of the request that created it
);
CREATE TABLE IF NOT EXISTS calls (
    call_id INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT,         -- the webhook-id header (unverified when rejected)
    method TEXT NOT NULL,
    endpoint TEXT NOT NULL,       -- create | submit | status | get
    po_id TEXT,
    supplier_id TEXT,
    attempt INTEGER,              -- n-th arrival of this key with a valid signature
    at TEXT NOT NULL,             -- the API's clock
    received_at TEXT NOT NULL,    -- wall-clock time
    http_status INTEGER,          -- NULL: held, never answered
    outcome TEXT NOT NULL         -- created | existing | submitted | answered | replayed |
                                  -- held | refused | rejected
);
CREATE INDEX IF NOT EXISTS calls_by_key ON calls (idempotency_key);
CREATE TABLE IF NOT EXISTS replies (
    idempotency_key TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    po_id TEXT,
    http_status INTEGER NOT NULL,
    reply TEXT NOT NULL,
    at TEXT NOT NULL
);
"""


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class _Call:
    """What the ``calls`` table records of one request, besides its answer."""

    method: str
    endpoint: str
    key: str | None
    now: dt.datetime
    po_id: str | None = None
    supplier_id: str | None = None
    attempt: int | None = None


class _Refused(Exception):
    """A request the API answers with a 4xx and does nothing for."""

    def __init__(self, http_status: int, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.status = http_status
        self.body = {"error": message, **fields}


class _Hold(Exception):
    """The request needs a silent supplier: it is held, never answered."""

    def __init__(self, po_id: str | None, supplier_id: str) -> None:
        super().__init__(supplier_id)
        self.po_id = po_id
        self.supplier_id = supplier_id


def _lookup(payload: Mapping[str, Any], *names: str) -> tuple[str | None, Any]:
    """The first of ``names`` found at the top level, then in ``steps`` (latest step first).

    Returns:
        (the name found, its value), or (None, None).
    """
    sources: list[Mapping[str, Any]] = [payload]
    steps = payload.get("steps")
    if isinstance(steps, Mapping):
        sources += [out for out in reversed(list(steps.values())) if isinstance(out, Mapping)]
    for name in names:
        for source in sources:
            if name in source and source[name] is not None:
                return name, source[name]
    return None, None


def _text(payload: Mapping[str, Any], *names: str, required: bool = True) -> str | None:
    found, value = _lookup(payload, *names)
    if found is None:
        if required:
            raise _Refused(400, f"the body names no {' or '.join(names)}", field=names[0])
        return None
    if not isinstance(value, str) or not value.strip():
        raise _Refused(400, f"{found} must be a non-empty string, got {value!r}", field=found)
    return value.strip()


def _quantity(payload: Mapping[str, Any]) -> int:
    found, value = _lookup(payload, "quantity", "reorder_qty")
    if found is None:
        raise _Refused(400, "the body names no quantity or reorder_qty", field="quantity")
    # JSON has one number type: 240.0 is 240, but 240.5 and true are not quantities.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Refused(400, f"{found} must be a whole number, got {value!r}", field=found)
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise _Refused(400, f"{found} must be a whole number, got {value!r}", field=found)
    if value <= 0:
        raise _Refused(400, f"{found} must be > 0, got {value!r}", field=found)
    return int(value)


class SupplierApi(SqliteAiohttpServer):
    """An HTTP server on 127.0.0.1 that takes purchase orders on behalf of the suppliers.

    See the module docstring for the endpoints, the bodies, the suppliers' behaviour and the
    delivery semantics.

    Args:
        secret: The signing secret, ``whsec_<base64>`` or a plain string.
        db_path: SQLite database file of the API's record (tables ``purchase_orders``,
            ``calls``, ``replies``); created if missing, kept between runs.
        port: Port to listen on; 0 lets the OS choose.
        catalogue: The suppliers and offers: a :class:`~resources.suppliers.SupplierCatalogue`
            (read once, at construction), a (suppliers, offers) pair of frames, or None for
            :func:`~resources.suppliers.generate_catalogue`'s.
        clock: The API's time (an aware datetime); real UTC time when None.
        confirm_delay_seconds: Delay from submission to decision for every supplier; each
            supplier's ``confirm_delay_seconds`` when None.
        reject_rate: Share of submitted orders declined, for every supplier; each supplier's
            ``reject_rate`` when None.
        silent_suppliers: Suppliers that never answer; those whose ``api_behaviour`` is
            ``silent`` when None.
        silent_hold_seconds: Real seconds a request to a silent supplier is held at most before
            the API answers 503; None holds it until the server stops.
        seed: Seed of the decline draws.
        tolerance_seconds: Largest accepted distance of ``webhook-timestamp`` from real time.

    Raises:
        ValueError: A malformed secret, a rate or delay out of range, or an empty catalogue.
    """

    schema = _SCHEMA

    name = "supplier-api"

    def __init__(
        self,
        secret: str,
        db_path: str | os.PathLike[str],
        port: int = 0,
        *,
        catalogue: SupplierCatalogue | tuple[pd.DataFrame, pd.DataFrame] | None = None,
        clock: Callable[[], dt.datetime] | None = None,
        confirm_delay_seconds: float | None = None,
        reject_rate: float | None = None,
        silent_suppliers: Collection[str] | None = None,
        silent_hold_seconds: float | None = None,
        seed: int = 0,
        tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    ) -> None:
        # Imported here: the library pulls in Dagster, which `--help` should not wait for.
        from autoexec_dagster.channels.webhook import signing_key, verify_signature

        super().__init__(db_path, port)
        signing_key(secret)  # a malformed secret fails here (ValueError), not on each request
        if confirm_delay_seconds is not None and confirm_delay_seconds < 0:
            raise ValueError(f"confirm_delay_seconds must be >= 0, got {confirm_delay_seconds}")
        if reject_rate is not None and not 0.0 <= reject_rate <= 1.0:
            raise ValueError(f"reject_rate must be within [0, 1], got {reject_rate}")
        if silent_hold_seconds is not None and silent_hold_seconds <= 0:
            raise ValueError(f"silent_hold_seconds must be > 0, got {silent_hold_seconds}")
        if catalogue is None:
            from resources.suppliers import generate_catalogue

            catalogue = generate_catalogue()
        if isinstance(catalogue, SupplierCatalogue):
            suppliers, items = catalogue.suppliers(), catalogue.items()
        else:
            suppliers, items = catalogue
        if suppliers.empty or items.empty:
            raise ValueError("the catalogue has no suppliers or no offers")
        self._suppliers = {str(r["supplier_id"]): r for r in suppliers.to_dict("records")}
        self._offers = {(str(r["supplier_id"]), str(r["sku"])): r for r in items.to_dict("records")}
        self._skus = frozenset(str(s) for s in items["sku"])
        self._secret = secret
        self._verify = verify_signature
        self.clock = clock or _utc_now
        self.confirm_delay_seconds = confirm_delay_seconds
        self.reject_rate = reject_rate
        self.silent_suppliers = frozenset(
            silent_suppliers
            if silent_suppliers is not None
            else (s for s, r in self._suppliers.items() if r["api_behaviour"] == "silent")
        )
        self.silent_hold_seconds = silent_hold_seconds
        self.seed = seed
        self.tolerance_seconds = tolerance_seconds
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._counts: dict[str, int] = {}
        self._holding = 0

    def __repr__(self) -> str:
        # Never the secret.
        return f"SupplierApi(db_path={str(self.db_path)!r}, port={self._port})"

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:9200``."""
        return f"http://{LOOPBACK}:{self.port}"

    def url_for(self, endpoint: str) -> str:
        """The URL of one endpoint of ``ENDPOINTS`` (``create``, ``submit``, ``status``).

        Raises:
            KeyError: Not an endpoint name.
        """
        if endpoint not in ENDPOINTS:
            raise KeyError(f"no endpoint {endpoint!r}; endpoints are {', '.join(ENDPOINTS)}")
        return self.url + ENDPOINTS[endpoint]

    # -- what the API recorded ---------------------------------------------------------------

    @property
    def counts(self) -> dict[str, int]:
        """Requests so far, per outcome (``created``, ``replayed``, ``held``, ...)."""
        with self._lock:
            return dict(self._counts)

    @property
    def holding(self) -> int:
        """Requests to a silent supplier being held right now."""
        with self._lock:
            return self._holding

    def wait_for_held(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least ``count`` requests were held in all; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._counts.get("held", 0) >= count, timeout)

    def calls(self) -> list[dict[str, Any]]:
        """Every row of ``calls`` in arrival order, read through a connection of the caller's own."""
        return self._read("SELECT * FROM calls ORDER BY call_id")

    def replies(self) -> list[dict[str, Any]]:
        """Every recorded reply (one per idempotency key), the reply decoded."""
        rows = self._read("SELECT * FROM replies ORDER BY rowid")
        return [{**row, "reply": json.loads(row["reply"])} for row in rows]

    def purchase_orders(self, at: dt.datetime | None = None) -> list[dict[str, Any]]:
        """Every order as the supplier sees it at ``at`` (the clock's time when None).

        Read-only: a decision that has come due shows here even if nobody asked for it yet.

        Returns:
            Order objects (``ORDER_FIELDS``) in creation order.
        """
        now = at or self.clock()
        return [self._order(row, now) for row in self._read("SELECT * FROM purchase_orders")]

    def purchase_order(self, po_id: str, at: dt.datetime | None = None) -> dict[str, Any] | None:
        """One order at ``at`` (the clock's time when None), or None for an unknown id."""
        rows = self._read("SELECT * FROM purchase_orders WHERE po_id = ?", (po_id,))
        return self._order(rows[0], at or self.clock()) if rows else None

    def summary(self, at: dt.datetime | None = None) -> dict[str, Any]:
        """What the demo compares with the ledger and the inventory.

        Returns:
            ``purchase_orders`` (count), ``by_status`` and ``value_by_status`` (order totals),
            ``by_supplier`` (supplier -> status -> count), ``calls`` (outcome -> count, from the
            record) and ``held`` (requests to a silent supplier, never answered).
        """
        orders = self.purchase_orders(at)
        by_status: dict[str, int] = {}
        value: dict[str, float] = {}
        by_supplier: dict[str, dict[str, int]] = {}
        for order in orders:
            status = order["status"]
            by_status[status] = by_status.get(status, 0) + 1
            value[status] = round(value.get(status, 0.0) + float(order["total"]), 2)
            per = by_supplier.setdefault(order["supplier_id"], {})
            per[status] = per.get(status, 0) + 1
        outcomes = {
            str(row["outcome"]): int(row["n"])
            for row in self._read("SELECT outcome, count(*) AS n FROM calls GROUP BY outcome")
        }
        return {
            "purchase_orders": len(orders),
            "by_status": by_status,
            "value_by_status": value,
            "by_supplier": by_supplier,
            "calls": outcomes,
            "held": outcomes.get("held", 0),
        }

    def _read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        if not self.db_path.exists():
            return []
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=5.0)) as db:
            db.row_factory = sqlite3.Row
            return [dict(row) for row in db.execute(sql, parameters)]

    def _count(self, outcome: str) -> None:
        with self._changed:
            self._counts[outcome] = self._counts.get(outcome, 0) + 1
            self._changed.notify_all()

    # -- serving -----------------------------------------------------------------------------

    def _handler(self) -> web.Application:
        app = web.Application()
        for endpoint, path in ENDPOINTS.items():
            app.router.add_post(path, self._endpoint_handler(endpoint))
        app.router.add_get("/purchase-orders/{po_id}", self._endpoint_handler("get"))
        return app

    def _endpoint_handler(self, endpoint: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            return await self._handle(endpoint, request)

        return handle

    async def _handle(self, endpoint: str, request: web.Request) -> web.Response:
        body = await request.read()
        # One mapping for checking and for reading the key: with a repeated webhook-id header,
        # the key recorded must be the one the signature covers.
        headers = {k.lower(): v for k, v in request.headers.items()}
        key = headers.get("webhook-id")
        now = self.clock()
        if not self._verify(self._secret, headers, body, tolerance_seconds=self.tolerance_seconds):
            error = "missing, malformed, stale or wrong Standard Webhooks signature"
            call = _Call(request.method, endpoint, key, now)
            return self._answer(call, 401, "rejected", {"error": error})
        assert key is not None  # verify_signature refuses a request without one
        call = _Call(request.method, endpoint, key, now, attempt=self._arrival(key))
        if endpoint == "get":
            return await self._get(call, request.match_info["po_id"])
        try:
            payload = json.loads(body) if body else None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            message = f"the body is not valid JSON: {error}"
            return self._answer(call, 400, "refused", {"error": message})
        if not isinstance(payload, dict):
            message = f"the body must be a JSON object, got {type(payload).__name__}"
            return self._answer(call, 400, "refused", {"error": message})
        # From here to the answer nothing awaits (but a hold, which writes nothing), so each
        # request's read-decide-write runs alone on the event loop; the transaction makes the
        # change and its recorded reply one commit.
        db = self._require_db()
        recorded = db.execute(
            "SELECT endpoint, http_status, reply FROM replies WHERE idempotency_key = ?", (key,)
        ).fetchone()
        if recorded is not None:
            if recorded[0] != endpoint:
                error = f"idempotency key already used on {ENDPOINTS[recorded[0]]}"
                return self._answer(call, 422, "refused", {"error": error})
            reply = json.loads(recorded[2])
            call = dataclasses.replace(call, po_id=reply.get("po_id"))
            return self._answer(call, int(recorded[1]), "replayed", reply)
        db.execute("BEGIN IMMEDIATE")
        try:
            status, outcome, reply = self._act(endpoint, payload, key, now)
            db.execute(
                "INSERT INTO replies (idempotency_key, endpoint, po_id, http_status, reply, at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key, endpoint, reply["po_id"], status, json.dumps(reply), _iso(now)),
            )
            db.execute("COMMIT")
        except _Refused as refused:
            db.execute("ROLLBACK")
            return self._answer(call, refused.status, "refused", refused.body)
        except _Hold as hold:
            db.execute("ROLLBACK")
            return await self._hold(
                dataclasses.replace(call, po_id=hold.po_id, supplier_id=hold.supplier_id)
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        call = dataclasses.replace(call, po_id=reply["po_id"], supplier_id=reply["supplier_id"])
        return self._answer(call, status, outcome, reply)

    async def _get(self, call: _Call, po_id: str) -> web.Response:
        db = self._require_db()
        db.execute("BEGIN IMMEDIATE")
        try:
            order = self._status(po_id, call.now)
            db.execute("COMMIT")
        except _Refused as refused:
            db.execute("ROLLBACK")
            return self._answer(call, refused.status, "refused", refused.body)
        except _Hold as hold:
            db.execute("ROLLBACK")
            return await self._hold(
                dataclasses.replace(call, po_id=po_id, supplier_id=hold.supplier_id)
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        call = dataclasses.replace(call, po_id=po_id, supplier_id=order["supplier_id"])
        return self._answer(call, 200, "answered", order)

    async def _hold(self, call: _Call) -> web.Response:
        """Never answer: wait for the server to stop (or the hold's limit), then say so."""
        self._record(call, None, "held")
        with self._changed:
            self._holding += 1
        try:
            stopping = self._stopping
            assert stopping is not None  # set while serving
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.silent_hold_seconds)
        finally:
            with self._changed:
                self._holding -= 1
                self._changed.notify_all()
        # Only the server's own end (or the hold's limit) gets here; the client gave up long ago.
        error = f"supplier {call.supplier_id} did not answer"
        return web.json_response({"error": error}, status=503)

    def _require_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("supplier-api is not serving")
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

    def _record(self, call: _Call, status: int | None, outcome: str) -> None:
        self._require_db().execute(
            "INSERT INTO calls (idempotency_key, method, endpoint, po_id, supplier_id, attempt,"
            " at, received_at, http_status, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                call.key,
                call.method,
                call.endpoint,
                call.po_id,
                call.supplier_id,
                call.attempt,
                _iso(call.now),
                _utc_now().isoformat(timespec="milliseconds"),
                status,
                outcome,
            ),
        )
        self._count(outcome)

    def _answer(
        self, call: _Call, status: int, outcome: str, reply: Mapping[str, Any]
    ) -> web.Response:
        self._record(call, status, outcome)
        return web.json_response(dict(reply), status=status)

    # -- the orders --------------------------------------------------------------------------

    def _act(
        self, endpoint: str, payload: Mapping[str, Any], key: str, now: dt.datetime
    ) -> tuple[int, str, dict[str, Any]]:
        if endpoint == "create":
            return self._create(payload, key, now)
        po_id = _text(payload, "po_id")
        assert po_id is not None
        if endpoint == "submit":
            return 200, "submitted", self._submit(po_id, now)
        return 200, "answered", self._status(po_id, now)

    def _create(
        self, payload: Mapping[str, Any], key: str, now: dt.datetime
    ) -> tuple[int, str, dict[str, Any]]:
        sku = _text(payload, "sku", "entity_id")
        supplier_id = _text(payload, "supplier_id")
        assert sku is not None and supplier_id is not None
        quantity = _quantity(payload)
        submit = payload.get("submit", False)
        if not isinstance(submit, bool):
            raise _Refused(400, f"submit must be true or false, got {submit!r}", field="submit")
        reference = _text(payload, "client_reference", required=False)
        if reference is None:
            partition = payload.get("partition_key")
            partition = partition.strip() if isinstance(partition, str) else ""
            reference = f"{partition}:{sku}:{supplier_id}" if partition else key
        if len(reference) > MAX_REFERENCE_LENGTH:
            raise _Refused(
                400,
                f"client_reference is longer than {MAX_REFERENCE_LENGTH} characters",
                field="client_reference",
            )
        if supplier_id not in self._suppliers:
            raise _Refused(404, f"unknown supplier {supplier_id!r}", field="supplier_id")
        if sku not in self._skus:
            raise _Refused(404, f"unknown SKU {sku!r}", field="sku")
        offer = self._offers.get((supplier_id, sku))
        if offer is None:
            raise _Refused(404, f"supplier {supplier_id} does not offer {sku}", field="supplier_id")
        pack = int(offer["pack_size"])
        if quantity % pack:
            raise _Refused(
                422,
                f"{sku} is sold in packs of {pack}; {quantity} is not whole packs",
                field="quantity",
                pack_size=pack,
            )
        available = int(offer["available_qty"])
        if quantity > available:
            raise _Refused(
                422,
                f"supplier {supplier_id} has {available} of {sku} available, not {quantity}",
                field="quantity",
                available_qty=available,
            )
        db = self._require_db()
        existing = self._row("SELECT * FROM purchase_orders WHERE client_reference = ?", reference)
        if existing is not None:
            same = (existing["sku"], existing["supplier_id"], existing["quantity"]) == (
                sku,
                supplier_id,
                quantity,
            )
            if not same:
                raise _Refused(
                    409,
                    f"client_reference {reference!r} names {existing['po_id']} "
                    f"({existing['quantity']} x {existing['sku']} from {existing['supplier_id']})",
                    field="client_reference",
                    po_id=existing["po_id"],
                )
            order = (
                self._submit(existing["po_id"], now)
                if submit
                else self._status(existing["po_id"], now)
            )
            return 200, "existing", order
        count = int(db.execute("SELECT count(*) FROM purchase_orders").fetchone()[0])
        po_id = f"PO-{count + 1:06d}"
        unit_price = float(offer["unit_price"])
        if submit and supplier_id in self.silent_suppliers:
            # Drafting is the gateway's; the submission needs the supplier, who never answers.
            # Nothing is kept: a retry with the same key or reference is held again.
            raise _Hold(None, supplier_id)
        db.execute(
            "INSERT INTO purchase_orders (po_id, client_reference, sku, supplier_id, quantity,"
            " pack_size, unit_price, total, lead_time_days, status, created_at, created_key)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'draft', ?, ?)",
            (
                po_id,
                reference,
                sku,
                supplier_id,
                quantity,
                pack,
                unit_price,
                round(unit_price * quantity, 2),
                int(offer["lead_time_days"]),
                _iso(now),
                key,
            ),
        )
        order = self._submit(po_id, now) if submit else self._status(po_id, now)
        return 201, "created", order

    def _row(self, sql: str, *parameters: Any) -> dict[str, Any] | None:
        cursor = self._require_db().execute(sql, parameters)
        row = cursor.fetchone()
        if row is None:
            return None
        return dict(zip([c[0] for c in cursor.description], row, strict=True))

    def _order_row(self, po_id: str) -> dict[str, Any]:
        row = self._row("SELECT * FROM purchase_orders WHERE po_id = ?", po_id)
        if row is None:
            raise _Refused(404, f"unknown purchase order {po_id!r}", field="po_id")
        return row

    def _submit(self, po_id: str, now: dt.datetime) -> dict[str, Any]:
        row = self._order_row(po_id)
        supplier_id = str(row["supplier_id"])
        if row["status"] != "draft":
            # Submitted before: the order as it stands, nothing submitted twice.
            return self._status(po_id, now)
        if supplier_id in self.silent_suppliers:
            raise _Hold(po_id, supplier_id)
        supplier = self._suppliers[supplier_id]
        delay = (
            self.confirm_delay_seconds
            if self.confirm_delay_seconds is not None
            else float(supplier["confirm_delay_seconds"])
        )
        rate = self.reject_rate if self.reject_rate is not None else float(supplier["reject_rate"])
        draw = self._draw(supplier_id, str(row["client_reference"]))
        decision = "reject" if draw < rate else "confirm"
        reason = (
            _DECLINE_REASONS[int(draw * 1e6) % len(_DECLINE_REASONS)]
            if decision == "reject"
            else None
        )
        self._require_db().execute(
            "UPDATE purchase_orders SET status = 'submitted', submitted_at = ?, decision = ?,"
            " decide_at = ?, reason = ? WHERE po_id = ?",
            (_iso(now), decision, _iso(now + dt.timedelta(seconds=delay)), reason, po_id),
        )
        return self._status(po_id, now)

    def _draw(self, supplier_id: str, reference: str) -> float:
        """Whether the supplier declines an order: a hash, not a shared random stream."""
        text = f"{self.seed}\x00{supplier_id}\x00{reference}"
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64

    def _status(self, po_id: str, now: dt.datetime) -> dict[str, Any]:
        """The order at ``now``, recording a decision that has come due."""
        row = self._order_row(po_id)
        if row["status"] == "submitted" and str(row["supplier_id"]) in self.silent_suppliers:
            raise _Hold(po_id, str(row["supplier_id"]))
        order = self._order(row, now)
        if order["status"] != row["status"]:
            self._require_db().execute(
                "UPDATE purchase_orders SET status = ?, confirmed_at = ?, rejected_at = ?"
                " WHERE po_id = ?",
                (order["status"], order["confirmed_at"], order["rejected_at"], po_id),
            )
        return order

    def _order(self, row: Mapping[str, Any], now: dt.datetime) -> dict[str, Any]:
        """The reply object of an order's row, with a due decision applied (not stored)."""
        status = str(row["status"])
        confirmed_at, rejected_at = row["confirmed_at"], row["rejected_at"]
        if status == "submitted" and row["decide_at"] is not None:
            decide_at = dt.datetime.fromisoformat(str(row["decide_at"]))
            if now >= decide_at:
                status = "confirmed" if row["decision"] == "confirm" else "rejected"
                if status == "confirmed":
                    confirmed_at = row["decide_at"]
                else:
                    rejected_at = row["decide_at"]
        expected = None
        if confirmed_at is not None:
            arrival = dt.datetime.fromisoformat(str(confirmed_at)) + dt.timedelta(
                days=int(row["lead_time_days"])
            )
            expected = arrival.date().isoformat()
        supplier = self._suppliers.get(str(row["supplier_id"]), {})
        return {
            "po_id": row["po_id"],
            "status": status,
            "sku": row["sku"],
            "supplier_id": row["supplier_id"],
            "supplier_name": supplier.get("name"),
            "quantity": int(row["quantity"]),
            "pack_size": int(row["pack_size"]),
            "unit_price": float(row["unit_price"]),
            "total": float(row["total"]),
            "currency": CURRENCY,
            "lead_time_days": int(row["lead_time_days"]),
            "client_reference": row["client_reference"],
            "created_at": row["created_at"],
            "submitted_at": row["submitted_at"],
            "confirmed_at": confirmed_at,
            "rejected_at": rejected_at,
            "expected_delivery": expected,
            "reason": row["reason"] if status == "rejected" else None,
        }


# -- the standalone process --------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m resources.supplier_api",
        description="Run the stock-replenishment demo's supplier API on 127.0.0.1.",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--db", type=Path, default=Path("var/supplier_api.sqlite"))
    parser.add_argument(
        "--catalogue",
        type=Path,
        default=Path("var/suppliers.sqlite"),
        help="the supplier catalogue (resources.suppliers); created and seeded if missing",
    )
    parser.add_argument(
        "--secret-env",
        default=DEFAULT_SECRET_ENV,
        help="environment variable holding the webhook signing secret (never pass it as an "
        "argument: arguments are visible to every user of the machine)",
    )
    parser.add_argument(
        "--confirm-delay",
        type=float,
        default=None,
        help="seconds from submission to decision for every supplier (default: each supplier's)",
    )
    parser.add_argument(
        "--silent-hold",
        type=float,
        default=None,
        help="real seconds a request to a silent supplier is held before a 503 (default: until "
        "the server stops)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock-file",
        type=Path,
        default=None,
        help="read the API's time from this file (ISO 8601), for a demo on an injected clock",
    )
    add_lifetime_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the supplier API until SIGTERM, SIGINT or the parent's exit.

    Prints one JSON line to stdout once it listens: ``port``, ``url``, ``urls`` (endpoint name
    -> URL, see ``ENDPOINTS``), ``db``, ``catalogue`` and ``pid``.

    Args:
        argv: Command-line arguments; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0 after a clean stop, 1 when the server stopped by itself, 2 when the
        configuration is unusable.
    """
    # One copy of the API's file clock.
    from resources.infra_api import FileClock

    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    secret = os.environ.get(args.secret_env)
    if not secret:
        print(f"error: set the webhook secret in ${args.secret_env}", file=sys.stderr)
        return 2
    try:
        catalogue = SupplierCatalogue(args.catalogue)
        if not args.catalogue.exists():
            catalogue.create()
        api = SupplierApi(
            secret,
            args.db,
            port=args.port,
            catalogue=catalogue,
            clock=None if args.clock_file is None else FileClock(args.clock_file),
            confirm_delay_seconds=args.confirm_delay,
            silent_hold_seconds=args.silent_hold,
            seed=args.seed,
        )
    except (ValueError, sqlite3.Error) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return serve_in_foreground(
        [api],
        ready=lambda: {
            "port": api.port,
            "url": api.url,
            "urls": {name: api.url_for(name) for name in ENDPOINTS},
            "db": str(args.db.resolve()),
            "catalogue": str(args.catalogue.resolve()),
            "pid": os.getpid(),
        },
        what="supplier API",
        exit_with_parent=args.exit_with_parent,
        owner_pid=args.owner_pid,
    )


if __name__ == "__main__":
    sys.exit(main())
