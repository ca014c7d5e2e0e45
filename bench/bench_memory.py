"""Memory benchmark: a 1,000,000-row partition end to end in dry run, in a child process.

Target (DESIGN.md, "Performance budgets"): peak RSS under 1.5 GiB.

Two children run one after the other, each a fresh interpreter with the same imports
(``autoexec_dagster``, and so Dagster, pandas and SQLAlchemy):

* baseline: builds the 1,000,000-row churn insight DataFrame and nothing else;
* pipeline: builds the same insight, then ``route`` and ``execute_plan(dry_run=True)`` with a SQLite
  ledger file in a temporary directory.

Each child reports its own peak RSS (``VmHWM`` from ``/proc/self/status``, which starts afresh at
``exec``; ``getrusage``'s ``ru_maxrss`` would also count the parent's RSS inherited at ``fork``),
the RSS after each phase and the wall time of each phase. ``--profile`` also prints
the pipeline child's cProfile top functions.

Run alone: ``.venv/bin/python -m bench.bench_memory [--rows N] [--profile]``.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.bench_routing import Check

REPO_ROOT = Path(__file__).resolve().parent.parent
BUDGET_BYTES = int(1.5 * 1024**3)
MIB = 1024**2


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _child(mode: str, rows: int, folder: str, profile: bool) -> dict[str, Any]:
    """The work of one child process; returns its figures (printed as JSON by ``main``)."""
    phases: list[dict[str, Any]] = []
    started = time.perf_counter()

    def mark(name: str, since: float) -> float:
        now = time.perf_counter()
        phases.append(
            {"phase": name, "seconds": now - since, "rss": _status_bytes("VmRSS"), "hwm": None}
        )
        phases[-1]["hwm"] = _status_bytes("VmHWM")
        return now

    # Imported here so the clock and the RSS checkpoints see the import cost as its own phase.
    from autoexec_dagster.channels.webhook import WebhookChannel
    from autoexec_dagster.executor.plan_execution import execute_plan
    from autoexec_dagster.ledger.action_ledger import ActionLedger
    from autoexec_dagster.routing import route
    from bench.bench_routing import INSIGHT, PARTITION, churn_playbook, churn_scores

    t = mark("imports", started)
    insight = churn_scores(rows)
    t = mark("build insight", t)
    result: dict[str, Any] = {"mode": mode, "rows": rows}
    if mode == "pipeline":
        # ~50% of a churn partition is flagged; the default guardrails would block the batch.
        playbook = churn_playbook(max_actions=None, max_flagged_fraction=0.6)
        channels = {
            action: WebhookChannel(
                url="http://127.0.0.1:9/never-called", secret="dry", allowed_hosts=["127.0.0.1"]
            )
            for action in playbook.actions
        }
        ledger = ActionLedger(f"sqlite:///{Path(folder) / 'ledger.db'}")
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        plan = route(insight, playbook, partition_key=PARTITION, insight_name=INSIGHT)
        t = mark("route", t)
        report = execute_plan(
            plan, playbook=playbook, ledger=ledger, channels=channels, dry_run=True
        )
        t = mark("execute_plan(dry_run=True)", t)
        if profiler is not None:
            import io
            import pstats

            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
            result["profile"] = out.getvalue()
        result["counts"] = report.counts()
        result["ledger_bytes"] = sum(
            p.stat().st_size for p in Path(folder).iterdir() if p.name.startswith("ledger.db")
        )
        del plan, report
    result["phases"] = phases
    result["seconds"] = time.perf_counter() - started
    result["peak_rss"] = _status_bytes("VmHWM")
    return result


def _children_cpu() -> float:
    """User plus system CPU of the waited-for child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(mode: str, *, rows: int, profile: bool = False) -> dict[str, Any]:
    """Run one child (``baseline`` or ``pipeline``) in a fresh interpreter; return its figures."""
    # Imported here, in the parent only: a child must not load the library before it is timed.
    from bench.bench_routing import machine_busy_seconds, other_load

    with tempfile.TemporaryDirectory(prefix="autoexec-bench-mem-") as folder:
        command = [
            sys.executable,
            "-m",
            "bench.bench_memory",
            "--child",
            mode,
            "--rows",
            str(rows),
            "--folder",
            folder,
        ] + (["--profile"] if profile else [])
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        busy, children = machine_busy_seconds(), _children_cpu()
        started = time.perf_counter()
        done = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800
        )
        wall = time.perf_counter() - started
        load = other_load(machine_busy_seconds() - busy, _children_cpu() - children, wall)
    if done.returncode != 0:
        raise RuntimeError(f"memory child {mode!r} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall"] = wall
    result["other_load"] = load
    return result


def run(*, rows: int, profile: bool = False) -> dict[str, Any]:
    """The baseline child, then the pipeline child; return both and the comparison."""
    baseline = run_child("baseline", rows=rows)
    pipeline = run_child("pipeline", rows=rows, profile=profile)
    return {
        "rows": rows,
        "baseline": baseline,
        "pipeline": pipeline,
        "increment": pipeline["peak_rss"] - baseline["peak_rss"],
        "ratio": pipeline["peak_rss"] / baseline["peak_rss"],
        "budget": BUDGET_BYTES,
        "other_load": max(baseline["other_load"], pipeline["other_load"]),
    }


def report(result: dict[str, Any]) -> list[str]:
    """Human-readable lines for a result of :func:`run`."""
    base, pipe = result["baseline"], result["pipeline"]
    lines = [
        f"dry run of a {result['rows']:,}-row partition in a child process: peak RSS "
        f"{pipe['peak_rss'] / MIB:,.0f} MiB (VmHWM), process wall {pipe['process_wall']:.1f} s",
        f"baseline child (same imports, builds the insight only): peak RSS "
        f"{base['peak_rss'] / MIB:,.0f} MiB, process wall {base['process_wall']:.1f} s",
        f"  increment {result['increment'] / MIB:,.0f} MiB, ratio pipeline / baseline "
        f"{result['ratio']:.2f}x; budget {result['budget'] / MIB:,.0f} MiB",
    ]
    for phase in pipe["phases"]:
        lines.append(
            f"  {phase['phase']:<28} {phase['seconds']:7.2f} s   RSS after "
            f"{phase['rss'] / MIB:6,.0f} MiB, peak so far {phase['hwm'] / MIB:6,.0f} MiB"
        )
    if "counts" in pipe:
        counts = {k: v for k, v in pipe["counts"].items() if v}
        lines.append(f"  report: {counts}; ledger file {pipe['ledger_bytes'] / MIB:,.0f} MiB")
    lines.append(f"  other processes kept {result['other_load']:.2f} cores busy meanwhile")
    if "profile" in pipe:
        lines += ["  cProfile of route + execute_plan (pipeline child):", pipe["profile"]]
    return lines


def checks(result: dict[str, Any]) -> "list[Check]":
    """The memory target."""
    from bench.bench_routing import Check

    peak = result["pipeline"]["peak_rss"]
    return [
        Check(
            f"dry run {result['rows']:,} rows, peak RSS",
            f"{peak / MIB:,.0f} MiB",
            f"< {result['budget'] / MIB:,.0f} MiB",
            peak < result["budget"],
        )
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the memory benchmark (or, with ``--child``, one of its children)."""
    parser = argparse.ArgumentParser(description="peak RSS of a dry-run partition")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--profile", action="store_true", help="cProfile the pipeline child")
    parser.add_argument("--child", choices=["baseline", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.rows, args.folder or ".", args.profile)))
        return 0
    # Imported here: the measured child must not pay for the routing module's imports.
    from bench.bench_routing import finish

    result = run(rows=args.rows, profile=args.profile)
    return finish(report(result), checks(result))


if __name__ == "__main__":
    raise SystemExit(main())
