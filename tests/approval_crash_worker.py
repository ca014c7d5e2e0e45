"""A worker process for the approval crash test: advances a workflow with an approval gate, holds
at named points while the test decides, and dies on cue.

The workflow, per account: ``draft`` (an action step; the receiver's reply carries the order's
``total``) -> ``approval`` (a gate: where ``draft.total`` is above :data:`THRESHOLD` two people,
ana and bo, must approve; elsewhere the rule approves; each approver is notified through the
``notify`` webhook) -> ``submit`` (an action step) -> done.

One run is a JSON spec (see :func:`run_approval_trial`). The worker routes the insight, runs
``execute_plan`` (which starts the instances and takes them as far as they go) and calls
``advance_workflows`` until nothing is due. Unlike the workflow crash worker it never moves the
clock by itself: nothing is due while requests wait for people, and the test decides when time
passes (``clock_to`` sets the shared file clock before the run starts).

Kill points (``point`` and ``kill_after`` k: SIGKILL on the k-th pass) are those of
:mod:`tests.workflow_crash_worker` plus:

- ``after_reserve:<action>`` and ``after_send:<action>``: the outbox points, counted per action
  (``draft``, ``notify``, ``submit``) as well as overall;
- ``during_request``: inside ``request_approvals``' transaction, the INSERT executed, no COMMIT;
- ``after_request`` (``after_request:rule`` for the requests the rule approved,
  ``after_request:pending`` for those that wait for people): ``request_approvals`` committed;
- ``before_close``, ``during_close`` (UPDATE executed, no COMMIT) and ``after_close``: the
  expiry's ``close_approvals``.

A *hold* (``holds``: ``[{"point": ..., "after": k}]`` and ``hold_port``) stops the worker on the
k-th pass through a point: it connects to the test on 127.0.0.1:``hold_port``, sends the point's
name and blocks until the test answers, so a decision lands at a known moment of the advance. A
hold comes before a kill at the same pass.

``python -m tests.approval_crash_worker --serve`` is the fork server
(:class:`tests.crash_worker.ForkServer` with ``module="tests.approval_crash_worker"``).
"""

import argparse
import json
import os
import socket
import sys
import time
import traceback
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.crash_worker import _tripping_webhook, _Tripwire, serve
from tests.workflow_crash_worker import POINTS as WORKFLOW_POINTS
from tests.workflow_crash_worker import FileClock, _tripping_ledger, _WorkflowWire

PLAYBOOK = "approval_crash"
WORKFLOW = "purchase"
GATE = "approval"
STEPS = ("draft", "submit")
NOTIFY = "notify"
ACTIONS = (*STEPS, NOTIFY)
APPROVERS = ("ana", "bo")
THRESHOLD = 5_000
EXPIRES_AFTER = "2d"
SECRET = "whsec_dGVzdC1zZWNyZXQtZm9yLWFwcHJvdmFsLWNyYXNo"
APPROVAL_POINTS = (
    "during_request",
    "after_request",
    "after_request:rule",
    "after_request:pending",
    "before_close",
    "during_close",
    "after_close",
)
POINTS = (
    *WORKFLOW_POINTS,
    *(f"{point}:{action}" for point in ("after_reserve", "after_send") for action in ACTIONS),
    *APPROVAL_POINTS,
)
# A killed worker's instance claims block the restart until they run out (wall time); short, so
# a restart waits little, and still two heartbeats long.
LEASE_SECONDS = 1.0


def total(entity_id: str) -> float:
    """The order total the ``draft`` step's receiver answers for an account (1,000 to 10,000)."""
    return 1_000.0 * (1 + int(entity_id.lstrip("A")) * 7 % 10)


def needs_people(entity_id: str) -> bool:
    """Whether the gate waits for people for this account (else the rule approves it)."""
    return total(entity_id) > THRESHOLD


def playbook() -> Any:
    """Every account starts the purchase workflow; guardrails opened for the volume."""
    from autoexec_dagster import Guardrails, Playbook, Rule, Step, Workflow

    return Playbook(
        name=PLAYBOOK,
        entity_key="account_id",
        rules=[Rule(name="every_account", when="score >= 0", workflow=WORKFLOW)],
        workflows={
            WORKFLOW: Workflow(
                steps=[
                    Step(name="draft", action="draft"),
                    Step(
                        name=GATE,
                        approve_when=f"`draft.total` > {THRESHOLD}",
                        approvers=APPROVERS,
                        min_approvals=2,
                        expires_after=EXPIRES_AFTER,
                        on_expiry="reject",
                        notify=NOTIFY,
                    ),
                    Step(name="submit", action="submit"),
                ],
                on_failure="Purchase not completed",
            )
        },
        guardrails=Guardrails(max_actions=None, max_flagged_fraction=1.0),
    )


class _ApprovalWire(_WorkflowWire):
    """The workflow tripwire plus the approval points, and holds that wait for the test."""

    def __init__(self, spec: Mapping[str, Any]):
        super().__init__(spec)
        self.holds = {(str(h["point"]), int(h["after"])) for h in spec.get("holds", ())}
        self.hold_port = int(spec.get("hold_port") or 0)
        self.hold_counts: Counter[str] = Counter()
        self.held: list[str] = []

    def passed(self, point: str) -> None:
        with self.lock:
            self.hold_counts[point] += 1
            n = self.hold_counts[point]
        if (point, n) in self.holds:
            self._hold(f"{point}#{n}")
        super().passed(point)

    def _hold(self, name: str) -> None:
        # The test answers once it has decided what it decides at this moment; until then this
        # thread (and whatever awaits it) waits, as a slow database would make it wait.
        with socket.create_connection(("127.0.0.1", self.hold_port)) as conn:
            conn.sendall(f"{name}\n".encode())
            conn.makefile("r").readline()
        with self.lock:
            self.held.append(name)

    def after_statement(self, statement: str) -> None:
        super().after_statement(statement)
        verb = statement.lstrip()[:6].upper()
        if self.method() == "request_approvals" and verb == "INSERT":
            self.passed("during_request")
        elif self.method() == "close_approvals" and verb == "UPDATE":
            self.passed("during_close")

    def figures(self) -> dict[str, Any]:
        out = super().figures()
        with self.lock:
            out["held"] = list(self.held)
        return out


class _ChannelWire(_Tripwire):
    """One channel's view of the trial's wire: each point passes overall and per action."""

    def __init__(self, wire: _ApprovalWire, action: str):
        # Deliberately no _Tripwire state of its own: every count lives in the trial's wire.
        self.wire = wire
        self.action = action

    def passed(self, point: str) -> None:
        self.wire.passed(point)
        self.wire.passed(f"{point}:{self.action}")


def _approval_ledger(url: str, wire: _ApprovalWire, clock: FileClock) -> Any:
    """The workflow crash worker's tripping ledger, with the approval methods reporting too."""
    ledger = _tripping_ledger(url, wire, clock)
    reserve, request, close = ledger.reserve, ledger.request_approvals, ledger.close_approvals

    def reserve_rows(rows: Any, *args: Any, **kwargs: Any) -> Any:
        result = reserve(rows, *args, **kwargs)
        for action in sorted({str(row.get("action")) for row in rows}):
            wire.passed(f"after_reserve:{action}")
        return result

    def request_approvals(rows: Any, *args: Any, **kwargs: Any) -> Any:
        with wire.inside("request_approvals"):
            result = request(rows, *args, **kwargs)
        wire.passed("after_request")
        # The gate records the rule's approvals with their status; requests for people without.
        wire.passed(
            "after_request:rule" if all("status" in r for r in rows) else "after_request:pending"
        )
        return result

    def close_approvals(*args: Any, **kwargs: Any) -> Any:
        wire.passed("before_close")
        with wire.inside("close_approvals"):
            result = close(*args, **kwargs)
        wire.passed("after_close")
        return result

    ledger.reserve = reserve_rows
    ledger.request_approvals = request_approvals
    ledger.close_approvals = close_approvals
    return ledger


def _held_until(ledger: Any, partition: str, now: datetime) -> float | None:
    """When the last claim a (dead) worker holds on a due instance of the partition runs out."""
    import sqlalchemy as sa

    from autoexec_dagster.ledger import schema

    t = schema.workflow_instances
    query = sa.select(sa.func.max(t.c.lease_expires_at)).where(
        t.c.playbook == PLAYBOOK,
        t.c.partition_key == partition,
        t.c.state.in_(schema.ACTIVE_INSTANCE_STATES),
        t.c.worker.is_not(None),
        t.c.next_due <= now,
    )
    with ledger.engine.connect() as conn:
        value = conn.execute(query).scalar()
    return None if value is None else float(value)


def run_approval_trial(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run (or resume) the partition's workflows until nothing is due; returns what happened.

    Spec keys: ``ledger``, ``receiver`` (base URL; each action posts to ``<receiver>/<action>``),
    ``instances``, ``partition``, ``clock_path``; optional ``clock_to`` (ISO time the clock is
    moved to first), ``concurrency``, ``point`` and ``kill_after``, ``holds`` and ``hold_port``,
    ``deadline_seconds`` (give up, reporting an error, after this long).
    """
    from autoexec_dagster import advance_workflows, execute_plan, route
    from tests.delivery_worker import insight

    wire = _ApprovalWire(spec)
    started = time.perf_counter()
    deadline = started + float(spec.get("deadline_seconds", 60.0))
    result: dict[str, Any] = {"pid": os.getpid()}
    rounds = lease_waits = 0
    try:
        clock = FileClock(Path(spec["clock_path"]))
        if spec.get("clock_to"):
            clock.set(datetime.fromisoformat(spec["clock_to"]).astimezone(UTC))
        result["clock"] = clock().isoformat()
        ledger = _approval_ledger(spec["ledger"], wire, clock)
        channels = {
            action: _tripping_webhook(
                _ChannelWire(wire, action),
                url=f"{spec['receiver']}/{action}",
                secret=SECRET,
                allowed_hosts=["127.0.0.1"],
                max_concurrency=int(spec.get("concurrency", 8)),
                backoff_base_seconds=0.01,
                backoff_max_seconds=0.2,
            )
            for action in ACTIONS
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
        reports = [first.workflows] if first.workflows else []
        while True:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the workflows did not settle within {rounds} rounds")
            report = advance_workflows(
                playbook=book,
                ledger=ledger,
                channels=channels,
                partition_key=partition,
                lease_seconds=LEASE_SECONDS,
            )
            rounds += 1
            reports.append(report)
            if report.advanced:
                continue
            held = _held_until(ledger, partition, clock())
            if held is None:
                break
            if held > time.time():
                # Due work held by the killed worker's instance claim: its lease running out is
                # the condition we wait for, bounded by the deadline.
                lease_waits += 1
                time.sleep(min(held - time.time(), max(0.0, deadline - time.perf_counter())))
        result.update(
            outcome="ok",
            steps_delivered=sum(r.steps_delivered for r in reports),
            notifications=sum(r.notifications for r in reports),
            approvals_requested=sum(r.approvals_requested for r in reports),
            approved=sum(r.approved for r in reports),
            rejected=sum(r.rejected for r in reports),
            expired=sum(r.expired for r in reports),
            rounds=rounds,
            lease_waits=lease_waits,
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
        return serve(run_approval_trial)
    if not args.spec:
        parser.error("give --serve or --spec")
    print(json.dumps(run_approval_trial(json.loads(args.spec)), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
