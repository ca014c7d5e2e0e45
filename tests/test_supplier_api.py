"""The stock-replenishment demo's supplier API, over real HTTP with signed requests."""

import asyncio
import datetime as dt
import json
import os
import selectors
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from autoexec_dagster.channels.base import ActionRequest
from autoexec_dagster.channels.webhook import WebhookChannel, sign
from autoexec_dagster.errors import TransientChannelError
from resources.supplier_api import ENDPOINTS, ORDER_FIELDS, SupplierApi
from resources.suppliers import SupplierCatalogue, generate_catalogue

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
REPO = Path(__file__).resolve().parents[1]
START = dt.datetime(2026, 11, 1, 8, 0, tzinfo=dt.UTC)
DAY = "2026-11-01"
DELAY = 1800.0
SILENT = "SUP-05"


class MovableClock:
    """A clock the test moves forward; the API reads it on every request."""

    def __init__(self, start: dt.datetime = START) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def catalogue() -> tuple[pd.DataFrame, pd.DataFrame]:
    return generate_catalogue()


def _offers(catalogue: tuple[pd.DataFrame, pd.DataFrame], supplier_id: str) -> pd.DataFrame:
    items = catalogue[1]
    # Offers with room for a few packs, so tests can order one or two.
    mine = items[
        (items["supplier_id"] == supplier_id) & (items["available_qty"] >= 4 * items["pack_size"])
    ]
    assert len(mine) >= 20, supplier_id
    return mine.reset_index(drop=True)


class Client:
    """Signs and sends requests the way the library's WebhookChannel does."""

    def __init__(self, api: SupplierApi, secret: str = SECRET) -> None:
        self.api = api
        self.secret = secret
        self._n = 0

    def new_key(self) -> str:
        self._n += 1
        return f"key-{self._n:05d}"

    def request(
        self,
        method: str,
        url: str,
        body: dict[str, Any] | bytes | None,
        *,
        key: str | None = None,
        secret: str | None = None,
        timestamp: int | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, dict[str, Any]]:
        key = key or self.new_key()
        raw = (
            b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        )
        ts = int(time.time()) if timestamp is None else timestamp
        headers = {
            "content-type": "application/json",
            "webhook-id": key,
            "Idempotency-Key": key,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(secret or self.secret, key, ts, raw),
        }
        request = urllib.request.Request(
            url, data=raw if method == "POST" else None, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def post(
        self, endpoint: str, body: dict[str, Any] | bytes, **options: Any
    ) -> tuple[int, dict[str, Any]]:
        return self.request("POST", self.api.url_for(endpoint), body, **options)

    def get(self, po_id: str, **options: Any) -> tuple[int, dict[str, Any]]:
        return self.request("GET", f"{self.api.url}/purchase-orders/{po_id}", None, **options)

    def draft(self, offer: Any, packs: int = 2, **fields: Any) -> dict[str, Any]:
        body = {
            "sku": offer["sku"],
            "supplier_id": offer["supplier_id"],
            "quantity": int(offer["pack_size"]) * packs,
            "partition_key": DAY,
            **fields,
        }
        status, order = self.post("create", body)
        assert status == 201, order
        return order


@pytest.fixture
def clock() -> MovableClock:
    return MovableClock()


@pytest.fixture
def api(
    tmp_path: Path, clock: MovableClock, catalogue: tuple[pd.DataFrame, pd.DataFrame]
) -> Iterator[SupplierApi]:
    # Every order confirmed: the rejections have a test of their own.
    with SupplierApi(
        SECRET,
        tmp_path / "supplier_api.sqlite",
        catalogue=catalogue,
        clock=clock,
        confirm_delay_seconds=DELAY,
        reject_rate=0.0,
    ) as server:
        yield server


@pytest.fixture
def client(api: SupplierApi) -> Client:
    return Client(api)


def test_a_draft_is_priced_from_the_catalogue(
    api: SupplierApi, client: Client, catalogue: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    offer = _offers(catalogue, "SUP-02").iloc[0]
    order = client.draft(offer, packs=3)
    assert tuple(order) == ORDER_FIELDS
    quantity = 3 * int(offer["pack_size"])
    assert order["po_id"] == "PO-000001" and order["status"] == "draft"
    assert (order["sku"], order["supplier_id"], order["quantity"]) == (
        offer["sku"],
        "SUP-02",
        quantity,
    )
    assert order["supplier_name"] == "Contoso Distribution" and order["currency"] == "EUR"
    assert order["unit_price"] == float(offer["unit_price"])
    assert order["total"] == round(float(offer["unit_price"]) * quantity, 2)
    assert order["lead_time_days"] == int(offer["lead_time_days"])
    assert order["client_reference"] == f"{DAY}:{offer['sku']}:SUP-02"
    assert order["created_at"] == START.isoformat(timespec="seconds")
    assert order["submitted_at"] is None and order["expected_delivery"] is None
    assert api.purchase_orders() == [order]
    assert [(c["endpoint"], c["outcome"], c["http_status"]) for c in api.calls()] == [
        ("create", "created", 201)
    ]


def test_a_resend_creates_no_second_order(
    api: SupplierApi, client: Client, catalogue: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    offer = _offers(catalogue, "SUP-01").iloc[0]
    body = {
        "sku": offer["sku"],
        "supplier_id": "SUP-01",
        "quantity": int(offer["pack_size"]),
        "partition_key": DAY,
    }
    first = client.post("create", body, key="step-draft-1")
    # The same delivery again (a retry after a lost reply): the recorded answer, byte for byte.
    assert client.post("create", body, key="step-draft-1") == first
    assert first[0] == 201
    # Another key with the same business reference (a re-run under a new key): the same order.
    again = client.post("create", body, key="step-draft-2")
    assert again == (200, first[1])
    assert len(api.purchase_orders()) == 1
    assert [c["outcome"] for c in api.calls()] == ["created", "replayed", "existing"]
    assert [c["attempt"] for c in api.calls()] == [1, 2, 1]

    # The reference names one order: another quantity under it is refused and changes nothing.
    status, refused = client.post("create", {**body, "quantity": 2 * int(offer["pack_size"])})
    assert status == 409 and refused["field"] == "client_reference"
    assert refused["po_id"] == first[1]["po_id"]
    # Another day is another order.
    status, other = client.post("create", {**body, "partition_key": "2026-11-02"})
    assert status == 201 and other["po_id"] == "PO-000002"
    # An explicit reference wins over the derived one.
    status, named = client.post("create", {**body, "client_reference": "po-request-77"})
    assert status == 201 and named["client_reference"] == "po-request-77"
    assert len(api.purchase_orders()) == 3


def test_a_submitted_order_is_confirmed_after_the_delay_on_the_clock(
    api: SupplierApi,
    client: Client,
    clock: MovableClock,
    catalogue: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    order = client.draft(_offers(catalogue, "SUP-02").iloc[0])
    po_id = order["po_id"]
    clock.advance(60)
    status, submitted = client.post("submit", {"po_id": po_id})
    assert status == 200 and submitted["status"] == "submitted"
    assert submitted["submitted_at"] == clock.now.isoformat(timespec="seconds")
    # Submitting again submits nothing twice: the order as it stands.
    assert client.post("submit", {"po_id": po_id}) == (200, submitted)

    clock.advance(DELAY - 1)
    status, polled = client.post("status", {"po_id": po_id}, key="poll-1")
    assert status == 200 and polled["status"] == "submitted" and polled["confirmed_at"] is None
    clock.advance(1)
    status, confirmed = client.post("status", {"po_id": po_id})
    assert status == 200 and confirmed["status"] == "confirmed"
    assert confirmed["confirmed_at"] == clock.now.isoformat(timespec="seconds")
    delivery = clock.now.date() + dt.timedelta(days=int(order["lead_time_days"]))
    assert confirmed["expected_delivery"] == delivery.isoformat()
    assert confirmed["reason"] is None
    # The same poll attempt redelivered gets the answer it got then, not today's.
    assert client.post("status", {"po_id": po_id}, key="poll-1") == (200, polled)
    assert client.get(po_id) == (200, confirmed)
    assert api.purchase_order(po_id) == confirmed


def test_a_create_can_submit_at_once(
    api: SupplierApi,
    client: Client,
    clock: MovableClock,
    catalogue: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    offer = _offers(catalogue, "SUP-04").iloc[3]
    order = client.draft(offer, submit=True)
    assert order["status"] == "submitted" and order["submitted_at"] == order["created_at"]
    clock.advance(DELAY)
    assert client.post("status", {"po_id": order["po_id"]})[1]["status"] == "confirmed"


def test_a_deterministic_share_of_orders_is_rejected(
    tmp_path: Path, catalogue: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    offers = _offers(catalogue, "SUP-03").head(40)  # rejects_some: declines 30% of its orders
    outcomes = []
    for run, order in enumerate((list(range(40)), list(range(39, -1, -1)))):
        clock = MovableClock()
        with SupplierApi(
            SECRET,
            tmp_path / f"api-{run}.sqlite",
            catalogue=catalogue,
            clock=clock,
            confirm_delay_seconds=DELAY,
        ) as api:
            client = Client(api)
            for i in order:  # the second run receives the same orders in reverse
                client.draft(offers.iloc[i], submit=True)
            clock.advance(DELAY)
            decided = {o["sku"]: o for o in api.purchase_orders()}
        outcomes.append(decided)
    first, second = outcomes
    rejected = {sku for sku, o in first.items() if o["status"] == "rejected"}
    assert {sku for sku, o in second.items() if o["status"] == "rejected"} == rejected
    assert 4 <= len(rejected) <= 22  # 30% of 40, give or take the draw
    assert {o["status"] for o in first.values()} == {"confirmed", "rejected"}
    for sku in rejected:
        assert first[sku]["reason"].startswith("declined by the supplier")
        assert first[sku]["rejected_at"] is not None and first[sku]["confirmed_at"] is None
        assert first[sku]["expected_delivery"] is None


def test_the_silent_supplier_holds_the_request_and_the_server_still_stops_cleanly(
    tmp_path: Path, catalogue: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    clock = MovableClock()
    api = SupplierApi(SECRET, tmp_path / "api.sqlite", catalogue=catalogue, clock=clock).start()
    try:
        client = Client(api)
        silent = client.draft(_offers(catalogue, SILENT).iloc[0])  # drafting is the gateway's
        assert silent["status"] == "draft" and silent["supplier_name"] == "Litware Trading"

        started = time.monotonic()
        with pytest.raises(TimeoutError):
            client.post("submit", {"po_id": silent["po_id"]}, key="submit-1", timeout=0.5)
        assert time.monotonic() - started < 5
        assert api.wait_for_held(1, timeout=5)
        # While it holds that request, the API answers everyone else.
        other = client.draft(_offers(catalogue, "SUP-01").iloc[0])
        assert other["status"] == "draft" and api.holding == 1
        # A retry with the same key is held again; nothing about the order changed.
        with pytest.raises(TimeoutError):
            client.post("submit", {"po_id": silent["po_id"]}, key="submit-1", timeout=0.3)
        assert api.wait_for_held(2, timeout=5)
        assert api.purchase_order(silent["po_id"])["status"] == "draft"  # pyright: ignore[reportOptionalSubscript]
        held = [c for c in api.calls() if c["outcome"] == "held"]
        assert [(c["idempotency_key"], c["attempt"], c["http_status"]) for c in held] == [
            ("submit-1", 1, None),
            ("submit-1", 2, None),
        ]
        assert all(c["po_id"] == silent["po_id"] and c["supplier_id"] == SILENT for c in held)
        assert not any(r["idempotency_key"] == "submit-1" for r in api.replies())
    finally:
        stopping = time.monotonic()
        api.stop()
    # The held handlers end with the server, well inside aiohttp's shutdown timeout.
    assert time.monotonic() - stopping < api.shutdown_timeout
    assert not api.running and api.holding == 0
    assert api.summary()["held"] == 2


def test_the_library_s_webhook_channel_times_out_on_the_silent_supplier(
    api: SupplierApi, client: Client, catalogue: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    # As the workflow sends it: the insight row, and the earlier steps' outputs under "steps".
    offer = _offers(catalogue, SILENT).iloc[1]
    choose = {"supplier_id": SILENT, "unit_price": float(offer["unit_price"])}
    data = {
        "sku": offer["sku"],
        "reorder_qty": 2 * int(offer["pack_size"]),
        "flagged": True,
        "steps": {"choose_supplier": choose},
    }

    def channel(endpoint: str, timeout: float) -> WebhookChannel:
        return WebhookChannel(
            url=api.url_for(endpoint),
            secret=SECRET,
            allowed_hosts=["127.0.0.1"],
            timeout_seconds=timeout,
        )

    def request(key: str, step_data: dict[str, Any]) -> ActionRequest:
        return ActionRequest(
            idempotency_key=key,
            entity_id=str(offer["sku"]),
            action="purchase_order",
            playbook="stock_replenishment",
            playbook_version="v1",
            insight="stock_shortages",
            partition_key=DAY,
            rule="short",
            data=step_data,
        )

    async def send() -> tuple[Any, Exception | None]:
        async with channel("create", 5.0).open_sender() as sender:
            drafted = await sender.send(request("k-draft", data))
        steps = {"choose_supplier": choose, "draft": drafted.output}
        async with channel("submit", 0.5).open_sender() as sender:
            try:
                await sender.send(request("k-submit", {**data, "steps": steps}))
            except TransientChannelError as error:
                return drafted, error
        return drafted, None

    drafted, error = asyncio.run(send())
    assert drafted.receipt == "HTTP 201" and drafted.output is not None
    assert drafted.output["supplier_id"] == SILENT
    assert drafted.output["quantity"] == data["reorder_qty"]
    assert drafted.output["client_reference"] == f"{DAY}:{offer['sku']}:{SILENT}"
    # Retried by the executor, then escalated: the playbook's path for a silent supplier.
    assert isinstance(error, TransientChannelError) and "timed out" in str(error)
    assert api.wait_for_held(1)
    assert [c["outcome"] for c in api.calls()] == ["created", "held"]


def test_fields_come_from_earlier_steps_when_the_top_level_lacks_them(
    api: SupplierApi, client: Client, catalogue: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    offer = _offers(catalogue, "SUP-01").iloc[2]
    pack = int(offer["pack_size"])
    body = {
        "entity_id": offer["sku"],
        "reorder_qty": 5 * pack,  # the insight's quantity, overridden by the step's "quantity"
        "partition_key": DAY,
        "steps": {
            "check": {"supplier_id": "SUP-02", "quantity": 99},
            "choose": {"supplier_id": "SUP-01", "quantity": 2 * pack},
        },
    }
    status, order = client.post("create", body)
    assert status == 201, order
    assert (order["sku"], order["supplier_id"], order["quantity"]) == (
        offer["sku"],
        "SUP-01",
        2 * pack,
    )
    steps = {**body["steps"], "draft": order}
    status, submitted = client.post("submit", {"entity_id": offer["sku"], "steps": steps})
    assert status == 200 and submitted["po_id"] == order["po_id"]
    assert submitted["status"] == "submitted"


def test_malformed_and_impossible_orders_are_refused_with_clear_errors(
    api: SupplierApi, client: Client, catalogue: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    offers = _offers(catalogue, "SUP-02")
    offer = offers[offers["pack_size"] > 1].iloc[0]
    pack, available = int(offer["pack_size"]), int(offer["available_qty"])
    good = {"sku": offer["sku"], "supplier_id": "SUP-02", "quantity": pack, "partition_key": DAY}
    other_sku = next(
        s
        for s in catalogue[1]["sku"]
        if not ((catalogue[1]["sku"] == s) & (catalogue[1]["supplier_id"] == "SUP-02")).any()
    )
    cases: list[tuple[dict[str, Any] | bytes, int, str, str | None]] = [
        (b"{not json", 400, "not valid JSON", None),
        (b"[1, 2]", 400, "must be a JSON object, got list", None),
        ({"supplier_id": "SUP-02", "quantity": pack}, 400, "names no sku or entity_id", "sku"),
        ({**good, "supplier_id": 7}, 400, "supplier_id must be a non-empty string", "supplier_id"),
        ({k: v for k, v in good.items() if k != "quantity"}, 400, "no quantity", "quantity"),
        ({**good, "quantity": "ten"}, 400, "quantity must be a whole number", "quantity"),
        ({**good, "quantity": 2.5}, 400, "quantity must be a whole number", "quantity"),
        ({**good, "quantity": True}, 400, "quantity must be a whole number", "quantity"),
        ({**good, "quantity": 0}, 400, "quantity must be > 0", "quantity"),
        ({**good, "submit": "yes"}, 400, "submit must be true or false", "submit"),
        ({**good, "client_reference": "x" * 201}, 400, "longer than 200", "client_reference"),
        ({**good, "supplier_id": "SUP-99"}, 404, "unknown supplier 'SUP-99'", "supplier_id"),
        ({**good, "sku": "SKU-9999"}, 404, "unknown SKU 'SKU-9999'", "sku"),
        ({**good, "sku": other_sku}, 404, f"SUP-02 does not offer {other_sku}", "supplier_id"),
        ({**good, "quantity": pack * 3 + 1}, 422, f"sold in packs of {pack}", "quantity"),
        (
            {**good, "quantity": (available // pack + 1) * pack},
            422,
            f"has {available} of",
            "quantity",
        ),
    ]
    for body, status, message, field in cases:
        got_status, reply = client.post("create", body)
        assert got_status == status, (body, reply)
        assert message in reply["error"], (body, reply)
        assert reply.get("field") == field, (body, reply)
    assert client.post("submit", {"po_id": "PO-404404"})[0] == 404
    assert client.post("status", {})[1] == {"error": "the body names no po_id", "field": "po_id"}
    assert client.get("PO-404404")[0] == 404
    # 2.0 is a whole number, as JSON numbers go.
    assert client.post("create", {**good, "quantity": float(pack)}, key="k-ok")[0] == 201
    # A key already answered on one endpoint is not reused on another.
    status, reply = client.post("submit", {"po_id": "PO-000001"}, key="k-ok")
    assert status == 422 and "already used on /purchase-orders" in reply["error"]

    assert [o["po_id"] for o in api.purchase_orders()] == ["PO-000001"]
    refused = [c for c in api.calls() if c["outcome"] == "refused"]
    assert len(refused) == len(cases) + 4
    assert all(400 <= c["http_status"] < 500 for c in refused)


def test_bad_signatures_are_refused_and_change_nothing(
    api: SupplierApi, client: Client, catalogue: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    offer = _offers(catalogue, "SUP-01").iloc[0]
    body = {"sku": offer["sku"], "supplier_id": "SUP-01", "quantity": int(offer["pack_size"])}
    stale = int(time.time()) - 3600
    for endpoint in ENDPOINTS:
        assert client.post(endpoint, body, secret="whsec_d3Jvbmcgc2VjcmV0")[0] == 401
        assert client.post(endpoint, body, timestamp=stale)[0] == 401
    raw = json.dumps(body).encode()
    unsigned = urllib.request.Request(api.url_for("create"), data=raw, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(unsigned, timeout=10)
    assert refused.value.code == 401
    assert json.loads(refused.value.read())["error"].startswith("missing, malformed, stale")
    assert client.get("PO-000001", secret="whsec_d3Jvbmcgc2VjcmV0")[0] == 401

    assert api.purchase_orders() == [] and api.replies() == []
    calls = api.calls()
    assert len(calls) == 2 * len(ENDPOINTS) + 2
    assert {c["outcome"] for c in calls} == {"rejected"} and {c["http_status"] for c in calls} == {
        401
    }
    assert all(c["attempt"] is None for c in calls)


def test_the_summary_agrees_with_the_record(
    api: SupplierApi,
    client: Client,
    clock: MovableClock,
    catalogue: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    for i in range(3):
        client.draft(_offers(catalogue, "SUP-04").iloc[i], submit=True)
    client.draft(_offers(catalogue, "SUP-01").iloc[0])
    clock.advance(DELAY)
    summary = api.summary()
    assert summary["purchase_orders"] == 4
    assert summary["by_status"]["draft"] == 1
    assert sum(summary["by_status"].values()) == 4
    assert summary["by_supplier"]["SUP-01"] == {"draft": 1}
    assert sum(summary["by_supplier"]["SUP-04"].values()) == 3
    orders = api.purchase_orders()
    assert summary["value_by_status"]["draft"] == orders[-1]["total"]
    assert summary["calls"] == {"created": 4} and summary["held"] == 0
    # Read-only: the record still says submitted until someone asks the API.
    with sqlite3.connect(api.db_path) as db:
        stored = dict(db.execute("SELECT po_id, status FROM purchase_orders").fetchall())
    assert sorted(stored.values()) == ["draft", "submitted", "submitted", "submitted"]


def test_configuration_errors_are_refused(
    tmp_path: Path, catalogue: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    path = tmp_path / "api.sqlite"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"confirm_delay_seconds": -1.0}, "confirm_delay_seconds"),
        ({"reject_rate": 1.5}, "reject_rate"),
        ({"silent_hold_seconds": 0.0}, "silent_hold_seconds"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            SupplierApi(SECRET, path, catalogue=catalogue, **options)
    with pytest.raises(ValueError, match="no suppliers or no offers"):
        SupplierApi(SECRET, path, catalogue=(catalogue[0], catalogue[1].iloc[:0]))
    with pytest.raises(ValueError):
        SupplierApi("whsec_!!!", path, catalogue=catalogue)
    assert not path.exists()


def test_a_silent_hold_ends_after_its_limit(
    tmp_path: Path, catalogue: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    with SupplierApi(
        SECRET, tmp_path / "api.sqlite", catalogue=catalogue, silent_hold_seconds=0.2
    ) as api:
        client = Client(api)
        order = client.draft(_offers(catalogue, SILENT).iloc[0])
        status, reply = client.post("submit", {"po_id": order["po_id"]}, timeout=10)
        assert status == 503 and reply == {"error": f"supplier {SILENT} did not answer"}
        assert api.holding == 0
        assert [c["outcome"] for c in api.calls()] == ["created", "held"]


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError("the supplier API printed nothing")
    return proc.stdout.readline()


def test_standalone_process_serves_and_stops_on_sigterm(
    tmp_path: Path, catalogue: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    # A catalogue file already there: the process opens it and never imports the assets.
    catalogue_path = tmp_path / "suppliers.sqlite"
    SupplierCatalogue(catalogue_path).create(
        catalogue=catalogue, inventory=pd.DataFrame({"sku": [], "on_hand": [], "on_order": []})
    )
    clock_file = tmp_path / "clock.txt"
    clock_file.write_text(START.isoformat())
    command = [
        sys.executable,
        "-m",
        "resources.supplier_api",
        "--port=0",
        f"--db={tmp_path / 'api.sqlite'}",
        f"--catalogue={catalogue_path}",
        f"--clock-file={clock_file}",
        "--confirm-delay=60",
    ]
    env = {**os.environ, "SUPPLIER_API_SECRET": SECRET}
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        ready = json.loads(_read_line(proc, timeout=60))
        assert ready["url"] == f"http://127.0.0.1:{ready['port']}"
        assert ready["urls"] == {name: ready["url"] + path for name, path in ENDPOINTS.items()}
        offer = _offers(catalogue, "SUP-02").iloc[0]
        body = json.dumps(
            {"sku": offer["sku"], "supplier_id": "SUP-02", "quantity": int(offer["pack_size"])}
        ).encode()
        ts = int(time.time())
        request = urllib.request.Request(
            ready["urls"]["create"],
            data=body,
            method="POST",
            headers={
                "content-type": "application/json",
                "webhook-id": "k-1",
                "webhook-timestamp": str(ts),
                "webhook-signature": sign(SECRET, "k-1", ts, body),
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 201
            assert json.loads(response.read())["created_at"] == START.isoformat()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    assert "Traceback" not in proc.stderr.read()
    with sqlite3.connect(tmp_path / "api.sqlite") as db:
        assert db.execute("SELECT endpoint, outcome, at FROM calls").fetchall() == [
            ("create", "created", START.isoformat())
        ]


def test_standalone_process_needs_the_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SUPPLIER_API_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "resources.supplier_api", "--port=0"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "SUPPLIER_API_SECRET" in result.stderr
    assert not (tmp_path / "var").exists()
