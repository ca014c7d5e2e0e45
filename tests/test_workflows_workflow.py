"""Workflow and Step models: what a valid workflow is, and the bad input each refusal names."""

from datetime import timedelta

import pytest
from pydantic import ValidationError

from autoexec_dagster.workflows.durations import format_duration, parse_duration
from autoexec_dagster.workflows.workflow import Step, Workflow


def remediate() -> Workflow:
    return Workflow(
        steps=[
            Step(name="isolate", action="isolate_host"),
            Step(name="diagnose", action="run_diagnostics"),
            Step(
                name="restart", action="restart_service", when="`diagnose.cause` == 'service_hung'"
            ),
            Step(name="clean_disk", action="clean_disk", when="`diagnose.cause` == 'disk_full'"),
            Step(
                name="verify",
                action="host_health",
                until="`verify.status` == 'healthy'",
                every="30s",
                timeout="10m",
            ),
            Step(name="reinstate", action="reinstate_host"),
        ],
        on_failure="Remediation did not restore the host",
        on_failure_steps=[Step(name="page", action="page_oncall")],
    )


def test_the_remediation_workflow_is_valid_and_round_trips():
    workflow = remediate()
    assert [s.kind for s in workflow.steps] == [
        "action",
        "action",
        "action",
        "action",
        "poll",
        "action",
    ]
    verify = workflow.step("verify")
    assert verify.poll_every == timedelta(seconds=30)
    assert verify.poll_timeout == timedelta(minutes=10)
    dumped = workflow.model_dump(mode="json")
    assert dumped["steps"][4]["every"] == "30s" and dumped["steps"][4]["timeout"] == "10m"
    assert Workflow.model_validate(dumped) == workflow
    assert workflow.actions[-1] == "page_oncall"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("6h", 21_600), ("2d", 172_800), ("1w", 604_800), ("250ms", 0.25)],
)
def test_durations_as_playbooks_write_them(text, seconds):
    assert parse_duration(text).total_seconds() == seconds
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("5 parsecs", "is not a duration"),
        ("10", "is not a duration"),
        ("-3s", "is not a duration"),
        ("0s", "must be a positive duration"),
        (0, "must be a positive duration"),
        (True, "is not a duration"),
        ("200000w", "longer than a century"),
        (float("nan"), "must be a positive duration"),
    ],
)
def test_unparsable_durations_are_refused_by_name(value, message):
    with pytest.raises(ValueError, match=message):
        parse_duration(value, what="wait")
    with pytest.raises(ValidationError, match=message):
        Step(name="pause", wait=value)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (
            [Step(name="a", action="x"), Step(name="a", action="y")],
            "step name 'a' is used twice",
        ),
        (
            [Step(name="a", action="x", when="`b.ok` == 1"), Step(name="b", action="y")],
            "reads the output of step 'b', which comes later",
        ),
        (
            [
                Step(name="a", action="x"),
                Step(name="b", action="y", until="`c.ok` == 1", timeout="1m"),
                Step(name="c", action="z"),
            ],
            "'until' reads the output of step 'c', which comes later",
        ),
        (
            [Step(name="a", action="x", when="`ghost.cause` == 'x'")],
            "step 'ghost', which is not a step of this workflow",
        ),
        ([], "at least 1 item"),
    ],
)
def test_bad_workflows_are_refused_with_the_problem_named(steps, message):
    with pytest.raises(ValidationError, match=message):
        Workflow(steps=steps)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"action": "health", "until": "`v.ok` == 1"}, "'until' needs a 'timeout'"),
        ({"wait": "1h", "until": "`v.ok` == 1", "timeout": "2h"}, "'until' polls an action"),
        ({"action": "health", "every": "30s"}, "belong to a poll"),
        ({}, "exactly one of 'action', 'wait', 'wait_until'"),
        ({"action": "a", "wait": "1h"}, "exactly one of"),
        ({"action": "bad name"}, "must start with a letter"),
        ({"action": "a", "when": "__import__('os')"}, "do not allow"),
        ({"action": "a", "when": "x ="}, "does not parse"),
    ],
)
def test_bad_steps_are_refused_with_the_problem_named(fields, message):
    with pytest.raises(ValidationError, match=message):
        Step(name="v", **fields)


def test_a_poll_may_read_its_own_output_and_failure_steps_any_main_step():
    workflow = remediate()
    assert workflow.step("verify").until == "`verify.status` == 'healthy'"
    Workflow(
        steps=[Step(name="diagnose", action="d")],
        on_failure_steps=[Step(name="page", action="p", when="`diagnose.cause` == 'hardware'")],
    )
    with pytest.raises(ValidationError, match="on_failure"):
        Workflow(steps=[Step(name="a", action="x")], on_failure="  ")


def cheapest(frame):  # an importable transform for the YAML form
    return frame[["instance_id"]].assign(supplier="acme")


def replenish() -> Workflow:
    return Workflow(
        steps=[
            Step(name="quotes", action="supplier_quotes"),
            Step(name="choose", transform=cheapest),
            Step(name="draft_po", action="draft_po"),
            Step(
                name="approval",
                approve_when="`draft_po.total` > 5000",
                approvers=["procurement"],
                expires_after="2d",
                on_expiry="escalate",
                notify="approver_email",
                sla="1d",
            ),
            Step(name="submit", action="submit_po"),
        ],
        on_failure="Purchase order not completed",
    )


def test_transform_and_approval_steps_have_their_kinds_and_defaults():
    workflow = replenish()
    assert [s.kind for s in workflow.steps] == [
        "action",
        "transform",
        "action",
        "approval",
        "action",
    ]
    approval = workflow.step("approval")
    assert approval.value_column == "draft_po.total"
    assert approval.approval_expiry == timedelta(days=2)
    assert approval.approval_sla == timedelta(days=1)
    # The notify channel is one of the playbook's actions, so it must have a channel.
    assert "approver_email" in workflow.actions
    assert Step(name="a", approve_when="x > 1", approvers=["p"]).approval_expiry == timedelta(
        days=7
    )
    assert workflow.step("choose").transform_fn is cheapest


def test_a_yaml_transform_is_imported_at_load_time():
    step = Step(name="choose", transform="tests.test_workflows_workflow:cheapest")
    assert step.transform_fn is cheapest
    with pytest.raises(ValidationError, match="cannot be imported"):
        Step(name="choose", transform="no_such_module_here:fn")
    with pytest.raises(ValidationError, match="has no attribute 'nope'"):
        Step(name="choose", transform="tests.test_workflows_workflow:nope")
    with pytest.raises(ValidationError, match="must be written 'module:function'"):
        Step(name="choose", transform="just_a_name")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"approve_when": "total > 1"}, "needs 'approvers'"),
        (
            {"approve_when": "total > 1", "approvers": ["a"], "min_approvals": 2},
            r"min_approvals=2 is more than the 1 approver\(s\) listed \(a\)",
        ),
        ({"approve_when": "total > 1", "approvers": ["a", "a"]}, "names someone twice"),
        ({"approve_when": "total > 1", "approvers": [" "]}, "name is empty"),
        ({"action": "x", "approvers": ["a"]}, "'approvers' belong to an approval step"),
        (
            {"approve_when": "total > 1", "approvers": ["a"], "sla": "3d", "expires_after": "2d"},
            "sla .* must be shorter than expires_after",
        ),
        ({"approve_when": "total >", "approvers": ["a"]}, "does not parse"),
        ({"approve_when": "total > 1", "approvers": ["a"], "on_expiry": "ignore"}, "on_expiry"),
        ({"approve_when": "total > 1", "approvers": ["a"], "notify": "bad name"}, "must start"),
        ({"transform": cheapest, "action": "x"}, "exactly one of"),
    ],
)
def test_bad_approval_and_transform_steps_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        Step(name="gate", **fields)


def test_approve_when_may_read_only_earlier_steps():
    with pytest.raises(
        ValidationError, match="reads the output of step 'submit', which comes later"
    ):
        Workflow(
            steps=[
                Step(name="gate", approve_when="`submit.total` > 1", approvers=["a"]),
                Step(name="submit", action="submit_po"),
            ]
        )
    with pytest.raises(ValidationError, match="'nowhere', which is not a step"):
        Workflow(
            steps=[
                Step(name="draft", action="draft_po"),
                Step(name="gate", approve_when="`nowhere.total` > 1", approvers=["a"]),
            ]
        )
    with pytest.raises(ValidationError, match="'value' reads the output of step 'gate'"):
        Workflow(
            steps=[
                Step(name="gate", approve_when="x > 1", approvers=["a"], value="gate.total"),
            ]
        )


def test_insight_columns_the_steps_read_are_listed_with_their_readers():
    workflow = Workflow(
        steps=[
            Step(name="draft", action="draft_po", when="shortfall > 0"),
            Step(
                name="gate",
                approve_when="`draft.total` > limit",
                approvers=["a"],
                approves=["sku", "draft.total"],
            ),
        ]
    )
    assert workflow.insight_columns() == {
        "shortfall": ["draft"],
        "limit": ["gate"],
        "sku": ["gate"],
    }
