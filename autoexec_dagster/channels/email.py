"""E-mail over SMTP (aiosmtplib), one message per action.

The idempotency key travels in the ``Message-ID`` (``<key@autoexec.sender-domain>``) and in the
``Idempotency-Key`` and ``X-Autoexec-Idempotency-Key`` headers, so a mail system or a person can
spot a resend. Connections are pooled: a sender keeps at most ``max_concurrency`` SMTP sessions
open and reuses each for many messages; a session that fails in any way is closed, and the next
message opens a fresh one.
"""

import asyncio
import email.utils
import hashlib
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import jinja2
import pandas as pd
from pydantic import Field

from autoexec_dagster.channels.base import ActionRequest, Channel, digest, resolve_secret
from autoexec_dagster.channels.templates import (
    compile_template,
    render,
    request_context,
    row_context,
)
from autoexec_dagster.errors import (
    ChannelConfigError,
    ChannelError,
    PermanentChannelError,
    TransientChannelError,
)

# Dot-atom local part and LDH domain labels (RFC 5321/5322 without quoted local parts, comments
# or address literals): stricter than the RFCs on purpose, because every address comes from data.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ADDR = rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+"
_ADDRESS_RE = re.compile(
    rf'(?:"(?P<quoted>[^"\\]*)"\s*<(?P<a1>{_ADDR})>'
    rf"|(?P<name>[^<>\",;:@]*?)\s*<(?P<a2>{_ADDR})>"
    rf"|(?P<a3>{_ADDR}))"
)
# C0 and C1 controls and U+2028/U+2029: str.splitlines() breaks on several of them, and the
# mail library refuses a header that splits into lines, so they are refused before sending.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# The mail library decodes RFC 2047 encoded words when a header is set and folds a decoded CR/LF
# out as a real line break: "=?utf-8?b?...?=" would add headers although it looks harmless.
_ENCODED_WORD_RE = re.compile(r"=\?[^?\s]*\?[bq]\?[^?\s]*\?=", re.IGNORECASE)
_MSGID_SAFE_RE = re.compile(r"[A-Za-z0-9_-]{1,200}")
_EMAIL_LIKE_RE = re.compile(r"\S+@\S+")


def parse_address(value: object) -> str:
    """Check that ``value`` is exactly one e-mail address and return the bare address.

    Accepted forms are ``user@example.com``, ``Name <user@example.com>`` and
    ``"Name, Quoted" <user@example.com>``. The domain needs at least one dot; non-ASCII addresses
    are refused.

    Args:
        value: The address as found in the plan or the channel's configuration.

    Returns:
        The address without display name, for the SMTP envelope.

    Raises:
        ValueError: The value is not one valid address; the message says what is wrong and does
            not repeat the value (it may be personal data).
    """
    if value is None or (isinstance(value, float) and value != value):
        raise ValueError("is missing")
    if not isinstance(value, str):
        raise ValueError(f"is not a string (got {type(value).__name__})")
    if "\r" in value or "\n" in value:
        raise ValueError("contains a CR or LF character (header injection refused)")
    if _CONTROL_RE.search(value):
        raise ValueError("contains a control or line-separator character")
    if _ENCODED_WORD_RE.search(value):
        raise ValueError("contains an RFC 2047 encoded word (header injection refused)")
    stripped = value.strip()
    if not stripped:
        raise ValueError("is empty")
    found = [addr for _, addr in email.utils.getaddresses([stripped]) if addr]
    if len(found) > 1:
        raise ValueError("holds more than one address; exactly one is allowed")
    match = _ADDRESS_RE.fullmatch(stripped)
    if match is None:
        raise ValueError("is not a valid e-mail address")
    addr = match.group("a1") or match.group("a2") or match.group("a3")
    # Cross-check with the standard parser so the envelope and the To header cannot disagree.
    if found != [addr]:
        raise ValueError("is not a valid e-mail address")
    if len(addr.rpartition("@")[0]) > 64 or len(addr) > 254:
        raise ValueError("is too long for an e-mail address")
    return addr


def subject_problem(subject: str) -> str | None:
    """Why a rendered subject cannot be sent as one header line, or None if it can."""
    if "\r" in subject or "\n" in subject:
        return "contains a CR or LF character (header injection refused)"
    if _CONTROL_RE.search(subject):
        return "contains a control or line-separator character (header injection refused)"
    if _ENCODED_WORD_RE.search(subject):
        return "contains an RFC 2047 encoded word (header injection refused)"
    return None


def _domain(addr: str) -> str:
    return addr.rpartition("@")[2].lower()


def _redact(text: str) -> str:
    # SMTP servers echo addresses in their replies; those must not reach logs or the ledger.
    return _EMAIL_LIKE_RE.sub("<address>", text)[:200]


def message_id_for(idempotency_key: str, sender_domain: str) -> str:
    """The deterministic ``Message-ID`` of the action with this key.

    Keys made of letters, digits, ``_`` and ``-`` are used as they are; any other key is replaced
    by its SHA-256 so the header stays valid.
    """
    token = idempotency_key
    if not _MSGID_SAFE_RE.fullmatch(token):
        token = hashlib.sha256(idempotency_key.encode()).hexdigest()
    return f"<{token}@autoexec.{sender_domain}>"


def _header_key(idempotency_key: str) -> str:
    if idempotency_key.isascii() and idempotency_key.isprintable() and " " not in idempotency_key:
        return idempotency_key
    return hashlib.sha256(idempotency_key.encode()).hexdigest()


def _map_smtp_error(exc: BaseException) -> ChannelError:
    """Translate an aiosmtplib or socket failure into the channel error the executor understands."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [refused.code for refused in exc.recipients]
        text = "; ".join(f"{r.code} {_redact(r.message)}" for r in exc.recipients)
        if any(500 <= code < 600 for code in codes):
            return PermanentChannelError(f"SMTP recipient refused: {text}")
        return TransientChannelError(f"SMTP recipient deferred: {text}")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        text = f"SMTP {exc.code} {_redact(exc.message)}"
        if 500 <= exc.code < 600:
            return PermanentChannelError(text)
        return TransientChannelError(text)
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        # The server lacks something the configuration requires (STARTTLS, AUTH): no retry helps.
        return PermanentChannelError(f"SMTP server does not support a required feature: {exc}")
    if isinstance(exc, (aiosmtplib.SMTPTimeoutError, TimeoutError)):
        return TransientChannelError(f"SMTP timeout: {type(exc).__name__}")
    if isinstance(exc, (aiosmtplib.SMTPException, OSError)):
        return TransientChannelError(f"SMTP connection failed: {type(exc).__name__}: {exc}")
    return TransientChannelError(f"SMTP send failed: {type(exc).__name__}")


class _SmtpPool:
    """At most ``size`` SMTP sessions, each reused for message after message."""

    def __init__(self, factory: Callable[[], aiosmtplib.SMTP], size: int):
        self._factory = factory
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(size)
        self.opened = 0

    async def acquire(self) -> aiosmtplib.SMTP:
        await self._slots.acquire()
        try:
            while self._idle:
                conn = self._idle.pop()
                # A session the server closed while idle is noticed here, not mid-message.
                if conn.is_connected:
                    return conn
                conn.close()
            conn = self._factory()
            await conn.connect()
            self.opened += 1
            return conn
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: aiosmtplib.SMTP, *, healthy: bool) -> None:
        if healthy and conn.is_connected:
            self._idle.append(conn)
        else:
            conn.close()
        self._slots.release()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                await asyncio.wait_for(conn.quit(), timeout=5)
            except Exception:
                conn.close()


class _EmailSender:
    def __init__(self, channel: "EmailChannel", password: str | None):
        self._channel = channel
        self._from_addr = parse_address(channel.sender)
        self._domain = _domain(self._from_addr)
        self._subject = compile_template(channel.subject, what="EmailChannel subject")
        self._body = compile_template(channel.template, what="EmailChannel body")
        self._html: jinja2.Template | None = None
        if channel.html_template is not None:
            self._html = compile_template(
                channel.html_template, what="EmailChannel html_template", html=True
            )
        self._pool = _SmtpPool(
            lambda: aiosmtplib.SMTP(
                hostname=channel.host,
                port=channel.port,
                username=channel.username,
                password=password,
                use_tls=channel.use_tls,
                start_tls=channel.starttls,
                timeout=channel.timeout_seconds,
            ),
            channel.max_concurrency,
        )

    def build_message(self, request: ActionRequest) -> tuple[EmailMessage, str]:
        """Render the message for one request; return it with the envelope recipient."""
        channel = self._channel
        where = f"entity_id {request.entity_id!r}"
        raw_to = request.data.get(channel.to_column)
        try:
            to_addr = parse_address(raw_to)
        except ValueError as exc:
            raise PermanentChannelError(
                f"EmailChannel: {where}: recipient column {channel.to_column!r} {exc}"
            ) from exc
        context = request_context(request)
        try:
            subject = render(self._subject, context, what=f"EmailChannel subject, {where}")
            body = render(self._body, context, what=f"EmailChannel body, {where}")
            html = (
                render(self._html, context, what=f"EmailChannel html_template, {where}")
                if self._html is not None
                else None
            )
        except ChannelConfigError as exc:
            raise PermanentChannelError(str(exc)) from exc
        problem = subject_problem(subject)
        if problem is not None:
            raise PermanentChannelError(
                f"EmailChannel subject, {where}: rendered subject {problem}"
            )
        msg = EmailMessage()
        msg["From"] = channel.sender
        msg["To"] = str(raw_to).strip()
        if channel.reply_to:
            msg["Reply-To"] = channel.reply_to
        msg["Subject"] = subject
        msg["Date"] = email.utils.formatdate(usegmt=True)
        msg["Message-ID"] = message_id_for(request.idempotency_key, self._domain)
        key = _header_key(request.idempotency_key)
        msg["Idempotency-Key"] = key
        msg["X-Autoexec-Idempotency-Key"] = key
        # RFC 3834: tells auto-responders not to answer, which avoids mail loops.
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(body)
        if html is not None:
            msg.add_alternative(html, subtype="html")
        return msg, to_addr

    async def send(self, request: ActionRequest) -> str:
        msg, to_addr = self.build_message(request)
        try:
            conn = await self._pool.acquire()
        except Exception as exc:
            raise _map_smtp_error(exc) from exc
        healthy = False
        try:
            _, response = await conn.send_message(msg, sender=self._from_addr, recipients=[to_addr])
            healthy = True
        except Exception as exc:
            raise _map_smtp_error(exc) from exc
        finally:
            self._pool.release(conn, healthy=healthy)
        return f"SMTP 250 {_redact(response)}".strip()[:120]

    async def close(self) -> None:
        await self._pool.close()


class EmailChannel(Channel):
    """Send one e-mail per action through an SMTP server.

    ``subject``, ``template`` and ``html_template`` are Jinja2 templates rendered in a sandbox with
    the plan row's columns and the request fields (see :mod:`autoexec_dagster.channels.templates`).
    The recipient is read from the plan column ``to_column`` and must be exactly one address.
    """

    host: str = Field(description="SMTP server host name or IP address.")
    port: int = Field(default=25, ge=1, le=65535, description="SMTP server port.")
    sender: str = Field(description="From address, e.g. 'Retention <retention@example.com>'.")
    to_column: str = Field(description="Plan column holding each entity's recipient address.")
    subject: str = Field(description="Jinja2 template of the subject line.")
    template: str = Field(description="Jinja2 template of the plain-text body.")
    html_template: str | None = Field(
        default=None, description="Jinja2 template of an HTML alternative body (autoescaped)."
    )
    username: str | None = Field(default=None, description="SMTP AUTH user name.")
    password: str | None = Field(
        default=None, description="SMTP AUTH password; use dg.EnvVar, never a literal."
    )
    starttls: bool = Field(default=False, description="Upgrade the connection with STARTTLS.")
    use_tls: bool = Field(default=False, description="Connect over implicit TLS (port 465).")
    timeout_seconds: float = Field(default=30.0, gt=0, description="Timeout of each SMTP step.")
    reply_to: str | None = Field(default=None, description="Reply-To address.")

    def required_columns(self) -> set[str]:
        """The recipient column."""
        return {self.to_column}

    def _check_config(self) -> str | None:
        if self.starttls and self.use_tls:
            raise ChannelConfigError(
                "EmailChannel: starttls and use_tls are mutually exclusive; choose one"
            )
        for name, value in (("sender", self.sender), ("reply_to", self.reply_to)):
            if value is None:
                continue
            try:
                parse_address(value)
            except ValueError as exc:
                raise ChannelConfigError(f"EmailChannel: {name} {exc}") from exc
        if self.password is not None and self.username is None:
            raise ChannelConfigError("EmailChannel: password is set but username is not")
        return resolve_secret(self.password)

    def validate_rows(self, rows: pd.DataFrame) -> None:
        """Check the configuration, every recipient and the rendering of every subject and body.

        Raises:
            ChannelConfigError: Names the row (index and ``entity_id`` when the plan has it) and
                the problem: a bad or multiple address, CR/LF in an address or a rendered subject,
                a template syntax error, an undefined variable, a sandbox refusal.
        """
        super().validate_rows(rows)
        self._check_config()
        subject = compile_template(self.subject, what="EmailChannel subject")
        body = compile_template(self.template, what="EmailChannel body")
        html = (
            compile_template(self.html_template, what="EmailChannel html_template", html=True)
            if self.html_template is not None
            else None
        )
        has_entity = "entity_id" in rows.columns
        for index, record in zip(rows.index, rows.to_dict("records"), strict=True):
            where = f"row {index!r}"
            if has_entity:
                where += f" (entity_id {record['entity_id']!r})"
            try:
                parse_address(record[self.to_column])
            except ValueError as exc:
                raise ChannelConfigError(
                    f"EmailChannel: {where}: recipient column {self.to_column!r} {exc}"
                ) from exc
            context = row_context(record)
            rendered = render(subject, context, what=f"EmailChannel subject, {where}")
            problem = subject_problem(rendered)
            if problem is not None:
                raise ChannelConfigError(
                    f"EmailChannel subject, {where}: rendered subject {problem}"
                )
            render(body, context, what=f"EmailChannel body, {where}")
            if html is not None:
                render(html, context, what=f"EmailChannel html_template, {where}")

    @asynccontextmanager
    async def open_sender(self) -> AsyncIterator[_EmailSender]:
        """Open a pool of SMTP sessions for one batch (connections open on first use)."""
        password = self._check_config()
        sender = _EmailSender(self, password)
        try:
            yield sender
        finally:
            await sender.close()

    def request_digest(self, request: ActionRequest) -> str:
        """Digest of key, recipient domain and subject hash; never the body or the full address."""
        raw_to = request.data.get(self.to_column)
        try:
            domain = _domain(parse_address(raw_to))
        except ValueError:
            domain = None
        try:
            subject = render(
                compile_template(self.subject, what="EmailChannel subject"),
                request_context(request),
                what="EmailChannel subject",
            )
            subject_sha = hashlib.sha256(subject.encode()).hexdigest()
        except ChannelConfigError:
            subject_sha = None
        return digest(
            {
                "key": request.idempotency_key,
                "action": request.action,
                "recipient_domain": domain,
                "subject_sha256": subject_sha,
            }
        )

    def describe(self) -> dict[str, Any]:
        """Host, port, sender and TLS mode; never the password."""
        return {
            **super().describe(),
            "host": self.host,
            "port": self.port,
            "sender": self.sender,
            "to_column": self.to_column,
            "starttls": self.starttls,
            "use_tls": self.use_tls,
            "authenticated": self.username is not None,
            "max_concurrency": self.max_concurrency,
        }
