"""Backtest: replaying a playbook over past insight partitions, counted by hand, with no side effect."""

import io
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner, Result

from autoexec_dagster.backtest import AS_WRITTEN, METRICS, approval_steps, backtest
from autoexec_dagster.channels.base import ActionRequest
from autoexec_dagster.channels.python import PythonChannel
from autoexec_dagster.cli import cli
from autoexec_dagster.errors import InsightValidationError, PlaybookError
from autoexec_dagster.executor.plan_execution import execute_plan
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.playbook import Guardrails, Playbook, Rule
from autoexec_dagster.routing import route
from autoexec_dagster.workflows.workflow import Step, Workflow

ASSUME = {"draft_po.total": "reorder_qty * unit_cost"}
DELIVERED: list[str] = []


def deliver(request: ActionRequest) -> str:
    """A channel function for the execute_plan comparisons: records what would be sent."""
    DELIVERED.append(request.idempotency_key)
    return "ok"


def stock_playbook(
    *,
    max_flagged_fraction: float = 0.9,
    max_actions: int | None = 10_000,
    holdout_fraction: float = 0.0,
    draft_when: str | None = None,
    gate_when: str | None = None,
    send_when: str | None = None,
    gate_value: str | None = None,
) -> Playbook:
    """Short SKUs start a workflow: draft a purchase order, a buyer approves one above 5,000."""
    return Playbook(
        name="stock_replenishment",
        entity_key="sku",
        rules=[
            Rule(
                name="discontinued",
                when="shortfall > 0 and discontinued == 1",
                escalate="Discontinued SKU running short: a buyer decides",
            ),
            Rule(name="short", when="shortfall > 0", workflow="replenish"),
            Rule(name="overstock", when="overstock > 0", action="clearance_offer"),
        ],
        workflows={
            "replenish": Workflow(
                steps=[
                    Step(name="draft_po", action="draft_po", when=draft_when),
                    Step(
                        name="approval",
                        when=gate_when,
                        approve_when="`draft_po.total` > 5000",
                        approvers=("buyer",),
                        value=gate_value,
                    ),
                    Step(name="send_po", action="send_po", when=send_when),
                ]
            )
        },
        guardrails=Guardrails(
            max_flagged_fraction=max_flagged_fraction,
            max_actions=max_actions,
            holdout_fraction=holdout_fraction,
        ),
    )


def day_one() -> pd.DataFrame:
    """Ten SKUs; the order totals (reorder_qty * unit_cost) are in the comments."""
    return pd.DataFrame(
        [
            # sku, shortfall, discontinued, overstock, reorder_qty, unit_cost
            ("A", 0, 0, 0, 0, 10.0),  # no rule: skipped
            ("B", 5, 0, 0, 100, 60.0),  # workflow, 6,000
            ("C", 10, 0, 0, 200, 60.0),  # workflow, 12,000
            ("D", 1, 1, 0, 10, 1.0),  # escalated: discontinued
            ("E", 2, 0, 0, 20, 350.0),  # workflow, 7,000
            ("F", 0, 0, 3, 0, 5.0),  # action: clearance_offer
            ("G", 3, 0, 0, 300, 30.0),  # workflow, 9,000
            ("H", 4, 0, 0, 50, 90.0),  # workflow, 4,500
            ("I", 1, 0, 0, 10, 50.0),  # workflow, 500
            ("J", 0, 0, 0, 0, 1.0),  # no rule: skipped
        ],
        columns=["sku", "shortfall", "discontinued", "overstock", "reorder_qty", "unit_cost"],
    )


def day_two() -> pd.DataFrame:
    """B (6,000), H (4,500) and J (nothing) again."""
    frame = day_one()
    return frame[frame["sku"].isin(["B", "H", "J"])].reset_index(drop=True)


def all_short() -> pd.DataFrame:
    """Every SKU short: a blast radius of 100%."""
    frame = day_one()
    frame["shortfall"] = 1
    return frame


def row(report: Any, partition: str, scenario: str = AS_WRITTEN) -> dict[str, Any]:
    frame = report.frame
    found = frame[(frame["partition"] == partition) & (frame["scenario"] == scenario)]
    assert len(found) == 1
    return found.iloc[0].to_dict()


def counts(values: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "flagged",
        "actions",
        "autonomous",
        "escalated",
        "held_out",
        "skipped",
        "workflows",
        "approvals_needed",
        "approvals_value",
    )
    return {k: values[k] for k in keys}


# -- the numbers, against a hand count ------------------------------------------------------


def test_one_partition_counted_by_hand() -> None:
    report = backtest(playbook=stock_playbook(), insights={"d1": day_one()}, assume=ASSUME)

    assert report.scenarios == (AS_WRITTEN,)
    assert list(report.frame.columns) == ["partition", "scenario", *METRICS]
    got = row(report, "d1")
    # Flagged B C D E F G H I; F is the one action; D the one escalation; six workflows, of
    # which B, C, E and G (6,000 + 12,000 + 7,000 + 9,000) exceed 5,000 and wait for the buyer.
    assert counts(got) == {
        "flagged": 8,
        "actions": 1,
        "autonomous": 3,
        "escalated": 1,
        "held_out": 0,
        "skipped": 2,
        "workflows": 6,
        "approvals_needed": 4,
        "approvals_value": 34_000.0,
    }
    assert got["total"] == 10 and not got["blocked"]
    assert got["autonomy_rate"] == pytest.approx(3 / 8)
    assert report.blocked == {} and report.notes == ()


def test_two_thresholds_side_by_side_and_totals() -> None:
    report = backtest(
        playbook=stock_playbook(),
        insights={"d1": day_one(), "d2": day_two()},
        assume=ASSUME,
        scenarios={
            "7.5k": {"approval": "`draft_po.total` > 7500"},
            "10k": {"approval": "`draft_po.total` > 10000"},
        },
    )

    assert report.scenarios == (AS_WRITTEN, "7.5k", "10k")
    assert report.conditions["10k"] == {"replenish.approval": "`draft_po.total` > 10000"}
    assert report.conditions[AS_WRITTEN] == {"replenish.approval": "`draft_po.total` > 5000"}
    # Above 7,500: C and G; above 10,000: C alone. Day two: B (6,000) waits only at 5,000.
    assert (
        row(report, "d1", "7.5k")["approvals_needed"],
        row(report, "d1", "7.5k")["autonomous"],
    ) == (2, 5)
    assert row(report, "d1", "7.5k")["approvals_value"] == 21_000.0
    assert (
        row(report, "d1", "10k")["approvals_needed"],
        row(report, "d1", "10k")["autonomous"],
    ) == (1, 6)
    assert (row(report, "d2")["approvals_needed"], row(report, "d2")["autonomous"]) == (1, 1)
    assert (
        row(report, "d2", "10k")["approvals_needed"],
        row(report, "d2", "10k")["autonomous"],
    ) == (0, 2)

    # A threshold moves instances between autonomous and waiting for a person, so
    # 'autonomous' is shown per scenario; the escalations are the same and shown once.
    side = report.side_by_side()
    assert list(side.columns) == [
        "partition",
        "flagged",
        "workflows",
        "escalated",
        "blocked",
        *(
            f"{metric}[{label}]"
            for label in (AS_WRITTEN, "7.5k", "10k")
            for metric in ("autonomous", "approvals_needed", "approvals_value", "autonomy_rate")
        ),
    ]
    assert side["partition"].tolist() == ["d1", "d2"]
    assert side["approvals_needed[7.5k]"].tolist() == [2, 0]


def test_totals_recompute_the_rate_from_the_sums() -> None:
    report = backtest(
        playbook=stock_playbook(),
        insights={"d1": day_one(), "d2": day_two()},
        assume=ASSUME,
        scenarios={"10k": {"approval": "`draft_po.total` > 10000"}},
    )

    totals = report.totals.set_index("scenario")
    assert totals.loc[AS_WRITTEN, "partitions"] == 2
    assert totals.loc[AS_WRITTEN, "flagged"] == 10
    assert totals.loc[AS_WRITTEN, "approvals_needed"] == 5
    assert totals.loc[AS_WRITTEN, "approvals_value"] == 40_000.0
    assert totals.loc[AS_WRITTEN, "autonomy_rate"] == pytest.approx(4 / 10)
    assert totals.loc["10k", "approvals_needed"] == 1
    assert totals.loc["10k", "autonomy_rate"] == pytest.approx(8 / 10)
    side = report.side_by_side().set_index("partition")
    assert side.loc["d1", "approvals_needed[10k]"] == 1
    assert side.loc["d2", "approvals_value[as_written]"] == 6_000.0
    assert side.loc["d1", "autonomous[as_written]"] == 3
    assert side.loc["d1", "escalated"] == 1


# -- guardrails, as execute_plan decides them -----------------------------------------------


@pytest.mark.parametrize(
    ("guardrails", "insight", "reason_starts"),
    [
        ({"max_flagged_fraction": 0.9}, all_short, "10 of 10 entities flagged (100.0%)"),
        ({"max_actions": 0}, day_one, "1 actions exceed the playbook's max_actions of 0"),
    ],
)
def test_a_blocked_batch_is_escalated_as_execute_plan_does(
    guardrails: dict[str, Any], insight: Any, reason_starts: str, tmp_path: Path
) -> None:
    playbook = stock_playbook(**guardrails)
    frame = insight()

    report = backtest(playbook=playbook, insights={"d3": frame}, assume=ASSUME)

    DELIVERED.clear()
    channel = PythonChannel(function="tests.test_backtest:deliver")
    executed = execute_plan(
        route(frame, playbook, partition_key="d3"),
        playbook=playbook,
        ledger=ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}"),
        channels={"clearance_offer": channel, "draft_po": channel, "send_po": channel},
    )
    got = row(report, "d3")
    assert executed.blocked_reason is not None
    assert report.blocked == {"d3": executed.blocked_reason}
    assert report.blocked["d3"].startswith(reason_starts)
    assert got["blocked"]
    assert got["escalated"] == executed.escalated == got["flagged"]
    assert (got["autonomous"], got["workflows"], got["approvals_needed"]) == (0, 0, 0)
    assert got["autonomy_rate"] == 0.0
    assert DELIVERED == []


def test_routing_and_holdouts_match_a_dry_run_of_execute_plan(tmp_path: Path) -> None:
    playbook = Playbook(
        name="clearance",
        entity_key="sku",
        rules=[
            Rule(name="expensive", when="overstock > 0 and unit_cost > 80", escalate="Ask first"),
            Rule(name="overstock", when="overstock > 0", action="clearance_offer"),
        ],
        guardrails=Guardrails(holdout_fraction=0.3, max_flagged_fraction=0.95),
    )
    frame = pd.DataFrame(
        {
            "sku": [f"S{i:03d}" for i in range(200)],
            "overstock": [i % 5 for i in range(200)],
            "unit_cost": [float(i % 100) for i in range(200)],
        }
    )

    report = backtest(playbook=playbook, insights={"d1": frame})
    executed = execute_plan(
        route(frame, playbook, partition_key="d1"),
        playbook=playbook,
        ledger=ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}"),
        channels={"clearance_offer": PythonChannel(function="tests.test_backtest:deliver")},
        dry_run=True,
    )
    got = row(report, "d1")
    assert executed.held_out > 0  # the holdout draw did hold some out
    assert got["flagged"] == executed.flagged
    assert got["held_out"] == executed.held_out
    assert got["escalated"] == executed.escalated
    assert got["autonomous"] == got["actions"] == executed.dry_run_actions
    assert got["autonomy_rate"] == pytest.approx(executed.autonomy_rate)


# -- step conditions before and at the gate -------------------------------------------------


def test_a_gate_reading_a_skipped_steps_output_fails_the_instance() -> None:
    # draft_po runs only for orders of 100 or more: B, C and G. E, H and I never get a draft,
    # so the gate cannot read its total; a run fails them and escalates them.
    playbook = stock_playbook(draft_when="reorder_qty >= 100")

    got = row(backtest(playbook=playbook, insights={"d1": day_one()}, assume=ASSUME), "d1")

    assert counts(got) | {"autonomy_rate": got["autonomy_rate"]} == {
        "flagged": 8,
        "actions": 1,
        "autonomous": 1,
        "escalated": 4,
        "held_out": 0,
        "skipped": 2,
        "workflows": 6,
        "approvals_needed": 3,
        "approvals_value": 27_000.0,
        "autonomy_rate": 1 / 8,
    }


def test_a_gate_whose_when_does_not_hold_passes_without_a_person() -> None:
    # The gate applies only to SKUs under 100 a unit: E (350 a unit, 7,000) passes by rule.
    playbook = stock_playbook(gate_when="unit_cost < 100")

    got = row(backtest(playbook=playbook, insights={"d1": day_one()}, assume=ASSUME), "d1")

    assert (got["approvals_needed"], got["approvals_value"]) == (3, 27_000.0)
    assert (got["autonomous"], got["escalated"]) == (4, 1)


def test_the_value_comes_from_the_gates_value_column() -> None:
    by_units = stock_playbook(gate_value="reorder_qty")

    got = row(backtest(playbook=by_units, insights={"d1": day_one()}, assume=ASSUME), "d1")

    # B, C, E and G wait; their order quantities are 100, 200, 20 and 300.
    assert (got["approvals_needed"], got["approvals_value"]) == (4, 620.0)
    with pytest.raises(PlaybookError, match=r"reads 'draft_po.lines'.*--assume 'draft_po.lines="):
        backtest(
            playbook=stock_playbook(gate_value="draft_po.lines"),
            insights={"d1": day_one()},
            assume=ASSUME,
        )


def test_a_when_reading_an_output_nobody_assumed_is_counted_as_holding_and_noted() -> None:
    playbook = stock_playbook(send_when="`draft_po.supplier` != 'blocked'")

    report = backtest(playbook=playbook, insights={"d1": day_one()}, assume=ASSUME)

    assert counts(row(report, "d1")) == counts(
        row(backtest(playbook=stock_playbook(), insights={"d1": day_one()}, assume=ASSUME), "d1")
    )
    assert len(report.notes) == 1
    assert "'send_po'" in report.notes[0] and "'draft_po.supplier'" in report.notes[0]


def test_scenarios_name_a_gate_by_workflow_where_two_workflows_share_its_name() -> None:
    gate = Step(name="approval", approve_when="`draft_po.total` > 5000", approvers=("buyer",))
    playbook = Playbook(
        name="two_flows",
        entity_key="sku",
        rules=[
            Rule(name="urgent", when="shortfall > 5", workflow="rush"),
            Rule(name="short", when="shortfall > 0", workflow="replenish"),
        ],
        workflows={
            name: Workflow(steps=[Step(name="draft_po", action="draft_po"), gate])
            for name in ("rush", "replenish")
        },
        guardrails=Guardrails(max_flagged_fraction=0.9),
    )
    assert [(w, s.name) for w, s in approval_steps(playbook)] == [
        ("rush", "approval"),
        ("replenish", "approval"),
    ]
    with pytest.raises(PlaybookError, match=r"more than one workflow has an approval step"):
        backtest(
            playbook=playbook,
            insights={"d1": day_one()},
            assume=ASSUME,
            scenarios={"x": {"approval": "`draft_po.total` > 1"}},
        )

    report = backtest(
        playbook=playbook,
        insights={"d1": day_one()},
        assume=ASSUME,
        scenarios={"rush_20k": {"rush.approval": "`draft_po.total` > 20000"}},
    )

    # Rush (shortfall > 5): C (12,000). Replenish: B D E G H I; above 5,000: B E G.
    assert (row(report, "d1")["approvals_needed"], row(report, "d1")["approvals_value"]) == (
        4,
        34_000.0,
    )
    # Above 20,000 for rush orders only: C passes, replenish's gate is as written.
    assert row(report, "d1", "rush_20k")["approvals_needed"] == 3
    assert row(report, "d1", "rush_20k")["approvals_value"] == 22_000.0


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("assume", "scenarios", "message"),
    [
        (
            None,
            None,
            r"reads 'draft_po.total', an output of step 'draft_po', which does not run "
            r"in a backtest; say what it would be with assume=\{'draft_po.total'",
        ),
        ({"draft_po": "1"}, None, r"must name a step output as '<step>.<field>'"),
        ({"draft.total": "1"}, None, r"names step 'draft', which no workflow the playbook"),
        ({"draft_po.total": "reorder_qty *"}, None, r"does not parse"),
        ({"draft_po.total": "__import__('os')"}, None, r"uses Call, which rules do not allow"),
        ({"draft_po.total": "`send_po.x` * 2"}, None, r"from the insight's columns only"),
        (ASSUME, {"5k": {"nope": "`draft_po.total` > 1"}}, r"'nope' is not an approval step"),
        (ASSUME, {"5k": {"draft_po": "`draft_po.total` > 1"}}, r"'draft_po' is not an approval"),
        (ASSUME, {"5k": {"approval": "`draft_po.total` >"}}, r"does not parse"),
        (ASSUME, {"5k": {"approval": "`send_po.total` > 1"}}, r"step 'send_po', which comes later"),
        (ASSUME, {"5k": {"approval": "`draft_po.cost` > 1"}}, r"reads 'draft_po.cost'.*assume="),
        (ASSUME, {AS_WRITTEN: {"approval": "`draft_po.total` > 1"}}, r"is the playbook as written"),
        (ASSUME, {"": {"approval": "`draft_po.total` > 1"}}, r"label is empty"),
        (ASSUME, {"5k": {}}, r"changes no approval step"),
    ],
)
def test_bad_assumptions_and_scenarios_are_refused_naming_the_problem(
    assume: dict[str, str] | None, scenarios: dict[str, dict[str, str]] | None, message: str
) -> None:
    with pytest.raises(PlaybookError, match=message):
        backtest(
            playbook=stock_playbook(),
            insights={"d1": day_one()},
            assume=assume,
            scenarios=scenarios,
        )


def test_bad_partitions_are_refused_naming_the_partition() -> None:
    with pytest.raises(InsightValidationError, match=r"no insight partitions"):
        backtest(playbook=stock_playbook(), insights={}, assume=ASSUME)
    twice = pd.concat([day_one(), day_one().head(1)])
    with pytest.raises(InsightValidationError, match=r"partition 'd2': .*'A'"):
        backtest(playbook=stock_playbook(), insights={"d1": day_one(), "d2": twice}, assume=ASSUME)
    no_cost = day_one().drop(columns=["unit_cost"])
    with pytest.raises(
        InsightValidationError,
        match=r"partition 'd1': assume 'draft_po.total' reads column\(s\) \['unit_cost'\]",
    ):
        backtest(playbook=stock_playbook(), insights={"d1": no_cost}, assume=ASSUME)


# -- the command line -------------------------------------------------------------------------


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, ["backtest", *args], catch_exceptions=False)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A playbook YAML and two CSV partitions under tmp_path/insights."""
    (tmp_path / "stock.yaml").write_text(stock_playbook().to_yaml(), encoding="utf-8")
    folder = tmp_path / "insights"
    folder.mkdir()
    day_one().to_csv(folder / "2026-11-01.csv", index=False)
    day_two().to_csv(folder / "2026-11-02.csv", index=False)
    return tmp_path


def test_cli_prints_the_side_by_side_table_and_totals(files: Path) -> None:
    result = run(
        "--playbook", str(files / "stock.yaml"),
        "--insights", str(files / "insights"),
        "--assume", "draft_po.total=reorder_qty * unit_cost",
        "--approve-when", "10k=`draft_po.total` > 10000",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("Backtest of playbook 'stock_replenishment' over 2 partition(s)")
    assert "  10k: replenish.approval: `draft_po.total` > 10000" in lines
    day = next(line.split() for line in lines if line.startswith("2026-11-01"))
    # partition flagged workflows escalated, then per scenario approvals, value, autonomy,
    # autonomous per scenario (it differs between the thresholds).
    assert day[:4] == ["2026-11-01", "8", "6", "1"]
    assert day[4:] == ["3", "4", "34,000.00", "37.5%", "6", "1", "12,000.00", "75.0%"]
    total = next(line.split() for line in lines if line.split()[:1] == ["10k"])
    assert total[:2] == ["10k", "2"] and total[-1] == "80.0%"


def test_cli_takes_files_after_insights_and_prints_json_or_csv(files: Path) -> None:
    base = [
        "--playbook", str(files / "stock.yaml"),
        "--insights", str(files / "insights" / "2026-11-01.csv"), str(files / "insights" / "2026-11-02.csv"),
        "--assume", "draft_po.total=reorder_qty * unit_cost",
        "--approve-when", "10k:approval=`draft_po.total` > 10000",
    ]  # fmt: skip

    as_json = run(*base, "--json")
    as_csv = run(*base, "--csv")

    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert data["scenarios"] == [AS_WRITTEN, "10k"]
    totals = {t["scenario"]: t for t in data["totals"]}
    assert totals[AS_WRITTEN]["approvals_value"] == 40_000.0
    assert totals["10k"]["autonomous"] == 8
    assert [p["partition"] for p in data["partitions"]] == ["2026-11-01"] * 2 + ["2026-11-02"] * 2
    assert as_csv.exit_code == 0, as_csv.output
    frame = pd.read_csv(io.StringIO(as_csv.output))
    assert list(frame.columns) == ["partition", "scenario", *METRICS]
    assert frame.groupby("scenario")["approvals_needed"].sum().to_dict() == {
        AS_WRITTEN: 5,
        "10k": 1,
    }


def test_cli_reads_parquet_or_names_the_engine_it_lacks(files: Path) -> None:
    path = files / "2026-11-05.parquet"
    try:
        day_one().to_parquet(path)
        engine = True
    except ImportError:
        path.write_bytes(b"PAR1 not really parquet PAR1")
        engine = False

    result = run(
        "--playbook", str(files / "stock.yaml"), "--insights", str(path),
        "--assume", "draft_po.total=reorder_qty * unit_cost", "--json",
    )  # fmt: skip

    if engine:
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["partitions"][0]["approvals_needed"] == 4
    else:
        assert result.exit_code == 2
        assert "reading parquet needs pyarrow" in result.output


def bad_files(folder: Path) -> dict[str, Path]:
    (folder / "empty.csv").write_text("", encoding="utf-8")
    (folder / "notes.txt").write_text("a,b\n1,2\n", encoding="utf-8")
    (folder / "nothing").mkdir()
    (folder / "other").mkdir()
    day_two().to_csv(folder / "other" / "2026-11-01.csv", index=False)
    lacking = day_one().drop(columns=["shortfall"])
    lacking.to_csv(folder / "lacking.csv", index=False)
    return {
        "empty": folder / "empty.csv",
        "txt": folder / "notes.txt",
        "nothing": folder / "nothing",
        "same_key": folder / "other" / "2026-11-01.csv",
        "lacking": folder / "lacking.csv",
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["{empty}"], r"empty.csv does not load as csv: No columns to parse"),
        (["{txt}"], r"notes.txt: not a parquet \(.parquet, .pq\) or CSV \(.csv\) file"),
        (["{nothing}"], r"nothing holds no parquet or CSV file"),
        (["{missing}"], r"insight file .*missing.csv does not exist"),
        (["{day}", "{same_key}"], r"both give partition '2026-11-01'"),
        (
            ["{lacking}"],
            r"partition 'lacking': playbook 'stock_replenishment': the insight lacks column\(s\) 'shortfall'",
        ),
        (["{day}", "--approve-when", "5k=`draft_po.total` >"], r"does not parse"),
        (
            ["{day}", "--approve-when", "5k:nope=`draft_po.total` > 1"],
            r"'nope' is not an approval step",
        ),
        (
            [
                "{day}",
                "--approve-when",
                "5k=`draft_po.total` > 1",
                "--approve-when",
                "5k=`draft_po.total` > 2",
            ],
            r"scenario '5k' is given twice for step 'approval'",
        ),
        (["{day}", "--approve-when", "5k"], r"must be written LABEL=EXPR or LABEL:STEP=EXPR"),
        (["{day}", "--approve-when", "a b=`draft_po.total` > 1"], r"the label 'a b' must be"),
        (
            ["{day}", "--assume", "draft_po.total"],
            r"--assume 'draft_po.total' must be written STEP.FIELD=EXPR",
        ),
        (
            ["{day}", "--assume", "draft_po.total=1", "--assume", "draft_po.total=2"],
            r"gives 'draft_po.total' twice",
        ),
        (["{day}", "--json", "--csv"], r"choose one of --json and --csv"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(files: Path, extra: list[str], message: str) -> None:
    paths = {k: str(v) for k, v in bad_files(files).items()}
    paths |= {
        "missing": str(files / "missing.csv"),
        "day": str(files / "insights" / "2026-11-01.csv"),
    }
    args = [a.format(**paths) for a in extra]
    assume = [] if "--assume" in args else ["--assume", "draft_po.total=reorder_qty * unit_cost"]

    result = run("--playbook", str(files / "stock.yaml"), *assume, "--insights", *args)

    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("error: ")
    assert re.search(message, result.output), result.output


def test_cli_needs_the_step_named_where_the_playbook_has_two_gates(tmp_path: Path) -> None:
    gate = Step(name="approval", approve_when="`draft_po.total` > 5000", approvers=("buyer",))
    second = Step(name="finance", approve_when="`draft_po.total` > 50000", approvers=("cfo",))
    playbook = Playbook(
        name="two_gates",
        entity_key="sku",
        rules=[Rule(name="short", when="shortfall > 0", workflow="replenish")],
        workflows={
            "replenish": Workflow(steps=[Step(name="draft_po", action="draft_po"), gate, second])
        },
        guardrails=Guardrails(max_flagged_fraction=0.9),
    )
    (tmp_path / "p.yaml").write_text(playbook.to_yaml(), encoding="utf-8")
    day_one().to_csv(tmp_path / "d1.csv", index=False)
    args = ["--playbook", str(tmp_path / "p.yaml"), "--insights", str(tmp_path / "d1.csv")]
    args += ["--assume", "draft_po.total=reorder_qty * unit_cost"]

    vague = run(*args, "--approve-when", "10k=`draft_po.total` > 10000")
    named = run(
        *args, "--approve-when", "10k:approval=`draft_po.total` > 10000",
        "--approve-when", "10k:finance=`draft_po.total` > 10000", "--json",
    )  # fmt: skip

    assert vague.exit_code == 2
    assert "several approval steps (replenish.approval, replenish.finance)" in vague.output
    assert named.exit_code == 0, named.output
    data = json.loads(named.output)
    by_scenario = {p["scenario"]: p for p in data["partitions"]}
    # Short: B C D E G H I. As written B, C, E and G are above 5,000 at the first gate and
    # none is above 50,000 at the second; at 10k both gates ask about C (12,000) alone.
    assert by_scenario[AS_WRITTEN]["approvals_needed"] == 4
    assert by_scenario["10k"]["approvals_needed"] == 2
    assert by_scenario["10k"]["approvals_value"] == 24_000.0
    assert any("more than one approval gate" in note for note in data["notes"])


# -- no side effect ---------------------------------------------------------------------------

_EVENTS: list[tuple[str, str]] = []
_WATCHING: list[bool] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # Audit hooks cannot be removed; this one only listens while a test sets _WATCHING.
    if not _WATCHING:
        return
    if event.startswith("socket.") or event == "sqlite3.connect":
        _EVENTS.append((event, repr(args)[:200]))
    elif event == "open":
        path, mode, flags = [*args, None, None, 0][:3]
        writes = (
            any(c in mode for c in "wax+")
            if isinstance(mode, str)
            else bool((flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        )
        # Python's bytecode cache may be written by a lazy import; that is not the backtest's.
        if writes and "__pycache__" not in str(path):
            _EVENTS.append((event, str(path)))


sys.addaudithook(_audit)


def test_a_backtest_opens_no_ledger_no_socket_and_writes_no_file(
    files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("AUTOEXEC_LEDGER_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    _WATCHING.append(True)
    try:
        result = run(
            "--playbook", str(files / "stock.yaml"), "--insights", str(files / "insights"),
            "--assume", "draft_po.total=reorder_qty * unit_cost",
            "--approve-when", "10k=`draft_po.total` > 10000",
        )  # fmt: skip
        report = backtest(playbook=stock_playbook(), insights={"d1": day_one()}, assume=ASSUME)
    finally:
        _WATCHING.clear()

    assert result.exit_code == 0, result.output
    assert not math.isnan(report.frame["autonomy_rate"].iloc[0])
    assert _EVENTS == []
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "ledger.db").exists()
