"""A token bucket limiting attempts per second on one channel."""

import asyncio
import time


class TokenBucket:
    """Async token bucket: ``rate`` tokens per second, holding at most ``burst``.

    Args:
        rate: Tokens added per second; 0 or less disables the limit.
        burst: Bucket size; defaults to one second of tokens (at least 1).
    """

    def __init__(self, rate: float, burst: float | None = None):
        self.rate = rate
        self.capacity = max(1.0, burst if burst is not None else rate)
        self._tokens = self.capacity
        self._updated = time.monotonic()
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        """Whether the bucket limits anything."""
        return self.rate > 0

    async def acquire(self) -> None:
        """Wait until a token is available and take it."""
        if self.rate <= 0:
            return
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                # Pacing, not synchronisation: wait exactly until the next token exists.
                await asyncio.sleep((1.0 - self._tokens) / self.rate)
