"""The insight sensor's tick against a long history (DESIGN.md: 10,000 past partitions, <= 0.5 s).

An ephemeral instance holds ``partitions`` materializations of a partitioned insight, each with
the flagged count in its metadata (as the reference deployment records it). Measured:

- the steady tick: the cursor is at the end of that history and one new partition lands;
- the backlog tick: a fresh cursor over the whole history (the sensor reads at most
  ``MAX_RECORDS_PER_TICK`` records per tick and continues on the next tick).

Baseline, in the same run: a naive sensor that answers the same question by scanning every
materialization of the insight on each tick (no storage-id cursor).
"""

import argparse
import statistics
import time
from typing import Any

import dagster as dg
import pandas as pd

from autoexec_dagster.channels.webhook import WebhookChannel
from autoexec_dagster.dagster.defs_factory import build_execution_defs
from autoexec_dagster.dagster.insight_sensor import fetch_new_materializations
from bench.bench_routing import Check, churn_playbook, finish, machine_busy_seconds, other_load

TICK_BUDGET_SECONDS = 0.5
INSIGHT = dg.AssetKey("churn_scores")


def _defs(partitions: dg.StaticPartitionsDefinition, ledger_url: str) -> dg.Definitions:
    @dg.asset(key=INSIGHT, partitions_def=partitions)
    def churn_scores() -> pd.DataFrame:  # never materialized here: events are reported
        raise NotImplementedError

    return dg.Definitions.merge(
        dg.Definitions(assets=[churn_scores]),
        build_execution_defs(
            insight=churn_scores,
            playbook=churn_playbook(),
            # Never contacted: the sensor only requests runs.
            channels={
                action: WebhookChannel(
                    url="http://127.0.0.1:9/never", secret="unused", allowed_hosts=["127.0.0.1"]
                )
                for action in ("retention_email", "crm_task")
            },
            ledger=ledger_url,
            flagged_metadata_key="flagged",
        ),
    )


def _tick(
    defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None
) -> tuple[float, Any]:
    sensor = defs.resolve_sensor_def("churn_outreach_sensor")
    context = dg.build_sensor_context(instance=instance, definitions=defs, cursor=cursor)
    start = time.perf_counter()
    result = sensor(context)
    return time.perf_counter() - start, result


def _naive_tick(instance: dg.DagsterInstance, answered: set[str]) -> tuple[float, int]:
    """Scan every materialization of the insight and request the partitions not yet answered."""
    start = time.perf_counter()
    records = fetch_new_materializations(instance, INSIGHT, after_storage_id=0, limit=10**9)
    new = {r.partition_key for r in records if r.partition_key not in answered}
    return time.perf_counter() - start, len(new)


def run(*, partitions: int, ticks: int = 5, ledger_url: str = "sqlite://") -> dict[str, Any]:
    """Build the history, then time steady ticks, the backlog tick and the naive baseline."""
    keys = [f"p{i:05d}" for i in range(partitions + ticks)]
    defs = _defs(dg.StaticPartitionsDefinition(keys), ledger_url)
    instance = dg.DagsterInstance.ephemeral()
    start = time.perf_counter()
    for key in keys[:partitions]:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(INSIGHT, partition=key, metadata={"flagged": 3})
        )
    history_seconds = time.perf_counter() - start

    busy, cpu, wall = machine_busy_seconds(), time.process_time(), time.perf_counter()
    backlog_seconds, backlog = _tick(defs, instance, None)
    backlog_requests = len(backlog.run_requests or [])
    cursor = (
        instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=INSIGHT), limit=1, ascending=False
        )
        .records[0]
        .storage_id
    )
    cursor_text = f'{{"v": 1, "after_storage_id": {cursor}}}'

    steady: list[float] = []
    naive: list[float] = []
    answered = set(keys[:partitions])
    for key in keys[partitions:]:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(INSIGHT, partition=key, metadata={"flagged": 3})
        )
        seconds, result = _tick(defs, instance, cursor_text)
        requests = result.run_requests or []
        assert [r.partition_key for r in requests] == [key], requests
        steady.append(seconds)
        cursor_text = result.cursor
        naive_seconds, new = _naive_tick(instance, answered)
        assert new == 1
        naive.append(naive_seconds)
        answered.add(key)
    load = other_load(
        machine_busy_seconds() - busy, time.process_time() - cpu, time.perf_counter() - wall
    )
    return {
        "other_load": load,
        "partitions": partitions,
        "history_seconds": history_seconds,
        "steady_seconds": steady,
        "steady_median": statistics.median(steady),
        "steady_max": max(steady),
        "backlog_seconds": backlog_seconds,
        "backlog_requests": backlog_requests,
        "naive_median": statistics.median(naive),
        "ratio": statistics.median(naive) / statistics.median(steady),
    }


def report(result: dict[str, Any]) -> list[str]:
    """Human-readable lines for a result of :func:`run`."""
    n = result["partitions"]
    steady = ", ".join(f"{s * 1000:.1f}" for s in result["steady_seconds"])
    return [
        f"history: {n:,} materializations of churn_scores (flagged count in metadata), written "
        f"in {result['history_seconds']:.1f} s",
        f"steady tick (cursor at the end, one new partition): median "
        f"{result['steady_median'] * 1000:.1f} ms, max {result['steady_max'] * 1000:.1f} ms "
        f"({steady} ms)",
        f"backlog tick (fresh cursor over {n:,}): {result['backlog_seconds']:.3f} s, "
        f"{result['backlog_requests']:,} run requests (the rest on the next ticks)",
        f"naive tick scanning the whole history: median {result['naive_median'] * 1000:.0f} ms; "
        f"ratio naive / steady: {result['ratio']:.0f}x",
        f"other processes kept {result['other_load']:.2f} cores busy meanwhile",
    ]


def checks(result: dict[str, Any]) -> list[Check]:
    """The sensor target: a tick over a 10,000-partition history within 0.5 s."""
    worst = max(result["steady_max"], result["backlog_seconds"])
    return [
        Check(
            f"sensor tick, {result['partitions']:,} past partitions (worst of steady and backlog)",
            f"{worst:.3f} s",
            f"<= {TICK_BUDGET_SECONDS} s",
            worst <= TICK_BUDGET_SECONDS,
        )
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the sensor benchmark alone; exit code 1 if the target is missed."""
    parser = argparse.ArgumentParser(description="insight sensor tick over a long history")
    parser.add_argument("--partitions", type=int, default=10_000)
    args = parser.parse_args(argv)
    result = run(partitions=args.partitions)
    return finish(report(result), checks(result))


if __name__ == "__main__":
    raise SystemExit(main())
