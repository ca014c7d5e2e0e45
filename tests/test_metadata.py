"""Reports as Dagster metadata: bounded, plottable, and with personal data masked."""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from sqlalchemy import event

from autoexec_dagster.dagster.metadata import (
    compact_data,
    escalations_frame,
    escalations_metadata,
    escalations_summary,
    mask_emails,
    mask_value,
    open_escalation_counts,
    plan_metadata,
    plan_summary,
    report_metadata,
    table_preview,
)
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.routing import route
from tests.conftest import churn_playbook, churn_scores

PERSONAL = ("email", "name", "phone", "address")


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        ("jane.doe@example.com", "j***@example.com"),
        ("Jane Doe", "J***"),
        ("", ""),
        (None, None),
        (float("nan"), None),
        (4915112345678, "***"),
    ],
)
def test_mask_value(value, masked) -> None:
    assert mask_value(value) == masked


def test_mask_emails_in_free_text() -> None:
    assert (
        mask_emails("bounced: <jane@example.com>, cc bob@mail.example.org")
        == "bounced: <j***@example.com>, cc b***@mail.example.org"
    )


def test_table_preview_is_bounded_masked_and_typed() -> None:
    frame = churn_scores(100).assign(
        note=lambda f: "contact " + f["email"], flag=True, when=pd.Timestamp("2026-11-24")
    )

    preview = table_preview(frame, personal_columns=PERSONAL, max_rows=20)

    assert len(preview.records) == 20
    first = preview.records[0].data
    assert first["email"] == "c***@example.com"
    assert first["name"] == "C***"
    assert first["note"] == "contact c***@example.com"  # e-mails masked in any column
    assert str(first["when"]).startswith("2026-11-24")
    assert isinstance(first["churn_score"], float)
    types = {c.name: c.type for c in preview.schema.columns}
    assert types["churn_score"] == "float" and types["flag"] == "bool"
    assert types["email"] == "string"
    assert "customer0@example.com" not in repr(preview.records)


def test_plan_metadata_counts_every_decision_and_previews_flagged_rows() -> None:
    playbook = churn_playbook(max_flagged_fraction=0.9, holdout_fraction=0.1)
    plan = route(churn_scores(1_000), playbook, partition_key="p1", insight_name="churn_scores")

    metadata = plan_metadata(plan, playbook, max_rows=20)
    summary = plan_summary(plan, playbook)

    counts = plan["decision"].astype(str).value_counts()
    for decision in ("act", "escalate", "holdout", "skip"):
        assert metadata[decision] == summary["by_decision"][decision] == int(counts[decision])
    assert metadata["total"] == metadata["dagster/row_count"] == 1_000
    assert metadata["flagged"] == 1_000 - int(counts["skip"])
    assert metadata["guardrail"].startswith("ok:")
    assert "| vip_at_risk | escalate |" in metadata["by_rule"].value
    records = metadata["preview"].records
    assert len(records) == 20
    assert records[0].data["decision"] == "escalate"
    assert {r.data["decision"] for r in records} <= {"escalate", "act", "holdout"}
    assert "idempotency_key" not in records[0].data
    assert summary["partition_key"] == "p1" and summary["insight"] == "churn_scores"
    json.dumps(summary)  # stored as the asset value: plain data


def test_plan_metadata_warns_when_the_batch_will_be_blocked() -> None:
    playbook = churn_playbook(max_flagged_fraction=0.1)
    plan = route(churn_scores(200), playbook)
    assert "will not be executed" in plan_metadata(plan, playbook)["guardrail"]


def test_report_metadata_is_plottable() -> None:
    report = ExecutionReport(
        playbook="churn_outreach",
        playbook_version="v1",
        insight="churn_scores",
        partition_key="p1",
        total=1_000,
        flagged=400,
        succeeded=380,
        escalated=20,
        retries=7,
        duration_seconds=0.5,
        errors=["HTTP 500 from hook for jane@example.com"],
    )
    report.count("retention_email", "succeeded", 380)

    metadata = report_metadata(report)

    for key in ("total", "flagged", "succeeded", "failed", "escalated", "retries", "pending"):
        assert type(metadata[key]) is int
    assert metadata["autonomy_rate"] == pytest.approx(0.95)
    assert type(metadata["throughput_per_second"]) is float
    assert metadata["status"] == "completed"
    assert metadata["blocked"] is False
    assert "j***@example.com" in metadata["errors"].value
    assert "jane@example.com" not in metadata["errors"].value
    assert metadata["by_action"].value == {"retention_email": {"succeeded": 380}}

    nothing = ExecutionReport(playbook="p", playbook_version="v", insight="i", partition_key="")
    assert "autonomy_rate" not in report_metadata(nothing)

    blocked = ExecutionReport(
        playbook="p", playbook_version="v", insight="i", partition_key="", blocked_reason="too many"
    )
    assert report_metadata(blocked)["status"] == (
        "BLOCKED by a guardrail, nothing was executed: too many"
    )


def test_escalations_are_counted_and_previewed_masked(tmp_path: Path) -> None:
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    rows = [
        {
            "idempotency_key": f"k{i:031d}",
            "playbook": "churn_outreach",
            "playbook_version": "v1",
            "insight": "churn_scores",
            "partition_key": "p1",
            "entity_id": f"C{i}",
            "rule": "vip_at_risk",
            "kind": "rule",
            "reason": "High-value customer at risk",
            "data": {"email": f"customer{i}@example.com", "churn_score": 0.912345, "plan": "pro"},
        }
        for i in range(30)
    ]
    ledger.open_escalations(rows)
    playbook = churn_playbook()

    counts = open_escalation_counts(ledger, playbook="churn_outreach", partition_key="p1")
    summary = escalations_summary(
        playbook=playbook, partition_key="p1", counts=counts, new_in_run=30
    )
    metadata = escalations_metadata(summary, ledger=ledger, playbook=playbook, max_rows=20)

    assert counts == [("rule", "High-value customer at risk", 30)]
    assert metadata["open"] == 30 and metadata["open_rule"] == 30
    records = metadata["preview"].records
    assert len(records) == 20
    assert records[0].data["data"] == "churn_score=0.9123, email=c***@example.com, plan=pro"
    assert len(records[0].data["key"]) == 12
    assert "customer0@example.com" not in repr(records)
    frame = escalations_frame(ledger.escalations(), personal_columns=(), entity_is_personal=True)
    assert frame["entity_id"].iloc[0] == "C***"


def test_compact_data_handles_odd_values() -> None:
    assert compact_data("not json", personal_columns=PERSONAL) == "not json"
    assert compact_data('{"name": "Jane", "x": 1}', personal_columns=PERSONAL) == "name=J***, x=1"
    long = json.dumps({"note": "x" * 500})
    assert len(compact_data(long, personal_columns=PERSONAL)) == 160


def test_preview_copes_with_nullable_and_numpy_values() -> None:
    frame = pd.DataFrame(
        {
            "a": pd.array([1, None], dtype="Int64"),
            "b": np.array([np.nan, 2.5]),
            "c": [np.int64(3), np.int64(4)],
        }
    )
    preview = table_preview(frame, personal_columns=())
    assert [r.data for r in preview.records] == [
        {"a": 1, "b": None, "c": 3},
        {"a": None, "b": 2.5, "c": 4},
    ]
    assert isinstance(preview, dg.TableMetadataValue)


def test_metadata_reads_the_ledger_without_taking_its_write_lock(tmp_path: Path) -> None:
    from autoexec_dagster.dagster.metadata import actions_metadata
    from autoexec_dagster.executor.plan_execution import execute_plan
    from tests.test_execution_assets import Recorder, recording_channels

    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    playbook = churn_playbook(max_flagged_fraction=0.9)
    plan = route(churn_scores(200), playbook, partition_key="p1", insight_name="churn_scores")
    report = execute_plan(
        plan,
        playbook=playbook,
        ledger=ledger,
        channels=recording_channels(Recorder()),
        partition_key="p1",
        insight_name="churn_scores",
    )
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        statements.append(str(statement).strip().upper())

    event.listen(ledger.engine, "before_cursor_execute", record)
    try:
        counts = open_escalation_counts(ledger, playbook="churn_outreach", partition_key="p1")
        summary = escalations_summary(
            playbook=playbook, partition_key="p1", counts=counts, new_in_run=0
        )
        escalations_metadata(summary, ledger=ledger, playbook=playbook)
        actions_metadata(report, ledger=ledger, playbook=playbook)
    finally:
        event.remove(ledger.engine, "before_cursor_execute", record)

    assert statements, "the metadata read nothing from the ledger"
    writes = [s for s in statements if s.startswith(("BEGIN IMMEDIATE", "INSERT", "UPDATE"))]
    assert writes == []
