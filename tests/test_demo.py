"""``make demo`` tells the churn story end to end, and a second run for the same day sends nothing.

The demo runs as ``python -m demo churn``, the churn half of ``make demo``, against a temporary
DAGSTER_HOME and var folder, at full size (20,000 customers a day). The host story has its own
test, tests/test_demo_hosts.py.
"""

import re
from pathlib import Path

import pytest

from autoexec_dagster import ActionLedger
from tests.e2e_support import run_demo

pytestmark = pytest.mark.slow

DAY = "2026-11-24"
RUN_TIMEOUT = 300


def _run_demo(home: Path, var: Path) -> str:
    return run_demo(["churn", "--partition", DAY], home=home, var=var, timeout=RUN_TIMEOUT)


def _number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the demo's output:\n{text}"
    return int(match.group(1).replace(",", ""))


def test_demo_acts_once_and_says_so_when_run_again(tmp_path: Path) -> None:
    home, var = tmp_path / "dagster_home", tmp_path / "var"

    first = _run_demo(home, var)
    for step in ("training:", "scoring:", "executing:"):
        assert step in first, first
    assert (home / "dagster.yaml").exists()
    flagged = _number(r"customers flagged\s+([\d,]+)", first)
    autonomous = _number(r"acted autonomously\s+([\d,]+)", first)
    escalated = _number(r"escalated to a person\s+([\d,]+)", first)
    held_out = _number(r"held out \(control group\)\s+([\d,]+)", first)
    assert 800 <= flagged <= 1200
    # The playbook holds out a tenth of the would-be actions (holdout_fraction 0.1).
    assert autonomous + escalated + held_out == flagged
    assert 0.06 <= held_out / (autonomous + held_out) <= 0.14
    rate_match = re.search(r"autonomy rate\s+([\d.]+)%", first)
    assert rate_match, first
    rate = float(rate_match.group(1))
    assert 92.0 <= rate <= 98.0
    # The rate is over the customers outside the control group.
    assert rate == pytest.approx(100 * autonomous / (flagged - held_out), abs=0.05)
    reasons = re.findall(r"^\s+([\d,]+)  (.+)$", first, flags=re.MULTILINE)
    assert sum(int(n.replace(",", "")) for n, _ in reasons) == escalated
    assert {reason for _, reason in reasons} == {
        "High-value customer at risk: an account manager should call",
        "The model is unsure about this customer",
    }

    emails = _number(r"Emails: ([\d,]+) \.eml files", first)
    mailbox = var / "mailbox"
    assert emails == len(list(mailbox.glob("*.eml"))) > 0
    ledger = ActionLedger(f"sqlite:///{var / 'autoexec_ledger.db'}")
    try:
        summary = ledger.summary(playbook="churn_outreach", partition_key=DAY)
    finally:
        ledger.dispose()
    sent = summary[summary["state"] == "succeeded"].groupby("action")["count"].sum()
    assert int(sent["retention_email"]) == emails
    assert f"check: mailbox .eml files ({emails:,}) == succeeded retention_email" in first
    assert f"SMTP messages received in this run ({emails:,}) ==" in first
    assert "MISMATCH" not in first

    # The extra: the retention_offer experiment after the outcomes of the days since DAY.
    assert f"Experiment retention_offer after the outcomes of {DAY} to " in first, first
    figures = _experiment_figures(first)
    assert set(figures) == {"check_in", "discount_20", "free_month", "held out"}
    assert all(n > 0 for n in figures.values())
    assert re.search(r"^  status: (running|promoted|awaiting_approval|stopped)", first, re.M)
    experiment_customers = figures["check_in"] + figures["discount_20"] + figures["free_month"]
    # Outcomes reach the experiment only for emails (the email customers of DAY), and only for
    # customers whose outcome day has ended, so at most every email customer is counted.
    assert experiment_customers <= int(sent["retention_email"])
    so_far = re.search(r"outcomes so far: ([\d,]+) of the ([\d,]+) customers exposed", first)
    assert so_far, first
    observed, exposed = (int(g.replace(",", "")) for g in so_far.groups())
    # Every customer acted on or held out is exposed; the outcomes of the days that have ended.
    assert exposed == autonomous + held_out and 0 < observed <= exposed

    second = _run_demo(home, var)
    assert "training: churn_model already trained" in second
    assert f"0 new actions: all {autonomous:,} already done in an earlier run" in second, second
    assert "SMTP messages received in this run (0) == emails the ledger sent now (0)" in second
    assert len(list(mailbox.glob("*.eml"))) == emails
    assert _number(r"acted autonomously\s+([\d,]+)", second) == autonomous
    # The same outcomes again add nothing: the experiment's figures do not move.
    assert _experiment_figures(second) == figures


def _experiment_figures(text: str) -> dict[str, int]:
    """Customers per variant (and held out) in the demo's experiment table."""
    rows = re.findall(r"^  (check_in|discount_20|free_month|held out)\s+([\d,]+) ", text, re.M)
    return {name: int(n.replace(",", "")) for name, n in rows}
