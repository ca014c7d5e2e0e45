"""``Workflow`` and ``Step``: what happens to an entity, step by step, once a rule starts it.

A workflow is an ordered list of steps. A step is one of:

- an **action**: a channel delivers one request; the reply's JSON is the step's output;
- a **poll**: an action repeated every ``every`` ``until`` a condition over its output holds, for at
  most ``timeout``;
- a **timer**: ``wait`` a duration, or ``wait_until`` a per-entity timestamp column.

``when`` makes a step conditional. Conditions read the entity's insight columns and earlier steps'
outputs as columns named ``<step>.<field>`` (backticked, as pandas query syntax wants them), so they
are evaluated vectorised over every instance that reaches the step together.
"""

from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from autoexec_dagster.errors import PlaybookError
from autoexec_dagster.expressions import NAME_RE, parse_expression
from autoexec_dagster.workflows.durations import Duration, as_timedelta

DEFAULT_POLL_EVERY = timedelta(minutes=1)


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
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    action: str | None = None
    when: str | None = None
    until: str | None = None
    every: Duration | None = None
    timeout: Duration | None = None
    wait: Duration | None = None
    wait_until: str | None = None

    @field_validator("name", "action")
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
        kinds = [self.action is not None, self.wait is not None, self.wait_until is not None]
        if sum(kinds) != 1:
            raise ValueError(
                f"step {self.name!r} must set exactly one of 'action', 'wait' or 'wait_until'"
            )
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
        for field in ("when", "until"):
            source = getattr(self, field)
            if source is not None:
                try:
                    parse_expression(source, rule=f"{self.name}.{field}")
                except PlaybookError as exc:
                    raise ValueError(f"step {self.name!r}: {exc}") from None
        return self

    @property
    def kind(self) -> str:
        """``action``, ``poll`` or ``timer``."""
        if self.action is None:
            return "timer"
        return "poll" if self.until is not None else "action"

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
        for field, allowed in (("when", earlier), ("until", earlier | {step.name})):
            source = getattr(step, field)
            if source is None:
                continue
            for ref in sorted(step_references(source, where=f"{step.name}.{field}")):
                if ref in allowed:
                    continue
                where = "comes later" if ref in every else "is not a step of this workflow"
                raise ValueError(
                    f"step {step.name!r}: '{field}' reads the output of step {ref!r}, which "
                    f"{where}; a step may read only steps before it"
                    + (" (and 'until' its own output)" if field == "until" else "")
                )

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
        """Channel names the steps use, without repeats."""
        steps = [*self.steps, *self.on_failure_steps]
        return list(dict.fromkeys(s.action for s in steps if s.action is not None))
