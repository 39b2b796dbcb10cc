"""Generic statistics the reports and evaluations share: intervals, differences, drift tests, metric labels.

Core layer (numpy/scipy only). Nothing here knows about calibration or DSPy, so the evaluation and the calibrator
both use it without importing each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats

from markovscale_dspy._exceptions import DataError

__all__ = [
    "PARTIAL_SCORE",
    "PairedDifference",
    "binomial_interval",
    "difference_interval",
    "homogeneity_test",
    "paired_difference",
    "score_to_label",
]


#: Start of the error for a partial-credit score met without a threshold (callers look for it).
PARTIAL_SCORE = "metric returned a partial score"


def score_to_label(score: Any, threshold: float | None = None) -> bool:
    """Turn a metric's return value (bool, number, or a Prediction with ``.score``) into correct / wrong.

    Without a ``threshold`` only all-or-nothing scores are accepted (``True``/``False``, 1/0); a partial score
    such as 0.8 raises DataError asking for one, because no default cut-off is right for every metric.

    Example:
        >>> score_to_label(True), score_to_label(1.0), score_to_label(0.8, 0.5), score_to_label(0.1, 0.5)
        (True, True, True, False)
    """
    value = getattr(score, "score", score)
    if isinstance(value, bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"metric returned {score!r}; expected a bool, a number or a Prediction with .score") from None
    if math.isnan(number):
        raise DataError("metric returned NaN")
    if threshold is None:
        if number not in (0.0, 1.0):
            raise DataError(
                f"{PARTIAL_SCORE} ({number!r}); say which scores count as correct with threshold=..., e.g. "
                "MarkovCalibrator(metric, threshold=0.5)"
            )
        return number == 1.0
    return number >= threshold


def binomial_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Jeffreys interval of a binomial proportion ``k / n`` (``nan`` bounds when ``n == 0``).

    Example:
        >>> lo, hi = binomial_interval(40, 100)
        >>> round(lo, 3), round(hi, 3)
        (0.308, 0.498)
    """
    if n == 0:
        return float("nan"), float("nan")
    lo, hi = stats.beta(k + 0.5, n - k + 0.5).interval(level)
    return float(0.0 if k == 0 else lo), float(1.0 if k == n else hi)


def difference_interval(
    correct_a: int, n_a: int, correct_b: int, n_b: int, level: float = 0.95
) -> tuple[float, float, float]:
    """Difference of two independent proportions ``a - b`` with a normal-approximation interval."""
    pa = correct_a / n_a if n_a else math.nan
    pb = correct_b / n_b if n_b else math.nan
    diff = pa - pb
    var = sum(p * (1 - p) / n for p, n in ((pa, n_a), (pb, n_b)) if n)
    half = float(stats.norm.ppf(0.5 + level / 2)) * math.sqrt(var)
    return diff, diff - half, diff + half


def homogeneity_test(rows: Sequence[tuple[int, int]]) -> tuple[float, float] | None:
    """Chi-square test that every row ``(hits, misses)`` has the same rate; ``None`` when it cannot be run."""
    rows = [(h, m) for h, m in rows if h + m > 0]
    if len(rows) < 2 or sum(h for h, _ in rows) == 0 or sum(m for _, m in rows) == 0:
        return None
    chi2, p_value, _, _ = stats.chi2_contingency([list(r) for r in rows])
    return float(chi2), float(p_value)


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of ``a`` minus accuracy of ``b`` measured on the same questions.

    Attributes:
        n: Questions both methods answered.
        diff: ``acc(a) - acc(b)``.
        lo: Lower end of the interval at ``level``.
        hi: Upper end.
        p_value: Exact McNemar test (two-sided binomial on the discordant questions) of "no difference".
        a_only: Questions ``a`` got right and ``b`` wrong.
        b_only: Questions ``b`` got right and ``a`` wrong.
        level: Confidence level of the interval.
    """

    n: int
    diff: float
    lo: float
    hi: float
    p_value: float
    a_only: int
    b_only: int
    level: float = 0.95


def paired_difference(a: Sequence[bool], b: Sequence[bool], level: float = 0.95) -> PairedDifference:
    """Paired comparison of two methods' correctness on the same questions (``a[i]``, ``b[i]``: question ``i``).

    Only the discordant questions carry information: the interval is the normal interval of the paired
    difference (variance ``(a_only + b_only - n diff^2) / n^2``), the p-value McNemar's exact test. Pairing removes
    the between-question variance that an independent-samples interval would count twice.

    Example:
        >>> d = paired_difference([True] * 30 + [False] * 70, [True] * 20 + [False] * 80)
        >>> d.diff, d.a_only, d.b_only, round(d.p_value, 4)
        (0.1, 10, 0, 0.002)
    """
    if len(a) != len(b):
        raise DataError(f"paired results need one label per question on both sides, got {len(a)} and {len(b)}")
    n = len(a)
    a_only = sum(bool(x) and not bool(y) for x, y in zip(a, b, strict=True))
    b_only = sum(bool(y) and not bool(x) for x, y in zip(a, b, strict=True))
    if n == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan, math.nan, 0, 0, level)
    diff = (a_only - b_only) / n
    var = max(a_only + b_only - n * diff**2, 0.0) / n**2
    half = float(stats.norm.ppf(0.5 + level / 2)) * math.sqrt(var)
    discordant = a_only + b_only
    p_value = 1.0 if discordant == 0 else float(stats.binomtest(a_only, discordant, 0.5).pvalue)
    return PairedDifference(n, diff, diff - half, diff + half, p_value, a_only, b_only, level)
