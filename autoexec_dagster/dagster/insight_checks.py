"""Great Expectations checks on the insight, run before anything is executed.

One ``dg.multi_asset_check`` per playbook evaluates one expectation suite on the insight partition
and reports two checks:

- ``<playbook>_valid_input`` (blocking): every column the playbook reads exists, entity ids are
  unique and not null, the columns rules compare with numbers are numeric and not NaN, and scores
  lie in ``playbook.score_ranges``. It is blocking, so a failure stops the execution assets of the
  partition when the check runs in the same run; the execution job selects it for that reason,
  and the graph's validate op repeats the same validation
  (:func:`autoexec_dagster.validate_insight`) and fails with the same message when the execution
  assets run without the check.
- ``<playbook>_flagged_share`` (blocking): routing the insight with the playbook flags at most
  ``guardrails.max_flagged_fraction`` of the entities. A failure stops the execution assets of the
  partition and, because a blocked batch must still reach a person, records the batch as one
  escalation in the action ledger (idempotent per partition; nothing is sent or reserved, so a
  corrected insight can run later). With ``flagged_share_blocking=False`` the check only reports
  and the executor's own guardrail blocks and escalates the batch inside the run.

``great_expectations`` is imported inside the check function: importing it takes seconds, and
definitions must load fast.
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pandas as pd

from autoexec_dagster.dagster.ledger_resource import LedgerHandle
from autoexec_dagster.dagster.routed_plans import ROUTED_PLANS
from autoexec_dagster.errors import InsightValidationError, PlaybookError
from autoexec_dagster.executor.plan_execution import escalate_batch
from autoexec_dagster.playbook import Playbook
from autoexec_dagster.routing import route, validate_insight

_FLAG_COLUMN = "__autoexec_flagged__"
# Dtype names GE reports for pandas columns a rule may compare with a number.
NUMERIC_TYPES: tuple[str, ...] = (
    *(f"{kind}{bits}" for kind in ("int", "uint") for bits in (8, 16, 32, 64)),
    "float16",
    "float32",
    "float64",
    *(f"{kind}{bits}" for kind in ("Int", "UInt") for bits in (8, 16, 32, 64)),
    "Float32",
    "Float64",
)
_EXAMPLES = 5
# GE returns results in no particular order; report failures from the most basic one up.
_RANK = (
    "expect_column_to_exist",
    "expect_column_values_to_not_be_null",
    "expect_column_values_to_be_unique",
    "expect_column_values_to_be_in_type_list",
    "expect_column_values_to_be_between",
)


def valid_input_check_name(playbook: Playbook) -> str:
    """Name of the blocking input-validity check."""
    return f"{playbook.name}_valid_input"


def flagged_share_check_name(playbook: Playbook) -> str:
    """Name of the flagged-share check."""
    return f"{playbook.name}_flagged_share"


def as_insight_frame(value: Any, *, insight: str) -> pd.DataFrame:
    """The insight value as a pandas DataFrame, as its IO manager loaded it.

    Raises:
        InsightValidationError: The IO manager returned something else; the message says how to
            fix it (a dict usually means a partitioned insight read by unpartitioned assets).
    """
    if isinstance(value, pd.DataFrame):
        return value
    to_pandas = getattr(value, "to_pandas", None)
    if callable(to_pandas):
        converted = to_pandas()
        if isinstance(converted, pd.DataFrame):
            return converted
    if isinstance(value, dict):
        raise InsightValidationError(
            f"the insight {insight!r} was loaded as a dict of {len(value)} partition(s), not one "
            "DataFrame: the insight is partitioned but the execution assets are not; pass "
            "partitions_def= (the insight's PartitionsDefinition) to build_execution_defs"
        )
    raise InsightValidationError(
        f"the insight {insight!r} must load as a pandas DataFrame, but its IO manager returned "
        f"{type(value).__name__}; give the insight asset an IO manager that stores DataFrames"
    )


@dataclass(frozen=True)
class ExpectationFailure:
    """One expectation that did not hold.

    Attributes:
        expectation: Great Expectations expectation type, e.g.
            ``expect_column_values_to_be_unique``.
        column: The column it was about, if any.
        detail: What was observed, e.g. ``"2 unexpected value(s) (0.2%), e.g. ['C1']"``.
    """

    expectation: str
    column: str | None
    detail: str

    @property
    def label(self) -> str:
        """``expectation(column)``."""
        return f"{self.expectation}({self.column})" if self.column else self.expectation


@dataclass(frozen=True)
class CheckOutcome:
    """The result of one of the two checks.

    Attributes:
        passed: Whether the check passed.
        description: One sentence for people; for input validity, the message the execution
            graph's validate op raises on the same data.
        failures: Expectations that failed.
        evaluated: Expectations evaluated for this check.
        metadata: Numbers for the check result (rows, flagged share, ...).
    """

    passed: bool
    description: str
    failures: tuple[ExpectationFailure, ...] = ()
    evaluated: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_metadata(self) -> dict[str, Any]:
        """Dagster metadata naming each failed expectation."""
        metadata: dict[str, Any] = {
            "expectations_evaluated": self.evaluated,
            "expectations_failed": len(self.failures),
            **self.metadata,
        }
        if self.failures:
            metadata["failed_expectation"] = self.failures[0].label
            rows = "\n".join(
                f"| {f.expectation} | {f.column or ''} | {f.detail.replace('|', '/')} |"
                for f in self.failures
            )
            metadata["failed_expectations"] = dg.MetadataValue.md(
                "| expectation | column | observed |\n|---|---|---|\n" + rows
            )
        return metadata


def _column_of(result: Any) -> str | None:
    config = result.expectation_config
    return config.kwargs.get("column") if config is not None else None


def _type_of(result: Any) -> str:
    config = result.expectation_config
    return str(config.type) if config is not None else "unknown_expectation"


def _describe(result: Any, *, personal: Sequence[str]) -> ExpectationFailure:
    column = _column_of(result)
    info = result.exception_info or {}
    if info.get("raised_exception"):
        message = str(info.get("exception_message") or "the expectation raised an error")
        detail = message.splitlines()[0][:200]
    else:
        outcome = result.result or {}
        if "unexpected_count" in outcome and outcome.get("unexpected_count"):
            count = int(outcome["unexpected_count"])
            percent = outcome.get("unexpected_percent")
            detail = f"{count:,} unexpected value(s)"
            if percent is not None:
                detail += f" ({float(percent):.1f}%)"
            examples = outcome.get("partial_unexpected_list") or []
            if examples and column not in personal:
                shown = [None if v != v else v for v in examples[:_EXAMPLES]]  # NaN -> None
                detail += f", e.g. {shown}"
        elif "observed_value" in outcome:
            detail = f"observed {outcome['observed_value']!r}"
        else:
            detail = "failed"
    return ExpectationFailure(expectation=_type_of(result), column=column, detail=detail)


def _build_expectations(gx: Any, frame: pd.DataFrame, playbook: Playbook) -> list[Any]:
    expectations = gx.expectations
    present = set(map(str, frame.columns))
    suite: list[Any] = [
        expectations.ExpectColumnToExist(column=column)
        for column in sorted(playbook.input_columns())
    ]
    key = playbook.entity_key
    if key in present:
        suite += [
            expectations.ExpectColumnValuesToNotBeNull(column=key),
            expectations.ExpectColumnValuesToBeUnique(column=key),
        ]
    for column in sorted(playbook.numeric_columns() & present):
        suite += [
            expectations.ExpectColumnValuesToBeInTypeList(
                column=column, type_list=list(NUMERIC_TYPES)
            ),
            expectations.ExpectColumnValuesToNotBeNull(column=column),
        ]
    for column, (low, high) in sorted(playbook.score_ranges.items()):
        if column in present:
            suite.append(
                expectations.ExpectColumnValuesToBeBetween(
                    column=column, min_value=low, max_value=high
                )
            )
    return suite


def evaluate_insight(
    frame: pd.DataFrame,
    playbook: Playbook,
    *,
    partition_key: str = "",
    insight_name: str | None = None,
) -> tuple[CheckOutcome, CheckOutcome]:
    """Validate an insight with one Great Expectations suite.

    Args:
        frame: The insight partition.
        playbook: The playbook that will route it.
        partition_key: The partition, for routing (keys do not affect the flagged share).
        insight_name: The insight asset key, for routing.

    Returns:
        ``(valid_input, flagged_share)`` outcomes.
    """
    valid, share, _plan = evaluate_and_route(
        frame, playbook, partition_key=partition_key, insight_name=insight_name
    )
    return valid, share


def evaluate_and_route(
    frame: pd.DataFrame,
    playbook: Playbook,
    *,
    partition_key: str = "",
    insight_name: str | None = None,
) -> tuple[CheckOutcome, CheckOutcome, pd.DataFrame | None]:
    """:func:`evaluate_insight`, also returning the plan it routed (None when it could not).

    The check hands that plan to the execution graph of its run, so the insight is routed once.
    """
    import great_expectations as gx  # ~4 s to import: only when a check actually runs
    from great_expectations.data_context.types.base import ProgressBarsConfig

    routable_error: str | None = None
    try:
        validate_insight(frame, playbook)
    except InsightValidationError as exc:
        routable_error = str(exc)

    flagged: int | None = None
    share_error: str | None = None
    data = frame
    plan: pd.DataFrame | None = None
    if routable_error is None:
        try:
            plan = route(frame, playbook, partition_key=partition_key, insight_name=insight_name)
        except (PlaybookError, InsightValidationError) as exc:
            share_error = str(exc)
        else:
            indicator = (plan["decision"].astype(str) != "skip").to_numpy(dtype="float64")
            flagged = int(indicator.sum())
            data = frame.assign(**{_FLAG_COLUMN: indicator})
    else:
        share_error = f"not evaluated: the insight cannot be routed ({routable_error})"

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("autoexec")
        .add_dataframe_asset(name=playbook.name)
        .add_batch_definition_whole_dataframe("partition")
        .get_batch(batch_parameters={"dataframe": data})
    )
    suite = gx.ExpectationSuite(name=f"{playbook.name}_insight")
    for expectation in _build_expectations(gx, frame, playbook):
        suite.add_expectation(expectation)
    total = len(frame)
    limit = playbook.guardrails.max_flagged_fraction
    if flagged is not None and total:
        suite.add_expectation(
            gx.expectations.ExpectColumnMeanToBeBetween(
                column=_FLAG_COLUMN, min_value=0.0, max_value=limit
            )
        )
    result = batch.validate(suite)

    personal = tuple(playbook.personal_columns)
    input_results = [r for r in result.results if _column_of(r) != _FLAG_COLUMN]
    share_results = [r for r in result.results if _column_of(r) == _FLAG_COLUMN]
    input_failures = tuple(
        sorted(
            (_describe(r, personal=personal) for r in input_results if not r.success),
            key=lambda f: (
                _RANK.index(f.expectation) if f.expectation in _RANK else len(_RANK),
                f.column or "",
            ),
        )
    )
    if input_failures and routable_error is None:
        # GE is stricter than validate_insight in a few corners (dtype names); say what it saw.
        routable_error = f"playbook {playbook.name!r}: " + "; ".join(
            f"{f.label}: {f.detail}" for f in input_failures
        )
    if routable_error is not None and not input_failures:
        input_failures = (
            ExpectationFailure(
                expectation="autoexec_validate_insight", column=None, detail=routable_error
            ),
        )
    valid = CheckOutcome(
        passed=routable_error is None,
        description=routable_error
        or f"{len(input_results)} expectation(s) hold on {total:,} row(s)",
        failures=input_failures,
        evaluated=len(input_results),
        metadata={"rows": total},
    )

    share_metadata: dict[str, Any] = {"rows": total, "max_flagged_fraction": float(limit)}
    if flagged is not None:
        fraction = flagged / total if total else 0.0
        share_metadata.update(flagged=flagged, flagged_fraction=float(fraction))
        share_failures = tuple(
            ExpectationFailure(
                expectation=_type_of(r),
                column="flagged",
                detail=f"{flagged:,} of {total:,} entities flagged ({fraction:.1%}), above "
                f"max_flagged_fraction {limit:.1%}",
            )
            for r in share_results
            if not r.success
        )
        description = (
            share_failures[0].detail
            + ": a model or data fault is likelier than a real mass event, so the batch is not "
            "executed"
            if share_failures
            else f"{flagged:,} of {total:,} entities flagged ({fraction:.1%}), within "
            f"max_flagged_fraction {limit:.1%}"
        )
        share = CheckOutcome(
            passed=not share_failures,
            description=description,
            failures=share_failures,
            evaluated=len(share_results),
            metadata=share_metadata,
        )
    else:
        share = CheckOutcome(
            passed=False,
            description=share_error or "not evaluated",
            failures=(
                ExpectationFailure(
                    expectation="autoexec_route", column=None, detail=share_error or "not evaluated"
                ),
            ),
            metadata=share_metadata,
        )
    return valid, share, plan if valid.passed else None


def build_insight_checks(
    *,
    insight_key: dg.AssetKey,
    playbook: Playbook,
    partitions_def: dg.PartitionsDefinition | None,
    flagged_share_blocking: bool = True,
    ledger: LedgerHandle | None = None,
    dry_run: bool = False,
) -> dg.AssetChecksDefinition:
    """The Great Expectations checks of ``playbook`` on the insight.

    The insight is loaded through its own IO manager, which must return a pandas DataFrame.

    Args:
        insight_key: The insight asset.
        playbook: The playbook whose needs are checked.
        partitions_def: The insight's partitions (the checks are evaluated per partition).
        flagged_share_blocking: Whether the flagged-share check blocks (see the module docstring).
        ledger: Where a blocked batch is escalated; None records nothing.
        dry_run: Record no escalation (the execution layer runs in dry-run mode).

    Returns:
        One multi-asset check evaluating ``<playbook>_valid_input`` and
        ``<playbook>_flagged_share``.
    """
    valid_name = valid_input_check_name(playbook)
    share_name = flagged_share_check_name(playbook)
    insight_name = insight_key.to_user_string()
    with warnings.catch_warnings():
        # Per-partition checks are a preview API in Dagster 1.13 and warn on every load. They are
        # required: an unpartitioned check on a partitioned insight loads every partition.
        warnings.simplefilter("ignore", dg.PreviewWarning)
        specs = [
            dg.AssetCheckSpec(
                valid_name,
                asset=insight_key,
                blocking=True,
                partitions_def=partitions_def,
                description=f"The insight holds what playbook {playbook.name!r} reads: columns, "
                "unique non-null entity ids, numeric scores within their ranges "
                "(Great Expectations).",
            ),
            dg.AssetCheckSpec(
                share_name,
                asset=insight_key,
                blocking=flagged_share_blocking,
                partitions_def=partitions_def,
                description=f"Playbook {playbook.name!r} flags at most "
                f"{playbook.guardrails.max_flagged_fraction:.0%} of the entities.",
            ),
        ]

    @dg.multi_asset_check(
        name=f"{playbook.name}_insight_checks",
        specs=specs,
        ins={"insight": dg.AssetIn(key=insight_key)},
        description=f"Great Expectations checks of playbook {playbook.name!r} on {insight_name}.",
    )
    def _insight_checks(context: dg.AssetCheckExecutionContext, insight: Any):
        partition = context.partition_key if context.has_partition_key else ""
        try:
            frame = as_insight_frame(insight, insight=insight_name)
        except InsightValidationError as exc:
            message = str(exc)
            for name in (valid_name, share_name):
                yield dg.AssetCheckResult(
                    check_name=name,
                    asset_key=insight_key,
                    passed=False,
                    description=message,
                    metadata={"failed_expectation": "autoexec_load_dataframe"},
                )
            return
        valid, share, plan = evaluate_and_route(
            frame, playbook, partition_key=partition, insight_name=insight_name
        )
        if plan is not None and (share.passed or not flagged_share_blocking):
            # The execution graph of this run needs the same plan: hand it over, not the data.
            ROUTED_PLANS.put(
                run_id=context.op_execution_context.run_id,
                playbook=playbook.name,
                partition_key=partition,
                plan=plan,
            )
        if (
            flagged_share_blocking
            and plan is not None
            and not share.passed
            and ledger is not None
            and not dry_run
        ):
            opened = escalate_batch(plan, ledger=ledger.get(), reason=share.description)
            share.metadata["escalated"] = True
            context.log.warning(
                f"{playbook.name} [{partition or '-'}]: batch blocked and "
                + ("escalated" if opened else "already escalated")
                + f": {share.description}"
            )
        for name, outcome in ((valid_name, valid), (share_name, share)):
            yield dg.AssetCheckResult(
                check_name=name,
                asset_key=insight_key,
                passed=outcome.passed,
                description=outcome.description,
                metadata=outcome.as_metadata(),
            )

    return _insight_checks
