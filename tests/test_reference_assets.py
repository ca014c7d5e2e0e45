"""The reference churn pipeline: generated customers, the churn model and daily churn scores."""

import datetime as dt
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml

from assets import churn_assets, churn_model, churn_outcomes, churn_scores, raw_customers
from assets.customers import (
    CUSTOMER_COLUMNS,
    DAILY_CUSTOMERS,
    EMAIL_DOMAINS,
    FEATURES,
    OUTCOME_COLUMNS,
    PLAN_CHARGE_RANGE,
    PLANS,
    PREVIEW_ROWS,
    REGIONS,
    SCORE_COLUMNS,
    SCORING_SEED,
    churn_logit,
    generate_customers,
    generate_training_snapshot,
    mask_email,
    score_customers,
    train_churn_model,
)
from resources import CHURN_PLAYBOOK_PATH

DAY = dt.date(2026, 11, 1)
EMAIL = re.compile(r"^[a-z]+\.[a-z]+\d+@example\.(com|org|net)$")
# Small populations keep the Dagster runs fast; the real sizes are checked without Dagster.
SMALL_RUN_CONFIG = {
    "ops": {
        "raw_customers": {"config": {"n_customers": 4000}},
        "churn_scores": {"config": {"n_customers": 1500}},
    }
}


def _all(values: Any) -> bool:
    return bool(np.all(values))


def _share(values: Any) -> float:
    return float(np.mean(values))


def test_generator_is_deterministic_per_seed_and_day() -> None:
    first = generate_customers(2000, seed=11, as_of=DAY)
    pd.testing.assert_frame_equal(first, generate_customers(2000, seed=11, as_of=DAY))

    next_day = generate_customers(2000, seed=11, as_of=DAY + dt.timedelta(days=1))
    who = ["customer_id", "name", "email", "signup_date", "plan", "monthly_charge", "region"]
    pd.testing.assert_frame_equal(first.reindex(columns=who), next_day.reindex(columns=who))
    assert not first["usage_trend"].equals(next_day["usage_trend"])

    other_population = generate_customers(2000, seed=12, as_of=DAY)
    assert not first["email"].equals(other_population["email"])


def test_customer_columns_and_dtypes() -> None:
    customers = generate_customers(1000, seed=3, as_of=DAY)
    assert tuple(customers.columns) == CUSTOMER_COLUMNS
    for column in ("customer_id", "name", "email", "plan", "region"):
        assert pd.api.types.is_string_dtype(customers[column]), column
    for column in ("tenure_months", "support_tickets_90d", "last_login_days"):
        assert pd.api.types.is_integer_dtype(customers[column]), column
    for column in ("monthly_charge", "usage_trend", "lifetime_value"):
        assert pd.api.types.is_float_dtype(customers[column]), column
    assert pd.api.types.is_datetime64_any_dtype(customers["signup_date"])
    assert not customers.isna().any().any()
    assert len(generate_customers(0, seed=3, as_of=DAY)) == 0


def test_customers_are_plausible() -> None:
    customers = generate_customers(DAILY_CUSTOMERS, seed=SCORING_SEED, as_of=DAY)
    assert _all(customers["customer_id"].str.fullmatch(r"C\d{6}"))
    assert customers["customer_id"].is_unique and customers["email"].is_unique
    assert _all(customers["email"].str.fullmatch(EMAIL))
    assert set(customers["email"].str.split("@").str[1]) == set(EMAIL_DOMAINS)
    assert _all(customers["name"].str.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+"))
    assert set(customers["plan"]) == set(PLANS) and set(customers["region"]) == set(REGIONS)
    for plan, (low, high) in PLAN_CHARGE_RANGE.items():
        charges = customers.loc[customers["plan"] == plan, "monthly_charge"]
        assert _all(charges.between(low, high)), plan
    assert _all(customers["usage_trend"].between(-1, 1))
    assert _share(customers["usage_trend"] < 0) > 0.05  # some customers are drifting away
    assert _all(customers["support_tickets_90d"].between(0, 30))
    assert _all(customers["last_login_days"].between(0, 365))
    assert _all(customers["tenure_months"].between(0, 130))
    assert _all(customers["signup_date"] < pd.Timestamp(DAY))
    revenue = customers["monthly_charge"] * customers["tenure_months"]
    assert _all(customers["lifetime_value"].between(0.9 * revenue, 1.2 * revenue))
    # The share the vip_at_risk rule can ever match: a few percent of all customers.
    assert 0.01 < _share(customers["lifetime_value"] >= 5000) < 0.1


def test_training_labels_follow_the_hidden_propensity() -> None:
    snapshot = generate_training_snapshot(20_000)
    assert snapshot["churned"].dtype == bool
    churned = snapshot["churned"].to_numpy(dtype=bool)
    assert 0.05 < _share(churned) < 0.15
    logit = churn_logit(snapshot)
    top, bottom = logit >= np.quantile(logit, 0.9), logit <= np.quantile(logit, 0.5)
    assert _share(churned[top]) > 10 * _share(churned[bottom])


def test_mask_email_keeps_only_a_hint() -> None:
    assert mask_email("ava.smith12@example.com") == "a***@example.com"
    assert mask_email("not-an-address") == "***"


@pytest.fixture(scope="module")
def trained() -> tuple[Any, dict[str, Any]]:
    """The model of the real configuration: 50,000 labelled customers."""
    return train_churn_model(generate_training_snapshot())


def _route(scores: pd.DataFrame, rules: list[dict[str, Any]]) -> pd.Series:
    """First matching rule per row, evaluated with DataFrame.eval as the library does."""
    decided = pd.Series("", index=scores.index, dtype="str")
    for rule in rules:
        matches = scores.eval(rule["when"])
        assert isinstance(matches, pd.Series)
        decided[matches & (decided == "")] = rule["name"]
    return decided


def test_model_learns_the_propensity(trained: tuple[Any, dict[str, Any]]) -> None:
    model, metrics = trained
    assert metrics["training_rows"] == 40_000 and metrics["test_rows"] == 10_000
    assert metrics["roc_auc"] > 0.8
    assert metrics["precision_at_threshold"] > 0.6
    assert 0.2 < metrics["recall_at_threshold"] < 0.9
    customers = generate_customers(5000, seed=SCORING_SEED, as_of=DAY)
    scores = score_customers(model, customers)
    score = pd.Series(scores["churn_score"].to_numpy())
    rank_correlation = pd.Series(churn_logit(customers)).corr(score, "spearman")
    assert rank_correlation > 0.6


@pytest.mark.parametrize("day", ["2026-11-01", "2026-11-15", "2026-11-24"])
def test_real_configuration_flags_about_1000_and_escalates_about_5_percent(
    trained: tuple[Any, dict[str, Any]], day: str
) -> None:
    model, _ = trained
    customers = generate_customers(
        DAILY_CUSTOMERS, seed=SCORING_SEED, as_of=dt.date.fromisoformat(day)
    )
    scores = score_customers(model, customers)
    playbook = yaml.safe_load(CHURN_PLAYBOOK_PATH.read_text())
    decided = _route(scores, playbook["rules"])

    flagged = int(np.sum(scores["churn_score"].to_numpy() >= 0.5))
    assert 800 <= flagged <= 1200
    # Every flagged customer gets exactly one rule, and nobody else gets one.
    assert int((decided != "").sum()) == flagged
    escalating = {rule["name"] for rule in playbook["rules"] if "escalate" in rule}
    escalated = int(decided.isin(escalating).sum())
    assert 0.03 <= escalated / flagged <= 0.08
    counts = {str(rule): int(n) for rule, n in decided.value_counts().items()}
    assert counts["vip_at_risk"] > 0 and counts["unsure"] > 0
    assert counts["at_risk"] > counts["watch"] > 0


def test_playbook_yaml_matches_the_story() -> None:
    playbook = yaml.safe_load(CHURN_PLAYBOOK_PATH.read_text())
    assert playbook["name"] == "churn_outreach" and playbook["entity_key"] == "customer_id"
    assert [rule["name"] for rule in playbook["rules"]] == [
        "vip_at_risk",
        "unsure",
        "at_risk",
        "watch",
    ]
    actions = {rule["name"]: rule.get("action") for rule in playbook["rules"]}
    assert actions["at_risk"] == "retention_email" and actions["watch"] == "crm_task"
    referenced = set(re.findall(r"[a-z_]+", " ".join(r["when"] for r in playbook["rules"])))
    assert referenced - {"and"} <= set(SCORE_COLUMNS)
    assert set(playbook["required_columns"]) <= set(SCORE_COLUMNS)
    assert set(playbook["score_ranges"]) <= set(SCORE_COLUMNS)


def test_library_routes_a_real_partition_as_the_masks_say(
    trained: tuple[Any, dict[str, Any]],
) -> None:
    # Imported here: a change in the library's API fails this test, not the whole module.
    from autoexec_dagster.playbook import Playbook
    from autoexec_dagster.routing import route

    playbook = Playbook.from_yaml(CHURN_PLAYBOOK_PATH)
    assert [rule.name for rule in playbook.rules] == ["vip_at_risk", "unsure", "at_risk", "watch"]
    model, _ = trained
    scores = score_customers(
        model, generate_customers(DAILY_CUSTOMERS, seed=SCORING_SEED, as_of=DAY)
    )
    plan = route(scores, playbook, partition_key=DAY.isoformat(), insight_name="churn_scores")

    expected = _route(scores, yaml.safe_load(CHURN_PLAYBOOK_PATH.read_text())["rules"])
    acted_on = plan["decision"].astype(str) != "skip"
    assert plan["rule"].astype(str).where(acted_on, "").tolist() == expected.tolist()
    decisions = {str(d): int(n) for d, n in plan["decision"].value_counts().items()}
    flagged = decisions["act"] + decisions["escalate"] + decisions["holdout"]
    assert 800 <= flagged <= 1200 and 0.03 <= decisions["escalate"] / flagged <= 0.08
    # About a tenth of the would-be actions are the control group (holdout_fraction 0.1).
    assert 0.07 <= decisions["holdout"] / (decisions["act"] + decisions["holdout"]) <= 0.13


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.ephemeral() as ephemeral:
        yield ephemeral


def _materialization(result: dg.ExecuteInProcessResult, key: str) -> dg.AssetMaterialization:
    events = [
        event.materialization
        for event in result.get_asset_materialization_events()
        if event.materialization.asset_key == dg.AssetKey(key)
    ]
    assert len(events) == 1
    return events[0]


def test_pipeline_materializes_one_partition(instance: dg.DagsterInstance, tmp_path: Path) -> None:
    # churn_outcomes reads the exposures of a ledger: a fresh one here, not the project's.
    ledger = {"config": {"ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}"}}
    run_config = {"ops": {**SMALL_RUN_CONFIG["ops"], "churn_outcomes": ledger}}
    result = dg.materialize(
        churn_assets, instance=instance, partition_key="2026-11-01", run_config=run_config
    )
    assert result.success
    # Nobody was acted on yet, so nothing was observed: an empty frame of the outcome columns.
    outcomes = result.output_for_node("churn_outcomes")
    assert tuple(outcomes.columns) == OUTCOME_COLUMNS and outcomes.empty
    assert _materialization(result, "churn_outcomes").metadata["dagster/row_count"].value == 0

    model_meta = _materialization(result, "churn_model").metadata
    assert 0.5 < model_meta["roc_auc"].value <= 1.0  # pyright: ignore[reportOperatorIssue]
    assert model_meta["training_rows"].value == 3200
    assert model_meta["features"].value == list(FEATURES)
    for key in ("precision_at_threshold", "recall_at_threshold", "test_rows"):
        assert key in model_meta

    scores = result.output_for_node("churn_scores")
    assert tuple(scores.columns) == SCORE_COLUMNS and len(scores) == 1500
    assert scores["churn_score"].between(0, 1).all() and scores["confidence"].between(0, 1).all()
    np.testing.assert_allclose(scores["confidence"], (2 * scores["churn_score"] - 1).abs(), 1e-5)

    materialization = _materialization(result, "churn_scores")
    assert materialization.partition == "2026-11-01"
    meta = materialization.metadata
    assert meta["dagster/row_count"].value == 1500
    assert meta["flagged"].value == int(np.sum(scores["churn_score"].to_numpy() >= 0.5))
    preview = meta["preview"].value
    assert isinstance(preview, dg.TableMetadataValue)
    assert len(preview.records) == PREVIEW_ROWS
    # No personal data in metadata: no address and no name, anywhere.
    serialized = json.dumps({k: str(v.value) for k, v in meta.items()})
    for email, name in zip(scores["email"], scores["name"], strict=True):
        assert email not in serialized and name not in serialized
    masked = re.compile(r"[a-z]\*\*\*@example\.(com|org|net)")
    assert all(masked.fullmatch(str(record.data["email"])) for record in preview.records)


def test_scores_load_the_model_a_previous_run_stored(instance: dg.DagsterInstance) -> None:
    # As under the daemon: the model is trained once, and each day's run loads it from storage.
    trained = dg.materialize(
        churn_assets,
        instance=instance,
        selection=[raw_customers, churn_model],
        run_config={"ops": {"raw_customers": SMALL_RUN_CONFIG["ops"]["raw_customers"]}},
    )
    assert trained.success
    days = {}
    for day in ("2026-11-02", "2026-11-03"):
        result = dg.materialize(
            churn_assets,
            instance=instance,
            selection=[churn_scores],
            partition_key=day,
            run_config={"ops": {"churn_scores": SMALL_RUN_CONFIG["ops"]["churn_scores"]}},
        )
        assert result.success
        days[day] = result.output_for_node("churn_scores")
    assert days["2026-11-02"]["customer_id"].equals(days["2026-11-03"]["customer_id"])
    assert not days["2026-11-02"]["churn_score"].equals(days["2026-11-03"]["churn_score"])
    materialized = instance.get_materialized_partitions(dg.AssetKey("churn_scores"))
    assert materialized == {"2026-11-02", "2026-11-03"}


def test_outcomes_are_a_daily_asset_downstream_of_the_actions() -> None:
    assert churn_outcomes in churn_assets
    assert churn_outcomes.partitions_def == churn_scores.partitions_def
    (dep,) = churn_outcomes.specs_by_key[churn_outcomes.key].deps
    assert dep.asset_key == dg.AssetKey(["churn_outreach", "actions"])
    # The outcomes of a day are those of the customers exposed in the 14 days up to it.
    mapping = dep.partition_mapping
    assert isinstance(mapping, dg.TimeWindowPartitionMapping)
    assert (mapping.start_offset, mapping.end_offset) == (-14, 0)
