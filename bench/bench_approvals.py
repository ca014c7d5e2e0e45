"""Approval benchmark (issue 8): a bulk approval of 10,000 requests, and listing 100,000 pending.

A fresh SQLite ledger (a file, WAL, as in production) holds ``--requests`` pending approval
requests (100,000 by default) in partitions of ``--bulk`` (10,000), each with its workflow
instance (so a decision's wake-up is real work) and a payload shaped like the approval gate's
default (the entity's columns and the ``draft_po`` step's output). Measured:

* **Bulk approval.** ``ledger.approve(ids, by=..., via="cli")`` of one partition's 10,000 pending
  requests, on ``--repeats`` partitions. Goal: <= 1 s. Baseline, in the same run, on a copy of the
  same file and the same ids: the writes a decision needs and nothing else, with the ``sqlite3``
  module in one ``BEGIN IMMEDIATE`` transaction (10,000 decision rows inserted, 10,000 requests
  updated, 10,000 instances made due). Also timed: the whole ``autoexec approve --playbook P
  --partition K --where "value > 0" --by NAME --yes`` in process (selection, filter, checks,
  decision; without the interpreter's start-up).
* **Listing.** ``ledger.pending_approvals(playbook=P)`` returning all 100,000 pending requests as
  a DataFrame, median of ``--list-repeats``. Goal: <= 0.5 s. Baseline: the same SELECT (columns,
  filter, order) with ``sqlite3`` and ``fetchall()``; and the same DataFrame built from those raw
  rows (checked equal to the ledger's), which is what the listing could cost. Also timed:
  ``autoexec approvals --playbook P --sort -value`` (sorts the 100,000, shows the top 50) and
  ``autoexec approvals --playbook P`` (oldest first: the 50 shown and a grouped count), in
  process.

Run alone: ``.venv/bin/python -m bench.bench_approvals [--requests N] [--bulk N] [--profile]``.
"""

import argparse
import cProfile
import io
import json
import pstats
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.approvals import LISTING_COLUMNS
from bench.bench_routing import SEED, Check, finish, machine_busy_seconds, other_load

TARGET_BULK_SECONDS = 1.0
TARGET_LIST_SECONDS = 0.5
PLAYBOOK = "approval_bench"
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


class FixedClock:
    """The ledger's clock: one moment, so every request is pending and unexpired."""

    def __call__(self) -> datetime:
        return NOW


def _partition(index: int) -> str:
    return f"2026-12-{index + 1:02d}"


def fill(ledger: ActionLedger, *, requests: int, per_partition: int) -> dict[str, Any]:
    """Write ``requests`` pending approval requests (and their instances) through the ledger."""
    rng = np.random.default_rng(SEED)
    totals = (rng.random(requests) * 20_000).round(2)
    ages = rng.random(requests) * 48
    regions = np.array(["eu", "us", "apac"])[rng.integers(0, 3, requests)]
    rows: list[dict[str, Any]] = []
    instances: list[dict[str, Any]] = []
    for n in range(requests):
        partition = _partition(n // per_partition)
        instance_id = f"{n:08d}".ljust(32, "i")
        payload = {
            "entity": {"sku": f"SKU-{n:06d}", "region": str(regions[n]), "on_hand": n % 50},
            "steps": {"draft_po": {"po_id": f"PO-{n:06d}", "total": float(totals[n])}},
        }
        requested = NOW - timedelta(hours=float(ages[n]))
        rows.append(
            {
                "approval_id": f"{n:08d}".ljust(32, "a"),
                "instance_id": instance_id,
                "playbook": PLAYBOOK,
                "playbook_version": "v1",
                "workflow": "replenish",
                "insight": "stock_forecast",
                "partition_key": partition,
                "entity_id": f"SKU-{n:06d}",
                "rule": "shortage",
                "step": "approval",
                "approvers": ["ana", "bob"],
                "min_approvals": 1,
                "payload": payload,
                "digest": f"{n:064x}",
                "value": float(totals[n]),
                "on_expiry": "reject",
                "requested_at": requested,
                "expires_at": requested + timedelta(days=7),
                "sla_due_at": requested + timedelta(days=1),
            }
        )
        instances.append(
            {
                "instance_id": instance_id,
                "playbook": PLAYBOOK,
                "playbook_version": "v1",
                "workflow": "replenish",
                "insight": "stock_forecast",
                "partition_key": partition,
                "entity_id": f"SKU-{n:06d}",
                "rule": "shortage",
                "step": "approval",
                "data": "{}",
                "run_id": "bench",
            }
        )
    start = time.perf_counter()
    ledger.start_instances(instances)
    instances_seconds = time.perf_counter() - start
    start = time.perf_counter()
    inserted = ledger.request_approvals(rows)
    requests_seconds = time.perf_counter() - start
    assert len(inserted) == requests
    return {"instances_seconds": instances_seconds, "requests_seconds": requests_seconds}


def _ids(partition: str, db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT approval_id FROM autoexec_approvals WHERE partition_key = ? "
                "AND status = 'pending' ORDER BY approval_id",
                (partition,),
            )
        ]


def raw_approve(db: Path, ids: Sequence[str]) -> float:
    """The writes of a decision with sqlite3 alone, in one transaction; seconds."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    moment = NOW.strftime("%Y-%m-%d %H:%M:%S.%f")
    start = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    instance_ids = [
        r[0]
        for r in conn.execute(
            "SELECT instance_id FROM autoexec_approvals WHERE approval_id IN "
            "(SELECT value FROM json_each(?))",
            (json.dumps(list(ids)),),
        )
    ]
    conn.executemany(
        "INSERT INTO autoexec_approval_decisions (approval_id, approver, decision, digest, note, "
        "via, decided_at) SELECT approval_id, 'ana', 'approve', digest, NULL, 'cli', ? FROM "
        "autoexec_approvals WHERE approval_id = ?",
        [(moment, i) for i in ids],
    )
    conn.executemany(
        "UPDATE autoexec_approvals SET status = 'approved', decided_at = ?, decided_by = 'ana', "
        "decided_via = 'cli', decision_note = NULL WHERE approval_id = ? AND status = 'pending'",
        [(moment, i) for i in ids],
    )
    conn.executemany(
        "UPDATE autoexec_workflow_instances SET next_due = ? WHERE instance_id = ?",
        [(moment, i) for i in instance_ids],
    )
    conn.execute("COMMIT")
    seconds = time.perf_counter() - start
    conn.close()
    return seconds


def raw_list(db: Path) -> tuple[float, int]:
    """The listing's SELECT with sqlite3 and fetchall(); seconds and rows."""
    conn = sqlite3.connect(db)
    columns = ", ".join(LISTING_COLUMNS)
    start = time.perf_counter()
    rows = conn.execute(
        f"SELECT {columns} FROM autoexec_approvals WHERE playbook = ? AND status = 'pending' "
        "ORDER BY requested_at, approval_id",
        (PLAYBOOK,),
    ).fetchall()
    seconds = time.perf_counter() - start
    conn.close()
    return seconds, len(rows)


_TIMES = ("requested_at", "expires_at", "sla_due_at", "decided_at")


def frame_from_raw(db: Path) -> tuple[float, pd.DataFrame]:
    """The listing as a DataFrame built from the raw sqlite3 rows (times parsed as ISO 8601,
    vectorised): what the ledger's listing could cost; seconds and the frame."""
    conn = sqlite3.connect(db)
    columns = list(LISTING_COLUMNS)
    start = time.perf_counter()
    rows = conn.execute(
        f"SELECT {', '.join(columns)} FROM autoexec_approvals WHERE playbook = ? AND "
        "status = 'pending' ORDER BY requested_at, approval_id",
        (PLAYBOOK,),
    ).fetchall()
    frame = pd.DataFrame(rows, columns=columns)
    for column in _TIMES:
        frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
    seconds = time.perf_counter() - start
    conn.close()
    return seconds, frame


def _cli(args: Sequence[str]) -> tuple[float, str]:
    from click.testing import CliRunner

    from autoexec_dagster.cli import cli

    start = time.perf_counter()
    result = CliRunner().invoke(cli, list(args), env={"DAGSTER_HOME": ""}, catch_exceptions=False)
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    return seconds, result.output


def _profile(fn: Any, *args: Any, **kwargs: Any) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    fn(*args, **kwargs)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
    return out.getvalue()


def run(
    *,
    requests: int = 100_000,
    bulk: int = 10_000,
    repeats: int = 3,
    list_repeats: int = 5,
    profile: bool = False,
) -> dict[str, Any]:
    """Fill a ledger, time the listings, then the bulk approvals against their baselines."""
    partitions = requests // bulk
    if partitions < repeats + 2:
        raise ValueError(f"--requests must hold at least {repeats + 2} partitions of --bulk")
    with tempfile.TemporaryDirectory(prefix="autoexec-bench-approvals-") as tmp:
        folder = Path(tmp)
        db = folder / "ledger.db"
        url = f"sqlite:///{db}"
        ledger = ActionLedger(url, clock=FixedClock())
        filled = fill(ledger, requests=requests, per_partition=bulk)
        busy, cpu, wall = machine_busy_seconds(), time.process_time(), time.perf_counter()

        list_api: list[float] = []
        list_raw: list[float] = []
        list_frame: list[float] = []
        same = True
        for _ in range(list_repeats):
            start = time.perf_counter()
            frame = ledger.pending_approvals(playbook=PLAYBOOK)
            list_api.append(time.perf_counter() - start)
            assert len(frame) == requests
            seconds, n = raw_list(db)
            assert n == requests
            list_raw.append(seconds)
            seconds, built = frame_from_raw(db)
            list_frame.append(seconds)
            same = same and bool(built.equals(frame))
        list_cli, listing = _cli(["approvals", "--ledger", url, "-p", PLAYBOOK, "--sort", "-value"])
        assert f"50 of {requests:,} request(s) shown" in listing
        list_cli_oldest, listing = _cli(["approvals", "--ledger", url, "-p", PLAYBOOK])
        assert f"50 of {requests:,} request(s) shown" in listing
        list_profile = _profile(ledger.pending_approvals, playbook=PLAYBOOK) if profile else ""

        copy = folder / "baseline.db"
        with sqlite3.connect(db) as source, sqlite3.connect(copy) as target:
            source.backup(target)
        bulk_api: list[float] = []
        bulk_raw: list[float] = []
        for index in range(repeats):
            partition = _partition(index)
            ids = _ids(partition, db)
            assert len(ids) == bulk
            start = time.perf_counter()
            results = ledger.approve(ids, by="ana", via="cli")
            bulk_api.append(time.perf_counter() - start)
            assert len(results) == bulk and all(r.status == "approved" for r in results)
            bulk_raw.append(raw_approve(copy, ids))
        assert _ids(_partition(0), copy) == []
        bulk_profile = ""
        cli_partition = _partition(repeats)
        bulk_cli, output = _cli(
            [
                "approve",
                "--ledger",
                url,
                "-p",
                PLAYBOOK,
                "-k",
                cli_partition,
                "--where",
                "value > 0",
                "--by",
                "bob",
                "--yes",
            ]
        )
        assert f"Approved {bulk:,} request(s) as bob" in output, output
        if profile:
            ids = _ids(_partition(repeats + 1), db)
            bulk_profile = _profile(ledger.approve, ids, by="ana", via="cli")
        load = other_load(
            machine_busy_seconds() - busy, time.process_time() - cpu, time.perf_counter() - wall
        )
        size_mib = db.stat().st_size / 2**20
        ledger.dispose()
    return {
        "other_load": load,
        "requests": requests,
        "bulk": bulk,
        "db_mib": size_mib,
        **filled,
        "list_api_seconds": list_api,
        "list_api_median": statistics.median(list_api),
        "list_raw_median": statistics.median(list_raw),
        "list_ratio": statistics.median(list_api) / statistics.median(list_raw),
        "list_frame_median": statistics.median(list_frame),
        "list_frame_same": same,
        "list_cli_seconds": list_cli,
        "list_cli_oldest_seconds": list_cli_oldest,
        "bulk_api_seconds": bulk_api,
        "bulk_api_median": statistics.median(bulk_api),
        "bulk_raw_seconds": bulk_raw,
        "bulk_raw_median": statistics.median(bulk_raw),
        "bulk_ratio": statistics.median(bulk_api) / statistics.median(bulk_raw),
        "bulk_cli_seconds": bulk_cli,
        "list_profile": list_profile,
        "bulk_profile": bulk_profile,
    }


def report(result: dict[str, Any]) -> list[str]:
    """Human-readable lines for a result of :func:`run`."""
    n, bulk = result["requests"], result["bulk"]
    api = ", ".join(f"{s:.3f}" for s in result["bulk_api_seconds"])
    raw = ", ".join(f"{s:.3f}" for s in result["bulk_raw_seconds"])
    lines = [
        f"ledger: {n:,} pending requests in {n // bulk} partitions ({result['db_mib']:.0f} MiB "
        f"SQLite file); written in {result['requests_seconds']:.1f} s (requests) + "
        f"{result['instances_seconds']:.1f} s (instances)",
        f"list {n:,} pending, ledger.pending_approvals: median {result['list_api_median']:.3f} s "
        f"({', '.join(f'{s:.3f}' for s in result['list_api_seconds'])}); raw sqlite3 SELECT "
        f"fetchall {result['list_raw_median']:.3f} s; ratio {result['list_ratio']:.1f}x",
        f"  the same DataFrame built from the raw rows (times parsed as ISO 8601): median "
        f"{result['list_frame_median']:.3f} s; equal to the ledger's: {result['list_frame_same']}",
        f"  autoexec approvals --sort -value (sort {n:,}, show 50), in process: "
        f"{result['list_cli_seconds']:.3f} s",
        f"  autoexec approvals (oldest first, show 50 of {n:,}: a LIMIT in SQL and a grouped count), "
        f"in process: {result['list_cli_oldest_seconds']:.3f} s",
        f"bulk approve {bulk:,}, ledger.approve: median {result['bulk_api_median']:.3f} s ({api}); "
        f"raw sqlite3 writes {result['bulk_raw_median']:.3f} s ({raw}); ratio "
        f"{result['bulk_ratio']:.1f}x",
        f"  autoexec approve -p P -k K --where 'value > 0' --yes ({bulk:,}), in process: "
        f"{result['bulk_cli_seconds']:.3f} s",
        f"other processes kept {result['other_load']:.2f} cores busy meanwhile",
    ]
    for name in ("list_profile", "bulk_profile"):
        if result.get(name):
            lines += [f"-- profile: {name} --", result[name]]
    return lines


def checks(result: dict[str, Any]) -> list[Check]:
    """The approval targets: bulk approval <= 1 s, listing <= 0.5 s."""
    bulk, n = result["bulk"], result["requests"]
    return [
        Check(
            f"bulk approval of {bulk:,} pending (ledger.approve, median)",
            f"{result['bulk_api_median']:.3f} s",
            f"<= {TARGET_BULK_SECONDS} s",
            result["bulk_api_median"] <= TARGET_BULK_SECONDS,
        ),
        Check(
            f"bulk approval of {bulk:,} by --where (autoexec approve, in process)",
            f"{result['bulk_cli_seconds']:.3f} s",
            f"<= {TARGET_BULK_SECONDS} s",
            result["bulk_cli_seconds"] <= TARGET_BULK_SECONDS,
        ),
        Check(
            f"listing {n:,} pending (ledger.pending_approvals, median)",
            f"{result['list_api_median']:.3f} s",
            f"<= {TARGET_LIST_SECONDS} s",
            result["list_api_median"] <= TARGET_LIST_SECONDS,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the approval benchmark alone; exit code 1 if a target is missed."""
    parser = argparse.ArgumentParser(description="bulk approval and listing of approval requests")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--bulk", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--list-repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print cProfile of both calls")
    args = parser.parse_args(argv)
    result = run(
        requests=args.requests,
        bulk=args.bulk,
        repeats=args.repeats,
        list_repeats=args.list_repeats,
        profile=args.profile,
    )
    return finish(report(result), checks(result))


if __name__ == "__main__":
    raise SystemExit(main())
