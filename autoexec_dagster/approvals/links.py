"""Signed approval links: a token per (request, payload digest, decision, approver, expiry).

A link's token is ``<claims>.<mac>``: the claims as base64url JSON and an HMAC-SHA256 over them
with the deployment's secret. Whoever holds a link can decide only what it names: that request, as
that approver, for that payload, before that time. The server re-checks everything against the
ledger when the form is posted (a reused link finds the decision already made; a changed payload
finds another digest), so the token itself needs no server-side state.
"""

import base64
import binascii
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import quote, urlsplit

from autoexec_dagster.errors import AutoexecError

SECRET_ENV = "AUTOEXEC_APPROVAL_SECRET"
BASE_URL_ENV = "AUTOEXEC_APPROVAL_URL"
# Shorter secrets are guessable offline from one intercepted link.
MIN_SECRET_LENGTH = 16
LinkDecision = Literal["approve", "reject"]


class LinkError(AutoexecError):
    """A link's token is malformed, tampered with or expired (the message says which)."""


@dataclass(frozen=True)
class LinkClaims:
    """What a valid token lets its holder decide.

    Attributes:
        approval_id: The approval request.
        digest: The payload digest the link was made for.
        decision: ``approve`` or ``reject``.
        approver: The person the link was sent to.
        expires_at: The link is refused from this time on.
    """

    approval_id: str
    digest: str
    decision: LinkDecision
    approver: str
    expires_at: datetime


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class ApprovalLinks:
    """Where the approval endpoint listens and the secret its links are signed with.

    Attributes:
        base_url: The public address of ``autoexec serve`` (``https://approvals.example.com``).
        secret: The HMAC secret (at least 16 characters), shared with ``autoexec serve``.
    """

    base_url: str
    secret: str

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise LinkError(
                f"approval links: base_url {self.base_url!r} must be an http(s) address, e.g. "
                "https://approvals.example.com"
            )
        if len(self.secret) < MIN_SECRET_LENGTH:
            raise LinkError(
                f"approval links: the secret must be at least {MIN_SECRET_LENGTH} characters "
                f"(set {SECRET_ENV} to a long random value)"
            )

    @classmethod
    def from_env(cls, base_url: str | None = None) -> "ApprovalLinks":
        """Links configured by ``$AUTOEXEC_APPROVAL_URL`` (or ``base_url``) and
        ``$AUTOEXEC_APPROVAL_SECRET``.

        Raises:
            LinkError: Either is missing or invalid.
        """
        url = base_url or os.environ.get(BASE_URL_ENV, "").strip()
        secret = os.environ.get(SECRET_ENV, "")
        if not url:
            raise LinkError(f"approval links need a base URL: set {BASE_URL_ENV}")
        if not secret:
            raise LinkError(f"approval links need a signing secret: set {SECRET_ENV}")
        return cls(base_url=url, secret=secret)

    def token(
        self,
        *,
        approval_id: str,
        digest: str,
        decision: LinkDecision,
        approver: str,
        expires_at: datetime,
    ) -> str:
        """The signed token of one decision link."""
        claims = {
            "a": approval_id,
            "g": digest,
            "d": decision,
            "p": approver,
            "e": int(expires_at.timestamp()),
        }
        body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        return f"{body}.{_b64(self._mac(body))}"

    def link(
        self,
        *,
        approval_id: str,
        digest: str,
        decision: LinkDecision,
        approver: str,
        expires_at: datetime,
    ) -> str:
        """The URL a person opens to make this decision (a confirmation page; POST decides)."""
        token = self.token(
            approval_id=approval_id,
            digest=digest,
            decision=decision,
            approver=approver,
            expires_at=expires_at,
        )
        return (
            f"{self.base_url.rstrip('/')}/approvals/{quote(approval_id)}/{decision}?token={token}"
        )

    def verify(self, token: str, *, now: datetime | None = None) -> LinkClaims:
        """The claims of a genuine, unexpired token.

        Raises:
            LinkError: The token is malformed, its signature does not match (tampered with, or
                signed with another secret), or it has expired.
        """
        body, dot, mac = (token or "").partition(".")
        if not dot or not body or not mac:
            raise LinkError("this link is incomplete (its token is malformed)")
        try:
            given = _unb64(mac)
            raw = _unb64(body)
        except (binascii.Error, ValueError):
            raise LinkError("this link is damaged (its token is not valid base64)") from None
        if not hmac.compare_digest(given, self._mac(body)):
            raise LinkError(
                "this link's signature does not match: it was altered or not issued here"
            )
        try:
            claims = json.loads(raw)
            expires_at = datetime.fromtimestamp(int(claims["e"]), tz=UTC)
            decision = claims["d"]
            parsed = LinkClaims(
                approval_id=str(claims["a"]),
                digest=str(claims["g"]),
                decision=decision,
                approver=str(claims["p"]),
                expires_at=expires_at,
            )
        except (ValueError, KeyError, TypeError):
            raise LinkError("this link's token does not hold a decision") from None
        if parsed.decision not in ("approve", "reject"):
            raise LinkError(f"this link's decision {parsed.decision!r} is not approve or reject")
        moment = now or datetime.now(UTC)
        if moment >= parsed.expires_at:
            raise LinkError(
                f"this link expired at {parsed.expires_at:%Y-%m-%d %H:%M} UTC; decide from the "
                "command line or ask for a new link"
            )
        return parsed

    def _mac(self, body: str) -> bytes:
        return hmac.new(self.secret.encode(), body.encode(), hashlib.sha256).digest()
