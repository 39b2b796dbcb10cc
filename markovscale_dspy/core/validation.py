"""Argument checks, written once: each names the argument, the bad value and what is expected.

Core layer (no DSPy). Every public constructor and function validates through these helpers, so the same mistake
gets the same message everywhere, and ``bool`` is never accepted where a number is meant (``True`` is an ``int``
in Python, and ``max_rounds=True`` is a bug, not one round).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from markovscale_dspy._exceptions import ConfigurationError

__all__ = ["check_callable", "check_int", "check_number", "check_prior", "check_probability"]


def _is_number(value: Any) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None, *, none_ok: bool = False) -> Any:
    """``value`` as an ``int`` in ``[lo, hi]`` (either bound may be open), or raise ConfigurationError.

    Example:
        >>> check_int("max_rounds", 3, 0, 10)
        3
        >>> check_int("max_rounds", True, 0, 10)
        Traceback (most recent call last):
        ...
        markovscale_dspy.ConfigurationError: max_rounds must be an integer in [0, 10], got True
    """
    if value is None and none_ok:
        return None
    if (
        not (_is_number(value) and isinstance(value, (int, np.integer)))
        or (lo is not None and value < lo)
        or (hi is not None and value > hi)
    ):
        raise ConfigurationError(f"{name} must be {_kind(lo, hi)}{' or None' if none_ok else ''}, got {value!r}")
    return int(value)


def check_number(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    none_ok: bool = False,
    unit: str = "",
) -> Any:
    """``value`` as a finite ``float`` within the bounds (open or closed), or raise ConfigurationError."""
    if value is None and none_ok:
        return None
    ok = _is_number(value) and math.isfinite(float(value))
    if ok:
        x = float(value)
        ok = (lo is None or (x > lo if lo_open else x >= lo)) and (hi is None or (x < hi if hi_open else x <= hi))
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        where = (
            f"in {left}{lo}, {hi}{right}"
            if lo is not None and hi is not None
            else f"{'>' if lo_open else '>='} {lo}"
            if lo is not None
            else f"{'<' if hi_open else '<='} {hi}"
            if hi is not None
            else "finite"
        )
        suffix = f" ({unit})" if unit else ""
        raise ConfigurationError(
            f"{name} must be a number {where}{suffix}{' or None' if none_ok else ''}, got {value!r}"
        )
    return float(value)


def check_probability(name: str, value: Any) -> float:
    """``value`` as a probability in ``[0, 1]`` (numpy scalars accepted), or raise ConfigurationError."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if math.isnan(x) or not 0.0 <= x <= 1.0:
        raise ConfigurationError(f"{name} must be a probability in [0, 1], got {value!r}")
    return x


def check_prior(prior: Any) -> tuple[float, float]:
    """``(alpha, beta)`` of a Beta prior: two positive finite numbers."""
    try:
        a, b = (float(x) for x in prior)
    except (TypeError, ValueError):
        a = b = math.nan
    if not (a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)):
        raise ConfigurationError(f"prior must be a pair (alpha, beta) of positive numbers, got {prior!r}")
    return a, b


def check_callable(name: str, value: Any, how: str) -> Any:
    """``value`` itself if it is callable; ``how`` says how it is called (for the message)."""
    if not callable(value):
        raise ConfigurationError(f"{name} must be callable as {how}, got {value!r}")
    return value


def _kind(lo: int | None, hi: int | None) -> str:
    if hi is None and lo in (0, 1):
        return "a non-negative integer" if lo == 0 else "a positive integer"
    if lo is not None and hi is not None:
        return f"an integer in [{lo}, {hi}]"
    if lo is not None:
        return f"an integer >= {lo}"
    return f"an integer <= {hi}" if hi is not None else "an integer"
