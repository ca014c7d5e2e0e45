"""Budgets: how many actions an entity (or a playbook) may receive within a rolling period.

A budget is named, and the name is what playbooks share: every playbook recording into the same
ledger with a budget called ``customer_contact`` spends from one account per customer. Spending
happens when an action is reserved, in the same transaction, under a lock per (budget, scope) on
PostgreSQL (SQLite serialises writers already), so several workers, partitions and playbooks
racing on the same entity never spend past the limit. An action the budget refuses is recorded
as skipped, with a detail that names the budget and what it had spent.

What counts: every action reserved for sending, whatever became of it afterwards (a failed
delivery still spent its unit: the budget protects the person at the other end, and a failure
may have reached them). Re-running a partition spends nothing, since spend is keyed by the
action's idempotency key. Each playbook enforces its own copy of the definition against the
shared spend; give playbooks that share a name the same limits.
"""

from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from autoexec_dagster.workflows.durations import parse_duration

__all__ = ["BUDGET_DETAIL", "Budget"]

# How recording marks the rows a budget refused (the detail column starts with it).
BUDGET_DETAIL = "budget:"


class Budget(BaseModel):
    """At most ``max_actions`` actions per entity (or per playbook) within a rolling ``period``.

    Attributes:
        name: The budget's name; playbooks that name the same budget share its spend.
        max_actions: How many actions the scope may receive within ``period``.
        period: The rolling window, a duration (``"7d"``, ``"24h"``), on the ledger's clock.
        per: ``"entity"``: an account per entity id (one retention email per customer per
            week, over every playbook and partition); ``"playbook"``: one account for the
            playbook (at most 5,000 actions a day).
        actions: The actions the budget limits and counts; None for every action of the
            playbook.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    max_actions: int = Field(ge=1)
    period: str = "1d"
    per: Literal["entity", "playbook"] = "entity"
    actions: list[str] | None = Field(default=None, min_length=1)

    @field_validator("period", mode="before")
    @classmethod
    def _check_period(cls, value: Any) -> Any:
        parse_duration(value, what="budget period")
        return value

    @property
    def window(self) -> timedelta:
        """The rolling period as a timedelta."""
        return parse_duration(self.period, what="budget period")

    def limits(self, action: str) -> bool:
        """Whether this budget counts and limits ``action``."""
        return self.actions is None or action in self.actions

    def describe(self) -> str:
        """``"at most 1 action per entity in 7d"``: the budget in words."""
        noun = "action" if self.max_actions == 1 else "actions"
        return f"at most {self.max_actions:,} {noun} per {self.per} in {self.period}"
