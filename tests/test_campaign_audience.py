"""The simulated audience: it reads the campaign emails the SMTP sink received, recognises each
variant from the text, and opens, clicks and unsubscribes through the tracking endpoint over real
HTTP at simulated times, at the true rates."""

import asyncio
import datetime as dt
import email
import email.policy
import os
import sqlite3
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from autoexec_dagster.channels.base import ActionRequest
from autoexec_dagster.experiments.variant_channel import VariantChannel
from resources.campaign_audience import SimulatedAudience
from resources.campaign_channels import TRACKING_SECRET_ENV, campaign_channels
from resources.campaign_variants import (
    CALLS_TO_ACTION,
    SUBJECTS,
    TRUE_CLICK_RATES,
    TRUE_OPEN_RATES,
    playbook_variants,
)
from resources.local_servers import ReceivedMail, SmtpSink
from resources.tracking_server import TrackingServer

SECRET = "audience-test-secret"
ARRIVED = dt.datetime(2026, 11, 2, 8, 0, tzinfo=dt.UTC)
VARIANTS = sorted(playbook_variants())


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[TrackingServer]:
    with TrackingServer(SECRET, tmp_path / "tracking.sqlite", simulated_time=True) as server:
        yield server


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running


def _request(i: int, variant: str) -> ActionRequest:
    return ActionRequest(
        idempotency_key=f"{i:032x}",
        entity_id=f"CMP-004-D001-{i:03d}",
        action="campaign_email",
        playbook="campaign_optimisation",
        playbook_version="v",
        insight="campaign_sends",
        partition_key="2026-11-02",
        rule="underperforming",
        data={
            "email": f"ada.lovelace.{i:05d}@example.net",
            "name": "Ada Lovelace",
            "campaign_id": "CMP-004",
            "campaign_name": "Winter Members Only",
        },
        variant=variant,
    )


def _send(sink: SmtpSink, tracker: TrackingServer, count: int) -> dict[str, str]:
    """Send ``count`` emails through the playbook's channel, variants in turn; key -> variant."""
    from autoexec_dagster import Playbook
    from resources.campaign_channels import CAMPAIGN_PLAYBOOK_PATH

    experiment = Playbook.from_yaml(CAMPAIGN_PLAYBOOK_PATH).rules[0].experiment
    assert experiment is not None
    base = campaign_channels(smtp_port=sink.port, tracking_url=tracker.url)["campaign_email"]
    channel = VariantChannel.wrap(base, experiment, action="campaign_email")
    sent = {f"{i:032x}": VARIANTS[i % len(VARIANTS)] for i in range(count)}

    async def go() -> None:
        async with channel.open_sender() as sender:
            for i, variant in enumerate(sent.values()):
                await sender.send(_request(i, variant))

    previous = os.environ.get(TRACKING_SECRET_ENV)
    os.environ[TRACKING_SECRET_ENV] = SECRET
    try:
        asyncio.run(go())
    finally:
        if previous is None:
            del os.environ[TRACKING_SECRET_ENV]
        else:
            os.environ[TRACKING_SECRET_ENV] = previous
    assert sink.wait_for_messages(count)
    return sent


def _events(db: Path) -> list[tuple[str, str, str]]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(
            "SELECT kind, idempotency_key, occurred_at FROM events ORDER BY event_id"
        ).fetchall()


def _key(message_id: str) -> str:
    return message_id.strip("<>").partition("@")[0]


def test_the_audience_recognises_every_variant_from_the_text_and_reacts_over_http(
    sink: SmtpSink, tracker: TrackingServer
) -> None:
    sent = _send(sink, tracker, 40)
    # Opens, clicks and unsubscribes at ten times the true rates, so forty emails show each.
    audience = SimulatedAudience(
        seed=3,
        click_rates={v: min(0.9, 6 * r) for v, r in TRUE_CLICK_RATES.items()},
        open_rates=dict.fromkeys(TRUE_OPEN_RATES, 0.95),
        unsubscribe_rate=0.3,
    )
    readings = audience.read(sink.messages, received_at=ARRIVED)
    assert len(readings) == 40
    assert {_key(r.message_id): r.variant for r in readings} == sent
    assert audience.read(sink.messages, received_at=ARRIVED) == []  # read once

    scheduled = [reaction for r in readings for reaction in r.reactions]
    assert all(reaction.at >= ARRIVED for reaction in scheduled)
    middle = ARRIVED + dt.timedelta(hours=3)
    early = audience.react(middle)
    assert early.pending == sum(1 for reaction in scheduled if reaction.at > middle)
    report = audience.react(ARRIVED + dt.timedelta(days=3))
    assert report.pending == 0 and audience.pending == 0
    made = early.requests + report.requests
    assert made == Counter(reaction.kind for reaction in scheduled)
    assert set((early.statuses + report.statuses).elements()) <= {200, 302}
    assert early.failed == report.failed == 0

    events = _events(tracker.db_path)
    recorded = Counter(kind for kind, _, _ in events)
    assert recorded["click"] == made["click"] == sum(r.clicked for r in readings) > 0
    assert recorded["unsubscribe"] == made["unsubscribe"] == sum(r.unsubscribed for r in readings)
    assert (
        recorded["open"] == sum(r.opened for r in readings) == made["open"] - tracker.deduplicated
    )
    assert tracker.deduplicated > 0  # a repeated pixel load within the minute
    # Each event is recorded at the simulated time the person reacted, for the email they read.
    expected = {
        (reaction.kind, _key(reaction.message_id), reaction.at)
        for reaction in scheduled
        if reaction.kind != "open"
    }
    assert {
        (kind, key, dt.datetime.fromisoformat(at)) for kind, key, at in events if kind != "open"
    } == expected


def test_the_same_seed_reads_the_same_way_whatever_the_order(
    sink: SmtpSink, tracker: TrackingServer
) -> None:
    _send(sink, tracker, 24)
    mails = sink.messages

    def outcome(order: list[ReceivedMail], seed: int) -> dict[str, tuple[bool, bool, bool]]:
        audience = SimulatedAudience(seed=seed, open_rates=dict.fromkeys(TRUE_OPEN_RATES, 0.6))
        return {
            r.message_id: (r.opened, r.clicked, r.unsubscribed)
            for r in audience.read(order, received_at=ARRIVED)
        }

    forward = outcome(mails, 11)
    assert outcome(list(reversed(mails)), 11) == forward
    assert outcome(mails, 12) != forward


def _synthetic(subject: str, cta: str, i: int) -> ReceivedMail:
    """A message as the sink would keep it, without the SMTP round trip (for the rate test)."""
    link = f"http://127.0.0.1:9/c/t{i}"
    text = (
        "From: a@example.com\r\nTo: b@example.com\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{i:032x}@autoexec.example.com>\r\n"
        'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
        f"--b\r\nContent-Type: text/plain\r\n\r\n{cta}: {link}\r\nUnsubscribe: {link}u\r\n"
        f'--b\r\nContent-Type: text/html\r\n\r\n<img src="http://127.0.0.1:9/o/t{i}.gif">\r\n'
        "--b--\r\n"
    )
    # The compat32 parser: ten times faster than the default policy's, and the audience reads both.
    message = email.message_from_string(text)
    return ReceivedMail(message=message, mail_from="a", recipients=("b",), peer=("127.0.0.1", 1))


def test_the_click_and_open_shares_follow_the_true_rates() -> None:
    audience = SimulatedAudience(seed=5)
    per_variant = 2_500
    mails = []
    for variant in ("s1_cta1", "s2_cta2"):
        s, c = (int(part.removeprefix("s").removeprefix("cta")) - 1 for part in variant.split("_"))
        subject = SUBJECTS[s].replace("{{ campaign_name }}", "Cosy Picks")
        subject = subject.replace("{{ name.split(' ')[0] }}", "Ada")
        offset = len(mails)
        mails += [_synthetic(subject, CALLS_TO_ACTION[c], offset + i) for i in range(per_variant)]
    readings = audience.read(mails, received_at=ARRIVED)
    for variant in ("s1_cta1", "s2_cta2"):
        mine = [r for r in readings if r.variant == variant]
        assert len(mine) == per_variant
        click = sum(r.clicked for r in mine) / per_variant
        opened = sum(r.opened for r in mine) / per_variant
        true_click = TRUE_CLICK_RATES[variant]
        true_open = TRUE_OPEN_RATES[variant.split("_")[0]]
        # Four standard errors either side.
        assert abs(click - true_click) < 4 * (true_click * (1 - true_click) / per_variant) ** 0.5
        assert abs(opened - true_open) < 4 * (true_open * (1 - true_open) / per_variant) ** 0.5
        assert all(r.opened for r in mine if r.clicked or r.unsubscribed)
        delays = [r.reactions[0].at - ARRIVED for r in mine if r.opened]
        assert max(delays) <= dt.timedelta(hours=36)


def test_an_email_whose_text_matches_no_variant_is_ignored() -> None:
    audience = SimulatedAudience(seed=1, open_rates=dict.fromkeys(TRUE_OPEN_RATES, 1.0))
    unknown = [
        _synthetic("Completely different subject", CALLS_TO_ACTION[0], 1),
        _synthetic("Cosy Picks: new this week", "Buy now", 2),
    ]
    readings = audience.read(unknown, received_at=ARRIVED)
    assert [r.variant for r in readings] == [None, None]
    assert all(not r.reactions for r in readings)
    assert audience.pending == 0


def test_a_link_the_endpoint_does_not_know_is_refused_and_counted(
    tracker: TrackingServer,
) -> None:
    audience = SimulatedAudience(seed=2, open_rates=dict.fromkeys(TRUE_OPEN_RATES, 1.0))
    mail = _synthetic("Cosy Picks: new this week", CALLS_TO_ACTION[0], 7)
    # Point the message's links at the real endpoint, with a token it never signed.
    forged = email.message_from_string(
        mail.message.as_string().replace("http://127.0.0.1:9", tracker.url),
        policy=email.policy.default,
    )
    audience.read([ReceivedMail(forged, "a", ("b",), ("127.0.0.1", 1))], received_at=ARRIVED)
    report = audience.react(ARRIVED + dt.timedelta(days=2))
    assert set(report.statuses) == {403}
    assert _events(tracker.db_path) == []


def test_rates_a_person_cannot_reach_are_refused() -> None:
    with pytest.raises(ValueError, match="click rate"):
        SimulatedAudience(open_rates=dict.fromkeys(TRUE_OPEN_RATES, 0.01))
    with pytest.raises(ValueError, match="unsubscribe_rate"):
        SimulatedAudience(unsubscribe_rate=1.5)


def test_the_audience_reads_a_mailbox_folder_once_per_file(
    tracker: TrackingServer, tmp_path: Path
) -> None:
    # A sink that files the messages and keeps none, as the standalone receivers process runs it.
    with SmtpSink(tmp_path / "mailbox", keep_messages=False) as filing:
        sent = _send(filing, tracker, 8)
        assert filing.messages == []
    audience = SimulatedAudience(seed=4)
    readings = audience.read_mailbox(tmp_path / "mailbox", received_at=ARRIVED)
    assert {_key(r.message_id): r.variant for r in readings} == sent
    assert {r.recipient for r in readings} == {
        f"ada.lovelace.{i:05d}@example.net" for i in range(8)
    }
    assert audience.read_mailbox(tmp_path / "mailbox", received_at=ARRIVED) == []
