"""The execution assets: a partition executes once, reports what it did, and scales in O(1) events.

The helpers at the top (a user project with a partitioned insight, a recording destination) are
shared by the other Dagster integration tests.
"""

import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from autoexec_dagster.channels.base import ActionRequest, Channel
from autoexec_dagster.channels.python import PythonChannel
from autoexec_dagster.dagster.defs_factory import build_execution_defs
from autoexec_dagster.dagster.execution_assets import default_execute
from autoexec_dagster.errors import PermanentChannelError, TransientChannelError
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.playbook import Playbook
from autoexec_dagster.routing import route
from tests.conftest import churn_playbook, churn_scores
from tests.counting import count_routing

PLAYBOOK = "churn_outreach"
INSIGHT = "churn_scores"
JOB = f"{PLAYBOOK}_execution_job"
FULL_EMAIL = re.compile(r"customer\d+@example\.com")


class Recorder:
    """Test double of a destination: records the idempotency key of every delivery."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.keys: list[str] = []

    def __call__(self, request: ActionRequest) -> str:
        with self._lock:
            self.keys.append(request.idempotency_key)
        return "recorded"


def recording_channels(recorder: Recorder) -> dict[str, Channel]:
    """Both actions of the churn playbook delivered to ``recorder``."""
    return {
        "retention_email": PythonChannel.from_callable(recorder),
        "crm_task": PythonChannel.from_callable(recorder),
    }


def insight_asset(
    frames: Mapping[str, pd.DataFrame],
    partitions: dg.PartitionsDefinition,
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
) -> dg.AssetsDefinition:
    """The user's partitioned insight: serves ``frames[partition]`` (read at materialization)."""

    @dg.asset(name=INSIGHT, partitions_def=partitions)
    def churn_scores_asset(context: dg.AssetExecutionContext) -> pd.DataFrame:
        extra = (metadata or {}).get(context.partition_key)
        if extra:
            context.add_output_metadata(dict(extra))
        return frames[context.partition_key]

    return churn_scores_asset


@dataclass
class Project:
    """A user's project (binding its own io_manager and ledger) plus the execution layer."""

    tmp_path: Path
    frames: dict[str, pd.DataFrame]
    playbook: Playbook
    recorder: Recorder
    ledger: ActionLedger
    insight: dg.AssetsDefinition
    defs: dg.Definitions
    instance: dg.DagsterInstance
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def io_manager(self) -> dg.FilesystemIOManager:
        return dg.FilesystemIOManager(base_dir=str(self.tmp_path / "io"))

    def materialize_insight(self, partition: str, frame: pd.DataFrame | None = None) -> None:
        if frame is not None:
            self.frames[partition] = frame
        result = dg.materialize(
            [self.insight],
            partition_key=partition,
            instance=self.instance,
            resources={"io_manager": self.io_manager},
        )
        assert result.success

    def run(self, partition: str) -> dg.ExecuteInProcessResult:
        job = self.defs.resolve_job_def(JOB)
        return job.execute_in_process(
            partition_key=partition, instance=self.instance, raise_on_error=False
        )

    def expected_plan(self, partition: str) -> pd.DataFrame:
        return route(
            self.frames[partition], self.playbook, partition_key=partition, insight_name=INSIGHT
        )


def make_project(
    tmp_path: Path,
    frames: Mapping[str, pd.DataFrame],
    *,
    playbook: Playbook | None = None,
    partition_keys: list[str] | None = None,
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
    **factory: Any,
) -> Project:
    """A project whose insight has static partitions ``partition_keys`` (default: the frames)."""
    book = playbook or churn_playbook(max_flagged_fraction=0.9)
    data = dict(frames)
    extra = {k: dict(v) for k, v in (metadata or {}).items()}
    partitions = dg.StaticPartitionsDefinition(partition_keys or sorted(data))
    insight = insight_asset(data, partitions, extra)
    recorder = Recorder()
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    user = dg.Definitions(
        assets=[insight],
        resources={
            "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
            "ledger": dg.ResourceDefinition.hardcoded_resource("the user's own ledger"),
        },
    )
    factory.setdefault("channels", recording_channels(recorder))
    execution = build_execution_defs(insight=insight, playbook=book, ledger=ledger, **factory)
    return Project(
        tmp_path=tmp_path,
        frames=data,
        playbook=book,
        recorder=recorder,
        ledger=ledger,
        insight=insight,
        defs=dg.Definitions.merge(user, execution),
        instance=dg.DagsterInstance.ephemeral(),
        metadata=extra,
    )


def materializations(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    """Metadata values of each asset materialized in the run, by asset key string."""
    found: dict[str, dict[str, Any]] = {}
    for event in result.all_events:
        if event.event_type_value == "ASSET_MATERIALIZATION":
            materialization = event.step_materialization_data.materialization
            found[materialization.asset_key.to_user_string()] = {
                key: value.value for key, value in materialization.metadata.items()
            }
    return found


def step_failures(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    """Failure message of each failed step."""
    return {
        str(event.step_key): str(event.step_failure_data.user_failure_data.description)
        if event.step_failure_data.user_failure_data is not None
        else str(event.step_failure_data.error.message if event.step_failure_data.error else "")
        for event in result.all_events
        if event.event_type_value == "STEP_FAILURE"
    }


# -- tests ------------------------------------------------------------------------------------


def test_a_partition_executes_once_and_a_rerun_sends_nothing(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"p1": churn_scores(300, seed=1), "p2": churn_scores(200)})
    project.materialize_insight("p1")

    first = project.run("p1")

    assert first.success
    plan = project.expected_plan("p1")
    act_keys = set(plan.loc[plan["decision"] == "act", "idempotency_key"])
    assert sorted(project.recorder.keys) == sorted(act_keys)
    states = project.ledger.summary(playbook=PLAYBOOK, partition_key="p1")
    by_state = states.groupby("state")["count"].sum().to_dict()
    decisions = plan["decision"].astype(str).value_counts().to_dict()
    assert by_state == {
        "succeeded": decisions["act"],
        "escalated": decisions["escalate"],
        "skipped": decisions["skip"],
    }
    assert set(materializations(first)) == {
        f"{PLAYBOOK}/plan",
        f"{PLAYBOOK}/actions",
        f"{PLAYBOOK}/escalations",
    }

    again = project.run("p1")

    assert again.success
    assert len(project.recorder.keys) == len(act_keys)  # nothing resent
    actions = materializations(again)[f"{PLAYBOOK}/actions"]
    assert actions["run_already_done"] == len(plan)
    assert actions["run_succeeded"] == 0
    assert project.ledger.summary(playbook=PLAYBOOK, partition_key="p2").empty


def test_materializations_carry_counts_rates_summary_and_a_masked_preview(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"p1": churn_scores(400, seed=3)})
    project.materialize_insight("p1")

    result = project.run("p1")

    assert result.success
    found = materializations(result)
    plan_md, actions_md, queue_md = (
        found[f"{PLAYBOOK}/plan"],
        found[f"{PLAYBOOK}/actions"],
        found[f"{PLAYBOOK}/escalations"],
    )
    expected = project.expected_plan("p1")["decision"].astype(str).value_counts()
    for decision in ("act", "escalate", "skip"):
        assert plan_md[decision] == int(expected.get(decision, 0))
    assert "holdout" not in plan_md and "workflow" not in plan_md  # impossible: no zero series
    assert plan_md["dagster/row_count"] == 400
    assert isinstance(plan_md["flagged_fraction"], float)
    assert actions_md["succeeded"] == int(expected["act"])
    assert actions_md["failed"] == 0 and "run_retries" not in actions_md
    assert actions_md["escalated"] == int(expected["escalate"])
    rate = actions_md["autonomy_rate"]
    assert isinstance(rate, float)
    assert rate == pytest.approx(expected["act"] / (expected["act"] + expected["escalate"]))
    assert isinstance(actions_md["run_duration_seconds"], float)
    assert isinstance(actions_md["run_throughput_per_second"], float)
    # Series that cannot be anything but zero under this playbook are left out of the plots.
    assert not {"held_out", "cooled_down", "dry_run", "pending"} & set(actions_md)
    assert actions_md["status"] == "completed"
    assert "handled autonomously" in actions_md["summary"]
    assert queue_md["open"] == int(expected["escalate"])
    assert "autoexec escalations --playbook churn_outreach --partition p1" in queue_md["summary"]

    preview = plan_md["preview"]
    assert 0 < len(preview.records) <= 20
    emails = [r.data["email"] for r in preview.records]
    assert all(re.fullmatch(r"c\*\*\*@example\.com", e) for e in emails)
    names = [r.data["name"] for r in preview.records]
    assert all(n == "C***" for n in names)
    assert len(queue_md["preview"].records) <= 20
    for metadata in found.values():
        for value in metadata.values():
            text = repr(value.records) if hasattr(value, "records") else repr(value)
            assert not FULL_EMAIL.search(text), text[:200]


def test_dagster_events_per_partition_do_not_grow_with_the_batch(tmp_path: Path) -> None:
    project = make_project(
        tmp_path, {"small": churn_scores(50, seed=5), "large": churn_scores(5_000, seed=5)}
    )
    project.materialize_insight("small")
    project.materialize_insight("large")

    small = project.run("small")
    large = project.run("large")

    assert small.success and large.success
    acts = sum(int((project.expected_plan(p)["decision"] == "act").sum()) for p in project.frames)
    assert len(project.recorder.keys) == acts > 1_000

    def count(result: dg.ExecuteInProcessResult, kind: str) -> int:
        return sum(1 for e in result.all_events if e.event_type_value == kind)

    assert count(large, "ASSET_MATERIALIZATION") == count(small, "ASSET_MATERIALIZATION") == 3
    assert len(large.all_events) == len(small.all_events)


def test_a_paused_kill_switch_fails_the_execute_step_with_the_reason(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"p1": churn_scores(200)})
    project.materialize_insight("p1")
    project.ledger.pause(PLAYBOOK, reason="incident 42: CRM is down", by="ops")

    result = project.run("p1")

    assert not result.success
    failures = step_failures(result)
    execute_step = next(k for k in failures if k.endswith(f"{PLAYBOOK}_execute"))
    assert "incident 42: CRM is down" in failures[execute_step]
    assert "autoexec resume" in failures[execute_step]
    assert project.recorder.keys == []
    assert set(materializations(result)) == {f"{PLAYBOOK}/plan"}

    project.ledger.resume(PLAYBOOK, by="ops")
    assert project.run("p1").success
    plan = project.expected_plan("p1")
    assert len(project.recorder.keys) == int((plan["decision"] == "act").sum())


def test_a_guardrail_block_escalates_the_batch_and_says_so(tmp_path: Path) -> None:
    frame = churn_scores(100)
    frame["churn_score"] = np.where(np.arange(100) % 10 < 8, 0.95, 0.1)
    frame["lifetime_value"] = 100.0
    frame["confidence"] = 0.9
    project = make_project(
        tmp_path, {"p1": frame}, playbook=churn_playbook(), flagged_share_blocking=False
    )
    project.materialize_insight("p1")

    result = project.run("p1")

    assert result.success  # a reporting-only check leaves the block to the executor
    found = materializations(result)
    actions = found[f"{PLAYBOOK}/actions"]
    assert actions["blocked"] is True
    assert actions["status"].startswith("BLOCKED by a guardrail")
    assert "80.0%" in actions["blocked_reason"]
    assert "Batch blocked by a guardrail" in actions["summary"]
    queue = found[f"{PLAYBOOK}/escalations"]
    assert queue["open"] == 1 and queue["open_guardrail"] == 1
    assert "escalated by a guardrail" in queue["summary"]
    assert project.recorder.keys == []
    assert "succeeded" not in set(project.ledger.actions(playbook=PLAYBOOK)["state"])


def test_dry_run_records_what_would_be_sent_and_sends_nothing(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"p1": churn_scores(200)}, dry_run=True)
    project.materialize_insight("p1")

    result = project.run("p1")

    assert result.success
    assert project.recorder.keys == []
    plan = project.expected_plan("p1")
    actions = materializations(result)[f"{PLAYBOOK}/actions"]
    assert actions["dry_run"] == actions["run_dry_run"] == int((plan["decision"] == "act").sum())
    assert actions["dry_run_mode"] is True
    assert actions["status"] == "dry run completed"


def test_a_custom_execute_fn_receives_the_routed_plan(tmp_path: Path) -> None:
    calls: list[tuple[str, int, str]] = []

    def audited(
        context: dg.OpExecutionContext, plan: pd.DataFrame, **kwargs: Any
    ) -> ExecutionReport:
        calls.append((kwargs["partition_key"], len(plan), kwargs["insight"]))
        return default_execute(context, plan, **kwargs)

    project = make_project(tmp_path, {"p1": churn_scores(120)}, execute_fn=audited)
    project.materialize_insight("p1")

    assert project.run("p1").success
    assert calls == [("p1", 120, INSIGHT)]
    assert project.recorder.keys


def test_the_assets_store_small_summaries_not_entities(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"p1": churn_scores(150)})
    project.materialize_insight("p1")
    assert project.run("p1").success

    def load(name: str) -> Any:
        return project.defs.load_asset_value(
            [PLAYBOOK, name], partition_key="p1", instance=project.instance
        )

    plan, actions, queue = load("plan"), load("actions"), load("escalations")
    assert isinstance(plan, dict) and plan["total"] == 150
    assert set(plan["by_decision"]) >= {"act", "escalate", "holdout", "skip"}
    assert isinstance(actions, dict) and actions["succeeded"] == len(project.recorder.keys)
    assert isinstance(queue, dict) and queue["open"] == plan["by_decision"]["escalate"]
    assert not FULL_EMAIL.search(repr((plan, actions, queue)))


def test_a_partitioned_insight_given_by_key_alone_says_to_pass_partitions_def(
    tmp_path: Path,
) -> None:
    frames = {"p1": churn_scores(30), "p2": churn_scores(30, seed=2)}
    insight = insight_asset(frames, dg.StaticPartitionsDefinition(["p1", "p2"]))
    recorder = Recorder()
    defs = dg.Definitions.merge(
        dg.Definitions(
            assets=[insight],
            resources={"io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))},
        ),
        build_execution_defs(
            insight=INSIGHT,
            playbook=churn_playbook(max_flagged_fraction=0.9),
            channels=recording_channels(recorder),
            ledger=f"sqlite:///{tmp_path / 'ledger.db'}",
        ),
    )

    # The job cannot even be built, so no run (from the sensor, the UI or here) can start.
    with pytest.raises(dg.DagsterInvalidDefinitionError) as raised:
        defs.resolve_job_def(JOB)

    cause = raised.value.__cause__
    assert cause is not None and "pass partitions_def=" in str(cause)
    assert recorder.keys == []
    assert not (tmp_path / "ledger.db").exists()


def test_failures_and_retries_are_reported_and_failed_actions_escalated(tmp_path: Path) -> None:
    attempts: dict[str, int] = {}
    lock = threading.Lock()

    def flaky(request: ActionRequest) -> str:
        with lock:
            attempts[request.idempotency_key] = attempts.get(request.idempotency_key, 0) + 1
            seen = attempts[request.idempotency_key]
        if request.entity_id.endswith("7"):
            raise PermanentChannelError("HTTP 422: rejected")
        if seen == 1:
            raise TransientChannelError("HTTP 503")
        return "ok"

    fast = {
        "backoff_base_seconds": 0.001,
        "backoff_max_seconds": 0.002,
        "max_attempts": 3,
        "circuit_breaker_threshold": 10_000,
    }
    channels: dict[str, Channel] = {
        "retention_email": PythonChannel.from_callable(flaky, **fast),
        "crm_task": PythonChannel.from_callable(flaky, **fast),
    }
    project = make_project(tmp_path, {"p1": churn_scores(300)}, channels=channels)
    project.materialize_insight("p1")

    result = project.run("p1")

    assert result.success
    plan = project.expected_plan("p1")
    acting = plan[plan["decision"] == "act"]
    rejected = int(acting["entity_id"].str.endswith("7").sum())
    assert rejected > 0
    found = materializations(result)
    actions = found[f"{PLAYBOOK}/actions"]
    assert actions["failed"] == rejected
    assert actions["succeeded"] == len(acting) - rejected
    assert actions["run_retries"] == len(acting) - rejected
    assert actions["status"] == f"completed with {rejected:,} failed"
    assert "HTTP 422: rejected" in actions["errors"]
    preview = actions["preview"].records
    assert preview[0].data["state"] == "failed"
    assert "HTTP 422" in str(preview[0].data["error"])
    queue = found[f"{PLAYBOOK}/escalations"]
    assert queue["open_delivery_failed"] == rejected


def test_an_empty_partition_executes_nothing(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"p1": churn_scores(0)})
    project.materialize_insight("p1")

    result = project.run("p1")

    assert result.success
    found = materializations(result)
    assert found[f"{PLAYBOOK}/plan"]["total"] == 0
    assert found[f"{PLAYBOOK}/actions"]["status"] == "completed"
    assert "autonomy_rate" not in found[f"{PLAYBOOK}/actions"]
    assert found[f"{PLAYBOOK}/escalations"]["open"] == 0
    assert project.recorder.keys == []


def test_a_rerun_reports_the_partition_totals_from_the_ledger(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"p1": churn_scores(300)})
    project.materialize_insight("p1")
    first = materializations(project.run("p1"))[f"{PLAYBOOK}/actions"]

    again = materializations(project.run("p1"))[f"{PLAYBOOK}/actions"]

    # The headline entries are the partition's totals, whichever run did the work.
    for key in ("flagged", "succeeded", "escalated", "failed", "skipped", "autonomy_rate"):
        assert again[key] == first[key], key
    assert first["succeeded"] > 0 and 0 < first["autonomy_rate"] < 1
    assert json.dumps(again["by_action"]) == json.dumps(first["by_action"])
    # What the re-run itself added is secondary, and named so.
    assert first["run_succeeded"] == first["succeeded"] and first["run_already_done"] == 0
    assert again["run_succeeded"] == 0 and again["run_already_done"] == 300
    assert "0 new actions" in again["summary"]
    assert f"**{first['succeeded']:,}** handled autonomously" in again["summary"]


def test_one_run_loads_and_routes_the_insight_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests import reexecution_job  # it builds on this module's helpers

    monkeypatch.setenv(reexecution_job.DIR_ENV, str(tmp_path))
    defs = reexecution_job.build_defs()
    current = reexecution_job.state(tmp_path)
    instance = dg.DagsterInstance.ephemeral()
    reexecution_job.materialize_insight(instance)
    current.counts.reset()

    with count_routing(monkeypatch, current.counts):
        result = defs.resolve_job_def(JOB).execute_in_process(partition_key="p1", instance=instance)

    assert result.success
    assert current.counts.loads == {"p1": 1}  # the checks and the graph share one load
    assert current.counts.routes == 1
    assert current.recorder.keys  # and the plan routed once is the plan executed


def test_re_execution_from_the_failed_execute_step_reads_the_stored_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests import reexecution_job  # it builds on this module's helpers

    monkeypatch.setenv(reexecution_job.DIR_ENV, str(tmp_path))
    current = reexecution_job.state(tmp_path)
    instance = dg.DagsterInstance.ephemeral()
    reexecution_job.materialize_insight(instance)
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.pause(PLAYBOOK, reason="CRM maintenance", by="ops")
    job = dg.reconstructable(reexecution_job.build_job)

    with dg.execute_job(job, instance, tags={"dagster/partition": "p1"}) as paused:
        assert not paused.success
        failed = set(paused.get_failed_step_keys())
    assert any(k.endswith(f"{PLAYBOOK}_execute") for k in failed), failed
    assert current.recorder.keys == []
    ledger.resume(PLAYBOOK, by="ops")
    current.counts.reset()

    with (
        count_routing(monkeypatch, current.counts),
        dg.execute_job(
            job,
            instance,
            tags={"dagster/partition": "p1"},
            reexecution_options=dg.ReexecutionOptions.from_failure(paused.run_id, instance),
        ) as resumed,
    ):
        assert resumed.success
        executed = {e.step_key for e in resumed.all_events if e.event_type_value == "STEP_SUCCESS"}

    # Only the failed step and what follows it ran again; the plan came back from storage.
    assert not any(k and k.endswith(f"{PLAYBOOK}_route") for k in executed), executed
    assert current.counts.total_loads == 0 and current.counts.routes == 0
    plan = route(
        churn_scores(300, seed=11),
        churn_playbook(max_flagged_fraction=0.9),
        partition_key="p1",
        insight_name=INSIGHT,
    )
    assert sorted(current.recorder.keys) == sorted(
        plan.loc[plan["decision"] == "act", "idempotency_key"]
    )


def test_each_execution_asset_opens_with_its_own_description(tmp_path: Path) -> None:
    book = churn_playbook(max_flagged_fraction=0.9).model_copy(
        update={"description": "Win back customers the churn model flags."}
    )
    project = make_project(tmp_path, {"p1": churn_scores(10)}, playbook=book)
    graph = project.defs.resolve_asset_graph()

    first_lines = {
        name: (graph.get(dg.AssetKey([PLAYBOOK, name])).description or "").splitlines()[0]
        for name in ("plan", "escalations", "actions")
    }

    assert len(set(first_lines.values())) == 3, first_lines
    assert first_lines["plan"].startswith("Routing decisions")
    assert all(
        "Win back customers" in (graph.get(dg.AssetKey([PLAYBOOK, n])).description or "")
        for n in first_lines
    )
