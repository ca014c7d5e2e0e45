"""The production storage: a Dagster instance on PostgreSQL (dagster-postgres) and the action
ledger on PostgreSQL, one database for both, as README's production set-up describes."""

from pathlib import Path

import dagster as dg
import pytest

from autoexec_dagster import ActionLedger, Budget
from autoexec_dagster.dagster.defs_factory import build_execution_defs
from tests.conftest import churn_playbook, churn_scores
from tests.test_execution_assets import (
    INSIGHT,
    JOB,
    PLAYBOOK,
    Recorder,
    insight_asset,
    recording_channels,
)

pytestmark = pytest.mark.postgres


def test_the_execution_layer_runs_on_a_postgres_instance_and_ledger(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # dagster-postgres drives psycopg2 (a psycopg 3 URL breaks its NOTIFY: DESIGN.md); the
    # ledger keeps psycopg 3.
    instance_url = postgres_url.replace("postgresql+psycopg://", "postgresql+psycopg2://")
    frames = {"2026-11-24": churn_scores(400, seed=3), "2026-11-25": churn_scores(400, seed=4)}
    insight = insight_asset(frames, dg.StaticPartitionsDefinition(sorted(frames)))
    recorder = Recorder()
    ledger = ActionLedger(postgres_url)
    playbook = churn_playbook(
        max_flagged_fraction=0.9,
        budgets=[Budget(name="customer_contact", max_actions=1, period="7d")],
    )
    defs = dg.Definitions.merge(
        dg.Definitions(
            assets=[insight],
            resources={"io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))},
        ),
        build_execution_defs(
            insight=insight,
            playbook=playbook,
            ledger=ledger,
            channels=recording_channels(recorder),
        ),
    )
    job = defs.resolve_job_def(JOB)
    # The dagster.yaml of README's production set-up: the URL read from the environment.
    monkeypatch.setenv("DAGSTER_PG_URL", instance_url)
    overrides = {"storage": {"postgres": {"postgres_url": {"env": "DAGSTER_PG_URL"}}}}
    with dg.instance_for_test(overrides=overrides) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        sent: dict[str, int] = {}
        for day in sorted(frames):
            assert dg.materialize(
                [insight],
                partition_key=day,
                instance=instance,
                resources={"io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))},
            ).success
            before = len(recorder.keys)
            assert job.execute_in_process(partition_key=day, instance=instance).success
            sent[day] = len(recorder.keys) - before
        # A re-run sends nothing: the ledger on PostgreSQL remembers.
        assert job.execute_in_process(partition_key="2026-11-25", instance=instance).success
        assert len(recorder.keys) == sum(sent.values())
        assert len(recorder.keys) == len(set(recorder.keys))

        event = instance.get_latest_materialization_event(dg.AssetKey([PLAYBOOK, "actions"]))
        assert event is not None and event.asset_materialization is not None
        assert event.asset_materialization.partition == "2026-11-25"
        records = instance.fetch_materializations(dg.AssetKey(INSIGHT), limit=10).records
        assert {r.partition_key for r in records} == set(frames)

    # The budget held across the two partitions: no customer got two actions in the week.
    spend = ledger.budget_spend("customer_contact")
    assert sum(spend.values()) == len(recorder.keys) and set(spend.values()) == {1}
    assert sent["2026-11-24"] > 0
    ledger.dispose()
