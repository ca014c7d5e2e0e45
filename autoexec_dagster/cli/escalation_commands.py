"""Working the escalation queue: approve, reject, suppress or resolve, one by one or in bulk.

::

    autoexec escalations approve KEY... --by NAME [--note TEXT]
    autoexec escalations approve --playbook P [--partition K] [--rule R] [--where EXPR]
                                 [--total COLUMN] --by NAME [--yes]
    autoexec escalations reject KEY... --by NAME --note TEXT
    autoexec escalations suppress KEY... --for 30d --by NAME --note TEXT
    autoexec escalations resolve KEY... --by NAME [--note TEXT]
    autoexec escalations suppressions --playbook P [--all] [--json]
    autoexec escalations lift ENTITY_ID... --playbook P --by NAME

Keys are full keys or unique prefixes of 6+ characters. A bulk selection takes the open
escalations of a playbook by partition, rule and an expression over their entity data; the
command shows how many match (and the total of ``--total COLUMN``) and asks before deciding,
unless ``--yes``. A decision is all or nothing: when any escalation is no longer open (someone
decided it meanwhile), or the input is bad, nothing is decided and the error says why. Every
decision is recorded with ``via=cli``.
"""

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import click
import pandas as pd

from autoexec_dagster.cli.common import (
    DEFAULT_PERSONAL_COLUMNS,
    echo_json,
    fail,
    json_option,
    ledger_option,
    open_ledger,
    records,
    table,
)
from autoexec_dagster.cli.ledger_commands import escalations, observe_escalations
from autoexec_dagster.dagster.metadata import is_personal, mask_value
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.escalations import (
    OPEN,
    EscalationDecision,
    EscalationError,
    entity_frame,
)
from autoexec_dagster.ledger.suppressions import suppression_period

_SHOWN = 20
_PREVIEW = 5


def _selection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options every deciding subcommand shares: keys or a selection, who, confirmation."""
    for option in reversed(
        [
            ledger_option,
            click.argument("keys", nargs=-1),
            click.option(
                "--playbook", "-p", default=None, help="Select from this playbook's open queue."
            ),
            click.option("--partition", "-k", default=None, help="Select: only this partition."),
            click.option("--rule", default=None, help="Select: only escalations by this rule."),
            click.option(
                "--where",
                default=None,
                metavar="EXPRESSION",
                help='Select: entity data matching, e.g. "lifetime_value >= 8000".',
            ),
            click.option(
                "--total",
                "total_column",
                default=None,
                metavar="COLUMN",
                help="Show the total of this entity data column over the selection.",
            ),
            click.option("--by", "by", required=True, help="Who decides (recorded)."),
            click.option("--yes", "-y", is_flag=True, help="Decide a selection without asking."),
        ]
    ):
        fn = option(fn)
    return fn


def _ledger(ctx: click.Context, own: str | None) -> ActionLedger:
    """The subcommand's --ledger, else the one given to ``autoexec escalations``."""
    parent = (ctx.obj or {}).get("ledger_url") if isinstance(ctx.obj, dict) else None
    return open_ledger(own or parent)


def _full_keys(ledger: ActionLedger, prefixes: Sequence[str]) -> list[str]:
    """Full keys for the keys or unique prefixes given (any status: the decision says why an
    escalation that is not open cannot be decided)."""
    short = [p for p in prefixes if len(p) < 6]
    if short:
        fail(f"give at least 6 characters of each escalation key (got {short[0]!r})")
    found = ledger.match_escalation_keys([p for p in prefixes if len(p) < 32])
    keys: list[str] = []
    for prefix in prefixes:
        if len(prefix) >= 32:
            keys.append(prefix)
            continue
        matches = found.get(prefix, [])
        if not matches:
            fail(f"no escalation has a key starting with {prefix!r}; nothing was decided")
        if len(matches) > 1:
            fail(
                f"{len(matches)}+ escalations have keys starting with {prefix!r}: "
                f"{', '.join(matches[:5])}; give more characters (nothing was decided)"
            )
        keys.append(matches[0])
    return list(dict.fromkeys(keys))


def _pick(
    ledger: ActionLedger,
    *,
    keys: Sequence[str],
    playbook: str | None,
    partition: str | None,
    rule: str | None,
    where: str | None,
    total_column: str | None,
    yes: bool,
    verb: str,
    needs_proposal: bool = False,
) -> list[str]:
    """The keys to decide: those given, or the confirmed selection. Nothing is written here."""
    selecting = any(v is not None for v in (partition, rule, where))
    if keys and selecting:
        fail("give escalation keys or a selection (--partition, --rule, --where), not both")
    if keys:
        if total_column is not None:
            fail("--total applies to a selection (--partition, --rule, --where)")
        return _full_keys(ledger, keys)
    if not selecting:
        fail(
            "give escalation keys, or select open escalations with --playbook and any of "
            "--partition, --rule, --where"
        )
    if playbook is None:
        fail("a selection needs --playbook (escalations are selected within one playbook)")
    queue = ledger.select_escalations(
        playbook=playbook, partition_key=partition, rule=rule, where=where, statuses=(OPEN,)
    )
    scope = ", ".join(
        [f"playbook {playbook}"]
        + ([f"partition {partition}"] if partition is not None else [])
        + ([f"rule {rule}"] if rule is not None else [])
        + ([f"where {where}"] if where is not None else [])
    )
    if needs_proposal:
        proposing = queue["proposed_action"].notna() & (queue["proposed_action"].astype(str) != "")
        left = int((~proposing).sum())
        queue = queue[proposing].reset_index(drop=True)
        if left:
            click.echo(
                f"{left:,} matching open escalation(s) propose no action and are left open "
                "(reject or resolve them instead)."
            )
    if queue.empty:
        fail(f"no open escalation matches ({scope}); nothing was decided")
    line = f"{len(queue):,} open escalation(s) match ({scope})"
    if total_column is not None:
        line += f"; total {total_column}: {_total(queue, total_column)}"
    click.echo(line + ".")
    data = entity_frame(queue["data"].tolist())
    for position, row in enumerate(queue.head(_PREVIEW).to_dict("records")):
        extra = ""
        if total_column is not None and total_column in data.columns:
            value = data[total_column].iloc[position]
            shown = (
                mask_value(value) if is_personal(total_column, DEFAULT_PERSONAL_COLUMNS) else value
            )
            extra = f"  {total_column}={shown}"
        proposed = row.get("proposed_action")
        click.echo(
            f"  {row['idempotency_key']}  {row['partition_key'] or '-'}  entity {row['entity_id']}"
            f"  rule {row['rule']}"
            + (f"  proposes {proposed}" if isinstance(proposed, str) and proposed else "")
            + extra
        )
    if len(queue) > _PREVIEW:
        click.echo(f"  ... and {len(queue) - _PREVIEW:,} more")
    if not yes:
        click.confirm(f"{verb} these {len(queue):,}?", abort=True)
    return queue["idempotency_key"].astype(str).tolist()


def _total(queue: pd.DataFrame, column: str) -> str:
    data = entity_frame(queue["data"].tolist())
    if column not in data.columns:
        fail(
            f"--total {column!r}: the selected escalations' data has no such column; it has "
            f"{', '.join(map(str, data.columns)) or 'none'} (nothing was decided)"
        )
    if is_personal(column, DEFAULT_PERSONAL_COLUMNS):
        fail(f"--total {column!r}: a personal column cannot be totalled")
    values = pd.to_numeric(data[column], errors="coerce")
    if values.isna().all():
        fail(f"--total {column!r}: the column is not numeric (nothing was decided)")
    return f"{float(values.sum()):,.2f}"


def _report(
    ledger: ActionLedger, decided: Sequence[EscalationDecision], *, by: str, done: str
) -> None:
    for decision in decided[:_SHOWN]:
        click.echo(decision.describe())
    if len(decided) > _SHOWN:
        click.echo(f"... and {len(decided) - _SHOWN:,} more")
    click.echo(f"{done} {len(decided):,} escalation(s) (by {decided[0].decided_by}, via cli).")
    partitions = sorted({(d.playbook, d.partition_key) for d in decided})
    lines = [
        observe_escalations(
            ledger,
            playbook=playbook,
            partition_key=partition,
            by=by,
            what=f"{done.lower()} {sum(1 for d in decided if d.partition_key == partition):,}",
            source="autoexec escalations",
        )
        for playbook, partition in partitions
    ]
    for line in dict.fromkeys(lines):
        click.echo(line)


def _decide(action: Callable[[], list[EscalationDecision]]) -> list[EscalationDecision]:
    try:
        return action()
    except EscalationError as exc:
        fail(str(exc))


@escalations.command()
@_selection_options
@click.option("--note", default=None, help="What was agreed (optional).")
@click.pass_context
def approve(
    ctx: click.Context,
    ledger_url: str | None,
    keys: Sequence[str],
    playbook: str | None,
    partition: str | None,
    rule: str | None,
    where: str | None,
    total_column: str | None,
    by: str,
    yes: bool,
    note: str | None,
) -> None:
    """Approve the proposed action of open escalations (KEY... or a selection).

    The action is reserved in the ledger with the decision and delivered, once, by the next run
    of its partition (the sensor requests it). A second approval changes nothing.
    """
    ledger = _ledger(ctx, ledger_url)
    chosen = _pick(
        ledger,
        keys=keys,
        playbook=playbook,
        partition=partition,
        rule=rule,
        where=where,
        total_column=total_column,
        yes=yes,
        verb="Approve the proposed actions of",
        needs_proposal=True,
    )
    decided = _decide(lambda: ledger.approve_escalations(chosen, by=by, note=note, via="cli"))
    _report(ledger, decided, by=by, done="Approved")


@escalations.command()
@_selection_options
@click.option("--note", required=True, help="Why (required).")
@click.pass_context
def reject(
    ctx: click.Context,
    ledger_url: str | None,
    keys: Sequence[str],
    playbook: str | None,
    partition: str | None,
    rule: str | None,
    where: str | None,
    total_column: str | None,
    by: str,
    yes: bool,
    note: str,
) -> None:
    """Reject open escalations (KEY... or a selection): their proposed action never runs."""
    ledger = _ledger(ctx, ledger_url)
    if not note.strip():
        fail("a rejection needs a note saying why (--note); nothing was decided")
    chosen = _pick(
        ledger,
        keys=keys,
        playbook=playbook,
        partition=partition,
        rule=rule,
        where=where,
        total_column=total_column,
        yes=yes,
        verb="Reject",
    )
    decided = _decide(lambda: ledger.reject_escalations(chosen, by=by, note=note, via="cli"))
    _report(ledger, decided, by=by, done="Rejected")


@escalations.command()
@_selection_options
@click.option(
    "--for",
    "period",
    required=True,
    metavar="DURATION",
    help="How long the entity gets no action and no new escalation: 30d, 12h, 2w.",
)
@click.option("--note", required=True, help="Why (required).")
@click.pass_context
def suppress(
    ctx: click.Context,
    ledger_url: str | None,
    keys: Sequence[str],
    playbook: str | None,
    partition: str | None,
    rule: str | None,
    where: str | None,
    total_column: str | None,
    by: str,
    yes: bool,
    period: str,
    note: str,
) -> None:
    """Close open escalations as suppressed and keep their entities out for a while.

    While suppressed, the playbook gives the entity no action and no new escalation: runs record
    it as skipped, naming who suppressed it and until when. Afterwards it is routed normally.
    """
    try:
        length: timedelta = suppression_period(period)
    except EscalationError as exc:
        fail(str(exc))
    if not note.strip():
        fail("a suppression needs a note saying why (--note); nothing was decided")
    ledger = _ledger(ctx, ledger_url)
    chosen = _pick(
        ledger,
        keys=keys,
        playbook=playbook,
        partition=partition,
        rule=rule,
        where=where,
        total_column=total_column,
        yes=yes,
        verb=f"Suppress for {period}",
    )
    decided = _decide(
        lambda: ledger.suppress_escalations(chosen, for_=length, by=by, note=note, via="cli")
    )
    _report(ledger, decided, by=by, done="Suppressed")


@escalations.command(name="resolve")
@_selection_options
@click.option("--note", default=None, help="What was done.")
@click.pass_context
def resolve_many(
    ctx: click.Context,
    ledger_url: str | None,
    keys: Sequence[str],
    playbook: str | None,
    partition: str | None,
    rule: str | None,
    where: str | None,
    total_column: str | None,
    by: str,
    yes: bool,
    note: str | None,
) -> None:
    """Close open escalations with a note (KEY... or a selection)."""
    ledger = _ledger(ctx, ledger_url)
    chosen = _pick(
        ledger,
        keys=keys,
        playbook=playbook,
        partition=partition,
        rule=rule,
        where=where,
        total_column=total_column,
        yes=yes,
        verb="Resolve",
    )
    decided = _decide(lambda: ledger.resolve_escalations(chosen, by=by, note=note, via="cli"))
    _report(ledger, decided, by=by, done="Resolved")


@escalations.command()
@ledger_option
@click.option("--playbook", "-p", default=None, help="Only this playbook.")
@click.option("--all", "show_all", is_flag=True, help="Also suppressions that have ended.")
@json_option
@click.pass_context
def suppressions(
    ctx: click.Context,
    ledger_url: str | None,
    playbook: str | None,
    show_all: bool,
    as_json: bool,
) -> None:
    """Entities kept out of a playbook: who suppressed them, until when, and why."""
    ledger = _ledger(ctx, ledger_url)
    rows = ledger.suppressions(playbook=playbook, active_only=not show_all)
    if as_json:
        echo_json(records(rows))
        return
    if rows.empty:
        click.echo("No " + ("" if show_all else "active ") + "suppressions.")
        return
    view = pd.DataFrame(
        {
            "playbook": rows["playbook"].astype(str),
            "entity_id": rows["entity_id"].astype(str),
            "until": pd.to_datetime(rows["until"]).dt.strftime("%Y-%m-%d %H:%M"),
            "by": rows["suppressed_by"].astype(str),
            "via": rows["via"].fillna("-").astype(str),
            "note": rows["note"].fillna("").astype(str),
        }
    )
    click.echo(table(view))


@escalations.command()
@ledger_option
@click.argument("entity_ids", nargs=-1, required=True)
@click.option("--playbook", "-p", required=True, help="The playbook the entities are kept out of.")
@click.option("--by", "by", required=True, help="Who lifts the suppression (recorded).")
@click.pass_context
def lift(
    ctx: click.Context,
    ledger_url: str | None,
    entity_ids: Sequence[str],
    playbook: str,
    by: str,
) -> None:
    """End the active suppression of ENTITY_ID... now: the next run routes them normally."""
    ledger = _ledger(ctx, ledger_url)
    try:
        lifted = ledger.lift_suppressions(
            playbook=playbook, entity_ids=list(entity_ids), by=by, via="cli"
        )
    except EscalationError as exc:
        fail(str(exc))
    missing = [e for e in entity_ids if e not in lifted]
    if not lifted:
        fail(f"no active suppression in playbook {playbook!r} for {', '.join(entity_ids)}")
    click.echo(f"Lifted the suppression of {', '.join(lifted)} in {playbook} (by {by}).")
    if missing:
        click.echo(f"Not suppressed (nothing to lift): {', '.join(missing)}.")
