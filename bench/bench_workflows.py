"""Workflow benchmark: instances through a three-step workflow with a poll, and the due-work query.

Targets (issue 7, "Done when"):

* **Steps per second.** ``--instances`` instances (100,000 by default) run ``prepare`` ->
  ``check`` (a poll: ``until`` `check.ready`, every 30 s, timeout 10 min) -> ``finish``, each step
  a signed webhook to :mod:`bench.slow_server` (20 ms per POST). The server answers the poll
  ``{"ready": true}`` at once for about half of the entities and on the second poll for the rest,
  so the run is ``execute_plan`` (start, prepare, first poll, finish for half) plus one
  ``advance_workflows`` after the injected clock moves 30 s (second poll, finish). Steps per
  second = step attempts delivered / wall time of both calls. The baseline, in the same run and
  against the same server: one-shot ``execute_plan`` webhook actions per second
  (``bench.bench_execution.run_execute_plan``, the execution benchmark's own measurement), for as
  many actions as there are instances. Goal: >= 0.8 of the baseline.
* **The due-work query.** ``ledger.due_partitions(playbook=...)`` on a SQLite ledger holding
  ``--due-instances`` instances (1,000,000 by default; 1% active across the latest 100 of 1,000
  hourly partitions, the rest finished), written in bulk with SQLAlchemy Core. Goal: <= 50 ms
  (median of ``--due-repeats``). Baselines on the same file: the same query forced to a full scan
  (``NOT INDEXED``), and the same query with the active states written as SQL literals (what the
  partial index ``ix_autoexec_workflow_due`` needs to be usable on SQLite).
  ``EXPLAIN QUERY PLAN`` is taken of the statement the ledger actually executes (captured from
  the engine), with its own parameters.

Run alone: ``.venv/bin/python -m bench.bench_workflows [--instances N] [--due-instances N]``.
"""

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy import event

from autoexec_dagster.channels.webhook import WebhookChannel
from autoexec_dagster.executor.plan_execution import execute_plan
from autoexec_dagster.ledger import schema
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.playbook import Guardrails, Playbook, Rule
from autoexec_dagster.routing import route
from autoexec_dagster.workflows.advance import advance_workflows
from autoexec_dagster.workflows.workflow import Step, Workflow
from bench.bench_execution import SECRET, run_execute_plan, webhook_insight
from bench.bench_routing import SEED, Check, finish, machine_busy_seconds, other_load
from bench.slow_server import SlowServer

TARGET_RATIO = 0.8
TARGET_DUE_SECONDS = 0.050
LATENCY_MS = 20.0
PLAYBOOK = "workflow_bench"
STEPS = ("prepare", "poll", "finish")
START = datetime(2026, 12, 1, 10, 5, tzinfo=UTC)
POLL_EVERY = timedelta(seconds=30)
DUE_PARTITIONS = 1_000
ACTIVE_PARTITIONS = 100
ACTIVE_SHARE = 0.01


class Clock:
    """The injected clock: time moves when the benchmark says so, never by waiting."""

    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        return self.now


class TimedLedger(ActionLedger):
    """An ``ActionLedger`` that adds up the time and calls of the methods a workflow run uses."""

    def __init__(self, url: str, *, clock: Clock):
        super().__init__(url, clock=clock)
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def _timed(self, name: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            self.calls[name] = self.calls.get(name, 0) + 1

    def reserve(self, *args: Any, **kwargs: Any) -> Any:
        """Timed ``reserve``."""
        return self._timed("reserve", super().reserve, *args, **kwargs)

    def claim(self, *args: Any, **kwargs: Any) -> Any:
        """Timed ``claim``."""
        return self._timed("claim", super().claim, *args, **kwargs)

    def complete(self, *args: Any, **kwargs: Any) -> Any:
        """Timed ``complete``."""
        return self._timed("complete", super().complete, *args, **kwargs)

    def states(self, *args: Any, **kwargs: Any) -> Any:
        """Timed ``states``."""
        return self._timed("states", super().states, *args, **kwargs)

    def recover(self, *args: Any, **kwargs: Any) -> Any:
        """Timed ``recover``."""
        return self._timed("recover", super().recover, *args, **kwargs)

    def step_outcomes(self, *args: Any, **kwargs: Any) -> Any:
        """Timed ``step_outcomes``."""
        return self._timed("step_outcomes", super().step_outcomes, *args, **kwargs)

    def start_instances(self, *args: Any, **kwargs: Any) -> Any:
        """Timed ``start_instances``."""
        return self._timed("start_instances", super().start_instances, *args, **kwargs)

    def claim_instances(self, *args: Any, **kwargs: Any) -> Any:
        """Timed ``claim_instances``."""
        return self._timed("claim_instances", super().claim_instances, *args, **kwargs)

    def save_instances(self, *args: Any, **kwargs: Any) -> Any:
        """Timed ``save_instances``."""
        return self._timed("save_instances", super().save_instances, *args, **kwargs)


def workflow_playbook() -> Playbook:
    """Every customer starts prepare -> check (poll) -> finish."""
    return Playbook(
        name=PLAYBOOK,
        entity_key="customer_id",
        rules=[Rule(name="every_customer", when="churn_score >= 0", workflow="three_step")],
        workflows={
            "three_step": Workflow(
                steps=[
                    Step(name="prepare", action="prepare"),
                    Step(
                        name="check",
                        action="poll",
                        until="`check.ready` == True",
                        every="30s",
                        timeout="10m",
                    ),
                    Step(name="finish", action="finish"),
                ]
            )
        },
        guardrails=Guardrails(max_actions=None, max_flagged_fraction=1.0),
    )


def workflow_insight(instances: int, *, seed: int = SEED) -> pd.DataFrame:
    """``instances`` customers with a score (every one of them starts the workflow)."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "customer_id": [f"C{i:07d}" for i in range(instances)],
            "churn_score": rng.random(instances).round(6),
        }
    )


def _aware(value: datetime) -> datetime:
    # SQLite returns DateTime(timezone=True) naive; the ledger stores UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def run_workflows(
    instances: int, *, server: SlowServer, folder: Path, concurrency: int
) -> dict[str, Any]:
    """Start and drive ``instances`` workflows to the end on a fresh SQLite file; return figures."""
    playbook = workflow_playbook()
    partition = "2026-12-01T10:00"
    plan = route(workflow_insight(instances), playbook, partition_key=partition)
    clock = Clock(START)
    ledger = TimedLedger(f"sqlite:///{folder / 'workflows.db'}", clock=clock)
    base = f"http://127.0.0.1:{server.port}"
    channels = {
        step: WebhookChannel(
            url=f"{base}/{step}",
            secret=SECRET,
            allowed_hosts=["127.0.0.1"],
            max_concurrency=concurrency,
        )
        for step in STEPS
    }
    quiet = logging.getLogger("bench.quiet")
    before = server.stats()
    server_cpu = server.cpu_seconds()
    busy = machine_busy_seconds()
    cpu = time.process_time()
    started = time.perf_counter()
    first = execute_plan(
        plan,
        playbook=playbook,
        ledger=ledger,
        channels=channels,
        partition_key=partition,
        log=quiet,
    )
    plan_wall = time.perf_counter() - started
    delivered = first.workflows.steps_delivered if first.workflows else 0
    advances: list[dict[str, Any]] = []
    while (due := ledger.next_due(playbook=PLAYBOOK)) is not None:
        if len(advances) >= 20:
            raise RuntimeError(f"the workflows did not finish: next due {due}")
        clock.now = max(clock.now, _aware(due))
        moment = time.perf_counter()
        step = advance_workflows(playbook=playbook, ledger=ledger, channels=channels, log=quiet)
        advances.append(
            {
                "clock": clock.now.isoformat(),
                "wall": time.perf_counter() - moment,
                "advanced": step.advanced,
                "steps_delivered": step.steps_delivered,
                "succeeded": step.succeeded,
            }
        )
        delivered += step.steps_delivered
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu
    server_cpu = server.cpu_seconds() - server_cpu
    load = other_load(machine_busy_seconds() - busy, cpu + server_cpu, wall)
    after = server.stats()
    counts = ledger.instance_counts(playbook=PLAYBOOK)
    ledger.dispose()
    polls = after["polls"] - before["polls"]
    return {
        "instances": instances,
        "concurrency": concurrency,
        "plan_wall": plan_wall,
        "plan_started": first.workflows_started,
        "plan_steps_delivered": first.workflows.steps_delivered if first.workflows else 0,
        "advances": advances,
        "wall": wall,
        "steps_delivered": delivered,
        "steps_per_second": delivered / wall,
        "instance_states": counts,
        "server_requests": after["requests"] - before["requests"],
        "server_new_keys": after["unique_keys"] - before["unique_keys"],
        "polls": polls,
        "ready_first_poll": (after["ready"] - before["ready"]) - (polls - instances),
        "ledger_seconds": dict(ledger.seconds),
        "ledger_calls": dict(ledger.calls),
        "client_cpu": cpu,
        "server_cpu": server_cpu,
        "other_load": load,
    }


# -- the due-work query ------------------------------------------------------------------------


def fill_instances(url: str, *, total: int, seed: int = SEED) -> dict[str, Any]:
    """Write ``total`` instances in bulk: 1% active in the latest 100 partitions, the rest done."""
    rng = np.random.default_rng(seed)
    ledger = ActionLedger(url, clock=Clock(START))
    t = schema.workflow_instances
    hours = pd.date_range("2026-10-20", periods=DUE_PARTITIONS, freq="h", tz="UTC")
    partitions = np.array([h.strftime("%Y-%m-%dT%H:%M") for h in hours], dtype=object)
    active = rng.random(total) < ACTIVE_SHARE
    where = np.where(
        active,
        rng.integers(DUE_PARTITIONS - ACTIVE_PARTITIONS, DUE_PARTITIONS, total),
        rng.integers(0, DUE_PARTITIONS, total),
    )
    finished_states = np.where(rng.random(total) < 0.9, schema.SUCCEEDED, schema.FAILED)
    active_states = rng.choice([schema.RUNNING, schema.WAITING, schema.FAILING], total)
    # Active instances are due from an hour ago to an hour ahead: about half are due at START.
    offsets = rng.integers(-3_600, 3_600, total)
    stamp = START - timedelta(days=1)
    started = time.perf_counter()
    chunk = 50_000
    with ledger.engine.begin() as conn:
        for first in range(0, total, chunk):
            rows = []
            for i in range(first, min(total, first + chunk)):
                is_active = bool(active[i])
                rows.append(
                    {
                        "instance_id": f"{i:032x}",
                        "playbook": PLAYBOOK,
                        "playbook_version": "v1",
                        "workflow": "three_step",
                        "insight": "churn_scores",
                        "partition_key": partitions[where[i]],
                        "entity_id": f"C{i:07d}",
                        "rule": "every_customer",
                        "state": active_states[i] if is_active else finished_states[i],
                        "step": "check" if is_active else None,
                        "step_index": 1 if is_active else 3,
                        "attempt": 1,
                        "next_due": START + timedelta(seconds=int(offsets[i]))
                        if is_active
                        else None,
                        "created_at": stamp,
                        "updated_at": stamp,
                        "finished_at": None if is_active else stamp,
                    }
                )
            conn.execute(sa.insert(t), rows)
        conn.exec_driver_sql("ANALYZE")
    seconds = time.perf_counter() - started
    ledger.dispose()
    offsets_active = offsets[active]
    return {
        "total": total,
        "active": int(active.sum()),
        "due": int((offsets_active <= 0).sum()),
        "due_partitions": len(set(where[active & (offsets <= 0)].tolist())),
        "fill_seconds": seconds,
    }


def _timed_runs(call: Any, repeats: int) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - started)
    return times, result


def run_due_query(total: int, *, folder: Path, repeats: int) -> dict[str, Any]:
    """Time ``due_partitions`` on ``total`` instances against the full scan and the literal form."""
    url = f"sqlite:///{folder / 'due.db'}"
    filled = fill_instances(url, total=total)
    ledger = ActionLedger(url, clock=Clock(START))
    captured: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *rest: Any) -> None:
        if "autoexec_workflow_instances" in statement:
            captured.append((statement, parameters))

    busy, cpu = machine_busy_seconds(), time.process_time()
    wall_started = time.perf_counter()
    event.listen(ledger.engine, "before_cursor_execute", capture)
    first = ledger.due_partitions(playbook=PLAYBOOK)
    event.remove(ledger.engine, "before_cursor_execute", capture)
    statement, parameters = captured[-1]
    real, result = _timed_runs(lambda: ledger.due_partitions(playbook=PLAYBOOK), repeats)
    states = ", ".join(f"'{s}'" for s in schema.ACTIVE_INSTANCE_STATES)
    moment = str(parameters[-1])
    literal_sql = (
        "SELECT partition_key, count(*), min(next_due) FROM autoexec_workflow_instances "
        f"{{hint}} WHERE playbook = ? AND state IN ({states}) AND next_due <= ? "
        "GROUP BY partition_key ORDER BY partition_key"
    )
    with ledger.engine.connect() as conn:
        plan = [
            str(row[-1])
            for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
        ]
        literal = literal_sql.format(hint="")
        scan = literal_sql.format(hint="NOT INDEXED")
        literal_plan = [
            str(row[-1])
            for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {literal}", (PLAYBOOK, moment))
        ]
        scan_plan = [
            str(row[-1])
            for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {scan}", (PLAYBOOK, moment))
        ]
        literal_times, literal_rows = _timed_runs(
            lambda: conn.exec_driver_sql(literal, (PLAYBOOK, moment)).all(), repeats
        )
        scan_times, scan_rows = _timed_runs(
            lambda: conn.exec_driver_sql(scan, (PLAYBOOK, moment)).all(), max(3, repeats // 4)
        )
    load = other_load(
        machine_busy_seconds() - busy, time.process_time() - cpu, time.perf_counter() - wall_started
    )
    ledger.dispose()
    size = (folder / "due.db").stat().st_size
    found = {(p, n) for p, n, _ in result}
    return {
        **filled,
        "file_mib": size / 2**20,
        "statement": " ".join(statement.split()),
        "parameters": [str(p) for p in parameters],
        "plan": plan,
        "uses_due_index": any("ix_autoexec_workflow_due" in line for line in plan),
        "real_seconds": real,
        "real_median": statistics.median(real),
        "literal_plan": literal_plan,
        "literal_seconds": literal_times,
        "literal_median": statistics.median(literal_times),
        "scan_plan": scan_plan,
        "scan_seconds": scan_times,
        "scan_median": statistics.median(scan_times),
        "partitions_found": len(first),
        "instances_due_found": sum(n for _, n, _ in first),
        "agree": found == {(str(p), int(n)) for p, n, _ in literal_rows}
        and found == {(str(p), int(n)) for p, n, _ in scan_rows},
        "other_load": load,
    }


# -- the whole benchmark -----------------------------------------------------------------------


def run(
    *,
    instances: int,
    concurrency: int,
    baseline_actions: int | None = None,
    due_instances: int,
    due_repeats: int,
) -> dict[str, Any]:
    """Both workflow benchmarks; returns their figures."""
    actions = baseline_actions or instances
    insight, playbook = webhook_insight(actions)
    with tempfile.TemporaryDirectory(prefix="autoexec-bench-") as tmp:
        folder = Path(tmp)
        with SlowServer(latency_ms=LATENCY_MS, max_seconds=3600) as server:
            baseline = run_execute_plan(
                insight,
                playbook,
                server=server,
                folder=folder,
                partition="baseline",
                concurrency=concurrency,
            )
            workflows = run_workflows(
                instances, server=server, folder=folder, concurrency=concurrency
            )
        due = run_due_query(due_instances, folder=folder, repeats=due_repeats)
    baseline_rate = baseline["succeeded"] / baseline["wall"]
    expected_steps = 3 * instances + (instances - workflows["ready_first_poll"])
    return {
        "latency_ms": LATENCY_MS,
        "baseline": baseline,
        "baseline_rate": baseline_rate,
        "workflows": workflows,
        "ratio": workflows["steps_per_second"] / baseline_rate,
        "all_delivered_once": (
            workflows["instance_states"] == {schema.SUCCEEDED: instances}
            and workflows["steps_delivered"] == expected_steps
            and workflows["server_requests"] == expected_steps
            and workflows["server_new_keys"] == expected_steps
            and baseline["server_requests"] == baseline["server_new_keys"] == actions
        ),
        "due": due,
        "other_load": max(baseline["other_load"], workflows["other_load"], due["other_load"]),
    }


def _ledger_line(seconds: Mapping[str, float], calls: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v:.2f} s/{calls[k]}" for k, v in sorted(seconds.items()))


def report(result: dict[str, Any]) -> list[str]:
    """Human-readable lines for a result of :func:`run`."""
    w, b, d = result["workflows"], result["baseline"], result["due"]
    n = w["instances"]
    lines = [
        f"workflows: {n:,} instances of prepare -> check (poll, every 30 s) -> finish, each step a "
        f"webhook (max_concurrency={w['concurrency']}) to the {result['latency_ms']:.0f} ms "
        "server, SQLite ledger file (WAL), injected clock",
        f"  execute_plan {w['plan_wall']:.2f} s (started {w['plan_started']:,}, "
        f"{w['plan_steps_delivered']:,} steps)"
        + "".join(
            f"; advance at {a['clock'][11:19]} {a['wall']:.2f} s ({a['advanced']:,} instances, "
            f"{a['steps_delivered']:,} steps)"
            for a in w["advances"]
        ),
        f"  {w['steps_delivered']:,} step attempts in {w['wall']:.2f} s = "
        f"{w['steps_per_second']:,.0f} steps/s; polls {w['polls']:,} "
        f"({w['ready_first_poll']:,} ready at the first); instances {w['instance_states']}",
        f"  ledger {_ledger_line(w['ledger_seconds'], w['ledger_calls'])}",
        f"  CPU client {w['client_cpu']:.2f} s, server {w['server_cpu']:.2f} s; other processes "
        f"{w['other_load']:.2f} cores",
        f"baseline one-shot execute_plan: {b['succeeded']:,} webhook actions in {b['wall']:.2f} s "
        f"= {result['baseline_rate']:,.0f} actions/s (recording {b['record_seconds']:.2f} s + "
        f"sending {b['send_seconds']:.2f} s); other processes {b['other_load']:.2f} cores",
        f"ratio workflow steps/s / one-shot actions/s: {result['ratio']:.2f}; every step delivered "
        f"once: {result['all_delivered_once']}",
        f"due-work query on {d['total']:,} instances ({d['active']:,} active, {d['due']:,} due in "
        f"{d['due_partitions']} partitions; bulk insert {d['fill_seconds']:.1f} s, file "
        f"{d['file_mib']:.0f} MiB):",
        f"  ledger.due_partitions(): median {d['real_median'] * 1000:.1f} ms of "
        f"{len(d['real_seconds'])}; found {d['partitions_found']} partitions, "
        f"{d['instances_due_found']:,} instances",
        f"    plan: {' | '.join(d['plan'])}",
        f"  same query, active states as SQL literals: median {d['literal_median'] * 1000:.1f} ms",
        f"    plan: {' | '.join(d['literal_plan'])}",
        f"  same query, full scan (NOT INDEXED): median {d['scan_median'] * 1000:.1f} ms",
        f"    plan: {' | '.join(d['scan_plan'])}",
        f"  the three agree: {d['agree']}; other processes {d['other_load']:.2f} cores",
    ]
    return lines


def checks(result: dict[str, Any]) -> list[Check]:
    """The workflow targets."""
    d = result["due"]
    return [
        Check(
            f"{result['workflows']['instances']:,} workflows: steps/s vs one-shot actions/s",
            f"{result['ratio']:.2f}",
            f">= {TARGET_RATIO}",
            result["ratio"] >= TARGET_RATIO,
        ),
        Check(
            "every workflow step delivered once",
            "yes" if result["all_delivered_once"] else "NO",
            "steps == requests == new keys",
            result["all_delivered_once"],
        ),
        Check(
            f"due_partitions on {d['total']:,} instances (median)",
            f"{d['real_median'] * 1000:.1f} ms",
            f"<= {TARGET_DUE_SECONDS * 1000:.0f} ms",
            d["real_median"] <= TARGET_DUE_SECONDS,
        ),
        Check(
            "due_partitions uses ix_autoexec_workflow_due",
            "yes" if d["uses_due_index"] else "NO",
            "EXPLAIN QUERY PLAN",
            d["uses_due_index"],
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the workflow benchmark alone; exit code 1 if a target is missed."""
    parser = argparse.ArgumentParser(description="workflow steps/s and the due-work query")
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--baseline-actions", type=int, default=None, help="default: instances")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--due-instances", type=int, default=1_000_000)
    parser.add_argument("--due-repeats", type=int, default=20)
    args = parser.parse_args(argv)
    result = run(
        instances=args.instances,
        concurrency=args.concurrency,
        baseline_actions=args.baseline_actions,
        due_instances=args.due_instances,
        due_repeats=args.due_repeats,
    )
    return finish(report(result), checks(result))


if __name__ == "__main__":
    raise SystemExit(main())
