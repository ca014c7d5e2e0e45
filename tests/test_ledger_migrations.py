"""Migrating a ledger written by an earlier release, in place (issue 6, defect 1).

``tests/data/ledger_v1.sql`` is a real version-1 ledger, dumped from 0.1.0: one day executed under
two playbook versions, so every action of that day was sent twice under two keys.
``tests/data/ledger_v3.sql`` is a real version-3 ledger, written by the release before
experiments (commit e7c9129): one churn day of 60 customers, executed.
"""

import sqlite3
from pathlib import Path

import sqlalchemy as sa

from autoexec_dagster import ActionLedger, execute_plan, route
from autoexec_dagster.ledger import schema
from tests.channel_doubles import RecordingChannel
from tests.conftest import churn_playbook, churn_scores

V1_DUMP = Path(__file__).parent / "data" / "ledger_v1.sql"
V3_DUMP = Path(__file__).parent / "data" / "ledger_v3.sql"


def _v1_ledger(tmp_path: Path, dump: Path = V1_DUMP) -> str:
    path = tmp_path / "ledger.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(dump.read_text())
    return f"sqlite:///{path}"


def _edited(playbook):
    return playbook.model_copy(
        update={
            "rules": [
                playbook.rules[0].model_copy(
                    update={"when": "churn_score >= 0.7 and lifetime_value >= 9000"}
                ),
                *playbook.rules[1:],
            ]
        }
    )


def test_a_v1_ledger_migrates_in_place_and_a_rerun_sends_nothing(tmp_path):
    url = _v1_ledger(tmp_path)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        before = conn.execute(sa.text("SELECT count(*) FROM autoexec_actions")).scalar_one()
        sent_before = conn.execute(
            sa.text("SELECT count(*) FROM autoexec_actions WHERE state = 'succeeded'")
        ).scalar_one()
    engine.dispose()

    ledger = ActionLedger(url)
    assert ledger.schema_version == schema.SCHEMA_VERSION == 5
    with ledger.engine.connect() as conn:
        kept = conn.execute(sa.select(sa.func.count()).select_from(schema.actions)).scalar_one()
        superseded = conn.execute(
            sa.select(sa.func.count()).select_from(schema.superseded_actions)
        ).scalar_one()
    # No record is lost: every version-1 row is kept, or kept aside as superseded.
    assert kept + superseded == before
    assert superseded > 0

    first = churn_playbook(max_flagged_fraction=0.9)
    channels = {"retention_email": RecordingChannel(), "crm_task": RecordingChannel()}
    scores = churn_scores(200)
    for playbook, day in (
        (first, "2026-11-24"),
        (_edited(first), "2026-11-24"),
        (first, "2026-11-25"),
    ):
        report = execute_plan(
            route(scores, playbook, partition_key=day),
            playbook=playbook,
            ledger=ledger,
            channels=channels,
        )
        assert report.succeeded == 0, (playbook.effective_version, day)
        assert report.escalated == 0
    assert sum(sum(ch.delivered.values()) for ch in channels.values()) == 0
    assert sent_before > 0
    # Each case is open once: the second day's repeat escalations keep their own keys.
    queue = ledger.escalations(status=None)
    assert queue["idempotency_key"].is_unique


def test_migrating_twice_is_a_no_op(tmp_path):
    url = _v1_ledger(tmp_path)
    ActionLedger(url).dispose()
    again = ActionLedger(url)
    assert again.schema_version == 5


def test_a_v1_ledger_gains_the_version_3_tables_and_columns(tmp_path):
    ledger = ActionLedger(_v1_ledger(tmp_path))
    inspector = sa.inspect(ledger.engine)
    tables = set(inspector.get_table_names())
    assert {"autoexec_approvals", "autoexec_approval_decisions", "autoexec_suppressions"} <= tables
    columns = {c["name"] for c in inspector.get_columns("autoexec_escalations")}
    assert {"proposed_action", "decided_via"} <= columns
    # The migrated escalations are readable with the new columns empty.
    queue = ledger.escalations(status=None)
    assert not queue.empty
    ledger.dispose()


def test_a_v3_ledger_gains_the_experiment_tables_and_a_rerun_sends_nothing(tmp_path):
    url = _v1_ledger(tmp_path, V3_DUMP)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        version = conn.execute(sa.text("SELECT version FROM autoexec_schema_version")).scalar_one()
        before = conn.execute(sa.text("SELECT count(*) FROM autoexec_actions")).scalar_one()
    engine.dispose()
    assert version == 3 and before > 0

    ledger = ActionLedger(url)
    assert ledger.schema_version == 5
    inspector = sa.inspect(ledger.engine)
    tables = set(inspector.get_table_names())
    assert {
        "autoexec_experiments",
        "autoexec_experiment_assignments",
        "autoexec_experiment_periods",
        "autoexec_experiment_events",
        "autoexec_exposures",
        "autoexec_outcomes",
        "autoexec_budget_spend",
        "autoexec_budget_locks",
    } <= tables
    assert "variant" in {c["name"] for c in inspector.get_columns("autoexec_actions")}
    with ledger.engine.connect() as conn:
        kept = conn.execute(sa.select(sa.func.count()).select_from(schema.actions)).scalar_one()
    assert kept == before
    channels = {"retention_email": RecordingChannel(), "crm_task": RecordingChannel()}
    playbook = churn_playbook(max_flagged_fraction=0.9)
    report = execute_plan(
        route(churn_scores(60), playbook, partition_key="2026-11-24"),
        playbook=playbook,
        ledger=ledger,
        channels=channels,
    )
    assert report.succeeded == 0 and report.already_done > 0
    assert sum(sum(ch.delivered.values()) for ch in channels.values()) == 0
    ledger.dispose()
