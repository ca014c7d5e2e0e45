"""``OutcomeMetric``: the outcome a playbook's actions are judged by against the holdout."""

from pydantic import BaseModel, ConfigDict, Field

from autoexec_dagster.workflows.durations import Duration, as_timedelta


class OutcomeMetric(BaseModel):
    """Which outcome column measures whether an action worked, and within what time.

    Attributes:
        metric: Outcome column: 0/1 (retained, clicked) or numeric (revenue).
        window: Outcomes count within this time after the action.
        min_samples: Entities each of the treated and the held-out groups needs before the uplift
            check judges the action (fewer: not enough data, no warning).
        higher_is_better: Whether a higher metric is the good direction (False for cost, churn).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str
    window: Duration = "14d"
    min_samples: int = Field(default=200, ge=1)
    higher_is_better: bool = True

    @property
    def window_seconds(self) -> float:
        """The window in seconds."""
        return as_timedelta(self.window).total_seconds()
