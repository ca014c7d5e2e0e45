"""Great Expectations checks on the insight: bad input stops the batch with a clear message."""

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from autoexec_dagster.dagster.insight_checks import (
    as_insight_frame,
    evaluate_insight,
)
from autoexec_dagster.errors import InsightValidationError
from autoexec_dagster.playbook import Playbook
from tests.conftest import churn_playbook, churn_scores
from tests.test_execution_assets import PLAYBOOK, make_project, materializations, step_failures

VALID = f"{PLAYBOOK}_valid_input"
SHARE = f"{PLAYBOOK}_flagged_share"


def ranged_playbook(**guardrails: object) -> Playbook:
    return churn_playbook(**guardrails).model_copy(
        update={"score_ranges": {"churn_score": (0.0, 1.0)}}
    )


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {
        e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def with_nan_scores(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(churn_score=frame["churn_score"].where(frame.index % 50 != 0))


def with_duplicate_ids(frame: pd.DataFrame) -> pd.DataFrame:
    ids = frame["customer_id"].tolist()
    ids[1] = ids[0]
    return frame.assign(customer_id=ids)


def mostly_flagged(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(
        churn_score=np.where(np.arange(len(frame)) % 10 < 8, 0.95, 0.1),
        lifetime_value=100.0,
        confidence=0.9,
    )


def test_passing_data_passes_both_checks_and_executes(tmp_path: Path) -> None:
    project = make_project(
        tmp_path, {"p1": churn_scores(200)}, playbook=ranged_playbook(max_flagged_fraction=0.9)
    )
    project.materialize_insight("p1")

    result = project.run("p1")

    assert result.success
    checks = check_results(result)
    assert checks[VALID].passed and checks[SHARE].passed
    evaluated = checks[VALID].metadata["expectations_evaluated"].value
    assert isinstance(evaluated, int) and evaluated >= 8
    assert checks[VALID].metadata["expectations_failed"].value == 0
    assert checks[SHARE].metadata["flagged_fraction"].value == pytest.approx(
        (project.expected_plan("p1")["decision"] != "skip").mean()
    )
    assert project.recorder.keys


@pytest.mark.parametrize(
    ("spoil", "expectation", "message"),
    [
        (with_nan_scores, "expect_column_values_to_not_be_null(churn_score)", "NaN value(s)"),
        (with_duplicate_ids, "expect_column_values_to_be_unique(customer_id)", "must be unique"),
        (
            lambda f: f.assign(churn_score=f["churn_score"] * 3),
            "expect_column_values_to_be_between(churn_score)",
            "must lie in [0.0, 1.0]",
        ),
        (
            lambda f: f.drop(columns=["confidence"]),
            "expect_column_to_exist(confidence)",
            "lacks column(s) 'confidence'",
        ),
    ],
    ids=["nan-scores", "duplicate-ids", "out-of-range", "missing-column"],
)
def test_bad_input_fails_the_blocking_check_and_nothing_is_executed(
    tmp_path: Path, spoil, expectation: str, message: str
) -> None:
    project = make_project(
        tmp_path,
        {"p1": spoil(churn_scores(200))},
        playbook=ranged_playbook(max_flagged_fraction=0.9),
    )
    project.materialize_insight("p1")

    result = project.run("p1")

    assert not result.success
    check = check_results(result)[VALID]
    assert not check.passed
    assert check.metadata["failed_expectation"].value == expectation
    assert expectation.split("(")[0] in str(check.metadata["failed_expectations"].value)
    assert message in str(check.description)
    assert materializations(result) == {}
    assert project.recorder.keys == []
    assert project.ledger.actions(playbook=PLAYBOOK).empty


def test_an_implausible_flagged_share_blocks_escalates_and_executes_nothing(
    tmp_path: Path,
) -> None:
    project = make_project(
        tmp_path, {"p1": mostly_flagged(churn_scores(100))}, playbook=churn_playbook()
    )
    project.materialize_insight("p1")

    result = project.run("p1")

    assert not result.success
    check = check_results(result)[SHARE]
    assert not check.passed
    assert check.metadata["failed_expectation"].value == "expect_column_mean_to_be_between(flagged)"
    assert check.metadata["flagged_fraction"].value == pytest.approx(0.8)
    assert check.metadata["escalated"].value is True
    assert "80.0%" in str(check.description)
    assert check_results(result)[VALID].passed
    assert materializations(result) == {}
    assert project.recorder.keys == []
    assert project.ledger.actions(playbook=PLAYBOOK).empty
    queue = project.ledger.escalations(playbook=PLAYBOOK, partition_key="p1")
    assert list(queue["kind"]) == ["guardrail"]
    assert "80.0%" in str(queue.loc[0, "reason"])

    # The same bad batch again: still blocked, still one escalation.
    assert not project.run("p1").success
    assert len(project.ledger.escalations(playbook=PLAYBOOK, partition_key="p1")) == 1


def test_a_reporting_only_flagged_share_check_leaves_the_guardrail_to_the_executor(
    tmp_path: Path,
) -> None:
    project = make_project(
        tmp_path,
        {"p1": mostly_flagged(churn_scores(100))},
        playbook=churn_playbook(),
        flagged_share_blocking=False,
    )
    project.materialize_insight("p1")

    result = project.run("p1")

    assert not check_results(result)[SHARE].passed
    assert set(materializations(result))  # the execution assets ran and report the block
    assert project.recorder.keys == []
    assert "succeeded" not in set(project.ledger.actions(playbook=PLAYBOOK)["state"])
    queue = project.ledger.escalations(playbook=PLAYBOOK, partition_key="p1")
    assert list(queue["kind"]) == ["guardrail"]


def test_without_the_checks_the_route_op_fails_with_the_same_message(tmp_path: Path) -> None:
    project = make_project(
        tmp_path,
        {"p1": with_duplicate_ids(churn_scores(100))},
        playbook=ranged_playbook(max_flagged_fraction=0.9),
    )
    project.materialize_insight("p1")
    keys = {dg.AssetKey([PLAYBOOK, name]) for name in ("plan", "actions", "escalations")}
    job = project.defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection=keys, asset_check_selection=set()
    )

    result = job.execute_in_process(
        partition_key="p1", instance=project.instance, raise_on_error=False
    )

    assert not result.success
    assert check_results(result) == {}
    failures = step_failures(result)
    validate = next(v for k, v in failures.items() if k.endswith(f"{PLAYBOOK}_route"))
    valid, _share = evaluate_insight(project.frames["p1"], project.playbook)
    assert validate == valid.description
    assert project.recorder.keys == []


def test_evaluate_insight_names_type_problems_and_hides_personal_examples() -> None:
    playbook = ranged_playbook()
    frame = churn_scores(50).assign(churn_score=lambda f: f["churn_score"].astype(str))

    valid, share = evaluate_insight(frame, playbook)

    assert not valid.passed
    assert valid.failures[0].label == "expect_column_values_to_be_in_type_list(churn_score)"
    assert "must be numeric" in valid.description
    assert not share.passed and "cannot be routed" in share.description

    personal = churn_scores(20)
    personal.loc[3, "email"] = None
    book = ranged_playbook().model_copy(update={"required_columns": ("email",)})
    outcome, _ = evaluate_insight(personal, book)
    assert outcome.passed  # null e-mails are allowed: only ids and scores are checked
    dupes = with_duplicate_ids(churn_scores(20))
    entity_personal = book.model_copy(update={"personal_columns": ("customer_id",)})
    outcome, _ = evaluate_insight(dupes, entity_personal)
    detail = outcome.failures[0].detail
    assert "unexpected value(s)" in detail and "e.g." not in detail


def test_an_empty_partition_passes() -> None:
    valid, share = evaluate_insight(churn_scores(0), ranged_playbook())
    assert valid.passed and share.passed


def test_as_insight_frame_explains_what_it_needs() -> None:
    frame = churn_scores(3)
    assert as_insight_frame(frame, insight="x") is frame
    with pytest.raises(InsightValidationError, match="pass partitions_def="):
        as_insight_frame({"p1": frame}, insight="x")
    with pytest.raises(InsightValidationError, match="must load as a pandas DataFrame"):
        as_insight_frame([1, 2], insight="x")


def test_a_dry_run_playbook_records_no_escalation_when_the_share_check_blocks(
    tmp_path: Path,
) -> None:
    project = make_project(
        tmp_path, {"p1": mostly_flagged(churn_scores(100))}, playbook=churn_playbook(dry_run=True)
    )
    project.materialize_insight("p1")

    result = project.run("p1")

    check = check_results(result)[SHARE]
    assert not check.passed  # still blocks: the share is implausible in a dry run too
    assert "escalated" not in check.metadata
    assert project.ledger.escalations(playbook=PLAYBOOK, status=None).empty
    assert project.recorder.keys == []
