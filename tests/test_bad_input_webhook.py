"""SSRF corpus for WebhookChannel: every URL that could reach an address the allow-list does not
allow is refused, and a real receiver on 127.0.0.1 proves that nothing was sent.

Two kinds of refusal: at validation (the URL's host is not listed, a bad scheme, user info), where
``execute_plan`` raises ChannelConfigError before the ledger holds a single row; and at send
time, where a listed host name resolves to an internal address or the destination answers with
a redirect: the action then fails permanently, naming why, and the internal target sees nothing.
"""

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from aiohttp.abc import AbstractResolver, ResolveResult

import autoexec_dagster.channels.webhook as webhook_module
from autoexec_dagster import ActionLedger, ChannelConfigError, WebhookChannel
from autoexec_dagster.ledger import schema
from tests.bad_input_support import Corpus, action_states, corpus_fixture, live_rows, run
from tests.receivers import WebhookReceiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
LISTED = "hooks.example.com"


@pytest.fixture(scope="module")
def corpus() -> Iterator[Corpus]:
    with corpus_fixture("webhook_ssrf") as c:
        yield c


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    """The internal service an attacker wants to reach: it must never see a request."""
    with WebhookReceiver(secret=SECRET) as r:
        yield r


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[ActionLedger]:
    led = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield led
    led.dispose()


def channel(url: str, allowed_hosts: list[str]) -> WebhookChannel:
    return WebhookChannel(url=url, secret=SECRET, allowed_hosts=allowed_hosts, timeout_seconds=5)


# -- refused at validation -------------------------------------------------------------------

# (URL template, allowed_hosts, what the error says); {port} is the internal receiver's port.
VALIDATION_CASES: list[tuple[str, list[str], str]] = [
    # Loopback, private and link-local literals that are not listed.
    ("http://127.0.0.1:{port}/hook", [LISTED], "not in allowed_hosts"),
    ("http://127.0.0.2:{port}/hook", ["127.0.0.1"], "not in allowed_hosts"),
    ("http://0.0.0.0:{port}/hook", [LISTED], "not in allowed_hosts"),
    ("http://169.254.169.254/latest/meta-data/", [LISTED], "not in allowed_hosts"),
    ("http://169.254.169.254/latest/meta-data/", ["10.0.0.0/8"], "not in allowed_hosts"),
    ("http://10.0.0.1/hook", [LISTED], "not in allowed_hosts"),
    ("http://172.16.0.1/hook", [LISTED], "not in allowed_hosts"),
    ("http://192.168.1.1/hook", [LISTED], "not in allowed_hosts"),
    ("http://100.64.0.1/hook", [LISTED], "not in allowed_hosts"),
    # IPv6 loopback, unique local, link local, unspecified.
    ("http://[::1]:{port}/hook", [LISTED], "not in allowed_hosts"),
    ("http://[fd00::1]/hook", [LISTED], "not in allowed_hosts"),
    ("http://[fe80::1]/hook", [LISTED], "not in allowed_hosts"),
    ("http://[::]:{port}/hook", [LISTED], "not in allowed_hosts"),
    # IPv4-mapped IPv6 is judged as the IPv4 address it maps to, not by IPv6 networks.
    ("http://[::ffff:127.0.0.1]:{port}/hook", [LISTED], "not in allowed_hosts"),
    ("http://[::ffff:7f00:1]:{port}/hook", ["::/0"], "not in allowed_hosts"),
    ("http://[::ffff:10.0.0.1]/hook", [LISTED], "not in allowed_hosts"),
    ("http://[::ffff:169.254.169.254]/hook", ["::/0"], "not in allowed_hosts"),
    # Decimal, octal, hex and short forms of 127.0.0.1, as inet_aton would read them.
    ("http://2130706433:{port}/hook", [LISTED], "non-canonical IPv4"),
    ("http://2130706433:{port}/hook", ["127.0.0.1"], "non-canonical IPv4"),
    ("http://0177.0.0.1:{port}/hook", ["127.0.0.1"], "non-canonical IPv4"),
    ("http://0x7f.1:{port}/hook", ["127.0.0.1"], "non-canonical IPv4"),
    ("http://0x7f000001:{port}/hook", ["127.0.0.1"], "non-canonical IPv4"),
    ("http://127.1:{port}/hook", ["127.0.0.1"], "non-canonical IPv4"),
    ("http://%31%32%37.0.0.1:{port}/hook", ["127.0.0.1"], "non-canonical IPv4"),
    # The same forms listed as if they were host names: the system resolver reads them as
    # 127.0.0.1, so they are refused as addresses written ambiguously, not judged as names.
    ("http://2130706433:{port}/hook", ["2130706433"], "non-canonical IPv4"),
    ("http://0177.0.0.1:{port}/hook", ["0177.0.0.1"], "non-canonical IPv4"),
    ("http://0x7f.1:{port}/hook", ["0x7f.1"], "non-canonical IPv4"),
    ("http://0x7f000001:{port}/hook", ["0x7f000001"], "non-canonical IPv4"),
    ("http://127.1:{port}/hook", ["127.1"], "non-canonical IPv4"),
    ("http://2130706433:{port}/hook", [LISTED, "127.0.0.1"], "non-canonical IPv4"),
    # Look-alike host names.
    (f"http://{LISTED}.evil.test/hook", [LISTED], "not in allowed_hosts"),
    (f"http://evil{LISTED}/hook", [LISTED], "not in allowed_hosts"),
    ("http://localhost:{port}/hook", [LISTED], "not in allowed_hosts"),
    # User info: the listed name before '@' is not the host.
    (f"http://{LISTED}@127.0.0.1:{{port}}/hook", [LISTED], "user info"),
    (f"http://{LISTED}:pw@127.0.0.1:{{port}}/hook", [LISTED], "user info"),
    (f"http://127.0.0.1:{{port}}%2f@{LISTED}/hook", [LISTED], "user info"),
    (f"http://{LISTED}\\@127.0.0.1:{{port}}/hook", [LISTED], "not a valid URL"),
    # Schemes other than http(s).
    ("file:///etc/passwd", [LISTED], "scheme 'file' is not allowed"),
    ("gopher://127.0.0.1:{port}/_POST%20/hook", ["127.0.0.1"], "scheme 'gopher' is not allowed"),
    (f"ftp://{LISTED}/hook", [LISTED], "scheme 'ftp' is not allowed"),
    ("//127.0.0.1:{port}/hook", ["127.0.0.1"], "scheme '' is not allowed"),
    ("http:///hook", [LISTED], "has no host"),
    # Allow-lists that would not restrict anything.
    (f"https://{LISTED}/hook", [], "allowed_hosts is empty"),
    (f"https://{LISTED}/hook", [f"https://{LISTED}"], "neither a host name nor an IP"),
    (f"https://{LISTED}/hook", [f"{LISTED}:443"], "neither a host name nor an IP"),
]


@pytest.mark.parametrize(("url", "allowed", "problem"), VALIDATION_CASES)
def test_url_refused_before_anything_is_recorded_or_sent(
    url: str,
    allowed: list[str],
    problem: str,
    receiver: WebhookReceiver,
    ledger: ActionLedger,
    corpus: Corpus,
) -> None:
    with corpus.case():
        before = receiver.requests
        with pytest.raises(ChannelConfigError, match=problem):
            run(channel(url.format(port=receiver.port), allowed), ledger)
        assert receiver.requests == before
        assert action_states(ledger) == []


# -- refused at send time: a listed name that resolves to an internal address --------------------


def _failed_with(ledger: ActionLedger, fragment: str) -> list[str]:
    with ledger.engine.connect() as conn:
        rows = conn.execute(sa.select(schema.actions.c.state, schema.actions.c.error)).all()
    assert rows, "the actions were not recorded"
    assert [state for state, _ in rows] == [schema.FAILED] * len(rows)
    for _, error in rows:
        assert error is not None and fragment in error, error
    return [error for _, error in rows]


@pytest.mark.parametrize(
    "name",
    [
        "localhost",  # /etc/hosts: 127.0.0.1 (and ::1)
        "LocalHost",
    ],
)
def test_listed_name_resolving_to_loopback_fails_permanently_and_sends_nothing(
    name: str, receiver: WebhookReceiver, ledger: ActionLedger, corpus: Corpus
) -> None:
    with corpus.case():
        before = receiver.requests
        report = run(channel(f"http://{name}:{receiver.port}/hook", [name]), ledger)
        assert report.failed == 2 and report.succeeded == 0
        assert receiver.requests == before
        _failed_with(ledger, "SSRF allow-list")
        assert live_rows(ledger) == []


class _FakeDns(AbstractResolver):
    """Answers every name with the configured addresses: DNS rebinding without a DNS server."""

    answers: list[str] = []

    def __init__(self) -> None:
        pass

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.answers
        ]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "answers",
    [
        ["127.0.0.1"],
        ["169.254.169.254"],
        ["10.0.0.1"],
        ["192.168.0.10"],
        ["::1"],
        ["fd00::1"],
        ["::ffff:127.0.0.1"],
        ["0.0.0.0"],
        ["93.184.216.34", "127.0.0.1"],  # one public answer does not launder an internal one
    ],
)
def test_listed_name_rebound_to_an_internal_address_is_refused(
    answers: list[str],
    receiver: WebhookReceiver,
    ledger: ActionLedger,
    corpus: Corpus,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_FakeDns, "answers", answers)
    monkeypatch.setattr(webhook_module, "DefaultResolver", _FakeDns)
    with corpus.case():
        before = receiver.requests
        report = run(channel(f"http://{LISTED}:{receiver.port}/hook", [LISTED]), ledger)
        assert report.failed == 2 and report.succeeded == 0
        assert receiver.requests == before
        _failed_with(ledger, "which allowed_hosts does not allow")
        assert live_rows(ledger) == []


def test_the_fake_dns_really_reaches_the_receiver_when_the_address_is_listed(
    receiver: WebhookReceiver, ledger: ActionLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The control for the rebinding cases: the same set-up with the network listed delivers.
    monkeypatch.setattr(_FakeDns, "answers", ["127.0.0.1"])
    monkeypatch.setattr(webhook_module, "DefaultResolver", _FakeDns)
    before = receiver.requests
    report = run(channel(f"http://{LISTED}:{receiver.port}/hook", [LISTED, "127.0.0.1"]), ledger)
    assert report.succeeded == 2
    assert receiver.requests == before + 2


# -- redirects are never followed ------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_to_an_internal_address_is_not_followed(
    status: int, receiver: WebhookReceiver, ledger: ActionLedger, corpus: Corpus
) -> None:
    with corpus.case():
        before = receiver.requests
        with WebhookReceiver(status=status, headers={"Location": receiver.url}) as front:
            report = run(channel(front.url, ["127.0.0.1"]), ledger)
            assert front.requests == 2  # the listed destination was asked, once per action
        assert report.failed == 2 and report.succeeded == 0
        assert receiver.requests == before
        _failed_with(ledger, f"HTTP {status} (redirects are not followed)")
        assert live_rows(ledger) == []


def test_redirect_to_the_metadata_address_is_not_followed(
    ledger: ActionLedger, corpus: Corpus
) -> None:
    with corpus.case():
        location = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
        with WebhookReceiver(status=302, headers={"Location": location}) as front:
            report = run(channel(front.url, ["127.0.0.1"]), ledger)
            assert front.requests == 2
        assert report.failed == 2
        _failed_with(ledger, "HTTP 302 (redirects are not followed)")
        assert live_rows(ledger) == []
