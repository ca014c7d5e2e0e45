"""The real ``dagster-daemon`` drives the execution layer: new partitions in, recorded actions out.

Two ``churn_scores`` partitions are materialized before the daemon starts; with the execution
sensor running (``AUTOEXEC_SENSOR_STATUS=running``, 5 s interval) its first tick must launch
exactly one run per partition, both runs must succeed and deliver through the real SMTP sink and
CRM receiver, and the next tick must launch nothing.

A second test runs the workflow story under the daemon: a host insight partition lands, the
insight sensor's run starts the workflows, and the workflow sensor's runs advance them through a
2 s poll to the end; the partition's actions asset records each step of the progress.
"""

import time
from pathlib import Path

import dagster as dg
import pytest

from autoexec_dagster import ActionLedger
from resources.local_receivers import CrmReceiver, SmtpSink
from tests.e2e_support import (
    BIN_DIR,
    SECRET,
    Deployment,
    instance_at,
    start_process,
    stop_process,
    train_and_score,
    wait_for,
)

pytestmark = pytest.mark.slow

DAYS = ("2026-11-02", "2026-11-03")
SENSOR = "churn_outreach_sensor"
JOB = "churn_outreach_execution_job"
RUNS_TIMEOUT = 240.0


def _sensor_ticks(instance: dg.DagsterInstance) -> list:
    """The execution sensor's completed ticks, oldest first ([] before its first tick)."""
    states = [s for s in instance.all_instigator_state() if s.instigator_name == SENSOR]
    ticks = [
        tick
        for state in states
        for tick in instance.get_ticks(state.instigator_origin_id, state.selector_id)
        if tick.is_completed
    ]
    return sorted(ticks, key=lambda tick: tick.timestamp)


def _flagged(instance: dg.DagsterInstance, day: str) -> int:
    """The flagged count churn_scores recorded for a day."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("churn_scores"), asset_partitions=[day]),
        limit=1,
    ).records
    materialization = records[0].asset_materialization
    assert materialization is not None
    value = materialization.metadata["flagged"].value
    assert isinstance(value, int)
    return value


def test_daemon_sensor_launches_one_run_per_new_partition(tmp_path: Path) -> None:
    deployment = Deployment.create(tmp_path)
    log = tmp_path / "daemon.log"
    with (
        SmtpSink(deployment.mailbox) as sink,
        CrmReceiver(SECRET, deployment.crm_db) as crm,
        instance_at(deployment.home) as instance,
    ):
        train_and_score(instance, DAYS)
        flagged = {day: _flagged(instance, day) for day in DAYS}
        assert all(n > 0 for n in flagged.values()), flagged

        env = deployment.env(
            smtp_port=sink.port,
            crm_url=crm.url,
            AUTOEXEC_SENSOR_STATUS="running",
            AUTOEXEC_SENSOR_INTERVAL_SECONDS="5",
        )
        daemon = start_process(
            [str(BIN_DIR / "dagster-daemon"), "run", "-w", "workspace.yaml"], env=env, log=log
        )
        try:

            def finished_runs() -> list[dg.DagsterRun] | None:
                runs = instance.get_runs(dg.RunsFilter(job_name=JOB))
                done = [r for r in runs if r.is_finished]
                return done if len(done) >= len(DAYS) else None

            runs = wait_for(
                finished_runs,
                timeout=RUNS_TIMEOUT,
                what=f"{len(DAYS)} finished {JOB} runs",
                alive=daemon,
                log=log,
            )
            assert sorted(r.tags.get("dagster/partition", "") for r in runs) == list(DAYS)
            assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), [
                (r.run_id, r.status) for r in runs
            ]
            assert {r.tags.get("dagster/sensor_name") for r in runs} == {SENSOR}

            ticks = _sensor_ticks(instance)
            launching = [t for t in ticks if t.run_ids]
            assert len(launching) == 1, [(t.status, t.run_ids) for t in ticks]
            assert sorted(launching[0].run_ids) == sorted(r.run_id for r in runs)

            # A tick completed after the launching one sees no new materialization.
            later = wait_for(
                lambda: (
                    [t for t in _sensor_ticks(instance) if t.timestamp > ticks[-1].timestamp]
                    or None
                ),
                timeout=60,
                what="a further completed sensor tick",
                alive=daemon,
                log=log,
            )
            assert all(not t.run_ids for t in later), [(t.status, t.run_ids) for t in later]
            assert len(instance.get_runs(dg.RunsFilter(job_name=JOB))) == len(DAYS)
        finally:
            stop_process(daemon)

        ledger = ActionLedger(deployment.ledger_url)
        try:
            summary = ledger.summary(playbook="churn_outreach")
            escalations = ledger.escalations(playbook="churn_outreach", status=None)
        finally:
            ledger.dispose()
        for day in DAYS:
            recorded = summary[(summary["partition_key"] == day) & (summary["decision"] != "skip")]
            assert int(recorded["count"].sum()) == flagged[day]
        assert set(escalations["partition_key"]) <= set(DAYS)
        succeeded = summary[summary["state"] == "succeeded"].groupby("action")["count"].sum()
        assert int(succeeded.get("retention_email", 0)) > 0
        assert int(succeeded.get("crm_task", 0)) > 0
        assert not (summary["state"].isin(["failed", "reserved", "sending", "in_doubt"])).any()
        # Each delivered action reached its receiver exactly once.
        assert sink.deliveries == len(sink.mailbox_files()) == int(succeeded["retention_email"])
        assert crm.task_count() == int(succeeded["crm_task"])
        assert crm.counts["duplicates"] == 0 and crm.counts["rejected"] == 0


# -- workflows ----------------------------------------------------------------------------------

WORKFLOW_PLAYBOOK = "daemon_hosts"
WORKFLOW_JOB = f"{WORKFLOW_PLAYBOOK}_execution_job"
WORKFLOW_SENSOR = f"{WORKFLOW_PLAYBOOK}_workflows_sensor"
WORKFLOW_TIMEOUT = 240.0
# The test playbook's health check is healthy on its third poll.
HEALTHY_POLLS = 3


def _actions_metadata(instance: dg.DagsterInstance, partition: str) -> list[dict]:
    """Metadata of every materialization of the partition's actions asset, oldest first."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=dg.AssetKey([WORKFLOW_PLAYBOOK, "actions"]), asset_partitions=[partition]
        ),
        limit=100,
        ascending=True,
    ).records
    found = []
    for record in records:
        materialization = record.asset_materialization
        assert materialization is not None
        found.append({k: v.value for k, v in materialization.metadata.items()})
    return found


def test_daemon_sensors_start_workflows_and_advance_them_through_a_poll(tmp_path: Path) -> None:
    import os

    from tests import workflow_daemon_defs as app

    deployment = Deployment.create(tmp_path)
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        "load_from:\n"
        "  - python_file:\n"
        f"      relative_path: {Path(app.__file__).resolve()}\n"
        f"      working_directory: {Path(__file__).resolve().parents[1]}\n"
        "      location_name: workflows\n"
    )
    log = tmp_path / "daemon.log"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(deployment.home),
        "AUTOEXEC_LEDGER_URL": deployment.ledger_url,
    }
    with instance_at(deployment.home) as instance:
        landed = dg.materialize(
            [app.daemon_host_anomalies], instance=instance, partition_key=app.PARTITION
        )
        assert landed.success
        started = time.monotonic()
        daemon = start_process(
            [str(BIN_DIR / "dagster-daemon"), "run", "-w", str(workspace)], env=env, log=log
        )
        try:
            ledger = ActionLedger(deployment.ledger_url)

            def all_succeeded() -> dict | None:
                counts = ledger.instance_counts(playbook=WORKFLOW_PLAYBOOK)
                if counts.get("succeeded", 0) != app.HOSTS:
                    return None
                runs = instance.get_runs(dg.RunsFilter(job_name=WORKFLOW_JOB))
                return counts if all(r.is_finished for r in runs) else None

            counts = wait_for(
                all_succeeded,
                timeout=WORKFLOW_TIMEOUT,
                what=f"{app.HOSTS} workflow instances succeeded and their runs finished",
                alive=daemon,
                log=log,
            )
            elapsed = time.monotonic() - started
        finally:
            stop_process(daemon)

        assert counts == {"succeeded": app.HOSTS}
        runs = instance.get_runs(dg.RunsFilter(job_name=WORKFLOW_JOB), ascending=True)
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), [
            (r.run_id, r.status) for r in runs
        ]
        sensors = [r.tags.get("dagster/sensor_name") for r in runs]
        # The insight sensor started the workflows; the workflow sensor advanced them.
        assert sensors[0] == f"{WORKFLOW_PLAYBOOK}_sensor"
        assert sensors.count(f"{WORKFLOW_PLAYBOOK}_sensor") == 1
        assert sensors.count(WORKFLOW_SENSOR) >= HEALTHY_POLLS - 1
        assert all(r.tags.get("dagster/partition") == app.PARTITION for r in runs)

        history = _actions_metadata(instance, app.PARTITION)
        assert len(history) == len(runs) >= HEALTHY_POLLS
        first, last = history[0], history[-1]
        assert first["workflows_started"] == app.HOSTS
        assert first["workflows_waiting"] == app.HOSTS and first["workflows_succeeded"] == 0
        assert first["workflows_waiting_until"] != "-"
        assert last["workflows_succeeded"] == app.HOSTS and last["workflows_waiting"] == 0
        assert last["workflows_waiting_until"] == "-"
        assert last["autonomy_rate"] == 1.0
        # Succeeded counts only grow from one materialization to the next.
        succeeded = [m["workflows_succeeded"] for m in history]
        assert succeeded == sorted(succeeded)

    # Each host was polled until its third attempt, once per attempt, spaced by `every`.
    steps = ledger.actions(playbook=WORKFLOW_PLAYBOOK, states=["succeeded"])
    polls = steps[steps["step"] == "verify"].groupby("entity_id").size()
    assert polls.to_dict() == {f"web-{i:02d}": HEALTHY_POLLS for i in range(app.HOSTS)}
    ledger.dispose()
    print(f"\nworkflow daemon test: {len(runs)} runs, all instances succeeded in {elapsed:.1f} s")
