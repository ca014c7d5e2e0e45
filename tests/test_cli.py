"""The ``autoexec`` command line against a real SQLite ledger."""

import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from autoexec_dagster import PythonChannel, advance_workflows
from autoexec_dagster.cli import cli
from autoexec_dagster.executor.plan_execution import execute_plan
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.routing import route
from tests.conftest import churn_playbook, churn_scores
from tests.test_execution_assets import PLAYBOOK, Recorder, recording_channels


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    """A ledger holding one executed partition (p1) of the churn playbook."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    playbook = churn_playbook(max_flagged_fraction=0.9)
    plan = route(churn_scores(300), playbook, partition_key="p1", insight_name="churn_scores")
    execute_plan(
        plan,
        playbook=playbook,
        ledger=ActionLedger(url),
        channels=recording_channels(Recorder()),
        partition_key="p1",
    )
    return url


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_summary_shows_counts_and_the_autonomy_rate(ledger_url: str) -> None:
    ledger = ActionLedger(ledger_url)
    states = ledger.summary().groupby("state")["count"].sum()

    result = run("summary", "--ledger", ledger_url, "--playbook", PLAYBOOK)

    assert result.exit_code == 0, result.output
    assert "retention_email" in result.output and "succeeded" in result.output
    succeeded, escalated = int(states["succeeded"]), int(states["escalated"])
    assert f"{succeeded / (succeeded + escalated):.1%}" in result.output
    assert f"Open escalations: {escalated}" in result.output
    empty = run("summary", "--ledger", ledger_url, "--playbook", "other")
    assert "No actions recorded for playbook 'other'" in empty.output


def test_the_ledger_defaults_to_the_environment(ledger_url: str) -> None:
    result = run("summary", env={"AUTOEXEC_LEDGER_URL": ledger_url})
    assert result.exit_code == 0
    assert "Autonomy rate" in result.output


def test_escalations_list_reasons_with_personal_data_masked(ledger_url: str) -> None:
    result = run("escalations", "--ledger", ledger_url, "--playbook", PLAYBOOK, "--limit", "5")

    assert result.exit_code == 0, result.output
    assert "reason: High-value customer at risk" in result.output or "unsure" in result.output
    assert "email=c***@example.com" in result.output
    assert "name=C***" in result.output
    assert "@example.com" not in result.output.replace("***@example.com", "")
    assert "5 escalation(s) shown (--limit 5 reached)" in result.output

    shown = run("escalations", "--ledger", ledger_url, "-p", PLAYBOOK, "-n", "1", "--show-personal")
    assert "customer" in shown.output and "@example.com" in shown.output
    masked_more = run(
        "escalations", "--ledger", ledger_url, "-p", PLAYBOOK, "-n", "1", "--mask", "churn_score"
    )
    assert "churn_score=***" in masked_more.output


def test_resolve_closes_an_escalation_by_key_prefix(ledger_url: str) -> None:
    ledger = ActionLedger(ledger_url)
    queue = ledger.escalations(playbook=PLAYBOOK)
    key = str(queue["idempotency_key"].iloc[0])

    result = run("resolve", key[:10], "--ledger", ledger_url, "--by", "ana", "--note", "called")

    assert result.exit_code == 0, result.output
    assert f"Resolved {key}" in result.output
    resolved = ledger.escalations(playbook=PLAYBOOK, status="resolved")
    assert list(resolved["idempotency_key"]) == [key]
    assert resolved["resolved_by"].iloc[0] == "ana" and resolved["resolution"].iloc[0] == "called"
    again = run("resolve", key, "--ledger", ledger_url, "--by", "ana")
    assert again.exit_code == 2 and "no open escalation" in again.output
    listed = run("escalations", "--ledger", ledger_url, "-p", PLAYBOOK, "--status", "resolved")
    assert key in listed.output and "[resolved]" in listed.output


def test_pause_status_and_resume(ledger_url: str) -> None:
    assert "No pause is set" in run("status", "--ledger", ledger_url).output

    paused = run(
        "pause", "--ledger", ledger_url, "-p", PLAYBOOK, "--reason", "CRM outage", "--by", "ops"
    )
    assert paused.exit_code == 0, paused.output
    assert ActionLedger(ledger_url).pause_reason(PLAYBOOK) == (
        f"playbook {PLAYBOOK!r} is paused by ops: CRM outage"
    )
    status = run("status", "--ledger", ledger_url)
    assert f"PAUSED playbook {PLAYBOOK!r} by ops" in status.output and "CRM outage" in status.output

    run("pause", "--ledger", ledger_url, "--reason", "freeze", "--by", "cto")
    resumed = run("resume", "--ledger", ledger_url, "-p", PLAYBOOK, "--by", "ops")
    assert resumed.exit_code == 0
    assert resumed.output.startswith(
        f"Resumed playbook {PLAYBOOK!r} (by ops). Still paused: every playbook (*). "
    )
    assert ".;" not in resumed.output
    assert (
        ActionLedger(ledger_url).pause_reason(PLAYBOOK) == "every playbook is paused by cto: freeze"
    )
    assert run("resume", "--ledger", ledger_url, "--by", "cto").exit_code == 0
    assert ActionLedger(ledger_url).pause_reason(PLAYBOOK) is None

    not_paused = run("resume", "--ledger", ledger_url, "--by", "cto")
    assert not_paused.exit_code == 2 and "is not paused" in not_paused.output


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    missing = run("summary", "--ledger", f"sqlite:///{tmp_path / 'nope.db'}")
    assert missing.exit_code == 2
    assert missing.output.startswith("error: no action ledger at")
    assert not (tmp_path / "nope.db").exists()
    assert "Traceback" not in missing.output

    bad = run("status", "--ledger", "definitely not a url")
    assert bad.exit_code == 2 and "not a valid SQLAlchemy URL" in bad.output

    driver = run("status", "--ledger", "mysql://u@h/db")
    assert driver.exit_code == 2 and "supports SQLite and PostgreSQL" in driver.output

    short = run("resolve", "abc", "--ledger", f"sqlite:///{tmp_path / 'new.db'}", "--by", "x")
    assert short.exit_code == 2


def test_pause_may_create_a_new_ledger(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    result = run("pause", "--ledger", url, "--reason", "not yet", "--by", "ops")
    assert result.exit_code == 0
    assert ActionLedger(url).pause_reason("anything") == "every playbook is paused by ops: not yet"


def test_pause_of_a_playbook_the_ledger_never_saw_is_refused(ledger_url: str) -> None:
    typo = run("pause", "--ledger", ledger_url, "-p", "churn_outreac", "--reason", "x", "--by", "o")

    assert typo.exit_code == 2
    assert "never seen playbook 'churn_outreac'" in typo.output
    assert f"known playbooks: {PLAYBOOK}" in typo.output
    assert ActionLedger(ledger_url).controls().empty


def test_resolve_records_the_current_queue_on_the_dagster_instance(
    ledger_url: str, tmp_path: Path
) -> None:
    import dagster as dg

    ledger = ActionLedger(ledger_url)
    before = len(ledger.escalations(playbook=PLAYBOOK, partition_key="p1"))
    key = str(ledger.escalations(playbook=PLAYBOOK)["idempotency_key"].iloc[0])
    home = tmp_path / "dagster_home"
    home.mkdir()

    result = run(
        "resolve", key, "--ledger", ledger_url, "--by", "ana", env={"DAGSTER_HOME": str(home)}
    )

    assert result.exit_code == 0, result.output
    assert f"now shows {before - 1:,} open" in result.output
    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.fetch_observations(
            dg.AssetKey([PLAYBOOK, "escalations"]), limit=5
        ).records
    (record,) = records
    observation = record.asset_observation
    assert observation is not None and observation.partition == "p1"
    assert observation.metadata["open"].value == before - 1
    assert observation.metadata["changed_by"].value == "ana"

    other = str(ledger.escalations(playbook=PLAYBOOK)["idempotency_key"].iloc[0])
    unset = run("resolve", other, "--ledger", ledger_url, "--by", "ana", env={"DAGSTER_HOME": ""})
    assert unset.exit_code == 0
    assert "DAGSTER_HOME is not set, so the Dagster UI was not told" in unset.output


def test_summary_counts_agree_with_the_metadata_and_the_check(tmp_path: Path) -> None:
    from tests.test_execution_assets import make_project, materializations

    frame = churn_scores(400, seed=4)
    project = make_project(tmp_path, {"p1": frame})
    project.materialize_insight("p1")
    result = project.run("p1")
    assert result.success
    actions = materializations(result)[f"{PLAYBOOK}/actions"]
    share = next(
        e.asset_check_evaluation_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
        and e.asset_check_evaluation_data.check_name.endswith("flagged_share")
    )

    out = run("summary", "--ledger", str(project.ledger.url), "-p", PLAYBOOK, "-k", "p1").output

    def number(label: str) -> int:
        match = re.search(rf"^  {re.escape(label)}\s+([\d,]+)", out, flags=re.MULTILINE)
        assert match, (label, out)
        return int(match.group(1).replace(",", ""))

    assert number("flagged") == actions["flagged"]
    assert f"{actions['flagged']:,} of {len(frame):,} entities flagged" in str(share.description)
    assert number("escalated to a person") == actions["escalated"]
    assert number("skipped (no rule matched)") == actions["skipped"]
    assert number("acted autonomously") == actions["succeeded"]
    assert number("failed") == actions["failed"] == 0
    assert f"Autonomy rate: {actions['autonomy_rate']:.1%}" in out


def test_without_configuration_the_cli_finds_a_ledger_in_var(
    ledger_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / "var").mkdir(parents=True)
    import sqlite3

    # A consistent copy of the WAL-mode database (a file copy could miss the -wal part).
    with (
        sqlite3.connect(ledger_url.removeprefix("sqlite:///")) as src,
        sqlite3.connect(project / "var" / "autoexec_ledger.db") as dst,
    ):
        src.backup(dst)
    monkeypatch.chdir(project)

    result = run("summary", "-p", PLAYBOOK, env={"AUTOEXEC_LEDGER_URL": "", "DAGSTER_HOME": ""})

    assert result.exit_code == 0, result.output
    assert "Autonomy rate" in result.output


# -- workflows ----------------------------------------------------------------------------------


@pytest.fixture
def workflow_ledger(tmp_path: Path) -> str:
    """A ledger with the host workflows of partition p1: h001 succeeded, five wait at their poll.

    Driven by execute_plan on the ledger's injected clock (START); only h001 turns healthy.
    """
    from tests.test_workflow_sensor import (
        START,
        Clock,
        diagnose,
        host_playbook,
        hosts_frame,
    )

    url = f"sqlite:///{tmp_path / 'workflows.db'}"
    clock = Clock(START)
    ledger = ActionLedger(url, clock=clock)
    playbook = host_playbook()
    channels = {
        "diagnose": PythonChannel.from_callable(diagnose),
        # Never healthy, except for h001: the others keep polling until their timeout.
        "health": PythonChannel.from_callable(
            lambda r: {"status": "healthy" if r.entity_id == "h001" else "degraded"}
        ),
    }
    plan = route(hosts_frame(), playbook, partition_key="p1", insight_name="host_scores")
    execute_plan(plan, playbook=playbook, ledger=ledger, channels=channels, partition_key="p1")
    return url


def _workflow_ids(url: str, state: str | None = None) -> dict[str, str]:
    rows = ActionLedger(url).instances(states=[state] if state else None)
    return dict(zip(rows["entity_id"], rows["instance_id"], strict=True))


def test_workflows_lists_instances_by_state_with_outputs_masked(workflow_ledger: str) -> None:
    listed = run("workflows", "--ledger", workflow_ledger, "-p", "hosts")

    assert listed.exit_code == 0, listed.output
    assert listed.output.startswith("5 waiting, 1 succeeded for playbook 'hosts'")
    assert (
        "[waiting]  p1  entity h000  remediate at verify (attempt 2, due 2026-12-01 10:05:30)"
        in (listed.output)
    )
    assert "last:    verify: succeeded (attempt 1)" in listed.output
    assert "diagnose.cause=service_hung" in listed.output
    assert "oncall-" not in listed.output and "diagnose.email=o***@example.com" in listed.output

    waiting = run("workflows", "--ledger", workflow_ledger, "-p", "hosts", "--state", "waiting")
    assert "[succeeded]" not in waiting.output and waiting.output.count("[waiting]") == 5
    none = run("workflows", "--ledger", workflow_ledger, "-p", "hosts", "--state", "failed")
    assert "No failed workflow instances for playbook 'hosts'." in none.output

    as_json = run("workflows", "--ledger", workflow_ledger, "-p", "hosts", "-k", "p1", "--json")
    records = json.loads(as_json.output)
    assert sorted(r["state"] for r in records) == ["succeeded"] + ["waiting"] * 5
    h000 = next(r for r in records if r["entity_id"] == "h000")
    assert h000["step"] == "verify" and h000["next_due"].startswith("2026-12-01T10:05:30")
    assert "oncall-" not in as_json.output
    shown = run("workflows", "--ledger", workflow_ledger, "-p", "hosts", "--show-personal")
    assert "oncall-h000@example.com" in shown.output


def test_cancel_records_who_and_why_and_refuses_unknown_or_finished(workflow_ledger: str) -> None:
    waiting = _workflow_ids(workflow_ledger, "waiting")
    finished = _workflow_ids(workflow_ledger, "succeeded")["h001"]
    target = waiting["h000"]

    unknown = run(
        "cancel",
        "ffffffffffff",
        target,
        "--ledger",
        workflow_ledger,
        "--by",
        "ana",
        "--reason",
        "x",
    )
    assert unknown.exit_code == 2
    assert "nothing cancelled" in unknown.output
    assert "ffffffffffff: no workflow instance has this id" in unknown.output
    done = run("cancel", finished, "--ledger", workflow_ledger, "--by", "ana", "--reason", "x")
    assert done.exit_code == 2
    assert f"instance {finished} (entity h001) already ended succeeded" in done.output
    # Refused commands changed nothing.
    assert _workflow_ids(workflow_ledger, "waiting")["h000"] == target

    cancelled = run(
        "cancel",
        target[:12],
        "--ledger",
        workflow_ledger,
        "--by",
        "ana",
        "--reason",
        "host decommissioned",
    )
    assert cancelled.exit_code == 0, cancelled.output
    assert f"Cancelled {target} (entity h000, remediate at verify) by ana" in cancelled.output
    row = ActionLedger(workflow_ledger).instances(entity_id="h000").iloc[0]
    assert (row["state"], row["cancelled_by"], row["cancel_reason"]) == (
        "cancelled",
        "ana",
        "host decommissioned",
    )
    again = run("cancel", target, "--ledger", workflow_ledger, "--by", "bo", "--reason", "x")
    assert again.exit_code == 2 and "already ended cancelled by ana" in again.output


def test_history_shows_every_step_output_and_escalation_of_an_entity(
    workflow_ledger: str,
) -> None:
    from tests.test_workflow_sensor import START, Clock, diagnose, host_playbook

    # Move time past the poll's timeout: h003 (and the others still degraded) fail and escalate.
    clock = Clock(START + timedelta(minutes=5))
    ledger = ActionLedger(workflow_ledger, clock=clock)
    advance_workflows(
        playbook=host_playbook(),
        ledger=ledger,
        channels={
            "diagnose": PythonChannel.from_callable(diagnose),
            "health": PythonChannel.from_callable(lambda r: {"status": "degraded"}),
        },
    )

    result = run("history", "h003", "--ledger", workflow_ledger)

    assert result.exit_code == 0, result.output
    lines = result.output
    assert "p1  handed to a workflow: workflow (attempts 0, rule anomalous)" in lines
    assert "step diagnose (diagnose): succeeded" in lines
    assert "output: cause=service_hung, email=o***@example.com" in lines
    assert lines.count("step verify (health): succeeded") == 2
    assert "output: status=degraded" in lines
    assert "remediate: failed" in lines and "verify: failed" in lines
    assert "workflow_failed: The host did not recover" in lines
    assert "failed: step verify: step 'verify': poll timed out" in lines
    assert "oncall-" not in lines

    as_json = json.loads(run("history", "h003", "--ledger", workflow_ledger, "--json").output)
    assert [a["step"] for a in as_json["actions"] if a["step"]] == [
        "diagnose",
        "verify",
        "verify",
    ]
    [instance] = as_json["workflows"]
    assert instance["state"] == "failed"
    assert [e["outcome"] for e in instance["log"]][-1] == "failed"
    [case] = as_json["escalations"]
    assert case["kind"] == "workflow_failed" and case["failed_step"] == "verify"
    assert "diagnose.cause=service_hung" in case["outputs"]
    empty = run("history", "nobody", "--ledger", workflow_ledger)
    assert "The ledger holds nothing about entity 'nobody'." in empty.output

    escalations = run("escalations", "--ledger", workflow_ledger, "-p", "hosts")
    assert "failed: step verify: step 'verify': poll timed out" in escalations.output
    assert "steps:  diagnose.cause=service_hung" in escalations.output
    assert "evidence" not in escalations.output


def test_every_listing_command_speaks_json(ledger_url: str, workflow_ledger: str) -> None:
    summary = json.loads(run("summary", "--ledger", ledger_url, "--json").output)
    [partition] = summary["partitions"]
    assert partition["partition_key"] == "p1"
    assert summary["open_escalations"] == partition["open_escalations"] > 0
    assert summary["autonomy_rate"] == pytest.approx(partition["autonomy_rate"])
    assert {c["state"] for c in summary["counts"]} >= {"succeeded", "escalated"}

    listed = run("escalations", "--ledger", ledger_url, "-p", PLAYBOOK, "-n", "1000", "--json")
    queue = json.loads(listed.output)
    assert len(queue) == partition["open_escalations"]
    assert all("@example.com" not in c["data"] or "***@" in c["data"] for c in queue)

    run("pause", "--ledger", ledger_url, "--reason", "freeze", "--by", "cto")
    status = json.loads(run("status", "--ledger", ledger_url, "--json").output)
    assert [(p["scope"], p["by"], p["reason"]) for p in status["paused"]] == [
        ("*", "cto", "freeze")
    ]

    hosts = json.loads(run("summary", "--ledger", workflow_ledger, "--json").output)
    assert hosts["totals"]["workflows"] == 6
    assert hosts["totals"]["workflows_succeeded"] == 1
    text = run("summary", "--ledger", workflow_ledger).output
    assert "handed to a workflow" in text and "1 finished every step" in text


# -- the escalation queue as a work queue (issue 8) ------------------------------------------


@pytest.fixture
def proposal_ledger(tmp_path: Path) -> str:
    """A ledger holding partition p1 of the playbook whose VIP escalations propose a CRM task."""
    from tests.test_ledger_escalations import Recorder as KeyRecorder
    from tests.test_ledger_escalations import execute_partition

    url = f"sqlite:///{tmp_path / 'queue.db'}"
    execute_partition(ActionLedger(url), "p1", n=400, channels=KeyRecorder().channels())
    return url


def _lifetime_values(frame_data: list[str]) -> list[float]:
    return [json.loads(d)["lifetime_value"] for d in frame_data]


def test_escalations_sort_by_a_data_column_as_text_csv_and_json(proposal_ledger: str) -> None:
    import csv
    import io

    text = run(
        "escalations",
        "--ledger",
        proposal_ledger,
        "-p",
        PLAYBOOK,
        "--sort",
        "-lifetime_value",
        "-n",
        "1000",
    )
    assert text.exit_code == 0, text.output
    shown = [float(v) for v in re.findall(r"lifetime_value=([\d.]+)", text.output)]
    assert len(shown) > 3 and shown == sorted(shown, reverse=True)
    assert "proposes: crm_task" in text.output

    listed = run(
        "escalations",
        "--ledger",
        proposal_ledger,
        "-p",
        PLAYBOOK,
        "--sort",
        "lifetime_value",
        "--desc",
        "--csv",
        "-n",
        "1000",
    )
    rows = list(csv.DictReader(io.StringIO(listed.output)))
    values = [float(r["lifetime_value"]) for r in rows]
    assert values == sorted(values, reverse=True) and len(rows) == len(shown)
    assert {r["status"] for r in rows} == {"open"}
    assert all(r["email"].startswith(r["email"][0] + "***@") for r in rows)
    assert all(r["name"].endswith("***") for r in rows)
    assert {r["proposed_action"] for r in rows if r["rule"] == "vip_at_risk"} == {"crm_task"}

    ascending = json.loads(
        run(
            "escalations",
            "--ledger",
            proposal_ledger,
            "-p",
            PLAYBOOK,
            "--sort",
            "lifetime_value",
            "--json",
            "-n",
            "1000",
        ).output
    )
    keys = [r["key"] for r in ascending]
    assert keys == [r["key"] for r in reversed(rows)]
    newest_first = json.loads(
        run(
            "escalations",
            "--ledger",
            proposal_ledger,
            "-p",
            PLAYBOOK,
            "--sort=-created_at",
            "--json",
            "-n",
            "1000",
        ).output
    )
    created = [r["created_at"] for r in newest_first]
    assert len(created) == len(rows) and created == sorted(created, reverse=True)


def test_approve_by_key_once_then_the_listing_shows_the_decision(proposal_ledger: str) -> None:
    from autoexec_dagster.executor.escalation_actions import deliver_approved_escalations
    from tests.test_ledger_escalations import Recorder as KeyRecorder
    from tests.test_ledger_escalations import proposing_playbook

    ledger = ActionLedger(proposal_ledger)
    key = str(
        ledger.select_escalations(playbook=PLAYBOOK, rule="vip_at_risk")["idempotency_key"].iloc[0]
    )

    approved = run(
        "escalations",
        "approve",
        key[:10],
        "--ledger",
        proposal_ledger,
        "--by",
        "ana",
        "--note",
        "account manager calls Monday",
    )

    assert approved.exit_code == 0, approved.output
    assert f"{key}: approved crm_task" in approved.output
    assert "Approved 1 escalation(s) (by ana, via cli)." in approved.output
    again = run("escalations", "approve", key, "--ledger", proposal_ledger, "--by", "bob")
    assert again.exit_code == 2 and "not open (it is approved by ana via cli" in again.output
    decided = run("escalations", "--ledger", proposal_ledger, "-p", PLAYBOOK, "--status", "decided")
    assert (
        "[approved]" in decided.output and "proposes: crm_task (action reserved)" in decided.output
    )
    assert re.search(
        r"decided: approved by ana via cli at \d{4}-\d\d-\d\d \d\d:\d\d UTC: account manager calls Monday",
        decided.output,
    )
    recorder = KeyRecorder()
    delivered = deliver_approved_escalations(
        playbook=proposing_playbook(), ledger=ledger, channels=recorder.channels()
    )
    assert delivered.succeeded == 1 and len(recorder.keys) == 1
    record = json.loads(
        run(
            "escalations",
            "--ledger",
            proposal_ledger,
            "-p",
            PLAYBOOK,
            "--status",
            "approved",
            "--json",
        ).output
    )
    assert [(r["key"], r["decided_by"], r["decided_via"], r["action_state"]) for r in record] == [
        (key, "ana", "cli", "succeeded")
    ]
    assert record[0]["note"] == "account manager calls Monday"


def test_bulk_approval_by_expression_shows_the_match_and_asks(
    proposal_ledger: str, tmp_path: Path
) -> None:
    import dagster as dg

    ledger = ActionLedger(proposal_ledger)
    vip = ledger.select_escalations(
        playbook=PLAYBOOK, rule="vip_at_risk", where="lifetime_value >= 7000"
    )
    total = sum(_lifetime_values(vip["data"].tolist()))
    assert len(vip) >= 2
    args = (
        "escalations",
        "approve",
        "--ledger",
        proposal_ledger,
        "-p",
        PLAYBOOK,
        "--rule",
        "vip_at_risk",
        "--where",
        "lifetime_value >= 7000",
        "--total",
        "lifetime_value",
        "--by",
        "ana",
    )
    declined = CliRunner().invoke(cli, list(args), input="n\n")

    assert declined.exit_code == 1 and "Aborted" in declined.output
    assert f"{len(vip)} open escalation(s) match" in declined.output
    assert f"total lifetime_value: {total:,.2f}" in declined.output
    assert len(ledger.select_escalations(playbook=PLAYBOOK, statuses=("approved",))) == 0

    home = tmp_path / "dagster_home"
    home.mkdir()
    confirmed = CliRunner().invoke(cli, list(args), input="y\n", env={"DAGSTER_HOME": str(home)})

    assert confirmed.exit_code == 0, confirmed.output
    assert f"Approved {len(vip)} escalation(s)" in confirmed.output
    now_approved = ledger.select_escalations(playbook=PLAYBOOK, statuses=("approved",))
    assert set(now_approved["idempotency_key"]) == set(vip["idempotency_key"])
    assert ledger.escalation_actions_due(playbook=PLAYBOOK) == [("p1", len(vip))]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (observed,) = instance.fetch_observations(
            dg.AssetKey([PLAYBOOK, "escalations"]), limit=5
        ).records
    observation = observed.asset_observation
    assert observation is not None and observation.metadata["changed_by"].value == "ana"
    assert observation.metadata["source"].value == "autoexec escalations"


def test_suppress_reject_and_resolve_from_the_command_line(proposal_ledger: str) -> None:
    ledger = ActionLedger(proposal_ledger)
    unsure = ledger.select_escalations(playbook=PLAYBOOK, rule="unsure")
    vip = ledger.select_escalations(playbook=PLAYBOOK, rule="vip_at_risk")[
        "idempotency_key"
    ].astype(str)

    suppressed = run(
        "escalations",
        "suppress",
        "--ledger",
        proposal_ledger,
        "-p",
        PLAYBOOK,
        "--rule",
        "unsure",
        "--for",
        "30d",
        "--by",
        "ana",
        "--note",
        "model retraining",
        "--yes",
    )
    rejected = run(
        "escalations",
        "reject",
        vip.iloc[0],
        "--ledger",
        proposal_ledger,
        "--by",
        "bob",
        "--note",
        "customer already churned",
    )
    resolved = run(
        "escalations",
        "resolve",
        vip.iloc[1],
        "--ledger",
        proposal_ledger,
        "--by",
        "cem",
        "--note",
        "called",
    )

    assert suppressed.exit_code == rejected.exit_code == resolved.exit_code == 0
    assert f"Suppressed {len(unsure)} escalation(s)" in suppressed.output
    holds = run(
        "escalations", "suppressions", "--ledger", proposal_ledger, "-p", PLAYBOOK, "--json"
    )
    assert {h["entity_id"] for h in json.loads(holds.output)} == set(unsure["entity_id"])
    listed = run(
        "escalations",
        "--ledger",
        proposal_ledger,
        "-p",
        PLAYBOOK,
        "--status",
        "decided",
        "-n",
        "1000",
    )
    assert listed.output.count("decided: suppressed by ana via cli") == len(unsure)
    assert (
        "decided: rejected by bob via cli" in listed.output
        and "customer already churned" in listed.output
    )
    assert "decided: resolved by cem via cli" in listed.output
    lifted = run(
        "escalations",
        "lift",
        str(unsure["entity_id"].iloc[0]),
        "--ledger",
        proposal_ledger,
        "-p",
        PLAYBOOK,
        "--by",
        "ana",
    )
    assert lifted.exit_code == 0 and "Lifted the suppression" in lifted.output
    assert len(ledger.active_suppressions(playbook=PLAYBOOK)) == len(unsure) - 1
