"""``Experiment``: variants of one action tested on live traffic against a control.

An experiment belongs to the rule whose action it varies (``Rule(action=..., experiment=...)``).
Each variant is a set of overrides of the action channel's fields (a subject line, a template).
Entities the rule acts on are assigned a variant when their action is reserved, from the weights
in force in the ledger, and keep it for the experiment's life; the playbook's holdout stays outside
the experiment. :func:`~autoexec_dagster.update_experiment` reads the outcomes, recomputes the
weights for the next period and applies the stopping rule.
"""

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from autoexec_dagster.channels.base import Channel
from autoexec_dagster.errors import ExperimentError
from autoexec_dagster.expressions import NAME_RE
from autoexec_dagster.workflows.durations import Duration, as_timedelta

# Fields every channel has that tune delivery, not what is delivered: a variant may not vary them.
_DELIVERY_FIELDS = frozenset(Channel.model_fields)
_WEIGHT_TOLERANCE = 1e-6


class PromoteWhen(BaseModel):
    """When a variant may be promoted (besides the minimum run time and samples).

    Attributes:
        probability_best: Least posterior probability that the variant is the best one.
        expected_loss: Most expected loss of choosing it: the metric given up, on average over
            the posterior, if another variant is in fact better (absolute, in the metric's units).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    probability_best: float = Field(default=0.95, gt=0.0, lt=1.0)
    expected_loss: float = Field(default=0.002, ge=0.0)


class Experiment(BaseModel):
    """An A/B(/n) test or bandit over the variants of one action.

    Attributes:
        name: Identifier, unique in the ledger for the playbook. Changing variants needs a new name.
        variants: Variant name -> overrides of the channel's fields (``{"subject": "..."}``).
        control: The variant the others are compared with.
        allocation: ``thompson`` (batched top-two Thompson sampling: weights recomputed each
            period from the posteriors, with a floor) or ``fixed`` (``weights`` throughout).
        weights: Variant -> share of traffic, summing to 1; required for ``fixed``, the starting
            weights for ``thompson`` (equal when left out).
        metric: The outcome column the variants are judged by: 0/1 (a conversion) or numeric.
        window: Outcomes count within this time after the entity's first action.
        min_samples_per_variant: Entities every live variant needs before weights move from equal
            and before anything is promoted.
        min_days: Least time the experiment runs before anything is promoted.
        promote_when: The posterior thresholds of the stopping rule.
        guardrails: Outcome column -> highest tolerated rate; a variant above it (with
            ``min_samples_per_variant`` entities) is stopped for harm.
        confidence: Confidence of the intervals and of the sequential test that guards promotion.
        floor: Least weight of every live variant under Thompson sampling.
        top_two_beta: Under ``thompson``, the share of traffic that follows each variant's
            probability of being best; the rest goes to the challengers (top-two sampling, built
            to identify the best variant rather than only to exploit the leader: plain Thompson
            starves the variants the leader must be shown to beat, so an honest stopping rule
            rarely confirms a winner). 1.0 is plain Thompson sampling.
        promotion_approvers: When set, a promotion waits for one of these people's approval.
        salt: Salt of the assignment hash; leave empty unless two experiments must draw apart.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    variants: dict[str, dict[str, Any]] = Field(min_length=2)
    control: str
    allocation: Literal["thompson", "fixed"] = "thompson"
    weights: dict[str, float] | None = None
    metric: str
    window: Duration = "14d"
    min_samples_per_variant: int = Field(default=300, ge=1)
    min_days: float = Field(default=3.0, ge=0.0)
    promote_when: PromoteWhen = Field(default_factory=PromoteWhen)
    guardrails: dict[str, float] = Field(default_factory=dict)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    floor: float = Field(default=0.01, ge=0.0, lt=0.5)
    top_two_beta: float = Field(default=0.5, ge=0.0, le=1.0)
    promotion_approvers: tuple[str, ...] = ()
    salt: str = ""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(
                f"experiment name {value!r} must start with a letter and hold only letters, "
                "digits and underscores"
            )
        return value

    @field_validator("variants")
    @classmethod
    def _check_variants(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, overrides in value.items():
            if not NAME_RE.match(name):
                raise ValueError(
                    f"variant name {name!r} must start with a letter and hold only letters, "
                    "digits and underscores"
                )
            if not isinstance(overrides, dict):
                raise ValueError(f"variant {name!r}: overrides must be a mapping of channel fields")
            delivery = sorted(set(overrides) & _DELIVERY_FIELDS)
            if delivery:
                raise ValueError(
                    f"variant {name!r} overrides delivery setting(s) {delivery}; a variant may "
                    "only change what is delivered (the channel's content fields)"
                )
        return value

    @field_validator("guardrails")
    @classmethod
    def _check_guardrails(cls, value: dict[str, float]) -> dict[str, float]:
        for column, limit in value.items():
            if not (isinstance(limit, int | float) and math.isfinite(limit) and limit >= 0):
                raise ValueError(f"guardrails[{column!r}]: {limit!r} is not a rate >= 0")
        return value

    @model_validator(mode="after")
    def _check_experiment(self) -> "Experiment":
        names = list(self.variants)
        if self.control not in self.variants:
            raise ValueError(
                f"experiment {self.name!r}: control {self.control!r} is not a variant; the "
                f"variants are {names}"
            )
        if self.allocation == "fixed" and self.weights is None:
            raise ValueError(f"experiment {self.name!r}: fixed allocation needs weights=")
        if self.weights is not None:
            if set(self.weights) != set(self.variants):
                raise ValueError(
                    f"experiment {self.name!r}: weights must name each variant once; got "
                    f"{sorted(self.weights)} for variants {sorted(names)}"
                )
            values = list(self.weights.values())
            if any(not (math.isfinite(w) and w >= 0) for w in values):
                raise ValueError(f"experiment {self.name!r}: weights must be numbers >= 0")
            total = math.fsum(values)
            if abs(total - 1.0) > _WEIGHT_TOLERANCE:
                raise ValueError(
                    f"experiment {self.name!r}: weights must sum to 1, they sum to {total:g}"
                )
        if self.metric in self.guardrails:
            raise ValueError(
                f"experiment {self.name!r}: the metric {self.metric!r} cannot also be a guardrail"
            )
        return self

    @property
    def window_seconds(self) -> float:
        """The outcome window in seconds."""
        return as_timedelta(self.window).total_seconds()

    def initial_weights(self) -> dict[str, float]:
        """The weights before any outcome: ``weights`` or equal shares."""
        if self.weights is not None:
            return dict(self.weights)
        share = 1.0 / len(self.variants)
        return dict.fromkeys(self.variants, share)

    def digest(self) -> str:
        """What may not change while the experiment runs: its variants and control."""
        encoded = json.dumps(
            {"variants": self.variants, "control": self.control},
            sort_keys=True,
            default=str,
            separators=(",", ":"),
        ).encode()
        return hashlib.sha256(encoded).hexdigest()[:32]

    def outcome_columns(self) -> list[str]:
        """The metric and the guardrail columns, which the outcomes must hold."""
        return [self.metric, *self.guardrails]


def check_variant_fields(experiment: Experiment, channel: Channel, *, action: str) -> None:
    """Refuse variants that override a field the action's channel does not have.

    Raises:
        ExperimentError: A variant names an unknown field or a value the field refuses.
    """
    fields = type(channel).model_fields
    for variant, overrides in experiment.variants.items():
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            content = sorted(set(fields) - _DELIVERY_FIELDS)
            raise ExperimentError(
                f"experiment {experiment.name!r}: variant {variant!r} overrides field(s) "
                f"{unknown} that the channel of action {action!r} ({type(channel).__name__}) "
                f"does not have; it has {content}"
            )
        for name, value in overrides.items():
            try:
                type(channel).model_validate({**_public_values(channel), name: value})
            except Exception as exc:  # pydantic's message names the field and the problem
                raise ExperimentError(
                    f"experiment {experiment.name!r}: variant {variant!r} sets {name}={value!r}, "
                    f"which the channel of action {action!r} refuses: {exc}"
                ) from None


def _public_values(channel: Channel) -> dict[str, Any]:
    return {name: channel.__dict__[name] for name in type(channel).model_fields}


def channel_for_variant(channel: Channel, overrides: Mapping[str, Any]) -> Channel:
    """The action's channel with a variant's field overrides applied (validated beforehand by
    :func:`check_variant_fields`)."""
    if not overrides:
        return channel
    return channel.model_copy(update=dict(overrides))
