"""Closed-form theory of sequential refinement as a two-state Markov chain.

Correctness across refinement rounds is a Markov chain over {correct, wrong} with

* ``p0``   -- P(round 0 is correct), the single-pass accuracy;
* ``p_cw`` -- P(wrong at t+1 | correct at t): a refinement breaks a correct answer;
* ``p_wc`` -- P(correct at t+1 | wrong at t): a refinement fixes a wrong answer.

One step maps accuracy ``p`` to ``p_wc + lam * p`` with ``lam = 1 - p_cw - p_wc``, so after ``t`` rounds
``p_t = pi + (p0 - pi) * lam**t`` where ``pi = p_wc / (p_cw + p_wc)`` is the stationary accuracy.

Everything here is a pure function of floats (numpy only, no DSPy), so the maths can be tested and reused
without a language model. See ``THEORY.md`` in the project notes for the derivations.

Example:
    >>> from markovscale_dspy.core import theory
    >>> theory.regime(0.4, 0.1, 0.3)
    'improving'
    >>> round(theory.stationary_accuracy(0.1, 0.3), 3)
    0.75
    >>> theory.optimal_rounds(0.4, 0.1, 0.3, round_cost=0.01)
    6
"""

from __future__ import annotations

import math
from typing import overload

import numpy as np

from markovscale_dspy._exceptions import ConfigurationError
from markovscale_dspy.core.validation import check_int, check_probability

__all__ = [
    "BOUND_KIND",
    "TIE_TOLERANCE",
    "accuracy_at",
    "convergence_rate",
    "improves",
    "one_step_gain",
    "optimal_rounds",
    "regime",
    "rounds_to_target",
    "stationary_accuracy",
]

#: What the stationary accuracy is to the refinement curve, by regime: the bound it rises to or falls to.
BOUND_KIND = {"improving": "upper", "degrading": "lower", "neutral": "neutral"}

#: Two objective values closer than this are a tie (ties go to fewer rounds).
TIE_TOLERANCE = 1e-12


def _check_chain(p_cw: float, p_wc: float) -> tuple[float, float]:
    return check_probability("p_cw", p_cw), check_probability("p_wc", p_wc)


def _is_frozen(p_cw: float, p_wc: float) -> bool:
    # A chain that never moves: every round reproduces the previous state.
    return p_cw + p_wc == 0.0


def stationary_accuracy(p_cw: float, p_wc: float) -> float:
    """Accuracy the chain converges to (its fixed point): ``p_wc / (p_cw + p_wc)``.

    It is the upper bound refinement approaches in the improving regime and the lower bound it decays to in the
    degrading regime (exactly so for non-oscillating chains).

    Raises:
        ValueError: a probability is outside [0, 1], or the chain is frozen (``p_cw + p_wc == 0``), where every
            starting accuracy is stationary.
    """
    p_cw, p_wc = _check_chain(p_cw, p_wc)
    if _is_frozen(p_cw, p_wc):
        raise ConfigurationError(
            "the chain is frozen (p_cw + p_wc == 0): refinement never changes correctness, so there is no "
            "unique stationary accuracy; accuracy stays at p0"
        )
    return p_wc / (p_cw + p_wc)


def convergence_rate(p_cw: float, p_wc: float) -> float:
    """Factor ``|1 - p_cw - p_wc|`` by which the distance to the stationary accuracy shrinks per round."""
    p_cw, p_wc = _check_chain(p_cw, p_wc)
    return abs(1.0 - p_cw - p_wc)


def one_step_gain(p0: float, p_cw: float, p_wc: float) -> float:
    """Expected accuracy change of one refinement round from accuracy ``p0``: ``p_wc (1 - p0) - p_cw p0``."""
    p0 = check_probability("p0", p0)
    p_cw, p_wc = _check_chain(p_cw, p_wc)
    return p_wc * (1.0 - p0) - p_cw * p0


def improves(p0: float, p_cw: float, p_wc: float) -> bool:
    """Whether one more round strictly raises expected accuracy (expected fixes exceed expected breaks)."""
    return one_step_gain(p0, p_cw, p_wc) > TIE_TOLERANCE


def regime(p0: float, p_cw: float, p_wc: float) -> str:
    """Classify refinement from accuracy ``p0``: ``"improving"``, ``"neutral"`` or ``"degrading"``.

    The sign of the one-step gain decides; a frozen chain is ``"neutral"``.
    """
    gain = one_step_gain(p0, p_cw, p_wc)
    if gain > TIE_TOLERANCE:
        return "improving"
    if gain < -TIE_TOLERANCE:
        return "degrading"
    return "neutral"


@overload
def accuracy_at(t: int, p0: float, p_cw: float, p_wc: float) -> float: ...
@overload
def accuracy_at(t: np.ndarray, p0: float, p_cw: float, p_wc: float) -> np.ndarray: ...
def accuracy_at(t, p0, p_cw, p_wc):
    """Exact expected accuracy after ``t`` refinement rounds: ``pi + (p0 - pi) * lam**t``.

    Args:
        t: A non-negative integer, or an array of them (the result then has the same shape).
        p0: Single-pass accuracy.
        p_cw: P(correct -> wrong) per round.
        p_wc: P(wrong -> correct) per round.

    Returns:
        A float for scalar ``t``, a float array otherwise.
    """
    p0 = check_probability("p0", p0)
    p_cw, p_wc = _check_chain(p_cw, p_wc)
    t_arr = np.asarray(t)
    if t_arr.dtype == bool or not np.issubdtype(t_arr.dtype, np.number):
        raise ConfigurationError(f"t must be a non-negative integer or an array of them, got {t!r}")
    if t_arr.size and (np.any(t_arr < 0) or np.any(t_arr != np.floor(t_arr))):
        raise ConfigurationError(f"t must be a non-negative integer or an array of them, got {t!r}")
    t_int = t_arr.astype(np.int64)
    if _is_frozen(p_cw, p_wc):
        out = np.full(t_int.shape, p0, dtype=float)
    else:
        pi = p_wc / (p_cw + p_wc)
        lam = 1.0 - p_cw - p_wc
        # Integer powers keep the sign of a negative lam (oscillating chains) exact.
        out = pi + (p0 - pi) * np.power(lam, t_int.astype(float))
        # lam**0 == 1 exactly, but keep round 0 bit-identical to p0 regardless of rounding in pi.
        out = np.where(t_int == 0, p0, out)
    return float(out) if np.ndim(t) == 0 else out


def _objective(t: int, p0: float, p_cw: float, p_wc: float, round_cost: float) -> float:
    return accuracy_at(t, p0, p_cw, p_wc) - round_cost * t


def optimal_rounds(p0: float, p_cw: float, p_wc: float, round_cost: float = 0.0, max_rounds: int = 8) -> int:
    """Number of refinement rounds ``T`` in ``[0, max_rounds]`` maximising ``accuracy_at(T) - round_cost * T``.

    Ties (within :data:`TIE_TOLERANCE`) go to the smallest ``T``. In the degrading or neutral regime the answer is
    0. For ``0 < lam < 1`` the marginal gains are geometric and the closed form
    ``ceil(ln(c / g0) / ln(lam))`` is used; for oscillating (``lam < 0``) and re-sampling (``lam = 0``) chains the
    maximum is at round 0 or 1, which are compared directly.

    Args:
        p0: Single-pass accuracy.
        p_cw: P(correct -> wrong) per round.
        p_wc: P(wrong -> correct) per round.
        round_cost: Accuracy (as a fraction, e.g. 0.01 = one point) one refinement round must buy to be worth it.
        max_rounds: Largest number of refinement rounds allowed.

    Raises:
        ValueError: a probability is invalid, ``round_cost`` is negative or not finite, or ``max_rounds`` is not a
            non-negative integer.
    """
    p0 = check_probability("p0", p0)
    p_cw, p_wc = _check_chain(p_cw, p_wc)
    max_rounds = check_int("max_rounds", max_rounds, 0)
    c = float(round_cost)
    if math.isnan(c) or math.isinf(c) or c < 0:
        raise ConfigurationError(f"round_cost must be a finite number >= 0, got {round_cost!r}")

    if max_rounds == 0 or _is_frozen(p_cw, p_wc) or not improves(p0, p_cw, p_wc):
        return 0
    lam = 1.0 - p_cw - p_wc
    if lam <= 0.0:
        # p_1 is the highest accuracy the chain ever reaches from an improvable start, and later rounds only cost
        # more: compare 0 and 1.
        return 1 if _objective(1, p0, p_cw, p_wc, c) > _objective(0, p0, p_cw, p_wc, c) + TIE_TOLERANCE else 0

    # 0 < lam < 1 and p0 < pi: the gain of round t+1 is g0 * lam**t, positive and decreasing, so the objective is
    # concave and the exact argmax is the number of rounds whose gain exceeds c.
    g0 = one_step_gain(p0, p_cw, p_wc)
    if c == 0.0:
        best = max_rounds
    elif c >= g0:
        best = 0
    else:
        k = math.log(c / g0) / math.log(lam)
        best = min(max_rounds, max(0, math.ceil(k)))
        # Repair floating-point error in the logarithms: round `best` must gain more than c, round best+1 not.
        while best > 0 and g0 * lam ** (best - 1) <= c:
            best -= 1
        while best < max_rounds and g0 * lam**best > c:
            best += 1
    # Ties go to fewer rounds: the smallest T whose objective is within tolerance of the maximum. The objective is
    # increasing on [0, best], so bisect.
    target = _objective(best, p0, p_cw, p_wc, c) - TIE_TOLERANCE
    lo, hi = 0, best
    while lo < hi:
        mid = (lo + hi) // 2
        if _objective(mid, p0, p_cw, p_wc, c) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def rounds_to_target(p0: float, p_cw: float, p_wc: float, target: float, max_rounds: int | None = None) -> int | None:
    """Smallest number of rounds ``T`` with ``accuracy_at(T) >= target``, or ``None`` if it is never reached.

    Args:
        p0: Single-pass accuracy.
        p_cw: P(correct -> wrong) per round.
        p_wc: P(wrong -> correct) per round.
        target: Accuracy to reach, in [0, 1].
        max_rounds: If given, rounds beyond it do not count (``None`` is returned instead).
    """
    p0 = check_probability("p0", p0)
    p_cw, p_wc = _check_chain(p_cw, p_wc)
    target = check_probability("target", target)
    if max_rounds is not None:
        max_rounds = check_int("max_rounds", max_rounds, 0)

    def within(t: int | None) -> int | None:
        return t if t is not None and (max_rounds is None or t <= max_rounds) else None

    def reaches(t: int) -> bool:
        return accuracy_at(t, p0, p_cw, p_wc) >= target - TIE_TOLERANCE

    if reaches(0):
        return 0
    if _is_frozen(p_cw, p_wc) or not improves(p0, p_cw, p_wc):
        return None  # accuracy never rises above p0
    lam = 1.0 - p_cw - p_wc
    if lam <= 0.0:
        # Round 1 is the peak (odd rounds decrease towards pi from above, even rounds stay below pi).
        return within(1) if reaches(1) else None
    pi = p_wc / (p_cw + p_wc)
    if target >= pi - TIE_TOLERANCE:
        return None  # approached, never reached
    t = max(1, math.ceil(math.log((pi - target) / (pi - p0)) / math.log(lam)))
    while t > 1 and reaches(t - 1):  # repair floating-point error
        t -= 1
    while not reaches(t):
        t += 1
    return within(t)
