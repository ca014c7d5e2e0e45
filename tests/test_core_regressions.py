"""Regression tests for the defects of the execution core found in review (issue 6).

Each test failed on the code before its fix; the defect number is the issue's.
"""

import asyncio
import gc
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from autoexec_dagster import ActionLedger, LedgerError, PlanError, execute_plan, route
from autoexec_dagster.executor.plan_execution import execute_plan_async
from autoexec_dagster.ledger import schema
from tests.channel_doubles import RecordingChannel
from tests.conftest import churn_playbook, churn_scores

DAY = "2026-11-24"
ROOT = Path(__file__).resolve().parents[1]


def _channels() -> dict[str, RecordingChannel]:
    return {
        "retention_email": RecordingChannel(max_concurrency=8),
        "crm_task": RecordingChannel(max_concurrency=8),
    }


def _delivered(channels: dict[str, RecordingChannel]) -> int:
    return sum(sum(ch.delivered.values()) for ch in channels.values())


def _in_thread(fn: Any, *, deadline: float) -> tuple[bool, Any]:
    """Run ``fn`` in a daemon thread; (finished, result or exception) after ``deadline`` s."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["result"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(deadline)
    return not thread.is_alive(), box.get("result")


def test_defect_1_a_playbook_edit_does_not_resend(sqlite_url):
    ledger = ActionLedger(sqlite_url)
    channels = _channels()
    scores = churn_scores(1_000)
    first = churn_playbook(max_flagged_fraction=0.9)
    report = execute_plan(
        route(scores, first, partition_key=DAY), playbook=first, ledger=ledger, channels=channels
    )
    sent = _delivered(channels)
    assert report.succeeded == sent > 0
    # One escalation threshold changes: a new playbook version; nobody is contacted again.
    edited = first.model_copy(
        update={
            "rules": [
                first.rules[0].model_copy(
                    update={"when": "churn_score >= 0.7 and lifetime_value >= 9000"}
                ),
                *first.rules[1:],
            ]
        }
    )
    assert edited.effective_version != first.effective_version
    plan = route(scores, edited, partition_key=DAY)
    again = execute_plan(plan, playbook=edited, ledger=ledger, channels=channels)
    newly_acting = plan[
        (plan["decision"] == "act")
        & (scores["churn_score"] >= 0.7).to_numpy()
        & (scores["lifetime_value"] >= 5000).to_numpy()
    ]
    # Only the entities the edit moved from "escalate" to an action are new work.
    assert _delivered(channels) == sent + len(newly_acting)
    assert again.succeeded == len(newly_acting)
    rows = ledger.actions(playbook="churn_outreach", partition_key=DAY)
    versions = set(rows["playbook_version"])
    assert versions == {first.effective_version, edited.effective_version}


def test_defect_2_a_ledger_error_ends_the_run(sqlite_url):
    class BrokenComplete(ActionLedger):
        def complete(self, *args: Any, **kwargs: Any) -> Any:
            raise LedgerError("disk I/O error (injected)")

    ledger = BrokenComplete(sqlite_url)
    playbook = churn_playbook(max_flagged_fraction=0.9)
    plan = route(churn_scores(300), playbook, partition_key=DAY)
    finished, result = _in_thread(
        lambda: execute_plan(
            plan, playbook=playbook, ledger=ledger, channels=_channels(), lease_seconds=2
        ),
        deadline=20,
    )
    assert finished, "execute_plan hung after a ledger error"
    assert isinstance(result, LedgerError) and "disk I/O error" in str(result)
    # No heartbeat keeps the claims alive: once the lease runs out another worker recovers them.
    sending = ledger.state_counts(playbook="churn_outreach").get(schema.SENDING, 0)
    assert sending > 0
    time.sleep(2.1)  # the lease itself is what is under test: it must run out
    keys = plan.loc[plan["decision"] == "act", "idempotency_key"].tolist()
    assert len(ActionLedger(sqlite_url).recover(keys)) == sending


def test_defect_3_a_failing_digest_never_leaves_a_sent_action_unrecorded(sqlite_url):
    class BadDigest(RecordingChannel):
        def request_digest(self, request: Any) -> str:
            raise ValueError("cannot digest this request")

    channels = {"retention_email": BadDigest(), "crm_task": BadDigest()}
    ledger = ActionLedger(sqlite_url)
    playbook = churn_playbook(max_flagged_fraction=0.9)
    plan = route(churn_scores(200), playbook, partition_key=DAY)
    finished, _ = _in_thread(
        lambda: execute_plan(plan, playbook=playbook, ledger=ledger, channels=channels),
        deadline=20,
    )
    assert finished, "execute_plan hung after a digest error"
    delivered = {k for ch in channels.values() for k in ch.delivered}
    rows = ledger.actions(playbook="churn_outreach", partition_key=DAY)
    succeeded = set(rows.loc[rows["state"] == schema.SUCCEEDED, "idempotency_key"])
    assert delivered == succeeded  # nothing delivered without being recorded
    assert not set(rows["state"]) & {schema.SENDING, schema.RESERVED}


def test_defect_5_declared_python_versions_are_the_tested_ones():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # datetime.UTC and tomllib are 3.11+; CI runs 3.11.
    assert project["project"]["requires-python"] == ">=3.11"
    assert project["tool"]["ruff"]["target-version"] == "py311"


def test_defect_6_ledger_io_runs_off_the_event_loop(sqlite_url):
    class SlowLedger(ActionLedger):
        # Slow database round trips on calls the executor makes before and after sending.
        def pause_reason(self, *args: Any, **kwargs: Any) -> Any:
            time.sleep(0.3)
            return super().pause_reason(*args, **kwargs)

        def reserve(self, *args: Any, **kwargs: Any) -> Any:
            time.sleep(0.3)
            return super().reserve(*args, **kwargs)

    ledger = SlowLedger(sqlite_url)
    playbook = churn_playbook(max_flagged_fraction=0.9)
    plan = route(churn_scores(200), playbook, partition_key=DAY)

    async def main() -> float:
        worst = 0.0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal worst
            while not stop.is_set():
                before = time.perf_counter()
                await asyncio.sleep(0.01)
                worst = max(worst, time.perf_counter() - before - 0.01)

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0)  # let the ticker take its first measurement
        await execute_plan_async(plan, playbook=playbook, ledger=ledger, channels=_channels())
        stop.set()
        await tick
        return worst

    assert asyncio.run(main()) < 0.2


def test_defect_6_no_process_wide_gc_state_is_changed(sqlite_url):
    ledger = ActionLedger(sqlite_url)
    playbook = churn_playbook(max_flagged_fraction=0.9)
    plan = route(churn_scores(200), playbook, partition_key=DAY)
    gc.freeze()  # the application froze its own long-lived objects
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        execute_plan(plan, playbook=playbook, ledger=ledger, channels=_channels())
        assert gc.get_freeze_count() == frozen
        assert gc.isenabled()
    finally:
        gc.unfreeze()


@pytest.mark.parametrize(
    "lose",
    [
        lambda plan: pd.read_csv(_csv(plan)),
        lambda plan: pd.DataFrame(plan.to_dict("list")),
    ],
    ids=["csv_round_trip", "rebuilt_frame"],
)
def test_defect_7_a_plan_without_provenance_is_refused(sqlite_url, lose):
    playbook = churn_playbook(max_flagged_fraction=0.9)
    other = churn_playbook(max_flagged_fraction=0.9).model_copy(update={"name": "other"})
    plan = route(churn_scores(50), playbook, partition_key=DAY)
    stripped = lose(plan)
    channels = _channels()
    with pytest.raises(PlanError, match="provenance"):
        execute_plan(stripped, playbook=other, ledger=ActionLedger(sqlite_url), channels=channels)
    assert _delivered(channels) == 0


def _csv(plan: pd.DataFrame) -> Any:
    import io

    buffer = io.StringIO()
    plan.to_csv(buffer, index=False)
    buffer.seek(0)
    return buffer


def test_defect_11_an_open_escalation_is_not_reopened_every_day(sqlite_url):
    ledger = ActionLedger(sqlite_url)
    playbook = churn_playbook(max_flagged_fraction=0.9)
    scores = churn_scores(500)
    first = execute_plan(
        route(scores, playbook, partition_key="2026-11-24"),
        playbook=playbook,
        ledger=ledger,
        channels=_channels(),
    )
    assert first.escalated > 0
    second = execute_plan(
        route(scores, playbook, partition_key="2026-11-25"),
        playbook=playbook,
        ledger=ledger,
        channels=_channels(),
    )
    queue = ledger.escalations(playbook="churn_outreach")
    assert len(queue) == first.escalated  # nobody got a second open escalation
    assert second.still_open_escalations == {"2026-11-24": first.escalated}
    assert second.escalated == 0


# -- issue 8 review: work-queue and approval rows must not change what a partition counts ---


def test_an_escalation_keeps_its_key_when_its_rule_gains_a_proposed_action(tmp_path):
    from autoexec_dagster.playbook import Playbook, Rule
    from autoexec_dagster.routing import route
    from tests.conftest import churn_scores

    def playbook(proposed: str | None) -> Playbook:
        return Playbook(
            name="churn_outreach",
            entity_key="customer_id",
            rules=[
                Rule(
                    name="vip_at_risk",
                    when="churn_score >= 0.7 and lifetime_value >= 5000",
                    escalate="High-value customer at risk",
                    action=proposed,
                ),
            ],
        )

    scores = churn_scores(300, seed=7)
    before = route(scores, playbook(None), partition_key="p1")
    after = route(scores, playbook("crm_task"), partition_key="p1")
    escalated = before["decision"].astype(str) == "escalate"
    assert escalated.any()
    # Adding a proposed action must not re-open every case under a new key on the next re-run.
    assert before.loc[escalated, "idempotency_key"].tolist() == (
        after.loc[escalated, "idempotency_key"].tolist()
    )


def test_an_approved_proposal_does_not_change_the_partitions_entity_counts(tmp_path):
    from autoexec_dagster.executor.escalation_actions import deliver_approved_escalations
    from autoexec_dagster.ledger.action_ledger import ActionLedger
    from tests.test_ledger_escalations import (
        PLAYBOOK,
        Recorder,
        execute_partition,
        proposing_playbook,
    )

    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    recorder = Recorder()
    channels = recorder.channels()
    execute_partition(ledger, "p1", channels=channels)
    before = ledger.partition_outcome(playbook=PLAYBOOK, partition_key="p1")
    queue = ledger.select_escalations(playbook=PLAYBOOK, rule="vip_at_risk")
    ledger.approve_escalations(queue["idempotency_key"].tolist()[:3], by="ana")
    deliver_approved_escalations(
        playbook=proposing_playbook(), ledger=ledger, channels=channels, partition_key="p1"
    )
    after = ledger.partition_outcome(playbook=PLAYBOOK, partition_key="p1")
    assert (after.total, after.flagged, after.succeeded) == (
        before.total,
        before.flagged,
        before.succeeded,
    )
    assert after.approved_actions == 3


def test_approver_notifications_do_not_count_as_flagged_entities(tmp_path):
    from autoexec_dagster.ledger.action_ledger import ActionLedger
    from tests.test_workflows_approvals import (
        DAY,
        START,
        Clock,
        Suppliers,
        shortages,
        start,
        stock_playbook,
    )

    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=Clock(START))
    suppliers = Suppliers()
    channels = {a: suppliers.channel(a) for a in ("draft_po", "submit_po", "approver_email")}
    start(stock_playbook(approvers=["ana", "bo"]), ledger, channels)
    outcome = ledger.partition_outcome(playbook="stock", partition_key=DAY)
    assert outcome.total == len(shortages()) and outcome.flagged == len(shortages())
    assert outcome.notifications == 4
