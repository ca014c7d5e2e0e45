"""Routing: turn an insight DataFrame into a plan, one row per entity.

Pure and vectorised: no I/O, no per-entity Python except hashing. The plan keeps the input columns
(channels render templates from them) and adds the routing columns in :data:`PLAN_COLUMNS`.
"""

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from autoexec_dagster.errors import InsightValidationError, PlanError, PlaybookError
from autoexec_dagster.keys import SEP, idempotency_keys, key_label, workflow_label
from autoexec_dagster.playbook import Playbook, Rule

PLAN_COLUMNS: tuple[str, ...] = (
    "entity_id",
    "decision",
    "rule",
    "action",
    "reason",
    "idempotency_key",
)
DECISIONS: tuple[str, ...] = ("act", "escalate", "holdout", "skip", "workflow")
PLAN_ATTRS = "autoexec"
_NO_RULE = "(none)"


def _holdout_draw(entity_ids: Sequence[str], *, playbook: Playbook) -> np.ndarray:
    """A uniform number in [0, 1) per entity, stable for a playbook name and salt."""
    base = hashlib.blake2b(f"{playbook.name}{SEP}{playbook.holdout_salt}{SEP}".encode())
    out = np.empty(len(entity_ids), dtype=np.float64)
    for i, entity in enumerate(entity_ids):
        hasher = base.copy()
        hasher.update(entity.encode())
        out[i] = int.from_bytes(hasher.digest()[:8], "big") / 2.0**64
    return out


def validate_insight(insight: pd.DataFrame, playbook: Playbook) -> None:
    """Check that an insight can be routed by a playbook, without routing it.

    Raises:
        InsightValidationError: A required column is missing, entity ids are null or duplicated,
            or a column a rule treats as a number holds NaN or non-numeric values, or a score is
            outside its declared range. The message names the column and example entities.
    """
    if not isinstance(insight, pd.DataFrame):
        raise InsightValidationError(
            f"the insight must be a pandas DataFrame, got {type(insight).__name__}"
        )
    missing = sorted(playbook.input_columns() - set(insight.columns))
    if missing:
        steps = playbook.workflow_columns()
        users = {
            column: [f"rule {r.name}" for r in playbook.rules if column in r.read_columns()]
            + [f"step {s}" for s in steps.get(column, [])]
            for column in missing
        }
        detail = ", ".join(
            f"{c!r} (read by {', '.join(users[c])})" if users[c] else repr(c) for c in missing
        )
        raise InsightValidationError(
            f"playbook {playbook.name!r}: the insight lacks column(s) {detail}; "
            f"it has {sorted(map(str, insight.columns))}"
        )
    ids = insight[playbook.entity_key]
    id_text = ids.astype(str).to_numpy()
    null_ids = ids.isna().to_numpy()
    if null_ids.any():
        raise InsightValidationError(
            f"playbook {playbook.name!r}: {int(null_ids.sum())} row(s) have no "
            f"{playbook.entity_key!r} (entity ids must not be null)"
        )
    duplicated = ids.duplicated(keep=False).to_numpy()
    if duplicated.any():
        repeated = list(dict.fromkeys(id_text[duplicated].tolist()))
        raise InsightValidationError(
            f"playbook {playbook.name!r}: entity ids in {playbook.entity_key!r} must be unique; "
            f"{len(repeated)} id(s) repeat, e.g. {repeated[:5]}"
        )
    for column in sorted(playbook.numeric_columns()):
        values = insight[column]
        if not (pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)):
            raise InsightValidationError(
                f"playbook {playbook.name!r}: column {column!r} must be numeric (a rule compares "
                f"it with a number) but has dtype {values.dtype}"
            )
        nan = values.isna().to_numpy()
        if nan.any():
            raise InsightValidationError(
                f"playbook {playbook.name!r}: column {column!r} holds {int(nan.sum())} NaN "
                f"value(s), e.g. for {playbook.entity_key} {id_text[nan][:5].tolist()}"
            )
    for column, (low, high) in playbook.score_ranges.items():
        values = insight[column].to_numpy(dtype=float)
        outside = (values < low) | (values > high)
        if outside.any():
            raise InsightValidationError(
                f"playbook {playbook.name!r}: column {column!r} must lie in [{low}, {high}] but "
                f"{int(outside.sum())} value(s) do not, e.g. for {playbook.entity_key} "
                f"{id_text[outside][:5].tolist()}"
            )


def _rule_mask(insight: pd.DataFrame, playbook: Playbook, index: int) -> np.ndarray:
    rule = playbook.rules[index]
    try:
        if isinstance(rule.when, str):
            result: Any = insight.eval(rule.when, engine="python")
        else:
            result = rule.when(insight)
    except Exception as exc:  # the user's expression or callable; re-raised with its rule name
        raise PlaybookError(f"rule {rule.name!r} failed to evaluate: {exc}") from exc
    if isinstance(result, pd.Series):
        if not pd.api.types.is_bool_dtype(result):
            raise PlaybookError(
                f"rule {rule.name!r} must produce true/false per entity, got dtype {result.dtype}"
            )
        return result.to_numpy(dtype=bool, na_value=False)
    if isinstance(result, bool | np.bool_):
        return np.full(len(insight), bool(result))
    raise PlaybookError(
        f"rule {rule.name!r} must produce a boolean Series, got {type(result).__name__}"
    )


def route(
    insight: pd.DataFrame,
    playbook: Playbook,
    *,
    partition_key: str | None = None,
    insight_name: str | None = None,
) -> pd.DataFrame:
    """Decide, for every entity of an insight, what the playbook does with it.

    Args:
        insight: Model output, one row per entity.
        playbook: The playbook to apply.
        partition_key: The insight partition; part of every idempotency key. May be left out
            here and given to :func:`execute_plan` instead, which then re-keys the plan.
        insight_name: Insight asset key; defaults to the playbook name.

    Returns:
        A DataFrame with one row per entity: the input columns plus ``entity_id``, ``decision``
        (act, escalate, holdout or skip), ``rule``, ``action``, ``reason`` and
        ``idempotency_key``. ``plan.attrs["autoexec"]`` records how the keys were derived.

    Raises:
        InsightValidationError: The insight cannot be routed (see :func:`validate_insight`).
        PlaybookError: A rule fails to evaluate.
    """
    validate_insight(insight, playbook)
    n = len(insight)
    winner = np.full(n, -1, dtype=np.int16)
    frame = insight.reset_index(drop=True)
    for index in range(len(playbook.rules)):
        mask = _rule_mask(frame, playbook, index)
        winner[(winner == -1) & mask] = index

    rules = playbook.rules
    none = len(rules)
    pick = np.where(winner < 0, none, winner).astype(np.int16)
    entity_ids: list[str] = frame[playbook.entity_key].astype(str).tolist()

    decision_codes = np.array(
        [DECISIONS.index(r.decision) for r in rules] + [DECISIONS.index("skip")], dtype=np.int8
    )[pick]
    reasons = [r.explanation() for r in rules] + ["no rule matched"]
    reason_codes = pick.astype(np.int32)
    fraction = playbook.guardrails.holdout_fraction
    if fraction > 0:
        acting = np.flatnonzero(decision_codes == DECISIONS.index("act"))
        draws = _holdout_draw([entity_ids[i] for i in acting], playbook=playbook)
        held = acting[draws < fraction]
        decision_codes[held] = DECISIONS.index("holdout")
        reasons.append(f"holdout: control group ({fraction:.1%} of actions)")
        reason_codes[held] = len(reasons) - 1

    labels = [_rule_label(r) for r in rules] + [key_label(None, "skip", _NO_RULE)]
    plan = frame.copy()
    # Categoricals built from codes keep 1M-row plans small and fast to build.
    plan["entity_id"] = entity_ids
    plan["decision"] = pd.Categorical.from_codes(decision_codes, categories=pd.Index(DECISIONS))
    plan["rule"] = pd.Categorical.from_codes(
        pick, categories=pd.Index([r.name for r in rules] + [_NO_RULE])
    )
    action_names = list(dict.fromkeys(r.action for r in rules if r.action is not None))
    action_codes = np.array(
        [action_names.index(r.action) if r.action is not None else -1 for r in rules] + [-1],
        dtype=np.int16,
    )[pick]
    plan["action"] = pd.Categorical.from_codes(
        action_codes, categories=pd.Index(action_names, dtype=object)
    )
    unique_reasons = list(dict.fromkeys(reasons))
    reason_remap = np.array([unique_reasons.index(r) for r in reasons], dtype=np.int32)
    plan["reason"] = pd.Categorical.from_codes(
        reason_remap[reason_codes], categories=pd.Index(unique_reasons)
    )
    label_array = np.array(labels, dtype=object)[pick]
    plan["idempotency_key"] = idempotency_keys(
        insight=insight_name or playbook.name,
        partition_key=partition_key or "",
        actions=label_array.tolist(),
        entity_ids=entity_ids,
    )
    plan.attrs[PLAN_ATTRS] = {
        "playbook": playbook.name,
        "playbook_version": playbook.effective_version,
        "partition_key": partition_key,
        "insight": insight_name or playbook.name,
    }
    return plan


def _rule_label(rule: Rule) -> str:
    """The action part of the keys a rule's decisions get (a workflow's is its instance id)."""
    if rule.workflow is not None:
        return workflow_label(rule.workflow)
    if rule.escalate is not None:
        # The case is the escalation, whatever action it proposes: adding or changing a
        # proposed action must not re-open every case under a new key.
        return key_label(None, "escalate", rule.name)
    return key_label(rule.action, rule.decision, rule.name)


def _key_actions(plan: pd.DataFrame, playbook: Playbook) -> list[str]:
    action = plan["action"].astype(object)
    fallback = plan["decision"].astype(str) + ":" + plan["rule"].astype(str)
    escalations = plan["decision"].astype(str) == "escalate"
    labels = action.where(action.notna() & ~escalations, fallback).astype(str)
    starts = {r.name: workflow_label(r.workflow) for r in playbook.rules if r.workflow}
    if starts:
        workflow_rows = plan["decision"].astype(str) == "workflow"
        labels = labels.where(~workflow_rows, plan["rule"].astype(str).map(starts))
    return labels.tolist()


def rekey(
    plan: pd.DataFrame, *, playbook: Playbook, partition_key: str, insight_name: str | None = None
) -> pd.DataFrame:
    """Return the plan keyed for a partition, checking it was routed by this playbook.

    Raises:
        PlanError: The plan is missing routing columns, has lost its provenance, was routed by
            another playbook or version, or for another partition.
    """
    missing = [c for c in PLAN_COLUMNS if c not in plan.columns]
    if missing:
        raise PlanError(
            f"the plan lacks routing column(s) {missing}; build it with autoexec_dagster.route()"
        )
    attrs = plan.attrs.get(PLAN_ATTRS)
    if (
        not isinstance(attrs, dict)
        or not attrs.get("playbook")
        or not attrs.get("playbook_version")
    ):
        # pandas keeps DataFrame.attrs through some operations and drops it through others
        # (CSV or parquet round trips, frames rebuilt from columns). Without provenance nothing
        # proves which playbook and version chose these actions, so nothing is executed.
        raise PlanError(
            "the plan has lost its provenance (DataFrame.attrs['autoexec'], which pandas drops "
            "on file round trips and when a frame is rebuilt); route the insight again with "
            "autoexec_dagster.route() and execute that plan"
        )
    version = playbook.effective_version
    if attrs["playbook"] != playbook.name:
        raise PlanError(
            f"the plan was routed by playbook {attrs['playbook']!r}, not {playbook.name!r}"
        )
    if attrs["playbook_version"] != version:
        raise PlanError(
            f"the plan was routed by version {attrs['playbook_version']!r} of playbook "
            f"{playbook.name!r}, which is now at {version!r}; route the insight again"
        )
    routed_for = attrs.get("partition_key")
    if routed_for not in (None, "", partition_key):
        raise PlanError(
            f"the plan was routed for partition {routed_for!r} but is executed as {partition_key!r}"
        )
    insight = insight_name or attrs.get("insight") or playbook.name
    unknown = set(plan["decision"].astype(str).unique()) - set(DECISIONS)
    if unknown:
        raise PlanError(f"the plan holds unknown decision(s) {sorted(unknown)}")
    if attrs.get("partition_key") == partition_key and attrs.get("insight") == insight:
        # Keyed by route() for exactly this partition: recomputing would copy a million-row plan
        # to produce the same keys.
        return plan
    keyed = plan.copy()
    keyed["idempotency_key"] = idempotency_keys(
        insight=insight,
        partition_key=partition_key,
        actions=_key_actions(plan, playbook),
        entity_ids=plan["entity_id"].astype(str).tolist(),
    )
    keyed.attrs[PLAN_ATTRS] = {
        "playbook": playbook.name,
        "playbook_version": version,
        "partition_key": partition_key,
        "insight": insight,
    }
    return keyed
