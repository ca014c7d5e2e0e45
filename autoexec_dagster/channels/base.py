"""The contract every delivery channel keeps.

A channel is a Dagster ``ConfigurableResource`` (so it can be bound in Definitions and configured
with ``dg.EnvVar`` secrets) that the executor drives in three steps:

1. ``validate_rows(rows)`` before anything is sent: raise :class:`ChannelConfigError` naming the
   first bad value (invalid address, template failure, host not allowed). No side effects.
2. ``open_sender()``: an async context manager holding connections for one batch.
3. ``await sender.send(request)`` once per attempt. On success return :class:`Delivered` (a
   short receipt and, optionally, the reply's JSON output that later steps may read) or just the
   receipt text; on failure raise :class:`TransientChannelError` (retried, honouring
   ``retry_after``) or :class:`PermanentChannelError` (not retried). The idempotency key must
   travel with the request (header, Message-ID, natural key) so a receiver can deduplicate.

Everything that can fail before the side effect (rendering, digests) is computed before ``send``;
after it, the executor only records the outcome, so a delivered action is never left unrecorded.
"""

import hashlib
import json
import os
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import dagster as dg
import pandas as pd
from pydantic import Field

Delivery = Literal["at_least_once", "at_most_once"]


@dataclass(frozen=True, slots=True)
class ActionRequest:
    """One delivery attempt of one action, as a channel sees it.

    Attributes:
        idempotency_key: Deterministic key of the action; identical on every retry and re-run.
        entity_id: The entity the action is for, as a string.
        action: The playbook action name (the key of the channel in ``channels``).
        playbook: Playbook name.
        playbook_version: Playbook version the key was derived from.
        insight: The insight asset the entity was flagged in.
        partition_key: The insight partition.
        rule: The rule that chose this action.
        data: The entity's row from the plan (input columns plus routing columns).
        attempt: 1 for the first attempt, 2 for the first retry, and so on.
        variant: The experiment variant the request is sent with (its overrides are already
            applied to the channel's fields), or None outside experiments.
    """

    idempotency_key: str
    entity_id: str
    action: str
    playbook: str
    playbook_version: str
    insight: str
    partition_key: str
    rule: str
    data: Mapping[str, Any] = field(default_factory=dict)
    attempt: int = 1
    variant: str | None = None


@dataclass(frozen=True, slots=True)
class Delivered:
    """A delivered request: the channel's result on success.

    Attributes:
        receipt: Short status for the ledger and people, such as ``"HTTP 200"``.
        output: The reply as JSON-able data (a webhook's JSON body, a callable's dict, a row),
            stored bounded in the ledger for later workflow steps; None when there is none.
    """

    receipt: str
    output: Mapping[str, Any] | None = None


def as_delivered(result: "Delivered | str | Any") -> Delivered:
    """Normalise what ``Sender.send`` returned; never raises (the action was delivered)."""
    if isinstance(result, Delivered):
        return result
    if isinstance(result, str):
        return Delivered(receipt=result)
    try:
        return Delivered(receipt=repr(result)[:200])
    except Exception:
        return Delivered(receipt=f"delivered ({type(result).__name__})")


class Sender(Protocol):
    """An open connection to a destination, valid for one batch."""

    async def send(self, request: ActionRequest) -> "Delivered | str":
        """Deliver one request; return :class:`Delivered` or a short receipt (``"HTTP 200"``)."""
        ...


def resolve_secret(value: str | None) -> str | None:
    """Return the value of a secret field, reading ``dg.EnvVar`` from the environment.

    Outside a Dagster run a resource's ``dg.EnvVar`` field is still the unresolved variable name;
    this reads it so channels work the same in ``execute_plan`` and in a Dagster run.

    Raises:
        ChannelConfigError: The environment variable is not set.
    """
    if value is None:
        return None
    if isinstance(value, dg.EnvVar):
        resolved = os.environ.get(value.env_var_name)
        if resolved is None:
            # Imported here: errors imports nothing from channels, keep it that way.
            from autoexec_dagster.errors import ChannelConfigError

            raise ChannelConfigError(
                f"environment variable {value.env_var_name!r} (a channel secret) is not set"
            )
        return resolved
    return value


def digest(parts: Mapping[str, Any]) -> str:
    """A SHA-256 digest of what was requested, stored in the ledger instead of the payload."""
    encoded = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()


class Channel(dg.ConfigurableResource):
    """Base class of delivery channels.

    Subclasses implement :meth:`validate_rows`, :meth:`open_sender` and :meth:`request_digest`.
    The fields here tune how the executor drives the channel.
    """

    max_concurrency: int = Field(
        default=32, ge=1, le=2048, description="Requests in flight at once for this channel."
    )
    rate_limit_per_second: float = Field(
        default=0.0, ge=0.0, description="Token-bucket limit on attempts per second; 0 = none."
    )
    max_attempts: int = Field(
        default=5, ge=1, le=50, description="Attempts per action, the first included."
    )
    backoff_base_seconds: float = Field(
        default=0.2, ge=0.0, description="First retry waits up to this long (full jitter)."
    )
    backoff_max_seconds: float = Field(
        default=30.0, ge=0.0, description="Upper bound of one backoff wait, Retry-After included."
    )
    circuit_breaker_threshold: int = Field(
        default=20,
        ge=1,
        description="Consecutive failed attempts that open the circuit; the channel's remaining "
        "actions in the batch are then escalated instead of sent.",
    )
    delivery: Delivery = Field(
        default="at_least_once",
        description="at_least_once: actions left in doubt by a crash are resent with the same key. "
        "at_most_once: they are escalated for a person to reconcile.",
    )

    def required_columns(self) -> set[str]:
        """Plan columns this channel reads (checked before anything is sent)."""
        return set()

    def validate_rows(self, rows: pd.DataFrame) -> None:
        """Check every row routed to this channel; raise ChannelConfigError on the first bad one."""
        missing = self.required_columns() - set(rows.columns)
        if missing:
            from autoexec_dagster.errors import ChannelConfigError

            raise ChannelConfigError(
                f"{type(self).__name__} needs column(s) {sorted(missing)} that the plan does not have"
            )

    def open_sender(self) -> AbstractAsyncContextManager[Sender]:
        """Open connections for one batch."""
        raise NotImplementedError

    def request_digest(self, request: ActionRequest) -> str:
        """Digest of the request as sent, without secrets or the personal payload."""
        return digest({"key": request.idempotency_key, "action": request.action})

    def describe(self) -> dict[str, Any]:
        """Non-secret description for metadata and logs."""
        return {"type": type(self).__name__, "delivery": self.delivery}
