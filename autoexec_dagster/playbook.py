"""Playbooks: which entity gets which action, escalation or holdout, and why.

A :class:`Playbook` is an ordered list of :class:`Rule` objects plus :class:`Guardrails`. Rules are
evaluated in order over the whole insight DataFrame at once; the first rule that matches an entity
decides it, and entities that match no rule are skipped. Playbooks are pydantic models, so the
same validation applies whether they are written in Python or loaded from YAML.
"""

import hashlib
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from autoexec_dagster.budgets import Budget
from autoexec_dagster.errors import PlaybookError
from autoexec_dagster.experiments.experiment import Experiment
from autoexec_dagster.experiments.outcome_metric import OutcomeMetric
from autoexec_dagster.expressions import NAME_RE, ParsedExpression, parse_expression
from autoexec_dagster.workflows.workflow import Workflow

RuleCallable = Callable[[pd.DataFrame], pd.Series]


class Rule(BaseModel):
    """One routing rule: when it matches, act, start a workflow, escalate to a person, or skip.

    Exactly one of ``action``, ``workflow``, ``escalate`` or ``skip`` must be set, except that
    ``escalate`` may come with an ``action``: the action a person can approve for the escalated
    entity (``Rule(escalate="Call this customer", action="crm_task")``). Nothing is executed until
    a person approves it; it then goes through the ledger like any action.

    Attributes:
        name: Identifier of the rule (letters, digits, underscores), shown in the ledger.
        when: A pandas query expression over the insight's columns, or a callable that takes the
            insight DataFrame and returns a boolean Series (Python playbooks only).
        action: Name of the action (a key of the ``channels`` mapping) to execute; with
            ``escalate``, the action proposed to the person, executed only once approved.
        workflow: Name of a workflow of the playbook (``Playbook.workflows``) to start for each
            matching entity: durable steps, advanced by later runs.
        escalate: Reason text; matching entities go to the human escalation queue.
        skip: Matching entities are deliberately left alone (and later rules do not see them).
        reason: Why this rule acts, shown in plans and summaries; defaults to the expression.
        columns: For callable rules, the columns the callable reads (checked before routing).
        experiment: Variants of the rule's action tested against a control (an
            :class:`~autoexec_dagster.Experiment`); only with ``action``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str
    when: str | RuleCallable
    action: str | None = None
    workflow: str | None = None
    escalate: str | None = None
    skip: bool = False
    reason: str | None = None
    columns: tuple[str, ...] = ()
    experiment: Experiment | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(
                f"rule name {value!r} must start with a letter and hold only letters, digits and "
                "underscores (at most 63 characters)"
            )
        return value

    @field_validator("action", "workflow")
    @classmethod
    def _check_action(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not NAME_RE.match(value):
            raise ValueError(
                f"{info.field_name} name {value!r} must start with a letter and hold only "
                "letters, digits and underscores"
            )
        return value

    @model_validator(mode="after")
    def _check_outcome(self) -> "Rule":
        # An action next to 'escalate' is the proposed action a person approves, not an outcome.
        chosen = [
            self.action is not None and self.escalate is None,
            self.workflow is not None,
            self.escalate is not None,
            self.skip,
        ]
        if sum(chosen) != 1:
            raise ValueError(
                f"rule {self.name!r} must set exactly one of 'action', 'workflow', 'escalate' or "
                "'skip' (an 'action' may accompany 'escalate' as the action a person can approve)"
            )
        if self.escalate is not None and not self.escalate.strip():
            raise ValueError(f"rule {self.name!r}: the escalation reason is empty")
        if self.experiment is not None and self.decision != "act":
            raise ValueError(
                f"rule {self.name!r}: an experiment varies an action; it needs 'action' and "
                "cannot come with 'escalate', 'workflow' or 'skip'"
            )
        if isinstance(self.when, str):
            try:
                parse_expression(self.when, rule=self.name)
            except PlaybookError as exc:
                raise ValueError(str(exc)) from None
        return self

    @property
    def decision(self) -> str:
        """``act``, ``workflow``, ``escalate`` or ``skip``."""
        if self.escalate is not None:
            return "escalate"
        if self.action is not None:
            return "act"
        if self.workflow is not None:
            return "workflow"
        return "skip"

    @property
    def proposed_action(self) -> str | None:
        """The action a person can approve for entities this rule escalates, if any."""
        return self.action if self.escalate is not None else None

    @property
    def expression(self) -> ParsedExpression | None:
        """The parsed expression, or None for callable rules."""
        if isinstance(self.when, str):
            return parse_expression(self.when, rule=self.name)
        return None

    def read_columns(self) -> frozenset[str]:
        """Columns this rule reads."""
        parsed = self.expression
        return parsed.columns if parsed is not None else frozenset(self.columns)

    def explanation(self) -> str:
        """The reason recorded for entities this rule decides."""
        if self.escalate is not None:
            return self.escalate
        if self.reason:
            return self.reason
        if isinstance(self.when, str):
            return f"{self.name}: {self.when}"
        return f"{self.name}: {getattr(self.when, '__qualname__', 'callable rule')}"

    def fingerprint(self) -> dict[str, Any]:
        """The parts of the rule that change what it does, for the playbook version."""
        when = self.when
        if not isinstance(when, str):
            when = f"{getattr(when, '__module__', '')}.{getattr(when, '__qualname__', repr(when))}"
        return {
            "name": self.name,
            "when": when,
            "action": self.action,
            "workflow": self.workflow,
            "escalate": self.escalate,
            "skip": self.skip,
            # The experiment's name and variants, not its thresholds: tuning the stopping rule
            # must not make every routed plan stale.
            **(
                {"experiment": [self.experiment.name, self.experiment.digest()]}
                if self.experiment is not None
                else {}
            ),
        }


class Guardrails(BaseModel):
    """Limits enforced before anything is sent.

    Attributes:
        max_actions: Most actions one batch may execute; a larger batch is not executed and is
            escalated as a whole. None disables the limit.
        max_flagged_fraction: Largest plausible share of entities flagged (acted on, escalated or
            held out). A batch above it is not executed: the whole batch is escalated, because a
            model or data fault is far likelier than a real mass event.
        holdout_fraction: Share of would-be actions held out as a control group; membership is
            a salted hash of the entity id, stable across runs.
        dry_run: Record what would be sent without sending anything.
        cooldown_days: An entity that received the same action (from another partition) within
            this many days is skipped, and the ledger says why: a customer flagged ten days in a
            row gets one retention email, not ten. None disables the cooldown.
        budgets: Limits on actions per entity (or per playbook) within a rolling period,
            shared by name with every playbook recording into the same ledger and enforced
            atomically across workers; see :class:`~autoexec_dagster.Budget`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_actions: int | None = Field(default=10_000, ge=0)
    max_flagged_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    holdout_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    dry_run: bool = False
    # At most a century: a longer window overflows the date arithmetic of the cooldown query.
    cooldown_days: float | None = Field(default=None, gt=0, le=36_500)
    budgets: list[Budget] = Field(default_factory=list)

    @field_validator("budgets")
    @classmethod
    def _check_budgets(cls, value: list[Budget]) -> list[Budget]:
        names = [budget.name for budget in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"budget names must be unique in a playbook, got {repeated} twice")
        return value


class Playbook(BaseModel):
    """What should happen to each entity a model flags.

    Attributes:
        name: Identifier; execution assets are named ``<name>/plan``, ``<name>/actions`` and so on.
        entity_key: Column of the insight that identifies an entity (unique per partition).
        rules: Ordered rules; the first matching rule decides an entity.
        guardrails: Limits checked before anything is sent.
        description: Free text shown in the Dagster UI.
        version: Recorded on every ledger row the playbook writes. Defaults to a digest of the
            rules. It is not part of the idempotency keys: after an edit, re-running a partition
            executes only what the new version adds (an entity routed to an action it has not had
            for that partition), never what was already done.
        holdout_salt: Salt of the holdout hash; change it to draw a new control group.
        required_columns: Columns the insight must hold besides those the rules read.
        score_ranges: Inclusive ``[low, high]`` range per numeric column, checked before routing.
        personal_columns: Columns masked in metadata previews (emails, names, phone numbers).
        workflows: Named multi-step workflows that rules may start (``Rule(workflow=...)``).
        outcome: The outcome the playbook's actions are judged by against the holdout (uplift),
            for actions without an experiment (an experiment's own metric judges its action).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    entity_key: str
    rules: list[Rule] = Field(min_length=1)
    workflows: dict[str, Workflow] = Field(default_factory=dict)
    guardrails: Guardrails = Field(default_factory=Guardrails)
    description: str = ""
    version: str | None = None
    holdout_salt: str = ""
    required_columns: tuple[str, ...] = ()
    score_ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)
    personal_columns: tuple[str, ...] = ("email", "name", "phone", "address")
    outcome: OutcomeMetric | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not re.match(r"^[a-z][a-z0-9_]{0,62}\Z", value):
            raise ValueError(
                f"playbook name {value!r} must be lowercase letters, digits and underscores, "
                "starting with a letter (it becomes a Dagster asset key prefix)"
            )
        return value

    @field_validator("entity_key")
    @classmethod
    def _check_entity_key(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("entity_key must name the insight column that identifies an entity")
        return value

    @field_validator("score_ranges")
    @classmethod
    def _check_ranges(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for column, (low, high) in value.items():
            if not low <= high:  # also refuses NaN, for which every comparison is false
                raise ValueError(
                    f"score_ranges[{column!r}]: low {low} is above high {high} or not a number"
                )
        return value

    @model_validator(mode="after")
    def _check_rules(self) -> "Playbook":
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(
                    f"rule name {rule.name!r} is used twice; rule names must be unique"
                )
            seen.add(rule.name)
        for name in self.workflows:
            if not NAME_RE.match(name):
                raise ValueError(
                    f"workflow name {name!r} must start with a letter and hold only letters, "
                    "digits and underscores"
                )
        experiments: dict[str, str] = {}
        for rule in self.rules:
            if rule.experiment is None or rule.action is None:
                continue
            other = experiments.get(rule.action)
            if other is not None:
                raise ValueError(
                    f"two experiments on action {rule.action!r} at once (rules {other!r} and "
                    f"{rule.name!r}); one action runs one experiment at a time"
                )
            experiments[rule.action] = rule.name
        names = [r.experiment.name for r in self.rules if r.experiment is not None]
        if len(names) != len(set(names)):
            raise ValueError(f"experiment names must be unique in a playbook, got {names}")
        acting = {rule.action for rule in self.rules if rule.action is not None}
        for budget in self.guardrails.budgets:
            strangers = sorted(set(budget.actions or ()) - acting)
            if strangers:
                raise ValueError(
                    f"budget {budget.name!r} limits action(s) {strangers} that no rule takes; "
                    f"the rules take {sorted(acting) or 'no actions'}"
                )
        used = {rule.workflow for rule in self.rules if rule.workflow is not None}
        unknown = sorted(used - set(self.workflows))
        if unknown:
            raise ValueError(
                f"rule(s) start unknown workflow(s) {unknown}; the playbook defines "
                f"{sorted(self.workflows) or 'no workflows'}"
            )
        for name in sorted(set(self.workflows) - used):
            warnings.warn(
                f"playbook {self.name!r}: workflow {name!r} is started by no rule",
                UserWarning,
                stacklevel=2,
            )
        return self

    @property
    def effective_version(self) -> str:
        """The explicit version, or a digest of everything that changes routing."""
        if self.version:
            return self.version
        payload = {
            "name": self.name,
            "entity_key": self.entity_key,
            "rules": [rule.fingerprint() for rule in self.rules],
            "holdout_fraction": self.guardrails.holdout_fraction,
            "holdout_salt": self.holdout_salt,
        }
        if self.workflows:
            payload["workflows"] = {
                name: workflow.model_dump(mode="json") for name, workflow in self.workflows.items()
            }
        encoded = json.dumps(payload, sort_keys=True).encode()
        return "v-" + hashlib.sha256(encoded).hexdigest()[:12]

    @property
    def actions(self) -> list[str]:
        """Channel names the rules and the workflows' steps use, in order, without repeats."""
        names = [r.action for r in self.rules if r.action is not None]
        for rule in self.rules:
            if rule.workflow is not None:
                names.extend(self.workflows[rule.workflow].actions)
        return list(dict.fromkeys(names))

    def experiments(self) -> dict[str, "tuple[Rule, Experiment]"]:
        """Experiment name -> the rule that runs it and the experiment."""
        return {
            rule.experiment.name: (rule, rule.experiment)
            for rule in self.rules
            if rule.experiment is not None
        }

    def rule(self, name: str) -> Rule:
        """The rule called ``name``.

        Raises:
            KeyError: No such rule.
        """
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)

    def rule_columns(self) -> frozenset[str]:
        """Every column the rules read."""
        columns: set[str] = set()
        for rule in self.rules:
            columns |= rule.read_columns()
        return frozenset(columns)

    def numeric_columns(self) -> frozenset[str]:
        """Columns that rules or score ranges treat as numbers."""
        columns: set[str] = set(self.score_ranges)
        for rule in self.rules:
            parsed = rule.expression
            if parsed is not None:
                columns |= parsed.numeric_columns
        return frozenset(columns)

    def input_columns(self) -> frozenset[str]:
        """Every column the insight must hold before routing."""
        return frozenset(
            {
                self.entity_key,
                *self.rule_columns(),
                *self.required_columns,
                *self.score_ranges,
                *self.workflow_columns(),
            }
        )

    def workflow_columns(self) -> dict[str, list[str]]:
        """Insight columns the steps of started workflows read: column -> ``workflow.step``."""
        readers: dict[str, list[str]] = {}
        started = {rule.workflow for rule in self.rules if rule.workflow is not None}
        for name in sorted(started & set(self.workflows)):
            for column, steps in self.workflows[name].insight_columns().items():
                readers.setdefault(column, []).extend(f"{name}.{step}" for step in steps)
        return readers

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "playbook") -> "Playbook":
        """Build a playbook from plain data (as loaded from YAML or JSON).

        Raises:
            PlaybookError: The data does not describe a valid playbook; the message lists each
                problem with its location.
        """
        if not isinstance(data, dict):
            raise PlaybookError(
                f"{source}: expected a mapping at the top level, got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PlaybookError(_format_validation_error(exc, source)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Playbook":
        """Load a playbook from a YAML file, with the same validation as in Python.

        Args:
            path: Path of the YAML file.

        Raises:
            PlaybookError: The file is missing, is not valid YAML, or describes an invalid playbook.
        """
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise PlaybookError(f"cannot read playbook {str(file)!r}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise PlaybookError(
                f"playbook {str(file)!r} is not UTF-8 text (byte {exc.start})"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PlaybookError(f"playbook {str(file)!r} is not valid YAML: {exc}") from None
        except (ValueError, RecursionError) as exc:
            # PyYAML lets these escape: an integer past Python's digit limit, deep nesting.
            raise PlaybookError(
                f"playbook {str(file)!r} is not valid YAML: {type(exc).__name__}: {str(exc)[:200]}"
            ) from None
        return cls.from_dict(data, source=f"playbook {str(file)!r}")

    def to_yaml(self) -> str:
        """Serialise to YAML (callable rules cannot be serialised)."""
        for rule in self.rules:
            if not isinstance(rule.when, str):
                raise PlaybookError(
                    f"rule {rule.name!r} uses a callable and cannot be written to YAML"
                )
        data = self.model_dump(mode="json", exclude_defaults=True)
        return yaml.safe_dump(data, sort_keys=False)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"  - {location}: {message}")
    return f"{source} is invalid:\n" + "\n".join(problems)


def proposes_actions(playbook: Playbook) -> bool:
    """Whether a rule escalates with an action a person can approve."""
    return any(rule.escalate is not None and rule.action is not None for rule in playbook.rules)


def measured_actions(playbook: Playbook) -> frozenset[str]:
    """Actions whose exposures are recorded for outcomes: every action of the playbook when it
    names an outcome metric, else the actions that run an experiment."""
    if playbook.outcome is not None:
        return frozenset(r.action for r in playbook.rules if r.action is not None)
    return frozenset(
        r.action for r in playbook.rules if r.experiment is not None and r.action is not None
    )


def experiments_by_action(playbook: Playbook) -> dict[str, Experiment]:
    """Action -> the experiment that varies it."""
    return {
        r.action: r.experiment
        for r in playbook.rules
        if r.experiment is not None and r.action is not None
    }
