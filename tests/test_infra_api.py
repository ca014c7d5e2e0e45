"""The host-remediation demo's infrastructure API, over real HTTP with signed requests."""

import datetime as dt
import json
import os
import selectors
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from assets.hosts import fault_of, host_inventory, injected_faults
from autoexec_dagster.channels.webhook import sign
from resources.infra_api import ACTION_ENDPOINTS, ENDPOINTS, FileClock, InfraApi

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
REPO = Path(__file__).resolve().parents[1]
HOUR = "2026-12-01-10:00"
START = dt.datetime(2026, 12, 1, 10, 5, tzinfo=dt.UTC)
RESTART_DELAY = 45.0


class MovableClock:
    """A clock the test moves forward; the API reads it on every request."""

    def __init__(self, start: dt.datetime = START) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def _host_with(fault: str, hour: str = HOUR) -> str:
    if fault == "none":
        faulty = injected_faults(hour)
        return next(h for h in host_inventory()["host_id"] if h not in faulty)
    return next(h for h, kind in sorted(injected_faults(hour).items()) if kind == fault)


class Client:
    """Signs and posts requests the way the library's WebhookChannel does."""

    def __init__(self, api: InfraApi, secret: str = SECRET) -> None:
        self.api = api
        self.secret = secret
        self._n = 0

    def new_key(self) -> str:
        self._n += 1
        return f"key-{self._n:05d}"

    def post(
        self,
        endpoint: str,
        body: dict[str, Any] | bytes,
        *,
        key: str | None = None,
        secret: str | None = None,
        timestamp: int | None = None,
        signed_body: bytes | None = None,
    ) -> tuple[int, dict[str, Any]]:
        key = key or self.new_key()
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        ts = int(time.time()) if timestamp is None else timestamp
        headers = {
            "content-type": "application/json",
            "webhook-id": key,
            "Idempotency-Key": key,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(secret or self.secret, key, ts, signed_body or raw),
        }
        request = urllib.request.Request(
            self.api.url_for(endpoint), data=raw, headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def step(self, endpoint: str, host_id: str, hour: str = HOUR, **fields: Any) -> dict[str, Any]:
        """One successful step: a body like the channel's (entity_id, partition_key, ...)."""
        body = {"entity_id": host_id, "host_id": host_id, "partition_hour": hour, **fields}
        status, reply = self.post(endpoint, body)
        assert status == 200, reply
        assert reply["host_id"] == host_id
        return reply


@pytest.fixture
def clock() -> MovableClock:
    return MovableClock()


@pytest.fixture
def api(tmp_path: Path, clock: MovableClock) -> Iterator[InfraApi]:
    with InfraApi(
        SECRET,
        tmp_path / "infra.sqlite",
        clock=clock,
        restart_delay_seconds=RESTART_DELAY,
        failure_rate=0.0,
    ) as server:
        yield server


@pytest.fixture
def client(api: InfraApi) -> Client:
    return Client(api)


def _db_rows(api: InfraApi, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(api.db_path) as db:
        return db.execute(sql).fetchall()


def test_isolate_and_reinstate_a_healthy_host(api: InfraApi, client: Client) -> None:
    host = _host_with("none")
    assert client.step("isolate", host) == {"host_id": host, "state": "isolated"}
    row = api.host_row(host)
    assert row is not None and row["state"] == "isolated" and row["fault"] == "none"
    health = client.step("health", host)
    assert health["status"] == "healthy" and health["state"] == "isolated"
    assert client.step("reinstate", host) == {"host_id": host, "state": "in_service"}
    assert api.host_row(host)["state"] == "in_service"  # pyright: ignore[reportOptionalSubscript]


@pytest.mark.parametrize("fault", ["service_hung", "disk_full", "hardware", "none"])
def test_diagnostics_report_the_injected_cause(client: Client, fault: str) -> None:
    host = _host_with(fault)
    reply = client.step("diagnostics", host)
    assert reply["cause"] == fault == fault_of(HOUR, host)
    assert reply["partition_hour"] == HOUR and reply["detail"]


def test_diagnostics_take_the_hour_from_partition_key_in_either_form(client: Client) -> None:
    host = _host_with("disk_full")
    # partition_key alone, as every payload of the channel carries it; ISO form accepted too.
    status, reply = client.post("diagnostics", {"entity_id": host, "partition_key": HOUR})
    assert status == 200 and reply["cause"] == "disk_full"
    other = _host_with("service_hung")
    body = {"entity_id": other, "partition_key": "2026-12-01T10:00"}
    status, reply = client.post("diagnostics", body)
    assert status == 200 and reply["cause"] == "service_hung"
    # partition_hour wins over partition_key when both are sent.
    body = {"entity_id": host, "partition_hour": HOUR, "partition_key": "garbage"}
    assert client.post("diagnostics", body)[1]["cause"] == "disk_full"


def test_restart_fixes_a_hung_service_after_the_delay_on_the_injected_clock(
    api: InfraApi, client: Client, clock: MovableClock
) -> None:
    host = _host_with("service_hung")
    client.step("isolate", host)
    assert client.step("health", host)["status"] == "degraded"
    client.step("clean_disk", host)  # the wrong remedy changes nothing
    assert client.step("health", host)["status"] == "degraded"

    reply = client.step("restart", host)
    assert reply["restarted"] is True
    assert dt.datetime.fromisoformat(reply["restarted_at"]) == clock.now
    clock.advance(RESTART_DELAY - 1)
    assert client.step("health", host)["status"] == "degraded"
    status, refused = client.post("reinstate", {"entity_id": host, "partition_hour": HOUR})
    assert status == 409 and refused["status"] == "degraded"
    assert api.host_row(host)["state"] == "isolated"  # pyright: ignore[reportOptionalSubscript]

    clock.advance(1)
    health = client.step("health", host)
    assert health["status"] == "healthy"
    assert dt.datetime.fromisoformat(health["checked_at"]) == clock.now
    assert client.step("reinstate", host)["state"] == "in_service"


def test_a_second_restart_starts_the_delay_again(client: Client, clock: MovableClock) -> None:
    host = _host_with("service_hung")
    client.step("restart", host)
    clock.advance(RESTART_DELAY - 5)
    client.step("restart", host)
    clock.advance(10)
    assert client.step("health", host)["status"] == "degraded"
    clock.advance(RESTART_DELAY)
    assert client.step("health", host)["status"] == "healthy"


def test_clean_disk_fixes_a_full_disk_and_restart_does_not(
    client: Client, clock: MovableClock
) -> None:
    host = _host_with("disk_full")
    client.step("restart", host)
    clock.advance(RESTART_DELAY * 10)
    assert client.step("health", host)["status"] == "degraded"
    reply = client.step("clean_disk", host)
    assert reply["cleaned"] is True
    assert client.step("health", host)["status"] == "healthy"
    assert client.step("reinstate", host)["state"] == "in_service"


def test_clean_disk_delay_applies_when_configured(tmp_path: Path, clock: MovableClock) -> None:
    with InfraApi(
        SECRET, tmp_path / "infra.sqlite", clock=clock, clean_disk_delay_seconds=30, failure_rate=0
    ) as api:
        client = Client(api)
        host = _host_with("disk_full")
        client.step("clean_disk", host)
        clock.advance(29)
        assert client.step("health", host)["status"] == "degraded"
        clock.advance(1)
        assert client.step("health", host)["status"] == "healthy"


def test_nothing_fixes_a_hardware_fault(client: Client, clock: MovableClock) -> None:
    host = _host_with("hardware")
    client.step("isolate", host)
    assert client.step("diagnostics", host)["cause"] == "hardware"
    client.step("restart", host)
    client.step("clean_disk", host)
    for _ in range(5):
        clock.advance(3600)
        assert client.step("health", host)["status"] == "degraded"
    status, reply = client.post("reinstate", {"entity_id": host, "partition_hour": HOUR})
    assert status == 409 and "degraded" in reply["error"]


def test_a_later_partition_opens_a_new_incident_and_an_earlier_one_does_not(
    api: InfraApi, client: Client
) -> None:
    host = _host_with("hardware")
    later = next(
        f"2026-12-01-{h:02d}:00"
        for h in range(11, 24)
        if fault_of(f"2026-12-01-{h:02d}:00", host) == "none"
    )
    assert client.step("health", host)["status"] == "degraded"
    # Hours later the host's fault in that partition is the truth: it is healthy there.
    assert client.step("health", host, hour=later)["status"] == "healthy"
    assert api.host_row(host)["partition_hour"] == later  # pyright: ignore[reportOptionalSubscript]
    # A late request about the old hour is answered about the current incident.
    assert client.step("diagnostics", host, hour=HOUR)["cause"] == "none"
    # Without an hour, the current incident answers.
    status, reply = client.post("health", {"entity_id": host})
    assert status == 200 and reply["status"] == "healthy"


def test_bad_signatures_are_refused_and_change_nothing(api: InfraApi, client: Client) -> None:
    host = _host_with("service_hung")
    body = json.dumps({"entity_id": host, "partition_hour": HOUR}).encode()
    stale = int(time.time()) - 3600
    for endpoint in ENDPOINTS:
        assert client.post(endpoint, body, secret="whsec_d3Jvbmcgc2VjcmV0")[0] == 401
        assert client.post(endpoint, body, signed_body=body + b" ")[0] == 401
        assert client.post(endpoint, body, timestamp=stale)[0] == 401
    request = urllib.request.Request(api.url_for("isolate"), data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as unsigned:
        urllib.request.urlopen(request, timeout=10)
    assert unsigned.value.code == 401

    assert api.host_row(host) is None
    assert _db_rows(api, "SELECT count(*) FROM replies") == [(0,)]
    calls = api.calls()
    assert len(calls) == 3 * len(ENDPOINTS) + 1
    assert {c["outcome"] for c in calls} == {"rejected"} and {c["status"] for c in calls} == {401}
    assert all(c["attempt"] is None for c in calls)


def test_a_repeated_key_gets_the_recorded_reply_and_does_nothing_again(
    api: InfraApi, client: Client, clock: MovableClock
) -> None:
    host = _host_with("service_hung")
    body = {"entity_id": host, "partition_hour": HOUR}
    first = client.post("health", body, key="poll-1")
    client.step("restart", host)
    clock.advance(RESTART_DELAY)
    client.step("isolate", host)
    # The same poll attempt redelivered: the recorded answer, though the host has healed since.
    assert client.post("health", body, key="poll-1") == first == (200, first[1])
    assert first[1]["status"] == "degraded"
    assert client.step("health", host)["status"] == "healthy"

    isolate_key = "isolate-1"
    client.step("reinstate", host)
    assert client.post("isolate", body, key=isolate_key)[0] == 200
    client.step("reinstate", host)
    # A redelivered isolate does not isolate the reinstated host again.
    assert client.post("isolate", body, key=isolate_key) == (
        200,
        {"host_id": host, "state": "isolated"},
    )
    assert api.host_row(host)["state"] == "in_service"  # pyright: ignore[reportOptionalSubscript]
    # A key reused on another endpoint is refused, not mistaken for a redelivery.
    status, reply = client.post("restart", body, key=isolate_key)
    assert status == 422 and "/isolate" in reply["error"]

    by_key = [c for c in api.calls() if c["idempotency_key"] == isolate_key]
    assert [(c["attempt"], c["outcome"]) for c in by_key] == [
        (1, "executed"),
        (2, "replayed"),
        (3, "refused"),
    ]
    assert _db_rows(
        api, f"SELECT count(*) FROM replies WHERE idempotency_key = '{isolate_key}'"
    ) == [(1,)]


def test_bad_requests_are_refused_with_the_reason(api: InfraApi, client: Client) -> None:
    cases = [
        ({"partition_hour": HOUR}, 400, "names no host"),
        ({"entity_id": "web-9999", "partition_hour": HOUR}, 404, "unknown host"),
        ({"entity_id": "web-0001"}, 400, "names no hour"),
        ({"entity_id": "web-0001", "partition_hour": "yesterday"}, 400, "partition_hour"),
    ]
    for body, expected, words in cases:
        status, reply = client.post("isolate", body)
        assert status == expected and words in reply["error"], (body, reply)
    status, reply = client.post("isolate", b"not json")
    assert status == 400
    assert api.host_row("web-0001") is None
    assert _db_rows(api, "SELECT count(*) FROM replies") == [(0,)]
    assert {c["outcome"] for c in api.calls()} == {"refused"}


def _failing_keys(api: InfraApi, n: int) -> tuple[list[str], Client]:
    client = Client(api)
    host = _host_with("none")
    failed = []
    for _ in range(n):
        key = client.new_key()
        status, _ = client.post("health", {"entity_id": host, "partition_hour": HOUR}, key=key)
        assert status in (200, 503)
        if status == 503:
            failed.append(key)
    return failed, client


def test_transient_failures_come_at_the_seeded_rate_and_retries_get_through(
    tmp_path: Path, clock: MovableClock
) -> None:
    n = 1500
    with InfraApi(SECRET, tmp_path / "a.sqlite", clock=clock, failure_rate=0.05, seed=7) as api:
        failed, client = _failing_keys(api, n)
        # 75 expected; the binomial standard deviation is about 8.4.
        assert 0.035 * n <= len(failed) <= 0.065 * n
        host = _host_with("none")
        for key in failed:
            status = 503
            for _ in range(10):
                status, _ = client.post(
                    "health", {"entity_id": host, "partition_hour": HOUR}, key=key
                )
                if status == 200:
                    break
            assert status == 200
        calls = api.calls()
        executed = Counter(c["idempotency_key"] for c in calls if c["outcome"] == "executed")
        # Every key executed exactly once, however many attempts it took.
        assert len(executed) == n and set(executed.values()) == {1}
        assert Counter(c["outcome"] for c in calls)["failed_transient"] >= len(failed)
        # Nothing is recorded for a failed attempt: its retry executes.
        assert _db_rows(api, "SELECT count(*) FROM replies") == [(n,)]
    # The same seed fails the same keys (the draw is a hash of seed, key and attempt) ...
    first = [key for key in failed if int(key.removeprefix("key-")) <= 300]
    with InfraApi(SECRET, tmp_path / "b.sqlite", clock=clock, failure_rate=0.05, seed=7) as api:
        assert _failing_keys(api, 300)[0] == first
    # ... and another seed fails others.
    with InfraApi(SECRET, tmp_path / "c.sqlite", clock=clock, failure_rate=0.05, seed=8) as api:
        assert _failing_keys(api, 300)[0] != first


def test_a_lost_reply_is_done_once_and_replayed_on_retry(
    tmp_path: Path, clock: MovableClock
) -> None:
    with InfraApi(
        SECRET, tmp_path / "infra.sqlite", clock=clock, failure_rate=0, lost_reply_rate=1.0
    ) as api:
        client = Client(api)
        host = _host_with("none")
        body = {"entity_id": host, "partition_hour": HOUR}
        status, _ = client.post("isolate", body, key="k1")
        assert status == 503
        # The action was done although its reply was lost.
        assert api.host_row(host)["state"] == "isolated"  # pyright: ignore[reportOptionalSubscript]
        # Its reply is lost too (rate 1.0), but it is done.
        assert client.post("reinstate", body)[0] == 503
        # The retry gets the recorded reply and isolates nothing again.
        assert client.post("isolate", body, key="k1") == (
            200,
            {"host_id": host, "state": "isolated"},
        )
        assert api.host_row(host)["state"] == "in_service"  # pyright: ignore[reportOptionalSubscript]
    outcomes = [(c["idempotency_key"], c["outcome"]) for c in api.calls()]
    assert outcomes[0] == ("k1", "executed_reply_lost") and outcomes[-1] == ("k1", "replayed")


def test_rates_and_delays_are_checked(tmp_path: Path) -> None:
    db = tmp_path / "infra.sqlite"
    with pytest.raises(ValueError, match="failure_rate"):
        InfraApi(SECRET, db, failure_rate=1.5)
    with pytest.raises(ValueError, match="exceed"):
        InfraApi(SECRET, db, failure_rate=0.6, lost_reply_rate=0.6)
    with pytest.raises(ValueError, match="delays"):
        InfraApi(SECRET, db, restart_delay_seconds=-1)
    with pytest.raises(ValueError, match="base64"):
        InfraApi("whsec_not*base64", db)
    assert SECRET not in repr(InfraApi(SECRET, db))


def test_the_file_clock_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "clock.txt"
    clock = FileClock(path)
    before = dt.datetime.now(dt.UTC)
    assert before <= clock() <= dt.datetime.now(dt.UTC)
    path.write_text("2026-12-01T10:30:00")
    assert clock() == dt.datetime(2026, 12, 1, 10, 30, tzinfo=dt.UTC)


def test_the_library_webhook_channel_drives_it_through_retries(
    tmp_path: Path, clock: MovableClock
) -> None:
    # One-shot actions through execute_plan: the payload the library sends is what the API
    # reads, and its record matches the ledger's key for key.
    from autoexec_dagster import ActionLedger, Playbook, Rule, WebhookChannel, execute_plan, route

    faulty = sorted(injected_faults(HOUR))
    insight = host_inventory().assign(partition_hour=HOUR, anomaly_score=0.1)
    insight.loc[insight["host_id"].isin(faulty), "anomaly_score"] = 0.95
    playbook = Playbook(
        name="isolate_anomalous",
        entity_key="host_id",
        rules=[Rule(name="anomalous", when="anomaly_score >= 0.8", action="run_diagnostics")],
    )
    with InfraApi(
        SECRET, tmp_path / "infra.sqlite", clock=clock, failure_rate=0.2, lost_reply_rate=0.1
    ) as api:
        channel = WebhookChannel(
            url=api.url_for("run_diagnostics"),
            secret=SECRET,
            allowed_hosts=["127.0.0.1"],
            max_attempts=12,
            backoff_base_seconds=0.0,
            backoff_max_seconds=0.0,
            circuit_breaker_threshold=1000,
        )
        ledger = ActionLedger(url=f"sqlite:///{tmp_path / 'ledger.db'}")
        plan = route(insight, playbook, partition_key=HOUR, insight_name="host_anomalies")
        report = execute_plan(
            plan, playbook=playbook, ledger=ledger, channels={"run_diagnostics": channel}
        )
        assert report.succeeded == len(faulty)
        actions = ledger.actions(playbook=playbook.name)
        ledger.dispose()
    calls = api.calls()
    assert Counter(c["outcome"] for c in calls)["failed_transient"] > 0  # retries happened
    ledger_keys = set(actions.loc[actions["state"] == "succeeded", "idempotency_key"])
    executed = Counter(c["idempotency_key"] for c in calls if c["outcome"].startswith("executed"))
    assert set(executed) == ledger_keys and set(executed.values()) == {1}
    replies = dict(_db_rows(api, "SELECT idempotency_key, reply FROM replies"))
    causes = {json.loads(r)["host_id"]: json.loads(r)["cause"] for r in replies.values()}
    assert causes == injected_faults(HOUR)
    assert all(c["endpoint"] == "diagnostics" for c in calls)


def test_action_names_map_to_endpoints(api: InfraApi) -> None:
    assert set(ACTION_ENDPOINTS.values()) == set(ENDPOINTS)
    assert api.url_for("host_health") == api.url_for("health") == f"{api.url}/health"
    with pytest.raises(KeyError):
        api.url_for("reboot")


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError("the infrastructure API printed nothing")
    return proc.stdout.readline()


def test_standalone_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "INFRA_API_SECRET": SECRET}
    clock_file = tmp_path / "clock.txt"
    clock_file.write_text(START.isoformat())
    command = [
        sys.executable,
        "-m",
        "resources.infra_api",
        "--port=0",
        f"--db={tmp_path / 'infra.sqlite'}",
        "--failure-rate=0",
        f"--clock-file={clock_file}",
    ]
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        ready = json.loads(_read_line(proc, timeout=60))
        assert ready["port"] > 0 and ready["url"] == f"http://127.0.0.1:{ready['port']}"
        assert ready["urls"]["run_diagnostics"] == f"{ready['url']}/diagnostics"
        host = _host_with("disk_full")
        body = json.dumps({"entity_id": host, "partition_hour": HOUR}).encode()
        ts = int(time.time())
        request = urllib.request.Request(
            ready["urls"]["run_diagnostics"],
            data=body,
            method="POST",
            headers={
                "content-type": "application/json",
                "webhook-id": "k-1",
                "webhook-timestamp": str(ts),
                "webhook-signature": sign(SECRET, "k-1", ts, body),
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["cause"] == "disk_full"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    assert "Traceback" not in proc.stderr.read()
    with sqlite3.connect(tmp_path / "infra.sqlite") as db:
        assert db.execute("SELECT endpoint, outcome, at FROM calls").fetchall() == [
            ("diagnostics", "executed", START.isoformat(timespec="milliseconds"))
        ]


def test_standalone_process_needs_the_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "INFRA_API_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "resources.infra_api", "--port=0"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "INFRA_API_SECRET" in result.stderr
