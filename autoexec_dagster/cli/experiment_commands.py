"""``autoexec experiments``: what each experiment is doing, and the record of its decisions."""

import click
import pandas as pd

from autoexec_dagster.cli.common import (
    cli,
    echo_json,
    fail,
    json_option,
    ledger_option,
    open_ledger,
    plain,
    table,
)


def _weights(weights: dict[str, float]) -> str:
    return ", ".join(f"{v} {w:.0%}" for v, w in weights.items())


@cli.group(invoke_without_command=True)
@ledger_option
@click.option("--playbook", "-p", default=None, help="Only this playbook's experiments.")
@json_option
@click.pass_context
def experiments(
    ctx: click.Context, ledger_url: str | None, playbook: str | None, as_json: bool
) -> None:
    """List experiments: status, winner, the weights in force and who is assigned where.

    The figures (rates, intervals, P(best)) come from the playbook's outcomes: see the
    ``<playbook>/experiment`` asset, or ``update_experiment`` in Python.
    """
    if ctx.invoked_subcommand is not None:
        return
    ledger = open_ledger(ledger_url)
    states = ledger.experiment_states(playbook)
    rows = []
    for state in states:
        counts = ledger.assignment_counts(state.playbook, state.experiment)
        rows.append(
            {
                "playbook": state.playbook,
                "experiment": state.experiment,
                "action": state.action,
                "status": state.status,
                "winner": state.winner or "",
                "weights": state.weights,
                "weights_reason": state.weights_reason or "",
                "variants": state.variant_status,
                "assigned": counts,
                "started_at": state.started_at,
                "decided_at": state.decided_at,
            }
        )
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(
            "No experiment has started" + (f" in playbook {playbook!r}." if playbook else ".")
        )
        return
    view = pd.DataFrame(
        [
            {
                "playbook": r["playbook"],
                "experiment": r["experiment"],
                "action": r["action"],
                "status": r["status"],
                "winner": r["winner"],
                "weights": _weights(r["weights"]),
                "assigned": ", ".join(f"{v} {n:,}" for v, n in r["assigned"].items()),
                "started": f"{r['started_at']:%Y-%m-%d %H:%M}",
                "decided": f"{r['decided_at']:%Y-%m-%d %H:%M}" if r["decided_at"] else "",
            }
            for r in rows
        ]
    )
    click.echo(table(view))
    for r in rows:
        stopped = [v for v, s in r["variants"].items() if s not in ("live", "promoted")]
        line = f"{r['experiment']}: {r['weights_reason']}"
        if stopped:
            out = ", ".join(f"{v} ({r['variants'][v]})" for v in stopped)
            line += f"; out: {out}"
        click.echo(line)


@experiments.command("history")
@ledger_option
@click.argument("experiment")
@click.option("--playbook", "-p", required=True, help="The playbook that runs it.")
@json_option
def history(ledger_url: str | None, experiment: str, playbook: str, as_json: bool) -> None:
    """Every decision recorded for EXPERIMENT, oldest first: start, each period's weights,
    guardrail stops, approvals asked and decided, the promotion and what was archived."""
    ledger = open_ledger(ledger_url)
    if ledger.experiment_state(playbook, experiment) is None:
        known = [s.experiment for s in ledger.experiment_states(playbook)]
        fail(
            f"playbook {playbook!r} has no experiment {experiment!r}; it has "
            f"{', '.join(known) or 'none'}"
        )
    events = ledger.experiment_events(playbook, experiment)
    if as_json:
        echo_json([plain(e) for e in events])
        return
    for event in events:
        variant = f" [{event['variant']}]" if event["variant"] else ""
        click.echo(f"{event['at']:%Y-%m-%d %H:%M}  {event['kind']:<20}{variant} {event['detail']}")
