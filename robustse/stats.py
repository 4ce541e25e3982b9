"""Statistics: confidence intervals for the numbers robustse reports."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, *, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    Better behaved than the normal approximation near 0 and 1, where robust accuracies live.

    Raises:
        ValueError: if ``n < 1`` or ``successes`` is outside ``[0, n]``.

    Example:
        >>> lo, hi = wilson_interval(92, 100)
        >>> round(lo, 3), round(hi, 3)
        (0.85, 0.959)
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1 (got {successes}/{n})")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
