"""The stock-replenishment story end to end: real shortages, the real supplier API over HTTP, the
real SMTP sink for the approvers' emails and the real approval endpoint for their links.

The demand forecast is trained once (the real configuration: 500 SKUs); a day's shortages go
through resources/stock_playbook.yaml with the reference deployment's channels. Every test reads
what the supplier API, the mailbox, the inventory and the ledger recorded, and decides as people
do: ``autoexec approve``/``reject`` (click's CliRunner on the same ledger) or the links the emails
carry (real GET and POST to ``approval_app`` served on 127.0.0.1). Time is a clock the ledger,
the API and the approval endpoint share, moved forward instead of slept; it starts at the real
time because the command line decides on the real time.
"""

import datetime as dt
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from assets import APPROVAL_THRESHOLD, find_shortages, generate_sales_history, train_demand_model
from assets.stock import DemandForecastModel
from autoexec_dagster import (
    ActionLedger,
    ApprovalLinks,
    Channel,
    ExecutionReport,
    Playbook,
    advance_workflows,
    execute_plan,
    route,
)
from autoexec_dagster.workflows.report import WorkflowReport
from demo.runs import execute_request, tick
from resources.local_servers import ReceivedMail, SmtpSink
from resources.stock_channels import APPROVER_ADDRESSES, STOCK_PLAYBOOK_PATH, stock_channels
from resources.supplier_api import SupplierApi
from resources.suppliers import SupplierCatalogue, cheapest_feasible_offers
from tests.e2e_support import QUIET, SECRET
from tests.test_approval_assets import check_results
from tests.test_approvals_server import ApprovalServer, call, post
from tests.test_cli_approvals import run as autoexec
from tests.test_execution_assets import materializations
from tests.test_ledger_approvals import Clock

DAY = "2026-11-10"
PLAYBOOK = "stock_replenishment"
INSIGHT = "stock_shortages"
APPROVAL_SECRET = "stock-e2e-approval-secret-0123456789"
SILENT = "SUP-05"
# Every supplier but the silent one answers within four hours; the poll asks every six.
FOLLOW_UP = dt.timedelta(hours=6, minutes=1)


@pytest.fixture(scope="module")
def model() -> DemandForecastModel:
    return train_demand_model(generate_sales_history())[0]


@pytest.fixture(scope="module")
def shortages(model: DemandForecastModel) -> pd.DataFrame:
    return find_shortages(model, dt.date.fromisoformat(DAY))


@pytest.fixture(scope="module")
def expected(shortages: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """What the playbook should choose for each flagged SKU, from the pandas twin of the query."""
    catalogue = SupplierCatalogue(tmp_path_factory.mktemp("catalogue") / "suppliers.sqlite")
    items = catalogue.create(as_of=dt.date.fromisoformat(DAY)).items(active_only=True)
    return cheapest_feasible_offers(shortages, items).set_index("sku")


def of_kind(expected: pd.DataFrame, kind: str) -> list[str]:
    """The flagged SKUs of a kind: small (goes through), large (waits), silent, none."""
    chosen = expected["supplier_id"]
    speaking = chosen.notna() & (chosen != SILENT)
    masks = {
        "small": speaking & (expected["total"] <= APPROVAL_THRESHOLD),
        "large": speaking & (expected["total"] > APPROVAL_THRESHOLD),
        "silent": chosen == SILENT,
        "none": chosen.isna(),
    }
    return sorted(expected.index[masks[kind]])


def pick(expected: pd.DataFrame, kind: str, n: int) -> list[str]:
    """``n`` flagged SKUs of a kind (see :func:`of_kind`)."""
    found = of_kind(expected, kind)
    assert len(found) >= n, (kind, found)
    return found[:n]


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{str(k): v for k, v in row.items()} for row in frame.to_dict("records")]


def body(mail: ReceivedMail) -> str:
    """The plain-text body of a received email, decoded."""
    message = mail.message
    assert isinstance(message, EmailMessage)
    return str(message.get_content())


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass
class World:
    """One test's deployment: catalogue, supplier API, SMTP sink, approval endpoint, ledger."""

    root: Path
    clock: Clock
    ledger: ActionLedger
    api: SupplierApi
    sink: SmtpSink
    server: ApprovalServer
    links: ApprovalLinks
    catalogue: SupplierCatalogue
    channels: dict[str, Channel]
    playbook: Playbook

    @property
    def ledger_url(self) -> str:
        return f"sqlite:///{self.root / 'ledger.db'}"

    def start(self, shortages: pd.DataFrame, skus: Sequence[str] | None = None) -> ExecutionReport:
        """Execute the day's shortages; with ``skus``, only those SKUs are flagged."""
        frame = shortages.copy()
        if skus is not None:
            frame["flagged"] = frame["sku"].isin(list(skus))
        plan = route(frame, self.playbook, partition_key=DAY, insight_name=INSIGHT)
        return execute_plan(
            plan,
            playbook=self.playbook,
            ledger=self.ledger,
            channels=self.channels,
            approval_links=self.links,
        )

    def advance(self) -> WorkflowReport:
        return advance_workflows(
            playbook=self.playbook,
            ledger=self.ledger,
            channels=self.channels,
            approval_links=self.links,
        )

    def catch_up(self) -> None:
        """Bring the clock up to the real time: a decision from the command line is stamped
        with it and makes its instance due then."""
        self.clock.now = max(self.clock.now, now()) + dt.timedelta(seconds=1)

    def pending(self) -> dict[str, dict[str, Any]]:
        """The pending approval requests by SKU."""
        frame = self.ledger.pending_approvals(playbook=self.playbook.name)
        return {str(r["entity_id"]): r for r in records(frame)}

    def statuses(self) -> dict[str, str]:
        """Every approval request's status by id."""
        frame = self.ledger.approvals(playbook=self.playbook.name)
        return {str(r["approval_id"]): str(r["status"]) for r in records(frame)}

    def email(self, approval_id: str, approver: str = "procurement") -> ReceivedMail:
        address = APPROVER_ADDRESSES[approver]
        found = [
            m for m in self.sink.messages if approval_id in body(m) and m.message["To"] == address
        ]
        assert len(found) == 1, (approval_id, approver, len(found))
        return found[0]

    def link(self, approval_id: str, decision: str, approver: str = "procurement") -> str:
        text = body(self.email(approval_id, approver))
        match = re.search(rf"{decision.capitalize()}:\s+(http\S+)", text)
        assert match, text
        return match.group(1)

    def submitted_skus(self) -> set[str]:
        orders = self.api.purchase_orders()
        return {o["sku"] for o in orders if o["submitted_at"] is not None}

    def decisions(self, approval_id: str) -> list[tuple[str, str, str]]:
        frame = self.ledger.approval_decisions([approval_id])
        return list(zip(frame["approver"], frame["decision"], frame["via"], strict=True))

    def instance_state(self, sku: str) -> str:
        instances = self.ledger.instances(playbook=self.playbook.name).set_index("entity_id")
        return str(instances.loc[sku, "state"])

    def escalation(self, sku: str) -> dict[str, Any]:
        queue = self.ledger.escalations(playbook=self.playbook.name, status=None)
        rows = records(queue[queue["entity_id"] == sku])
        assert len(rows) == 1, (sku, rows)
        return {**rows[0], "data": json.loads(str(rows[0]["data"]))}


def make_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, playbook: Playbook) -> World:
    monkeypatch.setenv("SUPPLIER_API_SECRET", SECRET)
    # The decisions' observations on a Dagster instance are the approval helpers' tests.
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    clock = Clock(now())
    catalogue = SupplierCatalogue(tmp_path / "suppliers.sqlite").create(
        as_of=dt.date.fromisoformat(DAY)
    )
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)
    api = SupplierApi(SECRET, tmp_path / "supplier_api.sqlite", catalogue=catalogue, clock=clock)
    sink = SmtpSink(tmp_path / "mailbox")
    server = ApprovalServer(ledger, clock=clock, secret=APPROVAL_SECRET, observe=False)
    api.start()
    sink.start()
    server.start()
    links = ApprovalLinks(base_url=server.url, secret=APPROVAL_SECRET)
    channels = stock_channels(
        urls={name: api.url_for(name) for name in ("create", "submit", "status")},
        smtp_port=sink.port,
        catalogue=catalogue.path,
        clock=clock,
        submit_timeout_seconds=1.0,
    )
    return World(tmp_path, clock, ledger, api, sink, server, links, catalogue, channels, playbook)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    built = make_world(tmp_path, monkeypatch, Playbook.from_yaml(STOCK_PLAYBOOK_PATH))
    try:
        yield built
    finally:
        built.server.stop()
        built.sink.stop()
        built.api.stop()
        built.ledger.dispose()


# -- the day through the Dagster job -----------------------------------------------------------


def test_a_day_runs_through_the_dagster_job_small_orders_go_out_large_ones_wait(
    world: World, expected: pd.DataFrame
) -> None:
    import definitions
    from assets import demand_forecast_model, sales_history, stock_assets
    from sensors import build_stock_replenishment_execution_defs

    defs = definitions.build_defs(
        stock_execution=build_stock_replenishment_execution_defs(
            channels=world.channels, ledger=world.ledger, approval_links=world.links
        )
    )
    with dg.DagsterInstance.ephemeral(tempdir=str(world.root / "dagster")) as instance:
        trained = dg.materialize(
            stock_assets,
            selection=[sales_history, demand_forecast_model],
            instance=instance,
            run_config=QUIET,
        )
        assert trained.success
        scored = defs.resolve_job_def("stock_scoring_job").execute_in_process(
            partition_key=DAY, instance=instance, run_config=QUIET
        )
        assert all(e.passed for e in scored.get_asset_check_evaluations())

        # The insight sensor answers the new day with one run of the execution job.
        first = tick(defs, instance, f"{PLAYBOOK}_sensor", cursor=None)
        assert [r.partition_key for r in first.requests] == [DAY]
        run = execute_request(defs, instance, f"{PLAYBOOK}_sensor", first.requests[0], config=QUIET)
        report = run.output_for_node(f"{PLAYBOOK}_execution", "actions")
        assert report["workflows_started"] == len(expected)

        feasible = expected[expected["supplier_id"].notna()]
        large = set(feasible.index[feasible["total"] > APPROVAL_THRESHOLD])
        small = set(feasible.index) - large
        silent = set(feasible.index[feasible["supplier_id"] == SILENT])
        assert large and small and silent and len(expected) > len(feasible)

        # Every feasible shortage was drafted with the expected supplier, quantity and total.
        orders = {o["sku"]: o for o in world.api.purchase_orders()}
        assert set(orders) == set(feasible.index)
        for sku, order in orders.items():
            row = feasible.loc[sku]
            assert (order["supplier_id"], order["quantity"]) == (
                row["supplier_id"],
                row["reorder_qty"],
            )
            assert order["total"] == pytest.approx(row["total"])
            assert order["client_reference"] == f"{DAY}:{sku}:{row['supplier_id']}"
        # Below the threshold they went out at once; above it they wait for procurement.
        assert world.submitted_skus() == small - silent
        pending = world.pending()
        assert set(pending) == large
        for sku in large:
            assert pending[sku]["value"] == pytest.approx(orders[sku]["total"])
            assert orders[sku]["status"] == "draft"
        by_rule = world.ledger.approvals(playbook=PLAYBOOK, status="approved")
        assert set(by_rule["entity_id"]) == small and set(by_rule["decided_by"]) == {"rule"}
        approvals = materializations(run)[f"{PLAYBOOK}/approvals"]
        assert approvals["pending"] == len(large)
        assert approvals["pending_value"] == pytest.approx(sum(orders[s]["total"] for s in large))
        assert approvals["approved_by_rule"] == len(small)
        assert check_results(run)[f"{PLAYBOOK}_approval_sla"].passed

        # One email per waiting order, to procurement, with the order and both links.
        assert world.sink.deliveries == len(large)
        for sku in large:
            approval_id = str(pending[sku]["approval_id"])
            mail = world.email(approval_id)
            order = orders[sku]
            subject = str(mail.message["Subject"])
            assert subject.startswith(f"Approve {order['po_id']}: {order['quantity']} x ")
            assert f"EUR {order['total']:,.2f}" in subject
            text = body(mail)
            for shown in (sku, order["supplier_name"], "Approve: http", "Reject:  http"):
                assert shown in text, (shown, text)
            assert f"autoexec approve {approval_id[:12]} --by procurement" in text

        # No supplier in time: escalated at once, with what was tried.
        for sku in set(expected.index) - set(feasible.index):
            case = world.escalation(sku)
            assert "no supplier can deliver" in case["reason"]
            assert case["data"]["outputs"]["quotes"]["row_count"] >= 2

        # Six hours on, the workflows sensor asks for the follow-ups: confirmed orders go on
        # order in the inventory, rejected ones go to a person with the supplier's reason.
        world.clock.advance(FOLLOW_UP)
        follow = tick(defs, instance, f"{PLAYBOOK}_workflows_sensor", cursor=None)
        assert [r.partition_key for r in follow.requests] == [DAY]
        execute_request(
            defs, instance, f"{PLAYBOOK}_workflows_sensor", follow.requests[0], config=QUIET
        )

    statuses = {o["sku"]: o["status"] for o in world.api.purchase_orders()}
    confirmed = {s for s, status in statuses.items() if status == "confirmed"}
    rejected = {s for s, status in statuses.items() if status == "rejected"}
    assert confirmed | rejected == small - silent and confirmed
    instances = world.ledger.instances(playbook=PLAYBOOK).set_index("entity_id")["state"]
    assert set(instances.index[instances == "succeeded"]) == confirmed
    applied = world.catalogue.applied_orders().set_index("sku")
    assert set(applied.index) == confirmed
    for sku in confirmed:
        order = orders[sku]
        assert applied.loc[sku, "po_id"] == order["po_id"]
        assert applied.loc[sku, "quantity"] == order["quantity"]
        row = world.catalogue.inventory_row(sku)
        assert row is not None and row["last_po_id"] == order["po_id"]
    for sku in rejected:
        case = world.escalation(sku)
        assert "rejected" in case["reason"] and "declined by the supplier" in case["reason"]
        # At the first answer, not after the poll's three days.
        assert case["data"]["outputs"]["confirm"]["status"] == "rejected"
    # The silent supplier never answered the submission: escalated with the order's history.
    for sku in silent & small:
        case = world.escalation(sku)
        assert case["reason"].startswith("Purchase order not completed")
        assert "timed out" in case["reason"]
        outputs, log = case["data"]["outputs"], case["data"]["evidence"]
        assert outputs["draft_po"]["po_id"] == orders[sku]["po_id"]
        assert [e["step"] for e in log if e["outcome"] == "failed"] == ["submit"]
        assert statuses[sku] == "draft"
    assert world.api.summary()["held"] == 2 * len(silent & small)  # two attempts each


# -- deciding ----------------------------------------------------------------------------------


def test_an_order_approved_from_the_command_line_goes_on(
    world: World, shortages: pd.DataFrame, expected: pd.DataFrame
) -> None:
    large = pick(expected, "large", 2)
    world.start(shortages, large)
    pending = world.pending()
    listed = autoexec("approvals", "--ledger", world.ledger_url, "--playbook", PLAYBOOK)
    assert listed.exit_code == 0 and all(sku in listed.output for sku in large)
    approve, reject = (str(pending[s]["approval_id"]) for s in large)

    # Somebody who is not an approver is refused and nothing is recorded.
    refused = autoexec("approve", approve[:8], "--ledger", world.ledger_url, "--by", "warehouse")
    assert refused.exit_code != 0 and world.decisions(approve) == []

    done = autoexec(
        "approve", approve[:8], "--ledger", world.ledger_url, "--by", "procurement", "--note", "ok"
    )
    assert done.exit_code == 0, done.output
    gone = autoexec(
        "reject",
        reject[:8],
        "--ledger",
        world.ledger_url,
        "--by",
        "procurement",
        "--note",
        "split it over two weeks",
    )
    assert gone.exit_code == 0, gone.output
    assert world.decisions(approve) == [("procurement", "approve", "cli")]
    assert world.submitted_skus() == set()  # decided, not yet applied

    world.catch_up()
    moved = world.advance()
    assert moved.approved == 1 and moved.rejected == 1
    assert world.submitted_skus() == {large[0]}
    assert world.instance_state(large[1]) == "rejected"
    order = next(o for o in world.api.purchase_orders() if o["sku"] == large[1])
    assert order["status"] == "draft" and order["submitted_at"] is None


def test_a_link_shows_the_order_on_get_and_decides_only_on_post(
    world: World, shortages: pd.DataFrame, expected: pd.DataFrame
) -> None:
    (sku,) = pick(expected, "large", 1)
    world.start(shortages, [sku])
    approval_id = str(world.pending()[sku]["approval_id"])
    url = world.link(approval_id, "approve")
    order = world.api.purchase_orders()[0]

    for _ in range(2):  # a mail scanner, then the person: neither decides
        shown = call("GET", url)
        assert shown.status == 200
        assert "Approve this request?" in shown.page and order["po_id"] in shown.page
        assert f"{order['total']:,.2f}" in shown.page
    assert world.decisions(approval_id) == []
    assert world.advance().approved == 0 and world.submitted_skus() == set()

    decided = post(url, note="checked with the category manager")
    assert decided.status == 200 and "Approved" in decided.page
    assert world.decisions(approval_id) == [("procurement", "approve", "link")]
    assert world.advance().approved == 1
    assert world.submitted_skus() == {sku}


def test_orders_approved_in_bulk_by_a_filter(
    world: World, shortages: pd.DataFrame, expected: pd.DataFrame
) -> None:
    large = pick(expected, "large", 4)
    world.start(shortages, large)
    values = {sku: float(r["value"]) for sku, r in world.pending().items()}
    cut = sorted(values.values())[len(values) // 2]
    chosen = {sku for sku, value in values.items() if value < cut}
    assert 0 < len(chosen) < len(large)
    where = f"value < {cut}"
    bulk = autoexec(
        "approve",
        "--ledger",
        world.ledger_url,
        "--playbook",
        PLAYBOOK,
        "--partition",
        DAY,
        "--where",
        where,
        "--by",
        "procurement",
        "--yes",
    )
    assert bulk.exit_code == 0, bulk.output
    assert f"{len(chosen)} pending approval request(s)" in bulk.output
    assert set(world.pending()) == set(large) - chosen

    world.catch_up()
    assert world.advance().approved == len(chosen)
    assert world.submitted_skus() == chosen


# -- links that must not decide -----------------------------------------------------------------


def test_tampered_reused_wrong_approver_and_expired_links_record_nothing(
    world: World, shortages: pd.DataFrame, expected: pd.DataFrame
) -> None:
    first, second = pick(expected, "large", 2)
    world.start(shortages, [first, second])
    pending = world.pending()
    one, two = (str(pending[s]["approval_id"]) for s in (first, second))
    approve_one = world.link(one, "approve")

    # Tampered: one character of the token changed.
    path, _, token = approve_one.partition("?token=")
    flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    for method in ("GET", "POST"):
        refused = (
            call("GET", f"{path}?token={flipped}")
            if method == "GET"
            else call("POST", path, data={"token": flipped})
        )
        assert refused.status == 403 and "Nothing was recorded" in refused.page
    # The token of one request on another request's address.
    other = world.link(two, "approve").partition("?token=")[0]
    assert call("POST", other, data={"token": token}).status == 403
    # Signed with the deployment's secret, but for somebody the request does not list.
    stranger = world.links.link(
        approval_id=one,
        digest=str(pending[first]["digest"]),
        decision="approve",
        approver="warehouse",
        expires_at=pd.Timestamp(pending[first]["expires_at"]).to_pydatetime(),
    )
    assert post(stranger).status == 403
    assert world.decisions(one) == [] and world.decisions(two) == []

    # Reused: the first POST decides, the second (and the reject link) is refused.
    assert post(approve_one).status == 200
    again = post(approve_one)
    assert again.status == 410 and "Already approved" in again.page
    assert post(world.link(one, "reject"), note="no").status == 410
    assert world.decisions(one) == [("procurement", "approve", "link")]

    # Expired: two days on, the link of the undecided request is refused, nothing recorded,
    # and the next run applies on_expiry: the order goes to a person, never to the supplier.
    world.clock.advance(dt.timedelta(days=2, minutes=1))
    late = post(world.link(two, "approve"))
    assert late.status == 410 and "expired" in late.page.lower()
    assert world.decisions(two) == []
    assert world.advance().expired == 1
    assert world.instance_state(second) == "failed"
    case = world.escalation(second)
    assert "no decision within 2d" in case["reason"]
    assert world.submitted_skus() == {first}


def test_a_changed_order_voids_its_approval_and_asks_again(
    world: World, shortages: pd.DataFrame, expected: pd.DataFrame
) -> None:
    (sku,) = pick(expected, "large", 1)
    world.start(shortages, [sku])
    old = world.pending()[sku]
    old_id = str(old["approval_id"])
    old_link = world.link(old_id, "approve")
    total = round(float(old["value"]) * 0.9, 2)
    world.ledger.amend_instance(
        str(old["instance_id"]),
        step="draft_po",
        changes={"total": total},
        by="procurement",
        note="the supplier agreed a 10% discount",
    )
    world.advance()
    assert world.statuses()[old_id] == "void"
    fresh = world.pending()[sku]
    assert fresh["approval_id"] != old_id and fresh["value"] == pytest.approx(total)
    assert world.sink.deliveries == 2  # asked again, for the new payload
    assert world.submitted_skus() == set()

    # The old link approved the old payload: refused, nothing recorded.
    stale = post(old_link)
    assert stale.status == 409 and "replaced" in stale.page
    assert world.decisions(old_id) == []
    assert post(world.link(str(fresh["approval_id"]), "approve")).status == 200
    assert world.advance().approved == 1
    assert world.submitted_skus() == {sku}


def test_four_eyes_need_two_distinct_approvers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shortages: pd.DataFrame, expected: pd.DataFrame
) -> None:
    source = Playbook.from_yaml(STOCK_PLAYBOOK_PATH)
    workflow = source.workflows["replenish"]
    steps = [
        s.model_copy(update={"approvers": ("procurement", "finance"), "min_approvals": 2})
        if s.name == "approval"
        else s
        for s in workflow.steps
    ]
    playbook = source.model_copy(
        update={"workflows": {"replenish": workflow.model_copy(update={"steps": steps})}}
    )
    world = make_world(tmp_path, monkeypatch, playbook)
    try:
        (sku,) = pick(expected, "large", 1)
        world.start(shortages, [sku])
        approval_id = str(world.pending()[sku]["approval_id"])
        # Each approver gets their own email with links signed for them.
        assert world.sink.deliveries == 2
        finance = body(world.email(approval_id, "finance"))
        assert "2 approvals (procurement and finance)" in finance

        assert post(world.link(approval_id, "approve", "procurement")).status == 200
        twice = autoexec(
            "approve", approval_id[:8], "--ledger", world.ledger_url, "--by", "procurement"
        )
        assert twice.exit_code != 0
        assert world.decisions(approval_id) == [("procurement", "approve", "link")]
        world.catch_up()
        assert world.advance().approved == 0 and world.submitted_skus() == set()

        by_finance = autoexec(
            "approve", approval_id[:8], "--ledger", world.ledger_url, "--by", "finance"
        )
        assert by_finance.exit_code == 0, by_finance.output
        world.catch_up()
        assert world.advance().approved == 1
        assert world.submitted_skus() == {sku}
        assert [d[:2] for d in world.decisions(approval_id)] == [
            ("procurement", "approve"),
            ("finance", "approve"),
        ]
    finally:
        world.server.stop()
        world.sink.stop()
        world.api.stop()
        world.ledger.dispose()


# -- library defects found by this story ---------------------------------------------------------


def test_a_sku_short_on_consecutive_days_is_ordered_once(
    world: World, model: DemandForecastModel, expected: pd.DataFrame
) -> None:
    assert world.playbook.guardrails.cooldown_days == 14
    today = find_shortages(model, dt.date.fromisoformat(DAY))
    tomorrow_day = (dt.date.fromisoformat(DAY) + dt.timedelta(days=1)).isoformat()
    tomorrow = find_shortages(model, dt.date.fromisoformat(tomorrow_day))
    both = sorted(set(of_kind(expected, "small")) & set(tomorrow.loc[tomorrow["flagged"], "sku"]))[
        :3
    ]
    assert both
    for frame, day in ((today, DAY), (tomorrow, tomorrow_day)):
        frame = frame.assign(flagged=frame["sku"].isin(both))
        plan = route(frame, world.playbook, partition_key=day, insight_name=INSIGHT)
        execute_plan(plan, playbook=world.playbook, ledger=world.ledger, channels=world.channels)
    orders = [o for o in world.api.purchase_orders() if o["sku"] in both]
    assert len(orders) == len(both), sorted(o["client_reference"] for o in orders)


def test_a_link_to_an_order_changed_since_is_refused_at_once(
    world: World, shortages: pd.DataFrame, expected: pd.DataFrame
) -> None:
    (sku,) = pick(expected, "large", 1)
    world.start(shortages, [sku])
    old = world.pending()[sku]
    link = world.link(str(old["approval_id"]), "approve")
    world.ledger.amend_instance(
        str(old["instance_id"]),
        step="draft_po",
        changes={"total": round(float(old["value"]) * 0.9, 2)},
        by="procurement",
        note="the supplier agreed a 10% discount",
    )
    stale = post(link)
    assert (stale.status, world.decisions(str(old["approval_id"]))) == (409, [])


def test_an_order_its_supplier_never_answers_is_escalated_naming_the_step(
    world: World, shortages: pd.DataFrame, expected: pd.DataFrame
) -> None:
    (sku,) = pick(expected, "silent", 1)
    world.start(shortages, [sku])
    case = world.escalation(sku)
    assert "timed out" in case["reason"]
    assert "step 'submit'" in case["reason"], case["reason"]
