"""The campaign story's simulated audience: people who read the emails the SMTP sink received and
open, click or unsubscribe through the tracking endpoint, at known true rates.

Each person reads their email as a person would: the subject line and the call to action are
the text they react to, so the audience recognises the variant from the text alone (which of
:data:`~resources.campaign_variants.SUBJECTS` the subject is, which of
:data:`~resources.campaign_variants.CALLS_TO_ACTION` the link follows), never from a header the
library set. It then draws, with a generator seeded by the seed and the Message-ID (so the same
email gets the same reaction whatever the order of arrival):

- whether they open it: the subject's true open rate (:data:`TRUE_OPEN_RATES`), some hours after
  it arrived (exponential, mean ``mean_open_delay_hours``, within ``max_open_delay_hours``); a
  quarter of the openers' mail clients load the pixel twice within a minute (the endpoint
  records one open);
- whether they click: the variant's true click rate (:data:`TRUE_CLICK_RATES`) overall, so
  ``click_rate / open_rate`` of the openers, minutes after opening;
- whether they unsubscribe: :data:`TRUE_UNSUBSCRIBE_RATE` of the openers.

Reactions happen on the simulated clock: :meth:`SimulatedAudience.read` schedules them, and
:meth:`SimulatedAudience.react` makes those due by a time as real HTTP requests to the links in
the email (the pixel of the HTML part, the click and unsubscribe links of the text), each with
its time in the ``X-Sim-Time`` header, so a tracking endpoint started with ``simulated_time=True``
records it at that time. The links are followed as they are: a tampered or foreign link is
refused by the endpoint, and the report counts it.
"""

import asyncio
import dataclasses
import datetime as dt
import email
import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from email.message import EmailMessage, Message
from pathlib import Path

import aiohttp
import numpy as np

from resources.campaign_variants import (
    CALLS_TO_ACTION,
    SUBJECTS,
    TRUE_CLICK_RATES,
    TRUE_OPEN_RATES,
    TRUE_UNSUBSCRIBE_RATE,
    variant_name,
)
from resources.local_servers import ReceivedMail
from resources.tracking_server import SIM_TIME_HEADER

__all__ = ["AudienceReport", "Reaction", "Reading", "SimulatedAudience", "mail_from_file"]

# A quarter of the openers' clients load the pixel again within a minute.
REPEAT_OPEN_SHARE = 0.25
_JINJA_RE = re.compile(r"\{\{.*?\}\}")
_LINK_RE = re.compile(r"^(?P<text>.+?): (?P<url>https?://\S+)$", re.MULTILINE)
_PIXEL_RE = re.compile(r'<img src="(?P<url>https?://[^"]+)"')
_HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)


def _subject_pattern(template: str) -> re.Pattern[str]:
    """A regex that matches what the subject template renders to: its text, any values."""
    parts = _JINJA_RE.split(template)
    return re.compile(".+?".join(re.escape(part) for part in parts) + r"\Z", re.DOTALL)


def _stable(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _part(message: Message, subtype: str) -> str | None:
    if isinstance(message, EmailMessage):
        body = message.get_body(preferencelist=(subtype,))
        if body is not None and isinstance(body, EmailMessage):
            # SMTP carries CRLF line ends; the text is read line by line.
            return str(body.get_content()).replace("\r\n", "\n")
    for part in message.walk():
        if part.get_content_type() == f"text/{subtype}":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                text = payload.decode(part.get_content_charset() or "utf-8", "replace")
                return text.replace("\r\n", "\n")
    return None


def mail_from_file(path: str | os.PathLike[str]) -> ReceivedMail:
    """A message the SMTP sink filed (``<Message-ID>.eml``), as the sink would have kept it.

    Parsed with the standard library's compat32 policy, which reads a message about ten times
    faster than the default policy and is all a reader needs; the envelope is not filed, so the
    recipient is the ``To`` header and the sender the ``From`` header.
    """
    message = email.message_from_bytes(Path(path).read_bytes())
    return ReceivedMail(
        message=message,
        mail_from=str(message.get("From", "")),
        recipients=(str(message.get("To", "")),),
        peer=("", 0),
    )


@dataclasses.dataclass(frozen=True)
class Reaction:
    """One request a person makes: an open, a click or an unsubscribe, at a simulated time."""

    kind: str
    url: str
    at: dt.datetime
    message_id: str
    variant: str


@dataclasses.dataclass(frozen=True)
class Reading:
    """How one person read one email.

    Attributes:
        message_id: The email's Message-ID.
        recipient: The address it reached.
        variant: The variant recognised from the subject and call to action; None when the text
            matched no variant (the person ignores it).
        opened: Whether they open it.
        clicked: Whether they click its link.
        unsubscribed: Whether they unsubscribe.
        reactions: The requests they make, in time order.
    """

    message_id: str
    recipient: str
    variant: str | None
    opened: bool = False
    clicked: bool = False
    unsubscribed: bool = False
    reactions: tuple[Reaction, ...] = ()


@dataclasses.dataclass
class AudienceReport:
    """What one :meth:`SimulatedAudience.react` call did.

    Attributes:
        requests: Requests made, per kind (``open`` counts every pixel load, repeats too).
        statuses: HTTP status per request, counted.
        failed: Requests that got no answer (connection refused, timeout).
        pending: Reactions still to come after this call.
    """

    requests: Counter[str] = dataclasses.field(default_factory=Counter)
    statuses: Counter[int] = dataclasses.field(default_factory=Counter)
    failed: int = 0
    pending: int = 0


class SimulatedAudience:
    """The recipients of the campaign emails, reacting at known true rates; see the module
    docstring.

    Args:
        subjects: The subject templates the variants use (index i is ``s<i+1>``).
        calls_to_action: The calls to action (index j is ``cta<j+1>``).
        click_rates: The true click rate of each variant (clicks per email).
        open_rates: The true open rate of each subject (``s1``, ``s2``, ...).
        unsubscribe_rate: The share of openers who unsubscribe.
        seed: Seeds every draw, with each email's Message-ID.
        mean_open_delay_hours: Mean time from arrival to opening.
        max_open_delay_hours: Longest time from arrival to opening.
        repeat_open_share: Share of openers whose client loads the pixel twice.

    Raises:
        ValueError: A variant's click rate exceeds its subject's open rate, or a rate is not in
            [0, 1].
    """

    def __init__(
        self,
        *,
        subjects: Sequence[str] = SUBJECTS,
        calls_to_action: Sequence[str] = CALLS_TO_ACTION,
        click_rates: Mapping[str, float] = TRUE_CLICK_RATES,
        open_rates: Mapping[str, float] = TRUE_OPEN_RATES,
        unsubscribe_rate: float = TRUE_UNSUBSCRIBE_RATE,
        seed: int = 0,
        mean_open_delay_hours: float = 4.0,
        max_open_delay_hours: float = 36.0,
        repeat_open_share: float = REPEAT_OPEN_SHARE,
    ) -> None:
        self._subjects = [(i, _subject_pattern(s)) for i, s in enumerate(subjects)]
        self._ctas = {cta: j for j, cta in enumerate(calls_to_action)}
        self.click_rates = dict(click_rates)
        self.open_rates = dict(open_rates)
        for i in range(len(subjects)):
            for j in range(len(calls_to_action)):
                name = variant_name(i, j)
                click, opened = self.click_rates[name], self.open_rates[f"s{i + 1}"]
                if not (0.0 <= click <= opened <= 1.0):
                    raise ValueError(
                        f"variant {name}: the click rate {click} must lie in [0, open rate "
                        f"{opened}] and the open rate in [0, 1]"
                    )
        if not 0.0 <= unsubscribe_rate <= 1.0:
            raise ValueError(f"unsubscribe_rate must lie in [0, 1], got {unsubscribe_rate}")
        self.unsubscribe_rate = unsubscribe_rate
        self.seed = seed
        self.mean_open_delay = dt.timedelta(hours=mean_open_delay_hours)
        self.max_open_delay = dt.timedelta(hours=max_open_delay_hours)
        self.repeat_open_share = repeat_open_share
        self._read: set[str] = set()
        self._files: set[str] = set()
        self._pending: list[Reaction] = []
        self.readings: list[Reading] = []

    # -- reading -----------------------------------------------------------------------------

    def recognise(self, subject: str, body: str) -> str | None:
        """The variant whose subject line and call to action the text shows, or None."""
        subject_index = next((i for i, p in self._subjects if p.match(subject)), None)
        cta_index = next(
            (self._ctas[m["text"]] for m in _LINK_RE.finditer(body) if m["text"] in self._ctas),
            None,
        )
        if subject_index is None or cta_index is None:
            return None
        return variant_name(subject_index, cta_index)

    def read(self, mails: Iterable[ReceivedMail], *, received_at: dt.datetime) -> list[Reading]:
        """Read the emails not read before and schedule each person's reactions.

        Args:
            mails: What the SMTP sink received (``SmtpSink.messages``); emails read before
                (by Message-ID) are skipped, so the whole mailbox may be passed each time.
            received_at: When the new emails arrived (the simulated clock).

        Returns:
            A reading per newly read email, in the given order.
        """
        new: list[Reading] = []
        for mail in mails:
            message = mail.message
            message_id = str(message.get("Message-ID", "")).strip()
            if not message_id or message_id in self._read:
                continue
            self._read.add(message_id)
            reading = self._read_one(mail, message_id, received_at)
            self._pending.extend(reading.reactions)
            new.append(reading)
        self.readings.extend(new)
        return new

    def read_mailbox(
        self, mailbox: str | os.PathLike[str], *, received_at: dt.datetime
    ) -> list[Reading]:
        """Read the ``.eml`` files of a sink's mailbox folder not read before; see :meth:`read`.

        For a sink in another process (``python -m resources.local_receivers``), which files
        every message it accepts and keeps none in memory.
        """
        new = sorted(p for p in Path(mailbox).glob("*.eml") if p.name not in self._files)
        self._files.update(p.name for p in new)
        return self.read((mail_from_file(p) for p in new), received_at=received_at)

    def _read_one(self, mail: ReceivedMail, message_id: str, arrived: dt.datetime) -> Reading:
        message = mail.message
        subject = str(message.get("Subject", ""))
        text = _part(message, "plain") or ""
        html = _part(message, "html") or ""
        recipient = mail.recipients[0] if mail.recipients else ""
        variant = self.recognise(subject, text)
        if variant is None:
            return Reading(message_id=message_id, recipient=recipient, variant=None)
        links = {m["text"]: m["url"] for m in _LINK_RE.finditer(text)}
        pixel = _PIXEL_RE.search(html)
        click_url = next((url for label, url in links.items() if label in self._ctas), None)
        unsubscribe_url = links.get("Unsubscribe")
        draw = np.random.default_rng(np.random.SeedSequence([self.seed, _stable(message_id)]))
        u_open, u_click, u_unsub, u_repeat = draw.random(4)
        open_rate = self.open_rates[variant.split("_")[0]]
        opened = pixel is not None and u_open < open_rate
        click_given_open = self.click_rates[variant] / open_rate if open_rate > 0 else 0.0
        clicked = opened and click_url is not None and u_click < click_given_open
        unsubscribed = opened and unsubscribe_url is not None and u_unsub < self.unsubscribe_rate
        reactions: list[Reaction] = []
        if opened and pixel is not None:
            delay = dt.timedelta(
                seconds=float(draw.exponential(self.mean_open_delay.total_seconds()))
            )
            opened_at = arrived + min(delay, self.max_open_delay)

            def react(kind: str, url: str, after_seconds: float) -> None:
                at = opened_at + dt.timedelta(seconds=after_seconds)
                reactions.append(Reaction(kind, url, at, message_id, variant))

            react("open", pixel["url"], 0.0)
            if u_repeat < self.repeat_open_share:
                react("open", pixel["url"], float(draw.uniform(2.0, 40.0)))
            if clicked and click_url is not None:
                react("click", click_url, 60.0 + float(draw.exponential(180.0)))
            if unsubscribed and unsubscribe_url is not None:
                react("unsubscribe", unsubscribe_url, 600.0 + float(draw.exponential(600.0)))
        reactions.sort(key=lambda r: r.at)
        return Reading(
            message_id=message_id,
            recipient=recipient,
            variant=variant,
            opened=opened,
            clicked=clicked,
            unsubscribed=unsubscribed,
            reactions=tuple(reactions),
        )

    # -- reacting ----------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Reactions scheduled but not made yet."""
        return len(self._pending)

    def react(self, until: dt.datetime, *, concurrency: int = 32) -> AudienceReport:
        """Make every reaction due by ``until``, as HTTP requests; see :meth:`react_async`."""
        return asyncio.run(self.react_async(until, concurrency=concurrency))

    async def react_async(self, until: dt.datetime, *, concurrency: int = 32) -> AudienceReport:
        """Make every reaction due by ``until``: one GET per reaction, its time in ``X-Sim-Time``.

        One email's reactions go in their time order (a repeated pixel load after the first);
        different emails' in parallel, ``concurrency`` at a time. Redirects are not followed
        (the click's 302 is its answer).

        Returns:
            The requests made and their statuses; ``pending`` counts what is still to come.
        """
        due = [r for r in self._pending if r.at <= until]
        self._pending = [r for r in self._pending if r.at > until]
        by_email: dict[str, list[Reaction]] = {}
        for reaction in sorted(due, key=lambda r: r.at):
            by_email.setdefault(reaction.message_id, []).append(reaction)
        report = AudienceReport(pending=len(self._pending))
        slots = asyncio.Semaphore(concurrency)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=_HTTP_TIMEOUT) as session:

            async def one_email(reactions: list[Reaction]) -> None:
                async with slots:
                    for reaction in reactions:
                        report.requests[reaction.kind] += 1
                        headers = {SIM_TIME_HEADER: reaction.at.astimezone(dt.UTC).isoformat()}
                        try:
                            async with session.get(
                                reaction.url, headers=headers, allow_redirects=False
                            ) as response:
                                await response.read()
                                report.statuses[response.status] += 1
                        except (aiohttp.ClientError, TimeoutError):
                            report.failed += 1

            await asyncio.gather(*(one_email(r) for r in by_email.values()))
        return report
