"""The campaign story's tracking endpoint over real HTTP: opens, clicks and unsubscribes are recorded
at the clock's (or the simulated) time, tampered tokens are refused, repeated opens are recorded
once a minute."""

import datetime as dt
import json
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from resources.tracking_server import (
    PIXEL_GIF,
    SIM_TIME_HEADER,
    TrackingServer,
    TrackingToken,
    sign_token,
    verify_token,
)
from tests.e2e_support import REPO

SECRET = "tracking-test-secret"
START = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)


class MovableClock:
    """A clock the test moves."""

    def __init__(self, start: dt.datetime = START) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hands a 302 back to the caller instead of following it."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(NoRedirect)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One GET; returns the status, the headers and the body, for errors too."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=10) as response:
            return int(response.status), dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return int(error.code), dict(error.headers), error.read()


def events(db: Path) -> list[tuple[str, str, str, str, str]]:
    """kind, recipient, campaign, key and occurred_at of every recorded event, in order."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(
            "SELECT kind, recipient_id, campaign_id, idempotency_key, occurred_at FROM events "
            "ORDER BY event_id"
        ).fetchall()


def token(recipient: str = "CMP-001-D000-000", key: str = "k" * 32) -> str:
    return sign_token(SECRET, recipient_id=recipient, campaign_id="CMP-001", idempotency_key=key)


@pytest.fixture
def clock() -> MovableClock:
    return MovableClock()


@pytest.fixture
def server(tmp_path: Path, clock: MovableClock) -> Iterator[TrackingServer]:
    with TrackingServer(SECRET, tmp_path / "tracking.sqlite", clock=clock) as running:
        yield running


@pytest.fixture
def simulated(tmp_path: Path) -> Iterator[TrackingServer]:
    with TrackingServer(SECRET, tmp_path / "sim.sqlite", simulated_time=True) as running:
        yield running


def test_tokens_round_trip_and_refuse_any_change() -> None:
    signed = token()
    assert verify_token(SECRET, signed) == TrackingToken("CMP-001-D000-000", "CMP-001", "k" * 32)
    assert verify_token("another-secret", signed) is None
    body, _, signature = signed.partition(".")
    other = token(recipient="CMP-001-D000-001").partition(".")[0]
    for tampered in (
        f"{other}.{signature}",
        f"{body}.{signature[:-2]}",
        body,
        f"{body}x.{signature}",
        "",
        ".",
        "not base64!.x",
    ):
        assert verify_token(SECRET, tampered) is None, tampered
    with pytest.raises(ValueError):
        sign_token("", recipient_id="r", campaign_id="c", idempotency_key="k")


def test_open_click_and_unsubscribe_are_recorded_at_the_clock(
    server: TrackingServer, clock: MovableClock
) -> None:
    signed = token()
    status, headers, body = get(f"{server.url}/o/{signed}.gif")
    assert (status, headers["Content-Type"], body) == (200, "image/gif", PIXEL_GIF)
    clock.advance(120)
    status, headers, _ = get(f"{server.url}/c/{signed}")
    assert status == 302
    assert headers["Location"] == server.landing_url
    assert server.landing_url.startswith("http://127.0.0.1:")
    landing_status, _, page = get(server.landing_url)
    assert landing_status == 200 and b"Welcome" in page
    clock.advance(60)
    status, _, page = get(f"{server.url}/u/{signed}")
    assert status == 200 and b"unsubscribed" in page

    recorded = events(server.db_path)
    assert [(kind, at) for kind, *_, at in recorded] == [
        ("open", START.isoformat(timespec="microseconds")),
        ("click", (START + dt.timedelta(seconds=120)).isoformat(timespec="microseconds")),
        ("unsubscribe", (START + dt.timedelta(seconds=180)).isoformat(timespec="microseconds")),
    ]
    assert {row[1:4] for row in recorded} == {("CMP-001-D000-000", "CMP-001", "k" * 32)}
    assert server.event_counts() == {"open": 1, "click": 1, "unsubscribe": 1}


def test_a_tampered_token_is_refused_with_403_and_records_nothing(
    server: TrackingServer,
) -> None:
    signed = token()
    body, _, signature = signed.partition(".")
    forged = f"{token(recipient='CMP-002-D000-000').partition('.')[0]}.{signature}"
    foreign = sign_token(
        "not-the-secret", recipient_id="r", campaign_id="CMP-001", idempotency_key="k"
    )
    for path in (
        f"/o/{forged}.gif",
        f"/c/{forged}",
        f"/u/{forged}",
        f"/c/{body}",
        f"/c/{foreign}",
        f"/c/{body}.{signature[:-1]}A",
    ):
        status, _, reply = get(server.url + path)
        assert status == 403, path
        assert "does not verify" in json.loads(reply)["error"]
    assert events(server.db_path) == []
    assert server.refused == 6


def test_repeated_opens_within_a_minute_are_recorded_once(
    server: TrackingServer, clock: MovableClock
) -> None:
    first, second = token(), token(recipient="CMP-001-D000-001")
    get(f"{server.url}/o/{first}.gif")
    clock.advance(30)
    # The same email shown again 30 s later, and another email: one new open.
    assert get(f"{server.url}/o/{first}.gif")[0] == 200
    get(f"{server.url}/o/{second}.gif")
    clock.advance(31)
    # 61 s after the first open: a new open of the first email.
    get(f"{server.url}/o/{first}.gif")
    # Clicks are never deduplicated: each is a visit.
    get(f"{server.url}/c/{first}")
    get(f"{server.url}/c/{first}")
    kinds = [(kind, recipient) for kind, recipient, *_ in events(server.db_path)]
    assert kinds == [
        ("open", "CMP-001-D000-000"),
        ("open", "CMP-001-D000-001"),
        ("open", "CMP-001-D000-000"),
        ("click", "CMP-001-D000-000"),
        ("click", "CMP-001-D000-000"),
    ]
    assert server.deduplicated == 1


def test_the_simulated_time_header_is_honoured_only_in_simulated_time(
    server: TrackingServer, simulated: TrackingServer
) -> None:
    at = "2026-11-05T13:45:00+00:00"
    signed = token()
    status, _, reply = get(f"{server.url}/c/{signed}", headers={SIM_TIME_HEADER: at})
    assert status == 400 and SIM_TIME_HEADER in json.loads(reply)["error"]
    assert events(server.db_path) == []

    assert get(f"{simulated.url}/c/{signed}", headers={SIM_TIME_HEADER: at})[0] == 302
    for bad in ("yesterday", "2026-11-05T13:45:00"):
        assert get(f"{simulated.url}/c/{signed}", headers={SIM_TIME_HEADER: bad})[0] == 400
    # Repeated pixel loads are deduplicated on the simulated time as well.
    get(f"{simulated.url}/o/{signed}.gif", headers={SIM_TIME_HEADER: at})
    get(f"{simulated.url}/o/{signed}.gif", headers={SIM_TIME_HEADER: "2026-11-05T13:45:20+00:00"})
    get(f"{simulated.url}/o/{signed}.gif", headers={SIM_TIME_HEADER: "2026-11-05T13:47:00+00:00"})
    assert [(kind, when) for kind, *_, when in events(simulated.db_path)] == [
        ("click", "2026-11-05T13:45:00.000000+00:00"),
        ("open", "2026-11-05T13:45:00.000000+00:00"),
        ("open", "2026-11-05T13:47:00.000000+00:00"),
    ]


def test_python_m_resources_tracking_server_prints_its_ready_line_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    db = tmp_path / "standalone.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-m", "resources.tracking_server", "--port=0", f"--db={db}"],
        cwd=REPO,
        env={"CAMPAIGN_TRACKING_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["url"] == f"http://127.0.0.1:{ready['port']}"
        assert get(f"{ready['url']}/healthz")[0] == 200
        assert get(f"{ready['url']}/c/{token()}")[0] == 302
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [kind for kind, *_ in events(db)] == ["click"]


def test_the_standalone_server_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "resources.tracking_server", f"--db={tmp_path / 'x.sqlite'}"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "CAMPAIGN_TRACKING_SECRET" in result.stderr
