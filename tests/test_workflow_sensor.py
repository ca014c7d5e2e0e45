"""The workflow sensor and the workflow metadata: due work becomes runs, runs show the progress.

A small host playbook (isolate, then poll health until healthy) runs against a real SQLite
ledger whose clock the test moves. The execution job is run in process as the daemon would run
the sensor's requests; the sensor is evaluated with ``build_sensor_context``.
"""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from autoexec_dagster import ActionLedger, Playbook, PythonChannel, Rule, Step, Workflow
from autoexec_dagster.channels.base import ActionRequest
from autoexec_dagster.dagster.defs_factory import build_execution_defs
from autoexec_dagster.dagster.ledger_resource import FileClock, LedgerHandle
from autoexec_dagster.dagster.workflow_sensor import WORKFLOW_BATCH_TAG, due_batch
from autoexec_dagster.errors import LedgerError
from autoexec_dagster.playbook import Guardrails
from tests.test_execution_assets import materializations

PLAYBOOK = "hosts"
INSIGHT = "host_scores"
JOB = f"{PLAYBOOK}_execution_job"
SENSOR = f"{PLAYBOOK}_workflows_sensor"
START = datetime(2026, 12, 1, 10, 5, tzinfo=UTC)
EVERY = timedelta(seconds=30)
# Hosts whose health check never turns healthy: their poll times out and they are escalated.
BROKEN = frozenset({"h003"})


class Clock:
    """The ledger's clock, moved by the test."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def host_playbook() -> Playbook:
    return Playbook(
        name=PLAYBOOK,
        entity_key="host_id",
        rules=[Rule(name="anomalous", when="score >= 0.8", workflow="remediate")],
        workflows={
            "remediate": Workflow(
                steps=[
                    Step(name="diagnose", action="diagnose"),
                    Step(
                        name="verify",
                        action="health",
                        until="`verify.status` == 'healthy'",
                        every="30s",
                        timeout="90s",
                    ),
                ],
                on_failure="The host did not recover",
            )
        },
        personal_columns=("email",),
        guardrails=Guardrails(max_flagged_fraction=1.0),
    )


def diagnose(request: ActionRequest) -> dict[str, Any]:
    return {"cause": "service_hung", "email": f"oncall-{request.entity_id}@example.com"}


def health(request: ActionRequest) -> dict[str, Any]:
    # The step attempt travels with the request: healthy from the third poll on.
    healthy = request.entity_id not in BROKEN and int(request.data["attempt"]) >= 3
    return {"status": "healthy" if healthy else "degraded"}


def hosts_frame(n: int = 6) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "host_id": [f"h{i:03d}" for i in range(n)],
            "score": [0.9 if i % 2 else 0.95 for i in range(n)],
            "email": [f"owner{i}@example.com" for i in range(n)],
        }
    )


class HostProject:
    """A user project with a partitioned host insight and the execution layer over it."""

    def __init__(self, tmp_path: Path, *, playbook: Playbook | None = None) -> None:
        self.clock = Clock(START)
        self.ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=self.clock)
        self.playbook = playbook or host_playbook()
        partitions = dg.StaticPartitionsDefinition(["p1", "p2"])

        @dg.asset(name=INSIGHT, partitions_def=partitions)
        def host_scores() -> pd.DataFrame:
            return hosts_frame()

        self.insight = host_scores
        self.defs = dg.Definitions.merge(
            dg.Definitions(
                assets=[host_scores],
                resources={"io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))},
            ),
            build_execution_defs(
                insight=host_scores,
                playbook=self.playbook,
                channels={
                    "diagnose": PythonChannel.from_callable(diagnose),
                    "health": PythonChannel.from_callable(health),
                },
                ledger=self.ledger,
            ),
        )
        self.instance = dg.DagsterInstance.ephemeral()
        self.io_dir = tmp_path / "io"

    def materialize(self, partition: str) -> None:
        result = dg.materialize(
            [self.insight],
            partition_key=partition,
            instance=self.instance,
            resources={"io_manager": dg.FilesystemIOManager(base_dir=str(self.io_dir))},
        )
        assert result.success

    def run(self, partition: str, tags: dict[str, str] | None = None) -> dict[str, Any]:
        result = self.defs.resolve_job_def(JOB).execute_in_process(
            partition_key=partition, instance=self.instance, tags=tags
        )
        assert result.success
        return materializations(result)

    def skip_message(self) -> str:
        """The skip reason of a tick that requests nothing."""
        result = self.tick()
        assert not result.run_requests
        assert result.skip_reason is not None
        return str(result.skip_reason.skip_message)

    def tick(self) -> dg.SensorResult:
        sensor = self.defs.resolve_sensor_def(SENSOR)
        context = dg.build_sensor_context(instance=self.instance, definitions=self.defs)
        result = sensor(context)
        assert isinstance(result, dg.SensorResult)
        return result


def test_due_work_becomes_one_run_per_partition_and_runs_show_the_progress(
    tmp_path: Path,
) -> None:
    project = HostProject(tmp_path)
    project.materialize("p1")

    first = project.run("p1")["hosts/actions"]

    assert first["workflows_started"] == 6
    assert first["workflows_waiting"] == 6 and first["workflows_succeeded"] == 0
    assert first["workflows_waiting_until"] == (START + EVERY).isoformat()
    assert "| verify | 0 | 6 | 6 | 0 | 0 |" in first["workflows_by_step"]
    preview = first["workflows_preview"]
    assert len(preview.records) == 6
    row = preview.records[0].data
    assert row["state"] == "waiting" and row["step"] == "verify"
    assert row["last_outcome"] == "verify: succeeded (attempt 1)"
    # Output fields named like personal columns are masked in the preview.
    assert "diagnose.cause=service_hung" in row["outputs"]
    assert "example.com" in row["outputs"] and "oncall-" not in row["outputs"]

    # Nothing is due before the poll interval has passed.
    assert f"next due at {(START + EVERY).isoformat()}" in project.skip_message()

    project.clock.now = START + EVERY
    due = project.tick()
    requests = due.run_requests or []
    batch = due_batch(playbook=PLAYBOOK, partition_key="p1", earliest_due=START + EVERY)
    assert [(r.partition_key, r.run_key) for r in requests] == [("p1", batch)]
    assert requests[0].tags[WORKFLOW_BATCH_TAG] == batch
    # A tick evaluated again names the same batch (Dagster drops the repeated run key).
    assert [r.run_key for r in project.tick().run_requests or []] == [batch]

    # The requested run re-materializes the partition with no new insight materialization.
    second = project.run("p1", tags=dict(requests[0].tags))["hosts/actions"]
    assert second["run_already_done"] == 6 and second["run_succeeded"] == 0
    assert second["run_workflow_steps_delivered"] == 6
    assert second["workflows_waiting"] == 6
    assert second["workflows_waiting_until"] == (START + 2 * EVERY).isoformat()

    project.clock.now = START + 2 * EVERY
    [request] = project.tick().run_requests or []
    assert request.run_key != batch
    third = project.run("p1", tags=dict(request.tags))

    actions = third["hosts/actions"]
    assert actions["workflows_succeeded"] == 5 and actions["workflows_waiting"] == 1
    assert actions["workflows_median_resolution_seconds"] == pytest.approx(
        (2 * EVERY).total_seconds()
    )
    # The autonomy rate counts finished workflows; the one still polling is not decided yet.
    assert actions["autonomy_rate"] == pytest.approx(1.0)
    assert "5 finished every step, 1 still under way" in actions["summary"]

    project.clock.now = START + 4 * EVERY
    [request] = project.tick().run_requests or []
    last = project.run("p1", tags=dict(request.tags))
    actions = last["hosts/actions"]
    assert (actions["workflows_succeeded"], actions["workflows_failed"]) == (5, 1)
    assert actions["workflows_escalated"] == 1 and actions["workflows_waiting_until"] == "-"
    assert actions["autonomy_rate"] == pytest.approx(5 / 6)
    assert actions["escalated"] == 1

    escalations = last["hosts/escalations"]
    assert escalations["open_workflow_failed"] == 1
    [failure] = [r.data for r in escalations["workflow_failures"].records]
    assert failure["entity_id"] == "h003" and failure["failed_step"] == "verify"
    assert "poll timed out" in failure["error"]
    assert "diagnose.cause=service_hung" in failure["outputs"]
    assert "oncall-h003" not in failure["outputs"]
    # The general preview keeps the entity's columns and leaves the evidence to its own table.
    [queued] = [r.data for r in escalations["preview"].records]
    assert "evidence" not in str(queued["data"])

    assert "no workflow instance is active" in project.skip_message()


def test_partitions_with_a_run_in_flight_are_left_to_it(tmp_path: Path) -> None:
    project = HostProject(tmp_path)
    for partition in ("p1", "p2"):
        project.materialize(partition)
        project.run(partition)
    project.clock.now = START + EVERY
    job = project.defs.resolve_job_def(JOB)
    project.instance.create_run_for_job(
        job_def=job,
        status=dg.DagsterRunStatus.STARTED,
        tags={"dagster/partition": "p1"},
    )

    result = project.tick()

    assert [r.partition_key for r in result.run_requests or []] == ["p2"]


def test_a_batch_whose_run_failed_is_requested_again_a_bounded_number_of_times(
    tmp_path: Path,
) -> None:
    project = HostProject(tmp_path)
    project.materialize("p1")
    project.run("p1")
    project.clock.now = START + EVERY
    job = project.defs.resolve_job_def(JOB)
    seen = []
    for _ in range(5):
        requests = project.tick().run_requests or []
        if not requests:
            break
        [request] = requests
        seen.append(request.run_key)
        # The run fails before it moves anything: the batch stays due, with the same name.
        project.instance.create_run_for_job(
            job_def=job, status=dg.DagsterRunStatus.FAILURE, tags=dict(request.tags)
        )
    batch = due_batch(playbook=PLAYBOOK, partition_key="p1", earliest_due=START + EVERY)
    assert seen == [batch, f"{batch}:retry1", f"{batch}:retry2", f"{batch}:retry3"]
    assert "kept failing" in project.skip_message()


def test_a_paused_playbook_skips_with_who_and_why(tmp_path: Path) -> None:
    project = HostProject(tmp_path)
    project.materialize("p1")
    project.run("p1")
    project.clock.now = START + EVERY
    project.ledger.pause(PLAYBOOK, reason="network maintenance", by="alice")

    message = project.skip_message()

    assert "paused by alice: network maintenance" in message
    assert f"autoexec resume --playbook {PLAYBOOK}" in message

    project.ledger.resume(PLAYBOOK, by="alice")
    assert [r.partition_key for r in project.tick().run_requests or []] == ["p1"]


def test_the_workflow_sensor_exists_only_for_playbooks_with_workflows(tmp_path: Path) -> None:
    project = HostProject(tmp_path)
    sensor = project.defs.resolve_sensor_def(SENSOR)
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert sensor.minimum_interval_seconds == 30

    running = build_execution_defs(
        insight=project.insight,
        playbook=host_playbook(),
        channels={
            "diagnose": PythonChannel.from_callable(diagnose),
            "health": PythonChannel.from_callable(health),
        },
        ledger=project.ledger,
        sensor_default_status=dg.DefaultSensorStatus.RUNNING,
        workflow_sensor_interval_seconds=2,
    )
    fast = running.resolve_sensor_def(SENSOR)
    assert fast.default_status == dg.DefaultSensorStatus.RUNNING
    assert fast.minimum_interval_seconds == 2

    plain = build_execution_defs(
        insight=project.insight,
        playbook=Playbook(
            name="plain", entity_key="host_id", rules=[Rule(name="r", when="score > 0", action="a")]
        ),
        channels={"a": PythonChannel.from_callable(diagnose)},
        ledger=project.ledger,
    )
    names = [s.name for s in plain.sensors or []]
    assert names == ["plain_sensor"]


def test_the_ledger_clock_can_come_from_a_file_shared_by_every_process(tmp_path: Path) -> None:
    path = tmp_path / "clock.txt"
    handle = LedgerHandle(f"sqlite:///{tmp_path / 'l.db'}", clock=FileClock(path))
    ledger = handle.get()
    before = datetime.now(UTC)
    assert ledger.clock() >= before  # no file yet: the real time

    path.write_text("2030-01-02T03:04:05")
    assert ledger.clock() == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)

    path.write_text("tomorrow")
    with pytest.raises(LedgerError, match="not an ISO 8601 time"):
        ledger.clock()
    with pytest.raises(LedgerError, match="keeps its own clock"):
        LedgerHandle(ledger, clock=FileClock(path))


def test_an_approved_escalation_wakes_its_partition_and_its_run_delivers_it_once(
    tmp_path: Path,
) -> None:
    from tests.conftest import churn_scores
    from tests.test_execution_assets import make_project
    from tests.test_ledger_escalations import PLAYBOOK as CHURN
    from tests.test_ledger_escalations import Recorder, proposing_playbook

    recorder = Recorder()
    project = make_project(
        tmp_path,
        {"p1": churn_scores(300, seed=7)},
        playbook=proposing_playbook(),
        channels=recorder.channels(),
    )
    project.materialize_insight("p1")
    job = project.defs.resolve_job_def(f"{CHURN}_execution_job")
    assert job.execute_in_process(partition_key="p1", instance=project.instance).success
    sensor = project.defs.resolve_sensor_def(f"{CHURN}_approved_actions_sensor")

    def tick() -> dg.SensorResult:
        context = dg.build_sensor_context(instance=project.instance, definitions=project.defs)
        result = sensor(context)
        assert isinstance(result, dg.SensorResult)
        return result

    assert not tick().run_requests  # nothing approved yet
    queue = project.ledger.select_escalations(playbook=CHURN, rule="vip_at_risk")
    keys = queue["idempotency_key"].tolist()[:2]
    project.ledger.approve_escalations(keys, by="ana", via="cli")
    (request,) = tick().run_requests or []
    assert request.partition_key == "p1" and ":approved:p1:" in str(request.run_key)
    sent_before = len(recorder.keys)
    run = job.execute_in_process(partition_key="p1", instance=project.instance, tags=request.tags)
    assert run.success
    assert len(recorder.keys) == sent_before + 2  # the two approved CRM tasks, once each
    assert project.ledger.escalation_actions_due(playbook=CHURN) == []
    assert not tick().run_requests
    # The partition's entity counts do not change because people approved two proposals.
    actions = materializations(run)[f"{CHURN}/actions"]
    assert actions["total"] == 300
