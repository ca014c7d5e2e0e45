"""Assignment: sticky per entity when weights change, holdout stable on every partition, the
variant's overrides applied to what is sent (a real SMTP exchange), period weights recorded."""

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from autoexec_dagster import (
    ActionLedger,
    ActionRequest,
    EmailChannel,
    Experiment,
    Guardrails,
    Playbook,
    PythonChannel,
    Rule,
    execute_plan,
    route,
)
from autoexec_dagster.ledger.experiment_store import ExperimentUpdate
from tests.receivers import SmtpSink

SUBJECTS = {
    "calm": "A note for {{ name }}",
    "urgent": "{{ name }}, act now",
    "kind": "Hi {{ name }}",
}


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 1, 9, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def playbook(variants: dict[str, dict[str, Any]], **fields: Any) -> Playbook:
    experiment = Experiment(
        name="tone", variants=variants, control=next(iter(variants)), metric="clicked", **fields
    )
    return Playbook(
        name="outreach",
        entity_key="customer_id",
        rules=[Rule(name="flagged", when="score >= 0.5", action="mail", experiment=experiment)],
        guardrails=Guardrails(holdout_fraction=0.1, max_flagged_fraction=1.0, max_actions=None),
    )


def insight(ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": ids,
            "score": 0.9,
            "name": [f"N{i}" for i in ids],
            "email": [f"{i}@example.com" for i in ids],
        }
    )


class Recorder:
    def __init__(self) -> None:
        self.sent: dict[tuple[str, str], str | None] = {}

    def __call__(self, request: ActionRequest) -> str:
        self.sent[(request.partition_key, request.entity_id)] = request.variant
        return "ok"


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[ActionLedger]:
    # SQLite, and PostgreSQL where it runs (the ledger_url fixture skips it elsewhere).
    led = ActionLedger(ledger_url, clock=Clock())
    yield led
    led.dispose()


def execute(book: Playbook, ledger: ActionLedger, ids: list[str], day: str, rec: Recorder) -> None:
    report = execute_plan(
        route(insight(ids), book, partition_key=day),
        playbook=book,
        ledger=ledger,
        channels={"mail": PythonChannel.from_callable(rec)},
    )
    assert report.failed == 0


def test_no_entity_changes_variant_when_the_weights_change(ledger: ActionLedger) -> None:
    variants = {v: {"permanent_errors": [v]} for v in ("calm", "urgent", "kind")}
    book = playbook(variants)
    rec = Recorder()
    first = [f"c{i}" for i in range(3_000)]
    execute(book, ledger, first, "2026-11-01", rec)
    state = ledger.experiment_state("outreach", "tone")
    assert state is not None
    # Weights move hard towards one variant, as Thompson sampling would after a strong signal.
    moved = {"calm": 0.05, "urgent": 0.9, "kind": 0.05}
    assert ledger.save_experiment_update(
        playbook="outreach",
        experiment="tone",
        revision=state.revision,
        update=ExperimentUpdate(
            weights=moved,
            weights_reason="test",
            status=state.status,
            winner=None,
            variant_status=state.variant_status,
        ),
    )
    second = first[:2_000] + [f"n{i}" for i in range(3_000)]
    execute(book, ledger, second, "2026-11-02", rec)

    day1 = {e: v for (p, e), v in rec.sent.items() if p == "2026-11-01"}
    day2 = {e: v for (p, e), v in rec.sent.items() if p == "2026-11-02"}
    again = set(day1) & set(day2)
    assert len(again) > 1_500
    assert all(day1[e] == day2[e] for e in again)
    # New entities follow the new weights: about 90% urgent.
    newcomers = [v for e, v in day2.items() if e.startswith("n")]
    share = newcomers.count("urgent") / len(newcomers)
    assert 0.87 < share < 0.93
    # And the first period's entities were drawn evenly under its own weights.
    firsts = list(day1.values())
    assert all(0.30 < firsts.count(v) / len(firsts) < 0.37 for v in variants)
    weights = ledger.period_weights("outreach", "tone")
    assert weights["2026-11-02"] == moved
    assert weights["2026-11-01"] == pytest.approx(dict.fromkeys(variants, 1 / 3))


def test_holdout_membership_is_the_same_on_every_partition(ledger: ActionLedger) -> None:
    book = playbook({v: {"permanent_errors": [v]} for v in ("calm", "urgent")})
    rec = Recorder()
    ids = [f"c{i}" for i in range(4_000)]
    for day in ("2026-11-01", "2026-11-02", "2026-11-03"):
        execute(book, ledger, ids, day, rec)
    exposures = ledger.exposures_frame("outreach")
    held = {
        day: set(frame.loc[frame["arm"] == "holdout", "entity_id"])
        for day, frame in exposures.groupby("partition_key")
    }
    assert len(held) == 3
    assert held["2026-11-01"] == held["2026-11-02"] == held["2026-11-03"]
    assert 0.08 < len(held["2026-11-01"]) / len(ids) < 0.12
    # Nobody held out was sent anything, on any day.
    assert not any(e in held["2026-11-01"] for (_p, e) in rec.sent)


def test_a_promoted_winner_is_sent_to_everyone_outside_the_holdout(ledger: ActionLedger) -> None:
    book = playbook({v: {"permanent_errors": [v]} for v in ("calm", "urgent")})
    rec = Recorder()
    execute(book, ledger, [f"c{i}" for i in range(500)], "2026-11-01", rec)
    state = ledger.experiment_state("outreach", "tone")
    assert state is not None
    ledger.save_experiment_update(
        playbook="outreach",
        experiment="tone",
        revision=state.revision,
        update=ExperimentUpdate(
            weights={"calm": 0.0, "urgent": 1.0},
            weights_reason="urgent promoted",
            status="promoted",
            winner="urgent",
            variant_status={"calm": "archived", "urgent": "promoted"},
        ),
    )
    execute(book, ledger, [f"c{i}" for i in range(500)], "2026-11-02", rec)
    day2 = [v for (p, _e), v in rec.sent.items() if p == "2026-11-02"]
    assert day2 and set(day2) == {"urgent"}
    # After the decision, exposures no longer count in the experiment's analysis.
    exposures = ledger.exposures_frame("outreach")
    later = exposures[
        (exposures["partition_key"] == "2026-11-02") & (exposures["arm"] != "holdout")
    ]
    assert set(later["experiment"]) == {""}


def test_each_email_carries_its_variants_subject_over_real_smtp(ledger: ActionLedger) -> None:
    variants = {name: {"subject": subject} for name, subject in SUBJECTS.items()}
    book = playbook(variants)
    with SmtpSink() as sink:
        channel = EmailChannel(
            host="127.0.0.1",
            port=sink.port,
            sender="Care <care@example.com>",
            to_column="email",
            subject="(the variant sets this)",
            template="Hello {{ name }}",
            timeout_seconds=5,
        )
        ids = [f"c{i}" for i in range(300)]
        report = execute_plan(
            route(insight(ids), book, partition_key="2026-11-01"),
            playbook=book,
            ledger=ledger,
            channels={"mail": channel},
        )
        assert sink.wait_for_messages(report.succeeded)
        mails = sink.messages
    assert report.succeeded == len(mails) > 200
    recorded = ledger.assignments_frame("outreach", "tone").set_index("entity_id")["variant"]
    for mail in mails:
        entity = mail.recipients[0].split("@")[0]
        expected = SUBJECTS[recorded[entity]].replace("{{ name }}", f"N{entity}")
        assert mail.message["Subject"] == expected
    assert {recorded[m.recipients[0].split("@")[0]] for m in mails} == set(SUBJECTS)


def test_assignment_is_deterministic_for_an_entity(tmp_path: Path) -> None:
    book = playbook({v: {"permanent_errors": [v]} for v in ("calm", "urgent", "kind")})
    picks = []
    for run in range(2):
        led = ActionLedger(f"sqlite:///{tmp_path / f'l{run}.db'}", clock=Clock())
        rec = Recorder()
        execute(book, led, [f"c{i}" for i in range(200)], "2026-11-01", rec)
        picks.append(rec.sent)
        led.dispose()
    assert picks[0] == picks[1]


def test_a_partition_finished_before_the_experiment_started_is_not_assigned_on_a_rerun(
    ledger: ActionLedger,
) -> None:
    variants = {v: {"permanent_errors": [v]} for v in ("calm", "urgent")}
    with_experiment = playbook(variants)
    plain = with_experiment.model_copy(
        update={"rules": [Rule(name="flagged", when="score >= 0.5", action="mail")]}
    )
    rec = Recorder()
    ids = [f"c{i}" for i in range(300)]
    execute(plain, ledger, ids, "2026-11-01", rec)
    sent = len(rec.sent)
    execute(with_experiment, ledger, ids, "2026-11-01", rec)
    assert len(rec.sent) == sent
    assert ledger.assignments_frame("outreach", "tone").empty
    # The next partition is the experiment's first.
    execute(with_experiment, ledger, ids, "2026-11-02", rec)
    assert len(ledger.assignments_frame("outreach", "tone")) == len(
        [1 for (p, _e) in rec.sent if p == "2026-11-02"]
    )
