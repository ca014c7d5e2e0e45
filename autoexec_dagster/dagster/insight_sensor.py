"""The insight sensor and the batch schedule: they only request runs, never act.

The sensor ``<playbook>_sensor`` reads the insight's materializations from the event log in
storage-id order, after the storage id in its cursor (:class:`InsightCursor`), page by page, so
several partitions landing between two ticks are all answered and none twice. Per partition it
answers the newest materialization read in the tick with one run request of the execution job,
``run_key = "<insight>:<partition>:<storage id>"``; Dagster drops a request whose run key it has
seen, so a tick evaluated twice (sensor evaluation is at-least-once) launches nothing new.

A partition without flagged entities gets no run. Whether it has any is read, in this order, from:

1. the materialization's metadata under ``flagged_metadata_key`` (``"autoexec/flagged"`` by
   default; write it with :func:`flagged_metadata` in the insight asset): cheap, preferred;
2. otherwise, by loading the partition through the insight's IO manager and routing it with the
   playbook (costs a load and a routing per partition in the sensor tick).

When neither works (the value cannot be loaded or routed) the run is requested anyway, so the
blocking checks of that run say what is wrong rather than the partition being skipped in silence.
"""

import json
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import dagster as dg
import pandas as pd

from autoexec_dagster.dagster.execution_assets import PAUSED_RUN_TAG, ExecutionSetup
from autoexec_dagster.dagster.insight_checks import as_insight_frame
from autoexec_dagster.errors import AutoexecError
from autoexec_dagster.playbook import Playbook
from autoexec_dagster.routing import route

FLAGGED_METADATA_KEY = "autoexec/flagged"
PAGE_SIZE = 500
# Bound one tick's work; the cursor lets the next tick continue where this one stopped.
MAX_RECORDS_PER_TICK = 1_000
MAX_LOADS_PER_TICK = 50
TICK_BUDGET_SECONDS = 30.0
_CURSOR_VERSION = 1

if TYPE_CHECKING:
    # What dg.define_asset_job returns; Dagster does not export the class at the top level.
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )


@dataclass(frozen=True)
class InsightCursor:
    """The sensor's cursor: the last insight materialization it has answered.

    Serialised as JSON, ``{"v": 1, "after_storage_id": 1234}``, plus ``"resumed_at"`` once the
    sensor has answered a lifted pause.

    Attributes:
        after_storage_id: Event-log storage id of the last materialization answered; 0 before any.
        resumed_at: POSIX time of the last lift of the kill switch the sensor answered by
            requesting the partitions the pause interrupted; 0 before any.
    """

    after_storage_id: int = 0
    resumed_at: float = 0.0

    def serialize(self) -> str:
        """The cursor as the JSON string Dagster stores."""
        data: dict[str, Any] = {"v": _CURSOR_VERSION, "after_storage_id": self.after_storage_id}
        if self.resumed_at:
            data["resumed_at"] = self.resumed_at
        return json.dumps(data)

    @classmethod
    def parse(cls, raw: str | None) -> "InsightCursor":
        """Read a stored cursor; None or "" means start from the beginning.

        A bare integer is accepted too, so an operator can set the cursor by hand in the UI.

        Raises:
            ValueError: The cursor is neither of those; the sensor tick fails rather than
                silently starting over.
        """
        if raw is None or not raw.strip():
            return cls()
        text = raw.strip()
        if text.isdigit():
            return cls(int(text))
        try:
            data = json.loads(text)
            value = int(data["after_storage_id"])
            resumed_at = float(data.get("resumed_at", 0.0))
        except (ValueError, TypeError, KeyError, AttributeError):
            raise ValueError(
                f"the autoexec sensor cursor {raw!r} is not valid; expected "
                '{"v": 1, "after_storage_id": <int>} or an integer storage id'
            ) from None
        if value < 0:
            raise ValueError(f"the autoexec sensor cursor {raw!r} holds a negative storage id")
        return cls(value, resumed_at)


def flagged_metadata(
    frame: pd.DataFrame, playbook: Playbook, *, key: str = FLAGGED_METADATA_KEY
) -> dict[str, int]:
    """Metadata for the insight's own materialization: how many entities the playbook flags.

    Add it to the insight asset's output (``dg.Output(frame, metadata=flagged_metadata(...))``
    or ``context.add_output_metadata``) so the sensor decides without loading the partition.

    Returns:
        ``{key: flagged}``, or ``{}`` when the frame cannot be routed (the sensor then loads the
        partition itself and requests the run, whose checks report the problem).
    """
    try:
        plan = route(frame, playbook)
    except (AutoexecError, ValueError):
        return {}
    return {key: int((plan["decision"].astype(str) != "skip").sum())}


def _metadata_count(metadata: Mapping[str, Any], key: str) -> int | None:
    value = metadata.get(key)
    raw = getattr(value, "value", value)
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return None
    return int(raw)


def fetch_new_materializations(
    instance: dg.DagsterInstance,
    asset_key: dg.AssetKey,
    *,
    after_storage_id: int,
    limit: int = MAX_RECORDS_PER_TICK,
    page_size: int = PAGE_SIZE,
) -> list[dg.EventLogRecord]:
    """Materializations of ``asset_key`` after a storage id, oldest first, at most ``limit``."""
    records: list[dg.EventLogRecord] = []
    after = after_storage_id
    while len(records) < limit:
        result = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset_key, after_storage_id=after),
            limit=min(page_size, limit - len(records)),
            ascending=True,
        )
        records.extend(result.records)
        if not result.records or not result.has_more:
            break
        after = result.records[-1].storage_id
    return records


def build_insight_sensor(
    *,
    setup: ExecutionSetup,
    job: "UnresolvedAssetJobDefinition",
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds: int = 30,
    flagged_metadata_key: str = FLAGGED_METADATA_KEY,
    max_records_per_tick: int = MAX_RECORDS_PER_TICK,
    max_loads_per_tick: int = MAX_LOADS_PER_TICK,
    tick_budget_seconds: float = TICK_BUDGET_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> dg.SensorDefinition:
    """The sensor ``<playbook>_sensor`` that requests the execution job per new insight partition.

    Args:
        setup: The execution setup (playbook, insight and ledger).
        job: The execution job to request.
        default_status: STOPPED unless the caller opts in: runs reach real destinations.
        minimum_interval_seconds: Least time between two ticks.
        flagged_metadata_key: Materialization metadata key holding the flagged count.
        max_records_per_tick: Most materializations read in one tick.
        max_loads_per_tick: Most insight partitions loaded in one tick (only partitions whose
            materialization lacks the flagged count are loaded); the rest wait for the next.
        tick_budget_seconds: Time after which a tick stops loading and ends with its cursor past
            what it answered, well inside Dagster's sensor timeout (60 s by default).
        clock: Monotonic clock measuring the budget (tests pass their own).

    Returns:
        The sensor definition.
    """
    playbook = setup.playbook
    insight_key = setup.insight_key
    insight_name = setup.insight_name

    def pause_and_resume(
        context: dg.SensorEvaluationContext,
    ) -> tuple[tuple[str, str | None, str | None] | None, Any]:
        try:
            book = setup.ledger.get()
            return book.pause_state(playbook.name), book
        except AutoexecError as exc:
            # The run would fail on the same ledger; let it say so with its own message.
            context.log.warning(f"{playbook.name}: cannot read the kill switch ({exc})")
            return None, None

    def paused_runs(context: dg.SensorEvaluationContext, *, since: float) -> set[str]:
        # A run stopped by the pause before it reserved anything leaves no trace in the ledger;
        # its execute step tagged the run instead.
        runs = context.instance.get_runs(
            dg.RunsFilter(
                job_name=job.name,
                statuses=[dg.DagsterRunStatus.FAILURE],
                tags={PAUSED_RUN_TAG: "true"},
                created_after=datetime.fromtimestamp(since, UTC) if since else None,
            ),
            limit=MAX_RECORDS_PER_TICK,
        )
        return {run.tags.get("dagster/partition", "") for run in runs}

    @dg.sensor(
        name=f"{playbook.name}_sensor",
        job=job,
        default_status=default_status,
        minimum_interval_seconds=minimum_interval_seconds,
        description=f"Requests one {job.name} run per new partition of {insight_name} that holds "
        f"entities playbook {playbook.name!r} flags, and, once a pause is lifted, one per "
        "partition the pause interrupted. Skips, with who paused and why, while the playbook is "
        "paused. Never acts itself.",
    )
    def _sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        started = clock()
        cursor = InsightCursor.parse(context.cursor)
        paused, book = pause_and_resume(context)
        records = fetch_new_materializations(
            context.instance,
            insight_key,
            after_storage_id=cursor.after_storage_id,
            limit=max_records_per_tick,
        )
        if paused is not None:
            scope, by, reason = paused
            target = "every playbook" if scope == "*" else f"playbook {scope!r}"
            waiting = (
                f"{len(records):,}{'+' if len(records) == max_records_per_tick else ''} new "
                f"materialization(s) of {insight_name} wait"
                if records
                else "no new materialization waits"
            )
            # The cursor stays put: what arrives during the pause is answered after the resume.
            return dg.SensorResult(
                skip_reason=f"{target} is paused by {by or 'unknown'}: {reason or 'no reason'}; "
                f"{waiting} (`autoexec resume --playbook {playbook.name}` lifts it)",
                cursor=cursor.serialize(),
            )
        requests: list[dg.RunRequest] = []
        resumed_at = cursor.resumed_at
        if book is not None:
            lifted = book.last_resumed_at(playbook.name)
            stamp = lifted.timestamp() if lifted is not None else 0.0
            if stamp > cursor.resumed_at:
                interrupted = sorted(
                    set(book.partitions_with_pending_work(playbook=playbook.name))
                    | paused_runs(context, since=cursor.resumed_at)
                )
                for partition in interrupted:
                    requests.append(
                        dg.RunRequest(
                            run_key=f"{insight_name}:{partition or '-'}:resumed:{stamp:.6f}",
                            partition_key=partition or None,
                            tags={
                                "autoexec/playbook": playbook.name,
                                "autoexec/resumed": "true",
                            },
                        )
                    )
                if interrupted:
                    context.log.info(
                        f"{playbook.name}: the pause was lifted; requesting the "
                        f"{len(interrupted)} partition(s) it interrupted: {_sample(interrupted)}"
                    )
                resumed_at = stamp
        resumed_partitions = {r.partition_key for r in requests}
        latest: dict[str | None, dg.EventLogRecord] = {}
        for record in records:
            # A partition materialized twice since the last tick: answer the newer data only.
            latest.pop(record.partition_key, None)
            latest[record.partition_key] = record
        empty: list[str] = []
        loads = 0
        finished = cursor.after_storage_id
        stopped_early = False
        with ExitStack() as stack:
            loader: Any = None

            def flagged_by_loading(partition: str | None) -> int | None:
                nonlocal loader
                repository = context.repository_def
                if repository is None:
                    return None
                try:
                    if loader is None:
                        # One loader per tick builds the IO manager's resources once.
                        loader = stack.enter_context(
                            repository.get_asset_value_loader(instance=context.instance)
                        )
                    value = loader.load_asset_value(insight_key, partition_key=partition)
                    plan = route(
                        as_insight_frame(value, insight=insight_name),
                        playbook,
                        partition_key=partition or "",
                        insight_name=insight_name,
                    )
                except Exception as exc:  # any IO manager or data fault: the run's checks report
                    context.log.warning(
                        f"{playbook.name}: cannot count flagged entities of {insight_name} "
                        f"[{partition or '-'}] ({type(exc).__name__}: {str(exc)[:300]}); "
                        "requesting the run so its checks report the problem"
                    )
                    return None
                return int((plan["decision"].astype(str) != "skip").sum())

            for partition, record in latest.items():
                materialization = record.asset_materialization
                metadata = materialization.metadata if materialization is not None else {}
                flagged = _metadata_count(metadata, flagged_metadata_key)
                if flagged is None:
                    over_budget = clock() - started > tick_budget_seconds
                    if loads and (loads >= max_loads_per_tick or over_budget):
                        stopped_early = True
                        break
                    loads += 1
                    flagged = flagged_by_loading(partition)
                finished = record.storage_id
                if flagged == 0:
                    empty.append(partition or "-")
                    continue
                if partition in resumed_partitions:
                    continue  # already requested for the lifted pause; one run covers both
                requests.append(
                    dg.RunRequest(
                        run_key=f"{insight_name}:{partition or '-'}:{record.storage_id}",
                        partition_key=partition,
                        tags={
                            "autoexec/playbook": playbook.name,
                            "autoexec/insight_storage_id": str(record.storage_id),
                        },
                    )
                )
        if not stopped_early and records:
            finished = records[-1].storage_id
        if empty:
            context.log.info(
                f"{playbook.name}: no flagged entities in {len(empty)} partition(s) of "
                f"{insight_name}, no run: {_sample(empty)}"
            )
        if stopped_early:
            context.log.info(
                f"{playbook.name}: loaded {loads} partition(s) of {insight_name} in "
                f"{clock() - started:.1f} s; the rest waits for the next tick"
            )
        next_cursor = InsightCursor(finished, resumed_at).serialize()
        if not requests:
            if not records:
                reason = f"no new materialization of {insight_name}"
            else:
                reason = (
                    f"{len(records)} new materialization(s) of {insight_name}, none with "
                    f"flagged entities ({_sample(empty)})"
                )
            return dg.SensorResult(skip_reason=reason, cursor=next_cursor)
        return dg.SensorResult(run_requests=requests, cursor=next_cursor)

    return _sensor


def _sample(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def build_execution_schedule(
    *,
    setup: ExecutionSetup,
    job: "UnresolvedAssetJobDefinition",
    cron_schedule: str,
    default_status: dg.DefaultScheduleStatus = dg.DefaultScheduleStatus.STOPPED,
    execution_timezone: str | None = None,
) -> dg.ScheduleDefinition:
    """A schedule ``<playbook>_schedule`` for batch runs of the execution job.

    At each tick it considers the newest partition for time-window partitions, and every
    partition otherwise (static or dynamic partitions), and requests those the insight has
    materialized that still hold work: never executed, or holding actions a pause or a crash
    left unsent (reserved, sending or in doubt), as the ledger says. A finished partition is not
    requested again (new data for it is the sensor's to answer).

    Args:
        setup: The execution setup (playbook, insight and partitions).
        job: The execution job.
        cron_schedule: When to run, e.g. ``"0 6 * * *"``.
        default_status: STOPPED unless the caller opts in.
        execution_timezone: Timezone of the cron schedule (default UTC).

    Returns:
        The schedule definition.
    """
    playbook = setup.playbook
    partitions_def = setup.partitions_def
    insight_key = setup.insight_key
    name = f"{playbook.name}_schedule"

    @dg.schedule(
        name=name,
        cron_schedule=cron_schedule,
        job=job,
        default_status=default_status,
        execution_timezone=execution_timezone,
        description=f"Batch runs of {job.name} on {cron_schedule!r}.",
    )
    def _schedule(context: dg.ScheduleEvaluationContext) -> Any:
        tick = context.scheduled_execution_time
        stamp = tick.isoformat() if tick is not None else "manual"
        if partitions_def is None:
            return dg.RunRequest(run_key=f"{name}:{stamp}")
        keys = list(
            partitions_def.get_partition_keys(
                current_time=tick, dynamic_partitions_store=context.instance
            )
        )
        if isinstance(partitions_def, dg.TimeWindowPartitionsDefinition):
            keys = keys[-1:]
        materialized = context.instance.get_materialized_partitions(insight_key)
        ready = [k for k in keys if k in materialized]
        if not ready:
            return dg.SkipReason(
                f"no materialized partition of {setup.insight_name} to run "
                f"(wanted {_sample(keys) or 'none'})"
            )
        book = setup.ledger.get()
        executed = book.recorded_partitions(playbook=playbook.name, partition_keys=ready)
        pending = set(
            book.partitions_with_pending_work(playbook=playbook.name, partition_keys=ready)
        )
        todo = [k for k in ready if k not in executed or k in pending]
        if not todo:
            return dg.SkipReason(
                f"every materialized partition of {setup.insight_name} is done "
                f"({_sample(ready)}); nothing to run"
            )
        return [dg.RunRequest(run_key=f"{name}:{key}:{stamp}", partition_key=key) for key in todo]

    return _schedule
