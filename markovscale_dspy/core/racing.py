"""Racing refiners by the chain's own objective: posterior draws, paired comparisons, elimination.

Several refiners (e.g. refinement instructions) are compared on the same round-0 answers, so they share ``p0``
and differ only in ``p_cw`` and ``p_wc``. A refiner's worth is what the deployed module gets from it: the expected
accuracy at the rounds the closed-form rule plans from its estimates, minus the round cost,
``V = accuracy_at(T*) - round_cost * T*``. Its posterior is drawn from the Beta posteriors of the rates, with the
*same* draws of ``p0`` for every refiner (common random numbers), so two refiners' draws are paired and the
uncertainty of round 0, which both share, cancels out of their difference.

Pure numpy functions (no DSPy): the optimizer that calls the LM is a thin layer on top.

Example:
    >>> import numpy as np
    >>> from markovscale_dspy.core.racing import RefinerCounts, prob_better, shared_p0_draws, value_draws
    >>> rng = np.random.default_rng(0)
    >>> p0 = shared_p0_draws(60, 100, draws=4000, rng=rng)
    >>> careful = value_draws(p0, RefinerCounts(n_cc=150, n_cw=3, n_wc=40, n_ww=107), max_rounds=3, rng=rng)
    >>> sloppy = value_draws(p0, RefinerCounts(n_cc=93, n_cw=60, n_wc=45, n_ww=102), max_rounds=3, rng=rng)
    >>> careful.rounds, sloppy.rounds, prob_better(careful.draws, sloppy.draws) > 0.99
    (3, 0, True)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from markovscale_dspy.core.theory import optimal_rounds
from markovscale_dspy.core.validation import check_int, check_prior, check_probability

__all__ = [
    "DEFAULT_DRAWS",
    "RefinerCounts",
    "RefinerValue",
    "gate",
    "prob_best",
    "prob_better",
    "shared_p0_draws",
    "value_draws",
]

#: Posterior draws per comparison: the Monte Carlo error of a probability near 0.95 is then about 0.002.
DEFAULT_DRAWS = 20_000


@dataclass(frozen=True)
class RefinerCounts:
    """A refiner's observed transitions (correct -> correct / wrong, wrong -> correct / wrong)."""

    n_cc: int = 0
    n_cw: int = 0
    n_wc: int = 0
    n_ww: int = 0

    def __post_init__(self) -> None:
        for name in ("n_cc", "n_cw", "n_wc", "n_ww"):
            check_int(name, getattr(self, name), 0)

    def __add__(self, other: RefinerCounts) -> RefinerCounts:
        return RefinerCounts(
            self.n_cc + other.n_cc, self.n_cw + other.n_cw, self.n_wc + other.n_wc, self.n_ww + other.n_ww
        )

    @classmethod
    def of_chain(cls, labels: Sequence[bool]) -> RefinerCounts:
        """The transitions of one chain of labels (round 0 first)."""
        pairs = list(itertools.pairwise(labels))
        return cls(
            n_cc=sum(a and b for a, b in pairs),
            n_cw=sum(a and not b for a, b in pairs),
            n_wc=sum(not a and b for a, b in pairs),
            n_ww=sum(not a and not b for a, b in pairs),
        )

    def means(self, prior: tuple[float, float] = (1.0, 1.0)) -> tuple[float, float]:
        """Posterior means of ``(p_cw, p_wc)``."""
        a, b = check_prior(prior)
        return (a + self.n_cw) / (a + b + self.n_cw + self.n_cc), (a + self.n_wc) / (a + b + self.n_wc + self.n_ww)


@dataclass(frozen=True)
class RefinerValue:
    """A refiner's posterior worth: the rounds the closed-form rule plans from its estimates and draws of
    ``accuracy_at(rounds) - round_cost * rounds``."""

    rounds: int
    draws: np.ndarray

    @property
    def mean(self) -> float:
        return float(self.draws.mean())


def shared_p0_draws(
    n_correct: int, n_total: int, *, draws: int = DEFAULT_DRAWS, prior: tuple[float, float] = (1.0, 1.0), rng=None
) -> np.ndarray:
    """Posterior draws of ``p0`` from the shared round-0 answers (reuse them for every refiner)."""
    check_int("n_total", n_total, 0)
    check_int("n_correct", n_correct, 0, n_total)
    a, b = check_prior(prior)
    return np.random.default_rng(rng).beta(a + n_correct, b + n_total - n_correct, size=check_int("draws", draws, 1))


def value_draws(
    p0: np.ndarray,
    counts: RefinerCounts,
    *,
    max_rounds: int,
    round_cost: float = 0.0,
    prior: tuple[float, float] = (1.0, 1.0),
    rng=None,
) -> RefinerValue:
    """Posterior draws of a refiner's worth, paired with the other refiners through the shared ``p0`` draws.

    The rounds are planned once, from the posterior means (as the deployed module plans them), and every draw is
    scored at those rounds: a refiner is worth what its module will do, not what it would do if its rates were
    known.
    """
    a, b = check_prior(prior)
    gen = np.random.default_rng(rng)
    p0 = np.asarray(p0, dtype=float)
    p_cw_mean, p_wc_mean = counts.means(prior)
    rounds = optimal_rounds(float(p0.mean()), p_cw_mean, p_wc_mean, round_cost, max_rounds)
    if rounds == 0:
        return RefinerValue(0, p0.copy())
    p_cw = gen.beta(a + counts.n_cw, b + counts.n_cc, size=p0.shape)
    p_wc = gen.beta(a + counts.n_wc, b + counts.n_ww, size=p0.shape)
    # One step maps accuracy p to p_wc + lam * p; iterate rather than divide by p_cw + p_wc (0 in a draw is fine).
    lam = 1.0 - p_cw - p_wc
    accuracy = p0.copy()
    for _ in range(rounds):
        accuracy = p_wc + lam * accuracy
    return RefinerValue(rounds, accuracy - round_cost * rounds)


def prob_better(a: np.ndarray, b: np.ndarray) -> float:
    """Posterior probability that the refiner with draws ``a`` is worth strictly more than the one with ``b``
    (paired draws; a tie, e.g. both planning no rounds, is not better)."""
    return float(np.mean(np.asarray(a) > np.asarray(b)))


def prob_best(draws: Sequence[np.ndarray]) -> np.ndarray:
    """For each refiner, the posterior probability that it is worth the most (ties shared)."""
    stacked = np.vstack([np.asarray(d) for d in draws])
    top = stacked.max(axis=0)
    winners = stacked >= top - 1e-15
    return (winners / winners.sum(axis=0)).mean(axis=1)


def gate(min_prob_better: float, challengers: int) -> float:
    """The probability a challenger must reach to replace the default, with ``challengers`` compared against it.

    Picking the best of several and then asking whether it beats the default would pass a plain threshold more
    often than ``1 - min_prob_better`` when none is better, because the leader is the luckiest. A Bonferroni
    split of the allowed error keeps that rate at most ``1 - min_prob_better`` over all of them.

    Example:
        >>> from markovscale_dspy.core.racing import gate
        >>> round(gate(0.9, 6), 4)
        0.9833
    """
    check_probability("min_prob_better", min_prob_better)
    check_int("challengers", challengers, 0)
    return 1.0 - (1.0 - min_prob_better) / max(challengers, 1)
