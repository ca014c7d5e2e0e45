"""A crash while approvals are pending loses nothing, and every decision applies once.

Each trial forks real workers (tests/approval_crash_worker.py) that drive N instances of
``draft`` -> ``approval`` -> ``submit`` as signed webhooks to :class:`OrderReceiver` on
127.0.0.1. The draft's reply gives the order's total; above the threshold two approvers (ana and
bo, four eyes) must approve and each is notified through the ``notify`` webhook, below it the rule
approves. The test decides from its own process through ``ledger.approve`` / ``ledger.reject``,
at moments it fixes: before a worker runs, while a worker *holds* at a named point of its advance
(it connects to the test and waits for the answer), between a SIGKILL and the restart, and after
it. Time is a file clock both processes read; only the test moves it.

1. Killed while opening requests and notifying (``during_request``, ``after_request``, the
   notification's ``after_reserve`` / ``after_send`` / flush, the save of that advance): after
   a restart every waiting instance has exactly one pending request and every approver got its
   notification, resent at most as often as the in-flight window allows.
2. Decisions before the kill, while the worker advances, between the kill and the restart, and
   after it; killed in the save that applies them or around the submit's delivery: every approved
   instance submits exactly once (a deduping view of the receiver sees one key), every rejected
   one ends rejected without a submit, each decision is applied once, nothing is left due.
3. Decisions that land at the expiry: the request ends approved (decision first) or expired
   (expiry first), never both, and the instance follows it.

Decisions that land inside the advance that opened their requests are tested on their own: they
found two defects, fixed since (a decision's wake overwritten by that advance's save, and the
notifications of a request decided before they went out left unsent in the outbox).

Kill points and k come from a seeded generator (printed with the trial). The in-flight window is
read from the ledger after the kill: outbox rows left ``sending`` or ``in_doubt``. PostgreSQL
trials run in full mode only (``make reliability``), as the workflow crash suite's do.
"""

import contextlib
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from aiohttp import web

from autoexec_dagster import ActionLedger
from autoexec_dagster.channels.webhook import verify_signature
from autoexec_dagster.dagster.ledger_resource import FileClock
from autoexec_dagster.errors import ApprovalError
from autoexec_dagster.keys import notify_keys
from autoexec_dagster.ledger import schema
from resources.local_servers import AiohttpServer
from tests.approval_crash_worker import (
    APPROVERS,
    GATE,
    PLAYBOOK,
    POINTS,
    SECRET,
    needs_people,
    total,
)
from tests.crash_worker import ForkServer, Trial
from tests.delivery_worker import insight
from tests.reliability import FULL, record, trials

SUITE = "approval_crash"
INSTANCES = trials(20, 200)
SEED = 20261208
DEADLINE = trials(60, 300)
ENTITIES = insight(INSTANCES)["account_id"].tolist()
WAITING = [e for e in ENTITIES if needs_people(e)]
# Scenario 1's kill points, the approval-specific ones first (fast mode runs those).
OPEN_POINTS = (
    "after_request:pending",
    "after_send:notify",
    "during_save",
    "during_request",
    "after_reserve:notify",
    "after_save",
    "after_request:rule",
    *(p for p in POINTS if p.endswith(":draft") or p.endswith(":submit")),
    "during_flush",
    "before_complete",
    "after_claim",
    "after_claim_instances",
)
OPEN_TRIALS = trials(6, 2 * len(OPEN_POINTS))
# Scenario 2: the save that applies decisions, and the submit's delivery around it.
DECIDE_POINTS = (
    "during_save",
    "after_save",
    "after_send:submit",
    "during_flush",
    "before_complete",
)
DECIDE_TRIALS = trials(len(DECIDE_POINTS), 4 * len(DECIDE_POINTS))
EXPIRY_VARIANTS = (
    "hold",
    "kill:during_close",
    "kill:after_close",
    "kill:during_save",
    "kill:after_save",
    "race",
)
EXPIRY_TRIALS = trials(len(EXPIRY_VARIANTS), 4 * len(EXPIRY_VARIANTS))
# k is drawn from the first 80% of a clean run's passes where there are many (batch and flush
# counts vary a little); where there are a few, each is deterministic (see _kill_after).
REACH = 0.8
# Outbox states nobody has finished: a run of the partition is asked for while any is left.
UNFINISHED = (schema.RESERVED, schema.SENDING, schema.IN_DOUBT)
_calibrated: dict[str, dict[str, int]] = {}


class OrderReceiver(AiohttpServer):
    """The workflow's destination: ``POST /<action>`` with a signed webhook, answered with JSON.

    ``draft`` answers the order's total (the same for a repeated key); ``notify`` and ``submit``
    acknowledge. Every request is counted per idempotency key (the raw receiver); the distinct
    keys are the deduping view a receiver keyed on ``Idempotency-Key`` would apply.
    """

    name = "approval-crash-receiver"

    def __init__(self, *, secret: str):
        super().__init__()
        self.secret = secret
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._sent: dict[str, tuple[str, str, str]] = {}
        self._rejected = 0

    @property
    def url(self) -> str:
        """The base URL; each action posts to ``<url>/<action>``."""
        return f"http://{self.host}:{self.port}"

    def _handler(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{action}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        if not verify_signature(self.secret, headers, body):
            with self._lock:
                self._rejected += 1
            return web.Response(status=401, text="bad signature")
        key = headers.get("idempotency-key", "")
        data = json.loads(body)
        entity = str(data["entity_id"])
        with self._lock:
            self._requests[key] += 1
            self._sent.setdefault(key, (action, entity, str(data.get("approver") or "")))
        if action == "draft":
            return web.json_response({"total": total(entity), "order": f"PO-{entity}"})
        return web.json_response({action: entity})

    @property
    def requests(self) -> Counter[str]:
        """Every accepted request per key (a copy)."""
        with self._lock:
            return Counter(self._requests)

    def keys(self, action: str) -> dict[str, tuple[str, str]]:
        """The distinct keys received for ``action``: key -> (entity, approver)."""
        with self._lock:
            return {k: (e, p) for k, (a, e, p) in self._sent.items() if a == action}

    @property
    def rejected(self) -> int:
        """Requests refused for a bad signature."""
        with self._lock:
            return self._rejected


class Holds:
    """The test's end of the worker's holds: it accepts the worker's connection at a hold, reads
    the point's name, and answers when the test has done what it does at that moment."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._conn: socket.socket | None = None

    def wait(self, run: "Background", timeout: float = 60.0) -> str:
        """Block until the worker holds; the name of the point (``point#k``)."""
        end = time.monotonic() + timeout
        # Accept in short slices so a worker that ended (or died) without holding fails the
        # test at once instead of after the whole timeout.
        self._sock.settimeout(0.25)
        while True:
            try:
                conn, _ = self._sock.accept()
                break
            except TimeoutError:
                if not run.alive:
                    raise AssertionError(
                        f"the worker ended without reaching its hold: {run.outcome()}"
                    ) from None
                if time.monotonic() > end:
                    raise
        conn.settimeout(timeout)
        self._conn = conn
        return conn.makefile("r").readline().strip()

    def release(self) -> None:
        """Let the held worker go on."""
        assert self._conn is not None
        self._conn.sendall(b"go\n")
        self._conn.close()
        self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._sock.close()


class Background:
    """One worker run in a thread of the test (the fork server's ``run`` blocks until it ends)."""

    def __init__(self, server: ForkServer, spec: Mapping[str, Any], deadline: float):
        self.trial: Trial | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(server, spec, deadline))
        self._deadline = deadline
        self._thread.start()

    def _run(self, server: ForkServer, spec: Mapping[str, Any], deadline: float) -> None:
        try:
            self.trial = server.run(spec, deadline=deadline)
        except BaseException as exc:
            self.error = exc

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def outcome(self) -> str:
        if self.error is not None:
            return repr(self.error)
        return self.trial.describe() if self.trial is not None else "still running"

    def join(self) -> Trial:
        self._thread.join(self._deadline + 90)
        if self.error is not None:
            raise self.error
        assert self.trial is not None, "the worker run did not end"
        return self.trial


@dataclass
class World:
    """One trial's partition: its receiver, clock file and the test's own ledger on it."""

    server: ForkServer
    url: str
    partition: str
    receiver: OrderReceiver
    clock_path: Path
    holds: Holds
    ledger: ActionLedger

    def spec(self, **extra: Any) -> dict[str, Any]:
        return {
            "ledger": self.url,
            "receiver": self.receiver.url,
            "instances": INSTANCES,
            "partition": self.partition,
            "clock_path": str(self.clock_path),
            "hold_port": self.holds.port,
            "deadline_seconds": DEADLINE,
            **extra,
        }

    def run(self, **extra: Any) -> Trial:
        return self.server.run(self.spec(**extra), deadline=DEADLINE + 30)

    def start(self, **extra: Any) -> Background:
        return Background(self.server, self.spec(**extra), DEADLINE + 30)

    def ok(self, trial: Trial | None = None, **extra: Any) -> dict[str, Any]:
        """Run a clean worker (or check ``trial``): it must end with outcome ok."""
        trial = trial if trial is not None else self.run(**extra)
        assert trial.code == 0 and trial.result is not None and trial.result["outcome"] == "ok", (
            f"{trial.describe()}\n{(trial.result or {}).get('traceback', '')}\n"
            f"{self.server.log_tail()}"
        )
        return trial.result

    def killed(self, trial: Trial, point: str, kill_after: int) -> None:
        assert trial.killed, (
            f"the worker was not killed at {point}#{kill_after}: {trial.describe()}\n"
            f"{(trial.result or {}).get('traceback', '')}"
        )

    def now(self) -> datetime:
        return datetime.fromisoformat(self.clock_path.read_text()).astimezone(UTC)

    # -- what the ledger holds ----------------------------------------------------------------

    def outbox(self) -> pd.DataFrame:
        rows = self.ledger.actions(playbook=PLAYBOOK, partition_key=self.partition)
        return rows[rows["decision"].isin(["step", "notify"])]

    def in_flight(self) -> int:
        return int(self.outbox()["state"].isin([schema.SENDING, schema.IN_DOUBT]).sum())

    def succeeded_keys(self) -> set[str]:
        rows = self.outbox()
        return set(rows.loc[rows["state"] == schema.SUCCEEDED, "idempotency_key"])

    def requests(self) -> dict[str, dict[str, Any]]:
        """Every approval request of the partition, by id (``applied_at`` included)."""
        ids = self.ledger.approvals(playbook=PLAYBOOK, partition_key=self.partition)
        return self.ledger.approval_rows(ids["approval_id"].tolist())

    def pending(self) -> dict[str, str]:
        """entity -> its pending request's id."""
        rows = self.ledger.pending_approvals(playbook=PLAYBOOK, partition_key=self.partition)
        return dict(zip(rows["entity_id"], rows["approval_id"], strict=True))

    def decisions(self, ids: Sequence[str]) -> Counter[tuple[str, str, str]]:
        """(request, approver, decision) rows of the decisions table."""
        rows = self.ledger.approval_decisions(list(ids))
        return Counter(zip(rows["approval_id"], rows["approver"], rows["decision"], strict=True))

    def instances(self) -> pd.DataFrame:
        return self.ledger.instances(playbook=PLAYBOOK, partition_key=self.partition).set_index(
            "entity_id"
        )


@contextlib.contextmanager
def _world(server: ForkServer, url: str, tmp_path: Path, partition: str) -> Iterator[World]:
    clock_path = tmp_path / f"clock-{partition}"
    holds = Holds()
    ledger = ActionLedger(url, clock=FileClock(clock_path))
    try:
        with OrderReceiver(secret=SECRET) as receiver:
            yield World(server, url, partition, receiver, clock_path, holds, ledger)
            assert receiver.rejected == 0
    finally:
        ledger.dispose()
        holds.close()


def _backend(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def _only_in_full_mode_on_postgres(url: str) -> None:
    if _backend(url) == "postgresql" and not FULL:
        pytest.skip("the approval crash test on PostgreSQL runs in full mode (make reliability)")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    workdir = tmp_path_factory.mktemp("approval_crash")
    with ForkServer(workdir, module="tests.approval_crash_worker") as fork_server:
        yield fork_server


def _kill_after(rng: random.Random, passes: int, cycle: int) -> int:
    """k for a point a clean run passes ``passes`` times, in the ``cycle``-th round of points.

    Where there are a few passes the first round takes the last (the requests for people, the
    save's applied_at UPDATE: what fast mode must cover); later rounds draw any.
    """
    if passes <= 4:
        return max(1, passes) if cycle == 0 else rng.randint(1, max(1, passes))
    return rng.randint(1, max(1, int(passes * REACH)))


def _duplicates(requests: Counter[str]) -> int:
    return sum(n - 1 for n in requests.values())


def _gate_outcomes(instance: pd.Series) -> list[str]:
    """The outcomes the instance's log records for the gate, pending requests left out."""
    log = json.loads(instance["log"]) if isinstance(instance["log"], str) else instance["log"]
    return [e["outcome"] for e in log if e["step"] == GATE and e["outcome"] != schema.PENDING]


def _request_counts(world: World) -> dict[str, int]:
    return dict(Counter(r["status"] for r in world.requests().values()))


def _settled(world: World) -> list[str]:
    """What is wrong with a partition a clean worker just left: lost, stuck or due instances."""
    problems: list[str] = []
    instances = world.instances()
    requests = world.requests()
    now = world.now()
    if sorted(instances.index) != sorted(ENTITIES):
        problems.append(f"{INSTANCES - len(instances)} instance(s) lost")
    due = [p for p, _, _ in world.ledger.due_partitions(playbook=PLAYBOOK) if p == world.partition]
    if due:
        problems.append("work is left due")
    outbox = world.outbox()
    unfinished = outbox[outbox["state"].isin(UNFINISHED)]
    if len(unfinished):
        problems.append(
            f"{len(unfinished)} outbox row(s) left unfinished: "
            f"{Counter(zip(unfinished['decision'], unfinished['state'], strict=True))}"
        )
    if world.ledger.partitions_with_pending_work(
        playbook=PLAYBOOK, partition_keys=[world.partition]
    ):
        problems.append("the partition is reported as holding unfinished actions")
    if instances["worker"].notna().any():
        problems.append(f"{int(instances['worker'].notna().sum())} instance(s) still claimed")
    undone = [
        r["entity_id"]
        for r in requests.values()
        if r["status"] in (schema.APPROVED, schema.REJECTED) and r["applied_at"] is None
    ]
    if undone:
        problems.append(f"decided but never applied (the instance waits for nothing): {undone}")
    by_instance = {r["instance_id"]: r for r in requests.values() if r["status"] == schema.PENDING}
    for entity, row in instances[instances["state"].isin(schema.ACTIVE_INSTANCE_STATES)].iterrows():
        request = by_instance.get(row["instance_id"])
        if row["state"] != schema.WAITING or row["step"] != GATE or request is None:
            problems.append(f"{entity} is {row['state']} at {row['step']} with nothing to wait for")
            continue
        due = pd.Timestamp(row["next_due"])
        due = due.tz_localize(UTC) if due.tzinfo is None else due
        if request["expires_at"] <= now or due.to_pydatetime() != request["expires_at"]:
            problems.append(
                f"{entity} waits until {due}, its request expires {request['expires_at']} "
                f"(now {now})"
            )
    return problems


# -- scenario 1: killed while opening approval requests and notifying ---------------------------


def _passes(server: ForkServer, url: str, tmp_path: Path) -> dict[str, int]:
    """How often a clean opening run passes each point (once per backend); it is checked too."""
    backend = _backend(url)
    if backend not in _calibrated:
        with _world(server, url, tmp_path, "calibration") as world:
            clean = world.ok()
            _check_opened(world, in_flight=0, repeated=[])
        _calibrated[backend] = {point: int(clean["counts"].get(point, 0)) for point in POINTS}
        print(f"calibration on {backend}: {clean['seconds']:.1f} s, passes {_calibrated[backend]}")
    return _calibrated[backend]


def _check_opened(world: World, *, in_flight: int, repeated: list[str]) -> dict[str, Any]:
    """Every waiting instance has one pending request and its approvers were notified; the rule
    passed the others and they submitted once. Returns the trial's figures."""
    instances = world.instances()
    requests = world.requests()
    notified = world.receiver.keys("notify")
    submits = world.receiver.keys("submit")
    drafts = world.receiver.keys("draft")
    per_instance = Counter(r["instance_id"] for r in requests.values())
    pending = {r["entity_id"]: r for r in requests.values() if r["status"] == schema.PENDING}
    expected_notices = {
        key: (entity, approver)
        for entity, row in pending.items()
        for approver, key in zip(
            APPROVERS, notify_keys(approval_id=row["approval_id"], approvers=APPROVERS), strict=True
        )
    }
    duplicates = _duplicates(world.receiver.requests)
    problems = _settled(world)
    if sorted(pending) != sorted(WAITING):
        problems.append(f"pending requests for {sorted(pending)}, expected {WAITING}")
    if max(per_instance.values(), default=0) > 1 or len(per_instance) != len(instances):
        problems.append(f"not one request per instance: {per_instance.most_common(3)}")
    if notified != expected_notices:
        problems.append(
            f"{len(set(expected_notices) - set(notified))} approver(s) never notified, "
            f"{len(set(notified) - set(expected_notices))} notification(s) nobody expected"
        )
    for entity in ENTITIES:
        row = instances.loc[entity]
        sent = [k for k, (e, _) in submits.items() if e == entity]
        if needs_people(entity):
            if row["state"] != schema.WAITING or sent:
                problems.append(f"{entity} should wait for people: {row['state']}, {len(sent)}")
        elif row["state"] != schema.SUCCEEDED or len(sent) != 1:
            problems.append(f"{entity} should have passed by rule: {row['state']}, {len(sent)}")
    if sorted(e for e, _ in drafts.values()) != sorted(ENTITIES):
        problems.append("not one draft per instance")
    if repeated:
        problems.append(f"{len(repeated)} delivery(ies) recorded succeeded were sent again")
    if duplicates > in_flight:
        problems.append(f"{duplicates} duplicate(s), {in_flight} in flight")
    outbox = world.outbox()
    failed = outbox[~outbox["state"].isin([schema.SUCCEEDED, *UNFINISHED])]
    if len(failed):
        problems.append(f"{len(failed)} outbox row(s) ended {Counter(failed['state'])}")
    # Lost: an instance gone, a waiting instance without its request, an approver never told.
    lost = (
        INSTANCES
        - len(instances)
        + len(set(WAITING) - set(pending))
        + len(set(expected_notices) - set(notified))
    )
    return {
        "lost": lost,
        "pending": len(pending),
        "notified": len(notified),
        "duplicates": duplicates,
        "problems": problems,
    }


def _open_trial(
    server: ForkServer, url: str, index: int, passes: dict[str, int], tmp_path: Path
) -> None:
    backend = _backend(url)
    reachable = [p for p in OPEN_POINTS if passes.get(p, 0) > 0]
    point = reachable[index % len(reachable)]
    rng = random.Random(f"{SEED}:open:{backend}:{point}:{index}")
    kill_after = _kill_after(rng, passes[point], index // len(reachable))
    partition = f"open-{index}"
    print(
        f"approval crash (opening) on {backend}, trial {index}: {point} kill_after={kill_after} "
        f"of {passes[point]} passes (seed {SEED}), {INSTANCES} instances, {len(WAITING)} waiting"
    )
    with _world(server, url, tmp_path, partition) as world:
        world.killed(world.run(point=point, kill_after=kill_after), point, kill_after)
        in_flight = world.in_flight()
        done_at_kill = world.succeeded_keys()
        requests_at_kill = world.receiver.requests
        at_kill = _request_counts(world)
        restarted = world.ok()
        requests = world.receiver.requests
        repeated = sorted(k for k in done_at_kill if requests[k] != requests_at_kill[k])
        figures = _check_opened(world, in_flight=in_flight, repeated=repeated)
    problems = figures.pop("problems")
    record(
        SUITE,
        point=f"open/{point}",
        backend=backend,
        instances=INSTANCES,
        actions=len(requests),
        kill_after=kill_after,
        in_flight=in_flight,
        requests_at_kill=at_kill,
        repeated=len(repeated),
        restart_seconds=round(float(restarted["seconds"]), 2),
        lease_waits=restarted["lease_waits"],
        faults=1,
        problem="; ".join(problems) or None,
        **figures,
    )
    print(
        f"  at the kill: {in_flight} in flight, requests {at_kill}; restart "
        f"{restarted['seconds']:.1f} s, {figures['duplicates']} duplicate(s)"
    )
    assert not problems, problems


@pytest.mark.timeout(trials(240, 7200))
def test_a_worker_killed_while_opening_approvals_leaves_one_request_and_notifies_everyone(
    server: ForkServer, ledger_url: str, tmp_path: Path
) -> None:
    _only_in_full_mode_on_postgres(ledger_url)
    passes = _passes(server, ledger_url, tmp_path)
    assert passes["after_request:pending"] == 1 and passes["after_send:notify"] > 0, passes
    for index in range(OPEN_TRIALS):
        _open_trial(server, ledger_url, index, passes, tmp_path)


# -- scenario 2: decisions before, while, between and after a kill ------------------------------

# before: before the worker that applies them starts; while: while it holds at its first claim
# of instances (it is advancing the ones decided before); between: after its SIGKILL, before the
# restart; after: after the restart (a last run applies them).
MOMENTS = ("before", "while", "between", "after")
VIAS = ("cli", "link", "python")


@dataclass(frozen=True)
class Decision:
    moment: str
    entity: str
    approver: str
    decision: str


def _schedule(rng: random.Random, entities: Sequence[str]) -> tuple[dict[str, str], list[Decision]]:
    """Each waiting entity's fate and the decisions that make it, in the order they are made.

    About 60% are approved by both approvers (the first approval at or before the moment of the
    second), the rest rejected by one (half of them after the other approved); the final
    decisions are spread over the moments in turn, so each moment finalises some.
    """
    order = rng.sample(list(entities), len(entities))
    approved = order[: (len(order) * 3 + 4) // 5]
    fates: dict[str, str] = {}
    decisions: list[Decision] = []
    for i, entity in enumerate(order):
        final = i % len(MOMENTS) if entity in approved else (i - len(approved)) % len(MOMENTS)
        first, second = rng.sample(list(APPROVERS), 2)
        early = MOMENTS[rng.randint(0, final)]
        if entity in approved:
            fates[entity] = schema.APPROVED
            decisions.append(Decision(early, entity, first, "approve"))
            decisions.append(Decision(MOMENTS[final], entity, second, "approve"))
        else:
            fates[entity] = schema.REJECTED
            if rng.random() < 0.5:
                decisions.append(Decision(early, entity, first, "approve"))
            decisions.append(Decision(MOMENTS[final], entity, second, "reject"))
    return fates, decisions


def _decide(
    ledger: ActionLedger, ids: Mapping[str, str], decisions: Sequence[Decision], moment: str
) -> int:
    """Make the decisions of one moment, one call each (as people do); returns how many."""
    made = 0
    for i, d in enumerate(x for x in decisions if x.moment == moment):
        via = VIAS[i % len(VIAS)]
        if d.decision == "approve":
            ledger.approve([ids[d.entity]], by=d.approver, note="within budget", via=via)
        else:
            ledger.reject([ids[d.entity]], by=d.approver, note="over budget", via=via)
        made += 1
    return made


def _check_decided(
    world: World,
    ids: Mapping[str, str],
    fates: Mapping[str, str],
    decisions: Sequence[Decision],
) -> dict[str, Any]:
    """Every decision applied once and the instance followed it; returns figures and problems."""
    problems = _settled(world)
    instances = world.instances()
    requests = world.requests()
    submits = world.receiver.keys("submit")
    outbox = world.outbox()
    ledger_submits = outbox[outbox["step"] == "submit"]
    expected = Counter((ids[d.entity], d.approver, d.decision) for d in decisions)
    recorded = world.decisions(list(ids.values()))
    if recorded != expected:
        problems.append(f"decisions table {dict(recorded)} != the decisions made {dict(expected)}")
    if len(requests) != INSTANCES:
        problems.append(f"{len(requests)} requests for {INSTANCES} instances")
    missing_submits = twice_applied = wrong = 0
    for entity in ENTITIES:
        row = instances.loc[entity]
        sent = [k for k, (e, _) in submits.items() if e == entity]
        recorded_sends = ledger_submits[ledger_submits["entity_id"] == entity]
        fate = fates.get(entity, schema.APPROVED)
        if entity in fates:
            request = requests[ids[entity]]
            deciders = set(str(request["decided_by"]).split(", "))
            want = (
                set(APPROVERS)
                if fate == schema.APPROVED
                else {
                    d.approver for d in decisions if d.entity == entity and d.decision == "reject"
                }
            )
            if request["status"] != fate or request["applied_at"] is None or deciders != want:
                wrong += 1
                problems.append(
                    f"{entity}: request {request['status']} by {request['decided_by']}, applied "
                    f"{request['applied_at']}; expected {fate} by {sorted(want)}"
                )
            outcomes = _gate_outcomes(row)
            if len(outcomes) != 1:
                twice_applied += 1
                problems.append(f"{entity}: the decision was applied {len(outcomes)} time(s)")
        if fate == schema.APPROVED:
            if row["state"] != schema.SUCCEEDED or len(sent) != 1 or len(recorded_sends) != 1:
                missing_submits += len(sent) != 1
                problems.append(
                    f"{entity} approved: {row['state']}, {len(sent)} submit key(s) received, "
                    f"{len(recorded_sends)} recorded"
                )
        elif row["state"] != schema.REJECTED or sent or len(recorded_sends):
            problems.append(f"{entity} rejected: {row['state']}, {len(sent)} submit(s)")
    return {
        "lost": missing_submits,
        "wrong_outcomes": wrong,
        "applied_twice": twice_applied,
        "problems": problems,
    }


def _decide_trial(server: ForkServer, url: str, index: int, tmp_path: Path) -> None:
    backend = _backend(url)
    point = DECIDE_POINTS[index % len(DECIDE_POINTS)]
    rng = random.Random(f"{SEED}:decide:{backend}:{index}")
    partition = f"decide-{index}"
    with _world(server, url, tmp_path, partition) as world:
        world.ok()
        ids = world.pending()
        assert sorted(ids) == WAITING, sorted(ids)
        fates, decisions = _schedule(rng, WAITING)
        finals_before = sum(
            1
            for e, fate in fates.items()
            if fate == schema.APPROVED
            and all(d.moment == "before" for d in decisions if d.entity == e)
        )
        # Passes the killed run makes before it applies anything decided later: the first save
        # (its instance UPDATE, then the applied_at UPDATE), one submit per order approved before.
        passes = {
            "during_save": 2,
            "after_save": 1,
            "after_send:submit": finals_before,
            "during_flush": 1,
            "before_complete": 1,
        }
        kill_after = _kill_after(rng, passes[point], index // len(DECIDE_POINTS))
        print(
            f"approval crash (decisions) on {backend}, trial {index}: {point} "
            f"kill_after={kill_after} (seed {SEED}), {len(WAITING)} waiting, "
            f"{Counter(fates.values())}, decisions per moment "
            f"{Counter(d.moment for d in decisions)}"
        )
        made = _decide(world.ledger, ids, decisions, "before")
        run = world.start(
            point=point,
            kill_after=kill_after,
            holds=[{"point": "after_claim_instances", "after": 1}],
        )
        held = world.holds.wait(run)
        made += _decide(world.ledger, ids, decisions, "while")
        world.holds.release()
        world.killed(run.join(), point, kill_after)
        in_flight = world.in_flight()
        done_at_kill = world.succeeded_keys()
        requests_at_kill = world.receiver.requests
        at_kill = _request_counts(world)
        made += _decide(world.ledger, ids, decisions, "between")
        restarted = world.ok()
        made += _decide(world.ledger, ids, decisions, "after")
        world.ok()
        requests = world.receiver.requests
        repeated = sorted(k for k in done_at_kill if requests[k] != requests_at_kill[k])
        duplicates = _duplicates(requests)
        figures = _check_decided(world, ids, fates, decisions)
    problems = figures.pop("problems")
    if repeated:
        problems.append(f"{len(repeated)} delivery(ies) recorded succeeded were sent again")
    if duplicates > in_flight:
        problems.append(f"{duplicates} duplicate(s), {in_flight} in flight")
    record(
        SUITE,
        point=f"decide/{point}",
        backend=backend,
        instances=INSTANCES,
        actions=len(requests),
        kill_after=kill_after,
        held=held,
        decisions=made,
        approved=sum(f == schema.APPROVED for f in fates.values()),
        rejected=sum(f == schema.REJECTED for f in fates.values()),
        in_flight=in_flight,
        requests_at_kill=at_kill,
        repeated=len(repeated),
        duplicates=duplicates,
        restart_seconds=round(float(restarted["seconds"]), 2),
        lease_waits=restarted["lease_waits"],
        faults=1,
        problem="; ".join(problems) or None,
        **figures,
    )
    print(
        f"  held at {held}; at the kill: {in_flight} in flight, requests {at_kill}; restart "
        f"{restarted['seconds']:.1f} s, {duplicates} duplicate(s)"
    )
    assert made == len(decisions)
    assert not problems, problems


@pytest.mark.timeout(trials(240, 7200))
def test_decisions_around_a_killed_worker_each_apply_once(
    server: ForkServer, ledger_url: str, tmp_path: Path
) -> None:
    _only_in_full_mode_on_postgres(ledger_url)
    for index in range(DECIDE_TRIALS):
        _decide_trial(server, ledger_url, index, tmp_path)


# A decision can land inside the advance that opened its request: between the commit of the
# request and the save of the instance that advance sends the notifications, and an approver may
# answer the first one while the others are still going out. Here the worker holds right after
# the requests for people are committed, the test decides three of them (two approved by both
# approvers, one rejected), and the worker goes on (and is killed at a point, or not).


@pytest.mark.parametrize(
    "kill",
    [
        None,
        "during_save",
        "after_save",
        "after_reserve:notify",
    ],
)
@pytest.mark.timeout(trials(120, 600))
def test_a_decision_made_while_the_opening_advance_holds_the_instance_is_applied(
    server: ForkServer, ledger_url: str, tmp_path: Path, kill: str | None
) -> None:
    _only_in_full_mode_on_postgres(ledger_url)
    backend = _backend(ledger_url)
    partition = f"early-{kill or 'none'}"
    with _world(server, ledger_url, tmp_path, partition) as world:
        extra: dict[str, Any] = {"holds": [{"point": "after_request:pending", "after": 1}]}
        if kill is not None:
            extra.update(point=kill, kill_after=1)
        run = world.start(**extra)
        world.holds.wait(run)
        ids = world.pending()
        approved, rejected = WAITING[:2], WAITING[2:3]
        decisions = [Decision("now", e, p, "approve") for e in approved for p in APPROVERS]
        decisions += [Decision("now", e, "bo", "reject") for e in rejected]
        _decide(world.ledger, ids, decisions, "now")
        world.holds.release()
        trial = run.join()
        in_flight = 0
        if kill is not None:
            world.killed(trial, kill, 1)
            in_flight = world.in_flight()
            world.ok()
        else:
            world.ok(trial)
        problems = _settled(world)
        instances = world.instances()
        requests = world.requests()
        submits = world.receiver.keys("submit")
        stuck = 0
        for entity in approved + rejected:
            request = requests[ids[entity]]
            stuck += request["applied_at"] is None
            state = instances.loc[entity, "state"]
            sent = sum(e == entity for e, _ in submits.values())
            want = (schema.SUCCEEDED, 1) if entity in approved else (schema.REJECTED, 0)
            if (state, sent) != want or request["applied_at"] is None:
                problems.append(
                    f"{entity} {request['status']}: instance {state} "
                    f"(next due {instances.loc[entity, 'next_due']}), {sent} submit(s), "
                    f"applied {request['applied_at']}"
                )
        # The approvers of every request still pending were told; a decided request's notice
        # is moot, but the outbox must not keep it as unfinished work.
        notified = set(world.receiver.keys("notify"))
        untold = [
            key
            for entity, approval_id in ids.items()
            if requests[approval_id]["status"] == schema.PENDING
            for key in notify_keys(approval_id=approval_id, approvers=APPROVERS)
            if key not in notified
        ]
        if untold:
            problems.append(f"{len(untold)} approver(s) of pending requests never notified")
        outbox = world.outbox()
        orphaned = int(outbox["state"].isin(UNFINISHED).sum())
        duplicates = _duplicates(world.receiver.requests)
    record(
        SUITE,
        point=f"decide-while-opening/{kill or 'no kill'}",
        backend=backend,
        instances=INSTANCES,
        decisions=len(decisions),
        in_flight=in_flight,
        duplicates=duplicates,
        lost=INSTANCES - len(instances) + len(untold),
        stuck=stuck,
        orphaned=orphaned,
        faults=int(kill is not None),
        problem="; ".join(problems) or None,
    )
    assert duplicates <= in_flight
    assert not problems, problems


# -- scenario 3: decisions that land at the expiry ----------------------------------------------

# Groups of waiting requests (ana approves all but R and N at the start; bo's decision is the one
# that lands at the expiry):
# A: bo approves just before the expiry (by his clock) while the expiring worker holds before
#    its close: the decision is first, the request ends approved;
# R: bo rejects at that moment: rejected;
# E: bo approves exactly at the expiry (by his clock): refused, the request expires;
# L: bo approves just before the expiry, but lands after the expiry was written: refused, it
#    expires (unless the expiry's transaction died with the worker: then his approval is first);
# P: only ana approved (four eyes): it expires; N: nobody decided: it expires;
# C (the race variant, instead of L and N): bo's approvals race the worker's close; each ends as
#    whichever came first.
GROUPS = {"A": 0.2, "R": 0.1, "E": 0.1, "L": 0.2, "P": 0.1}


def _groups(rng: random.Random, race: bool) -> dict[str, list[str]]:
    order = rng.sample(WAITING, len(WAITING))
    out: dict[str, list[str]] = {}
    start = 0
    for name, share in GROUPS.items():
        size = max(1, round(share * len(order)))
        out[name] = order[start : start + size]
        start += size
    out["N"] = order[start:]
    if race:
        out["C"] = out.pop("L") + out.pop("N")
    return out


def _refused(call: Any, match: str) -> bool:
    """Whether a decision was refused with ``match`` in the reason (any other error fails)."""
    try:
        call()
    except ApprovalError as exc:
        assert match in str(exc), exc
        return True
    return False


def _expiry_trial(server: ForkServer, url: str, index: int, tmp_path: Path) -> None:
    backend = _backend(url)
    variant = EXPIRY_VARIANTS[index % len(EXPIRY_VARIANTS)]
    kill = variant.removeprefix("kill:") if variant.startswith("kill:") else None
    rng = random.Random(f"{SEED}:expiry:{backend}:{index}")
    partition = f"expiry-{index}"
    groups = _groups(rng, race=variant == "race")
    group_of = {e: g for g, members in groups.items() for e in members}
    print(
        f"approval crash (expiry) on {backend}, trial {index}: {variant} (seed {SEED}), "
        f"groups { {g: len(m) for g, m in groups.items()} }"
    )
    with _world(server, url, tmp_path, partition) as world:
        world.ok()
        ids = world.pending()
        expires = {r["expires_at"] for r in world.requests().values() if r["status"] == "pending"}
        assert len(expires) == 1, expires
        (expiry,) = expires
        # bo's clocks: a second before the expiry, and the expiry itself.
        before = ActionLedger(url, clock=lambda: expiry - timedelta(seconds=1))
        at = ActionLedger(url, clock=lambda: expiry)
        made: list[tuple[str, str, str]] = []
        outcome: dict[str, str] = {}
        in_flight = 0
        race: list[tuple[str, bool]] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def decide(ledger: ActionLedger, entity: str, approver: str, decision: str) -> bool:
            """One decision; True when it was recorded."""
            try:
                if decision == "approve":
                    ledger.approve([ids[entity]], by=approver, via="link")
                else:
                    ledger.reject([ids[entity]], by=approver, note="not now", via="cli")
            except ApprovalError as exc:
                assert "not pending" in str(exc) or "expired at" in str(exc), exc
                return False
            with lock:
                made.append((ids[entity], approver, decision))
            return True

        racing = groups.get("C", [])[1:]
        # Everyone who races the close starts at once, together with the worker's release.
        start_line = threading.Barrier(len(racing) + 1)

        def racer(entity: str) -> None:
            try:
                start_line.wait(30)
                recorded = decide(before, entity, "bo", "approve")
            except BaseException as exc:  # failed in this thread: the test raises it
                with lock:
                    errors.append(exc)
                return
            with lock:
                race.append((entity, recorded))

        try:
            for entity in WAITING:
                if group_of[entity] not in ("R", "N"):
                    assert decide(world.ledger, entity, "ana", "approve")
            holds = [{"point": "before_close", "after": 1}]
            if variant not in ("race", "kill:during_close"):
                holds.append({"point": "after_close", "after": 1})
            extra: dict[str, Any] = {"clock_to": expiry.isoformat(), "holds": holds}
            if kill is not None:
                extra.update(point=kill, kill_after=1)
            # The worker moves the shared clock to the expiry, claims the waiting instances and
            # holds before it writes the expiry.
            run = world.start(**extra)
            assert world.holds.wait(run) == "before_close#1"
            for entity in groups["A"]:
                assert decide(before, entity, "bo", "approve")
                outcome[entity] = schema.APPROVED
            for entity in groups["R"]:
                assert decide(before, entity, "bo", "reject")
                outcome[entity] = schema.REJECTED
            for entity in groups["E"]:
                assert not decide(at, entity, "bo", "approve"), "a decision at the expiry counted"
                outcome[entity] = schema.EXPIRED
            if groups.get("C"):
                # One of bo's approvals surely lands first; the others race the close.
                race.append((groups["C"][0], decide(before, groups["C"][0], "bo", "approve")))
            racers = [threading.Thread(target=racer, args=(e,)) for e in racing]
            for thread in racers:
                thread.start()
            start_line.wait(30)
            world.holds.release()
            if len(holds) > 1:
                assert world.holds.wait(run) == "after_close#1"
                for entity in groups["L"]:
                    assert not decide(before, entity, "bo", "approve"), "a late decision counted"
                world.holds.release()
            trial = run.join()
            for thread in racers:
                thread.join()
            if errors:
                raise errors[0]
            for entity, recorded in race:
                outcome[entity] = schema.APPROVED if recorded else schema.EXPIRED
            if kill is not None:
                world.killed(trial, kill, 1)
                in_flight = world.in_flight()
                if kill == "during_close":
                    # The expiry's transaction died with the worker: bo's approval is first now.
                    for entity in groups["L"]:
                        assert decide(before, entity, "bo", "approve")
                        outcome[entity] = schema.APPROVED
                world.ok()
            else:
                world.ok(trial)
        finally:
            before.dispose()
            at.dispose()
        for entity in WAITING:
            outcome.setdefault(entity, schema.EXPIRED)
        problems = _settled(world)
        requests = world.requests()
        instances = world.instances()
        submits = world.receiver.keys("submit")
        recorded = world.decisions(list(ids.values()))
        if recorded != Counter(made):
            problems.append(f"decisions table {dict(recorded)} != the decisions made")
        both = 0
        for entity in WAITING:
            request = requests[ids[entity]]
            row = instances.loc[entity]
            want = outcome[entity]
            sent = sum(e == entity for e, _ in submits.values())
            completing = [
                (p, d)
                for (a, p, d) in recorded
                if a == ids[entity] and (p == "bo" or d == "reject")
            ]
            by_expiry = request["decided_via"] == "expiry"
            if (request["status"] == schema.EXPIRED) != by_expiry or (by_expiry and completing):
                both += 1
                problems.append(f"{entity}: both decided and expired: {request}, {completing}")
            state = schema.SUCCEEDED if want == schema.APPROVED else schema.REJECTED
            if (
                request["status"] != want
                or request["applied_at"] is None
                or row["state"] != state
                or sent != (want == schema.APPROVED)
                or len(_gate_outcomes(row)) != 1
            ):
                problems.append(
                    f"{entity} ({group_of[entity]}): request {request['status']} (expected "
                    f"{want}), instance {row['state']}, {sent} submit(s), gate applied "
                    f"{len(_gate_outcomes(row))} time(s)"
                )
        duplicates = _duplicates(world.receiver.requests)
        if duplicates > in_flight:
            problems.append(f"{duplicates} duplicate(s), {in_flight} in flight")
        # Lost: an instance gone, or an order approved first that never got submitted.
        lost = (INSTANCES - len(instances)) + sum(
            outcome[e] == schema.APPROVED and not any(x == e for x, _ in submits.values())
            for e in WAITING
        )
    final = Counter(outcome.values())
    record(
        SUITE,
        point=f"expiry/{variant}",
        backend=backend,
        instances=INSTANCES,
        decided_first=final[schema.APPROVED] + final[schema.REJECTED],
        expired_first=final[schema.EXPIRED],
        raced=len(race),
        raced_won=sum(ok for _, ok in race),
        decisions=len(made),
        in_flight=in_flight,
        duplicates=duplicates,
        both=both,
        lost=lost,
        faults=int(kill is not None),
        problem="; ".join(problems) or None,
    )
    print(f"  outcomes {dict(final)}; race {race}; {duplicates} duplicate(s)")
    assert not problems, problems


@pytest.mark.timeout(trials(240, 7200))
def test_a_decision_at_the_expiry_either_wins_or_is_refused_never_both(
    server: ForkServer, ledger_url: str, tmp_path: Path
) -> None:
    _only_in_full_mode_on_postgres(ledger_url)
    for index in range(EXPIRY_TRIALS):
        _expiry_trial(server, ledger_url, index, tmp_path)
