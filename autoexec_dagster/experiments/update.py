"""``update_experiment``: read the outcomes, judge the variants, move the traffic, promote.

One update per period (an outcome partition):

1. The outcomes are checked (metric present and numeric, one row per entity and time) and stored
   in the ledger; rows stored before add nothing, so a re-run of a period counts nothing twice.
2. Every exposure of the experiment is joined to the stored outcomes within the window
   (:mod:`~autoexec_dagster.experiments.analysis`).
3. A live variant above a guardrail's rate (with ``min_samples_per_variant`` entities) is
   stopped for harm; its entities are sent the control from then on.
4. The stopping rule (:mod:`~autoexec_dagster.experiments.stopping`) promotes a variant only
   after ``min_days`` and ``min_samples_per_variant``, when it meets ``promote_when`` and an
   always-valid test shows it ahead of every other live variant. With ``promotion_approvers`` a
   promotion first waits for one of them to approve it.
5. The weights of the next period are recomputed (top-two Thompson sampling with a floor, or
   the fixed weights); after a promotion the winner takes all traffic outside the holdout.

Everything is written in one transaction with its evidence, guarded by the experiment's revision,
so two concurrent updates cannot both apply.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from autoexec_dagster.errors import ExperimentError
from autoexec_dagster.experiments.analysis import (
    SRM_ALPHA,
    VARIANT_COLUMNS,
    ExperimentAnalysis,
    analyse_experiment,
)
from autoexec_dagster.experiments.experiment import Experiment
from autoexec_dagster.experiments.outcomes import check_outcomes, to_long
from autoexec_dagster.experiments.promotion_approval import (
    promotion_approval_id,
    promotion_decision,
    request_promotion,
)
from autoexec_dagster.experiments.statistics import top_two_weights, top_two_weights_gaussian
from autoexec_dagster.experiments.stopping import ArmSummary, stopping_decision
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.experiment_store import ExperimentState, ExperimentUpdate
from autoexec_dagster.ledger.schema import (
    APPROVED,
    ARCHIVED,
    AWAITING_APPROVAL,
    EXPIRED,
    HOLDOUT,
    LIVE,
    PENDING,
    PROMOTED,
    REJECTED,
    RUNNING_EXPERIMENT,
    STOPPED,
)
from autoexec_dagster.playbook import Playbook, Rule

_ATTEMPTS = 5
# A decision this early may ride on people reacting to anything new.
_NOVELTY_DAYS = 7.0


@dataclass(frozen=True)
class ExperimentResult:
    """The state and figures of an experiment after an update.

    Attributes:
        playbook: The playbook.
        experiment: The experiment's name.
        action: The action it varies.
        metric: The metric it is judged by.
        binary: Whether the metric is 0/1.
        status: ``running``, ``awaiting_approval``, ``promoted`` or ``stopped``.
        winner: The promoted variant, if any.
        srm_p_value: Sample-ratio-mismatch p-value against each period's weights.
        variants: One row per variant: n, conversions, rate, ci_low, ci_high, probability_best,
            expected_loss, lift_vs_control (relative, with _low/_high), lift_vs_holdout (relative,
            with _low/_high), weight (next period), status, and ``<guardrail>_rate`` columns.
        weights: The weights in force from the next period on.
        weights_reason: Why.
        decision: What this update decided and why, in words.
        promoted_now: Whether this update promoted the winner.
        holdout_n: Entities of the holdout.
        holdout_rate: The holdout's mean of the metric.
        outcomes_added: Outcome rows this update stored (rows seen before are not counted).
        outcomes_before_exposure: Outcomes ignored because they came before the entity's action.
        open_windows: Share of entities whose outcome window is still open.
        caveats: What to keep in mind reading the figures (SRM, novelty, too few outcomes).
        started_at: When the experiment started.
        decided_at: When it was decided, if it was.
        as_of: The time of this update (the ledger's clock).
        events: The ledger's record of the experiment's decisions, oldest first.
        control: The control variant.
    """

    playbook: str
    experiment: str
    action: str
    metric: str
    binary: bool
    status: str
    winner: str | None
    srm_p_value: float
    variants: pd.DataFrame
    weights: dict[str, float]
    weights_reason: str
    decision: str
    promoted_now: bool
    holdout_n: int
    holdout_rate: float
    outcomes_added: int
    outcomes_before_exposure: int
    open_windows: float
    caveats: list[str]
    started_at: datetime
    decided_at: datetime | None
    as_of: datetime
    control: str
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def days_elapsed(self) -> float:
        """Days from the start to this update."""
        return (self.as_of - self.started_at).total_seconds() / 86_400

    def learnings_markdown(self) -> str:
        """The learnings: the question, the variants, the decision, the effect, what was
        archived and why, and the caveats, as Markdown."""
        from autoexec_dagster.experiments.learnings import learnings_markdown

        return learnings_markdown(self)


def pick_experiment(playbook: Playbook, name: str | None) -> tuple[Rule, Experiment]:
    """The experiment called ``name``, or the playbook's only one.

    Raises:
        ExperimentError: The playbook runs no experiment, none of that name, or several and no
            name was given.
    """
    found = playbook.experiments()
    if not found:
        raise ExperimentError(f"playbook {playbook.name!r} runs no experiment")
    if name is None:
        if len(found) > 1:
            raise ExperimentError(
                f"playbook {playbook.name!r} runs {len(found)} experiments ({sorted(found)}); "
                "name one with experiment="
            )
        return next(iter(found.values()))
    if name not in found:
        raise ExperimentError(
            f"playbook {playbook.name!r} has no experiment {name!r}; it runs {sorted(found)}"
        )
    return found[name]


def stored_metrics(playbook: Playbook) -> list[str]:
    """Every outcome column the playbook's experiments and its outcome metric read."""
    columns: list[str] = []
    for _rule, experiment in playbook.experiments().values():
        columns.extend(experiment.outcome_columns())
    if playbook.outcome is not None:
        columns.append(playbook.outcome.metric)
    return list(dict.fromkeys(columns))


def record_outcomes(*, playbook: Playbook, ledger: ActionLedger, outcomes: pd.DataFrame) -> int:
    """Check the outcome table and store it in the ledger; returns the rows that were new.

    Raises:
        ExperimentError: A metric is missing or not numeric, or rows repeat on (entity, time).
    """
    metrics = stored_metrics(playbook)
    if not metrics:
        raise ExperimentError(
            f"playbook {playbook.name!r} measures no outcome: give it an experiment or outcome="
        )
    frame = check_outcomes(
        outcomes,
        entity_key=playbook.entity_key,
        metrics=metrics,
        what=f"playbook {playbook.name!r}",
    )
    return ledger.store_outcomes(playbook.name, to_long(frame, metrics))


def _first_exposures(exposures: pd.DataFrame) -> pd.DataFrame:
    ordered = exposures.sort_values("exposed_at", kind="stable")
    return ordered.drop_duplicates("entity_id", keep="first")


def update_experiment(
    *,
    playbook: Playbook,
    ledger: ActionLedger,
    outcomes: pd.DataFrame | None = None,
    experiment: str | None = None,
    now: datetime | None = None,
) -> ExperimentResult:
    """Store new outcomes, analyse the experiment, and decide: weights, guardrails, promotion.

    Args:
        playbook: The playbook whose rule runs the experiment.
        ledger: The action ledger (it holds the assignments, exposures and outcomes).
        outcomes: New outcome rows: the playbook's entity key (or ``entity_id``), ``occurred_at``
            and the metric and guardrail columns. None analyses what is stored.
        experiment: The experiment's name; needed only when the playbook runs several.
        now: The time of the update; defaults to the ledger's clock.

    Returns:
        The :class:`ExperimentResult`.

    Raises:
        ExperimentError: Bad outcomes (see :func:`store_outcomes`), an unknown experiment, or
            the experiment's variants changed under the same name. Nothing is written then.
    """
    rule, spec = pick_experiment(playbook, experiment)
    assert rule.action is not None  # a rule with an experiment has an action (Rule validates)
    frame = None
    if outcomes is not None:
        metrics = stored_metrics(playbook)
        frame = check_outcomes(
            outcomes,
            entity_key=playbook.entity_key,
            metrics=metrics,
            what=f"playbook {playbook.name!r}",
        )
    ledger.start_experiment(
        playbook=playbook.name, experiment=spec, rule=rule.name, action=rule.action
    )
    added = (
        ledger.store_outcomes(playbook.name, to_long(frame, stored_metrics(playbook)))
        if (frame is not None)
        else 0
    )
    for _attempt in range(_ATTEMPTS):
        state = ledger.experiment_state(playbook.name, spec.name)
        assert state is not None
        as_of = now or ledger.clock()
        analysis = _analyse(playbook, ledger, spec, as_of)
        update, decision, promoted_now, ask = _decide(
            spec, state, analysis, as_of, _approvals(playbook, ledger, spec, state, as_of)
        )
        if ask is not None:
            # Asked before the state says so: a crash in between leaves a request that the
            # next update finds (same id), never a state awaiting a request that does not exist.
            request_promotion(
                ledger,
                playbook=playbook.name,
                playbook_version=playbook.effective_version,
                experiment=spec,
                rule=rule.name,
                winner=ask,
                evidence=_figures_text(analysis, ask),
                now=as_of,
            )
        if update is None or ledger.save_experiment_update(
            playbook=playbook.name, experiment=spec.name, revision=state.revision, update=update
        ):
            final = ledger.experiment_state(playbook.name, spec.name)
            assert final is not None
            return _result(
                playbook,
                spec,
                final,
                analysis,
                decision,
                promoted_now,
                added=added,
                as_of=as_of,
                events=ledger.experiment_events(playbook.name, spec.name),
            )
    raise ExperimentError(
        f"experiment {spec.name!r} was updated concurrently {_ATTEMPTS} times in a row; run the "
        "update again"
    )


def _analyse(
    playbook: Playbook, ledger: ActionLedger, spec: Experiment, as_of: datetime
) -> ExperimentAnalysis:
    exposures = ledger.exposures_frame(playbook.name, experiment=spec.name)
    in_test = exposures[exposures["arm"].isin(list(spec.variants))]
    units = _first_exposures(in_test).rename(columns={"arm": "variant"})
    held = _first_exposures(exposures[exposures["arm"] == HOLDOUT])
    outcomes = ledger.outcomes_frame(playbook.name, spec.outcome_columns())
    return analyse_experiment(
        spec,
        units=units[["entity_id", "variant", "exposed_at"]],
        outcomes=outcomes,
        holdout_units=held[["entity_id", "exposed_at"]],
        assignments=ledger.assignments_frame(playbook.name, spec.name),
        period_weights=ledger.period_weights(playbook.name, spec.name),
        as_of=pd.Timestamp(as_of),
    )


def _approvals(
    playbook: Playbook,
    ledger: ActionLedger,
    spec: Experiment,
    state: ExperimentState,
    as_of: datetime,
) -> "_Approvals":
    if not spec.promotion_approvers:
        return _Approvals()
    awaited = None
    if state.status == AWAITING_APPROVAL and state.approval_id:
        awaited = promotion_decision(ledger, state.approval_id, now=as_of)
        rows = ledger.approval_rows([state.approval_id])
        awaited["winner"] = rows[state.approval_id]["entity_id"] if rows else ""
    refused = set()
    ids = {
        promotion_approval_id(playbook=playbook.name, experiment=spec.name, winner=v): v
        for v in spec.variants
    }
    for approval_id, row in ledger.approval_rows(list(ids)).items():
        if row["status"] in (REJECTED, EXPIRED):
            refused.add(ids[approval_id])
    return _Approvals(awaited=awaited, refused=frozenset(refused))


def _figures_text(analysis: ExperimentAnalysis, variant: str) -> dict[str, Any]:
    row = analysis.variants.set_index("variant").loc[variant]
    return {
        str(k): (None if isinstance(v, float) and math.isnan(v) else v)
        for k, v in row.to_dict().items()
    }


@dataclass(frozen=True)
class _Approvals:
    """What the promotion approvals say: the awaited request's decision, and earlier requests."""

    awaited: Mapping[str, Any] | None = None
    refused: frozenset[str] = frozenset()


def _decide(
    spec: Experiment,
    state: ExperimentState,
    analysis: ExperimentAnalysis,
    as_of: datetime,
    approvals: _Approvals = _Approvals(),
) -> tuple[ExperimentUpdate | None, str, bool, str | None]:
    """The update to write (None when the experiment is already decided), in words, whether it
    promotes now, and the winner to ask the promotion approvers about (None: nobody to ask)."""
    if not state.active:
        return (
            None,
            f"already {state.status}" + (f": {state.winner}" if state.winner else ""),
            False,
            None,
        )
    statuses = dict(state.variant_status)
    events: list[dict[str, Any]] = []
    for guard, limit in spec.guardrails.items():
        for variant, rate in analysis.guardrail_rates.get(guard, {}).items():
            arm = analysis.arms[variant]
            if (
                statuses.get(variant) == LIVE
                and arm.n >= spec.min_samples_per_variant
                and math.isfinite(rate)
                and rate > limit
            ):
                statuses[variant] = STOPPED
                events.append(
                    {
                        "kind": "stopped",
                        "variant": variant,
                        "detail": f"{variant} stopped for harm: {guard} rate {rate:.2%} is above "
                        f"the guardrail {limit:.2%} over {arm.n:,} entities",
                        "evidence": _figures_text(analysis, variant),
                    }
                )
    live = [v for v in spec.variants if statuses.get(v) == LIVE]
    if not live:
        return (
            ExperimentUpdate(
                weights=dict.fromkeys(spec.variants, 0.0),
                weights_reason="every variant crossed a guardrail",
                status=STOPPED,
                winner=None,
                variant_status=statuses,
                events=[
                    *events,
                    {
                        "kind": "stopped",
                        "variant": None,
                        "detail": "experiment stopped: every variant crossed a guardrail",
                    },
                ],
            ),
            "stopped: every variant crossed a guardrail",
            False,
            None,
        )
    days = (as_of - state.started_at).total_seconds() / 86_400
    arms = [
        ArmSummary(
            name=v,
            n=analysis.arms[v].n,
            mean=analysis.arms[v].mean if analysis.arms[v].n else 0.0,
            variance=analysis.arms[v].variance if analysis.arms[v].n > 1 else 0.0,
        )
        for v in spec.variants
    ]
    verdict = stopping_decision(
        arms,
        control=spec.control,
        live=live,
        days_elapsed=days,
        min_days=spec.min_days,
        min_samples=spec.min_samples_per_variant,
        probability_best=spec.promote_when.probability_best,
        expected_loss=spec.promote_when.expected_loss,
        binary=analysis.binary,
        confidence=spec.confidence,
    )
    if analysis.srm_p_value < SRM_ALPHA and verdict.promote is not None:
        verdict_text = (
            f"{verdict.reason}; not promoted: sample ratio mismatch (p = "
            f"{analysis.srm_p_value:.2g}), the assignment does not follow the design"
        )
        winner = None
    else:
        verdict_text = verdict.reason
        winner = verdict.promote
    status = RUNNING_EXPERIMENT
    approval_id: str | None = None
    approved_by = ""
    awaited = approvals.awaited
    if state.status == AWAITING_APPROVAL and awaited is not None:
        proposed = str(awaited["winner"])
        if awaited["status"] == APPROVED:
            winner, approved_by = proposed, str(awaited.get("decided_by") or "")
            verdict_text = f"approved by {approved_by}" + (
                f" ({awaited['note']})" if awaited.get("note") else ""
            )
        elif awaited["status"] == PENDING:
            winner, status, approval_id = None, AWAITING_APPROVAL, state.approval_id
            verdict_text = (
                f"waiting for {' or '.join(spec.promotion_approvers)} to approve promoting "
                f"{proposed} (autoexec approvals --playbook {state.playbook}); {verdict_text}"
            )
        else:
            how = "expired" if awaited["status"] == EXPIRED else "rejected"
            by = f" by {awaited['decided_by']}" if awaited.get("decided_by") else ""
            events.append(
                {
                    "kind": f"promotion_{how}",
                    "variant": proposed,
                    "detail": f"promoting {proposed} was {how}{by}"
                    + (f": {awaited['note']}" if awaited.get("note") else "")
                    + "; the experiment goes on",
                    "evidence": _figures_text(analysis, proposed),
                }
            )
            winner = None
            verdict_text = f"promoting {proposed} was {how}{by}; {verdict_text}"
    elif winner is not None and spec.promotion_approvers:
        if winner in approvals.refused:
            verdict_text = (
                f"{verdict_text}; promoting {winner} was refused before, so it is not proposed "
                "again"
            )
            winner = None
        else:
            proposed = winner
            weights, reason = _next_weights(spec, analysis, live)
            events.append(
                {
                    "kind": "approval_requested",
                    "variant": proposed,
                    "detail": f"promoting {proposed} asked of "
                    f"{', '.join(spec.promotion_approvers)}: {verdict.reason}",
                    "evidence": _figures_text(analysis, proposed),
                }
            )
            return (
                ExperimentUpdate(
                    weights=weights,
                    weights_reason=reason,
                    status=AWAITING_APPROVAL,
                    winner=None,
                    variant_status=statuses,
                    events=events,
                    approval_id=promotion_approval_id(
                        playbook=state.playbook, experiment=spec.name, winner=proposed
                    ),
                ),
                f"awaiting approval: promote {proposed}? {verdict.reason}",
                False,
                proposed,
            )
    if winner is not None:
        for variant in spec.variants:
            if variant == winner:
                statuses[variant] = PROMOTED
            elif statuses.get(variant) == LIVE:
                statuses[variant] = ARCHIVED
                events.append(
                    {
                        "kind": "archived",
                        "variant": variant,
                        "detail": f"{variant} archived: {winner} was promoted over it",
                        "evidence": _figures_text(analysis, variant),
                    }
                )
        events.insert(
            0,
            {
                "kind": "promoted",
                "variant": winner,
                "detail": f"{winner} promoted after {days:.1f} days: {verdict_text}",
                "evidence": {
                    **_figures_text(analysis, winner),
                    "srm_p_value": analysis.srm_p_value,
                    "days": days,
                },
            },
        )
        weights = {v: 1.0 if v == winner else 0.0 for v in spec.variants}
        return (
            ExperimentUpdate(
                weights=weights,
                weights_reason=f"{winner} promoted: all traffic outside the holdout",
                status=PROMOTED,
                winner=winner,
                variant_status=statuses,
                events=events,
            ),
            f"promoted {winner}: {verdict_text}",
            True,
            None,
        )
    weights, reason = _next_weights(spec, analysis, live)
    events.append(
        {
            "kind": "weights",
            "variant": None,
            "detail": reason,
            "evidence": {"weights": weights, "decision": verdict_text},
        }
    )
    return (
        ExperimentUpdate(
            weights=weights,
            weights_reason=reason,
            status=status,
            winner=None,
            variant_status=statuses,
            events=events,
            approval_id=approval_id,
        ),
        f"{'awaiting approval' if status == AWAITING_APPROVAL else 'running'}: {verdict_text}",
        False,
        None,
    )


def _next_weights(
    spec: Experiment, analysis: ExperimentAnalysis, live: list[str]
) -> tuple[dict[str, float], str]:
    names = list(spec.variants)
    mask = np.array([v in live for v in names])
    if spec.allocation == "fixed":
        base = spec.initial_weights()
        total = sum(base[v] for v in live)
        weights = {v: (base[v] / total if v in live and total > 0 else 0.0) for v in names}
        return weights, "fixed weights" + (
            "" if len(live) == len(names) else f" over the live variants {live}"
        )
    n = np.array([analysis.arms[v].n for v in names], dtype=float)
    if analysis.binary:
        values, reason = top_two_weights(
            np.array([analysis.arms[v].total for v in names], dtype=float),
            n,
            live=mask,
            min_samples=spec.min_samples_per_variant,
            beta=spec.top_two_beta,
            floor=spec.floor,
            names=names,
        )
    else:
        means = np.array([analysis.arms[v].mean if analysis.arms[v].n else 0.0 for v in names])
        var = np.array(
            [
                analysis.arms[v].variance / analysis.arms[v].n
                if analysis.arms[v].n > 1 and math.isfinite(analysis.arms[v].variance)
                else 1e12
                for v in names
            ]
        )
        values, reason = top_two_weights_gaussian(
            means,
            var,
            n,
            live=mask,
            min_samples=spec.min_samples_per_variant,
            beta=spec.top_two_beta,
            floor=spec.floor,
            names=names,
        )
    return {v: float(w) for v, w in zip(names, values, strict=True)}, reason


def _caveats(
    spec: Experiment, state: ExperimentState, analysis: ExperimentAnalysis, as_of: datetime
) -> list[str]:
    out = []
    if analysis.srm_p_value < SRM_ALPHA:
        out.append(
            f"Sample ratio mismatch: the assignments do not match the weights of their periods "
            f"(chi-square p = {analysis.srm_p_value:.2g}). Find the cause (a variant failing to "
            "send, a filter after assignment) before trusting any figure."
        )
    short = [v for v, a in analysis.arms.items() if a.n < spec.min_samples_per_variant]
    if short:
        out.append(
            f"Too few outcomes: {', '.join(short)} below {spec.min_samples_per_variant} entities."
        )
    if analysis.open_windows > 0:
        out.append(
            f"{analysis.open_windows:.0%} of entities are still inside their {spec.window} "
            "outcome window: their outcomes may still come, so rates can rise."
        )
    decided = state.decided_at or (as_of if state.winner else None)
    if decided is not None:
        days = (decided - state.started_at).total_seconds() / 86_400
        if days < _NOVELTY_DAYS:
            out.append(
                f"Decided after {days:.1f} days: a novelty effect (people react to anything new) "
                "may fade; keep watching the uplift against the holdout."
            )
    if analysis.outcomes_before_exposure:
        out.append(
            f"{analysis.outcomes_before_exposure:,} outcome row(s) came before the entity's "
            "action and were ignored."
        )
    if analysis.holdout is None:
        out.append("No holdout: the effect of the action itself (against no action) is unknown.")
    return out


def _result(
    playbook: Playbook,
    spec: Experiment,
    state: ExperimentState,
    analysis: ExperimentAnalysis,
    decision: str,
    promoted_now: bool,
    *,
    added: int,
    as_of: datetime,
    events: list[dict[str, Any]],
) -> ExperimentResult:
    variants = analysis.variants.copy()
    variants["weight"] = variants["variant"].map(state.weights).fillna(0.0)
    variants["status"] = variants["variant"].map(state.variant_status).fillna(LIVE)
    ordered = [c for c in VARIANT_COLUMNS if c in variants.columns]
    variants = variants[ordered + [c for c in variants.columns if c not in ordered]]
    held = analysis.holdout
    return ExperimentResult(
        playbook=playbook.name,
        experiment=spec.name,
        action=state.action,
        metric=spec.metric,
        binary=analysis.binary,
        status=state.status,
        winner=state.winner,
        srm_p_value=analysis.srm_p_value,
        variants=variants,
        weights=dict(state.weights),
        weights_reason=state.weights_reason or "",
        decision=decision,
        promoted_now=promoted_now,
        holdout_n=held.n if held is not None else 0,
        holdout_rate=held.mean if held is not None else math.nan,
        outcomes_added=added,
        outcomes_before_exposure=analysis.outcomes_before_exposure,
        open_windows=analysis.open_windows,
        caveats=_caveats(spec, state, analysis, as_of),
        started_at=state.started_at,
        decided_at=state.decided_at,
        as_of=as_of,
        control=spec.control,
        events=events,
    )
