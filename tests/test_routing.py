import numpy as np
import pandas as pd
import pytest

from autoexec_dagster.errors import InsightValidationError, PlanError, PlaybookError
from autoexec_dagster.keys import idempotency_keys
from autoexec_dagster.playbook import Guardrails, Playbook, Rule
from autoexec_dagster.routing import rekey, route
from autoexec_dagster.workflows.workflow import Step, Workflow
from tests.conftest import churn_playbook, churn_scores


def test_first_matching_rule_wins_and_unmatched_are_skipped():
    df = pd.DataFrame(
        {
            "customer_id": ["a", "b", "c", "d", "e"],
            "churn_score": [0.9, 0.9, 0.65, 0.55, 0.1],
            "lifetime_value": [9000, 100, 100, 100, 100],
            "confidence": [0.9, 0.9, 0.1, 0.9, 0.9],
        }
    )
    plan = route(df, churn_playbook(), partition_key="2026-11-24")
    assert plan["decision"].astype(str).tolist() == ["escalate", "act", "escalate", "act", "skip"]
    assert plan["rule"].astype(str).tolist() == [
        "vip_at_risk",
        "at_risk",
        "unsure",
        "watch",
        "(none)",
    ]
    assert plan["action"].astype(object).where(plan["action"].notna(), None).tolist() == [
        None,
        "retention_email",
        None,
        "crm_task",
        None,
    ]
    assert plan.loc[0, "reason"] == "High-value customer at risk: an account manager should call"
    assert plan.loc[4, "reason"] == "no rule matched"
    assert plan["idempotency_key"].is_unique
    assert list(df.columns) == ["customer_id", "churn_score", "lifetime_value", "confidence"]


def test_keys_are_deterministic_and_scoped():
    df = churn_scores(200)
    playbook = churn_playbook()
    a = route(df, playbook, partition_key="2026-11-24")
    b = route(df, playbook, partition_key="2026-11-24")
    c = route(df, playbook, partition_key="2026-11-25")
    assert a["idempotency_key"].tolist() == b["idempotency_key"].tolist()
    assert not set(a["idempotency_key"]) & set(c["idempotency_key"])
    # The key names the side effect, not the playbook version that chose it (issue 6, defect 1).
    pinned = playbook.model_copy(update={"version": "v2"})
    d = route(df, pinned, partition_key="2026-11-24")
    assert d["idempotency_key"].tolist() == a["idempotency_key"].tolist()
    key = idempotency_keys(
        insight="churn_outreach",
        partition_key="2026-11-24",
        actions=[
            str(a.loc[0, "action"])
            if a.loc[0, "decision"] in ("act", "holdout")
            else f"{a.loc[0, 'decision']}:{a.loc[0, 'rule']}"
        ],
        entity_ids=[str(a.loc[0, "entity_id"])],
    )
    assert key == [a.loc[0, "idempotency_key"]]


def test_holdout_is_deterministic_and_near_the_fraction():
    df = churn_scores(20_000)
    playbook = churn_playbook(holdout_fraction=0.1)
    first = route(df, playbook)
    held = set(first.loc[first["decision"] == "holdout", "entity_id"])
    acted_or_held = int(first["decision"].isin(["act", "holdout"]).sum())
    assert 0.08 < len(held) / acted_or_held < 0.12
    shuffled = df.sample(frac=1.0, random_state=1)
    again = route(shuffled, playbook, partition_key="another-day")
    assert set(again.loc[again["decision"] == "holdout", "entity_id"]) == held
    assert first.loc[first["decision"] == "holdout", "action"].notna().all()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda df: df.drop(columns=["lifetime_value"]),
            r"lacks column\(s\) 'lifetime_value' \(read by rule vip_at_risk\)",
        ),
        (lambda df: df.drop(columns=["customer_id"]), "lacks column"),
        (lambda df: df.assign(customer_id=["C000001"] * len(df)), "must be unique"),
        (
            lambda df: df.assign(customer_id=[None, *df["customer_id"].tolist()[1:]]),
            "must not be null",
        ),
        (
            lambda df: df.assign(churn_score=[np.nan, *df["churn_score"].tolist()[1:]]),
            "'churn_score' holds 1 NaN",
        ),
        (lambda df: df.assign(confidence="high"), "'confidence' must be numeric"),
    ],
)
def test_bad_insights_are_refused_with_a_specific_message(mutate, message):
    with pytest.raises(InsightValidationError, match=message):
        route(mutate(churn_scores(50)), churn_playbook())


def test_score_ranges_and_required_columns():
    playbook = churn_playbook().model_copy(
        update={"score_ranges": {"churn_score": (0.0, 1.0)}, "required_columns": ("email",)}
    )
    df = churn_scores(20)
    df.loc[3, "churn_score"] = 1.7
    with pytest.raises(InsightValidationError, match=r"must lie in \[0.0, 1.0\].*C000003"):
        route(df, playbook)
    with pytest.raises(InsightValidationError, match="'email'"):
        route(churn_scores(20).drop(columns=["email"]), playbook)


def test_rule_failing_at_evaluation_names_the_rule():
    playbook = Playbook(
        name="p",
        entity_key="id",
        rules=[Rule(name="boom", when=lambda df: df["nope"] > 1, action="a", columns=("id",))],
    )
    with pytest.raises(PlaybookError, match="rule 'boom' failed to evaluate"):
        route(pd.DataFrame({"id": [1, 2]}), playbook)


def test_empty_insight_routes_to_an_empty_plan():
    plan = route(churn_scores(0), churn_playbook())
    assert len(plan) == 0
    assert "idempotency_key" in plan.columns


def test_rekey_checks_partition_and_version():
    playbook = churn_playbook(max_flagged_fraction=1.0, holdout_fraction=0.0)
    plan = route(churn_scores(30), playbook)
    keyed = rekey(plan, playbook=playbook, partition_key="2026-11-24")
    assert (
        keyed["idempotency_key"].tolist()
        == route(churn_scores(30), playbook, partition_key="2026-11-24")["idempotency_key"].tolist()
    )
    with pytest.raises(PlanError, match="routed for partition '2026-11-24' but is executed as 'x'"):
        rekey(keyed, playbook=playbook, partition_key="x")
    other = playbook.model_copy(update={"version": "v9"})
    with pytest.raises(PlanError, match="route the insight again"):
        rekey(plan, playbook=other, partition_key="2026-11-24")
    with pytest.raises(PlanError, match="lacks routing column"):
        rekey(churn_scores(3), playbook=playbook, partition_key="p")


def test_integer_entity_ids_become_strings():
    df = churn_scores(10).assign(customer_id=range(10))
    plan = route(df, churn_playbook())
    assert plan["entity_id"].tolist() == [str(i) for i in range(10)]
    assert isinstance(Guardrails().max_actions, int)


def test_an_insight_column_a_workflow_step_reads_is_required_before_routing():
    playbook = Playbook(
        name="stock",
        entity_key="sku",
        rules=[Rule(name="short", when="shortfall > 0", workflow="replenish")],
        workflows={
            "replenish": Workflow(
                steps=[
                    Step(name="draft", action="draft_po"),
                    Step(
                        name="gate",
                        approve_when="`draft.total` > approval_limit",
                        approvers=["procurement"],
                    ),
                ]
            )
        },
    )
    insight = pd.DataFrame({"sku": ["a", "b"], "shortfall": [3, 0]})
    with pytest.raises(
        InsightValidationError,
        match=r"lacks column\(s\) 'approval_limit' \(read by step replenish.gate\)",
    ):
        route(insight, playbook, partition_key="2026-12-01")
