"""The approval commands: the queue of approval requests, decisions from a terminal, and the
endpoint that signed approval links open.

::

    autoexec approvals [--playbook P] [--partition K] [--status pending|decided|all]
                       [--sort COLUMN] [--limit N] [--json|--csv]
    autoexec approve KEY... --by NAME [--note TEXT]
    autoexec reject KEY... --by NAME --note TEXT
    autoexec approve --playbook P [--partition K] --where EXPRESSION --by NAME [--yes]
    autoexec serve [--ledger URL] [--host 127.0.0.1] [--port 8765]

KEY is an approval request's id or a unique prefix of it (6+ characters). Decisions made here are
recorded with ``via="cli"``; each one is all or nothing (a list with one request that cannot be
decided decides none). After a decision the partition's queue is recorded on the Dagster
instance as an observation of ``<playbook>/approvals`` (when ``$DAGSTER_HOME`` is set).
"""

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import click
import numpy as np
import pandas as pd

from autoexec_dagster.approvals.pages import payload_fields
from autoexec_dagster.cli.common import (
    DEFAULT_PERSONAL_COLUMNS,
    cli,
    echo_json,
    fail,
    json_option,
    ledger_option,
    open_ledger,
    plain,
    table,
)
from autoexec_dagster.dagster.metadata import is_personal, mask_emails, mask_value
from autoexec_dagster.errors import PlaybookError
from autoexec_dagster.expressions import parse_expression
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.approvals import DecisionResult
from autoexec_dagster.ledger.schema import APPROVAL_STATES, PENDING

DECIDED_STATES: tuple[str, ...] = tuple(s for s in APPROVAL_STATES if s != PENDING)
MIN_KEY_PREFIX = 6
SHORT_KEY = 12
# Columns of the request (not of its payload) that --sort and --where know by these names.
_SORT_ALIASES: dict[str, str] = {
    "value": "value",
    "age": "age_hours",
    "age_hours": "age_hours",
    "requested_at": "requested_at",
    "expires": "expires_at",
    "expires_at": "expires_at",
    "sla": "sla_due_at",
    "sla_due_at": "sla_due_at",
    "decided_at": "decided_at",
    "entity": "entity_id",
    "entity_id": "entity_id",
    "partition": "partition_key",
    "partition_key": "partition_key",
    "status": "status",
    "step": "step",
    "workflow": "workflow",
    "min_approvals": "min_approvals",
}
# Request columns a --where filter reads (payload fields join them; these names win).
_FILTER_COLUMNS: tuple[str, ...] = (
    "value",
    "entity",
    "entity_id",
    "partition",
    "step",
    "workflow",
    "min_approvals",
    "age_hours",
)
_SHOWN_DECISIONS = 20
_SHOWN_MATCHES = 10


# -- observing the queue on the Dagster instance -----------------------------------------------


def observe_approvals(
    ledger: ActionLedger,
    *,
    playbook: str,
    partition_key: str,
    by: str,
    source: str = "autoexec approvals",
) -> str:
    """Record the partition's approval queue on the Dagster instance, as a runless observation.

    The ``<playbook>/approvals`` asset was materialized by the last run; a decision made outside
    a run (here, or through a signed link) makes that materialization stale. An
    ``AssetObservation`` with the current figures makes the UI show the queue as it is now: the
    materialization's own entries (pending count, pending value, oldest pending age in hours,
    SLA overdue, and per outcome the count and value: approved by the rule or by people,
    rejected, expired, void), plus who changed it and how.

    Args:
        ledger: The action ledger.
        playbook: The playbook whose queue changed.
        partition_key: The partition ("" when unpartitioned).
        by: Who decided.
        source: What made the change (``autoexec approve``, ``approval link``, ...).

    Returns:
        One line for the person: what was recorded, or why nothing was.
    """
    return observe_approval_queues(
        ledger, scopes=[(playbook, partition_key)], by=by, source=source
    )[0]


def observe_approval_queues(
    ledger: ActionLedger,
    *,
    scopes: Sequence[tuple[str, str]],
    by: str,
    source: str = "autoexec approvals",
) -> list[str]:
    """:func:`observe_approvals` for several (playbook, partition) queues, opening the Dagster
    instance once (a bulk decision can touch many partitions).

    Returns:
        One line per scope (or a single line when nothing could be recorded).
    """
    if not scopes:
        return []
    if not os.environ.get("DAGSTER_HOME", "").strip():
        names = ", ".join(sorted({f"{p}/approvals" for p, _ in scopes}))
        return [
            "DAGSTER_HOME is not set, so the Dagster UI was not told: its "
            f"{names} asset shows the queue of the last run until the next one (set "
            "DAGSTER_HOME to the instance folder, e.g. .dagster_home, to update it now)."
        ]
    import dagster as dg

    from autoexec_dagster.dagster.approval_assets import APPROVALS, approvals_summary

    lines: list[str] = []
    try:
        with dg.DagsterInstance.get() as instance:
            for playbook, partition_key in scopes:
                # The materialization's own figures, so the UI plots the two as one series.
                summary = approvals_summary(
                    ledger, playbook=playbook, partition_key=partition_key, now=ledger.clock()
                )
                metadata: dict[str, Any] = {
                    key: dg.MetadataValue.float(value) if isinstance(value, float) else value
                    for key, value in summary.items()
                }
                metadata.update({"changed_by": by, "source": source})
                pending = int(summary["pending"])
                instance.report_runless_asset_event(
                    dg.AssetObservation(
                        asset_key=dg.AssetKey([playbook, APPROVALS]),
                        partition=partition_key or None,
                        metadata=metadata,
                        description=(f"{pending:,} approval request(s) pending after {by} decided"),
                    )
                )
                where = f"{playbook}/{APPROVALS}" + (f" [{partition_key}]" if partition_key else "")
                lines.append(
                    f"Dagster UI: {where} now shows {pending:,} pending (value "
                    f"{_money(summary['pending_value'])}; recorded as an observation)."
                )
    except Exception as exc:  # the ledger is the record; the UI note is a courtesy
        lines.append(f"The Dagster instance could not be updated ({type(exc).__name__}: {exc}).")
    return lines


# -- formatting --------------------------------------------------------------------------------


def _text(value: Any) -> str:
    """Text of a nullable column ("" for None and NaN)."""
    return value if isinstance(value, str) else ""


def _money(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{float(value):,.2f}"


def _span(seconds: float) -> str:
    """A duration for people: ``45s``, ``12m``, ``3h 05m``, ``2d 4h``."""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{int(seconds)}s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def _when(value: Any) -> str:
    if value is None or pd.isna(value):
        return "-"
    return pd.Timestamp(value).strftime("%Y-%m-%d %H:%M")


def _expires_text(status: str, expires: Any, now: pd.Timestamp) -> str:
    if expires is None or pd.isna(expires):
        return "-"
    if status != PENDING:
        return _when(expires)
    left = (pd.Timestamp(expires) - now).total_seconds()
    # A pending request past its expiry waits for the next run to apply its on_expiry.
    return f"in {_span(left)}" if left > 0 else f"EXPIRED {_span(left)} ago"


def _sla_text(status: str, due: Any, decided: Any, now: pd.Timestamp) -> str:
    if due is None or pd.isna(due):
        return "-"
    due = pd.Timestamp(due)
    if status == PENDING:
        left = (due - now).total_seconds()
        return f"due in {_span(left)}" if left > 0 else f"BREACHED {_span(left)} ago"
    if decided is None or pd.isna(decided):
        return "-"
    late = (pd.Timestamp(decided) - due).total_seconds()
    return "met" if late <= 0 else f"missed by {_span(late)}"


def _mask_payload(value: Any, personal: Sequence[str], *, field: str | None = None) -> Any:
    """The payload with personal fields masked and e-mail addresses in text masked."""
    if field is not None and personal and is_personal(field, personal):
        return mask_value(value) if not isinstance(value, Mapping | list) else "***"
    if isinstance(value, Mapping):
        return {str(k): _mask_payload(v, personal, field=str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_payload(v, personal) for v in value]
    if isinstance(value, str) and personal:
        return mask_emails(value)
    return value


def _payload_line(payload: Any, *, max_chars: int = 60) -> str:
    parts = []
    fields = payload_fields(payload)
    # Earlier steps' outputs (``draft_po.total``) say what is approved; the entity's columns after.
    ordered = sorted(fields, key=lambda name: "." not in name)
    for name in ordered:
        value = fields[name]
        shown = json.dumps(value, default=str) if isinstance(value, Mapping | list) else value
        if isinstance(shown, float):
            shown = round(shown, 4)
        parts.append(f"{name}={shown}")
    text = ", ".join(parts)
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def _approvers(raw: Any) -> list[str]:
    if isinstance(raw, list):
        return [str(p) for p in raw]
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        return [str(raw)]
    return [str(p) for p in data] if isinstance(data, list) else [str(data)]


def _scope(playbook: str | None, partition: str | None) -> str:
    parts = [f"playbook {playbook!r}"] if playbook else []
    if partition is not None:
        parts.append(f"partition {partition!r}")
    return (" for " + ", ".join(parts)) if parts else ""


# -- the listing -------------------------------------------------------------------------------


def _sort_key(sort: str) -> tuple[str, bool]:
    """``(column or payload field, ascending)`` of a ``--sort`` value (``-`` = descending)."""
    descending = sort.startswith("-")
    name = sort.removeprefix("-").strip()
    if not name:
        fail("--sort needs a column: value, age, requested_at, expires_at or a payload field")
    column = _SORT_ALIASES.get(name, name)
    # Age grows as requested_at shrinks: "--sort age" is youngest first, like the number.
    return column, not descending


def _payload_frame(payloads: Sequence[Any]) -> pd.DataFrame:
    """One column per payload field, named as :func:`payload_fields` names them."""
    frame = pd.DataFrame.from_records([payload_fields(p) for p in payloads])
    if frame.empty:
        return pd.DataFrame(index=range(len(payloads)))
    return frame


def _decoded_payloads(raw: pd.Series) -> list[Any]:
    loads = json.loads
    return [loads(text) if isinstance(text, str) else None for text in raw]


def _sorted(frame: pd.DataFrame, column: str, ascending: bool) -> pd.DataFrame:
    try:
        return frame.sort_values(column, ascending=ascending, kind="stable", na_position="last")
    except TypeError:
        # A payload field holding numbers for some requests and text for others.
        order = frame[column].map(lambda v: "" if v is None else str(v))
        return frame.iloc[np.argsort(order.to_numpy(), kind="stable")[:: 1 if ascending else -1]]


def _counts(
    ledger: ActionLedger, *, playbook: str, partition: str | None, statuses: Any
) -> tuple[int, float]:
    """How many requests of the scope a listing covers, and their total value."""
    wanted = (
        None if statuses is None else {statuses} if isinstance(statuses, str) else set(statuses)
    )
    rows = ledger.approval_counts(playbook=playbook, partition_key=partition)
    chosen = [r for r in rows if wanted is None or r["status"] in wanted]
    return sum(int(r["count"]) for r in chosen), sum(float(r["value"]) for r in chosen)


def _approved_so_far(ledger: ActionLedger, frame: pd.DataFrame) -> dict[str, list[str]]:
    """Who approved each pending four-eyes request so far (the others wait for nobody yet)."""
    ids = frame.loc[
        (frame["status"] == PENDING) & (frame["min_approvals"] > 1), "approval_id"
    ].tolist()
    if not ids:
        return {}
    decisions = ledger.approval_decisions([str(i) for i in ids])
    found: dict[str, list[str]] = {}
    for approval_id, approver, decision in zip(
        decisions["approval_id"], decisions["approver"], decisions["decision"], strict=True
    ):
        if decision == "approve":
            found.setdefault(str(approval_id), []).append(str(approver))
    return found


def _listing_records(
    frame: pd.DataFrame,
    *,
    payloads: Mapping[str, Any],
    so_far: Mapping[str, list[str]],
    now: pd.Timestamp,
    masked: Sequence[str],
) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for row in frame.to_dict("records"):
        approval_id = str(row["approval_id"])
        status = str(row["status"])
        approvers = _approvers(row["approvers"])
        approved = so_far.get(approval_id, [])
        if status != PENDING and isinstance(row["decided_by"], str):
            approved = (
                [p.strip() for p in row["decided_by"].split(",")] if status == "approved" else []
            )
        entity = str(row["entity_id"])
        records.append(
            {
                "key": approval_id,
                "playbook": row["playbook"],
                "partition": row["partition_key"],
                "entity_id": entity,
                "workflow": row["workflow"],
                "step": row["step"],
                "status": status,
                "value": row["value"],
                "approvers": approvers,
                "min_approvals": int(row["min_approvals"]),
                "approved_by": approved,
                "requested_at": row["requested_at"],
                "age_hours": round(float(row["age_hours"]), 2),
                "expires_at": row["expires_at"],
                "expires": _expires_text(status, row["expires_at"], now),
                "sla_due_at": row["sla_due_at"],
                "sla": _sla_text(status, row["sla_due_at"], row["decided_at"], now),
                "decided_at": row["decided_at"],
                "decided_by": row["decided_by"],
                "decided_via": row["decided_via"],
                "decision_note": (
                    mask_emails(row["decision_note"])
                    if masked and isinstance(row["decision_note"], str)
                    else row["decision_note"]
                ),
                "instance_id": row["instance_id"],
                "digest": row["digest"],
                "payload": _mask_payload(payloads.get(approval_id), masked),
            }
        )
    return records


@cli.command("approvals")
@ledger_option
@click.option("--playbook", "-p", default=None, help="Only this playbook.")
@click.option("--partition", "-k", default=None, help="Only this insight partition.")
@click.option(
    "--status",
    type=click.Choice(["pending", "decided", "all"]),
    default="pending",
    show_default=True,
    help="decided: approved, rejected, expired or void.",
)
@click.option(
    "--sort",
    "sort",
    default=None,
    metavar="COLUMN",
    help="value, age, requested_at, expires_at, sla_due_at, decided_at, entity, or a payload "
    "field; a leading '-' sorts descending (--sort -value). Default: oldest first.",
)
@click.option("--limit", "-n", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--show-personal",
    is_flag=True,
    help="Show personal payload fields (email, name, phone, address) and e-mail addresses.",
)
@json_option
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV instead of a table.")
def approvals_command(
    ledger_url: str | None,
    playbook: str | None,
    partition: str | None,
    status: str,
    sort: str | None,
    limit: int,
    show_personal: bool,
    as_json: bool,
    as_csv: bool,
) -> None:
    """The approval queue: what waits for whom, its value, age, expiry and SLA.

    Decided requests also show who decided, when, how (cli, link, python, expiry) and the note.
    """
    if as_json and as_csv:
        fail("give --json or --csv, not both")
    ledger = open_ledger(ledger_url)
    statuses: Any = {"pending": PENDING, "decided": list(DECIDED_STATES), "all": None}[status]
    if sort:
        column, ascending = _sort_key(sort)
    else:
        # Waiting requests oldest first (the next to breach); decided ones latest first.
        column, ascending = ("decided_at", False) if status == "decided" else ("requested_at", True)
    by_payload = column not in set(_SORT_ALIASES.values())
    oldest_first = (column == "requested_at" and ascending) or (
        column == "age_hours" and not ascending
    )
    counted = (
        _counts(ledger, playbook=playbook, partition=partition, statuses=statuses)
        if playbook and oldest_first
        else None
    )
    # The ledger lists oldest first: that order needs only the rows shown, whatever the queue's
    # size (its totals come from one grouped count). Any other order sorts the whole scope here.
    frame = ledger.approvals(
        playbook=playbook,
        partition_key=partition,
        status=statuses,
        with_payload=by_payload,
        limit=limit if counted is not None else None,
    )
    now = pd.Timestamp(ledger.clock())
    frame["age_hours"] = (now - frame["requested_at"]).dt.total_seconds() / 3600
    total, total_value = counted or (len(frame), float(frame["value"].fillna(0.0).sum()))
    payloads: dict[str, Any] = {}
    if by_payload:
        decoded = _decoded_payloads(frame["payload"])
        fields = _payload_frame(decoded)
        if column not in fields.columns:
            known = ", ".join(sorted(set(_SORT_ALIASES) | {str(c) for c in fields.columns}))
            if frame.empty:
                fail(f"--sort {column!r}: no request to sort{_scope(playbook, partition)}")
            fail(
                f"--sort {column!r} is neither a request column nor a payload field; known: {known}"
            )
        frame = frame.assign(_sort=fields[column].to_numpy())
        frame = _sorted(frame, "_sort", ascending).head(limit)
        payloads = {
            str(i): decoded[n] for n, i in zip(frame.index, frame["approval_id"], strict=True)
        }
    else:
        if column == "age_hours":
            column, ascending = "requested_at", not ascending
        frame = _sorted(frame, column, ascending).head(limit)
        rows = ledger.approval_rows([str(i) for i in frame["approval_id"]])
        payloads = {i: r["payload"] for i, r in rows.items()}
    masked = () if show_personal else DEFAULT_PERSONAL_COLUMNS
    records = _listing_records(
        frame, payloads=payloads, so_far=_approved_so_far(ledger, frame), now=now, masked=masked
    )
    if as_json:
        echo_json(records)
        return
    if as_csv:
        flat = [
            {
                **plain(r),
                "approvers": ";".join(r["approvers"]),
                "approved_by": ";".join(r["approved_by"]),
                "payload": json.dumps(plain(r["payload"]), sort_keys=True),
            }
            for r in records
        ]
        columns = list(records[0]) if records else _CSV_COLUMNS
        click.echo(pd.DataFrame(flat, columns=columns).to_csv(index=False), nl=False)
        return
    if not records:
        what = {"pending": "pending ", "decided": "decided ", "all": ""}[status]
        click.echo(f"No {what}approval requests{_scope(playbook, partition)}.")
        return
    view = pd.DataFrame(
        {
            "key": [r["key"][:SHORT_KEY] for r in records],
            "partition": [r["partition"] or "-" for r in records],
            "entity": [r["entity_id"] for r in records],
            "value": [_money(r["value"]) for r in records],
            "status": [r["status"] for r in records],
            "approvals": [f"{len(r['approved_by'])}/{r['min_approvals']}" for r in records],
            "approvers": [", ".join(r["approvers"]) for r in records],
            "age": [_span(r["age_hours"] * 3600) for r in records],
            "expires": [r["expires"] for r in records],
            "sla": [r["sla"] for r in records],
        }
    )
    if status != "pending":
        view["decided"] = [_when(r["decided_at"]) for r in records]
        view["by"] = [_text(r["decided_by"]) or "-" for r in records]
        view["via"] = [_text(r["decided_via"]) or "-" for r in records]
        view["note"] = [_text(r["decision_note"]) for r in records]
    view["payload"] = [_payload_line(r["payload"]) for r in records]
    click.echo(table(view))
    click.echo("")
    click.echo(
        f"{len(records):,} of {total:,} request(s) shown{_scope(playbook, partition)}"
        + (f" (--limit {limit})" if total > len(records) else "")
        + f"; total value {_money(total_value)}."
        + (
            " Decide with: autoexec approve KEY --by NAME, or autoexec reject KEY --by NAME "
            "--note TEXT"
            if status != "decided"
            else ""
        )
    )


_CSV_COLUMNS = [
    "key",
    "playbook",
    "partition",
    "entity_id",
    "workflow",
    "step",
    "status",
    "value",
    "approvers",
    "min_approvals",
    "approved_by",
    "requested_at",
    "age_hours",
    "expires_at",
    "expires",
    "sla_due_at",
    "sla",
    "decided_at",
    "decided_by",
    "decided_via",
    "decision_note",
    "instance_id",
    "digest",
    "payload",
]


# -- deciding ----------------------------------------------------------------------------------


def resolve_approval_keys(
    ledger: ActionLedger,
    keys: Sequence[str],
    *,
    playbook: str | None = None,
    partition_key: str | None = None,
) -> dict[str, dict[str, Any]]:
    """The requests that full ids or unique prefixes name, in the order given.

    A prefix is matched as ``autoexec resolve`` matches escalation keys (at least 6 characters,
    exactly one match), against requests of any status, so a decided request is reported as
    decided rather than as unknown.

    Returns:
        Full id -> the request as :meth:`ActionLedger.approval_rows` reads it.
    """
    given = list(dict.fromkeys(k.strip() for k in keys))
    exact = ledger.approval_rows(given)
    problems: list[str] = []
    chosen: list[str] = []
    prefixes = [k for k in given if k not in exact]
    known: list[str] = []
    if any(len(k) >= MIN_KEY_PREFIX for k in prefixes):
        listing = ledger.approvals(playbook=playbook, partition_key=partition_key)
        known = [str(i) for i in listing["approval_id"]]
    for key in given:
        if key in exact:
            chosen.append(key)
            continue
        if len(key) < MIN_KEY_PREFIX:
            problems.append(f"{key}: give at least {MIN_KEY_PREFIX} characters of the approval key")
            continue
        matches = [i for i in known if i.startswith(key)]
        if not matches:
            problems.append(
                f"{key}: no approval request{_scope(playbook, partition_key)} has a key starting "
                "with it"
            )
        elif len(matches) > 1:
            problems.append(
                f"{key}: {len(matches)} approval requests have keys starting with it "
                f"({', '.join(m[:SHORT_KEY] for m in matches[:5])}); give more characters"
            )
        else:
            chosen.append(matches[0])
    if problems:
        fail("nothing decided:\n  " + "\n  ".join(problems))
    chosen = list(dict.fromkeys(chosen))
    rows = dict(exact)
    missing = [i for i in chosen if i not in rows]
    if missing:
        rows.update(ledger.approval_rows(missing))
    return {i: rows[i] for i in chosen if i in rows}


def _filter_frame(pending: pd.DataFrame, now: pd.Timestamp) -> pd.DataFrame:
    """The columns a --where filter reads: the request's own and (when the listing holds it) its
    payload's fields."""
    base = pd.DataFrame(
        {
            "value": pending["value"].astype(float),
            "entity": pending["entity_id"].astype(str),
            "entity_id": pending["entity_id"].astype(str),
            "partition": pending["partition_key"].astype(str),
            "step": pending["step"].astype(str),
            "workflow": pending["workflow"].astype(str),
            "min_approvals": pending["min_approvals"].astype(int),
            "age_hours": (now - pending["requested_at"]).dt.total_seconds() / 3600,
        },
        index=pending.index,
    )
    if "payload" not in pending.columns:
        return base
    fields = _payload_frame(_decoded_payloads(pending["payload"]))
    fields.index = pending.index
    clashing = [c for c in fields.columns if c in base.columns]
    # A payload field named like a request column stays readable as `payload.<field>`.
    renamed = fields.rename(columns={c: f"payload.{c}" for c in clashing})
    return pd.concat([base, renamed], axis=1)


def _matching(
    ledger: ActionLedger,
    *,
    playbook: str,
    partition: str | None,
    where: str,
) -> tuple[pd.DataFrame, int]:
    """Pending requests of the scope the filter selects and ``by`` may decide; and how many
    matched but have already expired (nobody can decide those)."""
    try:
        parsed = parse_expression(where, rule="--where")
    except PlaybookError as exc:
        fail(
            f"the --where filter is refused, nothing was decided: {exc}".replace(
                "rule '--where': ", ""
            )
        )
    # Decoding 10,000 payloads costs more than the rest of the selection: only when read.
    reads_payload = not parsed.columns <= set(_FILTER_COLUMNS)
    pending = ledger.pending_approvals(
        playbook=playbook, partition_key=partition, with_payload=reads_payload
    )
    if pending.empty:
        return pending, 0
    now = pd.Timestamp(ledger.clock())
    columns = _filter_frame(pending, now)
    unknown = sorted(parsed.columns - set(columns.columns))
    if unknown:
        fields = ", ".join(sorted(str(c) for c in columns.columns))
        fail(
            f"the --where filter reads {', '.join(unknown)}, which no pending request"
            f"{_scope(playbook, partition)} has (nothing was decided); it can read: {fields} "
            "(quote names with dots or spaces in backticks)"
        )
    try:
        result: Any = columns.eval(where, engine="python")
    except Exception as exc:  # the person's expression; shown with its cause
        fail(f"the --where filter {where!r} could not be evaluated (nothing was decided): {exc}")
    if isinstance(result, pd.Series):
        if not pd.api.types.is_bool_dtype(result):
            fail(
                f"the --where filter {where!r} must be true or false per request, not {result.dtype}"
            )
        mask = result.to_numpy(dtype=bool, na_value=False)
    elif isinstance(result, bool | np.bool_):
        mask = np.full(len(pending), bool(result))
    else:
        fail(f"the --where filter {where!r} must be true or false per request")
    selected = pending[mask]
    live = selected["expires_at"] > now
    return selected[live.to_numpy()], int((~live).sum())


def _refusals_for(ledger: ActionLedger, selected: pd.DataFrame, *, by: str) -> list[str]:
    """Why ``by`` cannot decide some of the selected requests (checked before asking)."""
    # Requests of one step share their approvers' JSON: decode each distinct list once.
    listed = {raw: by in _approvers(raw) for raw in set(selected["approvers"])}
    not_listed = [
        str(i)
        for i, raw in zip(selected["approval_id"], selected["approvers"], strict=True)
        if not listed[raw]
    ]
    problems: list[str] = []
    if not_listed:
        problems.append(
            f"{len(not_listed):,} of them do not list {by!r} as an approver (e.g. "
            f"{', '.join(i[:SHORT_KEY] for i in not_listed[:5])})"
        )
    four_eyes = selected.loc[selected["min_approvals"] > 1, "approval_id"].astype(str).tolist()
    if four_eyes:
        decisions = ledger.approval_decisions(four_eyes)
        mine = sorted(
            {
                str(i)
                for i, p in zip(decisions["approval_id"], decisions["approver"], strict=True)
                if p == by
            }
        )
        if mine:
            problems.append(
                f"{len(mine):,} of them {by} has already decided (each approver decides once; "
                f"e.g. {', '.join(i[:SHORT_KEY] for i in mine[:5])})"
            )
    return problems


def _report_decisions(results: Sequence[DecisionResult], *, verb: str, by: str) -> None:
    done = {"approved": 0, "rejected": 0, "pending": 0}
    for result in results:
        done[result.status] = done.get(result.status, 0) + 1
    if len(results) <= _SHOWN_DECISIONS:
        for result in results:
            value = f", value {_money(result.value)}" if result.value is not None else ""
            if result.status == "pending":
                outcome = (
                    f"{result.approvals} of {result.needed} approvals; it waits for another "
                    "approver"
                )
            elif result.status == "approved":
                outcome = "approved; the workflow goes on at its next run"
            else:
                outcome = "rejected; the workflow stops at this step at its next run"
            click.echo(
                f"{verb} {result.approval_id[:SHORT_KEY]} (entity {result.entity_id}{value}) as "
                f"{by}: {outcome}."
            )
        return
    total = sum(r.value for r in results if r.value is not None)
    parts = [f"{n:,} {s}" for s, n in done.items() if n]
    waiting = " (pending: waiting for another approver)" if done.get("pending") else ""
    click.echo(
        f"{verb} {len(results):,} request(s) as {by}, total value {_money(total)}: "
        + ", ".join(parts)
        + waiting
        + "."
    )


def _decide(
    *,
    decision: str,
    ledger_url: str | None,
    keys: Sequence[str],
    by: str,
    note: str | None,
    playbook: str | None,
    partition: str | None,
    where: str | None,
    yes: bool,
) -> None:
    verb = "Approved" if decision == "approve" else "Rejected"
    by = by.strip()
    if not by:
        fail("--by is empty; say who decides (it is recorded in the ledger)")
    if decision == "reject" and not (note or "").strip():
        fail("a rejection needs a note: --note TEXT (why), for the record and the requester")
    note = note.strip() if note and note.strip() else None
    if keys and where is not None:
        fail("give approval KEYs or --where, not both")
    if not keys and where is None:
        fail(
            f"name the requests to {decision}: KEY... (from autoexec approvals), or "
            f"--playbook P [--partition K] --where EXPRESSION"
        )
    if where is not None and not playbook:
        fail("a bulk decision (--where) needs --playbook (and usually --partition)")
    ledger = open_ledger(ledger_url)
    scopes: dict[str, tuple[str, str]] = {}
    if where is not None:
        selected, expired = _matching(
            ledger, playbook=str(playbook), partition=partition, where=where
        )
        scope = _scope(playbook, partition)
        left_out = (
            f" ({expired:,} matching request(s) left out: expired, their on_expiry applies)"
            if expired
            else ""
        )
        if selected.empty:
            click.echo(
                f"No pending approval request{scope} matches {where!r}; nothing decided." + left_out
            )
            return
        total = float(selected["value"].fillna(0.0).sum())
        click.echo(
            f"{len(selected):,} pending approval request(s){scope} match {where!r}: total value "
            f"{_money(total)}{left_out}"
        )
        for row in selected.head(_SHOWN_MATCHES).to_dict("records"):
            click.echo(
                f"  {str(row['approval_id'])[:SHORT_KEY]}  {row['partition_key'] or '-'}  entity "
                f"{row['entity_id']}  value {_money(row['value'])}  step {row['step']}"
            )
        if len(selected) > _SHOWN_MATCHES:
            click.echo(f"  ... and {len(selected) - _SHOWN_MATCHES:,} more")
        problems = _refusals_for(ledger, selected, by=by)
        if problems:
            fail(f"nothing decided: {by} cannot {decision} all of them: " + "; ".join(problems))
        if not yes and not click.confirm(
            f"{decision.capitalize()} these {len(selected):,} request(s) (total value "
            f"{_money(total)}) as {by}?",
            default=False,
        ):
            click.echo("Nothing decided.")
            sys.exit(1)
        ids = [str(i) for i in selected["approval_id"]]
        scopes = {
            str(i): (str(p), str(k))
            for i, p, k in zip(
                selected["approval_id"],
                selected["playbook"],
                selected["partition_key"],
                strict=True,
            )
        }
    else:
        rows = resolve_approval_keys(ledger, keys, playbook=playbook, partition_key=partition)
        ids = list(rows)
        scopes = {i: (str(r["playbook"]), str(r["partition_key"])) for i, r in rows.items()}
    if decision == "approve":
        results = ledger.approve(ids, by=by, note=note, via="cli")
    else:
        results = ledger.reject(ids, by=by, note=str(note), via="cli")
    _report_decisions(results, verb=verb, by=by)
    for line in observe_approval_queues(
        ledger,
        scopes=sorted(set(scopes.values())),
        by=by,
        source=f"autoexec {decision}",
    ):
        click.echo(line)


def _decision_options(fn: Any) -> Any:
    for option in reversed(
        [
            ledger_option,
            click.argument("keys", nargs=-1, metavar="[KEY]..."),
            click.option("--by", "by", required=True, help="Who decides (recorded in the ledger)."),
            click.option(
                "--playbook", "-p", default=None, help="Bulk (--where), or narrow KEY prefixes."
            ),
            click.option("--partition", "-k", default=None, help="Only this insight partition."),
            click.option(
                "--where",
                default=None,
                metavar="EXPRESSION",
                help="Decide every pending request of --playbook/--partition this holds for: "
                "pandas query syntax over the payload's fields and value, entity, step, "
                "age_hours (e.g. \"value < 1000 and supplier == 'acme'\").",
            ),
            click.option(
                "--yes", "-y", is_flag=True, help="Do not ask for confirmation (bulk decisions)."
            ),
        ]
    ):
        fn = option(fn)
    return fn


@cli.command()
@_decision_options
@click.option("--note", default=None, help="Why (recorded with the decision).")
def approve(
    ledger_url: str | None,
    keys: Sequence[str],
    by: str,
    playbook: str | None,
    partition: str | None,
    where: str | None,
    yes: bool,
    note: str | None,
) -> None:
    """Approve pending requests: KEY... (full ids or unique prefixes of 6+ characters), or every
    request of a playbook/partition a --where filter selects (asks first unless --yes).

    All or nothing: if one request cannot be approved by NAME (not listed, already decided,
    expired, not pending), none is.
    """
    _decide(
        decision="approve",
        ledger_url=ledger_url,
        keys=keys,
        by=by,
        note=note,
        playbook=playbook,
        partition=partition,
        where=where,
        yes=yes,
    )


@cli.command()
@_decision_options
@click.option("--note", required=True, help="Why (required: the requester reads it).")
def reject(
    ledger_url: str | None,
    keys: Sequence[str],
    by: str,
    playbook: str | None,
    partition: str | None,
    where: str | None,
    yes: bool,
    note: str,
) -> None:
    """Reject pending requests (one rejection rejects a request); as ``approve``, a note is
    required."""
    _decide(
        decision="reject",
        ledger_url=ledger_url,
        keys=keys,
        by=by,
        note=note,
        playbook=playbook,
        partition=partition,
        where=where,
        yes=yes,
    )


# -- the approval endpoint ---------------------------------------------------------------------


@cli.command()
@ledger_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8765,
    show_default=True,
    help="Port to listen on (0: any free port, printed at start).",
)
def serve(ledger_url: str | None, host: str, port: int) -> None:
    """Serve the signed approval links: a confirmation page per link, decided by its POST.

    The signing secret comes from $AUTOEXEC_APPROVAL_SECRET (the one the workflow signs links
    with); links point at $AUTOEXEC_APPROVAL_URL. Stops cleanly on Ctrl-C or SIGTERM.
    """
    from autoexec_dagster.approvals.links import BASE_URL_ENV, SECRET_ENV, ApprovalLinks, LinkError
    from autoexec_dagster.approvals.server import approval_app

    secret = os.environ.get(SECRET_ENV, "")
    if not secret.strip():
        fail(
            f"autoexec serve needs the link signing secret: set {SECRET_ENV} (the same value the "
            "workflow signs its approval links with)"
        )
    base_url = os.environ.get(BASE_URL_ENV, "").strip() or f"http://{host}:{port or 8765}"
    try:
        links = ApprovalLinks(base_url=base_url, secret=secret)
    except LinkError as exc:
        fail(str(exc))
    ledger = open_ledger(ledger_url)
    # Requests (paths only: tokens are capabilities) and decisions, for whoever runs the server.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    for name in ("aiohttp.access", "autoexec_dagster.approvals.server"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
    app = approval_app(ledger, links)
    try:
        asyncio.run(_serve(app, host=host, port=port, ledger=ledger))
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


async def _serve(app: Any, *, host: str, port: int, ledger: ActionLedger) -> None:
    from aiohttp import web

    from autoexec_dagster.approvals.server import QuietAccessLogger

    runner = web.AppRunner(app, access_log_class=QuietAccessLogger, shutdown_timeout=5.0)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        addresses = runner.addresses
        bound = int(addresses[0][1]) if addresses else port
        click.echo(
            f"autoexec serve: approval links on http://{host}:{bound}/approvals/... "
            f"(ledger {ledger.display_url}); Ctrl-C or SIGTERM stops it"
        )
        sys.stdout.flush()
        await stop.wait()
        click.echo("autoexec serve: stopping")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
    click.echo("autoexec serve: stopped")
