"""``autoexec experiments`` and ``autoexec experiments history`` on a real ledger."""

import json
from datetime import timedelta
from pathlib import Path

from click.testing import CliRunner

from autoexec_dagster import ActionLedger, update_experiment
from autoexec_dagster.cli import cli
from tests.test_experiments_update import RATES, Clock, playbook, send_day, world


def test_the_listing_and_the_history_show_what_the_ledger_holds(tmp_path: Path) -> None:
    clock = Clock()
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = ActionLedger(url, clock=clock)
    book = playbook()
    send_day(book, ledger, 1)
    clock.now += timedelta(days=3)
    update_experiment(playbook=book, ledger=ledger, outcomes=world(ledger, RATES, seed=1, day=1))
    counts = ledger.assignment_counts("loop", "trial")
    runner = CliRunner()

    listing = runner.invoke(cli, ["experiments", "--ledger", url])
    assert listing.exit_code == 0, listing.output
    assert "trial" in listing.output and "promoted" in listing.output
    assert "c 100%" in listing.output
    assert f"a {counts['a']:,}" in listing.output

    as_json = runner.invoke(cli, ["experiments", "--ledger", url, "--playbook", "loop", "--json"])
    [row] = json.loads(as_json.output)
    assert row["winner"] == "c" and row["assigned"] == counts
    assert row["variants"] == {"a": "archived", "b": "archived", "c": "promoted"}

    events = runner.invoke(cli, ["experiments", "history", "trial", "-p", "loop", "--ledger", url])
    assert events.exit_code == 0, events.output
    lines = events.output.strip().splitlines()
    assert [line.split()[2] for line in lines] == ["started", "promoted", "archived", "archived"]

    unknown = runner.invoke(cli, ["experiments", "history", "nope", "-p", "loop", "--ledger", url])
    assert unknown.exit_code == 2 and "has no experiment 'nope'; it has trial" in unknown.output
    empty = runner.invoke(cli, ["experiments", "--ledger", url, "--playbook", "other"])
    assert "No experiment has started in playbook 'other'." in empty.output
    ledger.dispose()
