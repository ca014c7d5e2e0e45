"""Backtest: replay a playbook over past insight partitions, with no side effect.

Before go-live a team wants to know, from its own history, what a playbook would have done: how
many entities it flags, how many it handles without a person, how many it escalates and how many
approval requests (and how much value) its approval gates would raise, for two or more candidate
thresholds side by side. :func:`backtest` answers that from the insight partitions alone. It routes
each partition with :func:`autoexec_dagster.route` (pure), applies the guardrails as
``execute_plan`` would (a batch above ``max_flagged_fraction`` or ``max_actions`` is escalated as a
whole), and walks each workflow instance through its steps without running any of them. It never
opens a ledger, a channel or a network connection.

No step runs in a backtest, so no step output exists. An approval gate's ``approve_when`` usually
reads one (``\\`draft_po.total\\` > 5000``); ``assume`` gives each such output as an expression over
the insight's columns (``{"draft_po.total": "reorder_qty * unit_cost"}``), checked against the same
grammar as rules. A gate that reads an output with no assumption is refused, naming it.

How faithful it is:

- Routing, holdouts and the blast-radius and max-actions guardrails are exactly those of a run.
- A step's ``when`` is respected where it reads insight columns and assumed outputs: a skipped
  step is skipped, and a later condition that reads the output of a skipped step fails the
  instance, which is escalated with the workflow's ``on_failure``, as a run does. A ``when`` that
  reads an output no assumption gives is counted as holding for every instance (the report's
  ``notes`` say which).
- Every step other than a gate is taken to succeed (no delivery failures, polls end before their
  timeout, transforms return a row per instance). Where a workflow has several gates, an instance
  waiting at one is counted at the later ones as if approved.
- Not replayed, because they depend on the ledger's history: cooldowns (a cooled-down action
  counts as autonomous in the ledger too, so the counts here do not change) and escalations still
  open from an earlier partition (a run records those as ``still_open`` instead of escalating them
  again; here they count as escalated in every partition that flags them).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from autoexec_dagster.errors import InsightValidationError, PlaybookError
from autoexec_dagster.executor.guardrails import guardrail_violation
from autoexec_dagster.expressions import ParsedExpression, parse_expression
from autoexec_dagster.playbook import Playbook
from autoexec_dagster.routing import PLAN_COLUMNS, route
from autoexec_dagster.workflows.workflow import Step, Workflow

__all__ = [
    "AS_WRITTEN",
    "METRICS",
    "BacktestReport",
    "approval_steps",
    "backtest",
]

# The label of the playbook as written, always the first scenario.
AS_WRITTEN = "as_written"
# Columns of BacktestReport.frame after partition and scenario.
METRICS: tuple[str, ...] = (
    "total",
    "flagged",
    "actions",
    "autonomous",
    "escalated",
    "held_out",
    "skipped",
    "workflows",
    "approvals_needed",
    "approvals_value",
    "autonomy_rate",
    "blocked",
)
# What the side-by-side view shows once per partition, and what it shows per scenario.
_SHARED = ("flagged", "workflows")
_PER_SCENARIO = ("approvals_needed", "approvals_value", "autonomy_rate")
# parse_expression names a rule in its messages; a backtest names the assumption or scenario.
_PLACEHOLDER = "backtest"


@dataclass
class BacktestReport:
    """What a playbook would have done over past insight partitions.

    Attributes:
        playbook: The playbook's name.
        scenarios: Scenario labels, :data:`AS_WRITTEN` first.
        conditions: Per scenario, each approval gate (``workflow.step``) and the ``approve_when``
            it was replayed with.
        frame: One row per partition and scenario: ``partition``, ``scenario``, then
            :data:`METRICS`. ``flagged`` counts entities a rule acted on, escalated, held out or
            handed to a workflow (as the ledger and the blast-radius guardrail count them);
            ``actions`` the one-shot actions; ``autonomous`` the actions plus the workflow
            instances that pass every gate by rule; ``escalated`` rule escalations, workflow
            instances that would fail, and every flagged entity of a batch a guardrail blocks;
            ``approvals_needed`` the approval requests the gates raise and ``approvals_value``
            the sum of their values; ``autonomy_rate`` the share of flagged entities outside the
            control group handled without a person (an instance waiting for an approval is not);
            ``blocked`` whether a guardrail blocked the batch (then every flagged entity is
            escalated and nothing is acted on, held out or started, as in a run).
        blocked: Partition -> why a guardrail blocked its batch.
        notes: What was approximated beyond the module's general caveats (a step condition
            reading an output no assumption gives, several gates in one workflow, ...).
    """

    playbook: str
    scenarios: tuple[str, ...]
    conditions: dict[str, dict[str, str]]
    frame: pd.DataFrame
    blocked: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def totals(self) -> pd.DataFrame:
        """One row per scenario: the sums over every partition, the autonomy rate recomputed from
        them, and how many partitions there were and how many a guardrail blocked."""
        rows = []
        for label in self.scenarios:
            part = self.frame[self.frame["scenario"] == label]
            row: dict[str, Any] = {"scenario": label, "partitions": len(part)}
            for metric in METRICS:
                if metric == "autonomy_rate":
                    continue
                values = part[metric]
                row[metric] = (
                    float(values.sum()) if metric == "approvals_value" else int(values.sum())
                )
            row["autonomy_rate"] = _rate(row["autonomous"], row["flagged"] - row["held_out"])
            rows.append(row)
        columns = ["scenario", "partitions", "blocked", *(m for m in METRICS if m != "blocked")]
        return pd.DataFrame(rows, columns=columns)

    def side_by_side(self) -> pd.DataFrame:
        """One row per partition: the counts every scenario shares, then per scenario (columns
        ``<metric>[<scenario>]``) its approvals, their value and the autonomy rate.

        ``escalated`` and ``autonomous`` are shown once when every scenario agrees on them (the
        usual case: a threshold moves instances between autonomous and waiting for a person),
        else per scenario too.
        """
        first = self.frame[self.frame["scenario"] == self.scenarios[0]].set_index("partition")
        out = pd.DataFrame({"partition": first.index})
        for metric in _SHARED:
            out[metric] = first[metric].to_numpy()
        varying: list[str] = []
        for metric in ("autonomous", "escalated"):
            pivot = self.frame.pivot(index="partition", columns="scenario", values=metric)
            if (pivot.nunique(axis=1) <= 1).all():
                out[metric] = first[metric].to_numpy()
            else:
                varying.append(metric)
        per_scenario = [*varying, *_PER_SCENARIO]
        out["blocked"] = first["blocked"].to_numpy()
        for label in self.scenarios:
            part = self.frame[self.frame["scenario"] == label].set_index("partition")
            for metric in per_scenario:
                out[f"{metric}[{label}]"] = part.loc[first.index, metric].to_numpy()
        return out

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable once NaN rates are read as null)."""
        return {
            "playbook": self.playbook,
            "scenarios": list(self.scenarios),
            "conditions": {k: dict(v) for k, v in self.conditions.items()},
            "partitions": self.frame.to_dict("records"),
            "totals": self.totals.to_dict("records"),
            "blocked": dict(self.blocked),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class _Gate:
    workflow: str
    index: int
    step: Step
    steps: tuple[str, ...]  # the names of its workflow's steps, in order

    @property
    def name(self) -> str:
        return f"{self.workflow}.{self.step.name}"


def approval_steps(playbook: Playbook) -> list[tuple[str, Step]]:
    """The approval gates of the workflows the playbook's rules start, as (workflow, step).

    Args:
        playbook: The playbook.

    Returns:
        Each gate with the name of its workflow, in rule and step order.
    """
    return [(gate.workflow, gate.step) for gate in _gates(playbook)]


def backtest(
    *,
    playbook: Playbook,
    insights: Mapping[str, pd.DataFrame],
    assume: Mapping[str, str] | None = None,
    scenarios: Mapping[str, Mapping[str, str]] | None = None,
) -> BacktestReport:
    """Replay a playbook over past insight partitions and count what it would have done.

    Nothing is executed or recorded: no ledger, no channel, no network. See the module docstring
    for what is exact and what is approximated.

    Args:
        playbook: The playbook to replay.
        insights: Partition key -> that partition's insight, in the order to report them.
        assume: Step output -> an expression over insight columns that stands in for it, e.g.
            ``{"draft_po.total": "reorder_qty * unit_cost"}``; needed for every step output an
            approval gate reads.
        scenarios: Label -> {approval step -> ``approve_when``} replacing that gate's condition,
            e.g. ``{"10k": {"approval": "`draft_po.total` > 10000"}}``. A step is named as in
            its workflow, or ``workflow.step`` where two workflows have a gate of that name. The
            playbook as written is always the scenario :data:`AS_WRITTEN`.

    Returns:
        The :class:`BacktestReport`.

    Raises:
        PlaybookError: An assumption or a scenario's condition does not parse or reads what it
            may not, a scenario names an unknown step or one that is not an approval gate, a
            label is empty or reserved, or a gate reads a step output no assumption gives.
        InsightValidationError: A partition cannot be routed (missing column, duplicate ids,
            ...) or lacks a column an assumption or a condition reads; the message names it.
    """
    if not insights:
        raise InsightValidationError("backtest: no insight partitions to replay")
    gates = _gates(playbook)
    assumed = _parse_assumptions(playbook, assume or {})
    conditions = _scenario_conditions(gates, scenarios or {})
    replayed = {
        label: {name: _gate_step(gates, name, source) for name, source in gate_map.items()}
        for label, gate_map in conditions.items()
    }
    for label, steps in replayed.items():
        for gate in gates:
            _check_gate_reads(gate, steps[gate.name], assumed=assumed, label=label)
    notes: dict[str, None] = {}
    for gate in gates:
        later = [g for g in gates if g.workflow == gate.workflow and g.index > gate.index]
        if later:
            notes[
                f"workflow {gate.workflow!r} has more than one approval gate: an instance waiting "
                f"at {gate.step.name!r} is counted at {later[0].step.name!r} as if approved"
            ] = None
    rows: list[dict[str, Any]] = []
    blocked: dict[str, str] = {}
    for partition, insight in insights.items():
        rows.extend(
            _replay_partition(
                playbook,
                partition=str(partition),
                insight=insight,
                gates=gates,
                assumed=assumed,
                replayed=replayed,
                blocked=blocked,
                notes=notes,
            )
        )
    frame = pd.DataFrame(rows, columns=["partition", "scenario", *METRICS])
    return BacktestReport(
        playbook=playbook.name,
        scenarios=tuple(conditions),
        conditions={label: dict(gate_map) for label, gate_map in conditions.items()},
        frame=frame,
        blocked=blocked,
        notes=tuple(notes),
    )


# -- set-up: gates, assumptions, scenarios ---------------------------------------------------


def _started(playbook: Playbook) -> list[str]:
    names = [rule.workflow for rule in playbook.rules if rule.workflow is not None]
    return list(dict.fromkeys(names))


def _gates(playbook: Playbook) -> list[_Gate]:
    return [
        _Gate(
            workflow=name,
            index=index,
            step=step,
            steps=tuple(s.name for s in playbook.workflows[name].steps),
        )
        for name in _started(playbook)
        for index, step in enumerate(playbook.workflows[name].steps)
        if step.kind == "approval"
    ]


def _parse_assumptions(playbook: Playbook, assume: Mapping[str, str]) -> dict[str, str]:
    steps = {s.name for name in _started(playbook) for s in playbook.workflows[name].steps}
    parsed: dict[str, str] = {}
    for column, source in assume.items():
        step_name, dot, output = column.partition(".")
        if not dot or not step_name or not output:
            raise PlaybookError(
                f"assume: {column!r} must name a step output as '<step>.<field>', e.g. "
                "'draft_po.total'"
            )
        if step_name not in steps:
            raise PlaybookError(
                f"assume: {column!r} names step {step_name!r}, which no workflow the playbook "
                f"starts has (steps: {', '.join(sorted(steps)) or 'none'})"
            )
        if not isinstance(source, str):
            raise PlaybookError(f"assume: {column!r} must be an expression (text)")
        expression = _parse(source, where=f"assume {column!r}")
        dotted = sorted(c for c in expression.columns if "." in c)
        if dotted:
            raise PlaybookError(
                f"assume: {column!r} = {source!r} reads {', '.join(dotted)}; an assumption is "
                "computed from the insight's columns only"
            )
        parsed[column] = source
    return parsed


def _scenario_conditions(
    gates: list[_Gate], scenarios: Mapping[str, Mapping[str, str]]
) -> dict[str, dict[str, str]]:
    """Label -> gate name -> approve_when, the playbook as written first."""
    as_written = {gate.name: str(gate.step.approve_when) for gate in gates}
    conditions: dict[str, dict[str, str]] = {AS_WRITTEN: as_written}
    for label, overrides in scenarios.items():
        if not isinstance(label, str) or not label.strip():
            raise PlaybookError("scenarios: a scenario label is empty")
        if label == AS_WRITTEN:
            raise PlaybookError(
                f"scenarios: the label {AS_WRITTEN!r} is the playbook as written; choose another"
            )
        if not gates:
            raise PlaybookError(
                f"scenario {label!r}: the playbook's workflows have no approval step to change"
            )
        if not overrides:
            raise PlaybookError(f"scenario {label!r} changes no approval step")
        chosen = dict(as_written)
        for step_name, source in overrides.items():
            gate = _find_gate(gates, step_name, label=label)
            if not isinstance(source, str):
                raise PlaybookError(
                    f"scenario {label!r}: the condition of {step_name!r} must be an expression"
                )
            _parse(source, where=f"scenario {label!r}, approval step {gate.name!r}")
            chosen[gate.name] = source
        conditions[label] = chosen
    return conditions


def _parse(source: str, *, where: str) -> ParsedExpression:
    """Parse with the rules' grammar; the message names ``where`` instead of a rule."""
    try:
        return parse_expression(source, rule=_PLACEHOLDER)
    except PlaybookError as exc:
        detail = str(exc).removeprefix(f"rule {_PLACEHOLDER!r}: ")
        raise PlaybookError(f"{where}: {detail}") from None


def _find_gate(gates: list[_Gate], name: str, *, label: str) -> _Gate:
    known = ", ".join(gate.name for gate in gates)
    if "." in name:
        matches = [gate for gate in gates if gate.name == name]
    else:
        matches = [gate for gate in gates if gate.step.name == name]
    if len(matches) > 1:
        raise PlaybookError(
            f"scenario {label!r}: more than one workflow has an approval step {name!r}; write "
            f"it as workflow.step ({known})"
        )
    if matches:
        return matches[0]
    raise PlaybookError(
        f"scenario {label!r}: {name!r} is not an approval step of the playbook's workflows "
        f"(approval steps: {known})"
    )


def _gate_step(gates: list[_Gate], name: str, source: str) -> Step:
    """The gate's step with ``approve_when`` replaced, validated as a playbook step would be."""
    gate = next(g for g in gates if g.name == name)
    if source == gate.step.approve_when:
        return gate.step
    try:
        step = Step.model_validate({**gate.step.model_dump(), "approve_when": source})
    except ValidationError as exc:
        raise PlaybookError(f"approval step {name!r}: {_first_error(exc)}") from None
    return step


def _first_error(exc: ValidationError) -> str:
    message = str(exc.errors()[0]["msg"])
    return message.removeprefix("Value error, ")


def _check_gate_reads(gate: _Gate, step: Step, *, assumed: Mapping[str, str], label: str) -> None:
    """Refuse a gate condition (or value column) that reads a later step, or an output no
    assumption gives: in a backtest no step runs, so the output would not exist."""
    where = f"approval step {gate.name!r}"
    if label != AS_WRITTEN:
        where = f"scenario {label!r}: {where}"
    earlier = set(gate.steps[: gate.index])
    reads = set(parse_expression(str(step.approve_when), rule=f"{gate.name}.approve_when").columns)
    value = step.value_column
    if value is not None:
        reads.add(value)
    for column in sorted(c for c in reads if "." in c):
        step_name = column.split(".", 1)[0]
        if step_name not in earlier:
            where_it_is = (
                "comes later"
                if step_name in gate.steps
                else f"is not a step of workflow {gate.workflow!r}"
            )
            raise PlaybookError(
                f"{where}: {step.approve_when!r} reads {column!r}, the output of step "
                f"{step_name!r}, which {where_it_is}; a gate may read only steps before it"
            )
        if column not in assumed:
            raise PlaybookError(
                f"{where} reads {column!r}, an output of step {step_name!r}, which does not run "
                f"in a backtest; say what it would be with assume={{{column!r}: '<expression "
                f"over insight columns>'}} (command line: --assume '{column}=EXPR')"
            )


# -- replay ---------------------------------------------------------------------------------


def _replay_partition(
    playbook: Playbook,
    *,
    partition: str,
    insight: pd.DataFrame,
    gates: list[_Gate],
    assumed: Mapping[str, str],
    replayed: Mapping[str, Mapping[str, Step]],
    blocked: dict[str, str],
    notes: dict[str, None],
) -> list[dict[str, Any]]:
    """One row per scenario for one partition."""
    try:
        plan = route(insight, playbook, partition_key=partition)
    except (InsightValidationError, PlaybookError) as exc:
        raise type(exc)(f"partition {partition!r}: {exc}") from None
    decision = plan["decision"].astype(str).to_numpy()
    total = len(plan)
    flagged = int((decision != "skip").sum())
    actions = int((decision == "act").sum())
    base: dict[str, Any] = {
        "partition": partition,
        "total": total,
        "flagged": flagged,
        "actions": actions,
        "held_out": int((decision == "holdout").sum()),
        "skipped": int((decision == "skip").sum()),
        "workflows": int((decision == "workflow").sum()),
        "blocked": False,
    }
    reason = guardrail_violation(playbook, total=total, flagged=flagged, actions=actions)
    if reason is not None:
        # As execute_plan: nothing is recorded or sent, the whole batch is one escalation.
        blocked[partition] = reason
        outcome = {
            **base,
            "actions": 0,
            "autonomous": 0,
            "escalated": flagged,
            "held_out": 0,
            "workflows": 0,
            "approvals_needed": 0,
            "approvals_value": 0.0,
            "autonomy_rate": _rate(0, flagged),
            "blocked": True,
        }
        return [{**outcome, "scenario": label} for label in replayed]

    rule_escalations = int((decision == "escalate").sum())
    starts = {rule.name: rule.workflow for rule in playbook.rules if rule.workflow is not None}
    rules = plan["rule"].astype(str).to_numpy()
    # What a workflow instance holds: the entity's insight columns (see recording.entity_data).
    data_columns = [c for c in plan.columns if c not in PLAN_COLUMNS or c == "entity_id"]
    instances: dict[str, pd.DataFrame] = {}
    for name in _started(playbook):
        members = (decision == "workflow") & np.isin(
            rules, [r for r, w in starts.items() if w == name]
        )
        if members.any():
            frame = plan.loc[members, data_columns].reset_index(drop=True)
            instances[name] = _with_assumptions(frame, assumed, partition=partition)
    out = []
    for label, steps in replayed.items():
        autonomous = actions
        escalated = rule_escalations
        requests = 0
        value = 0.0
        for name, frame in instances.items():
            walk = _walk(
                playbook.workflows[name],
                name=name,
                frame=frame,
                gates={g.index: steps[g.name] for g in gates if g.workflow == name},
                assumed=assumed,
                partition=partition,
                label=label,
                notes=notes,
            )
            autonomous += walk.autonomous
            escalated += walk.failed
            requests += walk.requests
            value += walk.value
        out.append(
            {
                **base,
                "scenario": label,
                "autonomous": autonomous,
                "escalated": escalated,
                "approvals_needed": requests,
                "approvals_value": value,
                "autonomy_rate": _rate(autonomous, flagged - base["held_out"]),
            }
        )
    return out


def _rate(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def _with_assumptions(
    frame: pd.DataFrame, assumed: Mapping[str, str], *, partition: str
) -> pd.DataFrame:
    """The instances' frame with a column per assumed step output."""
    if not assumed:
        return frame
    out = frame.copy()
    for column, source in assumed.items():
        result = _evaluate(
            frame, source, what=f"assume {column!r}", partition=partition, insight=frame
        )
        out[column] = result if isinstance(result, pd.Series) else np.full(len(frame), result)
    return out


def _evaluate(
    frame: pd.DataFrame, source: str, *, what: str, partition: str, insight: pd.DataFrame
) -> Any:
    missing = sorted(
        c for c in parse_expression(source, rule=what).columns if c not in insight.columns
    )
    if missing:
        raise InsightValidationError(
            f"partition {partition!r}: {what} reads column(s) {missing}, which the insight "
            f"lacks; it can read {sorted(map(str, insight.columns))}"
        )
    try:
        return frame.eval(source, engine="python")
    except Exception as exc:  # the user's expression over the user's data
        raise PlaybookError(
            f"partition {partition!r}: {what} failed to evaluate: {type(exc).__name__}: {exc}"
        ) from exc


def _truth(result: Any, n: int) -> np.ndarray:
    """A condition's result as one bool per row; null counts as false, as a run reads it."""
    if isinstance(result, pd.Series):
        return result.to_numpy(dtype=bool, na_value=False)
    return np.full(n, bool(result))


@dataclass
class _Walk:
    autonomous: int = 0
    failed: int = 0
    requests: int = 0
    value: float = 0.0


def _walk(
    workflow: Workflow,
    *,
    name: str,
    frame: pd.DataFrame,
    gates: Mapping[int, Step],
    assumed: Mapping[str, str],
    partition: str,
    label: str,
    notes: dict[str, None],
) -> _Walk:
    """Take every instance of one workflow through its steps, vectorised, running none."""
    n = len(frame)
    step_names = {s.name for s in workflow.steps}
    alive = np.ones(n, dtype=bool)  # not failed
    waits = np.zeros(n, dtype=bool)  # raised at least one approval request
    ran: dict[str, np.ndarray] = {}
    walk = _Walk()
    for index, original in enumerate(workflow.steps):
        step = gates.get(index, original)
        runs = alive.copy()
        if step.when is not None:
            known, unknown = _readable(
                step.when, frame=frame, ran=ran, assumed=assumed, step_names=step_names
            )
            if unknown:
                notes[
                    f"workflow {name!r}, step {step.name!r}: its 'when' reads "
                    f"{', '.join(unknown)}, which no assumption gives; counted as if it held for "
                    "every instance"
                ] = None
            else:
                alive &= known
                runs = alive.copy()
                holds = _condition(
                    frame,
                    step.when,
                    rows=runs,
                    what=f"step {name}.{step.name} 'when'",
                    partition=partition,
                )
                runs &= holds
        if step.kind == "approval":
            source = str(step.approve_when)
            known, _unknown = _readable(
                source, frame=frame, ran=ran, assumed=assumed, step_names=step_names
            )
            # A gate that reads the output of a step its 'when' skipped fails the instance.
            failing = runs & ~known
            alive &= ~failing
            runs &= known
            needs = runs & _condition(
                frame,
                source,
                rows=runs,
                what=f"scenario {label!r}: approval step {name}.{step.name}",
                partition=partition,
            )
            walk.requests += int(needs.sum())
            walk.value += _value(frame, step, rows=needs)
            waits |= needs
        ran[step.name] = runs
    walk.failed = int((~alive).sum())
    walk.autonomous = int((alive & ~waits).sum())
    return walk


def _readable(
    source: str,
    *,
    frame: pd.DataFrame,
    ran: Mapping[str, np.ndarray],
    assumed: Mapping[str, str],
    step_names: set[str],
) -> tuple[np.ndarray, list[str]]:
    """(the rows where every column the expression reads exists, the step outputs it reads that
    no assumption gives). An assumed output exists where its step ran."""
    known = np.ones(len(frame), dtype=bool)
    unknown: list[str] = []
    for column in sorted(parse_expression(source, rule="condition").columns):
        step_name = column.split(".", 1)[0]
        if column in frame.columns and column not in assumed:
            continue
        if "." in column and step_name in step_names:
            if column in assumed:
                known &= ran.get(step_name, np.zeros(len(frame), dtype=bool))
            else:
                unknown.append(repr(column))
    return known, unknown


def _condition(
    frame: pd.DataFrame, source: str, *, rows: np.ndarray, what: str, partition: str
) -> np.ndarray:
    """Where the condition holds, evaluated over ``rows`` only (false elsewhere)."""
    out = np.zeros(len(frame), dtype=bool)
    if not rows.any():
        return out
    subset = frame.loc[rows]
    result = _evaluate(subset, source, what=what, partition=partition, insight=frame)
    out[np.flatnonzero(rows)] = _truth(result, len(subset))
    return out


def _value(frame: pd.DataFrame, step: Step, *, rows: np.ndarray) -> float:
    """The requests' summed value; a value that is not a number counts as none, as a run records
    it (approval_gate._number)."""
    column = step.value_column
    if column is None or column not in frame.columns or not rows.any():
        return 0.0
    values = pd.to_numeric(frame.loc[rows, column], errors="coerce")
    return float(np.nansum(values.to_numpy(dtype=float)))
