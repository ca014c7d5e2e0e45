"""WebhookChannel against a real aiohttp server on 127.0.0.1."""

import base64
import email.utils
import hashlib
import hmac
import json
import time
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from autoexec_dagster.channels.base import ActionRequest
from autoexec_dagster.channels.webhook import (
    WebhookChannel,
    sign,
    signing_key,
    verify_signature,
)
from autoexec_dagster.errors import (
    ChannelConfigError,
    ChannelError,
    PermanentChannelError,
    TransientChannelError,
)
from tests.channel_doubles import send_all
from tests.receivers import WebhookReceiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
LOOPBACK = ["127.0.0.1"]


def make_request(key: str, **data: Any) -> ActionRequest:
    return ActionRequest(
        idempotency_key=key,
        entity_id=f"E-{key}",
        action="crm_task",
        playbook="churn",
        playbook_version="2",
        insight="churn_scores",
        partition_key="2024-05-01",
        rule="watch",
        data=data,
    )


def channel(url: str, **overrides: Any) -> WebhookChannel:
    fields: dict[str, Any] = {
        "url": url,
        "secret": SECRET,
        "allowed_hosts": LOOPBACK,
        "timeout_seconds": 5,
    }
    fields.update(overrides)
    return WebhookChannel(**fields)


def send_one(ch: WebhookChannel, request: ActionRequest) -> str | ChannelError:
    return send_all(ch, [request])[0]


# -- signatures --------------------------------------------------------------------------------


def test_sign_matches_the_standard_webhooks_reference_vector() -> None:
    # The test vector of the reference implementation (standard-webhooks, libraries/python).
    signature = sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, '{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_raw_secret_is_used_as_utf8_bytes() -> None:
    expected = hmac.new(b"plain-secret", b"id.1.{}", hashlib.sha256).digest()
    assert sign("plain-secret", "id", 1, "{}") == "v1," + base64.b64encode(expected).decode()
    assert signing_key("plain-secret") == b"plain-secret"


def test_verify_signature_accepts_valid_and_rejects_tampering() -> None:
    now = int(time.time())
    body = b'{"entity_id":"C1"}'
    headers = {
        "Webhook-Id": "key-1",
        "Webhook-Timestamp": str(now),
        "Webhook-Signature": sign(SECRET, "key-1", now, body),
    }
    assert verify_signature(SECRET, headers, body)
    assert not verify_signature(SECRET, headers, b'{"entity_id":"C2"}')
    assert not verify_signature("whsec_" + base64.b64encode(b"other").decode(), headers, body)
    assert not verify_signature(SECRET, {**headers, "Webhook-Id": "key-2"}, body)
    assert not verify_signature(SECRET, {**headers, "Webhook-Timestamp": str(now + 1)}, body)
    assert not verify_signature(
        SECRET, {k: v for k, v in headers.items() if k != "Webhook-Id"}, body
    )
    assert not verify_signature(SECRET, headers, body, now=now + 301)
    assert verify_signature(SECRET, headers, body, now=now + 301, tolerance_seconds=None)
    rotated = {**headers, "Webhook-Signature": "v1,AAAA v2,xyz " + headers["Webhook-Signature"]}
    assert verify_signature(SECRET, rotated, body)


def test_delivered_requests_verify_and_carry_the_key() -> None:
    with WebhookReceiver(secret=SECRET) as receiver:
        ch = channel(receiver.url, headers={"X-Team": "retention"})
        receipt = send_one(ch, make_request("key-1", churn_score=0.75, name="Ann"))
        assert receipt == "HTTP 200"
        assert receiver.rejected == 0
        headers = receiver.request_headers["key-1"]
        payload = receiver.payloads["key-1"]
    assert headers["webhook-id"] == "key-1"
    assert headers["idempotency-key"] == "key-1"
    assert headers["content-type"] == "application/json"
    assert headers["x-team"] == "retention"
    assert headers["webhook-signature"].startswith("v1,")
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert payload == {
        "churn_score": 0.75,
        "name": "Ann",
        "idempotency_key": "key-1",
        "entity_id": "E-key-1",
        "action": "crm_task",
        "playbook": "churn",
        "playbook_version": "2",
        "insight": "churn_scores",
        "partition_key": "2024-05-01",
        "rule": "watch",
    }


def test_receiver_with_a_different_secret_rejects() -> None:
    with WebhookReceiver(secret="whsec_" + base64.b64encode(b"another").decode()) as receiver:
        result = send_one(channel(receiver.url), make_request("k"))
        assert isinstance(result, PermanentChannelError)
        assert "HTTP 401" in str(result)
        assert receiver.rejected == 1


# -- payload -----------------------------------------------------------------------------------


def test_payload_converts_plan_values_and_drops_non_json_columns() -> None:
    data = {
        "score": np.float64(0.5),
        "count": np.int64(3),
        "flag": np.bool_(True),
        "missing": float("nan"),
        "when": pd.Timestamp("2024-05-01T12:00:00Z"),
        "object": object(),
    }
    with WebhookReceiver() as receiver:
        assert send_one(channel(receiver.url), make_request("k", **data)) == "HTTP 200"
        payload = receiver.payloads["k"]
    assert payload["score"] == 0.5
    assert payload["count"] == 3
    assert payload["flag"] is True
    assert payload["missing"] is None
    assert payload["when"] == "2024-05-01T12:00:00+00:00"
    assert "object" not in payload


def test_payload_columns_limit_the_body() -> None:
    with WebhookReceiver() as receiver:
        ch = channel(receiver.url, payload_columns=["score"])
        send_one(ch, make_request("k", score=1, email="secret@example.com"))
        payload = receiver.payloads["k"]
    assert payload["score"] == 1
    assert "email" not in payload
    assert payload["entity_id"] == "E-k"


def test_listed_payload_column_without_json_form_fails_validation() -> None:
    rows = pd.DataFrame({"entity_id": ["a", "b"], "blob": [1, object()]})
    with pytest.raises(ChannelConfigError, match="row 1: column 'blob' holds a object"):
        channel("http://127.0.0.1/h", payload_columns=["blob"]).validate_rows(rows)


def test_listed_payload_column_missing_from_plan() -> None:
    with pytest.raises(ChannelConfigError, match=r"needs column\(s\) \['score'\]"):
        channel("http://127.0.0.1/h", payload_columns=["score"]).validate_rows(
            pd.DataFrame({"entity_id": ["a"]})
        )


# -- status mapping ----------------------------------------------------------------------------


def test_429_with_retry_after_seconds_is_transient_with_retry_after() -> None:
    with WebhookReceiver(rate_limit_every=1, retry_after=7) as receiver:
        result = send_one(channel(receiver.url), make_request("k"))
        assert receiver.deliveries == {}
    assert isinstance(result, TransientChannelError)
    assert result.retry_after == 7.0
    assert "HTTP 429" in str(result)


def test_503_with_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    with WebhookReceiver(status=503, headers={"Retry-After": when}) as receiver:
        result = send_one(channel(receiver.url), make_request("k"))
    assert isinstance(result, TransientChannelError)
    assert result.retry_after is not None
    assert 100 <= result.retry_after <= 121


def test_500_is_transient() -> None:
    with WebhookReceiver(fail_rate=1.0) as receiver:
        result = send_one(channel(receiver.url), make_request("k"))
        assert receiver.statuses == {500: 1}
    assert isinstance(result, TransientChannelError)
    assert result.retry_after is None


def test_400_is_permanent() -> None:
    with WebhookReceiver(status=400) as receiver:
        result = send_one(channel(receiver.url), make_request("k"))
    assert isinstance(result, PermanentChannelError)
    assert "HTTP 400" in str(result)


def test_redirect_is_not_followed_and_is_permanent() -> None:
    with (
        WebhookReceiver() as elsewhere,
        WebhookReceiver(status=307, headers={"Location": elsewhere.url}) as receiver,
    ):
        result = send_one(channel(receiver.url), make_request("k"))
        assert elsewhere.requests == 0
    assert isinstance(result, PermanentChannelError)
    assert "redirects are not followed" in str(result)


def test_timeout_is_transient() -> None:
    with WebhookReceiver(latency_seconds=0.5) as receiver:
        result = send_one(channel(receiver.url, timeout_seconds=0.05), make_request("k"))
    assert isinstance(result, TransientChannelError)
    assert "timed out" in str(result)


def test_connection_refused_is_transient() -> None:
    with WebhookReceiver() as receiver:
        url = receiver.url
    result = send_one(channel(url), make_request("k"))
    assert isinstance(result, TransientChannelError)
    assert "cannot connect" in str(result)


# -- concurrency and dedupe --------------------------------------------------------------------


def test_many_concurrent_deliveries_all_arrive_signed() -> None:
    keys = [f"k{i}" for i in range(400)]
    with WebhookReceiver(secret=SECRET, latency_seconds=0.01) as receiver:
        results = send_all(
            channel(receiver.url, max_concurrency=50), [make_request(k) for k in keys]
        )
        assert results == ["HTTP 200"] * len(keys)
        assert receiver.unique_keys == set(keys)
        assert receiver.rejected == 0


def test_a_deduping_receiver_counts_a_resent_key_once() -> None:
    with WebhookReceiver(dedupe=True) as receiver:
        ch = channel(receiver.url)
        send_all(ch, [make_request("a"), make_request("b")])
        send_all(ch, [make_request("a")])
        assert receiver.deliveries == {"a": 1, "b": 1}
        assert receiver.duplicates == 1


# -- SSRF and configuration --------------------------------------------------------------------


def test_host_not_in_allow_list_is_refused() -> None:
    ch = channel("https://hooks.example.com/x", allowed_hosts=["api.example.com"])
    with pytest.raises(
        ChannelConfigError, match=r"URL host 'hooks\.example\.com' is not in allowed_hosts"
    ):
        ch.validate_rows(pd.DataFrame({"entity_id": ["a"]}))
    with pytest.raises(ChannelConfigError, match="not in allowed_hosts"):
        send_all(ch, [])


def test_ip_literal_outside_allowed_networks_is_refused() -> None:
    ch = channel("http://169.254.169.254/latest/meta-data", allowed_hosts=["10.0.0.0/8"])
    with pytest.raises(
        ChannelConfigError, match=r"URL host 169\.254\.169\.254 is not in allowed_hosts"
    ):
        ch.validate_rows(pd.DataFrame())


def test_allowed_hostname_resolving_to_a_disallowed_address_is_refused_at_send() -> None:
    with WebhookReceiver() as receiver:
        url = receiver.url.replace("127.0.0.1", "localhost")
        ch = channel(url, allowed_hosts=["localhost"])
        ch.validate_rows(pd.DataFrame({"entity_id": ["a"]}))  # the name itself is allowed
        result = send_one(ch, make_request("k"))
        assert receiver.requests == 0
    assert isinstance(result, PermanentChannelError)
    assert "localhost resolves to" in str(result)
    assert "allowed_hosts does not allow" in str(result)


def test_listing_the_network_allows_a_private_address() -> None:
    with WebhookReceiver() as receiver:
        url = receiver.url.replace("127.0.0.1", "localhost")
        ch = channel(url, allowed_hosts=["localhost", "127.0.0.0/8", "::1"])
        assert send_one(ch, make_request("k")) == "HTTP 200"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://127.0.0.1/hook", "scheme 'ftp' is not allowed"),
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
        ("http://user:pw@127.0.0.1/hook", "must not contain user info"),
        ("http:///nohost", "url has no host"),
    ],
)
def test_bad_url_is_refused(url: str, problem: str) -> None:
    with pytest.raises(ChannelConfigError, match=problem):
        channel(url).validate_rows(pd.DataFrame())


@pytest.mark.parametrize(
    ("allowed", "problem"),
    [
        ([], "allowed_hosts is empty"),
        (["https://example.com"], "entry 'https://example.com' is neither a host name"),
        (["example.com:443"], "is neither a host name"),
    ],
)
def test_bad_allow_list(allowed: list[str], problem: str) -> None:
    with pytest.raises(ChannelConfigError, match=problem):
        channel("http://example.com/h", allowed_hosts=allowed).validate_rows(pd.DataFrame())


def test_unset_env_var_secret_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_WEBHOOK_SECRET", raising=False)
    ch = channel("http://127.0.0.1/h", secret=dg.EnvVar("TEST_WEBHOOK_SECRET"))
    with pytest.raises(ChannelConfigError, match=r"'TEST_WEBHOOK_SECRET'.*is not set"):
        ch.validate_rows(pd.DataFrame())
    with pytest.raises(ChannelConfigError, match=r"'TEST_WEBHOOK_SECRET'.*is not set"):
        send_all(ch, [])


def test_env_var_secret_signs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", SECRET)
    with WebhookReceiver(secret=SECRET) as receiver:
        ch = channel(receiver.url, secret=dg.EnvVar("TEST_WEBHOOK_SECRET"))
        assert send_one(ch, make_request("k")) == "HTTP 200"
        assert receiver.rejected == 0
    assert SECRET not in json.dumps(ch.describe())


def test_bad_whsec_secret() -> None:
    with pytest.raises(ChannelConfigError, match="not base64"):
        channel("http://127.0.0.1/h", secret="whsec_***").validate_rows(pd.DataFrame())


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"webhook-signature": "v1,x"}, "is set by the channel"),
        ({"Idempotency-Key": "x"}, "is set by the channel"),
        ({"X-Evil": "a\r\nHost: b"}, "contains a CR or LF"),
        ({"Bad Name": "x"}, "header name 'Bad Name' is not valid"),
    ],
)
def test_bad_headers(headers: dict[str, str], problem: str) -> None:
    with pytest.raises(ChannelConfigError, match=problem):
        channel("http://127.0.0.1/h", headers=headers).validate_rows(pd.DataFrame())


def test_describe_and_digest_hide_path_query_and_secret() -> None:
    ch = channel(
        "https://hooks.example.com/T000/B000/tokenXYZ?sig=abc", allowed_hosts=["hooks.example.com"]
    )
    described = json.dumps(ch.describe())
    assert "tokenXYZ" not in described
    assert "abc" not in described
    assert "MfKQ9r8" not in described
    assert "https://hooks.example.com:443" in described
    a = ch.request_digest(make_request("k", email="a@example.com"))
    b = ch.request_digest(make_request("k", email="b@example.com"))
    assert a == b
