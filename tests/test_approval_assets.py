"""The ``<playbook>/approvals`` asset and the approval SLA check, in real Dagster runs."""

from datetime import timedelta
from pathlib import Path

import dagster as dg

from tests.test_execution_assets import make_project, materializations
from tests.test_workflows_approvals import DAY, START, Clock, Suppliers, shortages, stock_playbook


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    found = {}
    for event in result.all_events:
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            assert isinstance(evaluation, dg.AssetCheckEvaluation)
            found[evaluation.check_name] = evaluation
    return found


def run(built, partition: str) -> dg.ExecuteInProcessResult:
    job = built.defs.resolve_job_def("stock_execution_job")
    return job.execute_in_process(
        partition_key=partition, instance=built.instance, raise_on_error=False
    )


def project(tmp_path: Path):
    suppliers = Suppliers()
    channels = {a: suppliers.channel(a) for a in ("draft_po", "submit_po", "approver_email")}
    playbook = stock_playbook(sla="1d")
    built = make_project(
        tmp_path, {DAY: shortages()}, playbook=playbook, channels=channels, partition_keys=[DAY]
    )
    clock = Clock(START)
    built.ledger.clock = clock
    built.materialize_insight(DAY)
    return built, clock, suppliers


def test_a_run_materializes_the_partitions_approvals_and_checks_the_sla(tmp_path: Path) -> None:
    built, clock, suppliers = project(tmp_path)
    result = run(built, DAY)
    assert result.success
    approvals = materializations(result)["stock/approvals"]
    assert approvals["pending"] == 2 and approvals["pending_value"] == 18_000.0
    assert approvals["approved_by_rule"] == 2 and approvals["approved_by_rule_value"] == 1_500.0
    assert approvals["approved_by_people"] == 0 and approvals["sla_overdue"] == 0
    checks = check_results(result)
    assert checks["stock_approval_sla"].passed

    # A day later nobody has decided: the instances are due at their SLA, and the run warns.
    clock.advance(timedelta(days=1, minutes=1))
    assert [p for p, _, _ in built.ledger.due_partitions(playbook="stock")] == [DAY]
    late = run(built, DAY)
    warned = check_results(late)["stock_approval_sla"]
    assert not warned.passed and warned.severity == dg.AssetCheckSeverity.WARN
    assert materializations(late)["stock/approvals"]["sla_overdue"] == 2

    # People decide; the next run shows them as decided by people.
    pending = built.ledger.pending_approvals(playbook="stock")
    built.ledger.approve(pending["approval_id"].tolist(), by="procurement", via="cli")
    done = run(built, DAY)
    after = materializations(done)["stock/approvals"]
    assert after["pending"] == 0 and after["approved_by_people"] == 2
    assert after["approved_by_people_value"] == 18_000.0
    assert check_results(done)["stock_approval_sla"].passed
    assert sorted(suppliers.sent("submit_po")) == ["a", "b", "c", "d"]
