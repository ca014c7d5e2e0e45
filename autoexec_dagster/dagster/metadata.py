"""Execution results as Dagster metadata an analyst can read without opening the ledger.

Every function here returns a bounded amount of metadata whatever the batch size: counts and rates
as plain ints and floats (the Dagster UI plots them over time), a Markdown summary, and a table
preview of at most ``max_rows`` rows. Personal columns (``playbook.personal_columns``) are masked
in every preview, and any string that looks like an e-mail address is masked wherever it appears,
as a safety net for personal columns the playbook does not name.
"""

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.queries import (
    WORKFLOW_FAILED_KIND,
    PartitionOutcome,
    WorkflowOutcome,
)
from autoexec_dagster.playbook import Playbook
from autoexec_dagster.routing import DECISIONS, PLAN_COLUMNS

PREVIEW_ROWS = 20
_MAX_PREVIEW_COLUMNS = 14
_MAX_CELL_CHARS = 80
# Local parts exclude "=" and ":" so "email=jane@example.com" masks the address, not the key.
_EMAIL_RE = re.compile(r"([^\s@<>()\[\]\"',;:=]+)@([^\s@<>()\[\]\"',;:=]+\.[^\s@<>()\[\]\"',;:=]+)")
# Preview order: what needs a person first, then what was done.
_DECISION_ORDER = ("escalate", "act", "holdout")
# Keys of an escalation's data that are not the entity's own columns: a failed workflow's step
# log and outputs are shown as evidence in a table of their own.
_EVIDENCE_KEYS = frozenset({"entity_id", "evidence", "outputs"})


def mask_value(value: Any) -> Any:
    """Mask one personal value, keeping just enough to recognise it.

    ``"jane@example.com"`` becomes ``"j***@example.com"``, other text keeps its first character
    (``"Jane Doe"`` -> ``"J***"``), and any other non-null value becomes ``"***"``.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        if not value:
            return value
        match = _EMAIL_RE.fullmatch(value.strip())
        if match:
            return f"{match.group(1)[:1]}***@{match.group(2)}"
        return f"{value[:1]}***"
    return "***"


def mask_emails(text: str) -> str:
    """Mask every e-mail address inside free text."""
    return _EMAIL_RE.sub(lambda m: f"{m.group(1)[:1]}***@{m.group(2)}", text)


def is_personal(column: str, personal_columns: Iterable[str]) -> bool:
    """Whether ``column`` is one of the personal columns (case-insensitive)."""
    lowered = column.lower()
    return any(lowered == p.lower() for p in personal_columns)


def _cell(value: Any) -> str | int | float | bool | None:
    """A value TableRecord accepts, short enough for a preview."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, bool | int):
        return value
    if isinstance(value, pd.Timestamp | datetime | date):
        return value.isoformat()
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    text = mask_emails(value if isinstance(value, str) else str(value))
    return text if len(text) <= _MAX_CELL_CHARS else text[: _MAX_CELL_CHARS - 1] + "…"


def _column_type(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int"
    if pd.api.types.is_float_dtype(series):
        return "float"
    return "string"


def table_preview(
    frame: pd.DataFrame,
    *,
    personal_columns: Iterable[str],
    max_rows: int = PREVIEW_ROWS,
    columns: Sequence[str] | None = None,
) -> dg.TableMetadataValue:
    """A table preview of the first ``max_rows`` rows with personal columns masked.

    Args:
        frame: Rows to preview; only the first ``max_rows`` are read.
        personal_columns: Columns whose values are masked with :func:`mask_value`.
        max_rows: Most rows shown.
        columns: Columns to show, in order (default: all, at most 14).
    """
    personal = tuple(personal_columns)
    chosen = [c for c in (columns or list(frame.columns)) if c in frame.columns]
    head = frame.loc[:, chosen[:_MAX_PREVIEW_COLUMNS]].head(max(0, max_rows))
    records = []
    for row in head.to_dict("records"):
        records.append(
            dg.TableRecord(
                {
                    str(column): (
                        mask_value(_cell(value))
                        if is_personal(str(column), personal)
                        else _cell(value)
                    )
                    for column, value in row.items()
                }
            )
        )
    schema_columns = [
        dg.TableColumn(
            name=str(column),
            type="string" if is_personal(str(column), personal) else _column_type(head[column]),
        )
        for column in head.columns
    ]
    return dg.MetadataValue.table(records=records, schema=dg.TableSchema(columns=schema_columns))


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def esc(value: Any) -> str:
        text = f"{value:,}" if isinstance(value, int) else str(value)
        return mask_emails(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# -- plan -------------------------------------------------------------------------------------


def plan_summary(plan: pd.DataFrame, playbook: Playbook) -> dict[str, Any]:
    """What the ``<playbook>/plan`` asset stores: routing counts, not the per-entity plan.

    The per-entity record lives in the ledger; storing the plan itself would copy every personal
    column of the insight into a second place and grow with the batch.
    """
    attrs = plan.attrs.get("autoexec", {})
    decisions = plan["decision"].astype(str)
    by_decision = {d: int(n) for d, n in decisions.value_counts().items()}
    total = len(plan)
    flagged = total - by_decision.get("skip", 0)
    by_rule: dict[str, dict[str, int]] = {}
    grouped = plan.groupby(["rule", "decision"], observed=True).size()
    for (rule, decision), n in grouped.items():  # type: ignore[misc]
        if n:
            by_rule.setdefault(str(rule), {})[str(decision)] = int(n)
    actions = plan.loc[decisions == "act", "action"].astype(str).value_counts()
    return {
        "playbook": playbook.name,
        "playbook_version": attrs.get("playbook_version", playbook.effective_version),
        "insight": attrs.get("insight"),
        "partition_key": attrs.get("partition_key") or "",
        "total": total,
        "flagged": flagged,
        "flagged_fraction": flagged / total if total else 0.0,
        "by_decision": {d: by_decision.get(d, 0) for d in DECISIONS},
        "by_rule": by_rule,
        "by_action": {str(a): int(n) for a, n in actions.items()},
    }


def plan_preview_frame(plan: pd.DataFrame, playbook: Playbook, max_rows: int) -> pd.DataFrame:
    """Up to ``max_rows`` flagged rows: escalations first, then actions, then holdouts."""
    decisions = plan["decision"].astype(str).to_numpy()
    parts = []
    remaining = max_rows
    for decision in _DECISION_ORDER:
        if remaining <= 0:
            break
        positions = np.flatnonzero(decisions == decision)[:remaining]
        if len(positions):
            parts.append(plan.iloc[positions])
            remaining -= len(positions)
    if not parts:
        return plan.head(0)
    head = pd.concat(parts)
    inputs = [
        c
        for c in head.columns
        if c not in PLAN_COLUMNS and c != playbook.entity_key and not str(c).startswith("__")
    ]
    return head.loc[:, ["entity_id", "decision", "rule", "action", "reason", *inputs]]


def _can_decide(playbook: Playbook, decision: str) -> bool:
    if decision == "holdout":
        return playbook.guardrails.holdout_fraction > 0
    if decision == "skip":
        return True
    return any(rule.decision == decision for rule in playbook.rules)


def plan_metadata(
    plan: pd.DataFrame, playbook: Playbook, *, max_rows: int = PREVIEW_ROWS
) -> dict[str, Any]:
    """Materialization metadata of ``<playbook>/plan``."""
    summary = plan_summary(plan, playbook)
    total, flagged = summary["total"], summary["flagged"]
    limit = playbook.guardrails.max_flagged_fraction
    share = summary["flagged_fraction"]
    if total and share > limit:
        guardrail = (
            f"{share:.1%} of entities flagged, above max_flagged_fraction {limit:.1%}: the batch "
            "will not be executed and is escalated as a whole"
        )
    else:
        guardrail = f"ok: {share:.1%} flagged (limit {limit:.1%})"
    rule_rows = [
        (rule, decision, n)
        for rule, tally in summary["by_rule"].items()
        for decision, n in sorted(tally.items())
    ]
    metadata: dict[str, Any] = {
        "dagster/row_count": total,
        "total": total,
        "flagged": flagged,
        "flagged_fraction": float(share),
        "max_flagged_fraction": float(limit),
        # A decision the playbook cannot make would only plot a line of zeros.
        **{
            decision: summary["by_decision"][decision]
            for decision in DECISIONS
            if summary["by_decision"][decision] or _can_decide(playbook, decision)
        },
        "guardrail": guardrail,
        "playbook_version": str(summary["playbook_version"]),
        "by_rule": dg.MetadataValue.md(_md_table(("rule", "decision", "entities"), rule_rows)),
        "preview": table_preview(
            plan_preview_frame(plan, playbook, max_rows),
            personal_columns=playbook.personal_columns,
            max_rows=max_rows,
        ),
    }
    return metadata


# -- actions ----------------------------------------------------------------------------------


def report_status(report: ExecutionReport) -> str:
    """One line saying how the execution ended."""
    if report.blocked_reason:
        return f"BLOCKED by a guardrail, nothing was executed: {report.blocked_reason}"
    if report.paused_reason:
        return f"PAUSED: {report.paused_reason}"
    parts = []
    if report.failed:
        parts.append(f"{report.failed:,} failed")
    if report.pending:
        parts.append(f"{report.pending:,} pending")
    if report.circuit_opened:
        parts.append(f"circuit opened for {', '.join(report.circuit_opened)}")
    mode = "dry run completed" if report.dry_run else "completed"
    return f"{mode} with {', '.join(parts)}" if parts else mode


def report_metadata(report: ExecutionReport) -> dict[str, Any]:
    """The numbers of an execution report as metadata (plottable ints and floats)."""
    metadata: dict[str, Any] = {key: int(value) for key, value in report.counts().items()}
    metadata["status"] = report_status(report)
    metadata["blocked"] = bool(report.blocked_reason)
    if report.blocked_reason:
        metadata["blocked_reason"] = report.blocked_reason
    if report.paused_reason:
        metadata["paused_reason"] = report.paused_reason
    rate = report.autonomy_rate
    if rate is not None:
        metadata["autonomy_rate"] = float(rate)
    metadata["duration_seconds"] = float(report.duration_seconds)
    metadata["throughput_per_second"] = float(report.throughput)
    metadata["in_doubt_recovered"] = int(report.in_doubt_recovered)
    metadata["dry_run_mode"] = bool(report.dry_run)
    metadata["summary"] = dg.MetadataValue.md(mask_emails(report.summary_markdown()))
    if report.by_action:
        metadata["by_action"] = dg.MetadataValue.json(
            {action: dict(tally) for action, tally in report.by_action.items()}
        )
    if report.errors:
        metadata["errors"] = dg.MetadataValue.md(
            "\n".join(f"- `{mask_emails(e)}`" for e in report.errors[:10])
        )
    return metadata


def describe_run(report: ExecutionReport) -> str:
    """What one run added to its partition, in one sentence."""
    if report.blocked_reason:
        return f"blocked by a guardrail, nothing was executed: {report.blocked_reason}"
    if report.paused_reason:
        return (
            f"paused ({report.paused_reason}); {report.succeeded:,} sent before the pause, "
            f"{report.pending:,} left for the next run"
        )
    new = report.succeeded + report.dry_run_actions
    if not new and not report.escalated and report.already_done:
        return (
            f"0 new actions: all {report.already_done:,} entities were already done by an "
            "earlier run, nothing was sent twice"
        )
    verb = "recorded as a dry run" if report.dry_run else "sent"
    text = f"{new:,} new action(s) {verb}, {report.escalated:,} escalation(s) opened"
    if report.already_done:
        text += f", {report.already_done:,} already done before"
    return text


def partition_markdown(
    outcome: PartitionOutcome, *, playbook: Playbook, report: ExecutionReport | None = None
) -> str:
    """The Markdown summary of a partition: its totals over all runs, then what this run did."""
    rate = outcome.autonomy_rate
    delivered = ", ".join(
        f"{tally.get('succeeded', 0) + tally.get('dry_run', 0):,} {action}"
        for action, tally in sorted(outcome.by_action.items())
        if tally.get("succeeded", 0) + tally.get("dry_run", 0)
    )
    lines = [
        f"### {playbook.name} · partition `{outcome.partition_key or '-'}` · all runs",
        "",
        f"- **{outcome.flagged:,}** of {outcome.total:,} entities flagged",
        f"- **{outcome.autonomous:,}** handled autonomously"
        + (f" (autonomy rate **{rate:.1%}**)" if rate is not None else "")
        + (f": {delivered}" if delivered else ""),
    ]
    if outcome.cooled_down:
        days = playbook.guardrails.cooldown_days
        lines.append(
            f"  - {outcome.cooled_down:,} of them not repeated (cooldown: the same action was "
            f"delivered to them{f' within {days:g} day(s)' if days else ' recently'})"
        )
    if outcome.over_budget:
        budgets = ", ".join(f"{b.name} ({b.describe()})" for b in playbook.guardrails.budgets)
        lines.append(
            f"  - {outcome.over_budget:,} of them not sent: a budget was spent"
            + (f" ({budgets})" if budgets else "")
        )
    lines.append(
        f"- **{outcome.escalated:,}** escalated to a person ({outcome.open_escalations:,} still "
        "open)"
    )
    if outcome.still_open:
        origins = ", ".join(
            f"{n:,} from `{p}`" for p, n in sorted(outcome.still_open_by_partition.items())
        )
        lines.append(
            f"- {outcome.still_open:,} already waiting for a person from an earlier partition "
            f"({origins}): not escalated again"
        )
    if outcome.workflows:
        lines.append(
            f"- **{outcome.workflows:,}** handed to a workflow: {outcome.workflows_succeeded:,} "
            f"finished every step, {outcome.workflows_active:,} still under way"
        )
    lines.append(
        f"- {outcome.held_out:,} held out as control group, {outcome.skipped:,} skipped "
        "(no rule matched)"
    )
    lines.append(
        f"- {outcome.failed:,} failed"
        + (f", {outcome.pending:,} pending (not sent yet)" if outcome.pending else "")
    )
    if report is not None:
        lines += ["", f"**This run:** {describe_run(report)}.", "", "<details>", ""]
        lines += [report.summary_markdown().replace("### ", "#### This run: ", 1), "", "</details>"]
    return "\n".join(lines)


def actions_metadata(
    report: ExecutionReport,
    *,
    ledger: ActionLedger,
    playbook: Playbook,
    max_rows: int = PREVIEW_ROWS,
) -> dict[str, Any]:
    """Materialization metadata of ``<playbook>/actions``.

    The headline entries (``flagged``, ``succeeded``, ``escalated``, ``autonomy_rate``, ...) are
    the partition's totals in the ledger, over every run: a re-run that sends nothing must not
    plot a busy day as zero. What this run added is secondary and named so (``run_succeeded``,
    ``run_already_done``, ``run_duration_seconds``, ...). Counts that are zero and cannot occur
    under this playbook (held out without a holdout, cooled down without a cooldown, ...) are
    left out, so their always-zero series do not crowd the plots.
    """
    outcome = ledger.partition_outcome(playbook=playbook.name, partition_key=report.partition_key)
    guardrails = playbook.guardrails
    metadata: dict[str, Any] = {
        "total": outcome.total,
        "flagged": outcome.flagged,
        "succeeded": outcome.succeeded,
        "escalated": outcome.escalated,
        "failed": outcome.failed,
    }
    optional = {
        "still_open": (outcome.still_open, False),
        "cooled_down": (outcome.cooled_down, bool(guardrails.cooldown_days)),
        "over_budget": (outcome.over_budget, bool(guardrails.budgets)),
        "held_out": (outcome.held_out, guardrails.holdout_fraction > 0),
        "dry_run": (outcome.dry_run, report.dry_run),
        "pending": (outcome.pending, False),
        "skipped": (outcome.skipped, False),
    }
    for key, (value, relevant) in optional.items():
        if value or relevant:
            metadata[key] = int(value)
    rate = outcome.autonomy_rate
    if rate is not None:
        metadata["autonomy_rate"] = float(rate)
    metadata["status"] = report_status(report)
    if report.blocked_reason or outcome.blocked:
        metadata["blocked"] = True
    if report.blocked_reason:
        metadata["blocked_reason"] = report.blocked_reason
    if report.paused_reason:
        metadata["paused_reason"] = report.paused_reason
    if outcome.by_action:
        metadata["by_action"] = dg.MetadataValue.json(outcome.by_action)
    if outcome.still_open_by_partition:
        metadata["still_open_by_partition"] = dg.MetadataValue.json(outcome.still_open_by_partition)
    # This run, named so. The first two say whether the run added anything; the rest only when
    # they happened.
    metadata["run_succeeded"] = int(report.succeeded)
    metadata["run_already_done"] = int(report.already_done)
    for key, value in (
        ("run_failed", report.failed),
        ("run_escalated", report.escalated),
        ("run_cooled_down", report.cooled_down),
        ("run_dry_run", report.dry_run_actions),
        ("run_pending", report.pending),
        ("run_retries", report.retries),
        ("run_in_doubt_recovered", report.in_doubt_recovered),
    ):
        if value:
            metadata[key] = int(value)
    metadata["run_duration_seconds"] = float(report.duration_seconds)
    metadata["run_throughput_per_second"] = float(report.throughput)
    if report.dry_run:
        metadata["dry_run_mode"] = True
    metadata["summary"] = dg.MetadataValue.md(
        mask_emails(partition_markdown(outcome, playbook=playbook, report=report))
    )
    if report.errors:
        metadata["errors"] = dg.MetadataValue.md(
            "\n".join(f"- `{mask_emails(e)}`" for e in report.errors[:10])
        )
    metadata["playbook_version"] = report.playbook_version
    metadata["ledger"] = ledger.display_url
    rows = action_preview_rows(
        ledger, playbook=playbook.name, partition_key=report.partition_key, limit=max_rows
    )
    columns = ["entity_id", "action", "state", "attempts", "detail", "error", "updated_at"]
    personal = (*playbook.personal_columns, "entity_id") if _entity_is_personal(playbook) else ()
    metadata["preview"] = table_preview(
        rows, personal_columns=personal, max_rows=max_rows, columns=columns
    )
    if playbook.workflows:
        metadata.update(
            workflow_metadata(
                ledger.workflow_outcome(playbook=playbook.name, partition_key=report.partition_key),
                ledger=ledger,
                playbook=playbook,
                report=report,
                max_rows=max_rows,
            )
        )
    return metadata


# -- workflows --------------------------------------------------------------------------------


def _loads(raw: Any, default: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return default
    return default if raw is None else raw


def masked_outputs(
    outputs: Any,
    *,
    personal_columns: Iterable[str],
    max_chars: int = 160,
    emails: bool = True,
) -> str:
    """Step outputs (``{step: {field: value}}`` or its JSON) as one short masked line.

    Fields whose names are personal columns are masked like the insight's personal columns,
    e-mail addresses anywhere are masked (unless ``emails`` is False: a person who asked to see
    personal data), and the line is cut at ``max_chars``.
    """
    keep = mask_emails if emails else str
    data = _loads(outputs, {})
    if not isinstance(data, Mapping):
        text = keep(str(data))
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"
    personal = tuple(personal_columns)
    parts = []
    for step, output in data.items():
        if isinstance(output, Mapping):
            for name, value in output.items():
                shown = mask_value(value) if is_personal(str(name), personal) else value
                if isinstance(shown, float):
                    shown = round(shown, 4)
                if isinstance(shown, Mapping | list):
                    shown = json.dumps(shown, default=str)
                parts.append(f"{step}.{name}={shown}")
        else:
            parts.append(f"{step}={output}")
    text = keep(", ".join(parts))
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def last_outcome(log: Any) -> str:
    """The last entry of an instance's step log, as ``step: outcome (attempt n)``."""
    entries = _loads(log, [])
    if not isinstance(entries, list) or not entries or not isinstance(entries[-1], Mapping):
        return ""
    last = entries[-1]
    attempt = last.get("attempt")
    return f"{last.get('step')}: {last.get('outcome')}" + (
        f" (attempt {attempt})" if attempt else ""
    )


def failed_step(log: Any) -> tuple[str, str]:
    """``(step, error)`` of the last failed step in an instance's log ("" when none failed)."""
    entries = _loads(log, [])
    if isinstance(entries, list):
        for entry in reversed(entries):
            if isinstance(entry, Mapping) and entry.get("outcome") == "failed":
                return str(entry.get("step", "")), str(entry.get("detail", ""))
    return "", ""


def workflow_preview_frame(
    instances: pd.DataFrame, *, playbook: Playbook, max_chars: int = 160
) -> pd.DataFrame:
    """Workflow instances as preview rows: current step, last outcome, masked outputs."""
    personal = playbook.personal_columns
    entity_personal = _entity_is_personal(playbook)
    return pd.DataFrame(
        {
            "instance": instances["instance_id"].astype(str).str.slice(0, 12),
            "entity_id": [
                mask_value(str(v)) if entity_personal else str(v) for v in instances["entity_id"]
            ],
            "workflow": instances["workflow"].astype(str),
            "state": instances["state"].astype(str),
            "step": instances["step"].fillna("-").astype(str),
            "attempt": instances["attempt"].astype(int),
            "next_due": [_cell(v) if v is not None else None for v in instances["next_due"]],
            "last_outcome": [last_outcome(v) for v in instances["log"]],
            "outputs": [
                masked_outputs(v, personal_columns=personal, max_chars=max_chars)
                for v in instances["outputs"]
            ],
            "error": [
                (mask_emails(str(v))[:max_chars] if isinstance(v, str) and v else None)
                for v in instances["error"]
            ],
        }
    )


def _step_rows(outcome: WorkflowOutcome, playbook: Playbook) -> list[tuple[Any, ...]]:
    order = [
        step.name
        for workflow in playbook.workflows.values()
        for step in [*workflow.steps, *workflow.on_failure_steps]
    ]
    names = list(dict.fromkeys([*order, *outcome.at_step, *outcome.step_attempts]))
    rows = []
    for step in names:
        at = outcome.at_step.get(step, {})
        attempts = outcome.step_attempts.get(step, {})
        if not at and not attempts:
            continue
        rows.append(
            (
                step,
                at.get("running", 0) + at.get("failing", 0),
                at.get("waiting", 0),
                attempts.get("succeeded", 0),
                attempts.get("failed", 0),
                sum(n for s, n in attempts.items() if s not in ("succeeded", "failed")),
            )
        )
    return rows


def workflow_metadata(
    outcome: WorkflowOutcome,
    *,
    ledger: ActionLedger,
    playbook: Playbook,
    report: ExecutionReport | None = None,
    max_rows: int = PREVIEW_ROWS,
) -> dict[str, Any]:
    """The workflow entries of ``<playbook>/actions``: the partition's instances, over all runs.

    Headline counts (``workflows_started``, ``_running``, ``_waiting``, ``_succeeded``,
    ``_failed``, ``_escalated``) are the partition's totals in the ledger, so each advance run's
    materialization plots the progress; ``workflows_waiting_until`` says when the earliest
    waiting instance is due. Per step, how many instances are there now and how its attempts
    ended; and a preview of at most ``max_rows`` instances (failed first) with their current
    step, last outcome and masked outputs. A bounded number of entries whatever the number of
    instances.
    """
    metadata: dict[str, Any] = {
        "workflows_started": outcome.started,
        "workflows_running": outcome.running,
        "workflows_waiting": outcome.waiting,
        "workflows_succeeded": outcome.succeeded,
        "workflows_failed": outcome.failed,
        "workflows_escalated": outcome.escalated,
    }
    if outcome.cancelled:
        metadata["workflows_cancelled"] = outcome.cancelled
    metadata["workflows_waiting_until"] = (
        outcome.next_due.isoformat() if outcome.next_due is not None else "-"
    )
    if outcome.median_resolution_seconds is not None:
        metadata["workflows_median_resolution_seconds"] = float(outcome.median_resolution_seconds)
    rows = _step_rows(outcome, playbook)
    if rows:
        metadata["workflows_by_step"] = dg.MetadataValue.md(
            _md_table(
                (
                    "step",
                    "instances running",
                    "instances waiting",
                    "attempts succeeded",
                    "attempts failed",
                    "attempts pending",
                ),
                rows,
            )
        )
    flow = getattr(report, "workflows", None) if report is not None else None
    if report is not None:
        metadata["run_workflows_started"] = int(report.workflows_started)
    if flow is not None:
        metadata["run_workflows_advanced"] = int(flow.advanced)
        metadata["run_workflow_steps_delivered"] = int(flow.steps_delivered)
    instances = ledger.workflow_preview(
        playbook=playbook.name, partition_key=outcome.partition_key, limit=max_rows
    )
    metadata["workflows_preview"] = table_preview(
        workflow_preview_frame(instances, playbook=playbook),
        personal_columns=(),
        max_rows=max_rows,
    )
    return metadata


def workflow_failures_frame(queue: pd.DataFrame, *, playbook: Playbook) -> pd.DataFrame:
    """Open escalations of failed workflows as compact, masked evidence rows.

    Each row: the entity, its workflow, the step that failed and its error, and the outputs of
    the steps before (the diagnosis), masked like personal insight columns.
    """
    rows = []
    entity_personal = _entity_is_personal(playbook)
    for record in queue.to_dict("records"):
        data = _loads(record.get("data"), {})
        data = data if isinstance(data, Mapping) else {}
        step, error = failed_step(data.get("evidence"))
        entity = str(record["entity_id"])
        rows.append(
            {
                "key": str(record["idempotency_key"])[:12],
                "entity_id": mask_value(entity) if entity_personal else entity,
                "workflow": str(data.get("workflow", "")),
                "failed_step": step,
                "error": mask_emails(error)[: _MAX_CELL_CHARS * 2],
                "outputs": masked_outputs(
                    data.get("outputs"), personal_columns=playbook.personal_columns
                ),
            }
        )
    columns = ["key", "entity_id", "workflow", "failed_step", "error", "outputs"]
    return pd.DataFrame(rows, columns=columns)


def action_preview_rows(
    ledger: ActionLedger, *, playbook: str, partition_key: str, limit: int = PREVIEW_ROWS
) -> pd.DataFrame:
    """Up to ``limit`` action rows of a partition, those needing a person first.

    A read transaction of the ledger (:meth:`~autoexec_dagster.ActionLedger.action_preview`):
    one small query per state, so the preview costs the same for 50 rows and for a million.
    """
    return ledger.action_preview(playbook=playbook, partition_key=partition_key, limit=limit)


def _entity_is_personal(playbook: Playbook) -> bool:
    return is_personal(playbook.entity_key, playbook.personal_columns)


# -- escalations ------------------------------------------------------------------------------


def open_escalation_counts(
    ledger: ActionLedger, *, playbook: str, partition_key: str
) -> list[tuple[str, str, int]]:
    """Open escalations of one partition, counted by kind and reason, largest first.

    A read transaction of the ledger, which takes no write lock on SQLite.
    """
    return ledger.open_escalation_counts(playbook=playbook, partition_key=partition_key)


def escalations_frame(
    queue: pd.DataFrame, *, personal_columns: Iterable[str], entity_is_personal: bool = False
) -> pd.DataFrame:
    """The escalation queue with each entity's data as compact, masked JSON."""
    personal = tuple(personal_columns)
    out = pd.DataFrame(
        {
            "key": queue["idempotency_key"].astype(str),
            "partition": queue["partition_key"].astype(str),
            "entity_id": queue["entity_id"].astype(str),
            "kind": queue["kind"].astype(str),
            "rule": queue["rule"].astype(str),
            "reason": queue["reason"].astype(str),
            "data": [compact_data(raw, personal_columns=personal) for raw in queue["data"]],
        }
    )
    if entity_is_personal:
        out["entity_id"] = [mask_value(v) for v in out["entity_id"]]
    return out


def compact_data(raw: Any, *, personal_columns: Iterable[str], max_chars: int = 160) -> str:
    """An escalation's entity data (JSON text from the ledger) as one short masked line."""
    try:
        data = json.loads(raw) if isinstance(raw, str) else dict(raw or {})
    except (TypeError, ValueError):
        return mask_emails(str(raw))[:max_chars]
    if not isinstance(data, Mapping):
        return mask_emails(str(data))[:max_chars]
    personal = tuple(personal_columns)
    parts = []
    for key, value in data.items():
        if key in _EVIDENCE_KEYS:
            continue
        shown = mask_value(value) if is_personal(str(key), personal) else value
        if isinstance(shown, float):
            shown = round(shown, 4)
        parts.append(f"{key}={shown}")
    text = mask_emails(", ".join(parts))
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def escalations_summary(
    *,
    playbook: Playbook,
    partition_key: str,
    counts: Sequence[tuple[str, str, int]],
    new_in_run: int,
    report: ExecutionReport | None = None,
) -> dict[str, Any]:
    """What ``<playbook>/escalations`` stores: the partition's open queue, counted."""
    by_kind: dict[str, int] = {}
    for kind, _reason, n in counts:
        by_kind[kind] = by_kind.get(kind, 0) + n
    return {
        "playbook": playbook.name,
        "partition_key": partition_key,
        "open": sum(n for _, _, n in counts),
        "new_in_run": new_in_run,
        "by_kind": by_kind,
        "top_reasons": [
            {"kind": kind, "reason": mask_emails(reason), "open": n}
            for kind, reason, n in counts[:10]
        ],
        "blocked_reason": report.blocked_reason if report is not None else None,
    }


def escalations_metadata(
    summary: Mapping[str, Any],
    *,
    ledger: ActionLedger,
    playbook: Playbook,
    max_rows: int = PREVIEW_ROWS,
) -> dict[str, Any]:
    """Materialization metadata of ``<playbook>/escalations``."""
    partition = str(summary["partition_key"])
    queue = ledger.escalations(
        playbook=playbook.name, partition_key=partition, status="open", limit=max_rows
    )
    preview = escalations_frame(
        queue,
        personal_columns=playbook.personal_columns,
        entity_is_personal=_entity_is_personal(playbook),
    )
    preview["key"] = preview["key"].str.slice(0, 12)
    command = f"autoexec escalations --playbook {playbook.name}" + (
        f" --partition {partition}" if partition else ""
    )
    lines = [
        f"### {playbook.name} · partition `{partition or '-'}` · escalations",
        "",
        f"**{summary['open']:,} open** escalation(s) for this partition, "
        f"{summary['new_in_run']:,} new in this run.",
    ]
    if summary.get("blocked_reason"):
        lines += [
            "",
            f"**The whole batch was escalated by a guardrail:** {summary['blocked_reason']}",
        ]
    if summary["top_reasons"]:
        lines += [
            "",
            _md_table(
                ("kind", "reason", "open"),
                [(r["kind"], r["reason"], r["open"]) for r in summary["top_reasons"]],
            ),
        ]
    still_open = int(summary.get("still_open") or 0)
    if still_open:
        lines += [
            "",
            f"{still_open:,} more entities of this partition wait on an escalation still open "
            "from an earlier partition (not escalated again).",
        ]
    lines += ["", f"Review and resolve them with `{command}`."]
    metadata: dict[str, Any] = {
        "open": int(summary["open"]),
        "run_opened": int(summary["new_in_run"]),
        **{f"open_{kind}": int(n) for kind, n in sorted(summary["by_kind"].items())},
        **({"still_open": int(summary["still_open"])} if summary.get("still_open") else {}),
        "summary": dg.MetadataValue.md(mask_emails("\n".join(lines))),
        "review_with": command,
        "preview": table_preview(preview, personal_columns=(), max_rows=max_rows),
    }
    if playbook.workflows:
        failures = ledger.escalations(
            playbook=playbook.name,
            partition_key=partition,
            status="open",
            kind=WORKFLOW_FAILED_KIND,
            limit=max_rows,
        )
        metadata[f"open_{WORKFLOW_FAILED_KIND}"] = int(
            summary["by_kind"].get(WORKFLOW_FAILED_KIND, 0)
        )
        metadata["workflow_failures"] = table_preview(
            workflow_failures_frame(failures, playbook=playbook),
            personal_columns=(),
            max_rows=max_rows,
        )
    return metadata
