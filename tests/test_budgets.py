"""Budgets: at most K actions per entity (or per playbook) within a rolling period, shared by
every playbook and worker that records into one ledger, enforced where actions are reserved."""

import re
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from pydantic import ValidationError

from autoexec_dagster import ActionLedger, Budget, Guardrails, Playbook, Rule, execute_plan, route
from autoexec_dagster.cli import cli
from autoexec_dagster.ledger import schema
from tests.channel_doubles import RecordingChannel
from tests.conftest import churn_scores

CONTACT = Budget(name="customer_contact", max_actions=1, period="7d")


class Clock:
    """The ledger's time, moved by the test."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def _playbook(name: str, *budgets: Budget) -> Playbook:
    return Playbook(
        name=name,
        entity_key="customer_id",
        rules=[Rule(name="at_risk", when="churn_score >= 0.5", action="retention_email")],
        guardrails=Guardrails(max_flagged_fraction=0.9, budgets=list(budgets)),
    )


def _run(playbook: Playbook, ledger: ActionLedger, day: str, channel: RecordingChannel):
    plan = route(churn_scores(300), playbook, partition_key=day)
    return execute_plan(
        plan, playbook=playbook, ledger=ledger, channels={"retention_email": channel}
    )


def _sent_per_entity(*channels: RecordingChannel) -> Counter:
    return Counter(r.entity_id for ch in channels for r in ch.requests)


def test_an_entity_gets_one_action_per_period_over_partitions(tmp_path) -> None:
    clock = Clock()
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)
    playbook = _playbook("churn_outreach", CONTACT)
    channel = RecordingChannel()
    first = _run(playbook, ledger, "2026-11-02", channel)
    assert first.succeeded > 100 and first.over_budget == 0

    clock.now += timedelta(days=1)
    second = _run(playbook, ledger, "2026-11-03", channel)
    assert second.succeeded == 0
    assert second.over_budget == first.succeeded
    assert max(_sent_per_entity(channel).values()) == 1
    with ledger.engine.connect() as conn:
        details = conn.execute(
            sa.select(schema.actions.c.state, schema.actions.c.detail).where(
                schema.actions.c.partition_key == "2026-11-03",
                schema.actions.c.decision == "act",
            )
        ).all()
    assert {state for state, _ in details} == {"skipped"}
    assert all(
        detail.startswith(
            "budget: customer_contact (at most 1 action per entity in 7d): 1 "
            "already spent by entity C"
        )
        for _, detail in details
    )
    outcome = ledger.partition_outcome(playbook="churn_outreach", partition_key="2026-11-03")
    assert outcome.over_budget == second.over_budget and outcome.succeeded == 0
    shown = CliRunner().invoke(
        cli,
        [
            "summary",
            "--ledger",
            f"sqlite:///{tmp_path / 'ledger.db'}",
            "--playbook",
            "churn_outreach",
        ],
        catch_exceptions=False,
    )
    assert re.search(rf"of which over a budget\s+{second.over_budget:,}", shown.output), (
        shown.output
    )
    # A re-run sends nothing and spends nothing.
    again = _run(playbook, ledger, "2026-11-03", channel)
    assert again.succeeded == again.over_budget == 0
    assert sum(ledger.budget_spend("customer_contact").values()) == first.succeeded

    # Once the period has passed, the entities may be contacted again.
    clock.now += timedelta(days=7)
    later = _run(playbook, ledger, "2026-11-10", channel)
    assert later.succeeded == first.succeeded and later.over_budget == 0


def test_a_playbook_budget_caps_its_actions_per_day(tmp_path) -> None:
    clock = Clock()
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)
    daily = Budget(name="daily_sends", max_actions=25, period="1d", per="playbook")
    playbook = _playbook("churn_outreach", daily)
    channel = RecordingChannel()
    report = _run(playbook, ledger, "2026-11-02", channel)
    assert report.succeeded == 25
    assert report.over_budget > 0
    assert ledger.budget_spend("daily_sends") == {"churn_outreach": 25}
    assert "not sent: a budget was spent" in report.summary_markdown()


def test_budgets_only_limit_the_actions_they_name(tmp_path) -> None:
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=Clock())
    playbook = Playbook(
        name="churn_outreach",
        entity_key="customer_id",
        rules=[
            Rule(name="at_risk", when="churn_score >= 0.7", action="retention_email"),
            Rule(name="watch", when="churn_score >= 0.5", action="crm_task"),
        ],
        guardrails=Guardrails(
            max_flagged_fraction=0.9,
            budgets=[
                Budget(name="emails", max_actions=3, per="playbook", actions=["retention_email"])
            ],
        ),
    )
    email, crm = RecordingChannel(), RecordingChannel()
    plan = route(churn_scores(300), playbook, partition_key="2026-11-02")
    report = execute_plan(
        plan, playbook=playbook, ledger=ledger, channels={"retention_email": email, "crm_task": crm}
    )
    assert len(email.requests) == 3
    assert len(crm.requests) == int((plan["action"] == "crm_task").sum()) > 3
    assert report.by_action["retention_email"]["over_budget"] > 0
    assert "over_budget" not in report.by_action["crm_task"]


@pytest.mark.postgres
def test_playbooks_and_partitions_racing_never_exceed_a_per_entity_budget(postgres_url) -> None:
    """Four workers (two playbooks x two partitions), each with its own ledger connection pool,
    reserve the same customers at once; the shared budget allows one action per customer."""
    playbooks = [_playbook("churn_outreach", CONTACT), _playbook("winback", CONTACT)]
    jobs = [(pb, day) for pb in playbooks for day in ("2026-11-02", "2026-11-03")]
    channels = [RecordingChannel() for _ in jobs]
    ledgers = [ActionLedger(postgres_url) for _ in jobs]
    start = threading.Barrier(len(jobs))
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            start.wait(timeout=30)
            playbook, day = jobs[i]
            _run(playbook, ledgers[i], day, channels[i])
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    flagged = set(
        route(churn_scores(300), playbooks[0], partition_key="x")
        .query("decision == 'act'")["entity_id"]
        .astype(str)
    )
    sent = _sent_per_entity(*channels)
    assert set(sent) == flagged  # every flagged customer got its one action ...
    assert max(sent.values()) == 1  # ... and none got two
    assert sum(len(ch.requests) for ch in channels) == len(flagged)
    spend = ledgers[0].budget_spend("customer_contact")
    assert spend == {entity: 1 for entity in flagged}
    for ledger in ledgers:
        ledger.dispose()


def test_bad_budgets_are_refused_when_the_playbook_loads() -> None:
    with pytest.raises(ValidationError, match="budget period: 'soon' is not a duration"):
        Budget(name="b", max_actions=1, period="soon")
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        Budget(name="b", max_actions=0)
    with pytest.raises(ValidationError, match=r"budget names must be unique .*\['b'\]"):
        Guardrails(budgets=[Budget(name="b", max_actions=1), Budget(name="b", max_actions=2)])
    with pytest.raises(
        ValidationError, match=r"budget 'b' limits action\(s\) \['sms'\] that no rule"
    ):
        Playbook(
            name="p",
            entity_key="id",
            rules=[Rule(name="r", when="score > 1", action="email")],
            guardrails=Guardrails(budgets=[Budget(name="b", max_actions=1, actions=["sms"])]),
        )


def test_budgets_load_from_a_yaml_playbook(tmp_path) -> None:
    path = tmp_path / "playbook.yaml"
    path.write_text(
        """
name: churn_outreach
entity_key: customer_id
rules:
  - {name: at_risk, when: "churn_score >= 0.7", action: retention_email}
guardrails:
  budgets:
    - {name: customer_contact, max_actions: 1, period: 7d, actions: [retention_email]}
    - {name: daily_sends, max_actions: 5000, period: 1d, per: playbook}
"""
    )
    playbook = Playbook.from_yaml(path)
    contact, daily = playbook.guardrails.budgets
    assert contact.window == timedelta(days=7) and contact.limits("retention_email")
    assert not contact.limits("crm_task")
    assert daily.describe() == "at most 5,000 actions per playbook in 1d"
