"""The execution assets: one op graph per playbook, exposed as three graph-backed assets.

::

    insight ──> [checks] ──> route ──> execute ──> escalate ──> summarize
                               │                       │            │
                           <pb>/plan            <pb>/escalations  <pb>/actions

One run loads and routes the insight partition once. The blocking checks of the run load it
through the insight's own IO manager (which must return a pandas DataFrame), validate it and route
it; they hand the routed plan to the ``route`` op of the same run in process
(:mod:`~autoexec_dagster.dagster.routed_plans`). Without the checks (a job that leaves them out,
another executor) ``route`` loads and routes the insight itself, with the validation message of
the blocking check on bad input.

``route`` stores the routed plan as a run output through the IO manager bound under
``autoexec_<playbook>_io_manager`` (a ``dg.FilesystemIOManager`` in the instance's storage
directory, which pickles: the plan's provenance in ``DataFrame.attrs`` survives, where parquet
would drop it and the executor would refuse the plan). That keeps every step restartable:
re-executing a run from its failed ``execute`` step (say, after a pause is lifted) reads back
exactly the plan ``route`` reported, without loading or routing the insight again, even in a new
process. The stored plan holds the insight's columns, like the insight's own stored value.

The assets themselves store small summaries, never per-entity rows: ``<pb>/plan`` stores routing
counts, ``<pb>/actions`` the execution report as a dict, ``<pb>/escalations`` the open queue
counted by kind and reason. Per-entity detail lives in the action ledger, and each
materialization carries a masked preview of at most 20 rows, so a partition costs O(1) Dagster
events whatever its size.
"""

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import dagster as dg
import pandas as pd

from autoexec_dagster.approvals.links import ApprovalLinks
from autoexec_dagster.channels.base import Channel
from autoexec_dagster.dagster.approval_assets import (
    APPROVALS,
    approvals_metadata,
    has_approval_steps,
)
from autoexec_dagster.dagster.insight_checks import as_insight_frame
from autoexec_dagster.dagster.ledger_resource import LedgerHandle
from autoexec_dagster.dagster.metadata import (
    PREVIEW_ROWS,
    actions_metadata,
    escalations_metadata,
    escalations_summary,
    open_escalation_counts,
    plan_metadata,
    plan_summary,
)
from autoexec_dagster.dagster.routed_plans import ROUTED_PLANS
from autoexec_dagster.errors import AutoexecError, InsightValidationError, PlaybookError
from autoexec_dagster.executor.plan_execution import execute_plan
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.executor.sharding import (
    PreparedPartition,
    deliver_shard,
    merge_shards,
    prepare_partition,
)
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.playbook import Playbook
from autoexec_dagster.routing import route

PLAN, ACTIONS, ESCALATIONS = "plan", "actions", "escalations"
# The routed plan handed from the route step to the execute step (not an asset).
ROUTED = "routed_plan"
# The recorded partition handed from the record step to the shard steps (sharded only).
PREPARED = "prepared"
PAUSED_RUN_TAG = "autoexec/paused"


class ExecuteFn(Protocol):
    """How the ``execute`` op executes a routed plan; see :func:`default_execute`."""

    def __call__(
        self,
        context: dg.OpExecutionContext,
        plan: pd.DataFrame,
        *,
        playbook: Playbook,
        ledger: ActionLedger,
        channels: Mapping[str, Channel],
        partition_key: str,
        insight: str,
        dry_run: bool | None,
    ) -> ExecutionReport: ...


def default_execute(
    context: dg.OpExecutionContext,
    plan: pd.DataFrame,
    *,
    playbook: Playbook,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    partition_key: str,
    insight: str,
    dry_run: bool | None,
    approval_links: ApprovalLinks | None = None,
) -> ExecutionReport:
    """Execute the plan with :func:`autoexec_dagster.execute_plan`, logging to the run.

    Args:
        context: The ``execute`` op's context; its run id is recorded with every action.
        plan: The routed plan of the partition.
        playbook: The playbook that routed it.
        ledger: The action ledger.
        channels: Channel per action name.
        partition_key: The insight partition ("" when unpartitioned).
        insight: The insight asset key as a string.
        dry_run: Record without sending; None defers to the playbook's guardrail.
        approval_links: Signed-link settings for approval notifications (given only when
            ``build_execution_defs(approval_links=...)`` is set, so an ``execute_fn`` written
            without approvals keeps working).

    Returns:
        The execution report.
    """
    return execute_plan(
        plan,
        playbook=playbook,
        ledger=ledger,
        channels=channels,
        partition_key=partition_key,
        insight_name=insight,
        run_id=context.run_id,
        dry_run=dry_run,
        log=context.log,
        approval_links=approval_links,
    )


@dataclass(frozen=True)
class ExecutionSetup:
    """Everything the execution graph of one playbook closes over.

    Attributes:
        playbook: The playbook.
        insight_key: The insight asset the playbook acts on.
        partitions_def: The insight's partitions (None when unpartitioned).
        ledger: Opens the action ledger in the executing process.
        channels: Channel per action name.
        dry_run: Record without sending; None defers to ``playbook.guardrails.dry_run``.
        group_name: Dagster asset group of the execution assets.
        preview_rows: Rows in each metadata preview.
        execute_fn: Executes a routed plan (override to customise execution).
        approval_links: Signed-link settings for approval notifications (None: none).
        shards: Steps the delivery of a partition is split into (1: one ``execute`` step).
        lease_seconds: How long a claim holds without a heartbeat before another worker may
            recover it as abandoned.
    """

    playbook: Playbook
    insight_key: dg.AssetKey
    partitions_def: dg.PartitionsDefinition | None
    ledger: LedgerHandle
    channels: Mapping[str, Channel]
    dry_run: bool | None = None
    group_name: str | None = None
    preview_rows: int = PREVIEW_ROWS
    execute_fn: ExecuteFn = field(default=default_execute)
    approval_links: ApprovalLinks | None = None
    shards: int = 1
    lease_seconds: float = 60.0

    @property
    def insight_name(self) -> str:
        """The insight key as a string (``a/b``); part of every idempotency key."""
        return self.insight_key.to_user_string()

    @property
    def io_manager_key(self) -> str:
        """Resource key of the IO manager of the execution assets, namespaced by playbook."""
        return f"autoexec_{self.playbook.name}_io_manager"

    def asset_key(self, name: str) -> dg.AssetKey:
        """``<playbook>/<name>``."""
        return dg.AssetKey([self.playbook.name, name])


def execution_asset_keys(playbook: Playbook) -> tuple[dg.AssetKey, dg.AssetKey, dg.AssetKey]:
    """The keys of ``<playbook>/plan``, ``<playbook>/actions`` and ``<playbook>/escalations``."""
    return (
        dg.AssetKey([playbook.name, PLAN]),
        dg.AssetKey([playbook.name, ACTIONS]),
        dg.AssetKey([playbook.name, ESCALATIONS]),
    )


def execution_resources(setup: ExecutionSetup) -> dict[str, Any]:
    """Resources the execution assets need, under keys no user project binds."""
    return {setup.io_manager_key: dg.FilesystemIOManager()}


def _partition(context: dg.OpExecutionContext) -> str:
    return context.partition_key if context.has_partition_key else ""


def _failure(message: str, **metadata: Any) -> dg.Failure:
    # Bad input or configuration does not get better by retrying.
    return dg.Failure(description=message, metadata=metadata or None, allow_retries=False)


def _paused(context: dg.OpExecutionContext, name: str, report: ExecutionReport) -> dg.Failure:
    # The sensor finds the runs a pause interrupted by this tag once the pause is lifted.
    context.instance.add_run_tags(context.run_id, {PAUSED_RUN_TAG: "true"})
    return dg.Failure(
        description=f"{name} [{report.partition_key or '-'}]: {report.paused_reason}. "
        f"{report.pending:,} action(s) were not sent. Lift the pause (`autoexec status`, "
        "`autoexec resume`): the sensor then requests this partition again, and nothing "
        "already sent is sent again.",
        metadata={
            "paused_reason": report.paused_reason or "",
            "pending": report.pending,
            "succeeded": report.succeeded,
        },
        allow_retries=False,
    )


@contextlib.contextmanager
def _step_failure(name: str, partition: str) -> Iterator[None]:
    """End the step with a Failure naming the playbook and partition on a library error."""
    try:
        yield
    except AutoexecError as exc:
        raise _failure(str(exc), playbook=name, partition=partition) from None


def _unless_paused(context: dg.OpExecutionContext, name: str, report: ExecutionReport) -> None:
    if report.paused_reason:
        raise _paused(context, name, report)


def build_execution_assets(setup: ExecutionSetup) -> dg.AssetsDefinition:
    """The graph-backed assets ``<playbook>/plan``, ``/actions`` and ``/escalations``.

    Args:
        setup: Playbook, insight, ledger, channels and options.

    Returns:
        One AssetsDefinition over the op graph validate -> route -> execute -> escalate ->
        summarize, partitioned like the insight.
    """
    playbook = setup.playbook
    name = playbook.name
    insight_name = setup.insight_name
    io_key = setup.io_manager_key
    tags = {"autoexec/playbook": name}

    def load(insight: Any) -> pd.DataFrame:
        try:
            return as_insight_frame(insight, insight=insight_name)
        except InsightValidationError as exc:
            raise _failure(str(exc)) from None

    def routed(frame: pd.DataFrame, partition: str) -> pd.DataFrame:
        try:
            return route(frame, playbook, partition_key=partition, insight_name=insight_name)
        except (InsightValidationError, PlaybookError) as exc:
            raise _failure(str(exc), playbook=name, partition=partition) from None

    def ledger() -> ActionLedger:
        try:
            return setup.ledger.get()
        except AutoexecError as exc:
            raise _failure(str(exc)) from None

    @dg.op(
        name=f"{name}_route",
        ins={
            "insight": dg.In(
                dg.Nothing,
                description=f"The insight {insight_name}; loaded here only when the run's "
                "checks did not route it already.",
            )
        },
        out={
            PLAN: dg.Out(io_manager_key=io_key),
            ROUTED: dg.Out(
                io_manager_key=io_key,
                description="The routed plan, one row per entity, pickled into the run's "
                "storage (its provenance, DataFrame.attrs, survives) so that a re-execution "
                "of the execute step reads back exactly the plan this step reported.",
            ),
        },
        tags=tags,
        description="Validate the insight (the message of the blocking input check on failure) "
        "and route every entity: act, escalate, hold out or skip, and why. Uses the plan the "
        "run's checks routed; loads the insight only without them.",
    )
    def route_op(context: dg.OpExecutionContext):
        partition = _partition(context)
        plan = ROUTED_PLANS.take(run_id=context.run_id, playbook=name, partition_key=partition)
        if plan is None:
            value = context.load_asset_value(setup.insight_key, partition_key=partition or None)
            plan = routed(load(value), partition)
            source = "loaded and routed"
        else:
            source = "routed by the run's checks"
        context.log.info(f"{name} [{partition or '-'}]: {len(plan):,} entities {source}")
        yield dg.Output(
            plan_summary(plan, playbook),
            output_name=PLAN,
            metadata=plan_metadata(plan, playbook, max_rows=setup.preview_rows),
        )
        yield dg.Output(plan, output_name=ROUTED)

    @dg.op(
        name=f"{name}_execute",
        ins={ROUTED: dg.In(description="The plan the route step routed.")},
        out=dg.Out(io_manager_key=io_key),
        tags=tags,
        description="Execute the plan through the channels; the ledger makes re-runs send nothing.",
    )
    def execute(context: dg.OpExecutionContext, routed_plan: pd.DataFrame) -> ExecutionReport:
        partition = _partition(context)
        extra: dict[str, Any] = (
            {"approval_links": setup.approval_links} if setup.approval_links else {}
        )
        with _step_failure(name, partition):
            report = setup.execute_fn(
                context,
                routed_plan,
                playbook=playbook,
                ledger=ledger(),
                channels=setup.channels,
                partition_key=partition,
                insight=insight_name,
                dry_run=setup.dry_run,
                **extra,
            )
        _unless_paused(context, name, report)
        if report.blocked_reason:
            context.log.warning(
                f"{name} [{partition or '-'}]: batch blocked by a guardrail and escalated: "
                f"{report.blocked_reason}"
            )
        return report

    shards = setup.shards
    links: dict[str, Any] = {"approval_links": setup.approval_links}

    @dg.op(
        name=f"{name}_record",
        ins={ROUTED: dg.In(description="The plan the route step routed.")},
        out={PREPARED: dg.Out(io_manager_key=io_key)},
        tags=tags,
        description=f"Check, guard and record the plan once, for {shards} shard steps to deliver.",
    )
    def record(context: dg.OpExecutionContext, routed_plan: pd.DataFrame) -> PreparedPartition:
        partition = _partition(context)
        with _step_failure(name, partition):
            prepared = prepare_partition(
                routed_plan,
                playbook=playbook,
                ledger=ledger(),
                channels=setup.channels,
                shards=shards,
                partition_key=partition,
                insight_name=insight_name,
                run_id=context.run_id,
                dry_run=setup.dry_run,
                log=context.log,
            )
        _unless_paused(context, name, prepared.report)
        if prepared.report.blocked_reason:
            context.log.warning(
                f"{name} [{partition or '-'}]: batch blocked by a guardrail and escalated: "
                f"{prepared.report.blocked_reason}"
            )
        context.log.info(
            f"{name} [{partition or '-'}]: {sum(map(len, prepared.to_send.values())):,} "
            f"action(s) recorded for {shards} shards"
        )
        return prepared

    def deliver_op(shard: int) -> dg.OpDefinition:
        @dg.op(
            name=f"{name}_deliver_{shard}",
            ins={PREPARED: dg.In()},
            out=dg.Out(io_manager_key=io_key),
            tags={**tags, "autoexec/shard": str(shard)},
            description=f"Deliver shard {shard + 1} of {shards} (the keys whose hash falls in "
            f"it, with 1/{shards} of each channel's limits), recover what a dead sibling held, "
            "and advance the partition's workflows alongside the other shards.",
        )
        def deliver(context: dg.OpExecutionContext, prepared: PreparedPartition) -> ExecutionReport:
            with _step_failure(name, prepared.report.partition_key):
                report = deliver_shard(
                    prepared,
                    shard=shard,
                    playbook=playbook,
                    ledger=ledger(),
                    channels=setup.channels,
                    run_id=context.run_id,
                    lease_seconds=setup.lease_seconds,
                    log=context.log,
                    **links,
                )
            _unless_paused(context, name, report)
            return report

        return deliver

    @dg.op(
        name=f"{name}_merge",
        ins={PREPARED: dg.In(), "shard_reports": dg.In()},
        out=dg.Out(io_manager_key=io_key),
        tags=tags,
        description="One report for the partition from its shards; deliver what no shard "
        "finished and the actions people approved.",
    )
    def merge(
        context: dg.OpExecutionContext, prepared: PreparedPartition, shard_reports: list
    ) -> ExecutionReport:
        with _step_failure(name, prepared.report.partition_key):
            report = merge_shards(
                prepared,
                shard_reports,
                playbook=playbook,
                ledger=ledger(),
                channels=setup.channels,
                run_id=context.run_id,
                lease_seconds=setup.lease_seconds,
                log=context.log,
            )
        _unless_paused(context, name, report)
        return report

    delivers = [deliver_op(k) for k in range(shards)] if shards > 1 else []

    @dg.op(
        name=f"{name}_escalate",
        ins={"report": dg.In()},
        out={ESCALATIONS: dg.Out(io_manager_key=io_key)},
        tags=tags,
        description="Summarise the open human queue of the partition.",
    )
    def escalate(context: dg.OpExecutionContext, report: ExecutionReport) -> dg.Output:
        partition = report.partition_key
        book = ledger()
        counts = open_escalation_counts(book, playbook=name, partition_key=partition)
        summary = escalations_summary(
            playbook=playbook,
            partition_key=partition,
            counts=counts,
            new_in_run=report.escalated,
            report=report,
        )
        summary["still_open"] = book.partition_outcome(
            playbook=name, partition_key=partition
        ).still_open
        if summary["open"]:
            context.log.info(
                f"{name} [{partition or '-'}]: {summary['open']:,} open escalation(s) wait for a "
                f"person (autoexec escalations --playbook {name})"
            )
        return dg.Output(
            summary,
            output_name=ESCALATIONS,
            metadata=escalations_metadata(
                summary, ledger=book, playbook=playbook, max_rows=setup.preview_rows
            ),
        )

    @dg.op(
        name=f"{name}_summarize",
        ins={"report": dg.In(), ESCALATIONS: dg.In()},
        out={ACTIONS: dg.Out(io_manager_key=io_key)},
        tags=tags,
        description="Record what was executed and how it ended.",
    )
    def summarize(
        context: dg.OpExecutionContext, report: ExecutionReport, escalations: dict
    ) -> dg.Output:
        metadata = actions_metadata(
            report, ledger=ledger(), playbook=playbook, max_rows=setup.preview_rows
        )
        metadata["open_escalations"] = int(escalations.get("open", 0))
        context.log.info(f"{name} [{report.partition_key or '-'}]: {metadata['status']}")
        return dg.Output(report.as_dict(), output_name=ACTIONS, metadata=metadata)

    @dg.op(
        name=f"{name}_approvals",
        ins={"report": dg.In()},
        out={APPROVALS: dg.Out(io_manager_key=io_key)},
        tags=tags,
        description="Summarise the partition's approval requests: pending and decided.",
    )
    def approvals(context: dg.OpExecutionContext, report: ExecutionReport) -> dg.Output:
        book = ledger()
        summary, metadata = approvals_metadata(
            book,
            playbook=playbook,
            partition_key=report.partition_key,
            now=book.clock(),
            max_rows=setup.preview_rows,
        )
        if summary["pending"]:
            context.log.info(
                f"{name} [{report.partition_key or '-'}]: {summary['pending']:,} approval(s) "
                f"worth {summary['pending_value']:,.2f} wait for people "
                f"(autoexec approvals --playbook {name})"
            )
        return dg.Output(summary, output_name=APPROVALS, metadata=metadata)

    gated = has_approval_steps(playbook)
    definition_metadata = {
        "autoexec/playbook": name,
        "autoexec/playbook_version": playbook.effective_version,
        "autoexec/insight": insight_name,
        "autoexec/ledger": setup.ledger.description,
    }
    describe = ("\n\nThe playbook: " + playbook.description) if playbook.description else ""
    descriptions = {
        PLAN: f"Routing decisions of playbook {name!r} for each partition of {insight_name}: "
        "counts per decision and rule, and a masked preview of flagged entities. Per-entity rows "
        "live in the action ledger.",
        ESCALATIONS: f"The human queue of playbook {name!r} for each partition: open escalations "
        "by kind and reason, with a masked preview. Resolve them with `autoexec resolve`.",
        ACTIONS: f"What playbook {name!r} executed and how it ended: outcomes per action, "
        "autonomy rate, failures, retries, throughput and a Markdown summary.",
        APPROVALS: f"The approval requests of playbook {name!r} for each partition: pending "
        "(count, total value, oldest age) and decided (by the rule, by people, rejected, "
        "expired). Observed again whenever a person decides, not only at runs.",
    }
    names = (PLAN, ESCALATIONS, ACTIONS, APPROVALS) if gated else (PLAN, ESCALATIONS, ACTIONS)

    @dg.graph(
        name=f"{name}_execution",
        out={output: dg.GraphOut() for output in names},
    )
    def _execution(insight: Any) -> dict[str, Any]:
        plan, routed_plan = route_op(insight)
        if delivers:
            prepared = record(routed_plan)
            report = merge(prepared, [deliver(prepared) for deliver in delivers])
        else:
            report = execute(routed_plan)
        escalations = escalate(report)
        actions = summarize(report, escalations)
        outputs = {PLAN: plan, ESCALATIONS: escalations, ACTIONS: actions}
        if gated:
            outputs[APPROVALS] = approvals(report)
        return outputs

    keys = {output: setup.asset_key(output) for output in names}
    outputs = list(keys)
    return dg.AssetsDefinition.from_graph(
        _execution,
        keys_by_input_name={"insight": setup.insight_key},
        keys_by_output_name=keys,
        # Lineage shows the order of execution (plan -> escalations -> actions) as well as the
        # insight each of them reads; by default every output would depend on the insight alone.
        internal_asset_deps={
            PLAN: {setup.insight_key},
            ESCALATIONS: {setup.insight_key, keys[PLAN]},
            ACTIONS: {setup.insight_key, keys[PLAN], keys[ESCALATIONS]},
            **({APPROVALS: {setup.insight_key, keys[PLAN]}} if gated else {}),
        },
        partitions_def=setup.partitions_def,
        group_name=setup.group_name,
        # Each asset's own sentence first: the UI shows the start of a description in lists.
        descriptions_by_output_name={o: descriptions[o] + describe for o in outputs},
        metadata_by_output_name={o: dict(definition_metadata) for o in outputs},
        tags_by_output_name={o: {**tags, "dagster/kind/autoexec": ""} for o in outputs},
    )
