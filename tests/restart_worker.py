"""A worker process for the PostgreSQL restart test: like ``tests.delivery_worker``, but it ends
with a machine-readable verdict whatever happens.

Run as ``python -m tests.restart_worker --ledger URL --webhook URL --entities N``. It prints one
JSON line and exits 0 with ``{"report": ...}`` when the batch finished, or exits 3 with
``{"error": <exception type>, "message": ..., "autoexec": <derives from AutoexecError>}`` when
the execution raised, so the test can tell a clear error from a crash or a hang. On SIGUSR2 (sent
by a test whose timeout ran out) it writes where its threads and asyncio tasks wait to stderr
and exits 4.
"""

import argparse
import asyncio
import faulthandler
import gc
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from types import FrameType

from autoexec_dagster import ActionLedger, WebhookChannel, execute_plan, route
from autoexec_dagster.errors import AutoexecError
from tests.delivery_worker import PARTITION, SECRET, insight, playbook

FAILED_CLEARLY = 3
HUNG = 4  # exit status after the SIGUSR2 dump


def _where(task: "asyncio.Task[object]") -> str:
    frames = task.get_stack(limit=1)
    if not frames:
        return task.get_coro().__qualname__  # type: ignore[union-attr]
    code = frames[-1].f_code
    return f"{code.co_qualname} ({Path(code.co_filename).name}:{frames[-1].f_lineno})"


def _dump_and_exit(signum: int, frame: FrameType | None) -> None:
    # A test that finds the worker hung sends SIGUSR2: where each asyncio task waits, and which
    # finished tasks died of an exception nobody awaited, say why the run hangs; thread stacks
    # alone show only the event loop's select. Then the worker ends, so the test need not wait.
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    loop = asyncio._get_running_loop()
    if loop is None:
        print("no running event loop", file=sys.stderr, flush=True)
        os._exit(HUNG)
    waiting = Counter(_where(task) for task in asyncio.all_tasks(loop))
    print("pending asyncio tasks, by where they wait:", file=sys.stderr)
    for where, n in waiting.most_common():
        print(f"  {n:4d} x {where}", file=sys.stderr)
    for obj in gc.get_objects():
        if isinstance(obj, asyncio.Task) and obj.done() and not obj.cancelled():
            exc = obj.exception()
            if exc is not None:
                print(
                    f"finished task {obj.get_coro().__qualname__} died of "  # type: ignore[union-attr]
                    f"{type(exc).__module__}.{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}",
                    file=sys.stderr,
                )
    sys.stderr.flush()
    os._exit(HUNG)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--webhook", required=True)
    parser.add_argument("--entities", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--lease-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGUSR2, _dump_and_exit)
    channel = WebhookChannel(
        url=args.webhook,
        secret=SECRET,
        allowed_hosts=["127.0.0.1"],
        max_concurrency=args.concurrency,
        backoff_base_seconds=0.01,
        backoff_max_seconds=0.5,
    )
    book = playbook()
    try:
        report = execute_plan(
            route(insight(args.entities), book, partition_key=PARTITION),
            playbook=book,
            ledger=ActionLedger(args.ledger),
            channels={"crm_task": channel},
            partition_key=PARTITION,
            lease_seconds=args.lease_seconds,
        )
    except Exception as exc:
        # Any exception is reported, so the test sees which type escaped and can demand a
        # LedgerError; the traceback goes to stderr for the person reading a failure.
        import traceback

        traceback.print_exc()
        verdict = {
            "error": type(exc).__name__,
            "message": str(exc),
            "autoexec": isinstance(exc, AutoexecError),
        }
        print(json.dumps(verdict), flush=True)
        return FAILED_CLEARLY
    print(json.dumps({"report": report.as_dict()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
