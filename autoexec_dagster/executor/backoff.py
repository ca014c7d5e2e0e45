"""Retry waits: exponential backoff with full jitter, honouring Retry-After."""

import random


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before attempt ``attempt + 1``.

    Full jitter (a uniform draw below the exponential bound) spreads retries of many actions that
    failed together, so a recovering destination is not hit by a synchronised wave. A destination's
    ``Retry-After`` is a floor: we never come back sooner than it asked, but never wait past ``cap``.

    Args:
        attempt: The attempt that just failed, 1-based.
        base: Bound of the first wait.
        cap: Largest wait.
        retry_after: Seconds the destination asked for, if any.
        rng: Random source (seeded in tests).
    """
    draw = (rng or random).uniform(0.0, min(cap, base * (2 ** (attempt - 1))))
    if retry_after is not None and retry_after > 0:
        draw = max(draw, retry_after)
    return min(draw, cap)
