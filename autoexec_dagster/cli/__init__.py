"""``autoexec``: the action ledger for people, from a terminal.

::

    autoexec summary [--playbook P] [--partition K]     counts per decision/state, autonomy rate
    autoexec escalations --playbook P [--partition K] [--status open|resolved|all] [--limit N]
    autoexec resolve KEY --by NAME [--note TEXT]        close an escalation (or a unique prefix)
    autoexec workflows --playbook P [--partition K] [--state waiting|failed|...] [--limit N]
    autoexec history ENTITY_ID [--playbook P]           every action, step, output, escalation
    autoexec cancel INSTANCE_ID... --by NAME --reason TEXT
    autoexec pause [--playbook P] --reason TEXT --by NAME
    autoexec resume [--playbook P] --by NAME
    autoexec status                                     the kill switch
    autoexec escalations approve|reject|suppress|resolve KEY... --by NAME   work the queue
    autoexec approvals [--playbook P] [--partition K] [--status pending|decided] [--sort COL]
    autoexec approve KEY... --by NAME [--note TEXT]     or in bulk: --playbook P --where EXPR
    autoexec reject KEY... --by NAME --note TEXT
    autoexec serve [--host H] [--port N]                the signed approval links' endpoint
    autoexec backtest --playbook FILE --insights PATH... [--approve-when LABEL=EXPR]

Every listing command (summary, escalations, approvals, workflows, history, status, backtest)
takes ``--json`` for machine-readable output (escalations, approvals and backtest also ``--csv``). Every command takes ``--ledger URL``; without it, ``$AUTOEXEC_LEDGER_URL``, then the default the
Dagster integration uses (``autoexec_ledger.db`` in ``$DAGSTER_HOME``, else the working
directory), else ``var/autoexec_ledger.db`` in the working directory when it exists (where the
reference deployment and ``make demo`` keep it).
Errors are printed without a traceback and exit with status 2.
"""

from collections.abc import Sequence

# Importing the command modules registers their commands on the group.
import autoexec_dagster.cli.approval_commands  # pyright: ignore[reportUnusedImport]
import autoexec_dagster.cli.backtest_commands  # pyright: ignore[reportUnusedImport]
import autoexec_dagster.cli.escalation_commands  # pyright: ignore[reportUnusedImport]
import autoexec_dagster.cli.experiment_commands  # pyright: ignore[reportUnusedImport]
import autoexec_dagster.cli.ledger_commands  # noqa: F401  # pyright: ignore[reportUnusedImport]
from autoexec_dagster.cli.common import cli

__all__ = ["cli", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``autoexec`` command."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="autoexec")
