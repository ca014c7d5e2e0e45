"""A promotion that waits for a person: requested with its evidence, decided through the
approval queue (the ledger, the command line), applied at the next update; rejection and
expiry keep the experiment running and are recorded."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from autoexec_dagster import ActionLedger, ApprovalError, update_experiment
from autoexec_dagster.cli import cli
from tests.test_experiments_update import RATES, Clock, playbook, send_day, world


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(tmp_path: Path, clock: Clock) -> Iterator[ActionLedger]:
    led = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)
    yield led
    led.dispose()


def asked(ledger: ActionLedger, clock: Clock):
    book = playbook(promotion_approvers=("ana", "raj"))
    send_day(book, ledger, 1)
    clock.now += timedelta(days=3)
    result = update_experiment(
        playbook=book, ledger=ledger, outcomes=world(ledger, RATES, seed=11, day=1)
    )
    return book, result


def test_a_winner_waits_for_approval_and_is_promoted_once_approved(
    ledger: ActionLedger, clock: Clock, tmp_path: Path
) -> None:
    # The command line decides on the real clock: the simulated days end now.
    clock.now = datetime.now(UTC) - timedelta(days=3)
    book, result = asked(ledger, clock)
    assert result.status == "awaiting_approval" and result.winner is None
    assert "promote c?" in result.decision
    pending = ledger.pending_approvals(playbook="loop")
    assert len(pending) == 1 and pending["entity_id"].iloc[0] == "c"
    assert pending["step"].iloc[0] == "promote"
    # Still running meanwhile: a second update keeps waiting and asks nobody again.
    waiting = update_experiment(playbook=book, ledger=ledger)
    assert waiting.status == "awaiting_approval" and "waiting for ana or raj" in waiting.decision
    assert len(ledger.pending_approvals(playbook="loop")) == 1

    approval_id = str(pending["approval_id"].iloc[0])
    with pytest.raises(ApprovalError, match="not an approver"):
        ledger.approve([approval_id], by="mallory")
    runner = CliRunner()
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    listing = runner.invoke(cli, ["approvals", "--ledger", url, "--playbook", "loop"])
    assert listing.exit_code == 0, listing.output
    assert approval_id[:8] in listing.output
    decided = runner.invoke(
        cli,
        ["approve", approval_id[:10], "--ledger", url, "--by", "ana", "--note", "clear win"],
    )
    assert decided.exit_code == 0, decided.output

    promoted = update_experiment(playbook=book, ledger=ledger)
    assert promoted.status == "promoted" and promoted.winner == "c" and promoted.promoted_now
    events = ledger.experiment_events("loop", "trial")
    kinds = [e["kind"] for e in events]
    assert kinds.count("approval_requested") == 1 and "promoted" in kinds
    assert "approved by ana (clear win)" in next(
        e["detail"] for e in events if e["kind"] == "promoted"
    )


def test_a_rejected_promotion_keeps_the_experiment_running_and_is_not_asked_again(
    ledger: ActionLedger, clock: Clock
) -> None:
    book, _result = asked(ledger, clock)
    approval_id = str(ledger.pending_approvals(playbook="loop")["approval_id"].iloc[0])
    ledger.reject([approval_id], by="raj", note="wait for the quarter")
    after = update_experiment(playbook=book, ledger=ledger)
    assert after.status == "running" and after.winner is None
    rejected = [
        e for e in ledger.experiment_events("loop", "trial") if e["kind"] == "promotion_rejected"
    ]
    assert rejected and "by raj: wait for the quarter" in rejected[0]["detail"]
    again = update_experiment(playbook=book, ledger=ledger)
    assert again.status == "running" and "not proposed again" in again.decision
    assert ledger.pending_approvals(playbook="loop").empty


def test_an_unanswered_promotion_expires_and_the_experiment_goes_on(
    ledger: ActionLedger, clock: Clock
) -> None:
    book, _result = asked(ledger, clock)
    clock.now += timedelta(days=8)
    after = update_experiment(playbook=book, ledger=ledger)
    assert after.status == "running"
    kinds = [e["kind"] for e in ledger.experiment_events("loop", "trial")]
    assert "promotion_expired" in kinds
    assert ledger.pending_approvals(playbook="loop").empty
