"""Outcomes in Dagster: a new outcome partition updates the experiment, learnings and uplift
assets; a promotion changes the next partition's assignment; the sensor asks for each partition."""

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from autoexec_dagster import (
    ActionLedger,
    ActionRequest,
    Experiment,
    Guardrails,
    Playbook,
    PythonChannel,
    Rule,
    build_execution_defs,
)
from tests.test_execution_assets import materializations

DAYS = ["2026-11-01", "2026-11-02", "2026-11-03"]
TRUE_RATES = {"plain": 0.10, "bold": 0.30, "holdout": 0.05}


@dataclass
class Clock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Sent:
    variants: list[tuple[str, str | None, str]] = field(default_factory=list)

    def __call__(self, request: ActionRequest) -> str:
        self.variants.append((request.entity_id, request.variant, request.partition_key))
        return "ok"


def playbook() -> Playbook:
    experiment = Experiment(
        name="subject_test",
        variants={"plain": {"permanent_errors": ["Plain"]}, "bold": {"permanent_errors": ["B"]}},
        control="plain",
        metric="converted",
        window="2d",
        min_samples_per_variant=200,
        min_days=1,
    )
    return Playbook(
        name="promo",
        entity_key="customer_id",
        rules=[Rule(name="likely", when="score >= 0.5", action="offer", experiment=experiment)],
        guardrails=Guardrails(holdout_fraction=0.1, max_flagged_fraction=1.0, max_actions=None),
    )


@dataclass
class Project:
    defs: dg.Definitions
    instance: dg.DagsterInstance
    ledger: ActionLedger
    clock: Clock
    sent: Sent
    io: dict[str, Any]

    def materialize(self, asset: dg.AssetsDefinition, day: str) -> None:
        result = dg.materialize(
            [asset], partition_key=day, instance=self.instance, resources=self.io
        )
        assert result.success

    def run(self, job: str, day: str) -> dg.ExecuteInProcessResult:
        result = self.defs.resolve_job_def(job).execute_in_process(
            partition_key=day, instance=self.instance
        )
        assert result.success
        return result


def make_project(tmp_path: Path) -> tuple[Project, dg.AssetsDefinition, dg.AssetsDefinition]:
    partitions = dg.StaticPartitionsDefinition(DAYS)
    clock = Clock(datetime(2026, 11, 1, 8, tzinfo=UTC))
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)
    book = playbook()

    @dg.asset(partitions_def=partitions)
    def scores(context: dg.AssetExecutionContext) -> pd.DataFrame:
        day = DAYS.index(context.partition_key)
        # 3,000 new customers a day (about 300 held out), so each day's assignment is fresh.
        ids = [f"c{day}-{i}" for i in range(3_000)]
        return pd.DataFrame({"customer_id": ids, "score": 0.9})

    @dg.asset(partitions_def=partitions)
    def conversions(context: dg.AssetExecutionContext) -> pd.DataFrame:
        # The simulated world: who converted, by the arm the ledger says each customer was in.
        exposures = ledger.exposures_frame("promo")
        day = exposures[exposures["partition_key"] == context.partition_key]
        rng = np.random.default_rng(DAYS.index(context.partition_key))
        rates = day["arm"].map(TRUE_RATES).to_numpy(dtype=float)
        converted = rng.random(len(day)) < rates
        return pd.DataFrame(
            {
                "customer_id": day["entity_id"].to_numpy(),
                "occurred_at": day["exposed_at"] + timedelta(hours=6),
                "converted": converted.astype(int),
            }
        )

    sent = Sent()
    execution = build_execution_defs(
        insight=scores,
        playbook=book,
        ledger=ledger,
        channels={"offer": PythonChannel.from_callable(sent)},
        outcomes=conversions,
    )
    io = {"io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))}
    defs = dg.Definitions.merge(
        dg.Definitions(assets=[scores, conversions], resources=io), execution
    )
    project = Project(defs, dg.DagsterInstance.ephemeral(), ledger, clock, sent, io)
    return project, scores, conversions


def test_an_outcome_partition_updates_the_experiment_and_a_promotion_moves_the_next_partition(
    tmp_path: Path,
) -> None:
    project, scores, conversions = make_project(tmp_path)
    project.materialize(scores, DAYS[0])
    project.run("promo_execution_job", DAYS[0])
    first_day = [v for _, v, p in project.sent.variants if p == DAYS[0]]
    assert set(first_day) == {"plain", "bold"}

    project.clock.now += timedelta(days=1, hours=2)
    project.materialize(conversions, DAYS[0])
    result = project.run("promo_outcomes_job", DAYS[0])
    found = materializations(result)

    experiment = found["promo/experiment"]
    assert experiment["status"] == "promoted" and experiment["winner"] == "bold"
    assert experiment["n/plain"] + experiment["n/bold"] == len(first_day)
    assert experiment["rate/bold"] > experiment["rate/plain"]
    assert experiment["weight/bold"] == 1.0 and experiment["weight/plain"] == 0.0
    assert 0.0 <= experiment["srm_p_value"] <= 1.0
    learnings = found["promo/learnings"]["learnings"]
    assert "**bold** was promoted" in learnings and "plain archived" in learnings
    uplift = found["promo/uplift"]
    assert uplift["verdict/offer"] == "effect" and uplift["lift/offer"] > 0
    events = [e["kind"] for e in project.ledger.experiment_events("promo", "subject_test")]
    assert events == ["started", "promoted", "archived"]

    # The promotion holds from the next partition on: everyone outside the holdout gets bold.
    project.materialize(scores, DAYS[1])
    project.run("promo_execution_job", DAYS[1])
    second_day = [v for _, v, p in project.sent.variants if p == DAYS[1]]
    assert second_day and set(second_day) == {"bold"}
    held = project.ledger.exposures_frame("promo")
    assert (held[held["partition_key"] == DAYS[1]]["arm"] == "holdout").sum() > 0


def test_the_outcomes_sensor_requests_each_new_partition_once(tmp_path: Path) -> None:
    project, scores, conversions = make_project(tmp_path)
    sensor = project.defs.resolve_sensor_def("promo_outcomes_sensor")
    empty = sensor(dg.build_sensor_context(instance=project.instance, definitions=project.defs))
    assert isinstance(empty, dg.SensorResult) and not empty.run_requests
    project.materialize(scores, DAYS[0])
    project.run("promo_execution_job", DAYS[0])
    project.materialize(conversions, DAYS[0])
    project.materialize(conversions, DAYS[1])

    tick = sensor(dg.build_sensor_context(instance=project.instance, definitions=project.defs))
    assert isinstance(tick, dg.SensorResult)
    requests = tick.run_requests or []
    assert [r.partition_key for r in requests] == DAYS[:2]
    assert len({r.run_key for r in requests}) == 2
    again = sensor(
        dg.build_sensor_context(
            instance=project.instance, definitions=project.defs, cursor=tick.cursor
        )
    )
    assert isinstance(again, dg.SensorResult) and not again.run_requests
