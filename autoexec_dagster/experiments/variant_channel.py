"""One action, several variants: the action's channel with each variant's overrides applied.

The delivery engine drives one lane per action, so the action's concurrency, rate limit and
circuit breaker hold for all its variants together. :class:`VariantChannel` stands in for the
action's channel in that lane and hands each request to the copy of the channel that carries the
request's variant's overrides (``request.variant``); requests without a variant go to the channel
as configured.
"""

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pandas as pd
from pydantic import PrivateAttr

from autoexec_dagster.channels.base import ActionRequest, Channel, Delivered, Sender
from autoexec_dagster.errors import ChannelConfigError
from autoexec_dagster.experiments.experiment import (
    Experiment,
    channel_for_variant,
    check_variant_fields,
)


class _VariantSender:
    """Opens each variant's sender the first time a request needs it."""

    def __init__(self, channel: "VariantChannel", stack: AsyncExitStack):
        self._channel = channel
        self._stack = stack
        self._senders: dict[str | None, Sender] = {}
        self._lock = asyncio.Lock()

    async def send(self, request: ActionRequest) -> Delivered | str:
        sender = self._senders.get(request.variant)
        if sender is None:
            async with self._lock:
                sender = self._senders.get(request.variant)
                if sender is None:
                    target = self._channel.for_variant(request.variant)
                    sender = await self._stack.enter_async_context(target.open_sender())
                    self._senders[request.variant] = sender
        return await sender.send(request)


class VariantChannel(Channel):
    """An action's channel with its experiment's variants; built by :func:`with_variants`."""

    _base: Channel | None = PrivateAttr(default=None)
    _variants: dict[str, Channel] = PrivateAttr(default_factory=dict)

    @classmethod
    def wrap(cls, base: Channel, experiment: Experiment, *, action: str) -> "VariantChannel":
        """The channel ``base`` with one copy per variant of ``experiment``.

        Raises:
            ExperimentError: A variant overrides a field ``base`` does not have, or sets a value
                the field refuses.
        """
        check_variant_fields(experiment, base, action=action)
        wrapper = cls(**{name: getattr(base, name) for name in Channel.model_fields})
        wrapper._base = base
        wrapper._variants = {
            name: channel_for_variant(base, overrides)
            for name, overrides in experiment.variants.items()
        }
        return wrapper

    @property
    def base(self) -> Channel:
        """The channel as configured, without overrides."""
        if self._base is None:
            raise ChannelConfigError("VariantChannel must be built with VariantChannel.wrap")
        return self._base

    def for_variant(self, variant: str | None) -> Channel:
        """The channel a request of ``variant`` is sent through."""
        if variant is None:
            return self.base
        try:
            return self._variants[variant]
        except KeyError:
            raise ChannelConfigError(
                f"no variant {variant!r} in the experiment of this action; it has "
                f"{sorted(self._variants)}"
            ) from None

    def required_columns(self) -> set[str]:
        """Columns any variant reads."""
        columns = set(self.base.required_columns())
        for channel in self._variants.values():
            columns |= channel.required_columns()
        return columns

    def validate_rows(self, rows: pd.DataFrame) -> None:
        """Every variant must accept the rows (any of them may be drawn for any entity)."""
        self.base.validate_rows(rows)
        for name, channel in self._variants.items():
            try:
                channel.validate_rows(rows)
            except ChannelConfigError as exc:
                raise ChannelConfigError(f"variant {name!r}: {exc}") from None

    @asynccontextmanager
    async def open_sender(self) -> AsyncIterator[_VariantSender]:
        """Open senders lazily, one per variant met, and close them all at the end."""
        async with AsyncExitStack() as stack:
            yield _VariantSender(self, stack)

    def request_digest(self, request: ActionRequest) -> str:
        """The variant channel's digest of the request."""
        return self.for_variant(request.variant).request_digest(request)

    def describe(self) -> dict[str, Any]:
        """The base channel's description and the variants."""
        return {**self.base.describe(), "variants": sorted(self._variants)}


def with_variants(
    channels: Mapping[str, Channel], experiments: Mapping[str, Experiment]
) -> dict[str, Channel]:
    """``channels`` with the channel of each experiment's action (``experiments``: action ->
    experiment) wrapped in a :class:`VariantChannel`; actions without a channel are left for the
    plan's own check to report."""
    out = dict(channels)
    for action, experiment in experiments.items():
        channel = out.get(action)
        if isinstance(channel, Channel) and not isinstance(channel, VariantChannel):
            out[action] = VariantChannel.wrap(channel, experiment, action=action)
    return out
