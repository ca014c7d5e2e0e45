"""``autoexec approvals``, ``approve``, ``reject`` and ``serve`` against a real SQLite ledger."""

import asyncio
import csv
import io
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner, Result

from autoexec_dagster.approvals.links import ApprovalLinks
from autoexec_dagster.cli import cli
from autoexec_dagster.ledger.action_ledger import ActionLedger
from tests.test_ledger_approvals import (
    PLAYBOOK,
    approval_row,
    decisions_of,
    instance_row,
    request,
    status_of,
)

NOW = datetime.now(UTC)
SECRET = "cli-serve-secret-0123456789abcdef"


def run(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Result:
    # Without DAGSTER_HOME unless a test gives one: make test exports the project's instance.
    return CliRunner().invoke(
        cli,
        list(args),
        env={"DAGSTER_HOME": "", **(env or {})},
        input=input,
        catch_exceptions=False,
    )


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def ledger(url: str) -> ActionLedger:
    return ActionLedger(url)


@pytest.fixture
def queue(ledger: ActionLedger) -> dict[str, dict[str, Any]]:
    """Four purchase orders waiting: three for ana or bob, one (four eyes) for both."""
    rows = {
        "small": approval_row(
            "sku-1002",
            payload={"supplier": "globex", "quantity": 40, "total": 460.0},
            requested_at=NOW - timedelta(hours=9),
        ),
        "mid": approval_row(
            "sku-1001",
            payload={"supplier": "acme", "quantity": 120, "total": 1840.0},
            requested_at=NOW - timedelta(hours=3),
        ),
        "big": approval_row(
            "sku-1003",
            payload={"supplier": "acme", "quantity": 900, "total": 12750.0},
            min_approvals=2,
            requested_at=NOW - timedelta(minutes=20),
        ),
        "tiny": approval_row(
            "sku-1004",
            payload={"supplier": "initech", "quantity": 15, "total": 95.5, "email": "jo@ex.com"},
            requested_at=NOW - timedelta(days=1),
        ),
    }
    ledger.start_instances([instance_row(r) for r in rows.values()])
    request(ledger, *rows.values())
    return rows


def test_approvals_lists_the_pending_queue_oldest_first(
    url: str, queue: dict[str, dict[str, Any]]
) -> None:
    result = run("approvals", "--ledger", url, "--playbook", PLAYBOOK)

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = lines[0].split()
    assert header[:10] == [
        "key",
        "partition",
        "entity",
        "value",
        "status",
        "approvals",
        "approvers",
        "age",
        "expires",
        "sla",
    ]
    entities = [line.split()[2] for line in lines[1:5]]
    assert entities == ["sku-1004", "sku-1002", "sku-1001", "sku-1003"]
    tiny, small, mid, big = lines[1:5]
    assert queue["tiny"]["approval_id"][:12] in tiny and "95.50" in tiny and "1d 0h" in tiny
    # Ages are measured at the command's own "now", a little after the requests were made (on a
    # loaded machine, minutes): allow for that drift, not more.
    assert re.search(r"BREACHED 16h 0\dm ago", tiny)
    assert "e***@" not in tiny and "j***@ex.com" in tiny
    assert "1,840.00" in mid and re.search(r"\b3h 0\dm\b", mid)
    assert re.search(r"due in 4h 5\dm", mid)
    assert "12,750.00" in big and "0/2" in big and "ana, bob" in big
    assert re.search(r"BREACHED 1h 0\dm ago", small)
    assert "4 of 4 request(s) shown for playbook 'stock_replenishment'" in result.output
    assert "total value 15,145.50" in result.output

    # A limit shows the oldest; the totals still cover the whole queue.
    limited = run("approvals", "--ledger", url, "--playbook", PLAYBOOK, "--limit", "2")
    assert [line.split()[2] for line in limited.output.splitlines()[1:3]] == [
        "sku-1004",
        "sku-1002",
    ]
    assert (
        "2 of 4 request(s) shown for playbook 'stock_replenishment' (--limit 2); total value "
        in (limited.output)
    )
    assert "15,145.50" in limited.output


def test_approvals_sorts_by_value_age_or_a_payload_field(
    url: str, queue: dict[str, dict[str, Any]]
) -> None:
    def entities(*args: str) -> list[str]:
        result = run("approvals", "--ledger", url, "--json", *args)
        assert result.exit_code == 0, result.output
        return [r["entity_id"] for r in json.loads(result.output)]

    assert entities("--sort", "-value") == ["sku-1003", "sku-1001", "sku-1002", "sku-1004"]
    assert entities("--sort", "value") == ["sku-1004", "sku-1002", "sku-1001", "sku-1003"]
    assert entities("--sort", "age") == ["sku-1003", "sku-1001", "sku-1002", "sku-1004"]
    assert entities("--sort", "-quantity") == ["sku-1003", "sku-1001", "sku-1002", "sku-1004"]
    assert entities("--sort", "supplier", "--limit", "2") == ["sku-1001", "sku-1003"]
    assert entities("--sort", "expires_at")[0] == "sku-1004"

    unknown = run("approvals", "--ledger", url, "--sort", "colour")
    assert unknown.exit_code == 2
    assert "--sort 'colour' is neither a request column nor a payload field" in unknown.output
    assert "supplier" in unknown.output


def test_approvals_json_has_every_field_with_personal_ones_masked(
    url: str, queue: dict[str, dict[str, Any]]
) -> None:
    result = run("approvals", "--ledger", url, "--json", "--sort", "value", "--limit", "1")

    (record,) = json.loads(result.output)
    tiny = queue["tiny"]
    assert record["key"] == tiny["approval_id"] and record["digest"] == tiny["digest"]
    assert record["status"] == "pending" and record["value"] == 95.5
    assert record["approvers"] == ["ana", "bob"] and record["approved_by"] == []
    assert record["payload"] == {
        "supplier": "initech",
        "quantity": 15,
        "total": 95.5,
        "email": "j***@ex.com",
    }
    assert record["age_hours"] == pytest.approx(24.0, abs=0.15)
    assert record["sla"].startswith("BREACHED") and record["decided_by"] is None
    shown = run("approvals", "--ledger", url, "--json", "--sort", "value", "--show-personal")
    assert json.loads(shown.output)[0]["payload"]["email"] == "jo@ex.com"


def test_approvals_csv_is_one_row_per_request(url: str, queue: dict[str, dict[str, Any]]) -> None:
    result = run("approvals", "--ledger", url, "--csv", "--sort", "-value")

    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert [r["entity_id"] for r in rows] == ["sku-1003", "sku-1001", "sku-1002", "sku-1004"]
    assert rows[0]["approvers"] == "ana;bob" and rows[0]["min_approvals"] == "2"
    assert json.loads(rows[0]["payload"]) == {"quantity": 900, "supplier": "acme", "total": 12750.0}
    assert datetime.fromisoformat(rows[0]["requested_at"]) == queue["big"]["requested_at"]
    both = run("approvals", "--ledger", url, "--csv", "--json")
    assert both.exit_code == 2 and "--json or --csv, not both" in both.output
    empty = run("approvals", "--ledger", url, "--csv", "--playbook", "other")
    # No request: the header alone, the same columns.
    assert empty.exit_code == 0 and empty.output.splitlines() == [result.output.splitlines()[0]]


def test_approve_by_a_unique_prefix_records_a_cli_decision(
    url: str, ledger: ActionLedger, queue: dict[str, dict[str, Any]]
) -> None:
    mid = queue["mid"]

    result = run("approve", mid["approval_id"][:8], "--ledger", url, "--by", "ana", "--note", "ok")

    assert result.exit_code == 0, result.output
    assert f"Approved {mid['approval_id'][:12]} (entity sku-1001, value 1,840.00) as ana" in (
        result.output
    )
    assert "DAGSTER_HOME is not set, so the Dagster UI was not told" in result.output
    stored = ledger.approval_rows([mid["approval_id"]])[mid["approval_id"]]
    assert (stored["status"], stored["decided_by"], stored["decided_via"]) == (
        "approved",
        "ana",
        "cli",
    )
    assert stored["decision_note"] == "ok"
    run("reject", queue["tiny"]["approval_id"], "--ledger", url, "--by", "bob", "--note", "no")
    latest = run("approvals", "--ledger", url, "--status", "decided", "--json")
    # Decided requests list the latest decision first.
    assert [r["entity_id"] for r in json.loads(latest.output)] == ["sku-1004", "sku-1001"]
    decided = run("approvals", "--ledger", url, "--status", "decided")
    assert "sku-1001" in decided.output and "ana" in decided.output and " cli " in decided.output
    assert " ok " in decided.output + " " and "sku-1002" not in decided.output
    assert "rejected" in decided.output and " no " in decided.output + " "


def test_four_eyes_from_the_command_line(
    url: str, ledger: ActionLedger, queue: dict[str, dict[str, Any]]
) -> None:
    big = queue["big"]["approval_id"]

    first = run("approve", big, "--ledger", url, "--by", "ana")
    assert "1 of 2 approvals; it waits for another approver" in first.output
    assert "1/2" in run("approvals", "--ledger", url).output
    again = run("approve", big, "--ledger", url, "--by", "ana")
    assert again.exit_code == 2 and "ana already decided (approve)" in again.output

    second = run("approve", big, "--ledger", url, "--by", "bob")
    assert second.exit_code == 0 and "approved; the workflow goes on" in second.output
    assert status_of(ledger, big) == "approved"


@pytest.mark.parametrize(
    ("keys", "by", "message"),
    [
        (["ffffffffffff"], "ana", "ffffffffffff: no approval request has a key starting with it"),
        (["abc"], "ana", "abc: give at least 6 characters of the approval key"),
        (["<mid>"], "mallory", "'mallory' is not an approver of this request"),
        (["<mid>", "<small>", "fffffff"], "ana", "fffffff: no approval request"),
        (["<mid>"], " ", "--by is empty"),
    ],
)
def test_approve_refuses_bad_input_and_decides_nothing(
    url: str,
    ledger: ActionLedger,
    queue: dict[str, dict[str, Any]],
    keys: list[str],
    by: str,
    message: str,
) -> None:
    given = [queue[k[1:-1]]["approval_id"] if k.startswith("<") else k for k in keys]

    result = run("approve", *given, "--ledger", url, "--by", by)

    assert result.exit_code == 2
    assert message in result.output
    assert all(status_of(ledger, r["approval_id"]) == "pending" for r in queue.values())
    assert decisions_of(ledger, *(r["approval_id"] for r in queue.values())) == []


def test_approve_refuses_a_request_no_longer_pending(
    url: str, ledger: ActionLedger, queue: dict[str, dict[str, Any]]
) -> None:
    mid, small = queue["mid"]["approval_id"], queue["small"]["approval_id"]
    ledger.reject([mid], by="bob", note="too expensive")

    result = run("approve", small, mid[:10], "--ledger", url, "--by", "ana")

    assert result.exit_code == 2
    assert f"{mid}: not pending (it is rejected by bob)" in result.output
    assert status_of(ledger, small) == "pending"


def test_an_ambiguous_prefix_is_refused(url: str, ledger: ActionLedger) -> None:
    one, two = approval_row("sku-1"), approval_row("sku-2")
    one["approval_id"], two["approval_id"] = "abcdef01" + "0" * 24, "abcdef02" + "0" * 24
    request(ledger, one, two)

    result = run("approve", "abcdef", "--ledger", url, "--by", "ana")

    assert result.exit_code == 2
    assert "abcdef: 2 approval requests have keys starting with it" in result.output
    assert run("approve", "abcdef02", "--ledger", url, "--by", "ana").exit_code == 0
    assert status_of(ledger, one["approval_id"]) == "pending"


def test_reject_needs_a_note(
    url: str, ledger: ActionLedger, queue: dict[str, dict[str, Any]]
) -> None:
    small = queue["small"]["approval_id"]

    missing = run("reject", small, "--ledger", url, "--by", "bob")
    blank = run("reject", small, "--ledger", url, "--by", "bob", "--note", "  ")
    assert missing.exit_code == blank.exit_code == 2
    assert "Missing option '--note'" in missing.output
    assert "a rejection needs a note" in blank.output
    assert status_of(ledger, small) == "pending"

    done = run("reject", small, "--ledger", url, "--by", "bob", "--note", "wrong supplier")
    assert done.exit_code == 0 and "rejected; the workflow stops at this step" in done.output
    stored = ledger.approval_rows([small])[small]
    assert (stored["status"], stored["decision_note"], stored["decided_via"]) == (
        "rejected",
        "wrong supplier",
        "cli",
    )


def test_bulk_approval_by_filter_asks_first(
    url: str, ledger: ActionLedger, queue: dict[str, dict[str, Any]]
) -> None:
    where = "total < 2000 and supplier != 'initech'"
    args = ("approve", "--ledger", url, "-p", PLAYBOOK, "-k", "2026-12-03", "--where", where)

    declined = run(*args, "--by", "ana", input="n\n")
    assert declined.exit_code == 1
    assert "2 pending approval request(s)" in declined.output
    assert "total value 2,300.00" in declined.output
    assert "Approve these 2 request(s) (total value 2,300.00) as ana? [y/N]" in declined.output
    assert "Nothing decided." in declined.output
    assert all(status_of(ledger, r["approval_id"]) == "pending" for r in queue.values())

    accepted = run(*args, "--by", "ana", "--note", "routine", input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert status_of(ledger, queue["small"]["approval_id"]) == "approved"
    assert status_of(ledger, queue["mid"]["approval_id"]) == "approved"
    assert status_of(ledger, queue["tiny"]["approval_id"]) == "pending"
    assert status_of(ledger, queue["big"]["approval_id"]) == "pending"
    decisions = ledger.approval_decisions([queue["small"]["approval_id"]])
    assert decisions["via"].tolist() == ["cli"] and decisions["note"].tolist() == ["routine"]


def test_bulk_approval_with_yes_does_not_ask(
    url: str, ledger: ActionLedger, queue: dict[str, dict[str, Any]]
) -> None:
    result = run(
        "approve", "--ledger", url, "-p", PLAYBOOK, "--where", "value < 500", "--by", "bob", "--yes"
    )

    assert result.exit_code == 0, result.output
    assert "[y/N]" not in result.output
    assert {
        r["entity_id"] for r in queue.values() if status_of(ledger, r["approval_id"]) == "approved"
    } == {
        "sku-1002",
        "sku-1004",
    }


def test_bulk_filters_over_entity_and_age(
    url: str, ledger: ActionLedger, queue: dict[str, dict[str, Any]]
) -> None:
    result = run(
        "reject",
        "--ledger",
        url,
        "-p",
        PLAYBOOK,
        "--where",
        "entity in ['sku-1001', 'sku-1004'] and age_hours > 12",
        "--by",
        "ana",
        "--note",
        "stale",
        "--yes",
    )

    assert result.exit_code == 0, result.output
    assert status_of(ledger, queue["tiny"]["approval_id"]) == "rejected"
    assert status_of(ledger, queue["mid"]["approval_id"]) == "pending"


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (
            "total <",
            "the --where filter is refused, nothing was decided: the expression 'total <' does not parse",
        ),
        ("__import__('os').system('true')", "uses Call, which rules do not allow"),
        ("totl < 100", "the --where filter reads totl, which no pending request"),
        ("supplier > 3", "could not be evaluated"),
    ],
)
def test_a_bulk_filter_that_does_not_parse_or_read_is_refused(
    url: str, ledger: ActionLedger, queue: dict[str, dict[str, Any]], where: str, message: str
) -> None:
    result = run(
        "approve", "--ledger", url, "-p", PLAYBOOK, "--where", where, "--by", "ana", "--yes"
    )

    assert result.exit_code == 2
    assert message in result.output
    assert decisions_of(ledger, *(r["approval_id"] for r in queue.values())) == []


def test_bulk_refuses_when_the_decider_cannot_decide_every_match(
    url: str, ledger: ActionLedger, queue: dict[str, dict[str, Any]]
) -> None:
    theirs = approval_row(
        "sku-2001", payload={"supplier": "acme", "total": 10.0}, approvers=("carol",)
    )
    request(ledger, theirs)
    ledger.approve([queue["big"]["approval_id"]], by="ana")

    result = run(
        "approve",
        "--ledger",
        url,
        "-p",
        PLAYBOOK,
        "--where",
        "supplier == 'acme'",
        "--by",
        "ana",
        input="y\n",
    )

    assert result.exit_code == 2
    assert "1 of them do not list 'ana' as an approver" in result.output
    assert "1 of them ana has already decided" in result.output
    assert "[y/N]" not in result.output
    assert status_of(ledger, queue["mid"]["approval_id"]) == "pending"


def test_bulk_leaves_out_expired_requests(url: str, ledger: ActionLedger) -> None:
    old = approval_row("sku-1", requested_at=NOW - timedelta(days=3), expires_in=timedelta(days=2))
    fresh = approval_row("sku-2", requested_at=NOW)
    request(ledger, old, fresh)

    result = run(
        "approve", "--ledger", url, "-p", PLAYBOOK, "--where", "value > 0", "--by", "ana", "--yes"
    )

    assert result.exit_code == 0, result.output
    assert "1 matching request(s) left out: expired" in result.output
    assert status_of(ledger, fresh["approval_id"]) == "approved"
    assert status_of(ledger, old["approval_id"]) == "pending"


def test_keys_and_a_filter_are_not_both_given(url: str, queue: dict[str, dict[str, Any]]) -> None:
    key = queue["mid"]["approval_id"]
    both = run(
        "approve", key, "--ledger", url, "-p", PLAYBOOK, "--where", "value > 0", "--by", "ana"
    )
    neither = run("approve", "--ledger", url, "--by", "ana")
    no_playbook = run("approve", "--ledger", url, "--where", "value > 0", "--by", "ana")

    assert both.exit_code == neither.exit_code == no_playbook.exit_code == 2
    assert "give approval KEYs or --where, not both" in both.output
    assert "name the requests to approve" in neither.output
    assert "a bulk decision (--where) needs --playbook" in no_playbook.output


def test_a_cli_decision_is_observed_on_the_dagster_instance(
    tmp_path: Path, url: str, queue: dict[str, dict[str, Any]]
) -> None:
    import dagster as dg

    home = tmp_path / "dagster_home"
    home.mkdir()

    result = run(
        "approve",
        queue["mid"]["approval_id"],
        "--ledger",
        url,
        "--by",
        "ana",
        env={"DAGSTER_HOME": str(home)},
    )

    assert result.exit_code == 0, result.output
    assert "Dagster UI: stock_replenishment/approvals [2026-12-03] now shows 3 pending" in (
        result.output
    )
    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.fetch_observations(dg.AssetKey([PLAYBOOK, "approvals"]), limit=5).records
    (record,) = records
    observation = record.asset_observation
    assert observation is not None and observation.partition == "2026-12-03"
    metadata = {k: v.value for k, v in observation.metadata.items()}
    assert metadata["pending"] == 3
    assert metadata["pending_value"] == 460.0 + 12750.0 + 95.5
    assert metadata["oldest_pending_hours"] == pytest.approx(24.0, abs=0.15)
    # Two of the three pending requests are past their SLA.
    assert metadata["sla_overdue"] == 2
    assert (metadata["approved_by_people"], metadata["rejected"], metadata["void"]) == (1, 0, 0)
    assert (metadata["changed_by"], metadata["source"]) == ("ana", "autoexec approve")


def test_serve_refuses_to_start_without_the_secret(url: str, ledger: ActionLedger) -> None:
    result = run("serve", "--ledger", url, "--port", "0", env={"AUTOEXEC_APPROVAL_SECRET": ""})
    assert result.exit_code == 2
    assert "needs the link signing secret: set AUTOEXEC_APPROVAL_SECRET" in result.output
    short = run("serve", "--ledger", url, env={"AUTOEXEC_APPROVAL_SECRET": "short"})
    assert short.exit_code == 2 and "at least 16 characters" in short.output


def _lines_until(process: subprocess.Popen[str], marker: str, timeout: float) -> list[str]:
    """Read the process's output until a line holds ``marker`` (bounded by ``timeout``)."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=deadline - time.monotonic()):
                break
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if marker in line:
                return lines
    raise AssertionError(f"no {marker!r} from the process; it printed: {''.join(lines)}")


@pytest.fixture
def served(
    url: str, ledger: ActionLedger, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    env = {
        **os.environ,
        "AUTOEXEC_APPROVAL_SECRET": SECRET,
        "AUTOEXEC_APPROVAL_URL": "",
        "DAGSTER_HOME": "",
        "PYTHONUNBUFFERED": "1",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from autoexec_dagster.cli import main; main()",
            "serve",
            "--ledger",
            url,
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        started = _lines_until(process, "approval links on http://127.0.0.1:", timeout=120)
        port = int(started[-1].split("http://127.0.0.1:")[1].split("/")[0])
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_serve_decides_by_link_and_stops_cleanly_on_sigterm(
    served: tuple[subprocess.Popen[str], int],
    ledger: ActionLedger,
    queue: dict[str, dict[str, Any]],
) -> None:
    process, port = served
    row = queue["mid"]
    links = ApprovalLinks(base_url=f"http://127.0.0.1:{port}", secret=SECRET)
    link = links.link(
        approval_id=row["approval_id"],
        digest=row["digest"],
        decision="approve",
        approver="bob",
        expires_at=row["expires_at"],
    )
    path, token = link.split("?token=")

    async def exchange() -> tuple[int, int, int]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as health:
                healthy = health.status
            async with session.get(link) as page:
                shown = page.status
            async with session.post(path, data={"token": token}) as decided:
                return healthy, shown, decided.status

    assert asyncio.run(exchange()) == (200, 200, 200)
    stored = ledger.approval_rows([row["approval_id"]])[row["approval_id"]]
    assert (stored["status"], stored["decided_by"], stored["decided_via"]) == (
        "approved",
        "bob",
        "link",
    )

    process.send_signal(signal.SIGTERM)
    rest = process.communicate(timeout=30)[0]
    assert process.returncode == 0, rest
    assert "autoexec serve: stopped" in rest
    # The access log names each request by its path, never with the token.
    assert f"POST {path.removeprefix(f'http://127.0.0.1:{port}')} 200" in rest
    assert f"approval {row['approval_id']}: approve by bob via link -> approved" in rest
    assert token not in rest


def test_filters_and_sorting_read_the_gates_payload_as_workflow_expressions_do(
    url: str, ledger: ActionLedger
) -> None:
    """The gate's default payload nests the entity's columns and the earlier steps' outputs; the
    filter names them as ``approve_when`` does: ``region``, ``\\`draft_po.total\\```."""

    def order(entity: str, region: str, total: float) -> dict[str, Any]:
        payload = {
            "entity": {"sku": entity, "region": region, "email": "buyer@example.com"},
            "steps": {"draft_po": {"po_id": f"PO-{entity}", "total": total}},
        }
        return approval_row(entity, payload=payload, value=total, requested_at=NOW)

    rows = [
        order("sku-1", "eu", 6200.0),
        order("sku-2", "us", 9100.0),
        order("sku-3", "eu", 4800.0),
    ]
    request(ledger, *rows)

    listed = run("approvals", "--ledger", url, "--sort", "-draft_po.total")
    assert [line.split()[2] for line in listed.output.splitlines()[1:4]] == [
        "sku-2",
        "sku-1",
        "sku-3",
    ]
    assert "draft_po.po_id=PO-sku-2" in listed.output  # what is approved comes first
    shown = json.loads(run("approvals", "--ledger", url, "--json").output)
    assert {r["payload"]["entity"]["email"] for r in shown} == {"b***@example.com"}
    result = run(
        "approve",
        "--ledger",
        url,
        "-p",
        PLAYBOOK,
        "--where",
        "`draft_po.total` > 5000 and region == 'eu'",
        "--by",
        "ana",
        "--yes",
    )

    assert result.exit_code == 0, result.output
    assert [status_of(ledger, r["approval_id"]) for r in rows] == ["approved", "pending", "pending"]
