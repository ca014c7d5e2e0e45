"""``python -m demo hosts`` tells the host-remediation story end to end, and a second run sends
nothing.

The demo runs as ``make demo`` runs it, against a temporary DAGSTER_HOME and var folder, with its
own infrastructure API process. What it prints is compared with the ledger, with the API's own
record (its SQLite tables) and with the ground truth of the injected faults, not with ranges
tuned to the output.
"""

import json
import re
import sqlite3
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest

from assets.hosts import injected_faults
from autoexec_dagster import ActionLedger
from tests.e2e_support import run_demo

pytestmark = pytest.mark.slow

HOUR = "2026-12-01-10:00"
PLAYBOOK = "host_remediation"
RUN_TIMEOUT = 600


def _run_demo(home: Path, var: Path) -> str:
    return run_demo(["hosts", "--hour", HOUR], home=home, var=var, timeout=RUN_TIMEOUT)


def _number(pattern: str, text: str) -> int:
    match = re.search(pattern, text, flags=re.MULTILINE)
    assert match, f"{pattern!r} not in the demo's output:\n{text}"
    return int(match.group(1).replace(",", ""))


def _checks(text: str) -> dict[str, tuple[int, int]]:
    found = re.findall(r"^check: (.+?) \(([\d,]+)\) (==|!=) .+ \(([\d,]+)\)", text, re.MULTILINE)
    assert found, text
    return {name: (int(a.replace(",", "")), int(b.replace(",", ""))) for name, a, _, b in found}


def _api_record(db: Path) -> tuple[int, Counter[str], dict[str, str]]:
    """Calls received, executions per key, and each host's state, from the API's tables."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        calls = conn.execute("SELECT count(*) FROM calls").fetchone()[0]
        executed = Counter(
            str(key)
            for (key,) in conn.execute(
                "SELECT idempotency_key FROM calls WHERE outcome LIKE 'executed%'"
            )
        )
        states = dict(conn.execute("SELECT host_id, state FROM hosts").fetchall())
    return int(calls), executed, {str(h): str(s) for h, s in states.items()}


def test_host_demo_remediates_escalates_and_agrees_with_the_api(tmp_path: Path) -> None:
    home, var = tmp_path / "dagster_home", tmp_path / "var"

    first = _run_demo(home, var)
    for step in ("infrastructure API:", "training:", "scoring:", "executing:", "advancing:"):
        assert step in first, first
    assert "MISMATCH" not in first
    flagged = _number(r"anomalous hosts\s+([\d,]+)", first)
    remediated = _number(r"remediated and verified\s+([\d,]+)", first)
    failed = _number(r"escalated with evidence\s+([\d,]+)", first)
    databases = _number(r"database hosts, escalated at once\s+([\d,]+)", first)
    checks = _checks(first)
    for name, (a, b) in checks.items():
        assert a == b, (name, first)

    faults = injected_faults(HOUR)
    ledger = ActionLedger(f"sqlite:///{var / 'autoexec_ledger.db'}")
    try:
        totals = ledger.partition_outcome(playbook=PLAYBOOK, partition_key=HOUR)
        instances = ledger.instances(playbook=PLAYBOOK, partition_key=HOUR)
        queue = ledger.escalations(playbook=PLAYBOOK, partition_key=HOUR, status=None)
        steps = ledger.actions(playbook=PLAYBOOK)
    finally:
        ledger.dispose()
    succeeded_hosts = set(instances.loc[instances["state"] == "succeeded", "entity_id"])
    failed_cases = queue[queue["kind"] == "workflow_failed"]
    rule_cases = queue[queue["kind"] == "rule"]
    assert flagged == totals.flagged == len(instances) + len(rule_cases)
    assert remediated == len(succeeded_hosts) > 0
    assert failed == len(failed_cases) > 0
    assert databases == len(rule_cases) > 0
    assert remediated + failed + databases == flagged
    assert set(instances["state"]) <= {"succeeded", "failed"}  # nothing left waiting
    assert all(str(h).startswith("db-") for h in rule_cases["entity_id"])

    # Escalated with evidence: exactly the hardware faults (which nothing fixes), and the
    # evidence names the diagnosis and the failed verification.
    assert set(failed_cases["entity_id"]) == {
        h for h in instances["entity_id"] if faults.get(str(h)) == "hardware"
    }
    for case in failed_cases.to_dict("records"):
        evidence = json.loads(str(case["data"]))
        assert evidence["outputs"]["diagnose"]["cause"] == "hardware"
        assert evidence["evidence"][-1]["step"] == "verify"
        assert str(case["entity_id"]) in first
    assert "diagnosis hardware:" in first and "poll timed out; left isolated" in first

    # The API's own record: executed keys are the ledger's succeeded step attempts, each once;
    # every reinstated host is back in service, every escalated one still isolated, and no
    # database host was touched.
    calls, executed, states = _api_record(var / "infra.sqlite")
    step_rows = steps[steps["decision"] == "step"]
    succeeded_keys = set(step_rows.loc[step_rows["state"] == "succeeded", "idempotency_key"])
    assert set(executed) == succeeded_keys and set(executed.values()) == {1}
    assert checks["step keys the API executed"] == (len(executed), len(succeeded_keys))
    assert checks["steps the API executed in this run"] == (len(executed), len(succeeded_keys))
    assert {states[h] for h in succeeded_hosts} == {"in_service"}
    assert {states[h] for h in failed_cases["entity_id"]} == {"isolated"}
    assert not set(rule_cases["entity_id"]) & set(states)
    assert f"Infrastructure API: {calls:,} calls" in first

    second = _run_demo(home, var)
    assert "training: host_anomaly_model already trained" in second
    assert f"0 steps sent: all {flagged:,} anomalous hosts were handled in an earlier run" in second
    assert "MISMATCH" not in second
    assert _checks(second)["steps the API executed in this run"] == (0, 0)
    assert _number(r"remediated and verified\s+([\d,]+)", second) == remediated
    calls_after, executed_after, _ = _api_record(var / "infra.sqlite")
    assert (calls_after, executed_after) == (calls, executed)  # not one call the second time
