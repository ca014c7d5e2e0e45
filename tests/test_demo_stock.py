"""``python -m demo stock`` tells the stock-replenishment story end to end, and a second run sends
nothing.

The demo runs as ``make demo`` runs it, against a temporary DAGSTER_HOME and var folder, with its
own supplier API and approval endpoint processes. What it prints is compared with the ledger,
with the supplier API's own tables, with the inventory and with the mailbox, not with ranges tuned
to the output.
"""

import datetime as dt
import re
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from assets import generate_inventory
from autoexec_dagster import ActionLedger
from tests.e2e_support import run_demo

pytestmark = pytest.mark.slow

DAY = "2026-11-10"
PLAYBOOK = "stock_replenishment"
RUN_TIMEOUT = 600


def _run_demo(home: Path, var: Path) -> str:
    return run_demo(["stock", "--day", DAY], home=home, var=var, timeout=RUN_TIMEOUT)


def _number(pattern: str, text: str) -> int:
    match = re.search(pattern, text, flags=re.MULTILINE)
    assert match, f"{pattern!r} not in the demo's output:\n{text}"
    return int(match.group(1).replace(",", ""))


def _checks(text: str) -> dict[str, tuple[int, int]]:
    found = re.findall(r"^check: (.+?) \(([\d,]+)\) (==|!=) .+ \(([\d,]+)\)", text, re.MULTILINE)
    assert found, text
    return {name: (int(a.replace(",", "")), int(b.replace(",", ""))) for name, a, _, b in found}


def _rows(db: Path, sql: str) -> list[tuple]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


def test_stock_demo_orders_asks_decides_follows_up_and_agrees_with_its_records(
    tmp_path: Path,
) -> None:
    home, var = tmp_path / "dagster_home", tmp_path / "var"

    first = _run_demo(home, var)
    for step in (
        "supplier API:",
        "approval endpoint:",
        "training:",
        "scoring:",
        "executing:",
        "deciding:",
        "advancing:",
        "Backtest of the approval threshold",
    ):
        assert step in first, first
    assert "MISMATCH" not in first
    for name, (a, b) in _checks(first).items():
        assert a == b, (name, first)

    ledger = ActionLedger(f"sqlite:///{var / 'autoexec_ledger.db'}")
    try:
        totals = ledger.partition_outcome(playbook=PLAYBOOK, partition_key=DAY)
        instances = ledger.instances(playbook=PLAYBOOK, partition_key=DAY)
        approvals = ledger.approvals(playbook=PLAYBOOK, partition_key=DAY)
        queue = ledger.escalations(playbook=PLAYBOOK, partition_key=DAY, status=None)
    finally:
        ledger.dispose()
    states = instances.set_index("entity_id")["state"].astype(str)
    assert _number(r"short of stock\s+([\d,]+)", first) == totals.flagged == len(instances)
    assert set(states) <= {"succeeded", "failed", "rejected"}  # nothing left waiting

    # The supplier API's own record: the day's orders, as the supplier sees them.
    orders = _rows(
        var / "supplier_api.sqlite",
        "SELECT po_id, sku, status, quantity, total, submitted_at FROM purchase_orders "
        f"WHERE client_reference LIKE '{DAY}:%'",
    )
    by_status: dict[str, set[str]] = {}
    for po_id, _sku, status, *_ in orders:
        by_status.setdefault(str(status), set()).add(str(po_id))
    assert _number(r"purchase orders drafted\s+([\d,]+)", first) == len(orders)
    confirmed = by_status.get("confirmed", set())
    assert _number(r"confirmed, on order\s+([\d,]+)", first) == len(confirmed) > 0
    assert len(confirmed) == int((states == "succeeded").sum())
    assert _number(r"rejected by the supplier\s+([\d,]+)", first) == len(
        by_status.get("rejected", set())
    )
    submitted = {str(po) for po, *_, at in orders if at is not None}
    assert _number(r"submitted to suppliers\s+([\d,]+)", first) == len(submitted)

    # Who decided what: the rule below the threshold; procurement by the command line (an
    # approval and a rejection, with their notes) and by a link; nobody for the rest.
    decided = approvals[approvals["decided_by"] != "rule"]
    by_rule = approvals[(approvals["decided_by"] == "rule") & (approvals["status"] == "approved")]
    assert _number(r"approved automatically\s+([\d,]+)", first) == len(by_rule) > 0
    assert (by_rule["value"] <= 5000).all() and (decided["value"] > 5000).all()
    people = decided[decided["status"].isin(["approved", "rejected"])]
    assert sorted(zip(people["status"], people["decided_via"], strict=True)) == [
        ("approved", "cli"),
        ("approved", "link"),
        ("rejected", "cli"),
    ]
    assert set(people["decided_by"]) == {"procurement"}
    for row in people.to_dict("records"):
        assert f"{row['entity_id']}  EUR {float(row['value']):,.2f}" in first
    expired = approvals[approvals["status"] == "expired"]
    assert _number(r"expired, escalated\s+([\d,]+)", first) == len(expired)
    assert set(expired["entity_id"]) <= set(queue["entity_id"])
    assert "the approval SLA check warns" in first

    # The inventory put each confirmed order on order once, on top of the day's stock.
    applied = _rows(var / "suppliers.sqlite", "SELECT po_id, sku, quantity FROM inventory_orders")
    assert {str(p) for p, _, _ in applied} == confirmed
    snapshot = generate_inventory(dt.date.fromisoformat(DAY)).set_index("sku")["on_order"]
    inventory = dict(_rows(var / "suppliers.sqlite", "SELECT sku, on_order FROM inventory"))
    for _po, sku, quantity in applied:
        assert inventory[sku] == int(snapshot[sku]) + int(quantity)

    # The escalations a person works: each with the order's story in the summary.
    for kind in ("no supplier can deliver", "the supplier never answered", "rejected, declined"):
        assert kind in first, kind
    assert set(queue["entity_id"]) == set(states.index[states == "failed"])

    # The approvers' emails: one per request, in the mailbox, one shown as it was received.
    notified = set(approvals.loc[approvals["decided_by"] != "rule", "approval_id"])
    mails = sorted((var / "mailbox").glob("*.eml"))
    assert len(mails) == len(notified)
    texts = [m.read_text(errors="replace") for m in mails]
    assert all(any(a in t for t in texts) for a in notified)
    assert "Subject: Approve PO-" in first and "| Why now" in first
    api_calls = _rows(var / "supplier_api.sqlite", "SELECT count(*) FROM calls")[0][0]

    second = _run_demo(home, var)
    assert "training: demand_forecast_model already trained" in second
    assert (
        f"0 steps sent: all {totals.flagged:,} short SKUs were handled in an earlier run" in second
    )
    assert "no approval request is waiting for a person" in second
    assert "MISMATCH" not in second
    checks = _checks(second)
    assert checks["steps the supplier API executed in this run"] == (0, 0)
    assert checks["approver emails received in this run"] == (0, 0)
    assert _rows(var / "supplier_api.sqlite", "SELECT count(*) FROM calls")[0][0] == api_calls
    assert len(list((var / "mailbox").glob("*.eml"))) == len(mails)
