"""Run every benchmark of DESIGN.md's "Performance budgets" and check its target.

    .venv/bin/python bench/run_all.py            # the full benchmark (about 2 minutes)
    .venv/bin/python bench/run_all.py --quick    # a smaller smoke version (under a minute)

Prints each benchmark's figures (with its baseline, measured in the same run), then a compact
table of targets, and exits 1 if a target is missed. Each benchmark also runs alone:
``python -m bench.bench_execution``, ``bench.bench_routing``, ``bench.bench_memory``,
``bench.bench_sensor``, ``bench.bench_workflows``, ``bench.bench_approvals``,
``bench.bench_experiment_analysis``, ``bench.bench_sharding`` (PostgreSQL on 127.0.0.1:5432, or
``$AUTOEXEC_BENCH_PG``); the statistical honesty of experiments over many seeds is
``bench/bench_experiment_stats.py`` (minutes of simulation, run on its own).
"""

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: ``python bench/run_all.py``
    sys.path.insert(0, str(REPO_ROOT))

BUSY_WARNING_CORES = 0.25


def machine_description() -> str:
    """CPU model, core count, memory, OS and Python of this machine."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        total_kib = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
        memory = f"{total_kib / 1024**2:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        memory = "unknown memory"
    return (
        f"{model}, {os.cpu_count()} cores, {memory}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def git_revision() -> str:
    """The commit of the work tree, with ``+dirty`` when it has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def idle_check(seconds: float = 1.0) -> float:
    """Cores other processes keep busy right now (sampled over ``seconds``)."""
    from bench.bench_routing import machine_busy_seconds, other_load

    busy, cpu = machine_busy_seconds(), time.process_time()
    time.sleep(seconds)
    return other_load(machine_busy_seconds() - busy, time.process_time() - cpu, seconds)


def wait_until_quiet(limit_seconds: float) -> None:
    """Wait (up to ``limit_seconds``) until other processes leave the cores idle."""
    if limit_seconds <= 0:
        return
    started = time.monotonic()
    load = idle_check(2.0)
    while load > BUSY_WARNING_CORES and time.monotonic() - started < limit_seconds:
        time.sleep(5.0)
        load = idle_check(2.0)
    waited = time.monotonic() - started
    print(f"  (waited {waited:.0f} s for a quiet machine; other processes now {load:.2f} cores)")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; return 1 if a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller smoke version")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[
            "execution",
            "routing",
            "memory",
            "sensor",
            "workflows",
            "approvals",
            "experiment_analysis",
            "sharding",
        ],
        help="run only these benchmarks",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument(
        "--workflow-instances",
        type=int,
        metavar="N",
        help="workflow instances (and baseline actions) of the workflows benchmark "
        "(default 100,000; 10,000 with --quick)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each benchmark, wait up to this long for other processes to go idle",
    )
    args = parser.parse_args(argv)

    # Imported after sys.path is set up; the routing module holds the shared helpers.
    from bench import (
        bench_approvals,
        bench_execution,
        bench_experiment_analysis,
        bench_memory,
        bench_routing,
        bench_sensor,
        bench_sharding,
        bench_workflows,
    )

    selected = args.only or [
        "execution",
        "routing",
        "memory",
        "sensor",
        "workflows",
        "approvals",
        "experiment_analysis",
        "sharding",
    ]
    started = time.perf_counter()
    print(f"autoexec_dagster benchmarks ({'quick smoke' if args.quick else 'full'})")
    print(f"  command: {sys.executable} {' '.join(sys.argv)}")
    print(f"  date:    {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}")
    print(f"  machine: {machine_description()}")
    print(f"  code:    {git_revision()}; seed {bench_routing.SEED}")
    print(f"  other processes busy at start: {idle_check():.2f} cores")

    results: dict[str, Any] = {}
    checks: list[bench_routing.Check] = []
    if "execution" in selected:
        print("\n== executing I/O-bound actions ==", flush=True)
        wait_until_quiet(args.wait_quiet)
        result = bench_execution.run(
            actions=5_000 if args.quick else 10_000,
            concurrency=256,
            repeats=1 if args.quick else 5,
            samples=(10, 40) if args.quick else (50, 300),
        )
        print("\n".join(bench_execution.report(result)))
        results["execution"] = result
        checks += bench_execution.checks(result)
    if "routing" in selected:
        print("\n== routing ==", flush=True)
        wait_until_quiet(args.wait_quiet)
        result = bench_routing.run(
            rows=1_000_000,
            naive_rows=20_000 if args.quick else 100_000,
            repeats=1 if args.quick else 3,
        )
        print("\n".join(bench_routing.report(result)))
        results["routing"] = result
        checks += bench_routing.checks(result)
    if "memory" in selected:
        print("\n== memory: a partition end to end in dry run ==", flush=True)
        wait_until_quiet(args.wait_quiet)
        result = bench_memory.run(rows=200_000 if args.quick else 1_000_000)
        print("\n".join(bench_memory.report(result)))
        results["memory"] = result
        checks += bench_memory.checks(result)
    if "sensor" in selected:
        print("\n== sensor tick over a long history ==", flush=True)
        wait_until_quiet(args.wait_quiet)
        result = bench_sensor.run(partitions=2_000 if args.quick else 10_000)
        print("\n".join(bench_sensor.report(result)))
        results["sensor"] = result
        checks += bench_sensor.checks(result)
    if "workflows" in selected:
        print("\n== workflows: steps through a poll, and the due-work query ==", flush=True)
        wait_until_quiet(args.wait_quiet)
        result = bench_workflows.run(
            instances=args.workflow_instances or (10_000 if args.quick else 100_000),
            concurrency=256,
            due_instances=200_000 if args.quick else 1_000_000,
            due_repeats=5 if args.quick else 20,
        )
        print("\n".join(bench_workflows.report(result)))
        results["workflows"] = result
        checks += bench_workflows.checks(result)
    if "approvals" in selected:
        print("\n== approvals: a bulk approval and the pending listing ==", flush=True)
        wait_until_quiet(args.wait_quiet)
        result = bench_approvals.run(
            requests=30_000 if args.quick else 100_000,
            bulk=10_000,
            repeats=1 if args.quick else 3,
            list_repeats=2 if args.quick else 5,
        )
        print("\n".join(bench_approvals.report(result)))
        results["approvals"] = result
        checks += bench_approvals.checks(result)

    if "experiment_analysis" in selected:
        print("\n== experiment analysis: 1,000,000 assignments with outcomes ==", flush=True)
        wait_until_quiet(args.wait_quiet)
        result = bench_experiment_analysis.run(
            units=200_000 if args.quick else 1_000_000, repeats=1 if args.quick else 3
        )
        print("\n".join(bench_experiment_analysis.report(result)))
        results["experiment_analysis"] = result
        checks += bench_experiment_analysis.checks(result)
    if "sharding" in selected:
        print("\n== sharding: one partition delivered by 1, 2 and 3 shard steps ==", flush=True)
        wait_until_quiet(args.wait_quiet)
        result = bench_sharding.run(
            actions=bench_sharding.QUICK_ACTIONS if args.quick else bench_sharding.DEFAULT_ACTIONS
        )
        print("\n".join(bench_sharding.report(result)))
        results["sharding"] = result
        checks += bench_sharding.checks(result)

    width = max(len(c.name) for c in checks)
    measured = max(len(c.measured) for c in checks)
    target = max(len(c.target) for c in checks)
    print(f"\n{'target':<{width}}  {'measured':>{measured}}  {'budget':<{target}}  result")
    for c in checks:
        verdict = "ok" if c.ok else "MISSED"
        print(f"{c.name:<{width}}  {c.measured:>{measured}}  {c.target:<{target}}  {verdict}")
    busy = {name: r["other_load"] for name, r in results.items()}
    noisy = {name: load for name, load in busy.items() if load > BUSY_WARNING_CORES}
    if noisy:
        loads = ", ".join(f"{name} {load:.2f}" for name, load in noisy.items())
        print(
            f"WARNING: other processes kept cores busy during the measurements ({loads} cores); "
            "the figures are pessimistic, rerun on a quiet machine"
        )
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    missed = [c for c in checks if not c.ok]
    if missed:
        print("MISSED targets: " + "; ".join(f"{c.name} ({c.measured})" for c in missed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
