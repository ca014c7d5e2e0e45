"""EmailChannel against a real SMTP server (aiosmtpd on 127.0.0.1)."""

import hashlib
import socket
from collections.abc import Mapping
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from autoexec_dagster.channels.base import ActionRequest
from autoexec_dagster.channels.email import EmailChannel, message_id_for, parse_address
from autoexec_dagster.errors import (
    ChannelConfigError,
    ChannelError,
    PermanentChannelError,
    TransientChannelError,
)
from tests.channel_doubles import send_all
from tests.receivers import SmtpSink


def make_request(key: str, **data: Any) -> ActionRequest:
    return ActionRequest(
        idempotency_key=key,
        entity_id=str(data.get("entity_id", key)),
        action="retention_email",
        playbook="churn",
        playbook_version="1",
        insight="churn_scores",
        partition_key="2024-05-01",
        rule="at_risk",
        data=data,
    )


def channel(sink: SmtpSink | None = None, **overrides: Any) -> EmailChannel:
    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": sink.port if sink else 25,
        "sender": "Retention <retention@example.com>",
        "to_column": "email",
        "subject": "We miss you, {{ name }}",
        "template": "Hello {{ name }}, your score is {{ churn_score }}.",
        "max_concurrency": 4,
        "timeout_seconds": 5,
    }
    fields.update(overrides)
    return EmailChannel(**fields)


def plan(**columns: list[Any]) -> pd.DataFrame:
    base: dict[str, list[Any]] = {
        "entity_id": ["C1", "C2"],
        "email": ["ann@example.com", "bo@example.org"],
        "name": ["Ann", "Bo"],
        "churn_score": [0.9, 0.8],
    }
    base.update(columns)
    return pd.DataFrame(base)


# -- delivery ----------------------------------------------------------------------------------


def test_sends_rendered_message_with_idempotency_headers() -> None:
    with SmtpSink() as sink:
        ch = channel(sink, html_template="<p>{{ name }}</p>", reply_to="help@example.com")
        [receipt] = send_all(
            ch,
            [make_request("key-1", email="Ann <ann@example.com>", name="<Ann>", churn_score=0.9)],
        )
        assert receipt == "SMTP 250 2.0.0 OK queued"
        [mail] = sink.messages
    message = mail.message
    assert mail.recipients == ("ann@example.com",)
    assert mail.mail_from == "retention@example.com"
    assert message["Subject"] == "We miss you, <Ann>"
    assert message["Message-ID"] == "<key-1@autoexec.example.com>"
    assert message["Idempotency-Key"] == "key-1"
    assert message["X-Autoexec-Idempotency-Key"] == "key-1"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Reply-To"] == "help@example.com"
    assert "Ann <ann@example.com>" in str(message["To"])
    parts = {
        part.get_content_type(): part.get_content()  # type: ignore[attr-defined]
        for part in message.walk()
        if not part.is_multipart()
    }
    assert parts["text/plain"].strip() == "Hello <Ann>, your score is 0.9."
    assert parts["text/html"].strip() == "<p>&lt;Ann&gt;</p>"


def test_message_id_is_derived_from_the_key() -> None:
    with SmtpSink() as sink:
        ch = channel(sink)
        data = {"email": "ann@example.com", "name": "Ann", "churn_score": 1}
        send_all(ch, [make_request("k-7", **data)])
        send_all(ch, [make_request("k-7", **data), make_request("k-8", **data)])
        ids = sorted(m.message["Message-ID"] for m in sink.messages)
    assert ids == ["<k-7@autoexec.example.com>"] * 2 + ["<k-8@autoexec.example.com>"]


def test_message_id_of_a_key_with_unsafe_characters_is_a_hash() -> None:
    key = "churn/2024-05-01/C1 <x>"
    expected = f"<{hashlib.sha256(key.encode()).hexdigest()}@autoexec.example.com>"
    assert message_id_for(key, "example.com") == expected
    assert message_id_for(key, "example.com") == expected


def test_connections_are_pooled_and_reused() -> None:
    with SmtpSink() as sink:
        ch = channel(sink, max_concurrency=3)
        requests = [
            make_request(f"k{i}", email=f"u{i}@example.com", name="N", churn_score=i)
            for i in range(30)
        ]
        receipts = send_all(ch, requests)
        assert all(isinstance(r, str) for r in receipts)
        assert len(sink.messages) == 30
        assert 1 <= sink.connections <= 3


def test_4xx_is_transient_and_the_pool_reconnects() -> None:
    with SmtpSink(fail_rate=0.5, seed=3) as sink:
        ch = channel(sink, max_concurrency=1)
        requests = [
            make_request(f"k{i}", email=f"u{i}@example.com", name="N", churn_score=i)
            for i in range(20)
        ]
        results = send_all(ch, requests)
        failures = [r for r in results if isinstance(r, ChannelError)]
        assert failures, "the seeded sink defers some messages"
        assert all(isinstance(f, TransientChannelError) for f in failures)
        assert all("SMTP 451" in str(f) for f in failures)
        assert len(sink.messages) == 20 - len(failures) == 20 - sink.deferred
        # Each failure closes its session, so later messages arrive on fresh connections.
        assert sink.connections >= 2


def test_5xx_recipient_refusal_is_permanent_and_does_not_echo_the_address() -> None:
    with SmtpSink(reject_recipients={"gone@example.com"}) as sink:
        ch = channel(sink)
        [result] = send_all(
            ch, [make_request("k", email="gone@example.com", name="N", churn_score=1)]
        )
    assert isinstance(result, PermanentChannelError)
    assert "550" in str(result)
    assert "gone@example.com" not in str(result)


def test_connection_refused_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ch = channel(None, port=port)
    [result] = send_all(ch, [make_request("k", email="a@example.com", name="N", churn_score=1)])
    assert isinstance(result, TransientChannelError)


# The sink offers AUTH without TLS on purpose (no certificates in tests); aiosmtpd warns.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_login_with_env_var_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_SMTP_PASSWORD", "s3cret")
    with SmtpSink(auth={"bot": "s3cret"}) as sink:
        ch = channel(sink, username="bot", password=dg.EnvVar("TEST_SMTP_PASSWORD"))
        [ok] = send_all(ch, [make_request("k", email="a@example.com", name="N", churn_score=1)])
        assert ok == "SMTP 250 2.0.0 OK queued"
        monkeypatch.setenv("TEST_SMTP_PASSWORD", "wrong")
        [bad] = send_all(ch, [make_request("k2", email="a@example.com", name="N", churn_score=1)])
        assert isinstance(bad, PermanentChannelError)
        assert "535" in str(bad)
        assert len(sink.messages) == 1
    assert "s3cret" not in repr(ch.describe())
    assert "TEST_SMTP_PASSWORD" not in repr(ch.describe())


def test_unset_env_var_password_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_SMTP_UNSET", raising=False)
    ch = channel(None, username="bot", password=dg.EnvVar("TEST_SMTP_UNSET"))
    with pytest.raises(ChannelConfigError, match=r"'TEST_SMTP_UNSET'.*is not set"):
        ch.validate_rows(plan())
    with pytest.raises(ChannelConfigError, match=r"'TEST_SMTP_UNSET'.*is not set"):
        send_all(ch, [])


# -- validation --------------------------------------------------------------------------------


def test_valid_plan_passes() -> None:
    channel().validate_rows(plan())


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("not-an-address", "is not a valid e-mail address"),
        ("ann@localhost", "is not a valid e-mail address"),
        ("ann@exa mple.com", "is not a valid e-mail address"),
        ("ann@example.com, bo@example.com", "holds more than one address"),
        ("ann@example.com;bo@example.com", "holds more than one address"),
        ("ann@example.com\r\nBcc: victim@example.com", "CR or LF character"),
        ("ann@example.com\nX: y", "CR or LF character"),
        ("Ann\r\n <ann@example.com>", "CR or LF character"),
        ("", "is empty"),
        (None, "is missing"),
    ],
)
def test_bad_recipient_is_refused_naming_the_row(address: object, problem: str) -> None:
    rows = plan(email=["ok@example.com", address])
    with pytest.raises(ChannelConfigError) as info:
        channel().validate_rows(rows)
    message = str(info.value)
    assert "row 1 (entity_id 'C2')" in message
    assert "recipient column 'email'" in message
    assert problem in message


def test_parse_address_returns_the_bare_address() -> None:
    assert parse_address('"Doe, Jane" <jane@example.com>') == "jane@example.com"
    assert parse_address("Jane <jane@example.com>") == "jane@example.com"
    assert parse_address(" jane.doe+tag@mail.example.co.uk ") == "jane.doe+tag@mail.example.co.uk"


def test_cr_lf_in_rendered_subject_is_refused() -> None:
    rows = plan(name=["Ann", "Bo\r\nBcc: victim@example.com"])
    with pytest.raises(
        ChannelConfigError,
        match=r"subject, row 1 \(entity_id 'C2'\): rendered subject contains a CR or LF",
    ):
        channel().validate_rows(rows)


def test_cr_lf_in_subject_at_send_time_is_permanent_and_sends_nothing() -> None:
    with SmtpSink() as sink:
        [result] = send_all(
            channel(sink),
            [make_request("k", email="a@example.com", name="x\nBcc: v@example.com", churn_score=1)],
        )
        assert isinstance(result, PermanentChannelError)
        assert "CR or LF" in str(result)
        assert sink.messages == []


def test_template_syntax_error_names_the_template() -> None:
    with pytest.raises(
        ChannelConfigError, match="EmailChannel body: template syntax error at line 1"
    ):
        channel(template="Hello {{ name ").validate_rows(plan())


def test_undefined_variable_names_row_and_variable() -> None:
    with pytest.raises(
        ChannelConfigError,
        match=r"EmailChannel subject, row 0 \(entity_id 'C1'\): undefined variable: 'frist_name' is undefined",
    ):
        channel(subject="Hi {{ frist_name }}").validate_rows(plan())


def test_sandbox_escape_is_refused() -> None:
    with pytest.raises(
        ChannelConfigError, match=r"EmailChannel body, row 0.*refused by the template sandbox"
    ):
        channel(template="{{ ''.__class__.__mro__ }}").validate_rows(plan())


def test_missing_recipient_column() -> None:
    with pytest.raises(ChannelConfigError, match=r"needs column\(s\) \['mail'\]"):
        channel(to_column="mail").validate_rows(plan())


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"sender": "bot@"}, "sender is not a valid e-mail address"),
        ({"sender": "a@example.com, b@example.com"}, "sender holds more than one address"),
        ({"reply_to": "x\r\ny"}, "reply_to contains a CR or LF"),
        ({"starttls": True, "use_tls": True}, "mutually exclusive"),
        ({"password": "pw"}, "password is set but username is not"),
    ],
)
def test_bad_configuration(overrides: Mapping[str, Any], problem: str) -> None:
    with pytest.raises(ChannelConfigError, match=problem):
        channel(**overrides).validate_rows(plan())


def test_request_digest_hides_the_address_and_body() -> None:
    ch = channel()
    base = make_request("k", email="ann@example.com", name="Ann", churn_score=1)
    other_local = make_request("k", email="zed@example.com", name="Ann", churn_score=2)
    other_domain = make_request("k", email="ann@example.org", name="Ann", churn_score=1)
    other_subject = make_request("k", email="ann@example.com", name="Bo", churn_score=1)
    assert ch.request_digest(base) == ch.request_digest(other_local)
    assert ch.request_digest(base) != ch.request_digest(other_domain)
    assert ch.request_digest(base) != ch.request_digest(other_subject)
    assert len(ch.request_digest(base)) == 64
