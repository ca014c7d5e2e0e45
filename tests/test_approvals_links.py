"""Signed approval links (autoexec_dagster/approvals/links.py): what a token lets its holder do."""

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

from autoexec_dagster.approvals.links import ApprovalLinks, LinkError

SECRET = "approval-secret-for-tests-0123456789"
EXPIRES = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
BEFORE = EXPIRES - timedelta(hours=1)


@pytest.fixture
def links() -> ApprovalLinks:
    return ApprovalLinks(base_url="https://approvals.example.com/", secret=SECRET)


def _token(links: ApprovalLinks, **changes: object) -> str:
    claims: dict[str, object] = {
        "approval_id": "a1b2c3d4e5f6a7b8",
        "digest": "d" * 64,
        "decision": "approve",
        "approver": "ana",
        "expires_at": EXPIRES,
    }
    claims.update(changes)
    return links.token(**claims)  # type: ignore[arg-type]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(claims: dict[str, object], secret: str = SECRET) -> str:
    """A token signed with the real secret around claims links.token would never write."""
    body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def test_a_token_verifies_to_its_claims(links: ApprovalLinks) -> None:
    claims = links.verify(_token(links), now=BEFORE)

    assert claims.approval_id == "a1b2c3d4e5f6a7b8"
    assert claims.digest == "d" * 64
    assert (claims.decision, claims.approver, claims.expires_at) == ("approve", "ana", EXPIRES)


def test_a_link_names_the_request_the_decision_and_carries_the_token(
    links: ApprovalLinks,
) -> None:
    url = links.link(
        approval_id="a1b2c3d4e5f6a7b8",
        digest="d" * 64,
        decision="reject",
        approver="bob",
        expires_at=EXPIRES,
    )

    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc) == ("https", "approvals.example.com")
    assert parts.path == "/approvals/a1b2c3d4e5f6a7b8/reject"
    (token,) = parse_qs(parts.query)["token"]
    assert links.verify(token, now=BEFORE).approver == "bob"


def test_a_tampered_token_is_refused(links: ApprovalLinks) -> None:
    token = _token(links)
    body, mac = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["p"] = "mallory"
    forged_body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())

    with pytest.raises(LinkError, match="signature does not match"):
        links.verify(f"{forged_body}.{mac}", now=BEFORE)
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    with pytest.raises(LinkError, match="signature does not match"):
        links.verify(f"{body}.{flipped}", now=BEFORE)


def test_a_token_signed_with_another_secret_is_refused(links: ApprovalLinks) -> None:
    other = ApprovalLinks(base_url="https://approvals.example.com", secret="another-secret-0123")
    with pytest.raises(LinkError, match="not issued here"):
        links.verify(_token(other), now=BEFORE)


def test_an_expired_token_is_refused_from_its_expiry_on(links: ApprovalLinks) -> None:
    token = _token(links)
    assert links.verify(token, now=EXPIRES - timedelta(seconds=1)).approver == "ana"
    with pytest.raises(LinkError, match="expired at 2026-12-05 09:00 UTC"):
        links.verify(token, now=EXPIRES)


@pytest.mark.parametrize("token", ["", "no-dot", ".abc", "abc.", "!!!.###"])
def test_a_malformed_token_is_refused(links: ApprovalLinks, token: str) -> None:
    with pytest.raises(LinkError):
        links.verify(token, now=BEFORE)


def test_a_genuine_signature_over_claims_that_are_not_a_decision_is_refused(
    links: ApprovalLinks,
) -> None:
    base = {"a": "x", "g": "d" * 64, "p": "ana", "e": int(EXPIRES.timestamp())}
    with pytest.raises(LinkError, match="'maybe' is not approve or reject"):
        links.verify(_signed({**base, "d": "maybe"}), now=BEFORE)
    with pytest.raises(LinkError, match="does not hold a decision"):
        links.verify(_signed({"a": "x", "d": "approve"}), now=BEFORE)


def test_a_short_secret_or_a_bad_base_url_is_refused() -> None:
    with pytest.raises(LinkError, match="at least 16 characters"):
        ApprovalLinks(base_url="https://approvals.example.com", secret="short")
    with pytest.raises(LinkError, match="must be an http"):
        ApprovalLinks(base_url="approvals.example.com", secret=SECRET)


def test_from_env_reads_the_address_and_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOEXEC_APPROVAL_URL", raising=False)
    monkeypatch.delenv("AUTOEXEC_APPROVAL_SECRET", raising=False)
    with pytest.raises(LinkError, match="set AUTOEXEC_APPROVAL_URL"):
        ApprovalLinks.from_env()
    monkeypatch.setenv("AUTOEXEC_APPROVAL_URL", "https://approvals.example.com")
    with pytest.raises(LinkError, match="set AUTOEXEC_APPROVAL_SECRET"):
        ApprovalLinks.from_env()
    monkeypatch.setenv("AUTOEXEC_APPROVAL_SECRET", SECRET)

    links = ApprovalLinks.from_env()

    assert links.base_url == "https://approvals.example.com"
    assert links.verify(_token(links), now=BEFORE).approver == "ana"
