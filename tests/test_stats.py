import pytest

from agml.errors import InputError
from agml.stats import format_rate, format_spread, rate, rate_of, spread, wilson_interval


def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(26, 30)
    assert (round(100 * low, 1), round(100 * high, 1)) == (70.3, 94.7)
    # Rates at the edges keep a non-degenerate interval inside [0, 1].
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(0.7225, abs=1e-4)
    assert wilson_interval(0, 0) is None
    with pytest.raises(InputError, match="successes"):
        wilson_interval(5, 3)


def test_rate_and_format():
    assert format_rate(26, 30) == "86.7% [70.3, 94.7]"
    assert format_rate(0, 0) == "-"
    assert rate_of([True, False, True, True]) == rate(3, 4)
    assert rate(3, 4)["rate"] == 0.75 and rate(0, 0)["rate"] is None


def test_spread_over_seeds():
    summary = spread([0.8, 0.9, None, 1.0])
    assert summary["mean"] == pytest.approx(0.9) and summary["std"] == pytest.approx(0.1)
    assert (summary["min"], summary["max"], summary["n"]) == (0.8, 1.0, 3)
    assert spread([0.5])["std"] == 0.0 and spread([None])["mean"] is None
    assert format_spread([0.8, 0.9, 1.0]) == "90.0% ± 10.0 (80.0-100.0, 3 seeds)"
    assert format_spread([2.5], percent=False) == "2.5 ± 0.0 (2.5-2.5, 1 seed)"
    assert format_spread([]) == "-"
