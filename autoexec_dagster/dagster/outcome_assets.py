"""Outcomes in the asset graph: ``<playbook>/experiment``, ``<playbook>/learnings``, ``<playbook>/uplift``.

``build_execution_defs(..., outcomes=<asset>)`` wires an outcome asset (one row per entity and
time with metric columns, partitioned like the outcomes arrive) to the playbook's execution layer:

- ``<playbook>/experiment`` (per outcome partition): the partition's outcomes are stored and every
  experiment of the playbook updated (:func:`~autoexec_dagster.update_experiment`): per variant n,
  rate, interval, P(best), expected loss and weight as metadata the UI plots over partitions;
  the SRM p-value; the status and the winner.
- ``<playbook>/learnings``: the Markdown learnings of each experiment.
- ``<playbook>/uplift``: treated against held out per action, cumulative and per insight
  partition; the ``<playbook>_uplift`` check warns when, with enough data, an action shows no
  effect or harm.
- ``<playbook>_outcomes_sensor`` requests ``<playbook>_outcomes_job`` for each new materialization
  of the outcome asset; its cursor is the event-log storage id and its run key names the
  materialization, like the insight sensor's.
"""

import logging
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import dagster as dg
import pandas as pd

from autoexec_dagster.dagster.execution_assets import ExecutionSetup
from autoexec_dagster.dagster.insight_sensor import fetch_new_materializations
from autoexec_dagster.dagster.metadata import table_preview
from autoexec_dagster.experiments.update import ExperimentResult, record_outcomes, update_experiment
from autoexec_dagster.experiments.uplift import (
    ALL_PARTITIONS,
    HARM,
    NO_EFFECT,
    NOT_ENOUGH_DATA,
    uplift,
)

EXPERIMENT = "experiment"
LEARNINGS = "learnings"
UPLIFT = "uplift"


def outcome_asset_names(setup: ExecutionSetup) -> list[str]:
    """The outcome assets a playbook gets: experiment and learnings only when it runs one."""
    names = [EXPERIMENT, LEARNINGS] if setup.playbook.experiments() else []
    return [*names, UPLIFT]


def uplift_check_name(setup: ExecutionSetup) -> str:
    """``<playbook>_uplift``."""
    return f"{setup.playbook.name}_uplift"


def _float(value: Any) -> dg.MetadataValue:
    number = float(value)
    return dg.MetadataValue.float(round(number, 6) if math.isfinite(number) else math.nan)


def experiment_metadata(result: ExperimentResult, *, prefix: str = "") -> dict[str, Any]:
    """Metadata of one experiment: status, winner, SRM, and per-variant figures to plot."""
    metadata: dict[str, Any] = {
        f"{prefix}status": result.status,
        f"{prefix}winner": result.winner or "",
        f"{prefix}srm_p_value": _float(result.srm_p_value),
        f"{prefix}days_elapsed": _float(result.days_elapsed),
        f"{prefix}holdout_n": result.holdout_n,
        f"{prefix}holdout_rate": _float(result.holdout_rate),
        f"{prefix}outcomes_added": result.outcomes_added,
        f"{prefix}decision": dg.MetadataValue.text(result.decision),
    }
    for row in result.variants.to_dict("records"):
        variant = row["variant"]
        metadata[f"{prefix}n/{variant}"] = int(row["n"])
        for column in ("rate", "ci_low", "ci_high", "probability_best", "expected_loss", "weight"):
            metadata[f"{prefix}{column}/{variant}"] = _float(row[column])
    view = result.variants.copy()
    for column in view.columns:
        if view[column].dtype.kind == "f":
            view[column] = view[column].round(5)
    metadata[f"{prefix}variants"] = table_preview(view, personal_columns=(), max_rows=50)
    return metadata


def uplift_metadata(table: pd.DataFrame, *, max_rows: int) -> dict[str, Any]:
    """Cumulative lift per action (to plot) and a table of the per-partition figures."""
    metadata: dict[str, Any] = {}
    overall = table[table["partition_key"] == ALL_PARTITIONS]
    for row in overall.to_dict("records"):
        action = row["action"]
        for column in ("lift", "lift_low", "lift_high", "difference", "treated_rate"):
            metadata[f"{column}/{action}"] = _float(row[column])
        metadata[f"holdout_rate/{action}"] = _float(row["holdout_rate"])
        metadata[f"verdict/{action}"] = row["verdict"]
        metadata[f"treated_n/{action}"] = int(row["treated_n"])
        metadata[f"holdout_n/{action}"] = int(row["holdout_n"])
    view = table.copy()
    for column in view.columns:
        if view[column].dtype.kind == "f":
            view[column] = view[column].round(5)
    metadata["uplift"] = table_preview(view, personal_columns=(), max_rows=max_rows)
    return metadata


def _effect_text(row: Mapping[Any, Any]) -> str:
    """The effect in words: the relative lift with its interval, or, when the holdout's rate is
    0 and a relative lift means nothing, the difference the verdict rests on."""
    difference = (
        f"difference {row['difference']:+.4g} (95% interval [{row['difference_low']:+.4g}, "
        f"{row['difference_high']:+.4g}])"
    )
    if all(math.isfinite(float(row[c])) for c in ("lift", "lift_low", "lift_high")):
        return (
            f"lift {row['lift']:+.1%}, 95% interval [{row['lift_low']:+.1%}, "
            f"{row['lift_high']:+.1%}]; {difference}"
        )
    return f"{difference}; no relative lift: the holdout's rate is {row['holdout_rate']:.4g}"


def _uplift_check(setup: ExecutionSetup, table: pd.DataFrame) -> dg.AssetCheckResult:
    overall = table[table["partition_key"] == ALL_PARTITIONS]
    bad = overall[overall["verdict"].isin([NO_EFFECT, HARM])]
    lines = [
        f"{r['action']}: {r['verdict']} ({_effect_text(r)}, {r['treated_n']:,} treated vs "
        f"{r['holdout_n']:,} held out)"
        for r in overall.to_dict("records")
        if r["verdict"] != NOT_ENOUGH_DATA
    ]
    waiting = overall[overall["verdict"] == NOT_ENOUGH_DATA]["action"].tolist()
    if waiting:
        lines.append(f"not enough data yet: {', '.join(map(str, waiting))}")
    return dg.AssetCheckResult(
        check_name=uplift_check_name(setup),
        asset_key=setup.asset_key(UPLIFT),
        passed=bad.empty,
        severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(lines) or "no action has a holdout to compare with",
        metadata={"actions_without_effect": len(bad)},
    )


def _load_quietly(
    context: dg.AssetExecutionContext, key: dg.AssetKey, partition: str | None
) -> Any:
    """The outcome partition, through its own IO manager.

    Dagster's loader logs each load at DEBUG on its own console logger, whatever the run's log
    level: two lines of noise per run in a terminal. Debug records are held back for the load.
    """
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.DEBUG))
    try:
        return context.load_asset_value(key, partition_key=partition)
    finally:
        logging.disable(previous)


def _as_frame(value: Any) -> pd.DataFrame:
    if isinstance(value, pd.DataFrame):
        return value
    to_pandas = getattr(value, "to_pandas", None)
    if callable(to_pandas):
        frame = to_pandas()
        if isinstance(frame, pd.DataFrame):
            return frame
    raise TypeError(
        f"the outcome asset must load as a pandas DataFrame, got {type(value).__name__}"
    )


def build_outcome_defs(
    *,
    setup: ExecutionSetup,
    outcomes_key: dg.AssetKey,
    partitions_def: dg.PartitionsDefinition | None,
    sensor_default_status: dg.DefaultSensorStatus,
    minimum_interval_seconds: int,
) -> tuple[dg.AssetsDefinition, Any, dg.SensorDefinition]:
    """The outcome assets with the uplift check, their job and the outcomes sensor."""
    book = setup.playbook
    names = outcome_asset_names(setup)
    io_key = setup.io_manager_key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        check = dg.AssetCheckSpec(
            uplift_check_name(setup),
            asset=setup.asset_key(UPLIFT),
            blocking=False,
            description=f"With enough data, every action of {book.name!r} that has a holdout "
            "does better than no action.",
        )

    @dg.multi_asset(
        name=f"{book.name}_outcomes",
        outs={
            name: dg.AssetOut(
                key=setup.asset_key(name),
                io_manager_key=io_key,
                group_name=setup.group_name,
                description={
                    EXPERIMENT: "The experiments after this outcome partition: per variant n, "
                    "rate, interval, P(best), expected loss, weight; SRM; status.",
                    LEARNINGS: "What the experiments have shown, in Markdown.",
                    UPLIFT: "Treated against held out per action: did the action work?",
                }[name],
                kinds={"python"},
            )
            for name in names
        },
        # A dependency loaded in the body, like the insight: the execution layer's definitions
        # then resolve on their own, whoever defines the outcome asset.
        deps=[outcomes_key],
        partitions_def=partitions_def,
        check_specs=[check],
        can_subset=False,
        op_tags={"autoexec/playbook": book.name},
    )
    def _outcome_assets(context: dg.AssetExecutionContext) -> Iterator[Any]:
        ledger = setup.ledger.get()
        partition = context.partition_key if context.has_partition_key else None
        frame = _as_frame(_load_quietly(context, outcomes_key, partition))
        results: list[ExperimentResult] = []
        experiments = sorted(book.experiments())
        if experiments:
            for index, name in enumerate(experiments):
                results.append(
                    update_experiment(
                        playbook=book,
                        ledger=ledger,
                        outcomes=frame if index == 0 else None,
                        experiment=name,
                    )
                )
        else:
            record_outcomes(playbook=book, ledger=ledger, outcomes=frame)
        if experiments:
            metadata: dict[str, Any] = {}
            several = len(results) > 1
            for result in results:
                metadata.update(
                    experiment_metadata(result, prefix=f"{result.experiment}/" if several else "")
                )
                context.log.info(
                    f"{book.name}: experiment {result.experiment} {result.status}"
                    + (f", winner {result.winner}" if result.winner else "")
                    + f"; {result.decision}"
                )
            yield dg.Output(
                {r.experiment: r.variants for r in results},
                output_name=EXPERIMENT,
                metadata=metadata,
            )
            text = "\n\n".join(r.learnings_markdown() for r in results)
            yield dg.Output(
                text, output_name=LEARNINGS, metadata={"learnings": dg.MetadataValue.md(text)}
            )
        table = uplift(playbook=book, ledger=ledger)
        yield dg.Output(
            table,
            output_name=UPLIFT,
            metadata=uplift_metadata(table, max_rows=max(setup.preview_rows, 20)),
        )
        yield _uplift_check(setup, table)

    job = dg.define_asset_job(
        name=f"{book.name}_outcomes_job",
        selection=dg.AssetSelection.assets(_outcome_assets),
        executor_def=dg.in_process_executor,
        description=f"Store a partition of {outcomes_key.to_user_string()} and update the "
        f"experiments and the uplift of playbook {book.name!r}.",
        tags={"autoexec/playbook": book.name},
    )
    outcome_name = outcomes_key.to_user_string()

    @dg.sensor(
        name=f"{book.name}_outcomes_sensor",
        job=job,
        default_status=sensor_default_status,
        minimum_interval_seconds=minimum_interval_seconds,
        description=f"Updates the experiments and uplift of {book.name!r} on each new "
        f"partition of {outcome_name}.",
    )
    def _sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        after = int(context.cursor) if context.cursor and context.cursor.isdigit() else 0
        records = fetch_new_materializations(context.instance, outcomes_key, after_storage_id=after)
        requests = []
        for record in records:
            partition = record.partition_key
            requests.append(
                dg.RunRequest(
                    run_key=f"{outcome_name}:{partition or '-'}:{record.storage_id}",
                    partition_key=partition,
                    tags={"autoexec/outcomes_storage_id": str(record.storage_id)},
                )
            )
        cursor = str(records[-1].storage_id) if records else context.cursor
        if not requests:
            return dg.SensorResult(
                skip_reason=f"no new materialization of {outcome_name}", cursor=cursor
            )
        return dg.SensorResult(run_requests=requests, cursor=cursor)

    return _outcome_assets, job, _sensor
