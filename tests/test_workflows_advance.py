"""Workflows advanced on a real ledger with an injected clock: the detection-action loop.

The hosts' destination is a Python channel over an in-process fleet (the real HTTP infrastructure
API is exercised by the reference deployment's end-to-end test); the ledger, the delivery engine
and the workflow state machine are the real ones.
"""

import itertools
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pytest

from autoexec_dagster import (
    ActionLedger,
    Playbook,
    PythonChannel,
    Rule,
    Step,
    Workflow,
    advance_workflows,
    execute_plan,
    route,
)
from autoexec_dagster.errors import PermanentChannelError, PlanError, PlaybookError
from autoexec_dagster.playbook import Guardrails

HOUR = "2026-12-01T10:00"
START = datetime(2026, 12, 1, 10, 5, tzinfo=UTC)


class Clock:
    """A clock the test moves; the ledger reads workflow time from it."""

    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class Fleet:
    """Hosts with injected faults; records every call it receives (key, step, attempt)."""

    clock: Clock
    causes: dict[str, str]
    restart_delay: timedelta = timedelta(seconds=45)
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    restarted_at: dict[str, datetime] = field(default_factory=dict)
    fixed: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def channel(self, action: str) -> PythonChannel:
        def deliver(request: Any) -> dict[str, Any]:
            host = request.entity_id
            with self.lock:
                self.calls.append((request.idempotency_key, action, host))
            cause = self.causes.get(host, "none")
            if action == "run_diagnostics":
                return {"cause": cause}
            if action == "restart_service":
                self.restarted_at[host] = self.clock.now
                return {"restarted": True}
            if action == "clean_disk":
                self.fixed.add(host)
                return {"freed_gb": 40}
            if action == "host_health":
                healthy = host in self.fixed or (
                    host in self.restarted_at
                    and self.clock.now - self.restarted_at[host] >= self.restart_delay
                )
                return {"status": "healthy" if healthy else "degraded"}
            return {"state": action}

        return PythonChannel.from_callable(deliver, max_concurrency=8)


def remediation_playbook() -> Playbook:
    return Playbook(
        name="host_remediation",
        entity_key="host_id",
        rules=[
            Rule(
                name="database",
                when="anomaly_score >= 0.8 and role == 'db'",
                escalate="Database host: a person decides",
            ),
            Rule(name="anomalous", when="anomaly_score >= 0.8", workflow="remediate"),
        ],
        workflows={
            "remediate": Workflow(
                steps=[
                    Step(name="isolate", action="isolate_host"),
                    Step(name="diagnose", action="run_diagnostics"),
                    Step(
                        name="restart",
                        action="restart_service",
                        when="`diagnose.cause` == 'service_hung'",
                    ),
                    Step(
                        name="clean_disk",
                        action="clean_disk",
                        when="`diagnose.cause` == 'disk_full'",
                    ),
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
            )
        },
        guardrails=Guardrails(max_flagged_fraction=1.0),
    )


ACTIONS = (
    "isolate_host",
    "run_diagnostics",
    "restart_service",
    "clean_disk",
    "host_health",
    "reinstate_host",
)


def hosts() -> tuple[pd.DataFrame, dict[str, str]]:
    rows, causes = [], {}
    kinds = ["service_hung", "disk_full", "hardware"]
    for i in range(60):
        host = f"web-{i:04d}"
        role = "db" if i % 10 == 9 else "web"
        flagged = i % 2 == 0 or role == "db"
        rows.append({"host_id": host, "role": role, "anomaly_score": 0.9 if flagged else 0.1})
        if flagged:
            causes[host] = kinds[i % 3]
    return pd.DataFrame(rows), causes


def run_to_the_end(playbook, ledger, channels, clock) -> list[Any]:
    reports = []
    for _ in range(40):
        clock.advance(timedelta(seconds=30))
        report = advance_workflows(playbook=playbook, ledger=ledger, channels=channels)
        reports.append(report)
        if ledger.next_due(playbook="host_remediation") is None:
            break
    return reports


def test_the_detection_action_loop_remediates_verifies_and_escalates_with_evidence(ledger_url):
    clock = Clock(START)
    ledger = ActionLedger(ledger_url, clock=clock)
    frame, causes = hosts()
    fleet = Fleet(clock=clock, causes=causes)
    channels = {a: fleet.channel(a) for a in ACTIONS}
    playbook = remediation_playbook()

    first = execute_plan(
        route(frame, playbook, partition_key=HOUR),
        playbook=playbook,
        ledger=ledger,
        channels=channels,
    )
    plan = route(frame, playbook, partition_key=HOUR)
    decisions = plan["decision"].astype(str)
    routed = set(plan.loc[decisions == "workflow", "entity_id"])
    databases = set(plan.loc[decisions == "escalate", "entity_id"])
    assert first.workflows_started == len(routed) > 0 and databases
    assert first.workflows is not None and first.workflows.waiting > 0  # at the verify poll

    run_to_the_end(playbook, ledger, channels, clock)

    instances = ledger.instances(playbook="host_remediation").set_index("entity_id")
    remediable = {h for h in routed if causes[h] in ("service_hung", "disk_full")}
    hardware = routed - remediable
    assert set(instances.index[instances["state"] == "succeeded"]) == remediable
    assert set(instances.index[instances["state"] == "failed"]) == hardware
    # Reinstated only where healthy: every remediable host got reinstate, no hardware host did.
    reinstated = {h for _, a, h in fleet.calls if a == "reinstate_host"}
    assert reinstated == remediable
    # Each step reached the destination once per attempt (keys never repeat).
    keys = Counter(k for k, _, _ in fleet.calls)
    assert max(keys.values()) == 1
    # Restart only for hung services, disk clean-up only for full disks.
    assert {h for _, a, h in fleet.calls if a == "restart_service"} == {
        h for h in routed if causes[h] == "service_hung"
    }
    assert {h for _, a, h in fleet.calls if a == "clean_disk"} == {
        h for h in routed if causes[h] == "disk_full"
    }

    queue = ledger.escalations(playbook="host_remediation")
    by_kind = queue.groupby("kind")["entity_id"].apply(set).to_dict()
    assert by_kind["rule"] == databases
    assert by_kind["workflow_failed"] == hardware
    evidence = queue[queue["kind"] == "workflow_failed"].iloc[0]
    assert "Remediation did not restore the host" in evidence["reason"]
    assert "poll timed out" in evidence["reason"]
    assert "hardware" in evidence["data"] and "verify" in evidence["data"]


def test_polls_are_spaced_by_every_on_the_injected_clock(tmp_path):
    clock = Clock(START)
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)
    frame = pd.DataFrame({"host_id": ["web-0001"], "role": ["web"], "anomaly_score": [0.95]})
    fleet = Fleet(clock=clock, causes={"web-0001": "hardware"})
    channels = {a: fleet.channel(a) for a in ACTIONS}
    playbook = remediation_playbook()
    execute_plan(
        route(frame, playbook, partition_key=HOUR),
        playbook=playbook,
        ledger=ledger,
        channels=channels,
    )
    polls = [1]
    # Time moves in 10 s ticks: a poll may only happen once 30 s have passed since the last.
    for _ in range(80):
        clock.advance(timedelta(seconds=10))
        advance_workflows(playbook=playbook, ledger=ledger, channels=channels)
        polls.append(sum(1 for _, a, _ in fleet.calls if a == "host_health"))
    increments = [i for i in range(1, len(polls)) if polls[i] > polls[i - 1]]
    gaps = {b - a for a, b in itertools.pairwise(increments)}
    assert gaps == {3}  # every third 10 s tick: every 30 s
    # 10 minutes of polling: the first attempt at 0:00, one every 30 s up to 10:00, then it fails.
    assert polls[-1] == 21
    (instance,) = ledger.instances(playbook="host_remediation").itertuples()
    assert instance.state == "failed"


def test_a_rerun_of_the_partition_starts_nothing_twice_and_repeats_no_step(tmp_path):
    clock = Clock(START)
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)
    frame, causes = hosts()
    fleet = Fleet(clock=clock, causes=causes)
    channels = {a: fleet.channel(a) for a in ACTIONS}
    playbook = remediation_playbook()
    plan = route(frame, playbook, partition_key=HOUR)
    first = execute_plan(plan, playbook=playbook, ledger=ledger, channels=channels)
    calls = len(fleet.calls)
    again = execute_plan(plan, playbook=playbook, ledger=ledger, channels=channels)
    assert first.workflows_started > 0 and again.workflows_started == 0
    assert len(fleet.calls) == calls  # nothing was due, nothing was repeated


def test_a_missing_output_field_fails_that_instance_only(tmp_path):
    clock = Clock(START)
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)
    frame = pd.DataFrame(
        {"host_id": ["web-0001", "web-0002"], "role": ["web", "web"], "anomaly_score": [0.9, 0.9]}
    )
    fleet = Fleet(clock=clock, causes={"web-0001": "disk_full", "web-0002": "disk_full"})
    channels = {a: fleet.channel(a) for a in ACTIONS}

    def diagnostics(request: Any) -> dict[str, Any]:
        # One host's diagnostics answer without the field the next step reads.
        return {"cause": "disk_full"} if request.entity_id == "web-0001" else {"verdict": "?"}

    channels["run_diagnostics"] = PythonChannel.from_callable(diagnostics)
    playbook = remediation_playbook()
    execute_plan(
        route(frame, playbook, partition_key=HOUR),
        playbook=playbook,
        ledger=ledger,
        channels=channels,
    )
    run_to_the_end(playbook, ledger, channels, clock)
    states = ledger.instances(playbook="host_remediation").set_index("entity_id")["state"]
    assert states.to_dict() == {"web-0001": "succeeded", "web-0002": "failed"}
    (case,) = ledger.escalations(playbook="host_remediation")["reason"]
    assert "'diagnose.cause'" in case and "no field 'cause'" in case and "verdict" in case


def test_a_permanent_step_failure_runs_the_failure_steps_then_escalates(tmp_path):
    clock = Clock(START)
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)
    frame = pd.DataFrame({"host_id": ["web-0001"], "role": ["web"], "anomaly_score": [0.9]})
    paged: list[str] = []

    def refuse(request: Any) -> None:
        raise PermanentChannelError("host is locked by another change")

    def page(request: Any) -> None:
        paged.append(request.entity_id)

    base = remediation_playbook()
    workflow = base.workflows["remediate"].model_copy(
        update={"on_failure_steps": [Step(name="page", action="page_oncall")]}
    )
    playbook = base.model_copy(update={"workflows": {"remediate": workflow}})
    fleet = Fleet(clock=clock, causes={})
    channels = {a: fleet.channel(a) for a in ACTIONS}
    channels["isolate_host"] = PythonChannel.from_callable(refuse)
    channels["page_oncall"] = PythonChannel.from_callable(page)
    report = execute_plan(
        route(frame, playbook, partition_key=HOUR),
        playbook=playbook,
        ledger=ledger,
        channels=channels,
    )
    assert report.workflows is not None and report.workflows.failed == 1
    assert paged == ["web-0001"]
    (instance,) = ledger.instances(playbook="host_remediation").itertuples()
    assert instance.state == "failed" and "locked by another change" in str(instance.error)
    assert not any(a == "run_diagnostics" for _, a, _ in fleet.calls)
    assert len(ledger.escalations(playbook="host_remediation")) == 1


def test_a_step_naming_an_unknown_channel_is_refused_before_anything_runs(tmp_path):
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    frame, causes = hosts()
    fleet = Fleet(clock=Clock(START), causes=causes)
    channels = {a: fleet.channel(a) for a in ACTIONS if a != "clean_disk"}
    playbook = remediation_playbook()
    with pytest.raises(
        PlanError, match=r"'clean_disk' \(workflow 'remediate', step 'clean_disk'\)"
    ):
        execute_plan(
            route(frame, playbook, partition_key=HOUR),
            playbook=playbook,
            ledger=ledger,
            channels=channels,
        )
    assert fleet.calls == [] and ledger.instances().empty


def test_a_rule_naming_an_unknown_workflow_and_an_unused_workflow(recwarn):
    with pytest.raises(ValueError, match=r"unknown workflow\(s\) \['mend'\]"):
        Playbook(
            name="pb",
            entity_key="id",
            rules=[Rule(name="r", when="x > 1", workflow="mend")],
            workflows={},
        )
    with pytest.warns(UserWarning, match="workflow 'spare' is started by no rule"):
        Playbook(
            name="pb",
            entity_key="id",
            rules=[Rule(name="r", when="x > 1", action="a")],
            workflows={"spare": Workflow(steps=[Step(name="s", action="a")])},
        )


def test_templates_read_earlier_steps_outputs_over_real_smtp(tmp_path):
    from autoexec_dagster import EmailChannel
    from tests.receivers import SmtpSink

    clock = Clock(START)
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)
    frame = pd.DataFrame(
        {
            "host_id": ["web-0001"],
            "role": ["web"],
            "anomaly_score": [0.9],
            "owner": ["ops@example.com"],
        }
    )
    fleet = Fleet(clock=clock, causes={"web-0001": "disk_full"})
    playbook = Playbook(
        name="host_remediation",
        entity_key="host_id",
        rules=[Rule(name="anomalous", when="anomaly_score >= 0.8", workflow="tell")],
        workflows={
            "tell": Workflow(
                steps=[
                    Step(name="diagnose", action="run_diagnostics"),
                    Step(name="notify", action="notify_owner"),
                ]
            )
        },
        guardrails=Guardrails(max_flagged_fraction=1.0),
    )
    with SmtpSink() as sink:
        channels = {
            "run_diagnostics": fleet.channel("run_diagnostics"),
            "notify_owner": EmailChannel(
                host="127.0.0.1",
                port=sink.port,
                sender="remediation@example.com",
                to_column="owner",
                subject="{{ entity_id }}: {{ steps.diagnose.cause }}",
                template="Diagnosis of {{ entity_id }}: {{ steps.diagnose.cause }}.",
            ),
        }
        report = execute_plan(
            route(frame, playbook, partition_key=HOUR),
            playbook=playbook,
            ledger=ledger,
            channels=channels,
        )
        assert report.workflows is not None and report.workflows.succeeded == 1
        assert sink.wait_for_messages(1)
        (mail,) = sink.messages
    assert mail.message["Subject"] == "web-0001: disk_full"
    assert mail.recipients == ("ops@example.com",)


def test_yaml_playbooks_express_workflows_with_durations(tmp_path):
    source = remediation_playbook()
    path = tmp_path / "playbook.yaml"
    path.write_text(source.to_yaml())
    text = path.read_text()
    assert "every: 30s" in text and "timeout: 10m" in text
    assert Playbook.from_yaml(path) == source
    path.write_text(text.replace("timeout: 10m", "timeout: ten minutes"))
    with pytest.raises(
        PlaybookError, match=r"workflows\.remediate\.steps\.4\.timeout.*not a duration"
    ):
        Playbook.from_yaml(path)


def test_an_entitys_history_and_cancelling_a_running_instance(tmp_path):
    clock = Clock(START)
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)
    frame = pd.DataFrame({"host_id": ["web-0001"], "role": ["web"], "anomaly_score": [0.95]})
    fleet = Fleet(clock=clock, causes={"web-0001": "hardware"})
    channels = {a: fleet.channel(a) for a in ACTIONS}
    playbook = remediation_playbook()
    execute_plan(
        route(frame, playbook, partition_key=HOUR),
        playbook=playbook,
        ledger=ledger,
        channels=channels,
    )
    (instance_id,) = ledger.instances(states=["waiting"])["instance_id"]
    assert ledger.cancel_instances([instance_id], by="ana", reason="hardware ticket filed") == [
        instance_id
    ]
    clock.advance(timedelta(minutes=5))
    calls = len(fleet.calls)
    report = advance_workflows(playbook=playbook, ledger=ledger, channels=channels)
    assert report.advanced == 0 and len(fleet.calls) == calls  # a cancelled instance stays put
    history = ledger.entity_history("web-0001")
    steps = history["actions"].dropna(subset=["step"])
    assert list(steps["step"]) == ["isolate", "diagnose", "verify"]
    assert "hardware" in steps.loc[steps["step"] == "diagnose", "output"].iloc[0]
    (row,) = history["workflows"].itertuples()
    assert (row.state, row.cancelled_by, row.cancel_reason) == (
        "cancelled",
        "ana",
        "hardware ticket filed",
    )
    assert ledger.cancel_instances([instance_id], by="ana", reason="again") == []


def test_a_crash_between_recording_and_starting_loses_no_workflow(tmp_path):
    # The decision rows commit before the instances are started; a worker killed in between
    # must not leave entities that a re-run counts as done while no workflow ever started.
    clock = Clock(START)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"

    class DiesBeforeStarting(ActionLedger):
        def start_instances(self, rows: Any) -> list[str]:
            raise SystemExit("killed after reserve")

    frame, causes = hosts()
    fleet = Fleet(clock=clock, causes=causes)
    channels = {a: fleet.channel(a) for a in ACTIONS}
    playbook = remediation_playbook()
    plan = route(frame, playbook, partition_key=HOUR)
    with pytest.raises(SystemExit):
        execute_plan(
            plan, playbook=playbook, ledger=DiesBeforeStarting(url, clock=clock), channels=channels
        )
    ledger = ActionLedger(url, clock=clock)
    again = execute_plan(plan, playbook=playbook, ledger=ledger, channels=channels)
    routed = int((plan["decision"].astype(str) == "workflow").sum())
    assert again.workflows_started == routed
    assert len(ledger.instances(playbook="host_remediation")) == routed


def test_a_step_channel_reading_a_column_the_plan_lacks_is_refused_before_anything_starts(
    tmp_path,
):
    import sqlite3

    from autoexec_dagster import SqlQueryChannel

    database = tmp_path / "catalogue.db"
    with sqlite3.connect(database) as conn:
        conn.execute("CREATE TABLE suppliers (sku TEXT, supplier TEXT)")
    playbook = Playbook(
        name="stock",
        entity_key="sku",
        rules=[Rule(name="short", when="shortfall > 0", workflow="replenish")],
        workflows={"replenish": Workflow(steps=[Step(name="quotes", action="supplier_quotes")])},
        guardrails=Guardrails(max_flagged_fraction=1.0),
    )
    channels = {
        "supplier_quotes": SqlQueryChannel(
            url=f"sqlite:///{database}",
            query="SELECT supplier FROM suppliers WHERE sku = :sku AND region = :region",
            params={"sku": "sku", "region": "warehouse_region"},
        )
    }
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    frame = pd.DataFrame({"sku": ["a", "b"], "shortfall": [3, 1]})
    with pytest.raises(
        PlanError,
        match=r"step 'quotes': SqlQueryChannel 'supplier_quotes' reads column\(s\) "
        r"\['warehouse_region'\]",
    ):
        execute_plan(
            route(frame, playbook, partition_key="2026-12-01"),
            playbook=playbook,
            ledger=ledger,
            channels=channels,
        )
    assert ledger.instances(playbook="stock").empty
    assert ledger.entity_history("a", playbook="stock")["actions"].empty
