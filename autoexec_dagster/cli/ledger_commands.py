"""The ledger commands: summaries, escalations, the kill switch, workflows, history."""

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import click
import pandas as pd

from autoexec_dagster.cli.common import (
    DEFAULT_PERSONAL_COLUMNS,
    cli,
    echo_json,
    fail,
    json_option,
    ledger_option,
    open_ledger,
    records,
    table,
)
from autoexec_dagster.dagster.metadata import (
    escalations_frame,
    failed_step,
    is_personal,
    last_outcome,
    mask_emails,
    mask_value,
    masked_outputs,
)
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.escalations import (
    APPROVED,
    DECIDED_STATUSES,
    EscalationError,
    approved_action_key,
    aware,
    entity_frame,
)
from autoexec_dagster.ledger.schema import ACTIVE_INSTANCE_STATES, INSTANCE_STATES


@cli.command()
@ledger_option
@click.option("--playbook", "-p", default=None, help="Only this playbook.")
@click.option("--partition", "-k", default=None, help="Only this insight partition.")
@json_option
def summary(
    ledger_url: str | None, playbook: str | None, partition: str | None, as_json: bool
) -> None:
    """Counts per decision, action and state, and the autonomy rate.

    The totals are counted like the Dagster metadata of ``<playbook>/actions`` (one ledger
    query), so both say the same: flagged, acted autonomously, cooled down, escalated, still
    open from an earlier partition, held out, skipped, failed, handed to a workflow.
    """
    ledger = open_ledger(ledger_url)
    counts = ledger.summary(playbook=playbook, partition_key=partition)
    queue = ledger.escalations(playbook=playbook, partition_key=partition, status="open")
    scopes = sorted(
        {(str(p), str(k)) for p, k in zip(counts["playbook"], counts["partition_key"], strict=True)}
    )
    outcomes = [ledger.partition_outcome(playbook=p, partition_key=k) for p, k in scopes]
    total = _sum_outcomes(outcomes)
    if as_json:
        decided = total["autonomous"] + total["escalated"] + total["failed"]
        echo_json(
            {
                "counts": records(counts),
                "partitions": [o.as_dict() for o in outcomes],
                "totals": total,
                "autonomy_rate": total["autonomous"] / decided if decided else None,
                "open_escalations": len(queue),
            }
        )
        return
    if counts.empty and queue.empty:
        click.echo("No actions recorded" + _scope(playbook, partition) + ".")
        return
    counts = counts.assign(action=counts["action"].fillna("-"))
    click.echo(table(counts))
    click.echo("")
    click.echo(_count_line("flagged", total["flagged"]))
    delivered = ", ".join(f"{n:,} {a}" for a, n in sorted(total["delivered"].items()) if n)
    click.echo(
        _count_line(
            "acted autonomously", total["autonomous"], f"({delivered})" if delivered else ""
        )
    )
    if total["cooled_down"]:
        click.echo(
            _count_line(
                "  of which cooled down",
                total["cooled_down"],
                "(not repeated: the same action was delivered recently, within the playbook's "
                "cooldown_days)",
            )
        )
    if total["over_budget"]:
        click.echo(
            _count_line(
                "  of which over a budget",
                total["over_budget"],
                "(not sent: a budget of the playbook was spent; the ledger's detail names it)",
            )
        )
    click.echo(_count_line("escalated to a person", total["escalated"]))
    if total["still_open"]:
        origins = ", ".join(f"{n:,} from {k}" for k, n in sorted(total["still_open_by"].items()))
        click.echo(
            _count_line(
                "still open from earlier", total["still_open"], f"(not escalated again: {origins})"
            )
        )
    if total["workflows"]:
        click.echo(
            _count_line(
                "handed to a workflow",
                total["workflows"],
                f"({total['workflows_succeeded']:,} finished every step, "
                f"{total['workflows_active']:,} still under way: autoexec workflows)",
            )
        )
    for label, key in (
        ("held out (control group)", "held_out"),
        ("skipped (no rule matched)", "skipped"),
        ("failed", "failed"),
        ("dry run", "dry_run"),
        ("pending (not sent yet)", "pending"),
    ):
        if total[key] or key in ("held_out", "skipped", "failed"):
            click.echo(_count_line(label, total[key]))
    decided = total["autonomous"] + total["escalated"] + total["failed"]
    click.echo("")
    if decided:
        click.echo(
            f"Autonomy rate: {total['autonomous'] / decided:.1%} ({total['autonomous']:,} of "
            f"{decided:,} flagged entities handled without a person; holdouts and entities "
            "still open from an earlier partition excluded)"
        )
    else:
        click.echo("Autonomy rate: n/a (nothing flagged yet)")
    click.echo(f"Open escalations: {len(queue):,}")


def _count_line(label: str, value: int, note: str = "") -> str:
    return f"  {label:<28}{value:>8,}" + (f"  {note}" if note else "")


def _sum_outcomes(outcomes: Sequence[Any]) -> dict[str, Any]:
    keys = ("flagged", "autonomous", "cooled_down", "over_budget", "escalated", "still_open")
    keys += ("held_out",)
    keys += ("skipped", "failed", "dry_run", "pending")
    keys += ("workflows", "workflows_succeeded", "workflows_active")
    total: dict[str, Any] = {k: sum(int(getattr(o, k)) for o in outcomes) for k in keys}
    delivered: dict[str, int] = {}
    still_open_by: dict[str, int] = {}
    for outcome in outcomes:
        for action, tally in outcome.by_action.items():
            n = tally.get("succeeded", 0) + tally.get("dry_run", 0)
            delivered[action] = delivered.get(action, 0) + n
        for origin, n in outcome.still_open_by_partition.items():
            still_open_by[origin] = still_open_by.get(origin, 0) + n
    total["delivered"] = delivered
    total["still_open_by"] = still_open_by
    return total


def _scope(playbook: str | None, partition: str | None) -> str:
    parts = [f"playbook {playbook!r}"] if playbook else []
    if partition:
        parts.append(f"partition {partition!r}")
    return (" for " + ", ".join(parts)) if parts else ""


_LIST_STATUSES = ("open", "approved", "rejected", "suppressed", "resolved", "decided", "all")


@cli.group(invoke_without_command=True)
@ledger_option
@click.option("--playbook", "-p", default=None, help="The playbook whose queue to show.")
@click.option("--partition", "-k", default=None, help="Only this insight partition.")
@click.option(
    "--status",
    type=click.Choice(_LIST_STATUSES),
    default="open",
    show_default=True,
    help="decided: approved, rejected, suppressed or resolved.",
)
@click.option("--rule", default=None, help="Only escalations by this rule.")
@click.option(
    "--where",
    default=None,
    metavar="EXPRESSION",
    help='Only escalations whose entity data matches, e.g. "lifetime_value >= 8000".',
)
@click.option(
    "--sort",
    default=None,
    metavar="COLUMN",
    help="Sort by an entity data column (lifetime_value) or a ledger column (created_at, "
    "decided_at, partition, rule, ...); a leading '-' sorts largest first (--sort=-COLUMN).",
)
@click.option("--desc", is_flag=True, help="Sort largest first.")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--show-personal",
    is_flag=True,
    help="Show personal columns (email, name, phone, address, and any --mask column) unmasked.",
)
@click.option(
    "--mask",
    "extra_masked",
    multiple=True,
    metavar="COLUMN",
    help="Also mask this column of the entity data (repeatable).",
)
@json_option
@click.option(
    "--csv", "as_csv", is_flag=True, help="Print CSV, one column per entity data field (masked)."
)
@click.pass_context
def escalations(
    ctx: click.Context,
    ledger_url: str | None,
    playbook: str | None,
    partition: str | None,
    status: str,
    rule: str | None,
    where: str | None,
    sort: str | None,
    desc: bool,
    limit: int,
    show_personal: bool,
    extra_masked: Sequence[str],
    as_json: bool,
    as_csv: bool,
) -> None:
    """The escalation queue: why each entity needs a person, with its data, and the decisions.

    A failed workflow's escalation also shows its evidence: the step that failed, its error and
    the outputs of the steps before it. Decided escalations show who decided, when, how and the
    note. Decide with the subcommands (approve, reject, suppress, resolve), one by one or in bulk.
    """
    ctx.ensure_object(dict)["ledger_url"] = ledger_url
    if ctx.invoked_subcommand is not None:
        return
    if playbook is None:
        raise click.UsageError("Missing option '--playbook' / '-p'.")
    if as_json and as_csv:
        fail("choose one of --json and --csv")
    descending = desc
    if sort is not None and sort.startswith("-"):
        sort, descending = sort[1:], True
    ledger = open_ledger(ledger_url)
    statuses = {"all": None, "decided": DECIDED_STATUSES}.get(status, (status,))
    queue = ledger.select_escalations(
        playbook=playbook,
        partition_key=partition,
        rule=rule,
        where=where,
        statuses=statuses,
        sort=sort or None,
        descending=descending,
        limit=limit,
    )
    masked = () if show_personal else (*DEFAULT_PERSONAL_COLUMNS, *extra_masked)
    approved = queue.loc[queue["status"] == APPROVED, "idempotency_key"].astype(str).tolist()
    action_states = ledger.approved_action_states(approved) if approved else {}
    if as_json:
        echo_json(
            [
                _escalation_record(row, masked=masked, action_states=action_states)
                for row in queue.to_dict("records")
            ]
        )
        return
    if as_csv:
        click.echo(_escalations_csv(queue, masked=masked, action_states=action_states), nl=False)
        return
    if queue.empty:
        click.echo(
            f"No {'' if status == 'all' else status + ' '}escalations"
            + _scope(playbook, partition)
            + "."
        )
        return
    if show_personal:
        view = escalations_frame(queue, personal_columns=())
        view["data"] = [_raw_data(raw) for raw in queue["data"]]
    else:
        view = escalations_frame(queue, personal_columns=(*DEFAULT_PERSONAL_COLUMNS, *extra_masked))
    view.insert(4, "status", queue["status"].astype(str))
    view["full_key"] = queue["idempotency_key"].astype(str).to_numpy()
    view["created"] = pd.to_datetime(queue["created_at"]).dt.strftime("%Y-%m-%d %H:%M")
    sources = queue.to_dict("records")
    for position, (_, row) in enumerate(view.iterrows()):
        source = sources[position]
        origin = f"rule {row['rule']}" if row["kind"] == "rule" else f"{row['kind']}"
        click.echo(
            f"{row['key']}  [{row['status']}]  {row['partition'] or '-'}  entity {row['entity_id']}"
            f"  ({origin}, {row['created']})"
        )
        click.echo(f"    reason: {row['reason'] if show_personal else mask_emails(row['reason'])}")
        if row["data"]:
            click.echo(f"    data:   {row['data']}")
        proposed = _text(source.get("proposed_action"))
        if proposed:
            state = action_states.get(row["full_key"])
            click.echo(f"    proposes: {proposed}" + (f" (action {state})" if state else ""))
        decided = _decision_line(source, masked=bool(masked))
        if decided:
            click.echo(f"    decided: {decided}")
        evidence = _evidence(queue.loc[queue["idempotency_key"] == row["full_key"], "data"])
        if evidence is not None:
            step, error, outputs = evidence
            click.echo(f"    failed: step {step}: {mask_emails(error) if masked else error}")
            shown_outputs = masked_outputs(
                outputs, personal_columns=masked, max_chars=400, emails=bool(masked)
            )
            if shown_outputs:
                click.echo(f"    steps:  {shown_outputs}")
    shown = len(view)
    click.echo("")
    click.echo(
        f"{shown} escalation(s) shown"
        + (f" (--limit {limit} reached)" if shown == limit else "")
        + ". Decide with: autoexec escalations approve|reject|suppress|resolve KEY --by NAME "
        "(or autoexec resolve KEY --by NAME [--note TEXT])"
    )


def _text(value: Any) -> str:
    """A ledger text value, or "" for null (pandas reads NULL as None or NaN)."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def _decision_line(row: Mapping[Any, Any], *, masked: bool) -> str:
    """``approved by ana via cli at 2026-12-01 10:00 UTC: note`` for a decided escalation."""
    if str(row.get("status")) == "open":
        return ""
    who = _text(row.get("resolved_by"))
    via = _text(row.get("decided_via"))
    when = aware(row.get("resolved_at"))
    note = _text(row.get("resolution"))
    return (
        str(row.get("status"))
        + (f" by {who}" if who else "")
        + (f" via {via}" if via else "")
        + (f" at {when:%Y-%m-%d %H:%M} UTC" if when is not None else "")
        + (f": {mask_emails(note) if masked else note}" if note else "")
    )


def _escalations_csv(
    queue: pd.DataFrame, *, masked: Sequence[str], action_states: Mapping[str, str]
) -> str:
    """The queue as CSV: ledger columns, then one column per entity data field (masked)."""
    data = entity_frame(queue["data"].tolist())
    data = data.drop(
        columns=[c for c in data.columns if c in ("entity_id", "evidence", "outputs")],
        errors="ignore",
    )
    for column in data.columns:
        if is_personal(str(column), masked):
            data[column] = [mask_value(v) for v in data[column]]
    keys = queue["idempotency_key"].astype(str)
    out = pd.DataFrame(
        {
            "key": keys,
            "status": queue["status"].astype(str),
            "playbook": queue["playbook"].astype(str),
            "partition": queue["partition_key"].astype(str),
            "entity_id": queue["entity_id"].astype(str),
            "kind": queue["kind"].astype(str),
            "rule": queue["rule"].astype(str),
            "reason": [mask_emails(str(r)) if masked else str(r) for r in queue["reason"]],
            "proposed_action": [_text(v) for v in queue["proposed_action"]],
            "action_state": [action_states.get(k, "") for k in keys],
            "created_at": [_iso(v) for v in queue["created_at"]],
            "decided_by": [_text(v) for v in queue["resolved_by"]],
            "decided_at": [_iso(v) for v in queue["resolved_at"]],
            "decided_via": [_text(v) for v in queue["decided_via"]],
            "note": [mask_emails(_text(v)) if masked else _text(v) for v in queue["resolution"]],
        }
    )
    data.columns = [f"data.{c}" if c in out.columns else str(c) for c in data.columns]
    return pd.concat([out, data.reset_index(drop=True)], axis=1).to_csv(index=False)


def _iso(value: Any) -> str:
    when = aware(value)
    return when.isoformat() if when is not None else ""


def _evidence(raw: pd.Series) -> tuple[str, str, Any] | None:
    """``(failed step, error, outputs)`` of a failed workflow's escalation data, else None."""
    if raw.empty:
        return None
    try:
        data = json.loads(raw.iloc[0]) if isinstance(raw.iloc[0], str) else raw.iloc[0]
    except ValueError:
        return None
    if not isinstance(data, dict) or "evidence" not in data:
        return None
    step, error = failed_step(data.get("evidence"))
    return step, error, data.get("outputs")


def _escalation_record(
    row: Mapping[Any, Any],
    *,
    masked: Sequence[str],
    action_states: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    frame = escalations_frame(pd.DataFrame([dict(row)]), personal_columns=masked)
    note = _text(row.get("resolution")) or None
    record: dict[str, Any] = {
        "key": row["idempotency_key"],
        "status": row["status"],
        "playbook": row["playbook"],
        "partition": row["partition_key"],
        "entity_id": row["entity_id"],
        "kind": row["kind"],
        "rule": row["rule"],
        "reason": mask_emails(str(row["reason"])) if masked else row["reason"],
        "data": frame["data"].iloc[0] if masked else _raw_data(row["data"]),
        "created_at": row["created_at"],
        "resolved_at": row.get("resolved_at"),
        "resolved_by": row.get("resolved_by"),
        "resolution": row.get("resolution"),
        "proposed_action": _text(row.get("proposed_action")) or None,
        "decided_by": _text(row.get("resolved_by")) or None,
        "decided_at": row.get("resolved_at"),
        "decided_via": _text(row.get("decided_via")) or None,
        "note": (mask_emails(note) if masked and note else note),
    }
    if action_states is not None and row["status"] == APPROVED:
        record["action_key"] = approved_action_key(str(row["idempotency_key"]))
        record["action_state"] = action_states.get(str(row["idempotency_key"]))
    evidence = _evidence(pd.Series([row["data"]]))
    if evidence is not None:
        step, error, outputs = evidence
        record["failed_step"] = step
        record["error"] = mask_emails(error) if masked else error
        record["outputs"] = masked_outputs(
            outputs, personal_columns=masked, max_chars=2_000, emails=bool(masked)
        )
    return record


def _raw_data(raw: Any) -> str:
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return str(raw)
    if isinstance(data, dict):
        return ", ".join(f"{k}={v}" for k, v in data.items() if k != "entity_id")
    return str(data)


def _match_key(ledger: ActionLedger, prefix: str) -> str:
    """The full key of the open escalation a (unique) prefix names."""
    if len(prefix) >= 32:
        return prefix
    if len(prefix) < 6:
        fail("give at least 6 characters of the escalation key")
    queue = ledger.escalations(status="open")
    matches = [k for k in queue["idempotency_key"].astype(str) if k.startswith(prefix)]
    if not matches:
        fail(f"no open escalation has a key starting with {prefix!r}")
    if len(matches) > 1:
        fail(
            f"{len(matches)} open escalations have keys starting with {prefix!r}: "
            f"{', '.join(matches[:5])}; give more characters"
        )
    return matches[0]


@cli.command()
@ledger_option
@click.argument("key")
@click.option("--by", "by", required=True, help="Who resolved it (recorded in the ledger).")
@click.option("--note", default="", help="What was done.")
def resolve(ledger_url: str | None, key: str, by: str, note: str) -> None:
    """Close the open escalation KEY (its full key, or a unique prefix of 6+ characters)."""
    ledger = open_ledger(ledger_url)
    full = _match_key(ledger, key)
    try:
        (decided,) = ledger.resolve_escalations([full], by=by, note=note, via="cli")
    except EscalationError as exc:
        fail(f"no open escalation with key {full!r} ({exc})")
    click.echo(f"Resolved {full} (by {decided.decided_by}).")
    click.echo(
        observe_escalations(
            ledger, playbook=decided.playbook, partition_key=decided.partition_key, by=by
        )
    )


def observe_escalations(
    ledger: ActionLedger,
    *,
    playbook: str,
    partition_key: str,
    by: str,
    what: str = "resolved one",
    source: str = "autoexec resolve",
) -> str:
    """Record the partition's current queue on the Dagster instance, as a runless observation.

    The ``<playbook>/escalations`` asset was materialized by the last run; once a person works
    the queue outside a run, that materialization is stale. An ``AssetObservation`` with the
    open counts makes the UI show the queue as it is now.

    Args:
        ledger: The action ledger.
        playbook: The playbook whose queue changed.
        partition_key: The partition ("" when unpartitioned).
        by: Who changed it.
        what: What they did, for the observation's description ("approved 3").
        source: The command that changed it.

    Returns:
        One line for the person: what was recorded, or why nothing was.
    """
    if not os.environ.get("DAGSTER_HOME", "").strip():
        return (
            "DAGSTER_HOME is not set, so the Dagster UI was not told: its "
            f"{playbook}/escalations asset shows the queue of the last run until the next one "
            "(set DAGSTER_HOME to the instance folder, e.g. .dagster_home, to update it now)."
        )
    import dagster as dg

    counts = ledger.open_escalation_counts(playbook=playbook, partition_key=partition_key)
    by_kind: dict[str, int] = {}
    for kind, _reason, n in counts:
        by_kind[kind] = by_kind.get(kind, 0) + n
    open_now = sum(by_kind.values())
    metadata: dict[str, Any] = {
        "open": open_now,
        **{f"open_{kind}": n for kind, n in sorted(by_kind.items())},
        "changed_by": by,
        "source": source,
    }
    try:
        with dg.DagsterInstance.get() as instance:
            instance.report_runless_asset_event(
                dg.AssetObservation(
                    asset_key=dg.AssetKey([playbook, "escalations"]),
                    partition=partition_key or None,
                    metadata=metadata,
                    description=f"{open_now:,} escalation(s) open after {by} {what}",
                )
            )
    except Exception as exc:  # the ledger is the record; the UI note is a courtesy
        return f"The Dagster instance could not be updated ({type(exc).__name__}: {exc})."
    where = f"{playbook}/escalations" + (f" [{partition_key}]" if partition_key else "")
    return f"Dagster UI: {where} now shows {open_now:,} open (recorded as an observation)."


@cli.command()
@ledger_option
@click.option("--playbook", "-p", default=None, help="Pause only this playbook (default: all).")
@click.option("--reason", required=True, help="Why; shown to anyone whose run is stopped.")
@click.option("--by", "by", required=True, help="Who paused.")
def pause(ledger_url: str | None, playbook: str | None, reason: str, by: str) -> None:
    """Stop a playbook (or every playbook) before its next action."""
    ledger = open_ledger(ledger_url, must_exist=False)
    if playbook is not None:
        known = ledger.known_playbooks()
        if playbook not in known:
            # A typo would otherwise "pause" a name no run checks, and the real playbook runs on.
            fail(
                f"the ledger has never seen playbook {playbook!r}, so pausing it would stop "
                f"nothing; known playbooks: {', '.join(known) or 'none yet'} (omit --playbook "
                "to pause every playbook)"
            )
    ledger.pause(playbook or "*", reason=reason, by=by)
    target = f"playbook {playbook!r}" if playbook else "every playbook"
    click.echo(
        f"Paused {target}: {reason} (by {by}). Running batches stop before their next action."
    )


@cli.command()
@ledger_option
@click.option("--playbook", "-p", default=None, help="Resume only this playbook (default: all).")
@click.option("--by", "by", required=True, help="Who resumed.")
def resume(ledger_url: str | None, playbook: str | None, by: str) -> None:
    """Lift a pause set with ``autoexec pause``."""
    ledger = open_ledger(ledger_url)
    scope = playbook or "*"
    controls = ledger.controls()
    paused = controls[(controls["scope"] == scope) & controls["paused"].astype(bool)]
    if paused.empty:
        fail(
            f"{'playbook ' + repr(playbook) if playbook else 'the global switch'} is not paused"
            + (f"; still paused: {still}" if (still := _still_paused(controls, scope)) else "")
        )
    ledger.resume(scope, by=by)
    target = f"playbook {playbook!r}" if playbook else "every playbook"
    still = _still_paused(ledger.controls(), None)
    click.echo(
        f"Resumed {target} (by {by})."
        + (f" Still paused: {still}." if still else "")
        + " Partitions the pause interrupted are requested again by the sensor."
    )


def _still_paused(controls: pd.DataFrame, exclude: str | None) -> str:
    active = [
        str(s)
        for s, p in zip(controls["scope"], controls["paused"], strict=True)
        if bool(p) and s != exclude
    ]
    if not active:
        return ""
    return ", ".join("every playbook (*)" if s == "*" else repr(s) for s in active)


@cli.command()
@ledger_option
@json_option
def status(ledger_url: str | None, as_json: bool) -> None:
    """The kill switch: which playbooks are paused, by whom and why."""
    ledger = open_ledger(ledger_url)
    controls = ledger.controls()
    active = controls[controls["paused"].astype(bool)] if not controls.empty else controls
    if as_json:
        echo_json(
            {
                "ledger": ledger.display_url,
                "paused": [
                    {
                        "scope": row["scope"],
                        "by": row["updated_by"],
                        "reason": row["reason"],
                        "since": row["updated_at"],
                    }
                    for row in active.to_dict("records")
                ],
            }
        )
        return
    if active.empty:
        click.echo(f"No pause is set: every playbook may run. (ledger: {ledger.display_url})")
        return
    for row in active.itertuples(index=False):
        target = "every playbook" if row.scope == "*" else f"playbook {row.scope!r}"
        when = pd.Timestamp(row.updated_at).strftime("%Y-%m-%d %H:%M")  # type: ignore[arg-type]
        click.echo(f"PAUSED {target} by {row.updated_by} at {when}: {row.reason}")


@cli.command()
@ledger_option
@click.option("--playbook", "-p", required=True, help="The playbook whose workflows to list.")
@click.option("--partition", "-k", default=None, help="Only this insight partition.")
@click.option(
    "--state",
    "states",
    type=click.Choice(list(INSTANCE_STATES)),
    multiple=True,
    help="Only instances in this state (repeatable; default: all).",
)
@click.option("--limit", "-n", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--show-personal", is_flag=True, help="Show personal output fields unmasked.")
@json_option
def workflows(
    ledger_url: str | None,
    playbook: str,
    partition: str | None,
    states: Sequence[str],
    limit: int,
    show_personal: bool,
    as_json: bool,
) -> None:
    """Workflow instances: where each entity's workflow is, what it last did, when it is due."""
    ledger = open_ledger(ledger_url)
    rows = ledger.instances(
        playbook=playbook, partition_key=partition, states=states or None, limit=limit
    )
    masked = () if show_personal else DEFAULT_PERSONAL_COLUMNS
    view = pd.DataFrame(
        {
            "instance": rows["instance_id"].astype(str),
            "partition": rows["partition_key"].astype(str),
            "entity_id": rows["entity_id"].astype(str),
            "workflow": rows["workflow"].astype(str),
            "state": rows["state"].astype(str),
            "step": rows["step"].fillna("-").astype(str),
            "attempt": rows["attempt"],
            "next_due": rows["next_due"],
            "last_outcome": [last_outcome(v) for v in rows["log"]],
            "outputs": [
                masked_outputs(v, personal_columns=masked, max_chars=2_000, emails=bool(masked))
                for v in rows["outputs"]
            ],
            "error": rows["error"],
            "cancelled_by": rows["cancelled_by"],
            "cancel_reason": rows["cancel_reason"],
            "created_at": rows["created_at"],
            "finished_at": rows["finished_at"],
        }
    )
    if as_json:
        echo_json(records(view))
        return
    if view.empty:
        what = "/".join(states) + " " if states else ""
        click.echo(f"No {what}workflow instances" + _scope(playbook, partition) + ".")
        return
    counts = view["state"].value_counts()
    click.echo(
        ", ".join(f"{n:,} {state}" for state, n in counts.items()) + _scope(playbook, partition)
    )
    click.echo("")
    for row in view.to_dict("records"):
        due = (
            f", due {pd.Timestamp(row['next_due']):%Y-%m-%d %H:%M:%S}"
            if row["state"] in ACTIVE_INSTANCE_STATES and not pd.isna(row["next_due"])
            else ""
        )
        click.echo(
            f"{row['instance'][:16]}  [{row['state']}]  {row['partition'] or '-'}  entity "
            f"{row['entity_id']}  {row['workflow']} at {row['step']} (attempt {row['attempt']}"
            f"{due})"
        )
        if row["last_outcome"]:
            click.echo(f"    last:    {row['last_outcome']}")
        if row["outputs"]:
            shown = row["outputs"]
            click.echo(f"    outputs: {shown if len(shown) <= 160 else shown[:159] + '…'}")
        if isinstance(row["error"], str) and row["error"]:
            click.echo(f"    error:   {mask_emails(row['error']) if masked else row['error']}")
        if isinstance(row["cancelled_by"], str) and row["cancelled_by"]:
            click.echo(f"    cancelled by {row['cancelled_by']}: {row['cancel_reason']}")
    click.echo("")
    click.echo(
        f"{len(view)} instance(s) shown"
        + (f" (--limit {limit} reached)" if len(view) == limit else "")
        + ". History of one entity: autoexec history ENTITY_ID; stop one: autoexec cancel "
        "INSTANCE_ID --by NAME --reason TEXT"
    )


@cli.command()
@ledger_option
@click.argument("entity_id")
@click.option("--playbook", "-p", default=None, help="Only this playbook.")
@click.option("--show-personal", is_flag=True, help="Show personal fields unmasked.")
@json_option
def history(
    ledger_url: str | None,
    entity_id: str,
    playbook: str | None,
    show_personal: bool,
    as_json: bool,
) -> None:
    """Everything the ledger holds about ENTITY_ID, across partitions, oldest first.

    Every action and workflow step attempt with its outcome and output, every workflow instance
    with its step log, and every escalation.
    """
    ledger = open_ledger(ledger_url)
    found = ledger.entity_history(entity_id, playbook=playbook)
    masked = () if show_personal else DEFAULT_PERSONAL_COLUMNS
    actions, instances, cases = found["actions"], found["workflows"], found["escalations"]
    if as_json:
        echo_json(
            {
                "entity_id": entity_id,
                "actions": [
                    {
                        **{
                            k: row[k]
                            for k in (
                                "idempotency_key",
                                "playbook",
                                "partition_key",
                                "rule",
                                "decision",
                                "action",
                                "instance_id",
                                "step",
                                "state",
                                "attempts",
                                "detail",
                                "run_id",
                                "created_at",
                                "completed_at",
                            )
                        },
                        "output": _masked_output(row.get("output"), masked),
                        "error": _mask_text(row.get("error"), masked),
                    }
                    for row in actions.to_dict("records")
                ],
                "workflows": [
                    {
                        **{
                            k: row[k]
                            for k in (
                                "instance_id",
                                "playbook",
                                "partition_key",
                                "workflow",
                                "state",
                                "step",
                                "attempt",
                                "next_due",
                                "cancelled_by",
                                "cancel_reason",
                                "created_at",
                                "finished_at",
                            )
                        },
                        "outputs": masked_outputs(
                            row["outputs"],
                            personal_columns=masked,
                            max_chars=4_000,
                            emails=bool(masked),
                        ),
                        "log": _loads_list(row["log"]),
                        "error": _mask_text(row.get("error"), masked),
                    }
                    for row in instances.to_dict("records")
                ],
                "escalations": [
                    _escalation_record(row, masked=masked) for row in cases.to_dict("records")
                ],
            }
        )
        return
    if actions.empty and instances.empty and cases.empty:
        click.echo(
            f"The ledger holds nothing about entity {entity_id!r}" + _scope(playbook, None) + "."
        )
        return
    click.echo(f"Entity {entity_id}" + _scope(playbook, None) + ":")
    click.echo("")
    click.echo(f"Actions and steps ({len(actions):,}):")
    for row in actions.to_dict("records"):
        if isinstance(row.get("step"), str) and row["step"]:
            what = f"step {row['step']} ({row['action']})"
        elif row["decision"] == "workflow":
            what = "handed to a workflow"
        else:
            action = row["action"] if isinstance(row["action"], str) else ""
            what = f"{row['decision']} {action}".rstrip()
        when = pd.Timestamp(row["created_at"]).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(
            f"  {when}  {row['partition_key'] or '-'}  {what}: {row['state']}"
            f" (attempts {row['attempts']}, rule {row['rule']})"
        )
        output = _masked_output(row.get("output"), masked)
        if output:
            click.echo(f"      output: {output}")
        error = _mask_text(row.get("error"), masked)
        if error:
            click.echo(f"      error:  {error}")
    if not instances.empty:
        click.echo("")
        click.echo(f"Workflows ({len(instances):,}):")
        for row in instances.to_dict("records"):
            click.echo(
                f"  {row['instance_id'][:16]}  {row['partition_key'] or '-'}  {row['workflow']}: "
                f"{row['state']}" + (f" at {row['step']}" if isinstance(row["step"], str) else "")
            )
            for entry in _loads_list(row["log"]):
                click.echo(
                    f"      {entry.get('at', '')[:19]}  {entry.get('step')}: {entry.get('outcome')}"
                    f" (attempt {entry.get('attempt')}) {mask_emails(str(entry.get('detail', '')))}"
                )
            if isinstance(row.get("cancelled_by"), str) and row["cancelled_by"]:
                click.echo(f"      cancelled by {row['cancelled_by']}: {row['cancel_reason']}")
    if not cases.empty:
        click.echo("")
        click.echo(f"Escalations ({len(cases):,}):")
        for row in cases.to_dict("records"):
            record = _escalation_record(row, masked=masked)
            click.echo(
                f"  {record['key'][:16]}  [{record['status']}]  {record['partition'] or '-'}  "
                f"{record['kind']}: {record['reason']}"
            )
            if record.get("failed_step"):
                click.echo(f"      failed: step {record['failed_step']}: {record['error']}")
            if record.get("resolved_by"):
                click.echo(f"      resolved by {record['resolved_by']}: {record['resolution']}")


def _loads_list(raw: Any) -> list[dict[str, Any]]:
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return []
    return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []


def _masked_output(raw: Any, masked: Sequence[str]) -> str:
    """One step attempt's output (JSON text), masked like an instance's outputs."""
    if not isinstance(raw, str) or not raw:
        return ""
    try:
        data = json.loads(raw)
    except ValueError:
        return mask_emails(raw) if masked else raw
    if not isinstance(data, dict):
        return mask_emails(str(data)) if masked else str(data)
    # masked_outputs reads {step: output}; strip the placeholder step name again.
    line = masked_outputs({"": data}, personal_columns=masked, max_chars=2_000, emails=bool(masked))
    return ", ".join(part.removeprefix(".") for part in line.split(", "))


def _mask_text(raw: Any, masked: Sequence[str]) -> str:
    if not isinstance(raw, str) or not raw:
        return ""
    return mask_emails(raw) if masked else raw


@cli.command()
@ledger_option
@click.argument("instance_ids", nargs=-1, required=True, metavar="INSTANCE_ID...")
@click.option("--by", "by", required=True, help="Who cancels (recorded in the ledger).")
@click.option("--reason", required=True, help="Why (recorded in the ledger).")
def cancel(ledger_url: str | None, instance_ids: Sequence[str], by: str, reason: str) -> None:
    """Stop running or waiting workflow instances (full ids, or unique prefixes of 8+ characters).

    Nothing is cancelled unless every id names exactly one instance that is still active.
    """
    if not reason.strip():
        fail("--reason is empty; say why the instances are cancelled")
    ledger = open_ledger(ledger_url)
    short = [i for i in instance_ids if len(i) < 8]
    if short:
        fail(f"give at least 8 characters of each instance id: {', '.join(short)}")
    found = ledger.find_instances(list(dict.fromkeys(instance_ids)))
    problems: list[str] = []
    chosen: dict[str, dict[Any, Any]] = {}
    for given, matches in found.items():
        if matches.empty:
            problems.append(f"{given}: no workflow instance has this id")
        elif len(matches) > 1:
            problems.append(
                f"{given}: {len(matches)}{'+' if len(matches) >= 10 else ''} instances start "
                "with it; give more characters"
            )
        else:
            row = matches.iloc[0].to_dict()
            if row["state"] not in ACTIVE_INSTANCE_STATES:
                finished = row.get("finished_at")
                when = (
                    f" at {pd.Timestamp(finished):%Y-%m-%d %H:%M:%S}"
                    if finished is not None and not pd.isna(finished)
                    else ""
                )
                by_whom = (
                    f" by {row['cancelled_by']}" if isinstance(row.get("cancelled_by"), str) else ""
                )
                problems.append(
                    f"{given}: instance {row['instance_id']} (entity {row['entity_id']}) already "
                    f"ended {row['state']}{by_whom}{when}; only running or waiting instances "
                    "can be cancelled"
                )
            else:
                chosen[str(row["instance_id"])] = row
    if problems:
        fail("nothing cancelled:\n  " + "\n  ".join(problems))
    done = set(ledger.cancel_instances(list(chosen), by=by, reason=reason))
    for instance_id, row in chosen.items():
        if instance_id in done:
            click.echo(
                f"Cancelled {instance_id} (entity {row['entity_id']}, {row['workflow']} at "
                f"{row['step']}) by {by}: {reason}"
            )
        else:
            click.echo(f"Not cancelled {instance_id}: it ended meanwhile.")
    if len(done) < len(chosen):
        sys.exit(1)
