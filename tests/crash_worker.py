"""A worker process for the crash and ledger-fault suites: executes webhook actions and dies on cue.

One trial is a JSON spec (see :func:`run_trial`): the ledger URL, the webhook URL, how many
actions, and optionally

- a *kill point* (``after_reserve``, ``after_claim``, ``after_send``, ``before_complete``,
  ``during_flush``) and ``kill_after`` k: the process SIGKILLs itself on the k-th time it passes
  that point;
- a *ledger fault*: ``fault_at`` n raises a database error from the n-th SQL statement the ledger
  executes (``fault_scope`` limits the count to statements issued by one ledger method, e.g.
  ``heartbeat``, and ``fault_after_claimed`` starts counting only once every action was claimed).

The ledger points wrap the public ``ActionLedger`` methods with pass-through ``(*args, **kwargs)``
wrappers, so they keep working while the ledger's internals change.

Two ways to run it:

- ``python -m tests.crash_worker --spec '{...}'`` runs one trial in this process and prints its
  result as one JSON line (exit status -9 when it killed itself);
- ``python -m tests.crash_worker --serve`` is a fork server for the test suites: it pays the
  ~4 s import of Dagster once, then reads one spec per line on stdin and forks a fresh child
  process per trial, reporting ``{"event": "started", "pid": ...}`` and then
  ``{"event": "exited", "code": ..., "result": ...}``. Each child is a real process: it dies
  by SIGKILL, and its pid is gone before the next trial starts (so recovery sees it dead).
  :class:`ForkServer` is the test side.
"""

import argparse
import contextlib
import faulthandler
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POINTS = ("after_reserve", "after_claim", "after_send", "before_complete", "during_flush")
LEDGER_METHODS = ("reserve", "claim", "heartbeat", "release", "complete", "recover")
ROOT = Path(__file__).resolve().parents[1]


class _Tripwire:
    """Counts passes through each kill point and each ledger statement; kills or faults on cue."""

    def __init__(self, spec: Mapping[str, Any]):
        self.point: str | None = spec.get("point")
        self.kill_after = int(spec.get("kill_after") or 0)
        self.fault_at = int(spec.get("fault_at") or 0)
        self.fault_scope: str | None = spec.get("fault_scope")
        self.fault_after_claimed = bool(spec.get("fault_after_claimed"))
        self.fault_repeat = bool(spec.get("fault_repeat"))
        self.fault_path = Path(spec["result_path"] + ".fault") if "result_path" in spec else None
        self.trace: list[str] | None = [] if spec.get("trace") else None
        self.dialect = ""
        self.total = 0
        self.claimed_keys = 0
        self.counts: Counter[str] = Counter()
        self.statements = 0
        self.scoped_statements = 0
        self.faults = 0
        self.fault_statement: str | None = None
        self.fault_method: str | None = None
        self.lock = threading.Lock()
        # Which ledger method is running in this thread: the executor calls the ledger from
        # worker threads (asyncio.to_thread), several at once.
        self.local = threading.local()

    def passed(self, point: str) -> None:
        with self.lock:
            self.counts[point] += 1
            fire = point == self.point and self.counts[point] == self.kill_after
        if fire:
            os.kill(os.getpid(), signal.SIGKILL)

    def method(self) -> str | None:
        return getattr(self.local, "method", None)

    @contextlib.contextmanager
    def inside(self, name: str) -> Iterator[None]:
        outer = self.method()
        self.local.method = name
        try:
            yield
        finally:
            self.local.method = outer

    def before_statement(self, statement: str) -> None:
        """Raise the injected database error when this statement is the chosen one."""
        with self.lock:
            self.statements += 1
            if self.trace is not None:
                self.trace.append(self.method() or "(other)")
            if self.fault_scope is not None and self.method() != self.fault_scope:
                return
            if self.fault_after_claimed and self.claimed_keys < self.total:
                return
            self.scoped_statements += 1
            n = self.scoped_statements
            hit = self.fault_at > 0 and (
                n == self.fault_at or (self.fault_repeat and n > self.fault_at)
            )
            if not hit:
                return
            self.faults += 1
            if self.fault_statement is None:
                self.fault_statement = " ".join(statement.split())[:160]
                self.fault_method = self.method() or "(other)"
                # Written at once: a run that hangs afterwards is killed without a result.
                if self.fault_path is not None:
                    self.fault_path.write_text(
                        json.dumps({"statement": self.fault_statement, "method": self.fault_method})
                    )
        raise _database_error(self.dialect)

    def after_statement(self, statement: str) -> None:
        # A flush is complete()'s transaction: kill once its UPDATE ran but before COMMIT.
        if self.method() == "complete" and statement.lstrip()[:6].upper() == "UPDATE":
            self.passed("during_flush")

    def figures(self) -> dict[str, Any]:
        with self.lock:
            return {
                "counts": dict(self.counts),
                "statements": self.statements,
                "scoped_statements": self.scoped_statements,
                "faults": self.faults,
                "fault_statement": self.fault_statement,
                "fault_method": self.fault_method,
                "trace": self.trace,
            }


def _database_error(dialect: str) -> BaseException:
    """A driver-level error, as the database would raise it (SQLAlchemy wraps it as usual)."""
    if dialect == "postgresql":
        import psycopg

        return psycopg.OperationalError("injected fault: server closed the connection unexpectedly")
    import sqlite3

    return sqlite3.OperationalError("disk I/O error (injected fault)")


def _tripping_ledger(url: str, wire: _Tripwire) -> Any:
    """An ActionLedger whose public outbox methods report to ``wire``; built after the import."""
    from sqlalchemy import event

    from autoexec_dagster import ActionLedger

    class TrippingLedger(ActionLedger):
        def reserve(self, *args: Any, **kwargs: Any) -> Any:
            with wire.inside("reserve"):
                result = super().reserve(*args, **kwargs)
            wire.passed("after_reserve")
            return result

        def claim(self, *args: Any, **kwargs: Any) -> Any:
            with wire.inside("claim"):
                result = super().claim(*args, **kwargs)
            with contextlib.suppress(TypeError), wire.lock:
                wire.claimed_keys += len(result)
            wire.passed("after_claim")
            return result

        def heartbeat(self, *args: Any, **kwargs: Any) -> Any:
            with wire.inside("heartbeat"):
                return super().heartbeat(*args, **kwargs)

        def release(self, *args: Any, **kwargs: Any) -> Any:
            with wire.inside("release"):
                return super().release(*args, **kwargs)

        def complete(self, *args: Any, **kwargs: Any) -> Any:
            wire.passed("before_complete")
            with wire.inside("complete"):
                return super().complete(*args, **kwargs)

        def recover(self, *args: Any, **kwargs: Any) -> Any:
            with wire.inside("recover"):
                return super().recover(*args, **kwargs)

        def pause_reason(self, *args: Any, **kwargs: Any) -> Any:
            with wire.inside("pause_reason"):
                return super().pause_reason(*args, **kwargs)

    ledger = TrippingLedger(url)
    wire.dialect = ledger.dialect

    @event.listens_for(ledger.engine, "before_cursor_execute")
    def _before(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        wire.before_statement(statement)

    @event.listens_for(ledger.engine, "after_cursor_execute")
    def _after(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        wire.after_statement(statement)

    return ledger


def _tripping_webhook(wire: _Tripwire, **params: Any) -> Any:
    """A WebhookChannel whose sender passes ``after_send`` once the receiver has answered."""
    from autoexec_dagster import WebhookChannel
    from autoexec_dagster.channels.base import ActionRequest, Sender

    class _TrippingSender:
        def __init__(self, inner: Sender):
            self.inner = inner

        async def send(self, request: ActionRequest) -> Any:
            result = await self.inner.send(request)
            wire.passed("after_send")
            return result

    class TrippingWebhook(WebhookChannel):
        @asynccontextmanager
        async def open_sender(self) -> AsyncIterator[Any]:  # type: ignore[override]
            async with super().open_sender() as sender:
                yield _TrippingSender(sender)

    return TrippingWebhook(**params)


def run_trial(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Execute one trial in this process; returns what happened (unless it killed itself).

    Spec keys: ``ledger``, ``webhook``, ``entities``, ``partition``; optional ``concurrency``,
    ``lease_seconds``, ``worker_name`` (sent as the ``X-Worker`` header), ``point`` and
    ``kill_after``, ``fault_at``, ``fault_scope``, ``fault_after_claimed``, ``fault_repeat``,
    ``trace`` (return the ledger method behind each SQL statement, in order).
    """
    from autoexec_dagster import LedgerError, execute_plan, route
    from tests.delivery_worker import SECRET, insight, playbook

    wire = _Tripwire(spec)
    wire.total = int(spec["entities"])
    started = time.perf_counter()
    result: dict[str, Any] = {"pid": os.getpid()}
    try:
        ledger = _tripping_ledger(spec["ledger"], wire)
        channel = _tripping_webhook(
            wire,
            url=spec["webhook"],
            secret=SECRET,
            allowed_hosts=["127.0.0.1"],
            max_concurrency=int(spec.get("concurrency", 32)),
            backoff_base_seconds=0.01,
            backoff_max_seconds=0.2,
            headers={"X-Worker": str(spec.get("worker_name", "crash_worker"))},
        )
        book = playbook()
        plan = route(insight(wire.total), book, partition_key=spec["partition"])
        report = execute_plan(
            plan,
            playbook=book,
            ledger=ledger,
            channels={"crm_task": channel},
            partition_key=spec["partition"],
            lease_seconds=float(spec.get("lease_seconds", 60.0)),
        )
        result.update(outcome="ok", report=report.as_dict())
    except Exception as exc:
        result.update(
            outcome="error",
            error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            error=str(exc)[:2000],
            ledger_error=isinstance(exc, LedgerError),
            traceback=traceback.format_exc()[-4000:],
        )
    result.update(wire.figures(), seconds=time.perf_counter() - started)
    return result


# -- the fork server ---------------------------------------------------------------------------


def _emit(message: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, default=str) + "\n")
    sys.stdout.flush()


def _child(spec: Mapping[str, Any], trial: Callable[[Mapping[str, Any]], dict[str, Any]]) -> None:
    # The server's stdout is the protocol channel: the child's own output goes to stderr.
    os.dup2(2, 1)
    # A hung child is asked for its threads' stacks before it is killed (ForkServer.run).
    stacks = open(spec["result_path"] + ".stacks", "w")  # noqa: SIM115  (open until _exit)
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    code = 1
    try:
        outcome = trial(spec)
        Path(spec["result_path"]).write_text(json.dumps(outcome, default=str))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def serve(trial: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None) -> int:
    """Fork one child per spec line on stdin; report its pid, then its exit and result.

    ``trial`` runs one spec in the child (default :func:`run_trial`); other worker modules
    (e.g. ``tests.workflow_crash_worker``) serve their own trials through the same protocol.
    """
    import autoexec_dagster  # noqa: F401  (paid once here, inherited by every child)
    import tests.delivery_worker  # noqa: F401

    for line in sys.stdin:
        if not line.strip():
            continue
        spec = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(spec, trial or run_trial)
        _emit({"event": "started", "pid": pid})
        _, status = os.waitpid(pid, 0)
        path = Path(spec["result_path"])
        outcome = json.loads(path.read_text()) if path.exists() else None
        _emit(
            {
                "event": "exited",
                "pid": pid,
                "code": os.waitstatus_to_exitcode(status),
                "result": outcome,
            }
        )
    return 0


@dataclass
class Trial:
    """How one forked trial ended, seen from the test."""

    code: int | None
    result: dict[str, Any] | None
    seconds: float
    timed_out: bool = False
    pid: int = 0
    fault: dict[str, Any] | None = None
    stacks: str = ""  # every thread's stack, when the trial hung and was killed

    @property
    def killed(self) -> bool:
        return self.code == -signal.SIGKILL

    def describe(self) -> str:
        head = f"exit {self.code}, {self.seconds:.1f} s" + (", TIMED OUT" if self.timed_out else "")
        if self.fault:
            head += f", fault in {self.fault['method']}: {self.fault['statement']!r}"
        if self.result and self.result.get("outcome") == "error":
            head += f", {self.result['error_type']}: {self.result['error'][:300]}"
        if self.stacks:
            head += f"\nstacks when it was killed:\n{self.stacks[-6000:]}"
        return head


class ForkServer:
    """The test side of ``python -m tests.crash_worker --serve`` (or ``module``'s ``--serve``).

    Every trial gets a deadline: a child that does not end in time is SIGKILLed by its pid and
    reported as timed out, so a hang fails the test instead of blocking the suite.
    """

    def __init__(self, workdir: Path, *, module: str = "tests.crash_worker"):
        self.workdir = workdir
        self.log_path = workdir / "crash_worker.log"
        self._log = self.log_path.open("ab")
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._count = 0
        # One BLAS thread: the server forks, and children must not inherit a thread pool.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            # ``module`` is any worker module whose ``--serve`` runs :func:`serve`.
            [sys.executable, "-m", module, "--serve"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("the crash worker's fork server did not answer") from None
        if line is None:
            raise RuntimeError(f"the fork server exited; its log:\n{self.log_tail()}")
        return json.loads(line)

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def run(self, spec: Mapping[str, Any], *, deadline: float) -> Trial:
        """Run one trial in a fresh child; SIGKILL it if it is still running after ``deadline``."""
        self._count += 1
        result_path = self.workdir / f"trial-{self._count}.json"
        assert self.process.stdin is not None
        started = time.monotonic()
        self.process.stdin.write(json.dumps({**spec, "result_path": str(result_path)}) + "\n")
        self.process.stdin.flush()
        # The import is paid already; a fork is quick even on a loaded machine.
        pid = int(self._next(timeout=60)["pid"])
        timed_out = False
        try:
            message = self._next(timeout=deadline)
        except TimeoutError:
            timed_out = True
            self._dump_stacks(pid, Path(f"{result_path}.stacks"))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            message = self._next(timeout=60)
        fault_path = Path(f"{result_path}.fault")
        stacks_path = Path(f"{result_path}.stacks")
        return Trial(
            code=message["code"],
            result=message["result"],
            seconds=time.monotonic() - started,
            timed_out=timed_out,
            pid=pid,
            fault=json.loads(fault_path.read_text()) if fault_path.exists() else None,
            stacks=stacks_path.read_text(errors="replace") if timed_out else "",
        )

    @staticmethod
    def _dump_stacks(pid: int, path: Path) -> None:
        """Have a hung child write every thread's stack to ``path`` (faulthandler, SIGUSR1).

        The handler is C code that runs as the signal arrives, even while Python is blocked; the
        file is polled for a bounded time so that a child that cannot answer is still killed.
        """
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
        until = time.monotonic() + 5
        while time.monotonic() < until:
            if path.exists() and path.stat().st_size and "File" in path.read_text(errors="replace"):
                return
            time.sleep(0.05)

    def close(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self._log.close()

    def __enter__(self) -> "ForkServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", action="store_true", help="fork server mode (for the tests)")
    parser.add_argument("--spec", help="run one trial given as JSON and print its result")
    args = parser.parse_args(argv)
    if args.serve:
        return serve()
    if not args.spec:
        parser.error("give --serve or --spec")
    print(json.dumps(run_trial(json.loads(args.spec)), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
