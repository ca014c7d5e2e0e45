"""A worker SIGKILLed while advancing workflows resumes them: every instance completes, no step
whose completion was recorded is sent again, and resends stay within the in-flight window.

Each trial forks a real worker (tests/workflow_crash_worker.py) that drives N instances of a
three-step workflow, ``prepare`` -> ``check`` (a poll: ``until`` `check.ready`, every 30 s,
timeout 10 min) -> ``finish``, as signed webhooks to :class:`StepReceiver` on 127.0.0.1. Time is
the ledger's injected clock, kept in a file the worker moves forward, so the restarted worker
continues from the same moment. The worker SIGKILLs itself on the k-th pass through one point
(the outbox's points of tests/crash_worker.py and the workflow store's claim and save); point and
k are drawn from a seeded generator (printed), k within the passes a clean run makes (counted by a
calibration run). The in-flight window is read from the ledger after the kill: step attempts
left ``sending`` or ``in_doubt``. Trials alternate a plain receiver and one that dedupes on the
key.
"""

import json
import random
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from autoexec_dagster import ActionLedger
from autoexec_dagster.channels.webhook import verify_signature
from autoexec_dagster.ledger import schema
from resources.local_servers import AiohttpServer
from tests.crash_worker import ForkServer, Trial
from tests.reliability import FULL, record, trials
from tests.workflow_crash_worker import PLAYBOOK, POINTS, SECRET, STEPS, polls_needed

INSTANCES = trials(1_000, 5_000)
TRIALS = trials(3, 8)
CONCURRENCY = 32
SEED = 20261201
DEADLINE = trials(60, 600)
# k is drawn from the first 80% of a clean run's passes: batch and flush counts vary a little
# from run to run, and a k that is never reached would kill nothing.
REACH = 0.8
_calibrated: dict[str, dict[str, int]] = {}


class StepReceiver(AiohttpServer):
    """The workflow's destination: ``POST /<step>`` with a signed webhook, answered with JSON.

    ``check`` answers ``{"ready": ...}``, true from the ``polls_needed(entity)``-th distinct poll
    key of the entity on; a repeated key gets the answer its first request got, so a resend reads
    the same reply. Every request is counted per key; with ``dedupe`` a repeated key is
    acknowledged without a second effect (``duplicates``).
    """

    name = "workflow-step-receiver"

    def __init__(self, *, secret: str, dedupe: bool):
        super().__init__()
        self.secret = secret
        self.dedupe = dedupe
        self._lock = threading.Lock()
        self._effects: Counter[str] = Counter()
        self._requests: Counter[str] = Counter()
        self._answers: dict[str, dict[str, Any]] = {}
        self._steps: dict[str, str] = {}
        self._polls: dict[str, set[str]] = {}
        self._duplicates = 0
        self._rejected = 0

    @property
    def url(self) -> str:
        """The base URL; each step posts to ``<url>/<step>``."""
        return f"http://{self.host}:{self.port}"

    def _handler(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{step}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        step = request.match_info["step"]
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        if not verify_signature(self.secret, headers, body):
            with self._lock:
                self._rejected += 1
            return web.Response(status=401, text="bad signature")
        key = headers.get("idempotency-key", "")
        entity = str(json.loads(body)["entity_id"])
        with self._lock:
            self._requests[key] += 1
            answer = self._answers.get(key)
            if answer is not None and self.dedupe:
                self._duplicates += 1
            else:
                self._effects[key] += 1
            if answer is None:
                if step == "check":
                    polls = self._polls.setdefault(entity, set())
                    polls.add(key)
                    answer = {"ready": len(polls) >= polls_needed(entity), "poll": len(polls)}
                else:
                    answer = {"done": step}
                self._answers[key] = answer
                self._steps[key] = step
        return web.json_response(answer)

    @property
    def effects(self) -> Counter[str]:
        """Deliveries that took effect, per key (a copy)."""
        with self._lock:
            return Counter(self._effects)

    @property
    def requests(self) -> Counter[str]:
        """Every accepted request per key, deduped or not (a copy)."""
        with self._lock:
            return Counter(self._requests)

    @property
    def duplicates(self) -> int:
        """Repeated keys acknowledged without effect (``dedupe`` mode)."""
        with self._lock:
            return self._duplicates

    @property
    def rejected(self) -> int:
        """Requests refused for a bad signature."""
        with self._lock:
            return self._rejected


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    workdir = tmp_path_factory.mktemp("workflow_crash")
    with ForkServer(workdir, module="tests.workflow_crash_worker") as fork_server:
        yield fork_server


def _backend(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def _spec(url: str, receiver: StepReceiver, partition: str, clock: Path) -> dict[str, Any]:
    return {
        "ledger": url,
        "receiver": receiver.url,
        "instances": INSTANCES,
        "partition": partition,
        "clock_path": str(clock),
        "concurrency": CONCURRENCY,
        "deadline_seconds": DEADLINE,
    }


def _ok(trial: Trial, server: ForkServer) -> dict[str, Any]:
    assert trial.code == 0 and trial.result is not None and trial.result["outcome"] == "ok", (
        f"{trial.describe()}\n{(trial.result or {}).get('traceback', '')}\n{server.log_tail()}"
    )
    return trial.result


def _steps(ledger: ActionLedger, partition: str) -> Any:
    rows = ledger.actions(playbook=PLAYBOOK, partition_key=partition)
    return rows[rows["decision"] == "step"]


def _passes(server: ForkServer, url: str, tmp_path: Path) -> dict[str, int]:
    """How often a clean run passes each point (once per backend); the clean run is checked too."""
    backend = _backend(url)
    if backend not in _calibrated:
        partition = "calibration"
        with StepReceiver(secret=SECRET, dedupe=False) as receiver:
            spec = _spec(url, receiver, partition, tmp_path / "clock-calibration")
            clean = _ok(server.run(spec, deadline=DEADLINE + 30), server)
            effects = receiver.effects
        assert clean["instance_states"] == {schema.SUCCEEDED: INSTANCES}, clean
        ledger = ActionLedger(url)
        try:
            steps = _steps(ledger, partition)
        finally:
            ledger.dispose()
        # A clean run sends every step attempt exactly once, and polls as often as needed.
        assert set(steps["state"]) == {schema.SUCCEEDED}
        assert set(effects) == set(steps["idempotency_key"]) and max(effects.values()) == 1
        expected = INSTANCES * 2 + sum(polls_needed(e) for e in steps["entity_id"].unique())
        assert len(steps) == clean["steps_delivered"] == expected
        _calibrated[backend] = {point: int(clean["counts"].get(point, 0)) for point in POINTS}
        print(f"calibration on {backend}: {clean['seconds']:.1f} s, passes {_calibrated[backend]}")
    return _calibrated[backend]


def _trial(
    server: ForkServer, url: str, index: int, passes: dict[str, int], tmp_path: Path
) -> None:
    backend = _backend(url)
    rng = random.Random(f"{SEED}:{backend}")
    reachable = [p for p in POINTS if passes[p] > 0]
    order = rng.sample(reachable, len(reachable))
    point = order[index % len(order)]
    rng = random.Random(f"{SEED}:{backend}:{point}:{index}")
    kill_after = rng.randint(1, max(1, int(passes[point] * REACH)))
    dedupe = index % 2 == 1
    partition = f"{point}-{index}"
    print(
        f"workflow crash on {backend}, trial {index}: {point} kill_after={kill_after} of "
        f"{passes[point]} passes (seed {SEED}), {INSTANCES} instances, "
        f"{'deduping' if dedupe else 'plain'} receiver"
    )
    ledger = ActionLedger(url)
    try:
        with StepReceiver(secret=SECRET, dedupe=dedupe) as receiver:
            spec = _spec(url, receiver, partition, tmp_path / f"clock-{index}")
            killed = server.run(
                {**spec, "point": point, "kill_after": kill_after}, deadline=DEADLINE
            )
            assert killed.killed, (
                f"the worker was not killed at {point}#{kill_after}: {killed.describe()}\n"
                f"{(killed.result or {}).get('traceback', '')}"
            )
            at_kill = _steps(ledger, partition)
            done_at_kill = set(at_kill.loc[at_kill["state"] == schema.SUCCEEDED, "idempotency_key"])
            in_flight = int(at_kill["state"].isin([schema.SENDING, schema.IN_DOUBT]).sum())
            requests_at_kill = receiver.requests
            instances_at_kill = ledger.instance_counts(playbook=PLAYBOOK, partition_key=partition)

            restarted = _ok(server.run(spec, deadline=DEADLINE), server)
            final = _steps(ledger, partition)
            instances = ledger.instances(playbook=PLAYBOOK, partition_key=partition)
            effects, requests = receiver.effects, receiver.requests
            duplicates = receiver.duplicates if dedupe else sum(n - 1 for n in effects.values())
            rejected = receiver.rejected
    finally:
        ledger.dispose()

    repeated = sorted(k for k in done_at_kill if requests[k] != requests_at_kill[k])
    unfinished = instances[instances["state"] != schema.SUCCEEDED]
    keys = set(final["idempotency_key"])
    per_entity = final.groupby(["entity_id", "step"])["idempotency_key"].nunique()
    wrong_polls = [
        entity
        for entity in instances["entity_id"]
        if per_entity.get((entity, "check"), 0) != polls_needed(entity)
        or any(per_entity.get((entity, s), 0) != 1 for s in STEPS if s != "check")
    ]
    problem = None
    if len(unfinished) or len(instances) != INSTANCES:
        problem = f"{len(unfinished)} of {len(instances)} instances did not succeed"
    elif repeated:
        problem = f"{len(repeated)} step attempt(s) recorded succeeded were sent again"
    elif duplicates > in_flight or (dedupe and max(effects.values()) > 1):
        problem = f"{duplicates} duplicate(s), {in_flight} in flight"
    elif set(effects) != keys or wrong_polls:
        problem = f"receiver/ledger mismatch; {len(wrong_polls)} instance(s) with wrong steps"
    record(
        "workflow_crash",
        point=point,
        backend=backend,
        instances=INSTANCES,
        step_attempts=len(final),
        kill_after=kill_after,
        in_flight=in_flight,
        succeeded_at_kill=len(done_at_kill),
        instances_at_kill=instances_at_kill,
        repeated=len(repeated),
        lost=len(unfinished),
        duplicates=duplicates,
        receiver="dedupe" if dedupe else "plain",
        duplicate_effects=max(0, max(effects.values(), default=1) - 1),
        restart_seconds=round(float(restarted["seconds"]), 2),
        lease_waits=restarted["lease_waits"],
        faults=1,
        problem=problem,
    )
    print(
        f"  at the kill: {len(done_at_kill)} step attempts succeeded, {in_flight} in flight, "
        f"instances {instances_at_kill}; restart {restarted['seconds']:.1f} s, "
        f"{duplicates} duplicate(s)"
    )
    assert rejected == 0
    assert len(instances) == INSTANCES and unfinished.empty, (
        f"{len(unfinished)} instance(s) did not succeed: "
        f"{unfinished[['entity_id', 'state', 'step', 'error']].head().to_dict('records')}"
    )
    assert set(final["state"]) == {schema.SUCCEEDED}, Counter(final["state"])
    assert not repeated, f"step attempts recorded succeeded were sent again: {repeated[:5]}"
    assert set(effects) == keys, "the receiver and the ledger disagree on the step attempts"
    assert not wrong_polls, f"instances with a repeated or missing step: {wrong_polls[:5]}"
    assert duplicates <= in_flight, f"{duplicates} duplicate(s), but only {in_flight} in flight"
    if dedupe:
        assert max(effects.values()) == 1, "a deduping receiver applied a step twice"


@pytest.mark.timeout(trials(180, 7200))
def test_a_worker_killed_while_advancing_workflows_resumes_without_repeating_a_step(
    server: ForkServer, ledger_url: str, tmp_path: Path
) -> None:
    if _backend(ledger_url) == "postgresql" and not FULL:
        pytest.skip("the workflow crash test on PostgreSQL runs in full mode (make reliability)")
    passes = _passes(server, ledger_url, tmp_path)
    assert passes["after_send"] > 0 and passes["during_save"] > 0, passes
    for index in range(TRIALS):
        _trial(server, ledger_url, index, passes, tmp_path)
