"""The host-remediation story end to end, against the real infrastructure API over HTTP.

The IsolationForest flags hosts of one hourly partition; the playbook in
resources/host_remediation_playbook.yaml isolates, diagnoses, remediates, verifies and reinstates
them through signed webhooks to resources.infra_api, whose own record is checked against the
ledger. Time is a clock shared by the ledger and the API, moved forward instead of slept.
"""

import datetime as dt
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from assets.hosts import (
    generate_history,
    generate_host_metrics,
    injected_faults,
    score_hosts,
    train_host_anomaly_model,
)
from autoexec_dagster import (
    ActionLedger,
    Playbook,
    WebhookChannel,
    advance_workflows,
    execute_plan,
    route,
)
from resources.infra_api import ACTION_ENDPOINTS, InfraApi

ROOT = Path(__file__).resolve().parents[1]
PLAYBOOK = ROOT / "resources" / "host_remediation_playbook.yaml"
HOUR = "2026-12-01-10:00"
SECRET = "whsec_aW5mcmEtYXBpLXRlc3Qtc2VjcmV0LWZvci1lMmU="


class Clock:
    def __init__(self, start: dt.datetime):
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture(scope="module")
def anomalies():
    model = train_host_anomaly_model(generate_history())
    return score_hosts(model, generate_host_metrics(HOUR))


def test_hosts_are_remediated_verified_and_escalated_with_evidence(tmp_path, anomalies):
    playbook = Playbook.from_yaml(PLAYBOOK)
    clock = Clock(dt.datetime(2026, 12, 1, 11, 0, tzinfo=dt.UTC))
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)
    faults = injected_faults(HOUR)
    with InfraApi(SECRET, tmp_path / "infra.sqlite", clock=clock, failure_rate=0.05) as api:
        channels = {
            action: WebhookChannel(
                url=api.url_for(action),
                secret=SECRET,
                allowed_hosts=["127.0.0.1"],
                max_attempts=8,
                backoff_base_seconds=0.001,
                backoff_max_seconds=0.01,
                circuit_breaker_threshold=1000,
            )
            for action in ACTION_ENDPOINTS
        }
        plan = route(anomalies, playbook, partition_key=HOUR, insight_name="host_anomalies")
        first = execute_plan(plan, playbook=playbook, ledger=ledger, channels=channels)
        for _ in range(60):
            if ledger.next_due(playbook=playbook.name) is None:
                break
            clock.now += dt.timedelta(seconds=30)
            advance_workflows(playbook=playbook, ledger=ledger, channels=channels)
        again = execute_plan(plan, playbook=playbook, ledger=ledger, channels=channels)
        calls = api.calls()
        hosts = {h: api.host_row(h) for h in plan["entity_id"]}

    decisions = plan.set_index("entity_id")["decision"].astype(str)
    routed = set(decisions.index[decisions == "workflow"])
    databases = set(decisions.index[decisions == "escalate"])
    assert first.workflows_started == len(routed) > 10 and databases
    assert again.workflows_started == 0  # a second run starts nothing
    instances = ledger.instances(playbook=playbook.name).set_index("entity_id")
    assert ledger.next_due(playbook=playbook.name) is None  # nothing left waiting

    hardware = {h for h in routed if faults.get(h) == "hardware"}
    remediable = routed - hardware
    assert set(instances.index[instances["state"] == "succeeded"]) == remediable
    assert set(instances.index[instances["state"] == "failed"]) == hardware
    for host in remediable:  # reinstated and healthy, by the API's own record
        row = hosts[host]
        assert row is not None and row["state"] == "in_service"

    queue = ledger.escalations(playbook=playbook.name)
    kinds = queue.groupby("kind")["entity_id"].apply(set).to_dict()
    assert kinds["rule"] == databases
    assert kinds.get("workflow_failed", set()) == hardware
    for case in queue[queue["kind"] == "workflow_failed"].to_dict("records"):
        evidence = json.loads(str(case["data"]))
        assert evidence["outputs"]["diagnose"]["cause"] == "hardware"
        assert [e["step"] for e in evidence["evidence"]][-1] == "verify"
        assert "poll timed out" in str(case["reason"])

    # The API received each step of each host once per attempt: executed keys are the ledger's
    # succeeded step attempts, each executed once.
    steps = ledger.actions(playbook=playbook.name)
    steps = steps[steps["decision"] == "step"]
    succeeded = set(steps.loc[steps["state"] == "succeeded", "idempotency_key"])
    executed = Counter(c["idempotency_key"] for c in calls if c["outcome"].startswith("executed"))
    assert set(executed) == succeeded and set(executed.values()) == {1}
    assert any(c["outcome"] == "failed_transient" for c in calls)  # retries were exercised

    # Polls are spaced by `every` on the injected clock.
    health: dict[str, list[dt.datetime]] = defaultdict(list)
    for c in calls:
        if c["endpoint"] == "health" and c["outcome"].startswith("executed"):
            health[c["host_id"]].append(dt.datetime.fromisoformat(c["at"]))
    gaps = {
        (b - a).total_seconds()
        for times in health.values()
        for a, b in zip(sorted(times), sorted(times)[1:], strict=False)
    }
    assert gaps and min(gaps) >= 30
    assert max(len(t) for h, t in health.items() if h in hardware) == 21  # 10 min of polling
