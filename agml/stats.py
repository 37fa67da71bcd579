"""Rates with 95% Wilson intervals, and mean/spread over seeds.

Wilson's score interval stays inside [0, 1] and is sensible for small n and rates near 0 or 1, where the normal
approximation is not: with 26 of 30 probes passing, 86.7% [70.3, 94.7].
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from agml.errors import InputError

Z_95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """(low, high) of the Wilson score interval for successes/n; None when n == 0."""
    if n < 0 or not 0 <= successes <= n:
        raise InputError(f"a rate needs 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(successes: int, n: int) -> dict:
    """{"rate", "low", "high", "successes", "n"}; the rate and interval are None when n == 0."""
    interval = wilson_interval(successes, n)
    return {
        "rate": successes / n if n else None,
        "low": interval[0] if interval else None,
        "high": interval[1] if interval else None,
        "successes": successes,
        "n": n,
    }


def rate_of(flags: Sequence[bool]) -> dict:
    """`rate` of a list of pass/fail flags."""
    return rate(sum(bool(f) for f in flags), len(flags))


def format_rate(successes: int, n: int) -> str:
    """'86.7% [70.3, 94.7]' (percentages, one decimal); '-' when n == 0."""
    interval = wilson_interval(successes, n)
    if interval is None:
        return "-"
    return f"{100 * successes / n:.1f}% [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def spread(values: Sequence[float | None]) -> dict:
    """Mean, sample standard deviation (n - 1; 0.0 for one value), min and max over seeds; None values are skipped."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(kept),
        "std": statistics.stdev(kept) if len(kept) > 1 else 0.0,
        "min": min(kept),
        "max": max(kept),
        "n": len(kept),
    }


def format_spread(values: Sequence[float | None], percent: bool = True) -> str:
    """'85.6% ± 2.2 (83.3-88.0, 3 seeds)' for rates in [0, 1] (percent=True), plain numbers otherwise."""
    summary = spread(values)
    if summary["n"] == 0:
        return "-"
    scale, unit = (100.0, "%") if percent else (1.0, "")
    mean, std, low, high = (scale * summary[k] for k in ("mean", "std", "min", "max"))
    seeds = "seed" if summary["n"] == 1 else "seeds"
    return f"{mean:.1f}{unit} ± {std:.1f} ({low:.1f}-{high:.1f}, {summary['n']} {seeds})"
