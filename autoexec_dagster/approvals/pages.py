"""HTML pages of the approval endpoint: confirmation, outcome and refusal.

Every value that reaches a page (entity ids, payload field names and values, approver names,
notes) is untrusted and escaped with :func:`html.escape`; the pages load no script, image or
style sheet (the server's Content-Security-Policy allows none but the inline style below).
"""

import json
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from autoexec_dagster.approvals.links import LinkClaims
from autoexec_dagster.ledger.approvals import DecisionResult

# A payload can be large; the page shows enough to decide and says what it cut.
MAX_FIELDS = 60
MAX_VALUE_CHARS = 500

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:44rem;margin:2rem auto;
padding:0 1rem;color:#1b1f24;line-height:1.45}
h1{font-size:1.4rem;margin-bottom:.3rem}
.sub{color:#57606a;margin-top:0}
table{border-collapse:collapse;width:100%;margin:1rem 0}
th,td{text-align:left;vertical-align:top;padding:.35rem .5rem;border-bottom:1px solid #d0d7de}
th{width:32%;color:#57606a;font-weight:600}
td{word-break:break-word;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.92rem}
.error{background:#ffebe9;border:1px solid #ff8182;padding:.6rem .8rem;border-radius:6px}
.note{width:100%;min-height:4rem;font:inherit;margin:.3rem 0 1rem}
button{font:inherit;font-size:1.05rem;padding:.55rem 1.2rem;border-radius:6px;border:0;
cursor:pointer;color:#fff}
.approve{background:#1f883d}.reject{background:#cf222e}
.refusal h1{color:#cf222e}
""".strip()


def payload_fields(payload: Any) -> dict[str, Any]:
    """A payload's fields, flat, named as workflow expressions name them.

    The gate's default payload ``{"entity": {...}, "steps": {step: {...}}}`` gives the insight
    columns by name and each earlier output as ``<step>.<field>`` (what ``approve_when`` reads);
    any other payload gives its fields, nested objects joined with dots. Lists stay values.
    """
    if not isinstance(payload, Mapping):
        return {} if payload is None else {"payload": payload}
    fields: dict[str, Any] = {}
    if payload and set(payload) <= {"entity", "steps"}:
        entity, steps = payload.get("entity", {}), payload.get("steps", {})
        if isinstance(entity, Mapping) and isinstance(steps, Mapping):
            fields.update({str(k): v for k, v in entity.items()})
            for step, output in steps.items():
                if isinstance(output, Mapping):
                    fields.update({f"{step}.{name}": v for name, v in output.items()})
                else:
                    fields[str(step)] = output
            return fields

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for name, inner in value.items():
                walk(f"{prefix}.{name}" if prefix else str(name), inner)
        else:
            fields[prefix] = value

    walk("", payload)
    return fields


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _document(title: str, body: str, *, css_class: str = "") -> str:
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta name="robots" content="noindex,nofollow">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>"
        f'<body class="{_e(css_class)}">{body}</body></html>\n'
    )


def _shown(value: Any) -> str:
    if isinstance(value, Mapping | list):
        text = json.dumps(value, default=str, sort_keys=True, separators=(", ", ": "))
    elif isinstance(value, float):
        # Exactly what is approved, not a rounded picture of it.
        text = repr(value)
    else:
        text = "" if value is None else str(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def _value(value: Any) -> str:
    if value is None:
        return "-"
    return f"{float(value):,.2f}"


def _summary_rows(
    row: Mapping[str, Any], claims: LinkClaims, approved_by: Sequence[str] | None
) -> str:
    approvers = ", ".join(str(p) for p in row.get("approvers") or [])
    needed = int(row.get("min_approvals") or 1)
    so_far = ""
    if approved_by is not None:
        so_far = f"; approved so far: {', '.join(approved_by) if approved_by else 'nobody'}"
    rows = [
        ("Entity", row.get("entity_id")),
        ("Value", _value(row.get("value"))),
        ("Playbook", row.get("playbook")),
        ("Workflow / step", f"{row.get('workflow')} / {row.get('step')}"),
        ("Partition", row.get("partition_key") or "-"),
        ("For", claims.approver),
        ("Approvers", f"{approvers} ({needed} needed{so_far})"),
    ]
    return "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)


def _payload_rows(payload: Any) -> str:
    items = list(payload_fields(payload).items())
    shown = "".join(
        f"<tr><th>{_e(name)}</th><td>{_e(_shown(value))}</td></tr>"
        for name, value in items[:MAX_FIELDS]
    )
    if len(items) > MAX_FIELDS:
        shown += (
            f"<tr><th>…</th><td>{len(items) - MAX_FIELDS} more field(s) not shown "
            "(autoexec approvals --json shows them all)</td></tr>"
        )
    return shown


def confirmation_page(
    *,
    row: Mapping[str, Any],
    claims: LinkClaims,
    approved_by: Sequence[str],
    action: str,
    token: str,
    expires: str,
    requested: str,
    error: str | None = None,
) -> str:
    """The page a link opens: what the request approves, and one button that decides it.

    Args:
        row: The approval request (as :meth:`ActionLedger.approval_rows` reads it).
        claims: The verified token's claims.
        approved_by: Who approved it so far.
        action: The path the form posts to (the link's path, without the token).
        token: The link's token, posted back in a hidden field.
        expires: When the request expires, for people.
        requested: When it was requested, for people.
        error: A problem with the last post (a rejection without a note).
    """
    approving = claims.decision == "approve"
    verb = "Approve" if approving else "Reject"
    note_label = "Note (optional)" if approving else "Why do you reject it? (required)"
    required = "" if approving else " required"
    body = (
        f"<h1>{_e(verb)} this request?</h1>"
        f'<p class="sub">Requested {_e(requested)}; expires {_e(expires)}. Nothing is decided '
        "until you press the button.</p>"
        + (f'<p class="error">{_e(error)}</p>' if error else "")
        + f"<table>{_summary_rows(row, claims, approved_by)}</table>"
        "<h2>What it approves</h2>"
        f"<table>{_payload_rows(row.get('payload'))}</table>"
        f'<form method="post" action="{_e(action)}">'
        f'<input type="hidden" name="token" value="{_e(token)}">'
        f'<label for="note">{_e(note_label)}</label>'
        f'<textarea class="note" id="note" name="note" maxlength="2000"{required}></textarea>'
        f'<button type="submit" class="{"approve" if approving else "reject"}">'
        f"{_e(verb)} as {_e(claims.approver)}</button>"
        "</form>"
    )
    return _document(f"{verb} request for {row.get('entity_id')}", body)


def decided_page(*, row: Mapping[str, Any], claims: LinkClaims, result: DecisionResult) -> str:
    """The page after a decision was recorded."""
    if result.status == "pending":
        outcome = (
            f"Your approval is recorded ({result.approvals} of {result.needed}). The request "
            "waits for another approver."
        )
        title = "Approval recorded"
    elif result.status == "approved":
        outcome = "The request is approved; the workflow goes on at its next run."
        title = "Approved"
    else:
        outcome = "The request is rejected; the workflow stops at this step at its next run."
        title = "Rejected"
    body = (
        f"<h1>{_e(title)}</h1>"
        f"<p>{_e(outcome)}</p>"
        f"<table>{_summary_rows(row, claims, None)}</table>"
        "<p>Recorded in the action ledger as decided by link. You can close this page.</p>"
    )
    return _document(title, body)


def refusal_page(*, title: str, message: str) -> str:
    """A clear refusal: what is wrong with the link, and that nothing was recorded."""
    body = (
        f"<h1>{_e(title)}</h1>"
        f"<p>{_e(message)}</p>"
        "<p>Nothing was recorded. To decide anyway, ask for a new link or use "
        "<code>autoexec approvals</code> from the command line.</p>"
    )
    return _document(title, body, css_class="refusal")
