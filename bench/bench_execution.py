"""Execution benchmark: 10,000 webhook actions through ``execute_plan`` against a 20 ms destination.

Target (DESIGN.md, "Performance budgets"): >= 3,000 actions/s with the durable ledger (SQLite
file, WAL), and >= 100x an idiomatic Dagster per-entity dynamic fan-out.

* The destination is :mod:`bench.slow_server` in its own process: every POST waits 20 ms and
  answers 200. Its request and distinct-key counts verify each action arrived once.
* ``execute_plan`` runs ``--repeats`` times, each on a fresh SQLite ledger file in a temporary
  directory and a fresh partition. Throughput is judged on the median run. A timing subclass of
  ``ActionLedger`` splits the wall time into recording (before the first claim) and sending.
* The baseline, in the same run and against the same server: a Dagster job whose first op yields
  one ``DynamicOutput`` per entity, a mapped op that POSTs one signed webhook with ``requests``,
  and a collect op, run with ``execute_in_process`` on an ephemeral instance. Its cost is linear
  in the entity count, so it runs on two sample sizes; the slope (per-entity cost) and intercept
  (job overhead) give the 10,000-entity time, reported as extrapolated.

Run alone: ``.venv/bin/python -m bench.bench_execution [--actions N] [--concurrency C]``.
"""

import argparse
import base64
import hashlib
import hmac
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import requests

from autoexec_dagster.channels.webhook import WebhookChannel
from autoexec_dagster.executor.plan_execution import execute_plan
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.ledger.action_ledger import ActionLedger, Outcome, WorkItem
from autoexec_dagster.playbook import Guardrails, Playbook, Rule
from autoexec_dagster.routing import route
from bench.bench_routing import SEED, Check, finish, machine_busy_seconds, other_load
from bench.slow_server import SlowServer

TARGET_THROUGHPUT = 3_000.0
TARGET_RATIO = 100.0
LATENCY_MS = 20.0
FLAGGED_SHARE = 0.4
ACTION = "retention_webhook"
SECRET = "whsec_" + base64.b64encode(b"autoexec-bench-webhook-secret!!!").decode()


def webhook_insight(actions: int, *, seed: int = SEED) -> tuple[pd.DataFrame, Playbook]:
    """An insight in which exactly ``actions`` of the customers (40%) get one webhook each."""
    total = round(actions / FLAGGED_SHARE)
    rng = np.random.default_rng(seed)
    # Scores (k + 0.5) / total for a permutation of k: exactly ``actions`` lie above threshold.
    scores = (rng.permutation(total) + 0.5) / total
    threshold = (total - actions) / total
    insight = pd.DataFrame(
        {
            "customer_id": [f"C{i:07d}" for i in range(total)],
            "email": [f"customer{i}@example.com" for i in range(total)],
            "churn_score": scores.round(6),
            "lifetime_value": (rng.random(total) * 10_000).round(2),
        }
    )
    playbook = Playbook(
        name="churn_webhooks",
        entity_key="customer_id",
        rules=[Rule(name="at_risk", when=f"churn_score >= {threshold!r}", action=ACTION)],
        guardrails=Guardrails(max_actions=actions, max_flagged_fraction=0.5),
    )
    return insight, playbook


class TimedLedger(ActionLedger):
    """An ``ActionLedger`` that records how long its calls take and when the first claim came."""

    def __init__(self, url: str):
        super().__init__(url)
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.first_claim: float | None = None

    def _add(self, name: str, started: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        self.calls[name] = self.calls.get(name, 0) + 1

    def reserve(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """Timed ``reserve``."""
        started = time.perf_counter()
        try:
            return super().reserve(rows)
        finally:
            self._add("reserve", started)

    def claim(
        self, keys: Sequence[str], *, worker: str, lease_seconds: float, run_id: str | None
    ) -> list[WorkItem]:
        """Timed ``claim``; remembers when the first one started."""
        started = time.perf_counter()
        if self.first_claim is None:
            self.first_claim = started
        try:
            return super().claim(keys, worker=worker, lease_seconds=lease_seconds, run_id=run_id)
        finally:
            self._add("claim", started)

    def complete(
        self,
        outcomes: Sequence[Outcome],
        *,
        worker: str,
        escalation_context: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> int:
        """Timed ``complete``."""
        started = time.perf_counter()
        try:
            return super().complete(outcomes, worker=worker, escalation_context=escalation_context)
        finally:
            self._add("complete", started)


def run_execute_plan(
    insight: pd.DataFrame,
    playbook: Playbook,
    *,
    server: SlowServer,
    folder: Path,
    partition: str,
    concurrency: int,
) -> dict[str, Any]:
    """Route a partition, then ``execute_plan`` it on a fresh SQLite ledger file; return figures."""
    routing = time.perf_counter()
    plan = route(insight, playbook, partition_key=partition, insight_name="churn_scores")
    routing = time.perf_counter() - routing
    ledger = TimedLedger(f"sqlite:///{folder / f'ledger-{partition}.db'}")
    channel = WebhookChannel(
        url=server.url, secret=SECRET, allowed_hosts=["127.0.0.1"], max_concurrency=concurrency
    )
    before = server.stats()
    server_cpu = server.cpu_seconds()
    busy = machine_busy_seconds()
    cpu = time.process_time()
    started = time.perf_counter()
    report: ExecutionReport = execute_plan(
        plan,
        playbook=playbook,
        ledger=ledger,
        channels={ACTION: channel},
        partition_key=partition,
        dry_run=False,
        log=logging.getLogger("bench.quiet"),
    )
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu
    server_cpu = server.cpu_seconds() - server_cpu
    load = other_load(machine_busy_seconds() - busy, cpu + server_cpu, wall)
    after = server.stats()
    with ledger.engine.connect() as conn:
        journal = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
    ledger.dispose()
    first_claim = ledger.first_claim or started
    return {
        "partition": partition,
        "route_seconds": routing,
        "succeeded": report.succeeded,
        "failed": report.failed,
        "retries": report.retries,
        "wall": wall,
        "duration": report.duration_seconds,
        "throughput": report.throughput,
        "record_seconds": first_claim - started,
        "send_seconds": started + wall - first_claim,
        "ledger_seconds": dict(ledger.seconds),
        "ledger_calls": dict(ledger.calls),
        "client_cpu": cpu,
        "server_cpu": server_cpu,
        "server_requests": after["requests"] - before["requests"],
        "server_new_keys": after["unique_keys"] - before["unique_keys"],
        "journal_mode": journal,
        "other_load": load,
    }


def _signed_headers(key: str, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers, as the baseline op sends them (same work as the channel)."""
    timestamp = str(int(time.time()))
    secret = base64.b64decode(SECRET.removeprefix("whsec_"))
    mac = hmac.new(secret, f"{key}.{timestamp}.".encode() + body, hashlib.sha256)
    return {
        "Content-Type": "application/json",
        "Idempotency-Key": key,
        "webhook-id": key,
        "webhook-timestamp": timestamp,
        "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode(),
    }


def dagster_fanout_job(records: list[dict[str, Any]], url: str) -> dg.JobDefinition:
    """The idiomatic per-entity Dagster job: fan out, one mapped POST per entity, collect."""

    @dg.op(out=dg.DynamicOut())
    def fan_out() -> Iterator[dg.DynamicOutput[dict]]:
        for record in records:
            yield dg.DynamicOutput(record, mapping_key=str(record["customer_id"]))

    @dg.op
    def post_webhook(record: dict) -> int:
        body = json.dumps(record, separators=(",", ":")).encode()
        headers = _signed_headers(str(record["idempotency_key"]), body)
        response = requests.post(url, data=body, headers=headers, timeout=10)
        response.raise_for_status()
        return response.status_code

    @dg.op
    def collect(statuses: list[int]) -> int:
        return sum(1 for status in statuses if 200 <= status < 300)

    @dg.job(name="per_entity_fanout")
    def per_entity_fanout() -> None:
        collect(fan_out().map(post_webhook).collect())

    return per_entity_fanout


def run_dagster_baseline(
    plan: pd.DataFrame, *, server: SlowServer, entities: int
) -> tuple[float, float]:
    """Run the fan-out job on the first ``entities`` act rows; return wall time and other load."""
    acting = plan[plan["decision"].astype(str) == "act"].head(entities)
    columns = ["customer_id", "email", "churn_score", "lifetime_value", "idempotency_key"]
    records: list[dict[str, Any]] = [
        {str(k): (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()}
        for r in acting[columns].to_dict("records")
    ]
    job = dagster_fanout_job(records, server.url)
    # Console logging at ERROR keeps the output readable; per step it measured the same as DEBUG.
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    busy, cpu, server_cpu = machine_busy_seconds(), time.process_time(), server.cpu_seconds()
    started = time.perf_counter()
    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), run_config=quiet)
    wall = time.perf_counter() - started
    own = time.process_time() - cpu + server.cpu_seconds() - server_cpu
    load = other_load(machine_busy_seconds() - busy, own, wall)
    delivered = result.output_for_node("collect")
    if not result.success or delivered != len(records):
        raise RuntimeError(f"the Dagster baseline delivered {delivered} of {len(records)}")
    return wall, load


def run(
    *, actions: int, concurrency: int, repeats: int, samples: tuple[int, int], seed: int = SEED
) -> dict[str, Any]:
    """The whole execution benchmark; returns its figures."""
    insight, playbook = webhook_insight(actions, seed=seed)
    small, large = samples
    with SlowServer(latency_ms=LATENCY_MS, max_seconds=1800) as server:
        with tempfile.TemporaryDirectory(prefix="autoexec-bench-") as tmp:
            runs = [
                run_execute_plan(
                    insight,
                    playbook,
                    server=server,
                    folder=Path(tmp),
                    partition=f"2025-01-{i + 1:02d}",
                    concurrency=concurrency,
                )
                for i in range(repeats)
            ]
        plan = route(insight, playbook, partition_key="dagster", insight_name="churn_scores")
        # The first job in a process pays one-time costs (~0.7 s here); keep them out of the fit.
        warmup, _ = run_dagster_baseline(plan, server=server, entities=3)
        dagster_small, load_small = run_dagster_baseline(plan, server=server, entities=small)
        dagster_large, load_large = run_dagster_baseline(plan, server=server, entities=large)
    per_entity = (dagster_large - dagster_small) / (large - small)
    overhead = max(0.0, dagster_large - per_entity * large)
    dagster_extrapolated = overhead + per_entity * actions
    median_run = sorted(runs, key=lambda r: r["wall"])[len(runs) // 2]
    throughputs = [r["succeeded"] / r["wall"] for r in runs]
    return {
        "actions": actions,
        "rows": len(insight),
        "concurrency": concurrency,
        "latency_ms": LATENCY_MS,
        "runs": runs,
        "median_run": median_run,
        "throughput_median": statistics.median(throughputs),
        "throughput_best": max(throughputs),
        "all_delivered_once": all(
            r["succeeded"] == actions
            and r["failed"] == 0
            and r["server_new_keys"] == actions
            and r["server_requests"] == actions
            for r in runs
        ),
        "dagster_warmup": warmup,
        "dagster_samples": {small: dagster_small, large: dagster_large},
        "dagster_per_entity": per_entity,
        "dagster_overhead": overhead,
        "dagster_extrapolated": dagster_extrapolated,
        "ratio": dagster_extrapolated / median_run["wall"],
        "other_load": max([r["other_load"] for r in runs] + [load_small, load_large]),
    }


def sweep(concurrencies: Sequence[int], *, actions: int, repeats: int) -> Iterator[str]:
    """Throughput of ``execute_plan`` per ``max_concurrency`` (median of ``repeats``)."""
    insight, playbook = webhook_insight(actions)
    with (
        SlowServer(latency_ms=LATENCY_MS, max_seconds=1800) as server,
        tempfile.TemporaryDirectory(prefix="autoexec-bench-") as tmp,
    ):
        number = 0
        for concurrency in concurrencies:
            rates, loads = [], []
            for _ in range(repeats):
                number += 1
                r = run_execute_plan(
                    insight,
                    playbook,
                    server=server,
                    folder=Path(tmp),
                    partition=f"sweep-{number}",
                    concurrency=concurrency,
                )
                rates.append(r["succeeded"] / r["wall"])
                loads.append(r["other_load"])
            yield (
                f"max_concurrency={concurrency}: median {statistics.median(rates):,.0f} actions/s "
                f"({', '.join(f'{x:,.0f}' for x in rates)}); other processes up to "
                f"{max(loads):.2f} cores"
            )


def report(result: dict[str, Any]) -> list[str]:
    """Human-readable lines for a result of :func:`run`."""
    n = result["actions"]
    lines = [
        f"execute_plan: {n:,} webhook actions ({result['rows']:,}-row insight, 40% flagged), "
        f"WebhookChannel max_concurrency={result['concurrency']}, destination latency "
        f"{result['latency_ms']:.0f} ms, SQLite ledger file (WAL); times below exclude route()",
    ]
    for r in result["runs"]:
        ledger = ", ".join(
            f"{k} {v:.2f} s/{r['ledger_calls'][k]} calls" for k, v in r["ledger_seconds"].items()
        )
        lines.append(
            f"  run {r['partition']}: route {r['route_seconds']:.3f} s, then execute_plan "
            f"{r['wall']:.2f} s, {r['succeeded'] / r['wall']:,.0f} "
            f"actions/s (report.throughput {r['throughput']:,.0f}); recording "
            f"{r['record_seconds']:.2f} s + sending {r['send_seconds']:.2f} s; "
            f"ledger {ledger}; CPU client {r['client_cpu']:.2f} s, server "
            f"{r['server_cpu']:.2f} s; journal={r['journal_mode']}; server saw "
            f"{r['server_requests']:,} requests, {r['server_new_keys']:,} new keys; other "
            f"processes {r['other_load']:.2f} cores"
        )
    ideal = n * result["latency_ms"] / 1000 / result["concurrency"]
    lines.append(
        f"  median {result['throughput_median']:,.0f} actions/s, best "
        f"{result['throughput_best']:,.0f}; latency-bound ideal at this concurrency: "
        f"{n / ideal:,.0f} actions/s; every action delivered exactly once: "
        f"{result['all_delivered_once']}"
    )
    samples = ", ".join(f"{k} entities {v:.2f} s" for k, v in result["dagster_samples"].items())
    lines += [
        f"Dagster per-entity dynamic fan-out (execute_in_process, ephemeral instance): {samples} "
        f"(after a 3-entity warm-up job: {result['dagster_warmup']:.2f} s)",
        f"  -> {result['dagster_per_entity'] * 1000:.1f} ms per mapped step + "
        f"{result['dagster_overhead']:.2f} s job overhead -> {result['dagster_extrapolated']:,.0f} "
        f"s for {n:,} entities (EXTRAPOLATED from {max(result['dagster_samples']):,} and "
        f"{min(result['dagster_samples']):,} entities)",
        f"ratio Dagster fan-out (extrapolated) / execute_plan (median): {result['ratio']:,.0f}x",
        f"other processes kept up to {result['other_load']:.2f} cores busy meanwhile",
    ]
    return lines


def checks(result: dict[str, Any]) -> list[Check]:
    """The execution targets."""
    return [
        Check(
            f"execute {result['actions']:,} webhooks (median of {len(result['runs'])})",
            f"{result['throughput_median']:,.0f} actions/s",
            f">= {TARGET_THROUGHPUT:,.0f} actions/s",
            result["throughput_median"] >= TARGET_THROUGHPUT,
        ),
        Check(
            "vs Dagster per-entity fan-out",
            f"{result['ratio']:,.0f}x",
            f">= {TARGET_RATIO:.0f}x",
            result["ratio"] >= TARGET_RATIO,
        ),
        Check(
            "every action delivered once",
            "yes" if result["all_delivered_once"] else "NO",
            "succeeded == requests == new keys",
            result["all_delivered_once"],
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the execution benchmark alone; exit code 1 if a target is missed."""
    parser = argparse.ArgumentParser(description="execute_plan vs a Dagster dynamic fan-out")
    parser.add_argument("--actions", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, nargs=2, default=(50, 300))
    parser.add_argument(
        "--sweep",
        type=int,
        nargs="+",
        metavar="C",
        help="only compare execute_plan at these max_concurrency values (no baseline)",
    )
    args = parser.parse_args(argv)
    if args.sweep:
        for line in sweep(args.sweep, actions=args.actions, repeats=args.repeats):
            print(line)
        return 0
    result = run(
        actions=args.actions,
        concurrency=args.concurrency,
        repeats=args.repeats,
        samples=(args.samples[0], args.samples[1]),
    )
    return finish(report(result), checks(result))


if __name__ == "__main__":
    raise SystemExit(main())
