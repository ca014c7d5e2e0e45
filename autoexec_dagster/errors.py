"""Exceptions raised by autoexec_dagster.

Every error that stops work before a side effect derives from :class:`AutoexecError`, so callers
can catch the family, and each message names the offending playbook, rule, column or value.
"""


class AutoexecError(Exception):
    """Base class of every error autoexec_dagster raises on purpose."""


class PlaybookError(AutoexecError, ValueError):
    """The playbook itself is invalid: a rule that does not parse, an unknown field, a bad limit."""


class InsightValidationError(AutoexecError, ValueError):
    """The insight DataFrame cannot be routed: missing columns, duplicate ids, NaN scores."""


class ChannelConfigError(AutoexecError, ValueError):
    """A channel is misconfigured or cannot serve the rows routed to it (bad address, host, template)."""


class PlanError(AutoexecError, ValueError):
    """A plan cannot be executed as given (an action without a channel, a partition mismatch)."""


class ApprovalError(AutoexecError, ValueError):
    """A decision cannot be applied: an unknown request or one no longer pending, a decider who is
    not listed, a second decision by the same person, or a payload that changed since the request.

    Nothing is recorded when it is raised.
    """


class EscalationError(AutoexecError, ValueError):
    """A decision on escalations cannot be applied: an unknown key, an escalation that is no
    longer open, one without a proposed action to approve, a decider who may not decide, a missing
    note, or a filter or sort column that cannot be used. Nothing is written when it is raised."""


class LedgerError(AutoexecError):
    """The action ledger cannot be opened, migrated or written."""


class ChannelError(AutoexecError):
    """A delivery attempt failed.

    Args:
        message: What went wrong, without secrets or personal data.
        retryable: Whether another attempt with the same idempotency key may succeed.
        retry_after: Seconds the destination asked us to wait (``Retry-After``), if it said.
    """

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class TransientChannelError(ChannelError):
    """A failure worth retrying: timeouts, connection resets, 429, 5xx."""

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message, retryable=True, retry_after=retry_after)


class PermanentChannelError(ChannelError):
    """A failure that another attempt cannot fix: 4xx other than 429, a rejected recipient."""

    def __init__(self, message: str):
        super().__init__(message, retryable=False)


class ExperimentError(AutoexecError, ValueError):
    """An experiment or its outcomes cannot be used as given: a metric the outcomes lack or that
    is not numeric, outcome rows repeated on (entity, time), a variant that overrides a field its
    channel does not have, two experiments on one action, or variants changed while the
    experiment runs. Nothing is written when it is raised."""
