import pytest

from autoexec_dagster.errors import PlaybookError
from autoexec_dagster.playbook import Guardrails, Playbook, Rule, parse_expression
from tests.conftest import churn_playbook

YAML = """
name: churn_outreach
entity_key: customer_id
rules:
  - name: vip_at_risk
    when: "churn_score >= 0.7 and lifetime_value >= 5000"
    escalate: "High-value customer at risk"
  - name: at_risk
    when: "churn_score >= 0.7"
    action: retention_email
guardrails:
  max_actions: 100
  max_flagged_fraction: 0.3
  holdout_fraction: 0.1
score_ranges:
  churn_score: [0, 1]
"""


def test_expression_columns_and_numeric_use():
    parsed = parse_expression(
        "churn_score >= 0.7 and plan == 'pro' and `life value` * 2 > 10", rule="r"
    )
    assert parsed.columns == {"churn_score", "plan", "life value"}
    assert parsed.numeric_columns == {"churn_score", "life value"}


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("churn_score >=", "does not parse"),
        ("__import__('os').system('x') == 0", "uses Call"),
        ("df.churn_score > 1", "uses Attribute"),
        ("scores[0] > 1", "uses Subscript"),
        ("   ", "is empty"),
    ],
)
def test_bad_expressions_are_refused(expression, message):
    with pytest.raises(PlaybookError, match=message):
        parse_expression(expression, rule="r")
    with pytest.raises(PlaybookError, match=message):
        Playbook.from_dict(
            {
                "name": "p",
                "entity_key": "id",
                "rules": [{"name": "r", "when": expression, "action": "a"}],
            }
        )


def test_rule_needs_exactly_one_outcome():
    with pytest.raises(
        ValueError, match="exactly one of 'action', 'workflow', 'escalate' or 'skip'"
    ):
        Rule(name="r", when="x > 1", action="a", skip=True)
    with pytest.raises(ValueError, match="exactly one"):
        Rule(name="r", when="x > 1")
    # An escalation may carry the action a person can approve.
    proposing = Rule(name="r", when="x > 1", action="a", escalate="b")
    assert proposing.decision == "escalate" and proposing.action == "a"


def test_duplicate_rule_names_and_bad_names():
    with pytest.raises(ValueError, match="used twice"):
        Playbook(
            name="p",
            entity_key="id",
            rules=[
                Rule(name="r", when="x > 1", action="a"),
                Rule(name="r", when="x > 2", action="a"),
            ],
        )
    with pytest.raises(ValueError, match="asset key prefix"):
        Playbook(name="Bad Name", entity_key="id", rules=[Rule(name="r", when="x > 1", action="a")])


def test_guardrail_limits_are_validated():
    with pytest.raises(ValueError):
        Guardrails(max_flagged_fraction=0)
    with pytest.raises(ValueError):
        Guardrails(holdout_fraction=1.5)


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "playbook.yaml"
    path.write_text(YAML)
    playbook = Playbook.from_yaml(path)
    assert [r.name for r in playbook.rules] == ["vip_at_risk", "at_risk"]
    assert playbook.guardrails.holdout_fraction == 0.1
    assert playbook.actions == ["retention_email"]
    assert playbook.input_columns() == {"customer_id", "churn_score", "lifetime_value"}
    again = tmp_path / "again.yaml"
    again.write_text(playbook.to_yaml())
    assert Playbook.from_yaml(again) == playbook


def test_yaml_errors_name_the_problem(tmp_path):
    with pytest.raises(PlaybookError, match="cannot read playbook"):
        Playbook.from_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed")
    with pytest.raises(PlaybookError, match="not valid YAML"):
        Playbook.from_yaml(broken)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(YAML + "colour: blue\n")
    with pytest.raises(PlaybookError, match="colour"):
        Playbook.from_yaml(unknown)
    bad_rule = tmp_path / "bad_rule.yaml"
    bad_rule.write_text(YAML.replace('"churn_score >= 0.7"', '"churn_score >>= 0.7"'))
    with pytest.raises(PlaybookError, match=r"rules\.1.*does not parse"):
        Playbook.from_yaml(bad_rule)


def test_version_follows_the_rules():
    first = churn_playbook()
    assert first.effective_version == churn_playbook().effective_version
    edited = first.model_copy(
        update={
            "rules": [
                *first.rules[:-1],
                Rule(name="watch", when="churn_score >= 0.55", action="crm_task"),
            ]
        }
    )
    assert edited.effective_version != first.effective_version
    pinned = first.model_copy(update={"version": "2026-q4"})
    assert pinned.effective_version == "2026-q4"


def test_callable_rules_cannot_be_written_to_yaml():
    playbook = Playbook(
        name="p",
        entity_key="id",
        rules=[Rule(name="r", when=lambda df: df["x"] > 1, action="a", columns=("x",))],
    )
    assert playbook.rule_columns() == {"x"}
    with pytest.raises(PlaybookError, match="callable"):
        playbook.to_yaml()
