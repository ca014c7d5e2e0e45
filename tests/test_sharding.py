"""Sharded execution: one partition delivered by N steps that share the work through the ledger.

- ``shard_of`` is a stable, balanced hash; ``shard_limits`` divides each channel's limits.
- The sharded job (record, deliver_0..N-1, merge) delivers every action once and leaves the
  ledger and the ``actions`` materialization exactly as the unsharded job does; one shard keeps
  the single ``execute`` step.
- Workflows advance under shards as they do without.
- A dead sibling's claims are recovered by a live shard's sweep (only those), a shard that never
  ran is finished by the merge, and the merge recounts what is pending from the ledger.
- The options and the component field are checked with clear errors.
"""

import asyncio
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
import sqlalchemy as sa
import yaml

from autoexec_dagster.channels.base import ActionRequest, Channel
from autoexec_dagster.channels.python import PythonChannel
from autoexec_dagster.components.execution_component import ExecutionComponent
from autoexec_dagster.dagster.defs_factory import build_execution_defs
from autoexec_dagster.executor.delivery import shard_limits
from autoexec_dagster.executor.plan_execution import execute_plan
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.executor.sharding import (
    MAX_SHARDS,
    PreparedPartition,
    check_shards,
    deliver_shard,
    merge_shards,
    prepare_partition,
    shard_of,
)
from autoexec_dagster.keys import idempotency_keys
from autoexec_dagster.ledger import schema
from autoexec_dagster.ledger.action_ledger import ActionLedger, Outcome, new_worker_id
from autoexec_dagster.playbook import Playbook
from autoexec_dagster.routing import route
from autoexec_dagster.workflows.report import WorkflowReport
from tests.conftest import churn_playbook, churn_scores
from tests.test_execution_assets import (
    INSIGHT,
    JOB,
    PLAYBOOK,
    Project,
    Recorder,
    insight_asset,
    make_project,
    materializations,
    recording_channels,
    step_failures,
)
from tests.test_execution_component import AuditedExecution, attributes, json_ready
from tests.test_ledger_escalations import proposing_playbook
from tests.test_workflow_sensor import diagnose, health, host_playbook, hosts_frame
from tests.test_workflows_advance import (
    ACTIONS,
    HOUR,
    START,
    Clock,
    Fleet,
    hosts,
    remediation_playbook,
)

PARTITION = "2026-12-01"
# A worker on another machine: only its lease tells whether it is alive.
ELSEWHERE = "otherhost:1:4242:-:{}"
# Metadata that differs between any two runs (timing, paths), whatever they did.
TOOK = re.compile(r"Took [0-9.]+ s \([0-9,.]+ actions/s\)")
VOLATILE = {"run_duration_seconds", "run_throughput_per_second", "ledger", "path", "preview"}


# -- helpers ----------------------------------------------------------------------------------


def folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def project_on(
    tmp_path: Path,
    frames: Mapping[str, pd.DataFrame],
    *,
    ledger_url: str,
    playbook: Playbook | None = None,
    **factory: Any,
) -> Project:
    """``make_project`` with the ledger at ``ledger_url`` (SQLite or PostgreSQL)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    book = playbook or churn_playbook(max_flagged_fraction=0.9)
    data = dict(frames)
    insight = insight_asset(data, dg.StaticPartitionsDefinition(sorted(data)))
    recorder = Recorder()
    ledger = ActionLedger(ledger_url)
    factory.setdefault("channels", recording_channels(recorder))
    user = dg.Definitions(
        assets=[insight],
        resources={"io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))},
    )
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
    )


def execution_graph(job: dg.JobDefinition, graph_name: str) -> dg.GraphDefinition:
    graph = job.graph.node_named(graph_name).definition
    assert isinstance(graph, dg.GraphDefinition)
    return graph


def wiring(job: dg.JobDefinition, graph_name: str) -> dict[str, dict[str, list[str]]]:
    """Per op of the execution graph: each input and the ops it reads from."""
    graph = execution_graph(job, graph_name)
    wired: dict[str, dict[str, list[str]]] = {}
    for invocation, inputs in graph.dependencies.items():
        name = invocation.alias or invocation.name
        wired[name] = {}
        for input_name, dependency in inputs.items():
            if isinstance(dependency, dg.MultiDependencyDefinition):
                upstream = [d.node for d in dependency.get_node_dependencies()]
            else:
                assert isinstance(dependency, dg.DependencyDefinition)
                upstream = [dependency.node]
            wired[name][input_name] = upstream
    return wired


def comparable(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A materialization's metadata without what differs between any two runs (timings)."""
    return {
        k: TOOK.sub("Took <time>", v) if isinstance(v, str) else v
        for k, v in metadata.items()
        if k not in VOLATILE
    }


def key_states(ledger: ActionLedger, playbook: str) -> dict[str, str]:
    rows = ledger.actions(playbook=playbook)
    return dict(zip(rows["idempotency_key"], rows["state"], strict=True))


def queue_of(ledger: ActionLedger, playbook: str) -> set[tuple[str, str, str]]:
    rows = ledger.escalations(playbook=playbook)
    return set(zip(rows["idempotency_key"], rows["entity_id"], rows["kind"], strict=True))


def act_keys_by_action(plan: pd.DataFrame) -> dict[str, set[str]]:
    acting = plan[plan["decision"].astype(str) == "act"]
    return {
        str(action): set(group["idempotency_key"])
        for action, group in acting.groupby(acting["action"].astype(str))
    }


@pytest.fixture(scope="module")
def dead_worker() -> str:
    """The worker id of a process on this machine that has exited."""
    code = "from autoexec_dagster.ledger.liveness import new_worker_id as w; print(w())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


# -- 1. the shard of a key --------------------------------------------------------------------


def test_shard_of_is_the_same_in_a_process_with_another_hash_seed() -> None:
    keys = [f"key-{i}" for i in range(300)] + idempotency_keys(
        insight=INSIGHT,
        partition_key=PARTITION,
        actions=["retention_email"] * 200,
        entity_ids=[f"C{i:06d}" for i in range(200)],
    )
    counts = (2, 3, 7, MAX_SHARDS)
    here = {n: [shard_of(k, n) for k in keys] for n in counts}
    code = (
        "import json, sys\n"
        "from autoexec_dagster.executor.sharding import shard_of\n"
        "keys = json.load(sys.stdin)\n"
        f"print(json.dumps({{n: [shard_of(k, n) for k in keys] for n in {counts!r}}}))\n"
    )
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(keys),
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        there = {int(n): shards for n, shards in json.loads(done.stdout).items()}
        assert there == here


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_shard_of_is_in_range_and_balanced(shards: int) -> None:
    n = 30_000
    keys = idempotency_keys(
        insight=INSIGHT,
        partition_key=PARTITION,
        actions=["retention_email"] * n,
        entity_ids=[f"C{i:06d}" for i in range(n)],
    )
    counts = Counter(shard_of(k, shards) for k in keys)
    assert set(counts) == set(range(shards))
    # About 3.5 standard deviations at 7 shards, 8.7 at 2: never by chance, and the keys are
    # fixed, so the outcome is too.
    for shard in range(shards):
        assert abs(counts[shard] / n - 1 / shards) <= 0.05 / shards, counts
    assert all(shard_of(k, 1) == 0 for k in keys[:1000])


@pytest.mark.parametrize("shards", [0, -1, MAX_SHARDS + 1, 2.0, "3", True, None])
def test_check_shards_refuses_what_is_not_a_usable_number_of_shards(shards: Any) -> None:
    with pytest.raises(ValueError, match=f"shards must be an integer from 1 to {MAX_SHARDS}"):
        check_shards(shards)


@pytest.mark.parametrize("shards", [1, 2, MAX_SHARDS])
def test_check_shards_accepts_one_to_max_shards(shards: int) -> None:
    assert check_shards(shards) == shards


# -- 2. each shard's share of a channel's limits -----------------------------------------------


def channel(concurrency: int = 32, rate: float = 0.0, **fields: Any) -> PythonChannel:
    return PythonChannel.from_callable(
        Recorder(), max_concurrency=concurrency, rate_limit_per_second=rate, **fields
    )


@pytest.mark.parametrize("concurrency", [1, 3, 7, 32, 2048])
@pytest.mark.parametrize("rate", [0.0, 0.1, 333.3])
@pytest.mark.parametrize("shares", [1, 2, 3, 7, MAX_SHARDS])
def test_shard_limits_divide_concurrency_and_rate(
    concurrency: int, rate: float, shares: int
) -> None:
    limit, per_second = shard_limits(channel(concurrency, rate), shares)

    assert limit == max(1, concurrency // shares)
    assert per_second == pytest.approx(rate / shares)
    if rate == 0:
        assert per_second == 0  # no limit stays no limit
    else:
        assert per_second > 0 and math.fsum([per_second] * shares) <= rate * (1 + 1e-12)
    if concurrency >= shares:
        assert limit * shares <= concurrency
    else:
        assert limit == 1  # each shard still sends (the README asks for a concurrency >= N)
    if shares == 1:
        assert (limit, per_second) == (concurrency, rate)


@pytest.mark.parametrize("shares", [0, -3])
def test_shard_limits_refuse_no_shares(shares: int) -> None:
    with pytest.raises(ValueError, match="shares must be at least 1"):
        shard_limits(channel(), shares)


class InFlight:
    """An async destination counting the requests in flight at once (it yields while busy)."""

    def __init__(self) -> None:
        self.active = 0
        self.most = 0
        self.keys: list[str] = []

    async def __call__(self, request: ActionRequest) -> str:
        self.active += 1
        self.most = max(self.most, self.active)
        self.keys.append(request.idempotency_key)
        for _ in range(50):
            await asyncio.sleep(0)  # let every other sender of the lane start its request
        self.active -= 1
        return "ok"


@pytest.mark.parametrize(("shards", "in_flight"), [(1, 6), (3, 2)])
def test_a_shard_sends_with_its_share_of_the_concurrency(
    tmp_path: Path, shards: int, in_flight: int
) -> None:
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    playbook = churn_playbook(max_flagged_fraction=0.9)
    destination = InFlight()
    channels: dict[str, Channel] = {
        "retention_email": PythonChannel.from_callable(destination, max_concurrency=6),
        "crm_task": PythonChannel.from_callable(Recorder()),
    }
    plan = route(churn_scores(400, seed=2), playbook, partition_key=PARTITION, insight_name=INSIGHT)
    prepared = prepare_partition(
        plan, playbook=playbook, ledger=ledger, channels=channels, shards=shards
    )
    own = prepared.keys_of(0)["retention_email"]
    assert len(own) > 3 * in_flight

    deliver_shard(prepared, shard=0, playbook=playbook, ledger=ledger, channels=channels)

    assert sorted(destination.keys) == sorted(own)
    assert destination.most == in_flight


# -- 3. a sharded job end to end ---------------------------------------------------------------


def test_the_sharded_graph_has_record_deliver_merge_and_one_shard_keeps_the_execute_step(
    tmp_path: Path,
) -> None:
    frames = {"p1": churn_scores(20)}
    graph = f"{PLAYBOOK}_execution"
    sharded = make_project(folder(tmp_path / "three"), frames, shards=3)
    single = make_project(folder(tmp_path / "one"), frames, shards=1)
    default = make_project(folder(tmp_path / "default"), frames)

    route_op, record, merge = f"{PLAYBOOK}_route", f"{PLAYBOOK}_record", f"{PLAYBOOK}_merge"
    delivers = [f"{PLAYBOOK}_deliver_{k}" for k in range(3)]
    escalate, summarize = f"{PLAYBOOK}_escalate", f"{PLAYBOOK}_summarize"
    assert wiring(sharded.defs.resolve_job_def(JOB), graph) == {
        route_op: {},
        record: {"routed_plan": [route_op]},
        **{deliver: {"prepared": [record]} for deliver in delivers},
        merge: {"prepared": [record], "shard_reports": delivers},
        escalate: {"report": [merge]},
        summarize: {"report": [merge], "escalations": [escalate]},
    }
    execute = f"{PLAYBOOK}_execute"
    unsharded = {
        route_op: {},
        execute: {"routed_plan": [route_op]},
        escalate: {"report": [execute]},
        summarize: {"report": [execute], "escalations": [escalate]},
    }
    assert wiring(single.defs.resolve_job_def(JOB), graph) == unsharded
    assert wiring(default.defs.resolve_job_def(JOB), graph) == unsharded
    ops = execution_graph(sharded.defs.resolve_job_def(JOB), graph)
    shard_tags = {
        k: ops.node_named(f"{PLAYBOOK}_deliver_{k}").definition.tags.get("autoexec/shard")
        for k in range(3)
    }
    assert shard_tags == {0: "0", 1: "1", 2: "2"}


@pytest.mark.parametrize("shards", [2, 3])
def test_a_sharded_partition_delivers_each_action_once_and_ends_as_an_unsharded_one(
    tmp_path: Path, ledger_url: str, shards: int
) -> None:
    frame = churn_scores(500, seed=11)
    sharded = project_on(tmp_path / "sharded", {"p1": frame}, ledger_url=ledger_url, shards=shards)
    single = make_project(folder(tmp_path / "single"), {"p1": frame.copy()}, shards=1)
    for project in (sharded, single):
        project.materialize_insight("p1")

    first = sharded.run("p1")
    baseline = single.run("p1")

    assert first.success and baseline.success, step_failures(first) or step_failures(baseline)
    steps = {str(e.step_key).rsplit(".", 1)[-1] for e in first.all_events if e.step_key}
    assert {f"{PLAYBOOK}_deliver_{k}" for k in range(shards)} | {
        f"{PLAYBOOK}_record",
        f"{PLAYBOOK}_merge",
    } <= steps
    assert f"{PLAYBOOK}_execute" not in steps and f"{PLAYBOOK}_deliver_{shards}" not in steps

    plan = sharded.expected_plan("p1")
    acts = set().union(*act_keys_by_action(plan).values())
    assert len(acts) > 100
    assert Counter(sharded.recorder.keys) == Counter(acts)  # each exactly once
    assert Counter(single.recorder.keys) == Counter(acts)

    # Each shard delivered the keys that hash to it, under its own worker id.
    rows = sharded.ledger.actions(playbook=PLAYBOOK, states=[schema.SUCCEEDED])
    by_worker = rows.groupby("worker")["idempotency_key"].apply(set).to_dict()
    assert sorted(map(sorted, by_worker.values())) == sorted(
        sorted(k for k in acts if shard_of(k, shards) == shard) for shard in range(shards)
    )
    assert set(rows["run_id"]) == {first.run_id}

    # The ledger and every materialization end as the unsharded run's.
    assert key_states(sharded.ledger, PLAYBOOK) == key_states(single.ledger, PLAYBOOK)
    assert queue_of(sharded.ledger, PLAYBOOK) == queue_of(single.ledger, PLAYBOOK)
    found, expected = materializations(first), materializations(baseline)
    assert (
        set(found)
        == set(expected)
        == {
            f"{PLAYBOOK}/plan",
            f"{PLAYBOOK}/actions",
            f"{PLAYBOOK}/escalations",
        }
    )
    for asset in found:
        assert comparable(found[asset]) == comparable(expected[asset]), asset
    actions = found[f"{PLAYBOOK}/actions"]
    assert actions["succeeded"] == actions["run_succeeded"] == len(acts)
    assert actions["status"] == "completed" and "pending" not in actions
    assert "run_pending" not in actions and "run_in_doubt_recovered" not in actions

    again = sharded.run("p1")

    assert again.success
    assert len(sharded.recorder.keys) == len(acts)  # nothing resent
    rerun = materializations(again)[f"{PLAYBOOK}/actions"]
    assert rerun["run_already_done"] == len(plan) and rerun["run_succeeded"] == 0
    assert rerun["succeeded"] == len(acts)
    assert key_states(sharded.ledger, PLAYBOOK) == key_states(single.ledger, PLAYBOOK)


def test_a_pause_before_the_shards_fails_them_and_a_rerun_after_resume_finishes(
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path, {"p1": churn_scores(200, seed=4)}, shards=3)
    project.materialize_insight("p1")
    project.ledger.pause(PLAYBOOK, reason="incident 7", by="ops")

    paused = project.run("p1")

    assert not paused.success
    failures = step_failures(paused)
    [record] = [k for k in failures if k.endswith(f"{PLAYBOOK}_record")]
    assert "incident 7" in failures[record] and "autoexec resume" in failures[record]
    assert project.recorder.keys == []

    project.ledger.resume(PLAYBOOK, by="ops")
    resumed = project.run("p1")

    assert resumed.success
    acts = set().union(*act_keys_by_action(project.expected_plan("p1")).values())
    assert Counter(project.recorder.keys) == Counter(acts)


# -- 4. workflows under shards -----------------------------------------------------------------


def sharded_tick(
    plan: pd.DataFrame,
    *,
    playbook: Playbook,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    shards: int,
) -> ExecutionReport:
    """One run of the sharded job for a partition: record, each shard, merge."""
    prepared = prepare_partition(
        plan, playbook=playbook, ledger=ledger, channels=channels, shards=shards
    )
    reports = [
        deliver_shard(prepared, shard=k, playbook=playbook, ledger=ledger, channels=channels)
        for k in range(shards)
    ]
    return merge_shards(prepared, reports, playbook=playbook, ledger=ledger, channels=channels)


def workflow_counts(report: ExecutionReport) -> dict[str, Any]:
    flow = report.workflows
    assert isinstance(flow, WorkflowReport)
    counts = flow.as_dict()
    counts.pop("duration_seconds")
    return {"workflows_started": report.workflows_started, **counts}


def test_workflows_advance_under_shards_as_they_do_unsharded(
    tmp_path: Path, ledger_url: str
) -> None:
    playbook = remediation_playbook()
    frame, causes = hosts()
    plan = route(frame, playbook, partition_key=HOUR)
    runs: dict[str, tuple[list[dict[str, Any]], ActionLedger, Fleet]] = {}
    for name, url in (("single", f"sqlite:///{tmp_path / 'single.db'}"), ("sharded", ledger_url)):
        clock = Clock(START)
        ledger = ActionLedger(url, clock=clock)
        fleet = Fleet(clock=clock, causes=causes)
        channels: dict[str, Channel] = {a: fleet.channel(a) for a in ACTIONS}
        ticks: list[dict[str, Any]] = []
        for _ in range(30):
            if name == "single":
                report = execute_plan(plan, playbook=playbook, ledger=ledger, channels=channels)
            else:
                report = sharded_tick(
                    plan, playbook=playbook, ledger=ledger, channels=channels, shards=3
                )
            ticks.append(workflow_counts(report))
            if ledger.next_due(playbook=playbook.name) is None:
                break
            clock.advance(timedelta(seconds=60))
        runs[name] = (ticks, ledger, fleet)

    (single, single_ledger, single_fleet), (sharded, sharded_ledger, sharded_fleet) = (
        runs["single"],
        runs["sharded"],
    )
    assert sharded == single
    assert single[0]["workflows_started"] > 0 and 3 < len(single) < 30
    assert sum(t["succeeded"] for t in single) > 0 and sum(t["failed"] for t in single) > 0
    # The same steps reached the same hosts, each attempt once.
    assert sorted(sharded_fleet.calls) == sorted(single_fleet.calls)
    assert max(Counter(k for k, _, _ in sharded_fleet.calls).values()) == 1

    def outcome(ledger: ActionLedger) -> dict[str, str]:
        instances = ledger.instances(playbook=playbook.name)
        return dict(zip(instances["entity_id"], instances["state"], strict=True))

    assert outcome(sharded_ledger) == outcome(single_ledger)
    assert set(outcome(single_ledger).values()) == {"succeeded", "failed"}
    assert queue_of(sharded_ledger, playbook.name) == queue_of(single_ledger, playbook.name)
    assert key_states(sharded_ledger, playbook.name) == key_states(single_ledger, playbook.name)


def host_project(tmp_path: Path, *, shards: int) -> tuple[dg.Definitions, Clock, Any]:
    """The workflow sensor tests' host project (6 hosts, diagnose then poll), with ``shards``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    clock = Clock(START)
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)

    @dg.asset(name="host_scores", partitions_def=dg.StaticPartitionsDefinition(["p1"]))
    def host_scores() -> pd.DataFrame:
        return hosts_frame()

    io = dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))
    defs = dg.Definitions.merge(
        dg.Definitions(assets=[host_scores], resources={"io_manager": io}),
        build_execution_defs(
            insight=host_scores,
            playbook=host_playbook(),
            channels={
                "diagnose": PythonChannel.from_callable(diagnose),
                "health": PythonChannel.from_callable(health),
            },
            ledger=ledger,
            shards=shards,
        ),
    )
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize(
        [host_scores], partition_key="p1", instance=instance, resources={"io_manager": io}
    ).success
    return defs, clock, instance


def test_the_sharded_job_advances_workflows_run_after_run_as_the_unsharded_job(
    tmp_path: Path,
) -> None:
    every = timedelta(seconds=30)
    seen: dict[int, list[dict[str, Any]]] = {}
    for shards in (1, 3):
        defs, clock, instance = host_project(tmp_path / str(shards), shards=shards)
        start = clock.now
        runs = []
        for offset in (0, 2, 4):
            clock.now = start + offset * every
            result = defs.resolve_job_def("hosts_execution_job").execute_in_process(
                partition_key="p1", instance=instance
            )
            assert result.success
            steps = {str(e.step_key).rsplit(".", 1)[-1] for e in result.all_events if e.step_key}
            assert ("hosts_deliver_2" in steps) == (shards == 3)
            assert ("hosts_execute" in steps) == (shards == 1)
            runs.append(
                {
                    asset: comparable(metadata)
                    for asset, metadata in materializations(result).items()
                }
            )
        seen[shards] = runs

    assert seen[3] == seen[1]
    last = seen[3][-1]["hosts/actions"]
    assert (last["workflows_succeeded"], last["workflows_failed"]) == (5, 1)
    assert seen[3][1]["hosts/actions"]["run_workflow_steps_delivered"] == 6


# -- 5. crash recovery across shards -----------------------------------------------------------


class Setup:
    """A prepared three-shard partition of the churn playbook on a ledger, with its channels."""

    def __init__(
        self,
        ledger_url: str,
        *,
        rows: int = 300,
        crm_delivery: str = "at_least_once",
        playbook: Playbook | None = None,
    ):
        self.ledger = ActionLedger(ledger_url)
        self.playbook = playbook or churn_playbook(max_flagged_fraction=0.9)
        self.recorder = Recorder()
        self.channels: dict[str, Channel] = {
            "retention_email": PythonChannel.from_callable(self.recorder),
            "crm_task": PythonChannel.from_callable(self.recorder, delivery=crm_delivery),
        }
        self.plan = route(
            churn_scores(rows, seed=9), self.playbook, partition_key=PARTITION, insight_name=INSIGHT
        )
        self.acts = act_keys_by_action(self.plan)
        self.prepared = self.prepare()

    def prepare(self) -> PreparedPartition:
        return prepare_partition(
            self.plan,
            playbook=self.playbook,
            ledger=self.ledger,
            channels=self.channels,
            shards=3,
            run_id="run-1",
        )

    def deliver(self, shard: int, prepared: PreparedPartition | None = None) -> ExecutionReport:
        return deliver_shard(
            prepared or self.prepared,
            shard=shard,
            playbook=self.playbook,
            ledger=self.ledger,
            channels=self.channels,
            run_id="run-1",
        )

    def merge(
        self, reports: list[ExecutionReport], prepared: PreparedPartition | None = None
    ) -> ExecutionReport:
        return merge_shards(
            prepared or self.prepared,
            reports,
            playbook=self.playbook,
            ledger=self.ledger,
            channels=self.channels,
            run_id="run-1",
        )

    def own(self, shard: int) -> set[str]:
        return {k for keys in self.prepared.keys_of(shard).values() for k in keys}

    def claim(self, keys: list[str], *, worker: str, lease_seconds: float) -> None:
        claimed = self.ledger.claim(keys, worker=worker, lease_seconds=lease_seconds, run_id="dead")
        assert sorted(i.key for i in claimed) == sorted(keys)

    @property
    def all_acts(self) -> set[str]:
        return set().union(*self.acts.values())


def test_prepare_records_once_and_splits_the_keys_between_the_shards(ledger_url: str) -> None:
    setup = Setup(ledger_url)
    prepared = setup.prepared

    assert prepared.shards == 3 and not prepared.halted
    assert {a: set(k) for a, k in prepared.to_send.items()} == setup.acts
    parts = [setup.own(k) for k in range(3)]
    assert all(parts) and set().union(*parts) == setup.all_acts
    assert sum(map(len, parts)) == len(setup.all_acts)  # disjoint
    for shard, part in enumerate(parts):
        assert all(shard_of(k, 3) == shard for k in part)
    states = setup.ledger.states(sorted(setup.all_acts))
    assert {state for state, _ in states.values()} == {schema.RESERVED}
    assert prepared.report.escalated > 0 and prepared.report.succeeded == 0
    assert setup.recorder.keys == []
    with pytest.raises(ValueError, match="shard must be from 0 to 2, got 3"):
        setup.deliver(3)
    with pytest.raises(ValueError, match="shard must be from 0 to 2, got -1"):
        setup.deliver(-1)


def test_prepare_refuses_a_bad_shard_count_before_recording_anything(sqlite_url: str) -> None:
    ledger = ActionLedger(sqlite_url)
    playbook = churn_playbook(max_flagged_fraction=0.9)
    plan = route(churn_scores(50), playbook, partition_key=PARTITION, insight_name=INSIGHT)
    with pytest.raises(ValueError, match="shards must be an integer"):
        prepare_partition(
            plan,
            playbook=playbook,
            ledger=ledger,
            channels=recording_channels(Recorder()),
            shards=0,
        )
    assert ledger.actions().empty


def test_a_live_shards_sweep_recovers_only_what_dead_siblings_held(
    ledger_url: str, dead_worker: str
) -> None:
    setup = Setup(ledger_url, crm_delivery="at_most_once")
    one, two = setup.prepared.keys_of(1), setup.prepared.keys_of(2)
    expired_resend = one["retention_email"][:3]  # lease ran out, at least once: resent
    expired_escalate = one["crm_task"][:2]  # lease ran out, at most once: escalated
    gone = two["retention_email"][:2]  # its process is gone on this machine: resent
    live = two["crm_task"][:2]  # a live worker elsewhere: left alone
    by_rules = setup.prepared.report.escalated  # the merge adds to this very report
    assert by_rules > 0
    expired = ELSEWHERE.format("expired")
    setup.claim(expired_resend + expired_escalate, worker=expired, lease_seconds=-30)
    setup.claim(gone, worker=dead_worker, lease_seconds=3600)
    setup.claim(live, worker=ELSEWHERE.format("live"), lease_seconds=3600)

    first = setup.deliver(0)

    resent = set(expired_resend) | set(gone)
    assert Counter(setup.recorder.keys) == Counter(setup.own(0) | resent)
    assert first.in_doubt_recovered == len(resent) + len(expired_escalate)
    assert first.succeeded == len(setup.own(0)) + len(resent)
    assert first.escalated == len(expired_escalate) and first.failed == 0
    assert first.pending == 0 and not first.paused_reason
    states = setup.ledger.states(sorted(setup.all_acts))
    assert {k for k, (s, _) in states.items() if s == schema.SUCCEEDED} == setup.own(0) | resent
    assert {k for k, (s, _) in states.items() if s == schema.ESCALATED} == set(expired_escalate)
    assert {k: states[k] for k in live} == {
        k: (schema.SENDING, ELSEWHERE.format("live")) for k in live
    }
    untouched = (setup.own(1) | setup.own(2)) - resent - set(expired_escalate) - set(live)
    assert {states[k][0] for k in untouched} == {schema.RESERVED}
    in_doubt = setup.ledger.escalations(playbook=PLAYBOOK, kind="in_doubt")
    assert set(in_doubt["idempotency_key"]) == set(expired_escalate)

    # Shard 1 delivers the rest of its keys; what the sweep finished is not sent again.
    second = setup.deliver(1)
    finished_by_sweep = len(expired_resend) + len(expired_escalate)
    assert second.succeeded == len(setup.own(1)) - finished_by_sweep
    assert second.in_doubt_recovered == 0
    assert second.claimed_elsewhere == second.pending == finished_by_sweep

    # Shard 2 never ran: the merge delivers its leftovers and recounts what is pending.
    merged = setup.merge([first, second])

    sent = setup.all_acts - set(expired_escalate) - set(live)
    assert Counter(setup.recorder.keys) == Counter(sent)  # nothing lost, nothing twice
    assert merged.succeeded == len(sent)
    assert merged.pending == len(live)  # held by the live worker, not the sweep's leftovers
    assert merged.in_doubt_recovered == len(resent) + len(expired_escalate)
    assert merged.escalated == by_rules + len(expired_escalate)
    assert merged.total == len(setup.plan) and merged.skipped > 0
    assert merged.by_action["retention_email"]["succeeded"] == len(setup.acts["retention_email"])
    states = setup.ledger.states(sorted(setup.all_acts))
    assert {k for k, (s, _) in states.items() if s == schema.SENDING} == set(live)

    # The live worker finishes; a rerun of the partition sends nothing.
    assert setup.ledger.complete(
        [Outcome(key=k, state=schema.SUCCEEDED, attempts=1) for k in live],
        worker=ELSEWHERE.format("live"),
    ) == len(live)
    prepared = setup.prepare()
    assert not any(prepared.to_send.values())
    rerun = setup.merge([setup.deliver(k, prepared) for k in range(3)], prepared)
    assert Counter(setup.recorder.keys) == Counter(sent)
    assert rerun.already_done == len(setup.plan) and rerun.succeeded == rerun.pending == 0


def test_a_shards_step_run_again_recovers_what_its_dead_run_held(ledger_url: str) -> None:
    setup = Setup(ledger_url)
    mine = sorted(setup.own(1))
    half = mine[: len(mine) // 2]
    setup.claim(half, worker=ELSEWHERE.format("dead-run"), lease_seconds=-5)

    again = setup.deliver(1)

    assert Counter(setup.recorder.keys) == Counter(mine)
    assert again.in_doubt_recovered == len(half) and again.succeeded == len(mine)
    states = setup.ledger.states(sorted(setup.all_acts))
    assert {k for k, (s, _) in states.items() if s == schema.SUCCEEDED} == set(mine)


def test_the_sweep_never_takes_a_live_siblings_claims(ledger_url: str) -> None:
    setup = Setup(ledger_url)
    sibling = sorted(setup.own(1))[:5]
    setup.claim(sibling, worker=new_worker_id(), lease_seconds=3600)  # this very process: alive

    report = setup.deliver(0)

    assert Counter(setup.recorder.keys) == Counter(setup.own(0))
    assert report.in_doubt_recovered == 0
    assert {s for s, _ in setup.ledger.states(sibling).values()} == {schema.SENDING}


def test_shards_running_at_once_deliver_each_action_once(ledger_url: str) -> None:
    setup = Setup(ledger_url, rows=1_500)

    with ThreadPoolExecutor(max_workers=3) as pool:
        reports = list(pool.map(setup.deliver, range(3)))
    merged = setup.merge(reports)

    assert Counter(setup.recorder.keys) == Counter(setup.all_acts)
    assert [r.succeeded for r in reports] == [len(setup.own(k)) for k in range(3)]
    assert merged.succeeded == len(setup.all_acts) and merged.pending == 0
    states = setup.ledger.states(sorted(setup.all_acts))
    assert {s for s, _ in states.values()} == {schema.SUCCEEDED}


def test_a_pause_between_recording_and_the_shards_leaves_everything_pending(
    sqlite_url: str,
) -> None:
    setup = Setup(sqlite_url)
    setup.ledger.pause(PLAYBOOK, reason="incident 9", by="ops")

    reports = [setup.deliver(k) for k in range(3)]
    merged = setup.merge(reports)

    assert setup.recorder.keys == []
    for shard, report in enumerate(reports):
        assert report.pending == len(setup.own(shard)) and "incident 9" in str(report.paused_reason)
    assert merged.pending == len(setup.all_acts) and "incident 9" in str(merged.paused_reason)
    assert merged.succeeded == 0 and not merged.ok

    setup.ledger.resume(PLAYBOOK, by="ops")
    prepared = setup.prepare()
    resumed = setup.merge([setup.deliver(k, prepared) for k in range(3)], prepared)

    assert Counter(setup.recorder.keys) == Counter(setup.all_acts)
    assert resumed.succeeded == len(setup.all_acts) and resumed.pending == 0 and resumed.ok


def test_a_blocked_or_dry_run_partition_sends_nothing_from_any_shard(sqlite_url: str) -> None:
    ledger = ActionLedger(sqlite_url)
    recorder = Recorder()
    channels = recording_channels(recorder)
    frame = churn_scores(200, seed=3)
    for playbook, partition, dry_run in (
        (churn_playbook(max_flagged_fraction=0.01), "blocked", None),
        (churn_playbook(max_flagged_fraction=0.9), "dry", True),
    ):
        plan = route(frame, playbook, partition_key=partition, insight_name=INSIGHT)
        prepared = prepare_partition(
            plan, playbook=playbook, ledger=ledger, channels=channels, shards=3, dry_run=dry_run
        )
        reports = [
            deliver_shard(prepared, shard=k, playbook=playbook, ledger=ledger, channels=channels)
            for k in range(3)
        ]
        merged = merge_shards(
            prepared, reports, playbook=playbook, ledger=ledger, channels=channels
        )
        assert recorder.keys == []
        assert all(r.succeeded == r.pending == 0 for r in reports)
        if dry_run:
            assert merged.dry_run and merged.dry_run_actions == len(
                set().union(*act_keys_by_action(plan).values())
            )
        else:
            assert prepared.halted and "above the playbook's max_flagged_fraction of 1.0%" in str(
                merged.blocked_reason
            )
            assert merged.escalated == merged.flagged > 0
        assert merged.succeeded == merged.pending == 0
    assert "succeeded" not in set(ledger.actions()["state"])


def test_the_merge_delivers_what_people_approved_once(ledger_url: str) -> None:
    setup = Setup(ledger_url, playbook=proposing_playbook())
    first = setup.merge([setup.deliver(k) for k in range(3)])
    assert first.approved_actions is not None and first.approved_actions.succeeded == 0
    sent = len(setup.recorder.keys)
    assert sent == first.succeeded == len(setup.all_acts)
    queue = setup.ledger.select_escalations(playbook=PLAYBOOK, rule="vip_at_risk")
    approved = queue["idempotency_key"].tolist()[:2]
    assert len(approved) == 2
    setup.ledger.approve_escalations(approved, by="ana", via="cli")

    def tick() -> ExecutionReport:
        prepared = setup.prepare()
        return setup.merge([setup.deliver(k, prepared) for k in range(3)], prepared)

    second = tick()

    assert second.approved_actions is not None and second.approved_actions.succeeded == 2
    assert len(setup.recorder.keys) == sent + 2
    assert Counter(setup.recorder.keys).most_common(1)[0][1] == 1
    third = tick()
    assert third.approved_actions is not None and third.approved_actions.succeeded == 0
    assert len(setup.recorder.keys) == sent + 2


# -- 6. options and the component --------------------------------------------------------------


def build(**options: Any) -> dg.Definitions:
    spec = dg.AssetSpec(INSIGHT, partitions_def=dg.StaticPartitionsDefinition(["p1"]))
    return build_execution_defs(
        insight=spec,
        playbook=churn_playbook(),
        channels=recording_channels(Recorder()),
        ledger="sqlite:///unused.db",
        **options,
    )


def job_of(defs: dg.Definitions, *more: dg.Definitions) -> dg.JobDefinition:
    spec = dg.AssetSpec(INSIGHT, partitions_def=dg.StaticPartitionsDefinition(["p1"]))
    return dg.Definitions.merge(dg.Definitions(assets=[spec]), *more, defs).resolve_job_def(JOB)


@pytest.mark.parametrize("shards", [0, -2, MAX_SHARDS + 1, 2.5, "3"])
def test_build_execution_defs_refuses_a_bad_shard_count(shards: Any) -> None:
    with pytest.raises(ValueError, match=f"shards must be an integer from 1 to {MAX_SHARDS}"):
        build(shards=shards)


def test_build_execution_defs_refuses_execute_fn_with_shards() -> None:
    def execute_fn(*args: Any, **kwargs: Any) -> ExecutionReport:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="execute_fn replaces the single execute step"):
        build(shards=2, execute_fn=execute_fn)
    assert job_of(build(shards=1, execute_fn=execute_fn)).executor_def.name == "in_process"


@pytest.mark.parametrize("lease", [0, -1.0])
def test_build_execution_defs_refuses_a_lease_that_is_not_positive(lease: float) -> None:
    with pytest.raises(ValueError, match="lease_seconds must be positive"):
        build(shards=2, lease_seconds=lease)


def test_the_executor_is_in_process_for_one_shard_and_the_locations_for_more() -> None:
    assert job_of(build()).executor_def.name == "in_process"
    assert job_of(build(shards=1)).executor_def.name == "in_process"
    default = job_of(build(shards=3)).executor_def
    assert default.name != "in_process"
    assert default is dg.multi_or_in_process_executor

    configured = dg.multiprocess_executor.configured({"max_concurrent": 2})
    location = dg.Definitions(executor=configured)
    assert job_of(build(shards=3), location).executor_def is configured
    # One shard keeps its in-process executor whatever the location says.
    assert job_of(build(shards=1), location).executor_def.name == "in_process"


@pytest.mark.parametrize("shards", [1, 3])
def test_executor_def_is_honoured(shards: int) -> None:
    given = dg.multiprocess_executor if shards == 1 else dg.in_process_executor
    assert job_of(build(shards=shards, executor_def=given)).executor_def is given


def test_the_component_builds_shards_from_yaml(tmp_path: Path) -> None:
    playbook = json_ready(churn_playbook(max_flagged_fraction=0.9))
    component = ExecutionComponent.resolve_from_yaml(
        yaml.safe_dump(attributes(tmp_path, playbook=playbook, shards=3))
    )
    assert component.shards == 3
    built = component.build_defs(dg.ComponentTree.for_test().load_context)
    spec = dg.AssetSpec(INSIGHT, partitions_def=dg.StaticPartitionsDefinition(["p1", "p2"]))
    job = dg.Definitions.merge(dg.Definitions(assets=[spec]), built).resolve_job_def(JOB)

    ops = set(wiring(job, f"{PLAYBOOK}_execution"))
    assert {f"{PLAYBOOK}_record", f"{PLAYBOOK}_merge"} <= ops
    assert {f"{PLAYBOOK}_deliver_{k}" for k in range(3)} <= ops
    assert f"{PLAYBOOK}_execute" not in ops and f"{PLAYBOOK}_deliver_3" not in ops
    assert job.executor_def.name != "in_process"

    one = ExecutionComponent.resolve_from_yaml(
        yaml.safe_dump(attributes(tmp_path, playbook=playbook))
    )
    assert one.shards == 1
    single = dg.Definitions.merge(
        dg.Definitions(assets=[spec]), one.build_defs(dg.ComponentTree.for_test().load_context)
    ).resolve_job_def(JOB)
    assert f"{PLAYBOOK}_execute" in set(wiring(single, f"{PLAYBOOK}_execution"))


@pytest.mark.parametrize(
    ("shards", "message"),
    [(0, "greater than or equal to 1"), (MAX_SHARDS + 1, f"less than or equal to {MAX_SHARDS}")],
)
def test_the_component_refuses_a_bad_shard_count(tmp_path: Path, shards: int, message: str) -> None:
    text = yaml.safe_dump(
        attributes(tmp_path, playbook=json_ready(churn_playbook()), shards=shards)
    )
    with pytest.raises(ValueError, match="shards") as raised:
        ExecutionComponent.resolve_from_yaml(text)
    assert message in str(raised.value)


def test_a_component_overriding_execute_cannot_have_shards(tmp_path: Path) -> None:
    component = AuditedExecution.resolve_from_yaml(
        yaml.safe_dump(attributes(tmp_path, playbook=json_ready(churn_playbook()), shards=2))
    )
    with pytest.raises(ValueError, match=r"AuditedExecution overrides execute\(\), which replaces"):
        component.build_defs(dg.ComponentTree.for_test().load_context)


# -- 7. the pieces -----------------------------------------------------------------------------


def rows(n: int, *, prefix: str = "k") -> list[dict[str, Any]]:
    return [
        {
            "idempotency_key": f"{prefix}{i}",
            "playbook": "pb",
            "playbook_version": "v1",
            "insight": "scores",
            "partition_key": PARTITION,
            "entity_id": f"E{i}",
            "rule": "r",
            "action": "email",
            "decision": "act",
            "state": schema.RESERVED,
            "delivery": "at_least_once",
        }
        for i in range(n)
    ]


def test_stale_claims_are_the_sending_rows_of_dead_workers(
    ledger_url: str, dead_worker: str
) -> None:
    ledger = ActionLedger(ledger_url)
    ledger.reserve(rows(7))
    ledger.claim(["k0"], worker=ELSEWHERE.format("a"), lease_seconds=-1, run_id=None)  # expired
    ledger.claim(["k1"], worker=ELSEWHERE.format("b"), lease_seconds=3600, run_id=None)  # live
    ledger.claim(["k2"], worker=dead_worker, lease_seconds=3600, run_id=None)  # process gone
    me = new_worker_id()
    ledger.claim(["k3"], worker=me, lease_seconds=3600, run_id=None)  # this process
    ledger.claim(["k4"], worker=ELSEWHERE.format("c"), lease_seconds=-1, run_id=None)
    ledger.complete(
        [Outcome(key="k4", state=schema.SUCCEEDED, attempts=1)], worker=ELSEWHERE.format("c")
    )  # expired lease, but finished
    keys = [f"k{i}" for i in range(7)] + ["missing"]

    assert sorted(ledger.stale_claims(keys)) == ["k0", "k2"]
    assert sorted(ledger.stale_claims(keys, now=10**12)) == ["k0", "k1", "k2", "k3"]
    assert ledger.stale_claims(["k0"], now=0) == []
    assert ledger.stale_claims([]) == []
    # Reading changes nothing; recover agrees with it and then moves those rows.
    assert ledger.states(["k0", "k2"]) == {
        "k0": (schema.SENDING, ELSEWHERE.format("a")),
        "k2": (schema.SENDING, dead_worker),
    }
    assert sorted(ledger.recover(keys)) == ["k0", "k2"]
    assert ledger.stale_claims(keys) == []


@pytest.mark.postgres
def test_stale_claims_do_not_wait_for_a_row_another_transaction_locks(postgres_url: str) -> None:
    ledger = ActionLedger(postgres_url)
    ledger.reserve(rows(2))
    ledger.claim(["k0", "k1"], worker=ELSEWHERE.format("x"), lease_seconds=-1, run_id=None)
    locker = sa.create_engine(postgres_url)
    t = schema.actions
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        with locker.connect() as conn, conn.begin():
            conn.execute(
                sa.select(t.c.idempotency_key).where(t.c.idempotency_key == "k0").with_for_update()
            )
            # A locking read would wait for this transaction, which ends only after the result
            # (or after the timeout, which then fails the test instead of hanging it).
            found = pool.submit(ledger.stale_claims, ["k0", "k1"]).result(timeout=30)
    finally:
        pool.shutdown(wait=True)
        locker.dispose()
    assert sorted(found) == ["k0", "k1"]


def test_add_delivery_adds_what_delivery_counts_and_keeps_what_recording_counted() -> None:
    base = ExecutionReport(
        playbook="pb",
        playbook_version="v1",
        insight="scores",
        partition_key=PARTITION,
        total=100,
        flagged=40,
        escalated=5,
        skipped=60,
        held_out=3,
        already_done=2,
        workflows_started=4,
    )
    base.count("email", "escalated", 5)
    base.note_escalation("rule: vip", 5)
    shard = ExecutionReport(
        playbook="pb",
        playbook_version="v1",
        insight="scores",
        partition_key=PARTITION,
        total=999,
        flagged=999,
        skipped=999,
        succeeded=10,
        failed=2,
        escalated=1,
        pending=3,
        claimed_elsewhere=3,
        retries=4,
        in_doubt_recovered=1,
        circuit_opened=["sms"],
        errors=["HTTP 500"],
    )
    shard.count("email", "succeeded", 10)
    shard.count("email", "failed", 2)
    shard.note_escalation("email: delivery failed", 2)
    shard.workflows = WorkflowReport(playbook="pb", advanced=2, succeeded=1, waiting=1)
    other = ExecutionReport(
        playbook="pb",
        playbook_version="v1",
        insight="scores",
        partition_key=PARTITION,
        succeeded=5,
        paused_reason="paused by ops",
        circuit_opened=["sms", "email"],
    )
    other.count("email", "succeeded", 5)
    other.workflows = WorkflowReport(playbook="pb", advanced=3, failed=1)

    base.add_delivery(shard)
    base.add_delivery(other)

    assert (base.total, base.flagged, base.skipped, base.held_out) == (100, 40, 60, 3)
    assert (base.already_done, base.workflows_started) == (2, 4)
    assert (base.succeeded, base.failed, base.escalated) == (15, 2, 6)
    assert (base.pending, base.claimed_elsewhere, base.retries, base.in_doubt_recovered) == (
        3,
        3,
        4,
        1,
    )
    assert dict(base.by_action) == {"email": {"escalated": 5, "succeeded": 15, "failed": 2}}
    assert base.escalation_reasons == {"rule: vip": 5, "email: delivery failed": 2}
    assert base.errors == ["HTTP 500"]
    assert base.circuit_opened == ["sms", "email"]
    assert base.paused_reason == "paused by ops"
    assert isinstance(base.workflows, WorkflowReport)
    assert (base.workflows.advanced, base.workflows.succeeded, base.workflows.failed) == (5, 1, 1)
    assert base.workflows.waiting == 1

    first_pause = ExecutionReport(
        playbook="pb", playbook_version="v1", insight="s", partition_key="", paused_reason="first"
    )
    first_pause.add_delivery(other)
    assert first_pause.paused_reason == "first"


def test_add_delivery_leaves_the_report_it_adds_unchanged() -> None:
    def report(**counts: Any) -> ExecutionReport:
        return ExecutionReport(
            playbook="pb", playbook_version="v1", insight="s", partition_key="", **counts
        )

    total = report()
    first = report(succeeded=1)
    first.workflows = WorkflowReport(playbook="pb", advanced=2, steps_delivered=2)
    second = report(succeeded=1)
    second.workflows = WorkflowReport(playbook="pb", advanced=3, steps_delivered=4)

    total.add_delivery(first)
    total.add_delivery(second)

    assert total.workflows is not None and total.workflows.advanced == 5
    # Adding the second shard must not rewrite what the first shard reported.
    assert (first.workflows.advanced, first.workflows.steps_delivered) == (2, 2)
    assert total.workflows is not first.workflows


def test_add_delivery_keeps_the_error_sample_bounded() -> None:
    base = ExecutionReport(playbook="pb", playbook_version="v1", insight="s", partition_key="")
    for _ in range(3):
        base.add_delivery(
            ExecutionReport(
                playbook="pb",
                playbook_version="v1",
                insight="s",
                partition_key="",
                errors=[f"e{i}" for i in range(15)],
            )
        )
    assert len(base.errors) == 20


def test_workflow_report_add_sums_counts_keeps_the_earliest_due_and_the_longest_duration() -> None:
    early = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    late = early + timedelta(minutes=5)
    total = WorkflowReport(playbook="pb", partition_key=PARTITION, started=7, duration_seconds=1.0)
    first = WorkflowReport(
        playbook="pb",
        advanced=3,
        steps_delivered=5,
        steps_skipped=1,
        waiting=2,
        running=1,
        succeeded=1,
        approvals_requested=1,
        notifications=2,
        next_due=late,
        duration_seconds=4.0,
        errors=["boom"],
    )
    first.count("verify", "waiting", 2)
    first.count("isolate", "delivered", 3)
    second = WorkflowReport(
        playbook="pb",
        advanced=2,
        steps_delivered=2,
        failed=1,
        rejected=1,
        approved=1,
        approved_by_rule=2,
        expired=1,
        escalated=1,
        next_due=early,
        duration_seconds=2.5,
    )
    second.count("verify", "waiting", 1)
    second.count("verify", "failed", 1)

    total.add(first)
    total.add(second)
    total.add(WorkflowReport(playbook="pb"))  # nothing due: next_due stays

    assert total.started == 7  # started by recording, not by the shards
    assert (total.advanced, total.steps_delivered, total.steps_skipped) == (5, 7, 1)
    assert (total.waiting, total.running, total.succeeded, total.failed) == (2, 1, 1, 1)
    assert (total.rejected, total.approvals_requested, total.approved) == (1, 1, 1)
    assert (total.approved_by_rule, total.expired, total.notifications, total.escalated) == (
        2,
        1,
        2,
        1,
    )
    assert total.next_due == early
    assert total.by_step == {
        "verify": {"waiting": 3, "failed": 1},
        "isolate": {"delivered": 3},
    }
    assert total.errors == ["boom"]
    assert total.duration_seconds == 4.0
    assert total.partition_key == PARTITION

    none_due = WorkflowReport(playbook="pb")
    none_due.add(WorkflowReport(playbook="pb", next_due=late))
    assert none_due.next_due == late
