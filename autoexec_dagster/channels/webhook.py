"""Signed webhooks over HTTP(S) (aiohttp), following the Standard Webhooks specification.

Each action is one ``POST`` of a JSON object. The idempotency key is the ``webhook-id`` and the
``Idempotency-Key`` header; ``webhook-signature`` is ``v1,<base64 HMAC-SHA256>`` of
``f"{webhook-id}.{webhook-timestamp}.{body}"``. Receivers check it with :func:`verify_signature`.

SSRF policy (``allowed_hosts``): each entry is a host name (``hooks.example.com``) or an IP
address or network (``10.1.2.3``, ``10.0.0.0/8``, ``::1``).

* At validation the URL's host must be one of the listed host names, or an IP literal inside a
  listed network. Only ``http`` and ``https`` are accepted, and no user info (``user:pw@``).
* At send time every address the host name resolves to is checked by the connector's resolver:
  an address inside a listed network is allowed; any other address is allowed only if it is
  globally routable. So a listed name that resolves (or is rebound) to a loopback, private,
  link-local or otherwise internal address is refused unless that network is listed too. A host
  name that resolves to any refused address is refused entirely (no fallback to its other
  addresses).
* Redirects are never followed; a 3xx is a permanent failure.
"""

import base64
import binascii
import datetime as dt
import email.utils
import functools
import hashlib
import hmac
import ipaddress
import json
import math
import re
import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import aiohttp
import numpy as np
import pandas as pd
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from pydantic import Field
from yarl import URL

from autoexec_dagster.channels.base import (
    ActionRequest,
    Channel,
    Delivered,
    digest,
    resolve_secret,
)
from autoexec_dagster.channels.templates import REQUEST_FIELDS
from autoexec_dagster.errors import (
    ChannelConfigError,
    ChannelError,
    PermanentChannelError,
    TransientChannelError,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SECRET_PREFIX = "whsec_"
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Headers the channel sets itself; a configured header must not replace them.
_RESERVED_HEADERS = frozenset(
    {
        "idempotency-key",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "content-type",
        "content-length",
        "host",
        "transfer-encoding",
    }
)
# The routing fields every payload carries: the request's fields but the attempt number, which
# changes between retries of the same key.
_ALWAYS_FIELDS = tuple(f for f in REQUEST_FIELDS if f != "attempt")
_MAX_RESPONSE_BYTES = 1 << 20


# -- signing -----------------------------------------------------------------------------------


def signing_key(secret: str) -> bytes:
    """The HMAC key of a webhook secret.

    A secret starting with ``whsec_`` is the Standard Webhooks form: the rest is base64. Any other
    secret is used as its UTF-8 bytes. (The reference ``standardwebhooks`` library base64-decodes
    unprefixed secrets too; give such receivers the ``whsec_`` form.)

    Raises:
        ChannelConfigError: The secret is empty or its ``whsec_`` part is not base64.
    """
    if not secret:
        raise ChannelConfigError("WebhookChannel: secret is empty")
    if secret.startswith(_SECRET_PREFIX):
        encoded = secret[len(_SECRET_PREFIX) :]
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ChannelConfigError(
                "WebhookChannel: secret starts with 'whsec_' but the rest is not base64"
            ) from exc
        if not key:
            raise ChannelConfigError("WebhookChannel: secret is empty after 'whsec_'")
        return key
    return secret.encode()


def _digest(key: bytes, msg_id: str, timestamp: int | str, body: bytes | str) -> bytes:
    # The one place the Standard Webhooks MAC is computed: sign(), the channel's sender and
    # verify_signature() all come here, so they cannot drift apart. The timestamp stays as the
    # receiver got it (a string), since "0123" and "123" sign differently.
    raw = body.encode() if isinstance(body, str) else body
    return hmac.new(key, f"{msg_id}.{timestamp}.".encode() + raw, hashlib.sha256).digest()


def sign_with_key(key: bytes, msg_id: str, timestamp: int | str, body: bytes | str) -> str:
    """:func:`sign` with the key already derived by :func:`signing_key` (once per sender)."""
    return "v1," + base64.b64encode(_digest(key, msg_id, timestamp, body)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """The ``webhook-signature`` value (``v1,<base64>``) of one message.

    Args:
        secret: The webhook secret (``whsec_<base64>`` or raw).
        msg_id: The ``webhook-id``.
        timestamp: The ``webhook-timestamp`` in Unix seconds.
        body: The exact request body.
    """
    return sign_with_key(signing_key(secret), msg_id, timestamp, body)


def verify_signature(
    secret: str,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance_seconds: float | None = 300.0,
    now: float | None = None,
) -> bool:
    """Check a Standard Webhooks signature, as a receiver of this channel's webhooks should.

    Args:
        secret: The shared secret (``whsec_<base64>`` or raw).
        headers: The request headers (any case).
        body: The raw request body, before any JSON parsing.
        tolerance_seconds: Largest accepted distance between ``webhook-timestamp`` and ``now``
            (replay protection); None disables the check.
        now: The current Unix time; defaults to the clock.

    Returns:
        True if one of the ``v1`` signatures matches and the timestamp is recent enough.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id")
    timestamp = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not (msg_id and timestamp and signatures):
        return False
    try:
        ts = int(timestamp)
        key = signing_key(secret)
    except (ValueError, ChannelConfigError):
        return False
    if tolerance_seconds is not None:
        current = time.time() if now is None else now
        if abs(current - ts) > tolerance_seconds:
            return False
    expected = _digest(key, msg_id, timestamp, body)
    for candidate in signatures.split():
        version, _, encoded = candidate.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if hmac.compare_digest(expected, given):
            return True
    return False


# -- SSRF allow-list ---------------------------------------------------------------------------


class _AddressNotAllowed(OSError):
    """A resolved address outside the allow-list (an OSError so aiohttp reports it as DNS)."""


def _ip(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0].strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# A host whose last label is a number (decimal, octal 0177, hex 0x7f) is an IPv4 address to URL
# parsers and to inet_aton, so judging it as a name would let "2130706433" reach 127.0.0.1.
_NUMERIC_LABEL_RE = re.compile(r"0x[0-9a-f]*|[0-9]+")


def _numeric_host(name: str) -> bool:
    return bool(_NUMERIC_LABEL_RE.fullmatch(name.rsplit(".", 1)[-1]))


def _normalise_host(host: str) -> str:
    host = host.strip().rstrip(".").lower()
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


class AllowList:
    """Parsed ``allowed_hosts``: host names and IP networks."""

    def __init__(self, entries: list[str]):
        if not entries:
            raise ChannelConfigError(
                "WebhookChannel: allowed_hosts is empty; list the host(s) the webhook may reach"
            )
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            text = entry.strip() if isinstance(entry, str) else ""
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
                continue
            except ValueError:
                pass
            name = _normalise_host(text)
            if _numeric_host(name):
                raise ChannelConfigError(
                    f"WebhookChannel: allowed_hosts entry {entry!r} is a non-canonical IPv4 "
                    "address (decimal, octal or hex); write it in dotted decimal"
                )
            if not _HOSTNAME_RE.fullmatch(name):
                raise ChannelConfigError(
                    f"WebhookChannel: allowed_hosts entry {entry!r} is neither a host name nor an "
                    "IP address or network (no scheme, port or path)"
                )
            names.add(name)
        self.names = frozenset(names)
        self.networks = tuple(networks)

    def in_networks(self, address: IPAddress) -> bool:
        """Whether the address is inside a listed network."""
        return any(address.version == net.version and address in net for net in self.networks)

    def address_allowed(self, address: IPAddress) -> bool:
        """Whether a resolved address of a listed host name may be contacted."""
        return self.in_networks(address) or address.is_global

    def check_url_host(self, host: str) -> None:
        """Refuse a URL host that is not listed (by name, or as an IP literal by network)."""
        address = _ip(host)
        if address is not None:
            if not self.in_networks(address):
                raise ChannelConfigError(
                    f"WebhookChannel: URL host {host} is not in allowed_hosts {self.describe()}"
                )
            return
        if _numeric_host(_normalise_host(host)):
            raise ChannelConfigError(
                f"WebhookChannel: URL host {host!r} is a non-canonical IPv4 address (decimal, "
                "octal or hex); write it in dotted decimal"
            )
        if _normalise_host(host) not in self.names:
            raise ChannelConfigError(
                f"WebhookChannel: URL host {host!r} is not in allowed_hosts {self.describe()}"
            )

    def describe(self) -> list[str]:
        """The entries, normalised."""
        return sorted(self.names) + [str(n) for n in self.networks]


class _AllowListResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then refuses addresses the allow-list forbids."""

    def __init__(self, allow: AllowList):
        self._allow = allow
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            address = _ip(result["host"])
            if address is None or not self._allow.address_allowed(address):
                raise _AddressNotAllowed(
                    f"{host} resolves to {result['host']}, which allowed_hosts does not allow "
                    "(list the address or its network to allow a non-public address)"
                )
        return results

    async def close(self) -> None:
        await self._inner.close()


def parse_url(raw: str) -> URL:
    """Parse and check a webhook URL: http(s) only, a host, no user info.

    Raises:
        ChannelConfigError: The URL is not acceptable; the message does not repeat the URL's path
            or query (they may carry a token).
    """
    try:
        url = URL(raw)
    except (ValueError, TypeError) as exc:
        raise ChannelConfigError("WebhookChannel: url is not a valid URL") from exc
    if url.scheme not in ("http", "https"):
        raise ChannelConfigError(
            f"WebhookChannel: url scheme {url.scheme!r} is not allowed; use http or https"
        )
    if url.raw_user is not None or url.raw_password is not None:
        raise ChannelConfigError(
            "WebhookChannel: url must not contain user info (user:password@); "
            "send credentials in headers"
        )
    if not url.raw_host:
        raise ChannelConfigError("WebhookChannel: url has no host")
    return url


@functools.lru_cache(maxsize=64)
def _host_of(raw: str) -> str | None:
    try:
        return parse_url(raw).host
    except ChannelConfigError:
        return None


# -- payload -----------------------------------------------------------------------------------

# What to_json_value returns for a value without a JSON form.
NOT_JSON = object()


def to_json_value(value: Any) -> Any:
    """Convert a plan value to a JSON value; return :data:`NOT_JSON` when it has none.

    NaN, infinities, ``None``, ``pd.NA`` and ``NaT`` become ``null``; numpy scalars their Python
    value; dates and timestamps ISO 8601 text; Decimals text (exact).
    """
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return to_json_value(value.item())
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (dt.timedelta, pd.Timedelta)):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return str(value)
    # Subclasses of the JSON types (IntEnum, str-based enums, dg.EnvVar) as their base value.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return to_json_value(float(value))
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        items = [to_json_value(item) for item in value]
        return NOT_JSON if any(item is NOT_JSON for item in items) else items
    if isinstance(value, Mapping):
        converted = {str(k): to_json_value(v) for k, v in value.items()}
        return NOT_JSON if any(v is NOT_JSON for v in converted.values()) else converted
    return NOT_JSON


def _header_safe(key: str) -> str:
    if key.isascii() and key.isprintable() and " " not in key:
        return key
    return hashlib.sha256(key.encode()).hexdigest()


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - dt.datetime.now(dt.UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


# -- the channel -------------------------------------------------------------------------------


class _WebhookSender:
    def __init__(self, channel: "WebhookChannel", session: aiohttp.ClientSession, url: URL):
        self._channel = channel
        self._session = session
        self._url = url
        self._host = url.host or ""
        # Derived once: decoding a whsec_ secret costs more than the HMAC itself.
        self._key = signing_key(resolve_secret(channel.secret) or "")
        self._base_headers = {
            "Content-Type": "application/json",
            **channel.resolved_headers(),
        }
        self._columns = None if channel.payload_columns is None else tuple(channel.payload_columns)

    def payload(self, request: ActionRequest) -> dict[str, Any]:
        """The JSON object sent for one request."""
        data = request.data
        body: dict[str, Any] = {}
        if self._columns is None:
            for name, value in data.items():
                converted = to_json_value(value)
                if converted is not NOT_JSON:
                    body[str(name)] = converted
        else:
            for name in self._columns:
                converted = to_json_value(data.get(name))
                body[name] = str(data.get(name)) if converted is NOT_JSON else converted
        body["idempotency_key"] = request.idempotency_key
        body["entity_id"] = request.entity_id
        body["action"] = request.action
        body["playbook"] = request.playbook
        body["playbook_version"] = request.playbook_version
        body["insight"] = request.insight
        body["partition_key"] = request.partition_key
        body["rule"] = request.rule
        return body

    async def send(self, request: ActionRequest) -> Delivered:
        body = json.dumps(
            self.payload(request), separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
        key = _header_safe(request.idempotency_key)
        timestamp = str(int(time.time()))
        headers = dict(self._base_headers)
        headers["Idempotency-Key"] = key
        headers["webhook-id"] = key
        headers["webhook-timestamp"] = timestamp
        headers["webhook-signature"] = sign_with_key(self._key, key, timestamp, body)
        try:
            async with self._session.post(
                self._url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                retry_after = response.headers.get("Retry-After")
                length = response.content_length
                reply = b""
                if length is None or length <= _MAX_RESPONSE_BYTES:
                    # Reading the (small) answer lets the connection go back to the pool.
                    reply = await response.read()
                is_json = response.content_type == "application/json"
        except TimeoutError as exc:
            raise TransientChannelError(f"webhook to {self._host}: timed out") from exc
        except aiohttp.ClientConnectorError as exc:
            raise self._connect_error(exc) from exc
        except aiohttp.ClientError as exc:
            raise TransientChannelError(
                f"webhook to {self._host}: {type(exc).__name__}: {exc}"
            ) from exc
        receipt = self._outcome(status, retry_after)
        return Delivered(receipt=receipt, output=_json_output(reply) if is_json else None)

    def _connect_error(self, exc: aiohttp.ClientConnectorError) -> ChannelError:
        if isinstance(exc.os_error, _AddressNotAllowed):
            return PermanentChannelError(f"webhook refused (SSRF allow-list): {exc.os_error}")
        if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError)):
            return PermanentChannelError(f"webhook to {self._host}: TLS failure: {exc}")
        return TransientChannelError(f"webhook to {self._host}: cannot connect: {exc.os_error}")

    def _outcome(self, status: int, retry_after: str | None) -> str:
        if 200 <= status < 300:
            return f"HTTP {status}"
        where = f"webhook to {self._host}: HTTP {status}"
        if 300 <= status < 400:
            raise PermanentChannelError(f"{where} (redirects are not followed)")
        if status in (408, 429) or status >= 500:
            raise TransientChannelError(where, retry_after=_parse_retry_after(retry_after))
        raise PermanentChannelError(where)


def _json_output(reply: bytes) -> dict[str, Any] | None:
    """A JSON object reply as the step output; anything else (or malformed JSON) is none."""
    try:
        value = json.loads(reply) if reply else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class WebhookChannel(Channel):
    """POST one signed JSON object per action to a fixed URL.

    The body holds the plan row's columns (``payload_columns``, or every JSON-serialisable column
    when None) plus ``idempotency_key``, ``entity_id``, ``action``, ``playbook``,
    ``playbook_version``, ``insight``, ``partition_key`` and ``rule``. Status mapping: 2xx is
    success; 3xx, and 4xx other than 408/429, are permanent; 408, 429 and 5xx are transient, with
    ``Retry-After`` (seconds or an HTTP date) honoured.
    """

    url: str = Field(description="Destination URL (http or https); may be a dg.EnvVar.")
    secret: str = Field(
        description="Standard Webhooks secret ('whsec_<base64>' or raw text); use dg.EnvVar."
    )
    allowed_hosts: list[str] = Field(
        description="Host names and IP addresses/networks the webhook may reach (SSRF guard). "
        "A listed name may resolve only to public addresses unless its network is listed too."
    )
    payload_columns: list[str] | None = Field(
        default=None,
        description="Plan columns sent in the body; None = every JSON-serialisable column.",
    )
    timeout_seconds: float = Field(default=10.0, gt=0, description="Total timeout per request.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra request headers (values may be dg.EnvVar)."
    )
    max_concurrency: int = Field(
        default=100, ge=1, le=2048, description="Requests in flight at once for this channel."
    )

    def required_columns(self) -> set[str]:
        """The explicitly listed payload columns."""
        return set(self.payload_columns or ())

    def resolved_headers(self) -> dict[str, str]:
        """The configured extra headers, checked, with dg.EnvVar values read.

        Raises:
            ChannelConfigError: A header is reserved, malformed, or its variable is not set.
        """
        resolved: dict[str, str] = {}
        for name, value in self.headers.items():
            if not _HEADER_NAME_RE.fullmatch(name):
                raise ChannelConfigError(f"WebhookChannel: header name {name!r} is not valid")
            if name.lower() in _RESERVED_HEADERS:
                raise ChannelConfigError(
                    f"WebhookChannel: header {name!r} is set by the channel and cannot be configured"
                )
            text = resolve_secret(value) or ""
            if "\r" in text or "\n" in text:
                raise ChannelConfigError(
                    f"WebhookChannel: header {name!r} contains a CR or LF character"
                )
            resolved[name] = text
        return resolved

    def _checked_url(self) -> tuple[URL, AllowList]:
        url = parse_url(resolve_secret(self.url) or "")
        allow = AllowList(self.allowed_hosts)
        allow.check_url_host(url.raw_host or "")
        return url, allow

    def _check_config(self) -> tuple[URL, AllowList]:
        url, allow = self._checked_url()
        signing_key(resolve_secret(self.secret) or "")
        self.resolved_headers()
        return url, allow

    def validate_rows(self, rows: pd.DataFrame) -> None:
        """Check URL, allow-list, secret and headers, and that listed columns serialise to JSON.

        Raises:
            ChannelConfigError: Names the problem: scheme, user info, a host outside
                ``allowed_hosts``, an unset secret variable, a column without a JSON form.
        """
        super().validate_rows(rows)
        self._check_config()
        for name in self.payload_columns or ():
            column = rows[name]
            if column.dtype.kind in "biufcmM" or len(column) == 0:
                continue
            for index, value in column.items():
                if to_json_value(value) is NOT_JSON:
                    raise ChannelConfigError(
                        f"WebhookChannel: row {index!r}: column {name!r} holds a "
                        f"{type(value).__name__}, which has no JSON form"
                    )

    @asynccontextmanager
    async def open_sender(self) -> AsyncIterator[_WebhookSender]:
        """Open a connection pool (``max_concurrency`` connections) guarded by the allow-list."""
        url, allow = self._check_config()
        connector = aiohttp.TCPConnector(
            limit=self.max_concurrency,
            limit_per_host=0,
            resolver=_AllowListResolver(allow),
        )
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout_seconds),
            # No cookies: one entity's response must not shape the request for the next.
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        try:
            yield _WebhookSender(self, session, url)
        finally:
            await session.close()

    def request_digest(self, request: ActionRequest) -> str:
        """Digest of key, action and destination host; never the body or the secret."""
        host = _host_of(resolve_secret(self.url) or "")
        return digest({"key": request.idempotency_key, "action": request.action, "host": host})

    def describe(self) -> dict[str, Any]:
        """Scheme, host and port of the URL (never its path or query) and the allow-list."""
        try:
            url = parse_url(resolve_secret(self.url) or "")
            where = f"{url.scheme}://{url.host}:{url.port}"
        except ChannelConfigError:
            where = "<invalid url>"
        return {
            **super().describe(),
            "url": where,
            "allowed_hosts": list(self.allowed_hosts),
            "payload_columns": self.payload_columns,
            "max_concurrency": self.max_concurrency,
        }
