"""The approval endpoint (autoexec_dagster/approvals/server.py) over real HTTP.

A real aiohttp server on 127.0.0.1 (started by each test and stopped by it), real requests with an
aiohttp client, a real SQLite ledger in tmp_path, and an injected clock for expiry.
"""

import asyncio
import base64
import json
import re
import shutil
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from html import unescape
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from autoexec_dagster.approvals.links import ApprovalLinks
from autoexec_dagster.approvals.server import approval_app
from autoexec_dagster.ledger import schema
from autoexec_dagster.ledger.action_ledger import ActionLedger
from resources.local_servers import AiohttpServer
from tests.test_ledger_approvals import (
    PLAYBOOK,
    Clock,
    approval_row,
    decisions_of,
    request,
    status_of,
)

SECRET = "server-test-secret-0123456789abcdef"


class ApprovalServer(AiohttpServer):
    """``approval_app`` on a daemon thread, on a free port of 127.0.0.1."""

    name = "approval-server"

    def __init__(
        self, ledger: ActionLedger, *, clock: Clock, secret: str = SECRET, observe: bool = True
    ) -> None:
        super().__init__()
        self.ledger, self.clock, self.secret, self.observe = ledger, clock, secret, observe

    def _handler(self) -> web.Application:
        links = ApprovalLinks(base_url="http://127.0.0.1", secret=self.secret)
        return approval_app(self.ledger, links, clock=self.clock, observe=self.observe)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class Reply:
    def __init__(self, status: int, text: str, headers: Mapping[str, str]) -> None:
        self.status, self.text, self.headers = status, text, headers

    @property
    def page(self) -> str:
        """The page's text without tags, unescaped (what a person reads)."""
        return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", self.text)))


def call(method: str, url: str, *, data: Mapping[str, str] | None = None) -> Reply:
    async def go() -> Reply:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, url, data=data, allow_redirects=False) as reply,
        ):
            return Reply(reply.status, await reply.text(), dict(reply.headers))

    return asyncio.run(go())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> ActionLedger:
    # make test exports DAGSTER_HOME for the project; these tests must not write observations there.
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    return ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)


@pytest.fixture
def server(ledger: ActionLedger, clock: Clock) -> Iterator[ApprovalServer]:
    with ApprovalServer(ledger, clock=clock) as running:
        yield running


def link(
    server: ApprovalServer,
    row: Mapping[str, Any],
    *,
    decision: str = "approve",
    approver: str = "ana",
    digest: str | None = None,
    expires_at: datetime | None = None,
    secret: str = SECRET,
) -> str:
    return ApprovalLinks(base_url=server.url, secret=secret).link(
        approval_id=row["approval_id"],
        digest=digest or row["digest"],
        decision=decision,  # type: ignore[arg-type]
        approver=approver,
        expires_at=expires_at or row["expires_at"],
    )


def post(url: str, **fields: str) -> Reply:
    """Press the page's button: POST the link's token (and a note) to the link's path."""
    path, _, query = url.partition("?token=")
    return call("POST", path, data={"token": query, **fields})


def assert_nothing_recorded(ledger: ActionLedger, row: Mapping[str, Any]) -> None:
    assert status_of(ledger, row["approval_id"]) == "pending"
    assert decisions_of(ledger, row["approval_id"]) == []


PO = {"supplier": "acme", "quantity": 120, "total": 1840.0, "lines": [{"sku": "A-1", "qty": 120}]}


def test_get_shows_the_confirmation_page_and_decides_nothing(
    ledger: ActionLedger, server: ApprovalServer
) -> None:
    row = approval_row("sku-1001", payload=PO)
    request(ledger, row)
    url = link(server, row)

    first, again = call("GET", url), call("GET", url)

    assert first.status == again.status == 200
    page = first.page
    assert "Approve this request?" in page and "sku-1001" in page and "1,840.00" in page
    assert "supplier acme" in page and "quantity 120" in page and "total 1840.0" in page
    assert '[{"qty": 120, "sku": "A-1"}]' in page
    assert "For ana" in page and "Approve as ana" in page and "approved so far: nobody" in page
    token = url.split("?token=")[1]
    assert (
        '<form method="post" action="/approvals/' + row["approval_id"] + '/approve">' in first.text
    )
    assert f'<input type="hidden" name="token" value="{token}">' in first.text
    assert first.headers["Cache-Control"] == "no-store"
    assert first.headers["Referrer-Policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in first.headers["Content-Security-Policy"]
    assert "Set-Cookie" not in first.headers
    assert_nothing_recorded(ledger, row)


def test_post_decides_as_the_tokens_approver_for_its_digest(
    ledger: ActionLedger, server: ApprovalServer, clock: Clock
) -> None:
    row = approval_row("sku-1001", payload=PO)
    request(ledger, row)
    clock.advance(timedelta(hours=2))

    reply = post(link(server, row, approver="bob"), note="  fine by me  ")

    assert reply.status == 200, reply.page
    assert "Approved" in reply.page and "the workflow goes on" in reply.page
    stored = ledger.approval_rows([row["approval_id"]])[row["approval_id"]]
    assert (stored["status"], stored["decided_by"], stored["decided_via"]) == (
        "approved",
        "bob",
        "link",
    )
    assert stored["decision_note"] == "fine by me" and stored["decided_at"] == clock.now
    decisions = ledger.approval_decisions([row["approval_id"]])
    assert decisions["digest"].tolist() == [row["digest"]]
    assert decisions["via"].tolist() == ["link"]


def test_four_eyes_through_links_and_a_reused_link_is_refused(
    ledger: ActionLedger, server: ApprovalServer
) -> None:
    row = approval_row("sku-1003", payload=PO, min_approvals=2)
    request(ledger, row)
    ana, bob = link(server, row, approver="ana"), link(server, row, approver="bob")

    first = post(ana)
    assert first.status == 200 and "Your approval is recorded (1 of 2)" in first.page
    assert status_of(ledger, row["approval_id"]) == "pending"
    assert "approved so far: ana" in call("GET", bob).page

    reused = post(ana)
    assert reused.status == 410 and "You already decided" in reused.page
    assert "ana already chose approve" in reused.page and "Nothing was recorded" in reused.page
    assert decisions_of(ledger, row["approval_id"]) == [(row["approval_id"], "ana", "approve")]

    assert post(bob).status == 200
    assert status_of(ledger, row["approval_id"]) == "approved"
    after = post(bob)
    assert after.status == 410 and "Already approved" in after.page
    assert "approved by ana, bob" in after.page
    assert len(decisions_of(ledger, row["approval_id"])) == 2


def test_a_tampered_token_is_refused_with_403_and_records_nothing(
    ledger: ActionLedger, server: ApprovalServer
) -> None:
    row = approval_row("sku-1001")
    request(ledger, row)
    url = link(server, row, approver="bob")
    path, token = url.split("?token=")
    body, mac = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["p"] = "ana"  # bob's link, rewritten to decide as ana
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    tampered = f"{path}?token={forged}.{mac}"
    foreign = link(server, row, secret="another-deployments-secret-000")

    for url in (tampered, foreign):
        shown, posted = call("GET", url), post(url)
        assert shown.status == posted.status == 403
        assert "This link is not valid" in posted.page and "signature does not match" in posted.page
    assert_nothing_recorded(ledger, row)


def test_an_expired_link_or_request_is_refused_with_410_and_records_nothing(
    ledger: ActionLedger, server: ApprovalServer, clock: Clock
) -> None:
    row = approval_row("sku-1001")
    request(ledger, row)
    short = link(server, row, expires_at=clock.now + timedelta(hours=1))
    longer = link(server, row, approver="bob", expires_at=row["expires_at"] + timedelta(days=3))

    clock.advance(timedelta(hours=1))
    shown, posted = call("GET", short), post(short)
    assert shown.status == posted.status == 410
    assert "This link has expired" in posted.page and "expired at" in posted.page

    # A link that outlives its request is refused by the request's own expiry.
    clock.now = row["expires_at"]
    late = post(longer)
    assert late.status == 410 and "This request has expired" in late.page
    assert "on_expiry (reject) applies" in late.page
    assert_nothing_recorded(ledger, row)


def test_a_link_for_an_approver_the_request_does_not_list_is_refused(
    ledger: ActionLedger, server: ApprovalServer
) -> None:
    row = approval_row("sku-1001", approvers=("ana", "bob"))
    request(ledger, row)
    url = link(server, row, approver="mallory")

    shown, posted = call("GET", url), post(url)

    assert shown.status == posted.status == 403
    assert "made for mallory, who is not an approver" in posted.page
    assert_nothing_recorded(ledger, row)


def test_a_changed_payload_is_refused_with_409_and_records_nothing(
    ledger: ActionLedger, server: ApprovalServer
) -> None:
    old = approval_row("sku-1001", payload={**PO, "total": 1840.0})
    request(ledger, old)
    old_link = link(server, old)
    # The price moved: the workflow voids the request and asks again for the new payload.
    ledger.close_approvals([old["approval_id"]], status="void", by="autoexec", note="changed")
    new = approval_row("sku-1001", payload={**PO, "total": 2210.0})
    request(ledger, new)

    shown, posted = call("GET", old_link), post(old_link)
    assert shown.status == posted.status == 409
    assert "This request was replaced" in posted.page
    assert decisions_of(ledger, old["approval_id"]) == []

    # A link made for another digest of a request still pending is refused too.
    stale = link(server, new, digest=old["digest"])
    refused = post(stale)
    assert refused.status == 409 and "its digest differs" in refused.page
    assert_nothing_recorded(ledger, new)
    assert post(link(server, new)).status == 200


def test_a_token_for_another_request_or_decision_than_the_url_is_refused(
    ledger: ActionLedger, server: ApprovalServer
) -> None:
    row, other = approval_row("sku-1001"), approval_row("sku-1002")
    request(ledger, row, other)
    url = link(server, row)
    token = url.split("?token=")[1]

    moved = f"{server.url}/approvals/{other['approval_id']}/approve?token={token}"
    flipped = f"{server.url}/approvals/{row['approval_id']}/reject?token={token}"

    assert post(moved).status == 403 and "another approval request" in post(moved).page
    assert post(flipped, note="no").status == 403
    assert "lets you approve, not reject" in post(flipped, note="no").page
    assert_nothing_recorded(ledger, row)
    assert_nothing_recorded(ledger, other)


def test_a_rejection_needs_a_note_and_then_rejects(
    ledger: ActionLedger, server: ApprovalServer
) -> None:
    row = approval_row("sku-1001")
    request(ledger, row)
    url = link(server, row, decision="reject", approver="bob")
    page = call("GET", url)
    assert page.status == 200 and "Reject as bob" in page.page
    assert "Why do you reject it? (required)" in page.page

    empty = post(url, note="   ")
    assert empty.status == 400 and "A rejection needs a note" in empty.page
    assert 'name="token"' in empty.text  # the form again, to try once more
    assert_nothing_recorded(ledger, row)

    done = post(url, note="supplier on credit hold")
    assert done.status == 200 and "Rejected" in done.page
    stored = ledger.approval_rows([row["approval_id"]])[row["approval_id"]]
    assert (stored["status"], stored["decided_by"], stored["decision_note"]) == (
        "rejected",
        "bob",
        "supplier on credit hold",
    )


def test_a_missing_token_or_an_unknown_request_is_refused(
    ledger: ActionLedger, server: ApprovalServer
) -> None:
    row = approval_row("sku-1001")
    request(ledger, row)
    missing = call("POST", f"{server.url}/approvals/{row['approval_id']}/approve", data={})
    assert missing.status == 400 and "carries no token" in missing.page

    unknown = approval_row("sku-never-requested")
    reply = call("GET", link(server, unknown))
    assert reply.status == 404 and "No such approval request" in reply.page
    assert call("GET", f"{server.url}/approvals/{row['approval_id']}/maybe?token=x").status == 404
    assert_nothing_recorded(ledger, row)


def test_untrusted_values_are_escaped_on_every_page(
    ledger: ActionLedger, server: ApprovalServer
) -> None:
    script = "<script>alert('x')</script>"
    row = approval_row(
        '"><img src=x onerror=alert(1)>',
        payload={"note": script, "<b>field</b>": "a & b"},
        approvers=("ana", "<i>eve</i>"),
    )
    request(ledger, row)

    reply = call("GET", link(server, row, approver="<i>eve</i>"))

    assert reply.status == 200
    assert "<script>" not in reply.text and "<img" not in reply.text and "<b>" not in reply.text
    assert "<i>eve" not in reply.text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in reply.text
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in reply.text
    assert "&lt;b&gt;field&lt;/b&gt;" in reply.text and "a &amp; b" in reply.text
    assert "Approve as <i>eve</i>" in reply.page


def test_the_gates_default_payload_is_shown_as_the_workflow_names_its_fields(
    ledger: ActionLedger, server: ApprovalServer
) -> None:
    payload = {
        "entity": {"sku": "A-1", "region": "eu"},
        "steps": {"draft_po": {"po_id": "PO-7", "total": 6200.5}},
    }
    row = approval_row("A-1", payload=payload, value=6200.5)
    request(ledger, row)

    page = call("GET", link(server, row)).page

    assert "region eu" in page and "draft_po.po_id PO-7" in page
    assert "draft_po.total 6200.5" in page and "6,200.50" in page


def test_healthz_answers_while_the_ledger_does(server: ApprovalServer) -> None:
    reply = call("GET", f"{server.url}/healthz")
    assert reply.status == 200
    assert json.loads(reply.text) == {"status": "ok", "schema_version": schema.SCHEMA_VERSION}


def test_a_ledger_that_cannot_be_read_gets_a_503_page(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    folder = tmp_path / "ledger"
    folder.mkdir()
    ledger = ActionLedger(f"sqlite:///{folder / 'ledger.db'}", clock=clock)
    row = approval_row("sku-1")
    request(ledger, row)
    with ApprovalServer(ledger, clock=clock) as running:
        url = link(running, row)
        assert call("GET", url).status == 200
        # The ledger's folder disappears (a lost volume): every read now fails.
        ledger.dispose()
        shutil.rmtree(folder)

        page, health = call("GET", url), call("GET", f"{running.url}/healthz")

    assert page.status == 503 and "The ledger is unavailable" in page.page
    assert health.status == 503 and json.loads(health.text) == {"status": "unavailable"}


def test_a_decision_by_link_is_observed_on_the_dagster_instance(
    tmp_path: Path, ledger: ActionLedger, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dagster as dg

    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    decided, waiting = approval_row("sku-1", value=500.0), approval_row("sku-2", value=70.0)
    request(ledger, decided, waiting)
    clock.advance(timedelta(hours=6))

    with ApprovalServer(ledger, clock=clock) as running:
        assert post(link(running, decided)).status == 200
    # Stopping the server waited for the observation it had started.

    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.fetch_observations(dg.AssetKey([PLAYBOOK, "approvals"]), limit=5).records
    (record,) = records
    observation = record.asset_observation
    assert observation is not None and observation.partition == "2026-12-03"
    metadata = {k: v.value for k, v in observation.metadata.items()}
    assert metadata["pending"] == 1 and metadata["pending_value"] == 70.0
    assert metadata["oldest_pending_hours"] == 6.0 and metadata["sla_overdue"] == 0
    assert (metadata["approved_by_people"], metadata["approved_by_people_value"]) == (1, 500.0)
    assert (metadata["approved_by_rule"], metadata["rejected"], metadata["expired"]) == (0, 0, 0)
    assert (metadata["changed_by"], metadata["source"]) == ("ana", "approval link")
