"""The approval endpoint that signed links open (``autoexec serve``), as an aiohttp application.

::

    GET  /approvals/{approval_id}/{approve|reject}?token=...   a confirmation page; decides nothing
    POST /approvals/{approval_id}/{approve|reject}             token=... (and note=...): decides
    GET  /healthz                                              200 while the ledger answers

Only the POST decides, because mail scanners and chat previews open (GET) every link they see.
The decision is recorded with ``via="link"``, ``by`` = the approver the token names and
``digest`` = the payload digest the token was made for, so the ledger refuses it if the payload
changed since the link was sent.

CSRF: the form carries the token itself in its body, and the server uses no cookie, session or
other ambient credential. A page on another site can only make a browser post what that page
already holds, and a forger who holds the token holds the capability anyway (it is the link that
was mailed). ``frame-ancestors 'none'`` keeps the button out of other sites' frames
(clickjacking), ``Referrer-Policy: no-referrer`` keeps the token out of Referer headers, and the
access log records paths without their query, so tokens are not written to logs.

Refusals name the reason and record nothing: 400 (no token, a rejection without a note), 403 (a
signature that does not match, a token for another request or decision than the URL names, an
approver the request does not list), 404 (no such request), 409 (the payload changed: another
digest, or the request was replaced), 410 (the link or the request expired, the request is
already decided, or this approver already decided it).
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from autoexec_dagster.approvals import pages
from autoexec_dagster.approvals.links import ApprovalLinks, LinkClaims, LinkError
from autoexec_dagster.errors import ApprovalError, LedgerError
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.schema import PENDING, VOID

log = logging.getLogger(__name__)

LEDGER_KEY = web.AppKey("autoexec_ledger", ActionLedger)
LINKS_KEY = web.AppKey("autoexec_links", ApprovalLinks)
CLOCK_KEY: web.AppKey[Callable[[], datetime]] = web.AppKey("autoexec_clock")
OBSERVE_KEY = web.AppKey("autoexec_observe", bool)
TASKS_KEY = web.AppKey("autoexec_tasks", set)
# A token verified against this moment passes any expiry: it tells "expired" from "forged".
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_FORM_BYTES = 64 * 1024
_MAX_NOTE_CHARS = 2_000
_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}


class QuietAccessLogger(AbstractAccessLogger):
    """Access log lines without query strings: a link's token is a capability, not a log entry."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %.1f ms",
            request.remote,
            request.method,
            request.path,
            response.status,
            time * 1000,
        )


@dataclass
class _Refusal(Exception):
    status: int
    title: str
    message: str


def approval_app(
    ledger: ActionLedger,
    links: ApprovalLinks,
    *,
    clock: Callable[[], datetime] | None = None,
    observe: bool = True,
) -> web.Application:
    """The approval endpoint as an aiohttp application (run it, embed it, or test it).

    Args:
        ledger: The action ledger holding the approval requests.
        links: The links' base URL and signing secret (the workflow's own).
        clock: The time tokens and requests expire by (default: the ledger's clock).
        observe: After each decision, record the partition's queue on the Dagster instance
            (``<playbook>/approvals``), as ``autoexec approve`` does; skipped with a log line when
            ``$DAGSTER_HOME`` is not set.

    Returns:
        The application; blocking ledger calls run in threads, off the event loop.
    """
    app = web.Application(client_max_size=_MAX_FORM_BYTES, middlewares=[_ledger_unavailable])
    app[LEDGER_KEY] = ledger
    app[LINKS_KEY] = links
    app[CLOCK_KEY] = clock or ledger.clock
    app[OBSERVE_KEY] = observe
    app[TASKS_KEY] = set()
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/approvals/{approval_id}/{decision:approve|reject}", _confirm)
    app.router.add_post("/approvals/{approval_id}/{decision:approve|reject}", _decide)
    app.on_cleanup.append(_finish_observations)
    return app


@web.middleware
async def _ledger_unavailable(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A ledger that cannot be read or written is a refusal page (503), not a stack trace."""
    try:
        return await handler(request)
    except LedgerError:
        log.exception("the action ledger failed during %s %s", request.method, request.path)
        return _refused(
            _Refusal(
                503,
                "The ledger is unavailable",
                "The approval could not be read or recorded right now. Open the link again in a "
                "few minutes: it shows whether your decision was recorded.",
            )
        )


def _page(status: int, body: str) -> web.Response:
    return web.Response(
        status=status, text=body, content_type="text/html", charset="utf-8", headers=_HEADERS
    )


def _refused(refusal: _Refusal) -> web.Response:
    return _page(refusal.status, pages.refusal_page(title=refusal.title, message=refusal.message))


async def _healthz(request: web.Request) -> web.Response:
    ledger = request.app[LEDGER_KEY]
    try:
        version = await asyncio.to_thread(lambda: ledger.schema_version)
    except LedgerError:
        return web.json_response({"status": "unavailable"}, status=503, headers=_HEADERS)
    return web.json_response({"status": "ok", "schema_version": version}, headers=_HEADERS)


def _claims(request: web.Request, token: str | None) -> LinkClaims:
    """The token's claims, checked against the URL; a refusal otherwise."""
    if not token:
        raise _Refusal(
            400, "This link is incomplete", "It carries no token. Open the link from the message."
        )
    links, now = request.app[LINKS_KEY], request.app[CLOCK_KEY]()
    try:
        claims = links.verify(token, now=now)
    except LinkError as exc:
        try:
            links.verify(token, now=_EPOCH)
        except LinkError:
            raise _Refusal(403, "This link is not valid", str(exc)) from None
        raise _Refusal(410, "This link has expired", str(exc)) from None
    if claims.approval_id != request.match_info["approval_id"]:
        raise _Refusal(
            403,
            "This link was altered",
            "Its token was issued for another approval request than the address names.",
        )
    if claims.decision != request.match_info["decision"]:
        raise _Refusal(
            403,
            "This link was altered",
            f"Its token lets you {claims.decision}, not {request.match_info['decision']}.",
        )
    return claims


async def _state(request: web.Request, claims: LinkClaims) -> tuple[dict[str, Any], list[str]]:
    """The request and who approved it so far, if ``claims`` may still decide it."""
    ledger, now = request.app[LEDGER_KEY], request.app[CLOCK_KEY]()
    found = await asyncio.to_thread(ledger.approval_rows, [claims.approval_id])
    row = found.get(claims.approval_id)
    if row is None:
        raise _Refusal(404, "No such approval request", "The ledger holds no request with this id.")
    decided = _when(row.get("decided_at"))
    if row["status"] == VOID:
        raise _Refusal(
            409,
            "This request was replaced",
            "What it asked you to approve changed after the link was sent, so a new approval "
            "request replaces it. Use the link in the newer message.",
        )
    if row["status"] != PENDING:
        who = f" by {row['decided_by']}" if row.get("decided_by") else ""
        raise _Refusal(
            410,
            f"Already {row['status']}",
            f"This request was {row['status']}{who} at {decided}; nothing more to decide.",
        )
    if claims.digest != row["digest"]:
        raise _Refusal(
            409,
            "The request changed",
            "What this request approves has changed since the link was sent (its digest "
            "differs), so this link cannot decide it. A changed payload needs a new approval.",
        )
    if claims.approver not in row["approvers"]:
        raise _Refusal(
            403,
            "Not an approver",
            f"This link was made for {claims.approver}, who is not an approver of this request.",
        )
    decisions = await asyncio.to_thread(ledger.approval_decisions, [claims.approval_id])
    earlier = {
        str(p): (str(d), t)
        for p, d, t in zip(
            decisions["approver"], decisions["decision"], decisions["decided_at"], strict=True
        )
    }
    if claims.approver in earlier:
        made, when = earlier[claims.approver]
        raise _Refusal(
            410,
            "You already decided",
            f"{claims.approver} already chose {made} at {_when(when)}; each approver decides "
            "once. The request waits for the other approvers.",
        )
    expires = row["expires_at"]
    if expires is not None and expires <= now:
        raise _Refusal(
            410,
            "This request has expired",
            f"It expired at {_when(expires)}; its on_expiry ({row['on_expiry']}) applies.",
        )
    approved = [p for p, (d, _) in earlier.items() if d == "approve"]
    return row, approved


def _when(value: Any) -> str:
    if value is None:
        return "-"
    try:
        moment = value.to_pydatetime() if hasattr(value, "to_pydatetime") else value
        if isinstance(moment, str):
            moment = datetime.fromisoformat(moment)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (AttributeError, TypeError, ValueError):
        return str(value)


def _action_path(claims: LinkClaims) -> str:
    return f"/approvals/{quote(claims.approval_id, safe='')}/{claims.decision}"


async def _confirm(request: web.Request) -> web.Response:
    """GET: the confirmation page. It records nothing, however often it is opened."""
    try:
        claims = _claims(request, request.query.get("token"))
        row, approved = await _state(request, claims)
    except _Refusal as refusal:
        return _refused(refusal)
    return _page(
        200,
        pages.confirmation_page(
            row=row,
            claims=claims,
            approved_by=approved,
            action=_action_path(claims),
            token=request.query["token"],
            expires=_when(row["expires_at"]),
            requested=_when(row["requested_at"]),
        ),
    )


async def _decide(request: web.Request) -> web.Response:
    """POST: record the decision the token names, as its approver, for its digest."""
    try:
        form = await request.post()
    except ValueError:
        return _refused(_Refusal(400, "Bad request", "The form could not be read."))
    token = form.get("token") or request.query.get("token")
    token = token if isinstance(token, str) else None
    raw_note = form.get("note")
    note = raw_note.strip()[:_MAX_NOTE_CHARS] if isinstance(raw_note, str) else ""
    try:
        claims = _claims(request, token)
        row, approved = await _state(request, claims)
    except _Refusal as refusal:
        return _refused(refusal)
    assert token is not None  # _claims refuses a missing token
    if claims.decision == "reject" and not note:
        return _page(
            400,
            pages.confirmation_page(
                row=row,
                claims=claims,
                approved_by=approved,
                action=_action_path(claims),
                token=token,
                expires=_when(row["expires_at"]),
                requested=_when(row["requested_at"]),
                error="A rejection needs a note: say why, for the record and the requester.",
            ),
        )
    ledger = request.app[LEDGER_KEY]
    decide = ledger.approve if claims.decision == "approve" else ledger.reject
    try:
        (result,) = await asyncio.to_thread(
            decide,
            [claims.approval_id],
            by=claims.approver,
            note=note or None,  # type: ignore[arg-type]  # reject always has one here
            via="link",
            digest=claims.digest,
        )
    except ApprovalError as exc:
        # Another decision (or the expiry) landed between the checks and this one.
        try:
            await _state(request, claims)
        except _Refusal as refusal:
            return _refused(refusal)
        return _refused(_Refusal(409, "Not decided", str(exc)))
    log.info(
        "approval %s: %s by %s via link -> %s",
        claims.approval_id,
        claims.decision,
        claims.approver,
        result.status,
    )
    if request.app[OBSERVE_KEY]:
        _observe_later(request.app, row=row, by=claims.approver)
    return _page(200, pages.decided_page(row=row, claims=claims, result=result))


def _observe_later(app: web.Application, *, row: Mapping[str, Any], by: str) -> None:
    """Record the queue on the Dagster instance without holding up the approver's page."""

    def observe() -> str:
        from autoexec_dagster.cli.approval_commands import observe_approvals

        return observe_approvals(
            app[LEDGER_KEY],
            playbook=str(row["playbook"]),
            partition_key=str(row["partition_key"]),
            by=by,
            source="approval link",
        )

    async def run() -> None:
        try:
            log.info("%s", await asyncio.to_thread(observe))
        except Exception:  # the decision is recorded; the UI note is a courtesy
            log.exception("could not record the approvals observation")

    task = asyncio.get_running_loop().create_task(run())
    tasks = app[TASKS_KEY]
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _finish_observations(app: web.Application) -> None:
    """On shutdown, let observations already under way finish (each is one small write)."""
    tasks = list(app[TASKS_KEY])
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
