"""Deliver by calling a Python function: for destinations that come with a client library.

The function receives the :class:`~autoexec_dagster.channels.base.ActionRequest` (use its
``idempotency_key`` when the destination accepts one) and returns an optional receipt string, a
mapping (kept, bounded, as the step's output for later workflow steps) or a
:class:`~autoexec_dagster.channels.base.Delivered`. It may be ``async def`` (awaited on the executor's loop) or a plain function (run in a thread pool
of ``max_concurrency`` threads, at most 64).

Errors: a :class:`~autoexec_dagster.errors.ChannelError` it raises passes through unchanged, so
the function decides (``raise PermanentChannelError(...)``). Any other exception is transient
(retried up to ``max_attempts``) unless its class name, or the name of one of its base classes,
is listed in ``permanent_errors`` (``"ValueError"`` or ``"mylib.errors.Rejected"``).

A resource's fields must be configuration, so the function is named by import path
(``"package.module:attribute"``). :meth:`PythonChannel.from_callable` takes the callable itself:
it registers it in this process under a stable name, stored in ``function``, so the channel keeps
working when Dagster rebuilds the resource from its configuration in a run.
"""

import asyncio
import importlib
import inspect
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import pandas as pd
from pydantic import Field, PrivateAttr

from autoexec_dagster.channels.base import ActionRequest, Channel, Delivered
from autoexec_dagster.errors import (
    ChannelConfigError,
    ChannelError,
    PermanentChannelError,
    TransientChannelError,
)

DeliveryFunction = Callable[[ActionRequest], Any]

_REGISTERED_PREFIX = "registered:"
# Callables given to from_callable, by the name stored in the resource's `function` field.
_REGISTRY: dict[str, DeliveryFunction] = {}
_MAX_WORKERS = 64


def register_callable(fn: DeliveryFunction) -> str:
    """Register ``fn`` for :class:`PythonChannel` and return the name to put in ``function``.

    The name is ``registered:<module>:<qualname>``, with ``#2``, ``#3``.. added when different
    callables share a qualified name (lambdas, closures). Re-importing the definitions in another
    process registers the same callables in the same order, so the names match there too.
    """
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    base = f"{_REGISTERED_PREFIX}{module}:{qualname}"
    name, number = base, 1
    while name in _REGISTRY and _REGISTRY[name] is not fn:
        number += 1
        name = f"{base}#{number}"
    _REGISTRY[name] = fn
    return name


def _import_path_of(fn: Any) -> str | None:
    # A module-level function is named by its import path, which works in any process.
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    target: Any = sys.modules.get(module)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return f"{module}:{qualname}" if target is fn else None


def resolve_function(path: str) -> DeliveryFunction:
    """Find the function named by ``"package.module:attribute"`` (or a registered name).

    Raises:
        ChannelConfigError: The path is malformed, the module or attribute does not exist, or the
            attribute is not callable.
    """
    if path.startswith(_REGISTERED_PREFIX):
        fn = _REGISTRY.get(path)
        if fn is None:
            raise ChannelConfigError(
                f"PythonChannel: function {path!r} was registered by PythonChannel.from_callable "
                "in another process and is not registered here; import the module that builds "
                "the channel, or name an importable 'package.module:attribute'"
            )
        return fn
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ChannelConfigError(
            f"PythonChannel: function {path!r} must look like 'package.module:attribute'"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ChannelConfigError(
            f"PythonChannel: function {path!r}: cannot import module {module_name!r}: {exc}"
        ) from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ChannelConfigError(
                f"PythonChannel: function {path!r}: module {module_name!r} has no attribute "
                f"{attribute!r}"
            ) from None
    if not callable(target):
        raise ChannelConfigError(
            f"PythonChannel: function {path!r} is a {type(target).__name__}, not a callable"
        )
    return target


def _is_async(fn: Any) -> bool:
    # Also an instance whose class defines `async def __call__`.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _delivered(result: Any) -> Delivered:
    """A callable's return value: a mapping is the step output, anything else the receipt."""
    if isinstance(result, Delivered):
        return result
    if result is None:
        return Delivered(receipt="ok")
    if isinstance(result, Mapping):
        return Delivered(receipt="ok", output=dict(result))
    return Delivered(receipt=str(result)[:200])


class _PythonSender:
    def __init__(
        self, channel: "PythonChannel", fn: DeliveryFunction, executor: ThreadPoolExecutor
    ):
        self._fn = fn
        self._async = _is_async(fn)
        self._executor = executor
        self._permanent = frozenset(channel.permanent_errors)
        self._name = channel.function or getattr(fn, "__qualname__", "callable")

    def _is_permanent(self, exc: BaseException) -> bool:
        for cls in type(exc).__mro__:
            if cls.__name__ in self._permanent or (
                f"{cls.__module__}.{cls.__qualname__}" in self._permanent
            ):
                return True
        return False

    async def send(self, request: ActionRequest) -> Delivered:
        try:
            if self._async:
                result = await self._fn(request)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._executor, self._fn, request)
                if inspect.isawaitable(result):
                    result = await result
        except ChannelError:
            raise
        except Exception as exc:
            message = f"PythonChannel {self._name}: {type(exc).__name__}: {exc}"[:500]
            if self._is_permanent(exc):
                raise PermanentChannelError(message) from exc
            raise TransientChannelError(message) from exc
        return _delivered(result)


class PythonChannel(Channel):
    """Call a Python function once per action attempt.

    Build it with ``PythonChannel(function="package.module:attribute")`` or
    ``PythonChannel.from_callable(fn)``.
    """

    function: str | None = Field(
        default=None,
        description="Import path 'package.module:attribute' of the delivery function.",
    )
    permanent_errors: list[str] = Field(
        default_factory=list,
        description="Exception class names (bare or module-qualified) that are permanent "
        "failures; other exceptions are retried. ChannelError subclasses pass through as raised.",
    )
    _callable: DeliveryFunction | None = PrivateAttr(default=None)

    @classmethod
    def from_callable(cls, fn: DeliveryFunction, **fields: Any) -> "PythonChannel":
        """A channel that calls ``fn``.

        Args:
            fn: Sync or async function taking an ActionRequest and returning an optional receipt.
            **fields: Other fields of the channel (``max_concurrency``, ``permanent_errors``..).

        Raises:
            ChannelConfigError: ``fn`` is not callable.
        """
        if not callable(fn):
            raise ChannelConfigError(
                f"PythonChannel.from_callable needs a callable, got {type(fn).__name__}"
            )
        channel = cls(function=_import_path_of(fn) or register_callable(fn), **fields)
        channel._callable = fn
        return channel

    def resolve(self) -> DeliveryFunction:
        """The delivery function.

        Raises:
            ChannelConfigError: No function is configured or its path does not resolve.
        """
        if self._callable is not None:
            return self._callable
        if not self.function:
            raise ChannelConfigError(
                "PythonChannel: no function configured; set function='package.module:attribute' "
                "or use PythonChannel.from_callable(fn)"
            )
        return resolve_function(self.function)

    def validate_rows(self, rows: pd.DataFrame) -> None:
        """Check that the function resolves (imports) and is callable.

        Raises:
            ChannelConfigError: Names the path and what is wrong with it.
        """
        super().validate_rows(rows)
        self.resolve()

    @asynccontextmanager
    async def open_sender(self) -> AsyncIterator[_PythonSender]:
        """Resolve the function and start the thread pool for synchronous functions."""
        fn = self.resolve()
        executor = ThreadPoolExecutor(
            max_workers=min(self.max_concurrency, _MAX_WORKERS),
            thread_name_prefix="autoexec-python",
        )
        try:
            yield _PythonSender(self, fn, executor)
        finally:
            # In a thread: a call still running (after a cancellation) must not block the loop.
            await asyncio.to_thread(executor.shutdown, wait=True)

    def describe(self) -> dict[str, Any]:
        """The function's name."""
        return {**super().describe(), "function": self.function}
