"""Counters for the tests that prove a run loads and routes its insight once.

:class:`CountingIOManager` stores insight partitions in memory and counts every load and every
time Dagster builds it (once per batched value loader, once per run); :func:`count_routing`
counts calls of :func:`autoexec_dagster.routing.route` wherever the library imported it.
"""

import contextlib
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pytest

import autoexec_dagster.routing as routing


@dataclass
class Counts:
    """What the counting IO manager and the routing spy saw.

    Attributes:
        loads: Insight values loaded, per partition key.
        builds: Times Dagster built the IO manager.
        routes: Calls of ``route``.
    """

    loads: dict[str, int] = field(default_factory=dict)
    builds: int = 0
    routes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def total_loads(self) -> int:
        """All loads, any partition."""
        return sum(self.loads.values())

    def reset(self) -> None:
        """Start counting from zero again (the stored values stay)."""
        with self.lock:
            self.loads.clear()
            self.builds = 0
            self.routes = 0


class CountingIOManager(dg.IOManager):
    """An in-memory IO manager for the insight that counts loads per partition."""

    def __init__(self, counts: Counts, store: dict[str, Any]) -> None:
        self.counts = counts
        self.store = store

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        """Keep the value under its partition key."""
        self.store[context.partition_key if context.has_partition_key else ""] = obj

    def load_input(self, context: dg.InputContext) -> Any:
        """Return the stored value and count the load."""
        key = context.partition_key if context.has_partition_key else ""
        with self.counts.lock:
            self.counts.loads[key] = self.counts.loads.get(key, 0) + 1
        return self.store[key]


def counting_io_manager(counts: Counts, store: dict[str, Any]) -> dg.IOManagerDefinition:
    """A resource definition building a :class:`CountingIOManager`, counting each build."""

    @dg.io_manager
    def _counting(_init: Any) -> CountingIOManager:
        with counts.lock:
            counts.builds += 1
        return CountingIOManager(counts, store)

    return _counting


@contextlib.contextmanager
def count_routing(monkeypatch: pytest.MonkeyPatch, counts: Counts) -> Iterator[None]:
    """Count every call of ``route``, in every library module that imported it."""
    original = routing.route

    def spy(*args: Any, **kwargs: Any) -> Any:
        with counts.lock:
            counts.routes += 1
        return original(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("autoexec_dagster") and getattr(module, "route", None) is original:
            monkeypatch.setattr(module, "route", spy)
    yield
