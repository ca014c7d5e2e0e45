"""A worker process for the workflow crash test: advances workflow instances and dies on cue.

One trial is a JSON spec (see :func:`run_workflow_trial`): the ledger URL, the receiver's base
URL, how many instances, the partition, the clock file, and optionally a kill point with
``kill_after`` k (the process SIGKILLs itself on the k-th pass through that point). The points are
those of :mod:`tests.crash_worker` (``after_reserve``, ``after_claim``, ``after_send``,
``before_complete``, ``during_flush``) plus the workflow store's own:

- ``after_claim_instances``: ``claim_instances`` returned (instances claimed, none moved);
- ``during_save``: inside ``save_instances``' transaction, an UPDATE executed, COMMIT not yet;
- ``after_save``: ``save_instances`` committed.

The worker routes the insight, runs ``execute_plan`` (which starts the instances and takes them
as far as they go), then calls ``advance_workflows`` until no instance is active, moving the
injected clock to the next due time whenever nothing is due. The clock lives in a file, so the
restarted worker continues from the time the killed one had reached. A restart is the same spec
without a kill point: re-running the partition starts nothing twice.

``python -m tests.workflow_crash_worker --serve`` is the fork server
(:class:`tests.crash_worker.ForkServer` with ``module="tests.workflow_crash_worker"``).
"""

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.crash_worker import POINTS as OUTBOX_POINTS
from tests.crash_worker import _tripping_webhook, _Tripwire, serve

PLAYBOOK = "workflow_crash"
WORKFLOW = "three_step"
STEPS = ("prepare", "check", "finish")
POLL_EVERY = timedelta(seconds=30)
POLL_TIMEOUT = timedelta(minutes=10)
START = datetime(2026, 12, 1, 10, 5, tzinfo=UTC)
SECRET = "whsec_dGVzdC1zZWNyZXQtZm9yLXdvcmtmbG93LWNyYXNo"
POINTS = (*OUTBOX_POINTS, "after_claim_instances", "during_save", "after_save")
# The killed worker's instance claims block a restart until their lease runs out (in wall time:
# a dead worker's instance claim is not recovered by pid, unlike its step attempts).
LEASE_SECONDS = 2.0


def polls_needed(entity_id: str) -> int:
    """How many polls of ``check`` an entity needs before it is ready (1, 2 or 3)."""
    return 1 + int(entity_id.lstrip("A")) % 3


def playbook() -> Any:
    """Every account starts the three-step workflow; guardrails opened for the volume."""
    from autoexec_dagster import Guardrails, Playbook, Rule, Step, Workflow

    return Playbook(
        name=PLAYBOOK,
        entity_key="account_id",
        rules=[Rule(name="every_account", when="score >= 0", workflow=WORKFLOW)],
        workflows={
            WORKFLOW: Workflow(
                steps=[
                    Step(name="prepare", action="prepare"),
                    Step(
                        name="check",
                        action="check",
                        until="`check.ready` == True",
                        every=f"{int(POLL_EVERY.total_seconds())}s",
                        timeout=f"{int(POLL_TIMEOUT.total_seconds() // 60)}m",
                    ),
                    Step(name="finish", action="finish"),
                ]
            )
        },
        guardrails=Guardrails(max_actions=None, max_flagged_fraction=1.0),
    )


class FileClock:
    """The ledger's clock, kept in a file so a restarted worker continues from the same time.

    The file is written (atomically) before the new time is used, so a kill can never leave the
    ledger ahead of the file.
    """

    def __init__(self, path: Path):
        self.path = path
        self.now = datetime.fromisoformat(path.read_text()) if path.exists() else START
        if not path.exists():
            self.set(self.now)

    def __call__(self) -> datetime:
        return self.now

    def set(self, when: datetime) -> None:
        scratch = self.path.with_suffix(".tmp")
        scratch.write_text(when.isoformat())
        os.replace(scratch, self.path)
        self.now = when


class _WorkflowWire(_Tripwire):
    """The outbox tripwire plus the workflow store's kill point inside a save."""

    def after_statement(self, statement: str) -> None:
        super().after_statement(statement)
        if self.method() == "save_instances" and statement.lstrip()[:6].upper() == "UPDATE":
            self.passed("during_save")


def _tripping_ledger(url: str, wire: _Tripwire, clock: FileClock) -> Any:
    """An ActionLedger on ``clock`` whose outbox and workflow-store methods report to ``wire``."""
    from sqlalchemy import event

    from autoexec_dagster import ActionLedger

    class WorkflowTrippingLedger(ActionLedger):
        def reserve(self, *args: Any, **kwargs: Any) -> Any:
            with wire.inside("reserve"):
                result = super().reserve(*args, **kwargs)
            wire.passed("after_reserve")
            return result

        def claim(self, *args: Any, **kwargs: Any) -> Any:
            with wire.inside("claim"):
                result = super().claim(*args, **kwargs)
            wire.passed("after_claim")
            return result

        def complete(self, *args: Any, **kwargs: Any) -> Any:
            wire.passed("before_complete")
            with wire.inside("complete"):
                return super().complete(*args, **kwargs)

        def claim_instances(self, *args: Any, **kwargs: Any) -> Any:
            with wire.inside("claim_instances"):
                result = super().claim_instances(*args, **kwargs)
            if result:
                wire.passed("after_claim_instances")
            return result

        def save_instances(self, *args: Any, **kwargs: Any) -> Any:
            with wire.inside("save_instances"):
                result = super().save_instances(*args, **kwargs)
            wire.passed("after_save")
            return result

    ledger = WorkflowTrippingLedger(url, clock=clock)
    wire.dialect = ledger.dialect

    @event.listens_for(ledger.engine, "after_cursor_execute")
    def _after(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        wire.after_statement(statement)

    return ledger


def _held_until(ledger: Any) -> float | None:
    """When the last claim a (dead) worker holds on a due active instance runs out (epoch s)."""
    import sqlalchemy as sa

    from autoexec_dagster.ledger import schema

    t = schema.workflow_instances
    query = sa.select(sa.func.max(t.c.lease_expires_at)).where(
        t.c.playbook == PLAYBOOK,
        t.c.state.in_(schema.ACTIVE_INSTANCE_STATES),
        t.c.worker.is_not(None),
    )
    with ledger.engine.connect() as conn:
        value = conn.execute(query).scalar()
    return None if value is None else float(value)


def run_workflow_trial(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run (or resume) the workflows of one partition to the end; returns what happened.

    Spec keys: ``ledger``, ``receiver`` (base URL; each step posts to ``<receiver>/<step>``),
    ``instances``, ``partition``, ``clock_path``; optional ``concurrency``, ``point`` and
    ``kill_after``, ``deadline_seconds`` (give up, reporting an error, after this long).
    """
    from autoexec_dagster import advance_workflows, execute_plan, route
    from tests.delivery_worker import insight

    wire = _WorkflowWire(spec)
    started = time.perf_counter()
    deadline = started + float(spec.get("deadline_seconds", 120.0))
    result: dict[str, Any] = {"pid": os.getpid()}
    rounds = 0
    lease_waits = 0
    try:
        clock = FileClock(Path(spec["clock_path"]))
        result["clock_at_start"] = clock().isoformat()
        ledger = _tripping_ledger(spec["ledger"], wire, clock)
        channels = {
            step: _tripping_webhook(
                wire,
                url=f"{spec['receiver']}/{step}",
                secret=SECRET,
                allowed_hosts=["127.0.0.1"],
                max_concurrency=int(spec.get("concurrency", 32)),
                backoff_base_seconds=0.01,
                backoff_max_seconds=0.2,
            )
            for step in STEPS
        }
        book = playbook()
        partition = spec["partition"]
        plan = route(insight(int(spec["instances"])), book, partition_key=partition)
        first = execute_plan(
            plan,
            playbook=book,
            ledger=ledger,
            channels=channels,
            partition_key=partition,
            lease_seconds=LEASE_SECONDS,
        )
        result["started"] = first.workflows_started
        delivered = first.workflows.steps_delivered if first.workflows else 0
        while True:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the workflows did not finish within {rounds} rounds")
            due = ledger.next_due(playbook=PLAYBOOK, partition_key=partition)
            if due is None:
                break
            if due.tzinfo is None:
                # SQLite hands DateTime(timezone=True) back naive; the ledger stores UTC.
                due = due.replace(tzinfo=UTC)
            if due > clock():
                clock.set(due)
            report = advance_workflows(
                playbook=book,
                ledger=ledger,
                channels=channels,
                partition_key=partition,
                lease_seconds=LEASE_SECONDS,
            )
            rounds += 1
            delivered += report.steps_delivered
            if report.advanced == 0:
                held = _held_until(ledger)
                if held is not None and held > time.time():
                    # Due work held by the killed worker's instance claim: its lease running
                    # out is the condition we wait for, bounded by the deadline.
                    lease_waits += 1
                    time.sleep(min(held - time.time(), max(0.0, deadline - time.perf_counter())))
        result.update(
            outcome="ok",
            steps_delivered=delivered,
            rounds=rounds,
            lease_waits=lease_waits,
            clock_at_end=clock().isoformat(),
            instance_states=ledger.instance_counts(playbook=PLAYBOOK, partition_key=partition),
        )
        ledger.dispose()
    except Exception as exc:
        result.update(
            outcome="error",
            error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            error=str(exc)[:2000],
            traceback=traceback.format_exc()[-4000:],
        )
    result.update(wire.figures(), seconds=time.perf_counter() - started)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", action="store_true", help="fork server mode (for the tests)")
    parser.add_argument("--spec", help="run one trial given as JSON and print its result")
    args = parser.parse_args(argv)
    if args.serve:
        # serve() imports autoexec_dagster once; every forked child inherits it.
        return serve(run_workflow_trial)
    if not args.spec:
        parser.error("give --serve or --spec")
    print(json.dumps(run_workflow_trial(json.loads(args.spec)), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
