import logging
import threading
from typing import Any

import pandas as pd
import pytest

from autoexec_dagster.errors import (
    ChannelConfigError,
    PermanentChannelError,
    PlanError,
    TransientChannelError,
)
from autoexec_dagster.executor.plan_execution import execute_plan
from autoexec_dagster.ledger import schema
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.routing import route
from tests.channel_doubles import RecordingChannel, fail_first
from tests.conftest import churn_playbook, churn_scores, count_true

DAY = "2026-11-24"


def _channels(**overrides: object) -> dict[str, RecordingChannel]:
    params = {
        "max_concurrency": 8,
        "backoff_base_seconds": 0.001,
        "backoff_max_seconds": 0.01,
        **overrides,
    }
    return {
        "retention_email": RecordingChannel(**params),  # type: ignore[arg-type]
        "crm_task": RecordingChannel(**params),  # type: ignore[arg-type]
    }


def _run(plan, ledger, channels, **kwargs):
    playbook = kwargs.pop("playbook", None) or churn_playbook(max_flagged_fraction=0.9)
    return execute_plan(
        plan, playbook=playbook, ledger=ledger, channels=channels, partition_key=DAY, **kwargs
    )


@pytest.fixture
def ledger(ledger_url) -> ActionLedger:
    return ActionLedger(ledger_url)


def test_every_act_row_is_delivered_once_and_a_rerun_sends_nothing(ledger):
    playbook = churn_playbook(max_flagged_fraction=0.9, holdout_fraction=0.05)
    plan = route(churn_scores(2_000), playbook, partition_key=DAY)
    channels = _channels()
    report = _run(plan, ledger, channels, playbook=playbook, run_id="run-1")
    decisions = plan["decision"].astype(str).value_counts()
    act_keys = set(plan.loc[plan["decision"] == "act", "idempotency_key"])
    delivered = channels["retention_email"].delivered + channels["crm_task"].delivered
    assert set(delivered) == act_keys and set(delivered.values()) == {1}
    assert report.succeeded == decisions["act"]
    assert report.escalated == decisions["escalate"]
    assert report.held_out == decisions["holdout"]
    assert report.skipped == decisions["skip"]
    assert report.already_done == 0
    summary = ledger.summary(playbook="churn_outreach", partition_key=DAY)
    assert summary.groupby("state")["count"].sum().to_dict() == {
        "succeeded": decisions["act"],
        "escalated": decisions["escalate"],
        "held_out": decisions["holdout"],
        "skipped": decisions["skip"],
    }
    queue = ledger.escalations(playbook="churn_outreach", partition_key=DAY)
    assert len(queue) == decisions["escalate"]
    assert set(queue["reason"]) <= {
        "High-value customer at risk: an account manager should call",
        "The model is unsure about this customer",
    }
    again = _run(plan, ledger, channels, playbook=playbook, run_id="run-2")
    assert again.already_done == len(plan)
    assert again.succeeded == again.escalated == again.held_out == again.skipped == 0
    assert sum(
        (channels["retention_email"].delivered + channels["crm_task"].delivered).values()
    ) == len(act_keys)


def test_transient_failures_are_retried_with_the_same_key(ledger):
    plan = route(churn_scores(300), churn_playbook(max_flagged_fraction=0.9), partition_key=DAY)
    channels = _channels()
    for channel in channels.values():
        channel.behave(fail_first(2, lambda: TransientChannelError("HTTP 429", retry_after=0.001)))
    report = _run(plan, ledger, channels)
    acting = count_true(plan["decision"] == "act")
    assert report.succeeded == acting
    assert report.retries == 2 * acting
    attempts = channels["retention_email"].attempts + channels["crm_task"].attempts
    assert set(attempts.values()) == {3}
    actions = ledger.actions(states=[schema.SUCCEEDED])
    assert set(actions["attempts"]) == {3}


def test_permanent_failures_fail_once_and_are_escalated(ledger):
    plan = route(churn_scores(200), churn_playbook(max_flagged_fraction=0.9), partition_key=DAY)
    channels = _channels(circuit_breaker_threshold=10_000)
    channels["crm_task"].behave(fail_first(99, lambda: PermanentChannelError("HTTP 400: bad task")))
    report = _run(plan, ledger, channels)
    crm = count_true(plan["action"] == "crm_task")
    assert report.failed == crm
    assert set(channels["crm_task"].attempts.values()) == {1}
    queue = ledger.escalations(partition_key=DAY)
    failed = queue[queue["kind"] == "delivery_failed"]
    assert len(failed) == crm
    assert failed["reason"].str.contains("HTTP 400: bad task").all()


def test_an_open_circuit_escalates_the_rest_instead_of_hammering(ledger):
    plan = route(churn_scores(2_000), churn_playbook(max_flagged_fraction=0.9), partition_key=DAY)
    channels = _channels(circuit_breaker_threshold=5, max_attempts=3, max_concurrency=2)
    channels["crm_task"].behave(fail_first(99, lambda: TransientChannelError("connection refused")))
    report = _run(plan, ledger, channels)
    crm = count_true(plan["action"] == "crm_task")
    assert "crm_task" in report.circuit_opened
    assert sum(channels["crm_task"].attempts.values()) < 20  # not crm * max_attempts
    assert (
        report.by_action["crm_task"].get("escalated", 0)
        + report.by_action["crm_task"].get("failed", 0)
        == crm
    )
    states = ledger.actions().query("action == 'crm_task'")["state"]
    assert set(states) <= {schema.ESCALATED, schema.FAILED}
    assert report.by_action["retention_email"]["succeeded"] == int(
        (plan["action"] == "retention_email").sum()
    )


def test_dry_run_sends_nothing_and_does_not_block_the_real_run(ledger):
    plan = route(churn_scores(500), churn_playbook(max_flagged_fraction=0.9), partition_key=DAY)
    channels = _channels()
    dry = _run(plan, ledger, channels, dry_run=True)
    acting = count_true(plan["decision"] == "act")
    assert dry.dry_run and dry.dry_run_actions == acting and dry.succeeded == 0
    assert not channels["crm_task"].delivered and not channels["retention_email"].delivered
    assert ledger.escalations().empty  # dry runs open no real escalations
    real = _run(plan, ledger, channels)
    assert real.succeeded == acting


def test_blast_radius_blocks_the_whole_batch(ledger):
    plan = route(churn_scores(1_000), churn_playbook(), partition_key=DAY)  # about 40% flagged
    channels = _channels()
    playbook = churn_playbook(max_flagged_fraction=0.1)
    report = _run(plan, ledger, channels, playbook=playbook)
    assert report.blocked_reason and "max_flagged_fraction of 10.0%" in report.blocked_reason
    assert not channels["crm_task"].delivered and not channels["retention_email"].delivered
    assert ledger.summary().empty
    queue = ledger.escalations()
    assert (
        len(queue) == 1 and queue.loc[0, "kind"] == "guardrail" and queue.loc[0, "entity_id"] == "*"
    )
    again = _run(plan, ledger, channels, playbook=playbook)
    assert again.blocked_reason and len(ledger.escalations()) == 1


def test_max_actions_blocks_the_batch(ledger):
    plan = route(churn_scores(500), churn_playbook(max_flagged_fraction=0.9), partition_key=DAY)
    channels = _channels()
    report = _run(
        plan, ledger, channels, playbook=churn_playbook(max_flagged_fraction=0.9, max_actions=10)
    )
    assert report.blocked_reason and "max_actions of 10" in report.blocked_reason
    assert not channels["crm_task"].delivered


def test_kill_switch_stops_before_the_first_action_and_resume_continues(ledger):
    plan = route(churn_scores(300), churn_playbook(max_flagged_fraction=0.9), partition_key=DAY)
    channels = _channels()
    ledger.pause(reason="model v3 is broken", by="ana")
    report = _run(plan, ledger, channels)
    assert report.paused_reason and "model v3 is broken" in report.paused_reason
    assert report.pending == count_true(plan["decision"] == "act")
    assert not channels["crm_task"].delivered and ledger.summary().empty
    ledger.resume(by="ana")
    assert _run(plan, ledger, channels).succeeded == report.pending


def test_kill_switch_mid_batch_releases_unsent_actions(ledger_url):
    plan = route(churn_scores(3_000), churn_playbook(max_flagged_fraction=0.9), partition_key=DAY)
    acting = count_true(plan["decision"] == "act")
    channels = _channels(max_concurrency=1)
    sent: list[str] = []
    noticed = threading.Event()
    before_notice: set[str] = set()  # keys of claims that began before the executor saw the pause

    class WatchedLedger(ActionLedger):
        def claim(self, *args: Any, **kwargs: Any) -> Any:
            early = not noticed.is_set()
            claimed: Any = super().claim(*args, **kwargs)
            if early:
                # Claims return keys or work items, depending on the ledger's version.
                before_notice.update(
                    c if isinstance(c, str) else str(getattr(c, "idempotency_key", None) or c.key)
                    for c in claimed
                )
            return claimed

        def pause_reason(self, *args: Any, **kwargs: Any) -> Any:
            reason = super().pause_reason(*args, **kwargs)
            if reason:
                noticed.set()
            return reason

    ledger = WatchedLedger(ledger_url)

    def pause_after_50(request):
        sent.append(request.idempotency_key)
        if len(sent) == 50:
            ledger.pause("churn_outreach", reason="stop now", by="ops")

    for channel in channels.values():
        channel.behave(pause_after_50)
    report = _run(plan, ledger, channels)
    assert report.paused_reason and "stop now" in report.paused_reason
    # Once the executor has seen the pause, nothing it claims afterwards may go out.
    after_pause = set(sent[50:])
    assert after_pause <= before_notice, f"{len(after_pause - before_notice)} claimed late, sent"
    assert len(before_notice) < acting, "the whole batch was claimed before the pause"
    assert report.succeeded == len(sent) >= 50
    assert report.succeeded + report.pending == acting
    states = ledger.state_counts()
    assert states.get(schema.SENDING, 0) == 0
    ledger.resume("churn_outreach", by="ops")
    for channel in channels.values():
        channel.behave(None)
    rest = _run(plan, ledger, channels)
    assert rest.succeeded == report.pending
    delivered = channels["retention_email"].delivered + channels["crm_task"].delivered
    assert len(delivered) == acting


def test_bad_input_has_no_side_effect(ledger):
    plan = route(churn_scores(100), churn_playbook(max_flagged_fraction=0.9), partition_key=DAY)
    with pytest.raises(PlanError, match=r"no channel for action\(s\) 'crm_task' \(rule watch\)"):
        _run(plan, ledger, {"retention_email": RecordingChannel()})
    with pytest.raises(PlanError, match="routed for partition"):
        execute_plan(
            route(
                churn_scores(100), churn_playbook(max_flagged_fraction=0.9), partition_key="other"
            ),
            playbook=churn_playbook(max_flagged_fraction=0.9),
            ledger=ledger,
            channels=_channels(),
            partition_key=DAY,
        )

    class Picky(RecordingChannel):
        def validate_rows(self, rows: pd.DataFrame) -> None:
            raise ChannelConfigError("row C000001: 'not-an-address' is not a valid email address")

    channels = {"retention_email": Picky(), "crm_task": RecordingChannel()}
    with pytest.raises(ChannelConfigError, match="not a valid email address"):
        _run(plan, ledger, channels)
    assert not channels["crm_task"].delivered
    assert ledger.summary().empty and ledger.escalations().empty


def test_at_most_once_in_doubt_actions_are_escalated_not_resent(ledger):
    plan = route(churn_scores(200), churn_playbook(max_flagged_fraction=0.9), partition_key=DAY)
    channels = _channels(delivery="at_most_once")
    keys = plan.loc[plan["decision"] == "act", "idempotency_key"].tolist()
    # Simulate a crash: a worker on this host that no longer exists holds the first 10 claims.
    report = _run(
        plan,
        ledger,
        channels,
        dry_run=False,
        playbook=churn_playbook(max_flagged_fraction=0.9, max_actions=0),
    )
    assert report.blocked_reason  # max_actions=0: nothing reserved yet
    from autoexec_dagster.executor import plan_execution

    keyed = plan_execution.rekey(
        plan, playbook=churn_playbook(max_flagged_fraction=0.9), partition_key=DAY
    )
    keys = keyed.loc[keyed["decision"] == "act", "idempotency_key"].tolist()
    rows = keyed.loc[keyed["decision"] == "act"].head(10)
    ledger.reserve(
        [
            {
                "idempotency_key": r.idempotency_key,
                "playbook": "churn_outreach",
                "playbook_version": keyed.attrs["autoexec"]["playbook_version"],
                "insight": "churn_outreach",
                "partition_key": DAY,
                "entity_id": r.entity_id,
                "rule": str(r.rule),
                "action": str(r.action),
                "decision": "act",
                "state": schema.RESERVED,
                "delivery": "at_most_once",
            }
            for r in rows.itertuples()
        ]
    )
    ledger.claim(keys[:10], worker="gone-host:1:x", lease_seconds=-1, run_id=None)
    report = _run(plan, ledger, channels)
    assert report.in_doubt_recovered == 10
    assert report.escalated >= 10
    delivered = channels["retention_email"].delivered + channels["crm_task"].delivered
    assert not set(keys[:10]) & set(delivered)
    assert len(delivered) == len(keys) - 10
    in_doubt = ledger.escalations().query("kind == 'in_doubt'")
    assert sorted(in_doubt["idempotency_key"]) == sorted(keys[:10])


def test_progress_is_logged_on_long_batches(ledger, caplog):
    plan = route(churn_scores(400), churn_playbook(max_flagged_fraction=0.9), partition_key=DAY)
    channels = _channels(rate_limit_per_second=40, max_concurrency=4)
    seen = []
    with caplog.at_level(logging.INFO, logger="autoexec_dagster"):
        report = _run(
            plan, ledger, channels, progress_interval_seconds=0.1, on_progress=seen.append
        )
    assert report.succeeded == count_true(plan["decision"] == "act")
    # Each channel has ~40 actions: a burst of 40 tokens, then 40/s; the rate limit stretches
    # the batch over several progress intervals.
    assert report.duration_seconds > 0.2
    assert seen and seen[-1].total == report.succeeded
    assert any("actions done" in message for message in caplog.messages)


def test_cooldown_does_not_repeat_an_action_sent_recently_for_another_partition(ledger):
    playbook = churn_playbook(max_flagged_fraction=0.9, cooldown_days=7)
    df = churn_scores(400)
    channels = _channels()
    first = execute_plan(
        route(df, playbook, partition_key="2026-11-23"),
        playbook=playbook,
        ledger=ledger,
        channels=channels,
        partition_key="2026-11-23",
    )
    # The next day flags the same customers plus a few new ones.
    next_day = df.copy()
    newly_flagged = next_day.index[next_day["churn_score"] < 0.5][:10]
    next_day.loc[newly_flagged, ["churn_score", "lifetime_value", "confidence"]] = [0.75, 10.0, 0.9]
    second = execute_plan(
        route(next_day, playbook, partition_key=DAY),
        playbook=playbook,
        ledger=ledger,
        channels=channels,
        partition_key=DAY,
    )
    assert second.cooled_down == first.succeeded
    assert second.succeeded == 10
    assert second.autonomous == second.succeeded + second.cooled_down
    skipped = ledger.actions(partition_key=DAY, states=[schema.SKIPPED]).dropna(subset=["detail"])
    assert len(skipped) == first.succeeded
    assert skipped["detail"].str.startswith("cooldown: ").all()
    assert "not repeated" in second.summary_markdown()


def test_the_sync_entry_points_refuse_a_running_event_loop(ledger):
    import asyncio

    from autoexec_dagster import advance_workflows

    playbook = churn_playbook(max_flagged_fraction=0.9)
    plan = route(churn_scores(10), playbook, partition_key=DAY)

    async def inside() -> None:
        with pytest.raises(RuntimeError, match=r"await execute_plan_async\(\)"):
            execute_plan(plan, playbook=playbook, ledger=ledger, channels=_channels())
        with pytest.raises(RuntimeError, match=r"await advance_workflows_async\(\)"):
            advance_workflows(playbook=playbook, ledger=ledger, channels=_channels())

    asyncio.run(inside())
    assert ledger.summary().empty  # refused before anything was recorded
