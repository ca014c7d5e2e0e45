"""``Workflow`` and ``Step``: what happens to an entity, step by step, once a rule starts it.

A workflow is an ordered list of steps. A step is one of:

- an **action**: a channel delivers one request; the reply's JSON is the step's output;
- a **poll**: an action repeated every ``every`` ``until`` a condition over its output holds, for at
  most ``timeout``;
- a **timer**: ``wait`` a duration, or ``wait_until`` a per-entity timestamp column;
- a **transform**: a pure function over the instances reaching it (a DataFrame in, a DataFrame
  out), for decisions such as "the cheapest supplier that can deliver in time"; its new columns
  are the step's output;
- an **approval** gate: where ``approve_when`` holds, the instance waits for listed approvers to
  approve the payload the following steps will act on; elsewhere it passes, approved by the rule.

``when`` makes a step conditional. Conditions read the entity's insight columns and earlier steps'
outputs as columns named ``<step>.<field>`` (backticked, as pandas query syntax wants them), so they
are evaluated vectorised over every instance that reaches the step together.
"""

import importlib
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Annotated, Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, field_validator, model_validator

from autoexec_dagster.errors import PlaybookError
from autoexec_dagster.expressions import NAME_RE, parse_expression
from autoexec_dagster.workflows.durations import Duration, as_timedelta

DEFAULT_POLL_EVERY = timedelta(minutes=1)
# How long an approval request waits for people when the step does not say.
DEFAULT_APPROVAL_EXPIRY = timedelta(days=7)
# The column a transform's frame and result identify instances by.
INSTANCE_COLUMN = "instance_id"

TransformFn = Callable[[pd.DataFrame], pd.DataFrame]


def transform_name(value: Any) -> str:
    """A transform as text: ``module:function`` (what YAML writes, and what versions hash)."""
    if isinstance(value, str):
        return value
    return f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', repr(value))}"


Transform = Annotated[
    TransformFn | str, PlainSerializer(transform_name, return_type=str, when_used="always")
]
OnExpiry = Literal["reject", "escalate", "approve"]


def import_transform(path: str) -> TransformFn:
    """The callable a YAML playbook names as ``module:function``.

    Raises:
        ValueError: The text is not ``module:function``, the module does not import, or the
            attribute is missing or not callable.
    """
    module_name, colon, attribute = path.partition(":")
    if not colon or not module_name.strip() or not attribute.strip():
        raise ValueError(f"transform {path!r} must be written 'module:function'")
    try:
        module = importlib.import_module(module_name.strip())
    except Exception as exc:
        raise ValueError(
            f"transform {path!r}: module {module_name!r} cannot be imported "
            f"({type(exc).__name__}: {exc})"
        ) from None
    target = module
    for part in attribute.strip().split("."):
        if not hasattr(target, part):
            raise ValueError(f"transform {path!r}: {module_name!r} has no attribute {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"transform {path!r} is not callable")
    return target  # pyright: ignore[reportReturnType]


def step_references(expression: str, *, where: str) -> frozenset[str]:
    """The step names an expression reads outputs of (columns written ``<step>.<field>``)."""
    parsed = parse_expression(expression, rule=where)
    return frozenset(column.split(".", 1)[0] for column in parsed.columns if "." in column)


class Step(BaseModel):
    """One step of a workflow.

    Attributes:
        name: Identifier, unique in its workflow; later steps read its output as ``<name>.<field>``.
        action: The channel that executes the step (a key of ``channels``), for action and poll
            steps.
        when: Run the step only where this holds; elsewhere it is skipped, and recorded so.
        until: Makes the action a poll: repeat it every ``every`` until this holds over its own
            output (``\\`verify.status\\` == 'healthy'``). Requires ``timeout``.
        every: Time between poll attempts (default one minute).
        timeout: How long a poll may go on; past it the step fails.
        wait: A timer: the instance waits this long, holding no process.
        wait_until: A timer until the time in this insight column (per entity).
        transform: A pure step: a callable (or, in YAML, ``module:function``) that takes a
            DataFrame of the instances reaching the step (an ``instance_id`` column, the insight
            columns and earlier outputs as ``<step>.<field>``) and returns a DataFrame with an
            ``instance_id`` column and the step's output columns; an instance it returns no
            row for fails the step with the transform's reason (column ``reason`` if given).
        approve_when: Makes the step an approval gate: where this holds, the instance waits for
            people; elsewhere it passes, recorded as approved by the rule.
        approvers: Who may decide (names as people give them with ``--by``).
        min_approvals: Distinct approvers needed (2 for four eyes); one rejection rejects.
        expires_after: How long a request waits for people (default 7 days).
        on_expiry: What an unanswered request becomes: ``reject`` (the default: nothing happens
            without a person), ``escalate`` (the instance fails and is escalated with its
            evidence) or ``approve``.
        notify: The channel that tells each approver (with signed approve and reject links when
            approval links are configured).
        sla: How soon a person should answer; an asset check warns past it.
        value: The column that gives a request its value, summed in listings (default: the
            numeric column ``approve_when`` reads; the first by name if it reads several).
        approves: The columns the approval covers (default: every insight column and every
            earlier step's output); a change to any of them needs a new approval.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str
    action: str | None = None
    when: str | None = None
    until: str | None = None
    every: Duration | None = None
    timeout: Duration | None = None
    wait: Duration | None = None
    wait_until: str | None = None
    transform: Transform | None = None
    approve_when: str | None = None
    approvers: Sequence[str] = ()
    min_approvals: int = Field(default=1, ge=1)
    expires_after: Duration | None = None
    on_expiry: OnExpiry = "reject"
    notify: str | None = None
    sla: Duration | None = None
    value: str | None = None
    approves: Sequence[str] | None = None

    @field_validator("transform")
    @classmethod
    def _check_transform(cls, value: TransformFn | str | None) -> TransformFn | str | None:
        if isinstance(value, str):
            import_transform(value)  # fail at load time, not at the first instance
        return value

    @field_validator("approves")
    @classmethod
    def _freeze_approves(cls, value: Sequence[str] | None) -> tuple[str, ...] | None:
        # A tuple, so the frozen step stays hashable whether a list or a tuple was given.
        return None if value is None else tuple(value)

    @field_validator("approvers")
    @classmethod
    def _check_approvers(cls, value: Sequence[str]) -> tuple[str, ...]:
        cleaned = tuple(v.strip() for v in value)
        if any(not v for v in cleaned):
            raise ValueError("approvers: an approver's name is empty")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError(f"approvers: {list(cleaned)} names someone twice")
        return cleaned

    @field_validator("name", "action", "notify")
    @classmethod
    def _check_names(cls, value: str | None) -> str | None:
        if value is not None and not NAME_RE.match(value):
            raise ValueError(
                f"{value!r} must start with a letter and hold only letters, digits and "
                "underscores (at most 63 characters)"
            )
        return value

    @model_validator(mode="after")
    def _check_kind(self) -> "Step":
        kinds = [
            self.action is not None,
            self.wait is not None,
            self.wait_until is not None,
            self.transform is not None,
            self.approve_when is not None,
        ]
        if sum(kinds) != 1:
            raise ValueError(
                f"step {self.name!r} must set exactly one of 'action', 'wait', 'wait_until', "
                "'transform' or 'approve_when'"
            )
        self._check_approval()
        if self.until is not None and self.action is None:
            raise ValueError(f"step {self.name!r}: 'until' polls an action; set 'action'")
        if self.until is not None and self.timeout is None:
            raise ValueError(
                f"step {self.name!r}: 'until' needs a 'timeout' (how long to keep polling), "
                "or the entity could wait forever"
            )
        if self.until is None and (self.every is not None or self.timeout is not None):
            raise ValueError(
                f"step {self.name!r}: 'every' and 'timeout' belong to a poll ('until')"
            )
        for field in ("when", "until", "approve_when"):
            source = getattr(self, field)
            if source is not None:
                try:
                    parse_expression(source, rule=f"{self.name}.{field}")
                except PlaybookError as exc:
                    raise ValueError(f"step {self.name!r}: {exc}") from None
        return self

    def _check_approval(self) -> None:
        approval_only = {
            "approvers": bool(self.approvers),
            "expires_after": self.expires_after is not None,
            "notify": self.notify is not None,
            "sla": self.sla is not None,
            "value": self.value is not None,
            "approves": self.approves is not None,
            "min_approvals": self.min_approvals != 1,
            "on_expiry": self.on_expiry != "reject",
        }
        if self.approve_when is None:
            stray = [name for name, given in approval_only.items() if given]
            if stray:
                raise ValueError(
                    f"step {self.name!r}: {', '.join(repr(s) for s in stray)} belong to an "
                    "approval step ('approve_when')"
                )
            return
        if not self.approvers:
            raise ValueError(
                f"step {self.name!r}: an approval step needs 'approvers' (who may decide); "
                "nobody could approve it otherwise"
            )
        if self.min_approvals > len(self.approvers):
            raise ValueError(
                f"step {self.name!r}: min_approvals={self.min_approvals} is more than the "
                f"{len(self.approvers)} approver(s) listed ({', '.join(self.approvers)})"
            )
        if self.sla is not None and as_timedelta(self.sla) >= self.approval_expiry:
            raise ValueError(
                f"step {self.name!r}: sla ({self.sla}) must be shorter than expires_after "
                f"({self.approval_expiry}), or it would never warn before the expiry"
            )

    @property
    def kind(self) -> str:
        """``action``, ``poll``, ``timer``, ``transform`` or ``approval``."""
        if self.transform is not None:
            return "transform"
        if self.approve_when is not None:
            return "approval"
        if self.action is None:
            return "timer"
        return "poll" if self.until is not None else "action"

    @property
    def transform_fn(self) -> TransformFn:
        """A transform step's callable (imported when given as ``module:function``)."""
        if self.transform is None:
            raise ValueError(f"step {self.name!r} is not a transform")
        if isinstance(self.transform, str):
            return import_transform(self.transform)
        return self.transform

    @property
    def approval_expiry(self) -> timedelta:
        """How long an approval request waits for people."""
        if self.expires_after is None:
            return DEFAULT_APPROVAL_EXPIRY
        return as_timedelta(self.expires_after)

    @property
    def approval_sla(self) -> timedelta | None:
        """How soon a person should answer an approval request (None: no SLA)."""
        return None if self.sla is None else as_timedelta(self.sla)

    @property
    def value_column(self) -> str | None:
        """The column that gives an approval request its value."""
        if self.value is not None:
            return self.value
        if self.approve_when is None:
            return None
        parsed = parse_expression(self.approve_when, rule=f"{self.name}.approve_when")
        candidates = sorted(parsed.numeric_columns or parsed.columns)
        return candidates[0] if candidates else None

    @property
    def poll_every(self) -> timedelta:
        """Time between poll attempts."""
        return DEFAULT_POLL_EVERY if self.every is None else as_timedelta(self.every)

    @property
    def poll_timeout(self) -> timedelta | None:
        """How long a poll may go on (None for other steps)."""
        return None if self.timeout is None else as_timedelta(self.timeout)

    @property
    def wait_for(self) -> timedelta | None:
        """A timer step's duration (None for other steps)."""
        return None if self.wait is None else as_timedelta(self.wait)


class Workflow(BaseModel):
    """An ordered list of steps per entity, durable in the ledger.

    Attributes:
        steps: The steps, in order.
        on_failure: The reason a person sees when an instance fails for good (a permanent error,
            retries exhausted, a poll timed out, a missing output field); the entity is escalated
            with every step's outcome and output as evidence.
        on_failure_steps: Steps run after a failure and before the escalation (e.g. page the
            on-call); they may read the failed instance's outputs.
        description: Free text for people.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: list[Step] = Field(min_length=1)
    on_failure: str = "The workflow failed"
    on_failure_steps: list[Step] = Field(default_factory=list)
    description: str | None = None

    @model_validator(mode="after")
    def _check_steps(self) -> "Workflow":
        if not self.on_failure.strip():
            raise ValueError("on_failure (the reason a person sees) is empty")
        seen: list[str] = []
        for step in [*self.steps, *self.on_failure_steps]:
            if step.name in seen:
                raise ValueError(
                    f"step name {step.name!r} is used twice; step names must be unique"
                )
            seen.append(step.name)
        names = [s.name for s in self.steps]
        for index, step in enumerate(self.steps):
            self._check_order(step, earlier=set(names[:index]), every=set(names))
        for step in self.on_failure_steps:
            # A failure step may read any main step's output (as far as the instance got).
            self._check_order(step, earlier=set(names), every=set(names))
        return self

    @staticmethod
    def _check_order(step: Step, *, earlier: set[str], every: set[str]) -> None:
        for field, allowed in (
            ("when", earlier),
            ("until", earlier | {step.name}),
            ("approve_when", earlier),
            ("value", earlier),
            ("approves", earlier),
        ):
            source = getattr(step, field)
            if source is None:
                continue
            if field == "value":
                refs = {source.split(".", 1)[0]} if "." in source else set()
            elif field == "approves":
                refs = {c.split(".", 1)[0] for c in source if "." in c}
            else:
                refs = step_references(source, where=f"{step.name}.{field}")
            for ref in sorted(refs):
                if ref in allowed:
                    continue
                where = "comes later" if ref in every else "is not a step of this workflow"
                raise ValueError(
                    f"step {step.name!r}: '{field}' reads the output of step {ref!r}, which "
                    f"{where}; a step may read only steps before it"
                    + (" (and 'until' its own output)" if field == "until" else "")
                )

    def insight_columns(self) -> dict[str, list[str]]:
        """Insight columns the steps read (undotted names), each with the steps that read it.

        Routing checks them before a workflow starts, so a step reading a column the insight
        lacks is refused up front instead of failing every instance when it gets there.
        """
        readers: dict[str, list[str]] = {}
        for step in [*self.steps, *self.on_failure_steps]:
            names: set[str] = set()
            for field in ("when", "until", "approve_when"):
                source = getattr(step, field)
                if source is not None:
                    names |= parse_expression(source, rule=f"{step.name}.{field}").columns
            names |= {c for c in (step.value, *(step.approves or ())) if c is not None}
            if step.wait_until is not None:
                names.add(step.wait_until)
            for name in sorted(n for n in names if "." not in n):
                readers.setdefault(name, []).append(step.name)
        return readers

    def step(self, name: str) -> Step:
        """The step called ``name``.

        Raises:
            KeyError: No such step.
        """
        for step in [*self.steps, *self.on_failure_steps]:
            if step.name == name:
                return step
        raise KeyError(name)

    @property
    def actions(self) -> list[str]:
        """Channel names the steps use (actions and approval notifications), without repeats."""
        steps = [*self.steps, *self.on_failure_steps]
        names = [s.action or s.notify for s in steps]
        return list(dict.fromkeys(n for n in names if n is not None))
