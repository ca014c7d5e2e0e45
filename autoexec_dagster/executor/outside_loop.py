"""Running the library's async entry points from synchronous code."""

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_outside_loop(coroutine: Coroutine[Any, Any, T], *, name: str) -> T:
    """Run ``coroutine`` with ``asyncio.run``; refuse clearly inside a running event loop.

    Args:
        coroutine: The async form's coroutine.
        name: The sync function's name; the error says to await ``<name>_async()`` instead.

    Raises:
        RuntimeError: An event loop is already running in this thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    coroutine.close()  # never awaited: close it so Python does not warn about it
    raise RuntimeError(f"{name}() was called inside an event loop; await {name}_async()")
