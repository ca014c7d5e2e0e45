"""The insight sensor and the batch schedule: they request runs and never act."""

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from autoexec_dagster.channels.base import ActionRequest
from autoexec_dagster.channels.python import PythonChannel
from autoexec_dagster.dagster.defs_factory import build_execution_defs
from autoexec_dagster.dagster.execution_assets import ExecutionSetup
from autoexec_dagster.dagster.insight_sensor import (
    FLAGGED_METADATA_KEY,
    InsightCursor,
    build_insight_sensor,
    fetch_new_materializations,
    flagged_metadata,
)
from autoexec_dagster.dagster.ledger_resource import LedgerHandle
from autoexec_dagster.executor.plan_execution import execute_plan
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.routing import route
from tests.conftest import churn_playbook, churn_scores
from tests.counting import Counts, counting_io_manager
from tests.test_execution_assets import (
    INSIGHT,
    JOB,
    PLAYBOOK,
    Project,
    Recorder,
    make_project,
    recording_channels,
)

SENSOR = f"{PLAYBOOK}_sensor"


def quiet(n: int = 40, seed: int = 7):
    """An insight partition in which the churn playbook flags nobody."""
    return churn_scores(n, seed=seed).assign(churn_score=0.1)


def tick(project: Project, cursor: str | None = None) -> Any:
    sensor = project.defs.resolve_sensor_def(SENSOR)
    context = dg.build_sensor_context(
        instance=project.instance, definitions=project.defs, cursor=cursor
    )
    return sensor.evaluate_tick(context)


def storage_ids(project: Project) -> list[int]:
    records = project.instance.fetch_materializations(
        dg.AssetKey(INSIGHT), limit=100, ascending=True
    ).records
    return [r.storage_id for r in records]


def test_partitions_landing_between_ticks_each_get_one_run(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"p1": churn_scores(60), "p2": churn_scores(60, seed=2)})
    project.materialize_insight("p1")
    project.materialize_insight("p2")
    first_id, second_id = storage_ids(project)

    data = tick(project)

    requests = data.run_requests or []
    assert [(r.partition_key, r.run_key) for r in requests] == [
        ("p1", f"{INSIGHT}:p1:{first_id}"),
        ("p2", f"{INSIGHT}:p2:{second_id}"),
    ]
    assert all(r.tags["autoexec/playbook"] == PLAYBOOK for r in requests)
    assert json.loads(data.cursor or "")["after_storage_id"] == second_id
    assert project.recorder.keys == []  # the sensor never acts

    again = tick(project, data.cursor)

    assert not again.run_requests
    assert "no new materialization" in (again.skip_message or "")
    assert again.cursor == data.cursor

    project.materialize_insight("p1")
    (third_id,) = storage_ids(project)[2:]
    later = tick(project, data.cursor)
    assert [r.run_key for r in later.run_requests or []] == [f"{INSIGHT}:p1:{third_id}"]


def test_a_requested_run_executes_the_partition(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"p1": churn_scores(80)})
    project.materialize_insight("p1")
    (request,) = tick(project).run_requests or []

    result = project.defs.resolve_job_def(JOB).execute_in_process(
        partition_key=request.partition_key, instance=project.instance, tags=request.tags
    )

    assert result.success
    plan = project.expected_plan("p1")
    assert len(project.recorder.keys) == int((plan["decision"] == "act").sum())


def test_a_partition_without_flagged_entities_gets_no_run(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"quiet": quiet(), "busy": churn_scores(60)})
    project.materialize_insight("quiet")
    project.materialize_insight("busy")

    data = tick(project)

    assert [r.partition_key for r in data.run_requests or []] == ["busy"]
    assert json.loads(data.cursor or "")["after_storage_id"] == max(storage_ids(project))

    project.materialize_insight("quiet")
    skipped = tick(project, data.cursor)
    assert not skipped.run_requests
    assert "none with flagged entities (quiet)" in (skipped.skip_message or "")


def test_the_flagged_count_in_metadata_is_trusted_without_loading(tmp_path: Path) -> None:
    playbook = churn_playbook(max_flagged_fraction=0.9)
    frames = {"says_none": churn_scores(60), "says_some": quiet()}
    metadata = {"says_none": {FLAGGED_METADATA_KEY: 0}, "says_some": {FLAGGED_METADATA_KEY: 12}}
    project = make_project(tmp_path, frames, playbook=playbook, metadata=metadata)
    project.materialize_insight("says_none")
    project.materialize_insight("says_some")
    # Were the sensor to load a partition, it would find the opposite of what metadata says.
    data = tick(project)

    assert [r.partition_key for r in data.run_requests or []] == ["says_some"]


def test_the_metadata_key_can_be_named(tmp_path: Path) -> None:
    project = make_project(
        tmp_path,
        {"p1": churn_scores(60)},
        metadata={"p1": {"model/flagged_customers": 0}},
        flagged_metadata_key="model/flagged_customers",
    )
    project.materialize_insight("p1")

    assert not tick(project).run_requests


def test_a_partition_materialized_twice_gets_one_run_for_the_newest(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"p1": churn_scores(60)})
    project.materialize_insight("p1")
    project.materialize_insight("p1")

    data = tick(project)

    newest = storage_ids(project)[-1]
    assert [r.run_key for r in data.run_requests or []] == [f"{INSIGHT}:p1:{newest}"]


def test_an_unroutable_partition_still_gets_a_run_so_its_checks_report(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"p1": churn_scores(30).drop(columns=["confidence"])})
    project.materialize_insight("p1")

    data = tick(project)

    assert [r.partition_key for r in data.run_requests or []] == ["p1"]


def test_materializations_are_read_in_pages_in_storage_order(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    key = dg.AssetKey(INSIGHT)
    for i in range(7):
        instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=f"k{i}"))

    records = fetch_new_materializations(instance, key, after_storage_id=0, page_size=2)

    assert [r.partition_key for r in records] == [f"k{i}" for i in range(7)]
    ids = [r.storage_id for r in records]
    assert ids == sorted(ids)
    limited = fetch_new_materializations(
        instance, key, after_storage_id=ids[1], limit=3, page_size=2
    )
    assert [r.storage_id for r in limited] == ids[2:5]


def test_one_tick_reads_a_bounded_batch_and_the_next_continues(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    partitions = dg.StaticPartitionsDefinition([f"k{i}" for i in range(5)])
    key = dg.AssetKey(INSIGHT)
    for i in range(5):
        instance.report_runless_asset_event(
            dg.AssetMaterialization(key, partition=f"k{i}", metadata={FLAGGED_METADATA_KEY: 1})
        )

    @dg.asset(partitions_def=partitions, deps=[key])
    def downstream() -> None: ...

    setup = ExecutionSetup(
        playbook=churn_playbook(),
        insight_key=key,
        partitions_def=partitions,
        ledger=LedgerHandle(f"sqlite:///{tmp_path / 'ledger.db'}"),
        channels={},
    )
    job = dg.define_asset_job(JOB, selection=dg.AssetSelection.assets(downstream))
    sensor = build_insight_sensor(setup=setup, job=job, max_records_per_tick=3)
    defs = dg.Definitions(
        assets=[dg.AssetSpec(key, partitions_def=partitions), downstream],
        jobs=[job],
        sensors=[sensor],
    )

    first = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs))
    second = sensor.evaluate_tick(
        dg.build_sensor_context(instance=instance, definitions=defs, cursor=first.cursor)
    )

    assert [r.partition_key for r in first.run_requests or []] == ["k0", "k1", "k2"]
    assert [r.partition_key for r in second.run_requests or []] == ["k3", "k4"]


def test_the_sensor_is_stopped_unless_the_caller_opts_in(tmp_path: Path) -> None:
    stopped = make_project(tmp_path, {"p1": churn_scores(10)})
    assert stopped.defs.resolve_sensor_def(SENSOR).default_status == dg.DefaultSensorStatus.STOPPED
    (tmp_path / "b").mkdir()
    running = make_project(
        tmp_path / "b",
        {"p1": churn_scores(10)},
        sensor_default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=5,
    )
    sensor = running.defs.resolve_sensor_def(SENSOR)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 5
    assert sensor.job_name == JOB


def test_cursor_round_trips_and_rejects_garbage() -> None:
    assert InsightCursor.parse(None) == InsightCursor(0)
    assert InsightCursor.parse("") == InsightCursor(0)
    assert InsightCursor.parse(InsightCursor(42).serialize()) == InsightCursor(42)
    assert InsightCursor.parse("17") == InsightCursor(17)
    assert json.loads(InsightCursor(5).serialize()) == {"v": 1, "after_storage_id": 5}
    with pytest.raises(ValueError, match="not valid"):
        InsightCursor.parse("yesterday")
    with pytest.raises(ValueError, match="negative"):
        InsightCursor.parse('{"after_storage_id": -1}')


def test_flagged_metadata_counts_what_the_playbook_flags() -> None:
    playbook = churn_playbook()
    frame = churn_scores(200)
    expected = int((frame["churn_score"] >= 0.5).sum())
    assert flagged_metadata(frame, playbook) == {FLAGGED_METADATA_KEY: expected}
    assert flagged_metadata(frame, playbook, key="k") == {"k": expected}
    assert flagged_metadata(frame.drop(columns=["confidence"]), playbook) == {}


# -- schedule ---------------------------------------------------------------------------------


def _scheduled_defs(tmp_path: Path, partitions: dg.PartitionsDefinition | None) -> dg.Definitions:
    insight = dg.AssetSpec(INSIGHT, partitions_def=partitions)
    return dg.Definitions.merge(
        dg.Definitions(assets=[insight]),
        build_execution_defs(
            insight=insight,
            playbook=churn_playbook(),
            channels=recording_channels(Recorder()),
            ledger=f"sqlite:///{tmp_path / 'ledger.db'}",
            schedule="0 6 * * *",
        ),
    )


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """An instance with a ref: a schedule context cannot use an ephemeral one."""
    with dg.instance_for_test() as test_instance:
        yield test_instance


def _evaluate(defs: dg.Definitions, instance: dg.DagsterInstance, when: dt.datetime):
    schedule = defs.resolve_schedule_def(f"{PLAYBOOK}_schedule")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    return schedule.evaluate_tick(
        dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=when,
            repository_def=defs.get_repository_def(),
        )
    )


def test_the_schedule_runs_the_newest_materialized_time_partition(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    daily = dg.DailyPartitionsDefinition(start_date="2026-11-01")
    defs = _scheduled_defs(tmp_path, daily)
    when = dt.datetime(2026, 11, 5, 6, tzinfo=dt.UTC)

    waiting = _evaluate(defs, instance, when)
    assert not waiting.run_requests
    assert "2026-11-04" in (waiting.skip_message or "")

    instance.report_runless_asset_event(dg.AssetMaterialization(INSIGHT, partition="2026-11-04"))
    ready = _evaluate(defs, instance, when)
    assert [r.partition_key for r in ready.run_requests or []] == ["2026-11-04"]


def test_the_schedule_runs_every_materialized_static_partition(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    defs = _scheduled_defs(tmp_path, dg.StaticPartitionsDefinition(["emea", "apac", "na"]))
    for region in ("na", "emea"):
        instance.report_runless_asset_event(dg.AssetMaterialization(INSIGHT, partition=region))

    data = _evaluate(defs, instance, dt.datetime(2026, 11, 5, 6, tzinfo=dt.UTC))

    requests = data.run_requests or []
    assert [r.partition_key for r in requests] == ["emea", "na"]
    assert len({r.run_key for r in requests}) == 2


def test_the_schedule_of_an_unpartitioned_insight_requests_one_run(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    defs = _scheduled_defs(tmp_path, None)
    data = _evaluate(defs, instance, dt.datetime(2026, 11, 5, 6, tzinfo=dt.UTC))
    assert [r.partition_key for r in data.run_requests or []] == [None]


def _loading_sensor_defs(
    tmp_path: Path, counts: Counts, store: dict[str, Any], **sensor_options: Any
) -> tuple[dg.Definitions, dg.SensorDefinition, dg.AssetsDefinition]:
    """Five insight partitions without a flagged count, so the sensor must load each one."""
    partitions = dg.StaticPartitionsDefinition([f"k{i}" for i in range(5)])

    @dg.asset(name=INSIGHT, partitions_def=partitions, io_manager_key="insight_io")
    def insight(context: dg.AssetExecutionContext) -> Any:
        return churn_scores(40, seed=int(context.partition_key[1:]))

    @dg.asset(partitions_def=partitions, deps=[insight])
    def downstream() -> None: ...

    setup = ExecutionSetup(
        playbook=churn_playbook(),
        insight_key=insight.key,
        partitions_def=partitions,
        ledger=LedgerHandle(f"sqlite:///{tmp_path / 'ledger.db'}"),
        channels={},
    )
    job = dg.define_asset_job(JOB, selection=dg.AssetSelection.assets(downstream))
    sensor = build_insight_sensor(setup=setup, job=job, **sensor_options)
    defs = dg.Definitions(
        assets=[insight, downstream],
        jobs=[job],
        sensors=[sensor],
        resources={"insight_io": counting_io_manager(counts, store)},
    )
    return defs, sensor, insight


def test_a_tick_loads_a_bounded_number_of_partitions_with_one_loader(tmp_path: Path) -> None:
    counts, store = Counts(), {}
    defs, sensor, insight = _loading_sensor_defs(tmp_path, counts, store, max_loads_per_tick=2)
    instance = dg.DagsterInstance.ephemeral()
    for i in range(5):
        job = defs.resolve_implicit_global_asset_job_def()
        assert job.execute_in_process(
            partition_key=f"k{i}", instance=instance, asset_selection=[insight.key]
        ).success
    ids = [
        r.storage_id
        for r in instance.fetch_materializations(insight.key, limit=10, ascending=True).records
    ]
    counts.reset()

    cursor, requested, loaded_per_tick, builds_per_tick = None, [], [], []
    for _ in range(3):
        before_loads, before_builds = counts.total_loads, counts.builds
        data = sensor.evaluate_tick(
            dg.build_sensor_context(instance=instance, definitions=defs, cursor=cursor)
        )
        requested.append([r.partition_key for r in data.run_requests or []])
        loaded_per_tick.append(counts.total_loads - before_loads)
        builds_per_tick.append(counts.builds - before_builds)
        cursor = data.cursor

    assert requested == [["k0", "k1"], ["k2", "k3"], ["k4"]]
    assert loaded_per_tick == [2, 2, 1]
    assert builds_per_tick == [1, 1, 1]  # one batched value loader per tick, not one per load
    assert counts.loads == {f"k{i}": 1 for i in range(5)}
    assert json.loads(cursor or "")["after_storage_id"] == ids[-1]


def test_a_tick_that_runs_out_of_time_advances_its_cursor_over_what_it_finished(
    tmp_path: Path,
) -> None:
    counts, store = Counts(), {}
    now = [0.0]

    def clock() -> float:
        # Every reading of the clock is a second later: a slow IO manager, without sleeping.
        now[0] += 1.0
        return now[0]

    defs, sensor, insight = _loading_sensor_defs(
        tmp_path, counts, store, tick_budget_seconds=3.5, clock=clock
    )
    instance = dg.DagsterInstance.ephemeral()
    for i in range(5):
        job = defs.resolve_implicit_global_asset_job_def()
        assert job.execute_in_process(
            partition_key=f"k{i}", instance=instance, asset_selection=[insight.key]
        ).success
    ids = [
        r.storage_id
        for r in instance.fetch_materializations(insight.key, limit=10, ascending=True).records
    ]

    first = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs))

    answered = [r.partition_key for r in first.run_requests or []]
    assert 0 < len(answered) < 5
    assert json.loads(first.cursor or "")["after_storage_id"] == ids[len(answered) - 1]
    rest = sensor.evaluate_tick(
        dg.build_sensor_context(instance=instance, definitions=defs, cursor=first.cursor)
    )
    assert (rest.run_requests or [])[0].partition_key == f"k{len(answered)}"


def test_the_schedule_requests_only_partitions_with_work_not_yet_done(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    defs = _scheduled_defs(tmp_path, dg.StaticPartitionsDefinition(["emea", "apac", "na"]))
    for region in ("emea", "apac", "na"):
        instance.report_runless_asset_event(dg.AssetMaterialization(INSIGHT, partition=region))
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    playbook = churn_playbook(max_flagged_fraction=0.9)

    def execute(region: str, channels: dict) -> None:
        plan = route(churn_scores(300), playbook, partition_key=region, insight_name=INSIGHT)
        execute_plan(
            plan,
            playbook=playbook,
            ledger=ledger,
            channels=channels,
            partition_key=region,
            insight_name=INSIGHT,
        )

    execute("na", recording_channels(Recorder()))  # done: every action finished

    def pause_on_first(request: ActionRequest) -> str:
        ledger.pause(PLAYBOOK, reason="CRM maintenance", by="ops")
        return "sent"

    # Interrupted: the kill switch stops the batch after its first delivery.
    execute("apac", {a: PythonChannel.from_callable(pause_on_first) for a in playbook.actions})
    ledger.resume(PLAYBOOK, by="ops")
    assert ledger.partitions_with_pending_work(playbook=PLAYBOOK) == ["apac"]

    data = _evaluate(defs, instance, dt.datetime(2026, 11, 5, 6, tzinfo=dt.UTC))

    assert [r.partition_key for r in data.run_requests or []] == ["emea", "apac"]


def test_a_paused_playbook_skips_with_the_reason_and_resume_requests_what_it_interrupted(
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path, {"p1": churn_scores(300), "p2": churn_scores(300, seed=2)})
    project.materialize_insight("p1")
    first = tick(project)
    (request,) = first.run_requests or []
    project.ledger.pause(PLAYBOOK, reason="incident 42: CRM is down", by="ana")
    # The run the sensor requested before the pause stops at its execute step.
    assert not project.run("p1").success
    project.materialize_insight("p2")

    paused = tick(project, first.cursor)

    assert not paused.run_requests
    message = paused.skip_message or ""
    assert f"playbook {PLAYBOOK!r} is paused by ana: incident 42: CRM is down" in message
    assert "1 new materialization(s) of churn_scores wait" in message
    assert paused.cursor == first.cursor  # nothing consumed while paused

    project.ledger.resume(PLAYBOOK, by="ana")
    resumed = tick(project, paused.cursor)

    requested = {r.partition_key: r for r in resumed.run_requests or []}
    assert set(requested) == {"p1", "p2"}
    assert requested["p1"].tags["autoexec/resumed"] == "true"
    assert requested["p1"].run_key != request.run_key
    # Once answered, the same resume is not answered again.
    assert not tick(project, resumed.cursor).run_requests
    for partition in ("p1", "p2"):
        assert project.run(partition).success
    acts = sum(int((project.expected_plan(p)["decision"] == "act").sum()) for p in ("p1", "p2"))
    assert len(project.recorder.keys) == len(set(project.recorder.keys)) == acts
