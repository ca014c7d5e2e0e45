"""Header injection corpus for EmailChannel, against a real SMTP sink (aiosmtpd).

A subject or an address that could start a new header line is refused by ``execute_plan``
before the ledger holds a row, and the sink receives nothing. Besides CR and LF this covers the
other characters ``str.splitlines`` breaks on (U+2028, U+2029, U+0085, VT, FF, FS), other
control characters, and RFC 2047 encoded words: Python's mail library decodes those when the
header is set and folds the decoded CR/LF back out as a real line break, so ``=?utf-8?b?...?=``
hiding ``\\r\\nBcc:`` would add a header although the text looked harmless.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autoexec_dagster import ActionLedger, ChannelConfigError, EmailChannel
from tests.bad_input_support import Corpus, action_states, corpus_fixture, insight, run
from tests.receivers import SmtpSink

INJECTED = "Bcc: victim@evil.test"
# "a\r\nBcc: victim@evil.test" as RFC 2047 encoded words, base64 and quoted-printable.
ENCODED_B = "=?utf-8?b?YQ0KQmNjOiB2aWN0aW1AZXZpbC50ZXN0?="
ENCODED_Q = "=?utf-8?q?a=0D=0ABcc:_victim@evil.test?="


@pytest.fixture(scope="module")
def corpus() -> Iterator[Corpus]:
    with corpus_fixture("email_header_injection") as c:
        yield c


@pytest.fixture(scope="module")
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as s:
        yield s


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[ActionLedger]:
    led = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield led
    led.dispose()


def channel(sink: SmtpSink, **overrides: Any) -> EmailChannel:
    fields: dict[str, Any] = {
        "host": sink.host,
        "port": sink.port,
        "sender": "care@example.com",
        "to_column": "email",
        "subject": "We miss you, {{ name }}",
        "template": "Hi {{ name }}",
        "timeout_seconds": 5,
    }
    fields.update(overrides)
    return EmailChannel(**fields)


def assert_refused(
    sink: SmtpSink, ledger: ActionLedger, ch: EmailChannel, problem: str, **columns: list[object]
) -> None:
    before = len(sink.messages)
    with pytest.raises(ChannelConfigError, match=problem):
        run(ch, ledger, insight(**columns))
    assert len(sink.messages) == before
    assert action_states(ledger) == []


# Subjects rendered from a plan column, as data from a model's input would arrive.
SUBJECT_VALUES: list[tuple[str, str]] = [
    (f"Ann\r\n{INJECTED}", "CR or LF"),
    (f"Ann\n{INJECTED}", "CR or LF"),
    (f"Ann\r{INJECTED}", "CR or LF"),
    ("Ann\r\n\r\nbody smuggled after an empty line", "CR or LF"),
    (f"Ann\u2028{INJECTED}", "line-separator"),
    (f"Ann\u2029{INJECTED}", "line-separator"),
    (f"Ann\x85{INJECTED}", "line-separator"),
    (f"Ann\x0b{INJECTED}", "line-separator"),
    (f"Ann\x0c{INJECTED}", "line-separator"),
    (f"Ann\x1c{INJECTED}", "line-separator"),
    ("Ann\x00", "line-separator"),
    (ENCODED_B, "encoded word"),
    (ENCODED_Q, "encoded word"),
    (f"Hello {ENCODED_Q.upper()}", "encoded word"),
]


@pytest.mark.parametrize(("value", "problem"), SUBJECT_VALUES)
def test_subject_that_could_start_a_header_is_refused(
    value: str, problem: str, sink: SmtpSink, ledger: ActionLedger, corpus: Corpus
) -> None:
    with corpus.case():
        assert_refused(
            sink, ledger, channel(sink, subject="{{ name }}"), problem, name=[value, "Bob"]
        )


@pytest.mark.parametrize(
    ("subject", "problem"),
    [
        (f"Hello\r\n{INJECTED}", "CR or LF"),
        (f"Hello\u2028{INJECTED}", "line-separator"),
        (ENCODED_B, "encoded word"),
    ],
)
def test_subject_template_that_could_start_a_header_is_refused(
    subject: str, problem: str, sink: SmtpSink, ledger: ActionLedger, corpus: Corpus
) -> None:
    with corpus.case():
        assert_refused(sink, ledger, channel(sink, subject=subject), problem)


RECIPIENTS: list[tuple[str, str]] = [
    (f"ann@example.com\r\n{INJECTED}", "CR or LF"),
    (f"ann@example.com\n{INJECTED}", "CR or LF"),
    (f"ann@example.com\r{INJECTED}", "CR or LF"),
    ("ann@example.com%0d%0aBcc:victim@evil.test", "more than one address"),
    ("ann@example.com, victim@evil.test", "more than one address"),
    ("ann@example.com\x00", "control"),
    ("Ann\u2028Bcc <ann@example.com>", "line-separator"),
    ('"Ann\u2028Bcc: victim@evil.test" <ann@example.com>', "line-separator"),
    ('"Ann\x85Bcc: victim@evil.test" <ann@example.com>', "line-separator"),
    (f"{ENCODED_B} <ann@example.com>", "encoded word"),
    (f'"{ENCODED_Q}" <ann@example.com>', "encoded word"),
]


@pytest.mark.parametrize(("address", "problem"), RECIPIENTS)
def test_recipient_that_could_start_a_header_is_refused(
    address: str, problem: str, sink: SmtpSink, ledger: ActionLedger, corpus: Corpus
) -> None:
    with corpus.case():
        assert_refused(sink, ledger, channel(sink), problem, email=["bob@example.com", address])


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("sender", f"care@example.com\r\n{INJECTED}", "CR or LF"),
        ("sender", f"{ENCODED_B} <care@example.com>", "encoded word"),
        ("reply_to", f"care@example.com\n{INJECTED}", "CR or LF"),
        ("reply_to", '"Care\u2028Bcc: victim@evil.test" <care@example.com>', "line-separator"),
    ],
)
def test_configured_address_that_could_start_a_header_is_refused(
    field: str, value: str, problem: str, sink: SmtpSink, ledger: ActionLedger, corpus: Corpus
) -> None:
    with corpus.case():
        assert_refused(sink, ledger, channel(sink, **{field: value}), problem)


def test_percent_encoded_crlf_in_a_subject_is_plain_text_in_one_header(
    sink: SmtpSink, ledger: ActionLedger
) -> None:
    # Nothing decodes %0d%0a in a mail header, so it is sent as written: the control case that
    # shows the refusals above are about line breaks, not about odd-looking text.
    before = len(sink.messages)
    report = run(
        channel(sink, subject="{{ name }}"), ledger, insight(name=["Ann%0d%0aBcc: x", "B"])
    )
    assert report.succeeded == 2
    received = sink.messages[before:]
    assert sorted(str(m.message["Subject"]) for m in received) == ["Ann%0d%0aBcc: x", "B"]
    assert all(m.message["Bcc"] is None for m in received)
    assert sorted(r for m in received for r in m.recipients) == [
        "ann@example.com",
        "bob@example.com",
    ]
