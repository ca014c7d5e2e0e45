"""``build_execution_defs``: add an execution layer to an existing Dagster project in a few lines.

::

    import dagster as dg
    from autoexec_dagster import build_execution_defs

    defs = dg.Definitions.merge(
        existing_defs,
        build_execution_defs(
            insight="churn_scores",
            playbook="playbooks/churn.yaml",
            channels={"retention_email": email_channel, "crm_task": crm_channel},
            ledger="postgresql+psycopg://autoexec@db/autoexec",
        ),
    )

The returned Definitions bind one resource, ``autoexec_<playbook>_io_manager``; the ledger and the
channels are closed over by the ops, so merging with a project that binds ``io_manager``,
``ledger`` or any other common key never conflicts.
"""

import os
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from datetime import datetime
from pathlib import Path
from typing import Any

import dagster as dg

from autoexec_dagster.approvals.links import ApprovalLinks
from autoexec_dagster.channels.base import Channel
from autoexec_dagster.dagster.approval_assets import (
    APPROVALS,
    build_approval_sla_check,
    has_approval_steps,
)
from autoexec_dagster.dagster.execution_assets import (
    ExecuteFn,
    ExecutionSetup,
    build_execution_assets,
    default_execute,
    execution_asset_keys,
    execution_resources,
)
from autoexec_dagster.dagster.insight_checks import build_insight_checks
from autoexec_dagster.dagster.insight_sensor import (
    FLAGGED_METADATA_KEY,
    build_execution_schedule,
    build_insight_sensor,
)
from autoexec_dagster.dagster.ledger_resource import LedgerHandle
from autoexec_dagster.dagster.metadata import PREVIEW_ROWS
from autoexec_dagster.dagster.outcome_assets import build_outcome_defs
from autoexec_dagster.dagster.workflow_sensor import build_workflow_sensor
from autoexec_dagster.errors import ChannelConfigError, PlaybookError
from autoexec_dagster.executor.sharding import check_shards
from autoexec_dagster.experiments.experiment import check_variant_fields
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.playbook import Playbook, experiments_by_action, proposes_actions

InsightRef = dg.AssetKey | str | Sequence[str] | dg.AssetsDefinition | dg.AssetSpec


class InsightPartitionsGuard(dg.AssetSelection):
    """The execution job's selection, which checks the insight's partitions in the merged graph.

    ``build_execution_defs`` cannot see the project it is merged into, so an insight given as a
    bare key carries no partitions. Dagster resolves every asset job against the merged asset
    graph when definitions load (a code server, ``dg check defs``,
    ``Definitions.validate_loadable``); this selection raises there, with the fix, instead of
    letting the sensor request partitioned runs that fail at launch with "There is no
    PartitionsDefinition shared by all the provided assets".

    Args:
        selection: The selection it stands for.
        insight_key: The insight asset.
        partitions_def: The partitions the execution assets were built with.
    """

    def __init__(
        self,
        selection: dg.AssetSelection,
        *,
        insight_key: dg.AssetKey,
        partitions_def: dg.PartitionsDefinition | None,
    ):
        self._selection = selection
        self._insight_key = insight_key
        self._partitions_def = partitions_def

    def _check(self, asset_graph: Any) -> None:
        if not asset_graph.has(self._insight_key):
            return  # defined elsewhere (another code location): nothing to compare with
        actual = asset_graph.get(self._insight_key).partitions_def
        expected = self._partitions_def
        if actual == expected:
            return
        name = self._insight_key.to_user_string()
        if expected is None:
            raise dg.DagsterInvalidDefinitionError(
                f"the insight {name!r} is partitioned ({type(actual).__name__}) but "
                "build_execution_defs was given only its key, so the execution assets are "
                "unpartitioned and every run the sensor requests would fail at launch; pass "
                "partitions_def= (the insight's PartitionsDefinition) or the insight's "
                "AssetsDefinition or AssetSpec as insight="
            )
        raise dg.DagsterInvalidDefinitionError(
            f"the insight {name!r} has partitions {actual!r} but the execution assets were built "
            f"with {expected!r}; pass the insight's own PartitionsDefinition as partitions_def= "
            "(or the insight's AssetsDefinition as insight=)"
        )

    def resolve_inner(self, asset_graph: Any, allow_missing: bool) -> AbstractSet[dg.AssetKey]:
        """The selected assets, after checking the insight's partitions."""
        self._check(asset_graph)
        return self._selection.resolve_inner(asset_graph, allow_missing=allow_missing)

    def resolve_checks_inner(
        self, asset_graph: Any, allow_missing: bool
    ) -> AbstractSet[dg.AssetCheckKey]:
        """The selected checks."""
        return self._selection.resolve_checks_inner(asset_graph, allow_missing=allow_missing)

    def to_serializable_asset_selection(self, asset_graph: Any) -> dg.AssetSelection:
        """The plain selection: the guard has done its work once definitions have loaded."""
        return self._selection.to_serializable_asset_selection(asset_graph)


def resolve_insight(insight: InsightRef) -> tuple[dg.AssetKey, dg.PartitionsDefinition | None]:
    """The insight's key and, when the reference carries them, its partitions.

    Args:
        insight: An AssetKey, a string (``"a/b"`` path or a plain name), a sequence of key
            parts, an AssetsDefinition with one asset, or an AssetSpec.

    Returns:
        ``(key, partitions_def)``; a bare key carries no partitions (None).

    Raises:
        TypeError: ``insight`` is none of the accepted forms.
        ValueError: An AssetsDefinition holds several assets (pass the one key instead).
    """
    if isinstance(insight, dg.AssetsDefinition):
        keys = list(insight.keys)
        if len(keys) != 1:
            raise ValueError(
                f"the insight AssetsDefinition holds {len(keys)} assets "
                f"({', '.join(k.to_user_string() for k in keys)}); pass the key of the insight, "
                "with partitions_def=, instead"
            )
        return keys[0], insight.partitions_def
    if isinstance(insight, dg.AssetSpec):
        return insight.key, insight.partitions_def
    if isinstance(insight, dg.AssetKey):
        return insight, None
    if isinstance(insight, str):
        if not insight.strip():
            raise ValueError("the insight asset key is empty")
        return dg.AssetKey.from_user_string(insight.strip()), None
    if isinstance(insight, Sequence) and insight and all(isinstance(p, str) for p in insight):
        return dg.AssetKey(list(insight)), None
    raise TypeError(
        "insight must be an AssetKey, a key string ('a/b' or a name), a sequence of key parts, "
        f"an AssetsDefinition or an AssetSpec, got {type(insight).__name__}"
    )


def resolve_playbook(playbook: Playbook | str | os.PathLike[str]) -> Playbook:
    """A Playbook, or one loaded from a YAML path.

    Raises:
        PlaybookError: The file is missing or does not describe a valid playbook.
    """
    if isinstance(playbook, Playbook):
        return playbook
    if isinstance(playbook, str | os.PathLike):
        return Playbook.from_yaml(Path(playbook))
    raise PlaybookError(
        f"playbook must be a Playbook or the path of a YAML file, got {type(playbook).__name__}"
    )


def check_channels(playbook: Playbook, channels: Mapping[str, Channel]) -> None:
    """Every action of the playbook has a channel, and every channel is a Channel.

    Raises:
        ChannelConfigError: An action has no channel, or a value is not a Channel; raised when
            definitions load rather than in the first run.
        ExperimentError: An experiment's variant overrides a field its channel does not have.
    """
    for action, channel in channels.items():
        if not isinstance(channel, Channel):
            raise ChannelConfigError(
                f"channels[{action!r}] must be an autoexec_dagster Channel (EmailChannel, "
                f"WebhookChannel, SqlChannel, PythonChannel, ...), got {type(channel).__name__}"
            )
    missing = [a for a in playbook.actions if a not in channels]
    if missing:
        users = {a: [f"rule {r.name}" for r in playbook.rules if r.action == a] for a in missing}
        for workflow_name, workflow in playbook.workflows.items():
            for step in [*workflow.steps, *workflow.on_failure_steps]:
                if step.action in users:
                    users[step.action].append(f"workflow {workflow_name} step {step.name}")
                if step.notify in users:
                    users[step.notify].append(f"workflow {workflow_name} step {step.name} notify")
        detail = "; ".join(f"{a!r} ({', '.join(users[a])})" for a in missing)
        raise ChannelConfigError(
            f"playbook {playbook.name!r} has no channel for action(s) {detail}; channels given: "
            f"{sorted(channels) or 'none'}"
        )
    for action, experiment in experiments_by_action(playbook).items():
        check_variant_fields(experiment, channels[action], action=action)


def build_execution_defs(
    *,
    insight: InsightRef,
    playbook: Playbook | str | os.PathLike[str],
    channels: Mapping[str, Channel],
    ledger: ActionLedger | str | None = None,
    partitions_def: dg.PartitionsDefinition | None = None,
    dry_run: bool | None = None,
    group_name: str | None = None,
    sensor_default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds: int = 30,
    flagged_metadata_key: str = FLAGGED_METADATA_KEY,
    schedule: str | None = None,
    schedule_default_status: dg.DefaultScheduleStatus = dg.DefaultScheduleStatus.STOPPED,
    schedule_timezone: str | None = None,
    flagged_share_blocking: bool = True,
    preview_rows: int = PREVIEW_ROWS,
    execute_fn: ExecuteFn | None = None,
    workflow_sensor_interval_seconds: int | None = None,
    ledger_clock: Callable[[], datetime] | None = None,
    approval_links: ApprovalLinks | None = None,
    outcomes: InsightRef | None = None,
    outcomes_partitions_def: dg.PartitionsDefinition | None = None,
    shards: int = 1,
    executor_def: dg.ExecutorDefinition | None = None,
    lease_seconds: float = 60.0,
) -> dg.Definitions:
    """Definitions that execute a playbook on every new partition of an insight asset.

    The insight must load through its own IO manager as a pandas DataFrame (one row per entity;
    objects with ``to_pandas()`` are converted). Merge the result with the project that defines
    the insight: ``dg.Definitions.merge(existing_defs, build_execution_defs(...))``.

    Args:
        insight: The insight asset: an AssetKey, a key string (``"a/b"`` path or a name), a
            sequence of key parts, its AssetsDefinition or its AssetSpec.
        playbook: A Playbook, or the path of a playbook YAML file.
        channels: The channel executing each action the playbook names.
        ledger: An ActionLedger, a SQLAlchemy URL, or None for the default
            (``$AUTOEXEC_LEDGER_URL``, else ``autoexec_ledger.db`` in ``$DAGSTER_HOME`` or the
            working directory), opened on first use in the executing process.
        partitions_def: The insight's partitions. Taken from the insight when it is an
            AssetsDefinition or AssetSpec; required when ``insight`` is only a key and the
            insight is partitioned, or the execution assets would read every partition at once.
        dry_run: Record what would be sent without sending; None follows the playbook.
        group_name: Asset group of the execution assets (default: the playbook name).
        sensor_default_status: Whether the sensors (the insight sensor and, when the playbook
            has workflows, the workflow sensor) run without being switched on. STOPPED by
            default: starting to hit real destinations should be a decision.
        minimum_interval_seconds: Least time between two insight sensor ticks.
        flagged_metadata_key: Insight materialization metadata key holding the number of
            flagged entities (see
            :func:`~autoexec_dagster.dagster.insight_sensor.flagged_metadata`).
        schedule: Cron string of an optional batch schedule over the execution job.
        schedule_default_status: Whether that schedule runs without being switched on.
        schedule_timezone: Timezone of the cron string (default UTC).
        flagged_share_blocking: Whether the flagged-share check blocks the execution assets (and
            escalates the batch itself). With False it only reports, and the executor's
            guardrail blocks and escalates the batch inside the run.
        preview_rows: Rows in each metadata preview (at most 100).
        execute_fn: Replaces how a routed plan is executed; see
            :class:`~autoexec_dagster.dagster.execution_assets.ExecuteFn`.
        workflow_sensor_interval_seconds: Least time between two ticks of the workflow sensor
            (default: ``minimum_interval_seconds``). A poll's ``every`` shorter than this is
            honoured only to the tick.
        ledger_clock: The time workflows are due by, for a ledger opened from a URL or the
            default; the sensors and the runs all read it. For demos and tests only (e.g.
            :class:`~autoexec_dagster.dagster.ledger_resource.FileClock`, which every process of
            a deployment reads alike); None keeps the real time.
        approval_links: Where ``autoexec serve`` listens and the secret approval links are
            signed with (:class:`~autoexec_dagster.ApprovalLinks`, e.g. ``ApprovalLinks.
            from_env()``); approver notifications then carry signed approve and reject links.
        outcomes: An outcome asset (same kinds of reference as ``insight``; one row per entity
            and time, the playbook's entity key, ``occurred_at`` and metric columns), loaded as a
            DataFrame. Adds ``<playbook>/experiment`` and ``<playbook>/learnings`` (when a rule
            runs an experiment) and ``<playbook>/uplift`` with the ``<playbook>_uplift`` check,
            partitioned like the outcome asset; the job ``<playbook>_outcomes_job``; and the
            sensor ``<playbook>_outcomes_sensor``, which runs it for each new outcome partition.
        outcomes_partitions_def: The outcome asset's partitions when ``outcomes`` is only a key;
            default: the outcome asset's own, else the insight's.
        shards: Split the delivery of each partition (first runs and workflow advances alike)
            into this many steps, ``<playbook>_deliver_0`` .. ``_deliver_{N-1}`` between a
            ``<playbook>_record`` and a ``<playbook>_merge`` step; each takes the actions whose
            idempotency key hashes to it and ``1/N`` of every channel's concurrency and rate
            limit, so the limits hold for the partition as a whole. The steps share the work
            through the ledger, so it must be one every worker reaches (PostgreSQL across
            machines; SQLite only on one), and so must the IO manager's storage (the instance's
            storage directory by default). See ``executor_def``. 1 (the
            default): one ``<playbook>_execute`` step, as before.
        executor_def: The executor of ``<playbook>_execution_job``, e.g. dagster-celery's
            ``celery_executor`` or dagster-k8s's ``k8s_job_executor``. Default: in-process with
            one shard (the blocking checks hand the routed plan to the route step in memory);
            with more, the code location's executor (``dg.Definitions(executor=...)``, else
            Dagster's default, one process per step).
        lease_seconds: How long a shard's claim on an action holds without a heartbeat
            (every third of it); once it runs out, a sibling shard or the step run again may
            recover the action. A worker that died on the same machine is recovered at once.
            Applies to the shard steps; the single execute step keeps ``execute_plan``'s 60 s.

    Returns:
        Definitions holding the execution assets ``<playbook>/plan``, ``<playbook>/actions``
        and ``<playbook>/escalations``, the checks ``<playbook>_valid_input`` (blocking) and
        ``<playbook>_flagged_share`` on the insight, the job ``<playbook>_execution_job``, the
        sensor ``<playbook>_sensor``, when the playbook has workflows the sensor
        ``<playbook>_workflows_sensor`` (one run per partition with due workflow work), the
        optional schedule ``<playbook>_schedule``, and the resource
        ``autoexec_<playbook>_io_manager``.

    Raises:
        PlaybookError: The playbook is invalid or its file cannot be read.
        ChannelConfigError: An action of the playbook has no channel.
        LedgerError: ``ledger`` is a malformed URL.
        TypeError: ``insight`` has an unsupported type.
        ValueError: An option is out of range.
    """
    book = resolve_playbook(playbook)
    insight_key, insight_partitions = resolve_insight(insight)
    check_channels(book, channels)
    if minimum_interval_seconds < 1:
        raise ValueError("minimum_interval_seconds must be at least 1")
    if workflow_sensor_interval_seconds is not None and workflow_sensor_interval_seconds < 1:
        raise ValueError("workflow_sensor_interval_seconds must be at least 1")
    if not 0 <= preview_rows <= 100:
        raise ValueError("preview_rows must be between 0 and 100")
    check_shards(shards)
    if not lease_seconds > 0:
        raise ValueError(f"lease_seconds must be positive, got {lease_seconds!r}")
    if shards > 1 and execute_fn is not None:
        raise ValueError(
            "execute_fn replaces the single execute step, and shards > 1 replaces that step by "
            "record, deliver and merge steps: use one or the other"
        )
    if insight_key in execution_asset_keys(book):
        raise ValueError(f"the insight {insight_key.to_user_string()!r} is an execution asset")

    setup = ExecutionSetup(
        playbook=book,
        insight_key=insight_key,
        partitions_def=partitions_def if partitions_def is not None else insight_partitions,
        ledger=LedgerHandle(ledger, clock=ledger_clock),
        channels=dict(channels),
        dry_run=dry_run,
        group_name=group_name or book.name,
        preview_rows=preview_rows,
        execute_fn=execute_fn or default_execute,
        approval_links=approval_links,
        shards=shards,
        lease_seconds=lease_seconds,
    )
    assets = build_execution_assets(setup)
    checks = build_insight_checks(
        insight_key=insight_key,
        playbook=book,
        partitions_def=setup.partitions_def,
        flagged_share_blocking=flagged_share_blocking,
        ledger=setup.ledger,
        # None defers to the playbook, exactly as the executor decides: a dry-run playbook must
        # not write a real escalation from its check either.
        dry_run=book.guardrails.dry_run if dry_run is None else dry_run,
    )
    asset_checks = [checks]
    gated_keys: list[dg.AssetKey] = []
    if has_approval_steps(book):
        gated_keys.append(setup.asset_key(APPROVALS))
        asset_checks.append(
            build_approval_sla_check(
                playbook=book,
                approvals_key=setup.asset_key(APPROVALS),
                partitions_def=setup.partitions_def,
                ledger=setup.ledger,
            )
        )
    # The checks are part of the job so that the blocking check runs in the same run as the
    # execution assets: a blocking check only holds back downstream steps of its own run.
    job = dg.define_asset_job(
        name=f"{book.name}_execution_job",
        selection=InsightPartitionsGuard(
            dg.AssetSelection.assets(*execution_asset_keys(book), *gated_keys)
            | dg.AssetSelection.checks(*asset_checks),
            insight_key=insight_key,
            partitions_def=setup.partitions_def,
        ),
        # With shards the code location's executor applies unless one is given: Dagster's
        # default (one process per step) or Definitions(executor=...) set by the project.
        executor_def=executor_def or (dg.in_process_executor if shards == 1 else None),
        description=f"Validate, route and execute playbook {book.name!r} on one partition of "
        f"{setup.insight_name}.",
        tags={"autoexec/playbook": book.name},
    )
    sensor = build_insight_sensor(
        setup=setup,
        job=job,
        default_status=sensor_default_status,
        minimum_interval_seconds=minimum_interval_seconds,
        flagged_metadata_key=flagged_metadata_key,
    )
    sensors = [sensor]
    if book.workflows or proposes_actions(book):
        sensors.append(
            build_workflow_sensor(
                setup=setup,
                job=job,
                default_status=sensor_default_status,
                minimum_interval_seconds=workflow_sensor_interval_seconds
                or minimum_interval_seconds,
            )
        )
    schedules = (
        [
            build_execution_schedule(
                setup=setup,
                job=job,
                cron_schedule=schedule,
                default_status=schedule_default_status,
                execution_timezone=schedule_timezone,
            )
        ]
        if schedule
        else []
    )
    all_assets: list[dg.AssetsDefinition] = [assets]
    jobs = [job]
    if outcomes is not None:
        outcomes_key, outcome_partitions = resolve_insight(outcomes)
        outcome_partitions = outcomes_partitions_def or outcome_partitions or setup.partitions_def
        if not (book.experiments() or book.outcome is not None):
            raise ValueError(
                f"outcomes= needs something to measure: playbook {book.name!r} runs no "
                "experiment and names no outcome metric (Playbook.outcome)"
            )
        outcome_assets, outcome_job, outcome_sensor = build_outcome_defs(
            setup=setup,
            outcomes_key=outcomes_key,
            partitions_def=outcome_partitions,
            sensor_default_status=sensor_default_status,
            minimum_interval_seconds=minimum_interval_seconds,
        )
        all_assets.append(outcome_assets)
        jobs.append(outcome_job)
        sensors.append(outcome_sensor)
    return dg.Definitions(
        assets=all_assets,
        asset_checks=asset_checks,
        jobs=jobs,
        sensors=sensors,
        schedules=schedules,
        resources=execution_resources(setup),
    )
