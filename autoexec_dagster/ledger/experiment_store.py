"""Experiments in the ledger: their state, sticky assignments, exposures and outcomes.

- An experiment's row holds the weights in force, each variant's status and the decision; it is
  created the first time a plan reaches the experiment's rule and updated, guarded by its revision,
  by :func:`~autoexec_dagster.update_experiment`. Its variants may not change under the same name.
- An assignment is per (playbook, experiment, entity), made once by a salted hash over the weights
  of the period it happens in; the primary key keeps it for the experiment's life, so changing
  weights never moves an entity. Each period's weights are recorded with its first assignment (the
  design the sample-ratio check compares with).
- An exposure is per (playbook, action, entity, partition): treated (a variant, or ``treated``)
  or held out, with the ledger's time; outcomes are joined to exposures within a window.
- Outcomes are stored per (playbook, entity, time, metric); storing the same rows again adds
  nothing, so re-materialising an outcome partition counts nothing twice.
"""

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from autoexec_dagster.errors import ExperimentError
from autoexec_dagster.experiments.experiment import Experiment
from autoexec_dagster.keys import SEP
from autoexec_dagster.ledger import schema
from autoexec_dagster.ledger.engine import LedgerBase, chunks
from autoexec_dagster.ledger.escalations import aware

_ACTIVE = (schema.RUNNING_EXPERIMENT, schema.AWAITING_APPROVAL)


@dataclass(frozen=True, slots=True)
class ExperimentState:
    """An experiment as the ledger holds it.

    Attributes:
        playbook: The playbook.
        experiment: The experiment's name.
        action: The action it varies.
        rule: The rule that runs it.
        control: The control variant.
        status: ``running``, ``awaiting_approval``, ``promoted`` or ``stopped``.
        winner: The promoted variant, once there is one.
        weights: Variant -> weight in force for new assignments.
        weights_reason: Why the weights are what they are.
        variant_status: Variant -> ``live``, ``promoted``, ``archived`` or ``stopped``.
        revision: Bumped on every update.
        started_at: When the first entity was assigned.
        decided_at: When the winner was promoted, or the experiment stopped.
        approval_id: The pending promotion approval, if one is waited for.
    """

    playbook: str
    experiment: str
    action: str
    rule: str
    control: str
    status: str
    winner: str | None
    weights: dict[str, float]
    weights_reason: str | None
    variant_status: dict[str, str]
    revision: int
    started_at: datetime
    decided_at: datetime | None = None
    approval_id: str | None = None
    digest: str = field(default="", repr=False)

    @property
    def active(self) -> bool:
        """Whether entities are still assigned to variants (not yet promoted or stopped)."""
        return self.status in _ACTIVE

    def serving(self, variant: str) -> str:
        """The variant an entity assigned to ``variant`` is sent now.

        A promoted experiment sends its winner to everyone; a variant stopped for harm or
        archived sends the control (or, when the control itself is out, the best live variant).
        """
        if self.winner is not None:
            return self.winner
        if self.variant_status.get(variant) == schema.LIVE:
            return variant
        if self.variant_status.get(self.control) == schema.LIVE:
            return self.control
        live = [v for v, s in self.variant_status.items() if s == schema.LIVE]
        return max(live, key=lambda v: self.weights.get(v, 0.0)) if live else self.control


@dataclass(frozen=True, slots=True)
class ExperimentUpdate:
    """What one update of an experiment writes (see :meth:`ExperimentStore.save_experiment_update`).

    Attributes:
        weights: The weights in force from the next period on.
        weights_reason: Why.
        status: The experiment's status after the update.
        winner: The promoted variant, if any.
        variant_status: Each variant's status after the update.
        events: Decision records: dicts with ``kind``, ``variant``, ``detail`` and ``evidence``.
        approval_id: The promotion approval requested, if any.
    """

    weights: Mapping[str, float]
    weights_reason: str
    status: str
    winner: str | None
    variant_status: Mapping[str, str]
    events: Sequence[Mapping[str, Any]] = ()
    approval_id: str | None = None


def assignment_draws(entity_ids: Sequence[str], *, playbook: str, experiment: Experiment) -> Any:
    """A uniform number in [0, 1) per entity, stable for the experiment (apart from the holdout's
    hash, which is salted with the playbook's holdout salt)."""
    base = hashlib.blake2b(
        f"experiment{SEP}{playbook}{SEP}{experiment.name}{SEP}{experiment.salt}{SEP}".encode()
    )
    out = np.empty(len(entity_ids), dtype=np.float64)
    for i, entity in enumerate(entity_ids):
        hasher = base.copy()
        hasher.update(entity.encode())
        out[i] = int.from_bytes(hasher.digest()[:8], "big") / 2.0**64
    return out


def draw_variants(draws: Any, weights: Mapping[str, float], order: Sequence[str]) -> list[str]:
    """Variants for uniform draws under ``weights`` (variants in ``order``; zero weights never)."""
    names = [v for v in order if weights.get(v, 0.0) > 0]
    cumulative = np.cumsum([weights[v] for v in names])
    cumulative /= cumulative[-1]
    picks = np.searchsorted(cumulative, np.asarray(draws), side="right")
    picks = np.minimum(picks, len(names) - 1)
    return [names[i] for i in picks]


def _state(row: Any) -> ExperimentState:
    return ExperimentState(
        playbook=row.playbook,
        experiment=row.experiment,
        action=row.action,
        rule=row.rule,
        control=row.control,
        status=row.status,
        winner=row.winner,
        weights=json.loads(row.weights),
        weights_reason=row.weights_reason,
        variant_status=json.loads(row.variant_status),
        revision=row.revision,
        started_at=aware(row.started_at) or row.started_at,
        decided_at=aware(row.decided_at),
        approval_id=row.approval_id,
        digest=row.digest,
    )


class ExperimentStore(LedgerBase):
    """Experiments, assignments, exposures and outcomes."""

    def start_experiment(
        self, *, playbook: str, experiment: Experiment, rule: str, action: str
    ) -> ExperimentState:
        """The experiment's state, recording it with its starting weights the first time.

        Raises:
            ExperimentError: The experiment's variants or control differ from those it was
                started with (a new name is needed), or another experiment still runs on the
                same action of the playbook.
        """
        e = schema.experiments
        stamp = self.clock()
        weights = experiment.initial_weights()
        with self._write("start an experiment") as conn:
            other = conn.execute(
                sa.select(e.c.experiment).where(
                    e.c.playbook == playbook,
                    e.c.action == action,
                    e.c.status.in_(_ACTIVE),
                    e.c.experiment != experiment.name,
                )
            ).first()
            if other is not None:
                raise ExperimentError(
                    f"playbook {playbook!r}: experiment {other.experiment!r} still runs on action "
                    f"{action!r}; two experiments on one action at once are refused (conclude "
                    f"{other.experiment!r} first)"
                )
            inserted = conn.execute(
                self._insert_ignore(e).returning(e.c.experiment),
                [
                    {
                        "playbook": playbook,
                        "experiment": experiment.name,
                        "action": action,
                        "rule": rule,
                        "digest": experiment.digest(),
                        "control": experiment.control,
                        "status": schema.RUNNING_EXPERIMENT,
                        "weights": json.dumps(weights),
                        "weights_reason": (
                            "fixed weights"
                            if experiment.allocation == "fixed"
                            else "equal weights until every variant has "
                            f"{experiment.min_samples_per_variant} entities"
                        ),
                        "variant_status": json.dumps(
                            dict.fromkeys(experiment.variants, schema.LIVE)
                        ),
                        "revision": 0,
                        "started_at": stamp,
                        "updated_at": stamp,
                    }
                ],
            ).all()
            if inserted:
                conn.execute(
                    sa.insert(schema.experiment_events),
                    [
                        {
                            "playbook": playbook,
                            "experiment": experiment.name,
                            "kind": "started",
                            "variant": None,
                            "detail": f"started on action {action} (rule {rule}) with variants "
                            f"{', '.join(experiment.variants)}; control {experiment.control}",
                            "evidence": json.dumps({"weights": weights}),
                            "at": stamp,
                        }
                    ],
                )
            row = conn.execute(
                sa.select(e).where(e.c.playbook == playbook, e.c.experiment == experiment.name)
            ).one()
        state = _state(row)
        if state.digest != experiment.digest():
            raise ExperimentError(
                f"playbook {playbook!r}: experiment {experiment.name!r} was started with other "
                "variants or another control; changing an experiment's variants while it runs "
                "would mix two designs in one analysis, so give the changed experiment a new name"
            )
        return state

    def experiment_state(self, playbook: str, name: str) -> ExperimentState | None:
        """The experiment's state, or None if it has not started."""
        e = schema.experiments
        with self._read("read an experiment") as conn:
            row = conn.execute(
                sa.select(e).where(e.c.playbook == playbook, e.c.experiment == name)
            ).first()
        return _state(row) if row is not None else None

    def experiment_states(self, playbook: str | None = None) -> list[ExperimentState]:
        """Every experiment (of a playbook), oldest first."""
        e = schema.experiments
        query = sa.select(e).order_by(e.c.started_at, e.c.experiment)
        if playbook is not None:
            query = query.where(e.c.playbook == playbook)
        with self._read("list experiments") as conn:
            return [_state(row) for row in conn.execute(query)]

    def assign_variants(
        self,
        *,
        playbook: str,
        experiment: Experiment,
        state: ExperimentState,
        entity_ids: Sequence[str],
        period: str,
    ) -> dict[str, tuple[str, bool]]:
        """Each entity's variant: ``(variant to send, whether the exposure counts in the test)``.

        While the experiment runs, an entity keeps the variant it was first given; a new entity
        is drawn under the weights recorded for ``period`` (the weights in force when the period's
        first entity was assigned, so a re-run of the period draws alike). Once a winner is
        promoted everyone is sent the winner, outside the test.
        """
        if not entity_ids:
            return {}
        if not state.active:
            served = state.serving(state.control)
            return dict.fromkeys(entity_ids, (served, False))
        a = schema.experiment_assignments
        p = schema.experiment_periods
        stamp = self.clock()
        found: dict[str, str] = {}
        with self._write("assign variants") as conn:
            conn.execute(
                self._insert_ignore(p),
                [
                    {
                        "playbook": playbook,
                        "experiment": experiment.name,
                        "period": period,
                        "weights": json.dumps(state.weights),
                        "reason": state.weights_reason,
                        "recorded_at": stamp,
                    }
                ],
            )
            weights = json.loads(
                conn.execute(
                    sa.select(p.c.weights).where(
                        p.c.playbook == playbook,
                        p.c.experiment == experiment.name,
                        p.c.period == period,
                    )
                ).scalar_one()
            )
            for chunk in chunks(list(entity_ids)):
                for entity, variant in conn.execute(
                    sa.select(a.c.entity_id, a.c.variant).where(
                        a.c.playbook == playbook,
                        a.c.experiment == experiment.name,
                        a.c.entity_id.in_(chunk),
                    )
                ):
                    found[entity] = variant
            new = [e for e in dict.fromkeys(entity_ids) if e not in found]
            if new:
                drawn = draw_variants(
                    assignment_draws(new, playbook=playbook, experiment=experiment),
                    weights,
                    list(experiment.variants),
                )
                rows = [
                    {
                        "playbook": playbook,
                        "experiment": experiment.name,
                        "entity_id": entity,
                        "variant": variant,
                        "period": period,
                        "assigned_at": stamp,
                    }
                    for entity, variant in zip(new, drawn, strict=True)
                ]
                for chunk in chunks(rows, 5_000):
                    conn.execute(self._insert_ignore(a), list(chunk))
                found.update(zip(new, drawn, strict=True))
        return {
            entity: (state.serving(found[entity]), state.serving(found[entity]) == found[entity])
            for entity in entity_ids
        }

    def record_exposures(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Record exposures (playbook, action, entity_id, partition_key, arm, experiment,
        idempotency_key) at the ledger's time; existing ones keep their first time. Returns how
        many were new."""
        if not rows:
            return 0
        t = schema.exposures
        stamp = self.clock()
        added = 0
        with self._write("record exposures") as conn:
            for chunk in chunks(rows, 5_000):
                result = conn.execute(
                    self._insert_ignore(t).returning(t.c.entity_id),
                    [{"exposed_at": stamp, **row} for row in chunk],
                )
                added += len(result.all())
        return added

    def store_outcomes(self, playbook: str, outcomes: pd.DataFrame) -> int:
        """Store outcome rows (entity_id, occurred_at, metric, value); returns how many were new.

        Rows stored before are left as they are, so storing an outcome partition twice counts
        nothing twice.
        """
        if outcomes.empty:
            return 0
        t = schema.outcomes
        stamp = self.clock()
        occurred = pd.to_datetime(outcomes["occurred_at"], utc=True)
        records = [
            {
                "playbook": playbook,
                "entity_id": entity,
                "occurred_at": at,
                "metric": metric,
                "value": value,
                "recorded_at": stamp,
            }
            for entity, at, metric, value in zip(
                outcomes["entity_id"].astype(str).tolist(),
                occurred.dt.to_pydatetime().tolist(),
                outcomes["metric"].astype(str).tolist(),
                outcomes["value"].astype(float).tolist(),
                strict=True,
            )
        ]
        added = 0
        with self._write("store outcomes") as conn:
            for chunk in chunks(records, 5_000):
                result = conn.execute(self._insert_ignore(t).returning(t.c.entity_id), list(chunk))
                added += len(result.all())
        return added

    def exposures_frame(
        self, playbook: str, *, action: str | None = None, experiment: str | None = None
    ) -> pd.DataFrame:
        """Exposures as a DataFrame: entity_id, action, partition_key, arm, experiment,
        exposed_at (aware UTC)."""
        t = schema.exposures
        query = sa.select(
            t.c.entity_id,
            t.c.action,
            t.c.partition_key,
            t.c.arm,
            t.c.experiment,
            t.c.exposed_at,
        ).where(t.c.playbook == playbook)
        if action is not None:
            query = query.where(t.c.action == action)
        if experiment is not None:
            query = query.where(t.c.experiment == experiment)
        with self._read("read exposures") as conn:
            frame = pd.DataFrame(
                conn.execute(query).all(),
                columns=["entity_id", "action", "partition_key", "arm", "experiment", "exposed_at"],
            )
        frame["exposed_at"] = pd.to_datetime(frame["exposed_at"], utc=True, format="ISO8601")
        return frame

    def assignments_frame(self, playbook: str, experiment: str) -> pd.DataFrame:
        """Assignments: entity_id, variant, period, assigned_at (aware UTC)."""
        a = schema.experiment_assignments
        query = sa.select(a.c.entity_id, a.c.variant, a.c.period, a.c.assigned_at).where(
            a.c.playbook == playbook, a.c.experiment == experiment
        )
        with self._read("read assignments") as conn:
            frame = pd.DataFrame(
                conn.execute(query).all(), columns=["entity_id", "variant", "period", "assigned_at"]
            )
        frame["assigned_at"] = pd.to_datetime(frame["assigned_at"], utc=True, format="ISO8601")
        return frame

    def assignment_counts(self, playbook: str, experiment: str) -> dict[str, int]:
        """Variant -> entities assigned to it (one grouped count)."""
        a = schema.experiment_assignments
        with self._read("count assignments") as conn:
            rows = conn.execute(
                sa.select(a.c.variant, sa.func.count())
                .where(a.c.playbook == playbook, a.c.experiment == experiment)
                .group_by(a.c.variant)
            ).all()
        return {variant: int(count) for variant, count in rows}

    def outcomes_frame(self, playbook: str, metrics: Sequence[str]) -> pd.DataFrame:
        """Stored outcomes, one row per (entity, time) and one column per metric (NaN where a
        row does not record it)."""
        t = schema.outcomes
        query = sa.select(t.c.entity_id, t.c.occurred_at, t.c.metric, t.c.value).where(
            t.c.playbook == playbook, t.c.metric.in_(list(metrics))
        )
        with self._read("read outcomes") as conn:
            long = pd.DataFrame(
                conn.execute(query).all(), columns=["entity_id", "occurred_at", "metric", "value"]
            )
        if long.empty:
            return pd.DataFrame(
                {
                    "entity_id": pd.Series(dtype=object),
                    "occurred_at": pd.Series(dtype="datetime64[ns, UTC]"),
                    **{m: pd.Series(dtype=float) for m in metrics},
                }
            )
        long["occurred_at"] = pd.to_datetime(long["occurred_at"], utc=True, format="ISO8601")
        wide = long.pivot_table(
            index=["entity_id", "occurred_at"], columns="metric", values="value", aggfunc="first"
        ).reset_index()
        wide.columns.name = None
        for metric in metrics:
            if metric not in wide.columns:
                wide[metric] = np.nan
        return wide

    def period_weights(self, playbook: str, experiment: str) -> dict[str, dict[str, float]]:
        """Period -> the weights its new assignments were drawn with."""
        p = schema.experiment_periods
        with self._read("read period weights") as conn:
            rows = conn.execute(
                sa.select(p.c.period, p.c.weights).where(
                    p.c.playbook == playbook, p.c.experiment == experiment
                )
            ).all()
        return {period: json.loads(weights) for period, weights in rows}

    def save_experiment_update(
        self, *, playbook: str, experiment: str, revision: int, update: ExperimentUpdate
    ) -> bool:
        """Apply an update if the experiment is still at ``revision``; False if another update
        got there first (nothing is written then)."""
        e = schema.experiments
        stamp = self.clock()
        decided = update.status in (schema.PROMOTED, schema.STOPPED)
        values: dict[str, Any] = {
            "weights": json.dumps(dict(update.weights)),
            "weights_reason": update.weights_reason,
            "status": update.status,
            "winner": update.winner,
            "variant_status": json.dumps(dict(update.variant_status)),
            "revision": revision + 1,
            "approval_id": update.approval_id,
            "updated_at": stamp,
        }
        if decided:
            values["decided_at"] = stamp
        with self._write("update an experiment") as conn:
            result = conn.execute(
                sa.update(e)
                .where(
                    e.c.playbook == playbook,
                    e.c.experiment == experiment,
                    e.c.revision == revision,
                )
                .values(**values)
            )
            if result.rowcount != 1:
                return False
            if update.events:
                conn.execute(
                    sa.insert(schema.experiment_events),
                    [
                        {
                            "playbook": playbook,
                            "experiment": experiment,
                            "kind": event["kind"],
                            "variant": event.get("variant"),
                            "detail": event["detail"],
                            "evidence": json.dumps(event.get("evidence", {}), default=str),
                            "at": stamp,
                        }
                        for event in update.events
                    ],
                )
        return True

    def experiment_events(self, playbook: str, experiment: str) -> list[dict[str, Any]]:
        """The experiment's decision records, oldest first (evidence decoded)."""
        t = schema.experiment_events
        with self._read("read experiment events") as conn:
            rows = conn.execute(
                sa.select(t.c.kind, t.c.variant, t.c.detail, t.c.evidence, t.c.at)
                .where(t.c.playbook == playbook, t.c.experiment == experiment)
                .order_by(t.c.id)
            ).all()
        return [
            {
                "kind": kind,
                "variant": variant,
                "detail": detail,
                "evidence": json.loads(evidence),
                "at": aware(at),
            }
            for kind, variant, detail, evidence, at in rows
        ]
