"""The ``autoexec`` command line against a real SQLite ledger."""

import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

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
