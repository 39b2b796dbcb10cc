"""Racing refiners by the chain's own objective: paired posterior draws, elimination, the gate.

Several refiners (e.g. refinement instructions) refine the same round-0 answers, so they share ``p0`` and differ
only in ``p_cw`` and ``p_wc``. A refiner's worth is what the deployed module gets from it: the expected accuracy at
the rounds the closed-form rule plans from its estimates, minus the round cost,
``V = accuracy_at(T*) - round_cost * T*``.

Its posterior is drawn by a Bayesian bootstrap over the examples (Rubin, 1981): each draw weighs the examples by
``Dirichlet(1, ..., 1)`` weights, and the *same* weights serve every refiner and ``p0``. So two refiners' draws are
paired example by example (what they share -- the questions, their round-0 answers -- cancels out of the
difference), and the rounds of one chain, which are not independent trials when questions differ in difficulty,
move together. The rates are the weighted transition counts with a Beta prior's pseudo-counts.

Pure numpy functions (no DSPy): the optimizer that calls the LM is a thin layer on top.

Example:
    >>> import numpy as np
    >>> from markovscale_dspy.core.racing import bootstrap_weights, chain_counts, prob_better, value_draws
    >>> rng = np.random.default_rng(0)
    >>> round0 = np.array([True] * 60 + [False] * 40)
    >>> careful = chain_counts([[r, r, r] for r in round0[:90]] + [[False, True, True]] * 10)
    >>> sloppy = chain_counts([[r, not r, r] for r in round0])
    >>> w = bootstrap_weights(100, draws=4000, rng=rng)
    >>> a = value_draws(w, round0, careful, max_rounds=2)
    >>> b = value_draws(w, round0, sloppy, max_rounds=2)
    >>> a.rounds, b.rounds, prob_better(a.draws, b.draws) > 0.99
    (2, 0, True)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from markovscale_dspy._exceptions import DataError
from markovscale_dspy.core.theory import optimal_rounds
from markovscale_dspy.core.validation import check_int, check_prior, check_probability

__all__ = [
    "DEFAULT_DRAWS",
    "TRANSITIONS",
    "RefinerCounts",
    "RefinerValue",
    "bootstrap_weights",
    "chain_counts",
    "gate",
    "prob_at_least",
    "prob_better",
    "value_draws",
]

#: Posterior draws per comparison: the Monte Carlo error of a probability near 0.95 is then about 0.003.
DEFAULT_DRAWS = 4_000

#: Columns of a per-example transition table.
TRANSITIONS = ("n_cc", "n_cw", "n_wc", "n_ww")


@dataclass(frozen=True)
class RefinerCounts:
    """A refiner's observed transitions (correct -> correct / wrong, wrong -> correct / wrong)."""

    n_cc: int = 0
    n_cw: int = 0
    n_wc: int = 0
    n_ww: int = 0

    def __post_init__(self) -> None:
        for name in TRANSITIONS:
            check_int(name, getattr(self, name), 0)

    @property
    def total(self) -> int:
        return self.n_cc + self.n_cw + self.n_wc + self.n_ww

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


def chain_counts(chains: Sequence[Sequence[bool] | None]) -> np.ndarray:
    """Per-example transition table ``(examples, 4)`` (columns :data:`TRANSITIONS`); ``None``: not refined (a row
    of NaN, left out of the refiner's draws)."""
    table = np.full((len(chains), 4), np.nan)
    for i, chain in enumerate(chains):
        if chain is not None:
            c = RefinerCounts.of_chain(chain)
            table[i] = (c.n_cc, c.n_cw, c.n_wc, c.n_ww)
    return table


def bootstrap_weights(n: int, *, draws: int = DEFAULT_DRAWS, rng=None) -> np.ndarray:
    """``draws`` rows of ``Dirichlet(1, ..., 1)`` weights over ``n`` examples (the Bayesian bootstrap), to share
    between every refiner compared on those examples."""
    check_int("n", n, 1)
    gamma = np.random.default_rng(rng).standard_exponential((check_int("draws", draws, 1), n))
    return gamma / gamma.sum(axis=1, keepdims=True)


def value_draws(
    weights: np.ndarray,
    round0: Sequence[bool],
    counts: np.ndarray,
    *,
    max_rounds: int,
    round_cost: float = 0.0,
    prior: tuple[float, float] = (1.0, 1.0),
) -> RefinerValue:
    """Posterior draws of a refiner's worth, paired with every refiner drawn with the same ``weights``.

    Args:
        weights: :func:`bootstrap_weights` over the examples.
        round0: Whether each example's (shared) round-0 answer is correct.
        counts: The refiner's :func:`chain_counts` on the same examples (NaN rows: not refined by it).
        max_rounds: The most rounds the module may plan.
        round_cost: Accuracy a round must add to be worth it.
        prior: Beta prior of ``p0`` and of each rate (pseudo-counts added to the weighted counts).

    The rounds are planned once, from the posterior means (as the deployed module plans them), and every draw is
    scored at those rounds: a refiner is worth what its module will do, not what it would do if its rates were
    known.
    """
    a, b = check_prior(prior)
    weights, correct, counts = np.asarray(weights, float), np.asarray(round0, float), np.asarray(counts, float)
    n = len(correct)
    if weights.ndim != 2 or weights.shape[1] != n or counts.shape != (n, 4):
        raise DataError(
            f"weights {weights.shape}, round0 ({n},) and counts {counts.shape} must describe the same examples"
        )
    p0 = (a + n * weights @ correct) / (a + b + n)
    p0_mean = (a + correct.sum()) / (a + b + n)
    refined = ~np.isnan(counts).any(axis=1)
    totals = RefinerCounts(*(int(x) for x in counts[refined].sum(axis=0))) if refined.any() else RefinerCounts()
    p_cw_mean, p_wc_mean = totals.means(prior)
    rounds = optimal_rounds(p0_mean, p_cw_mean, p_wc_mean, round_cost, max_rounds)
    if rounds == 0:
        return RefinerValue(0, p0)
    if refined.any():
        w = weights[:, refined]
        # Weighted counts on the refiner's own examples, scaled to their number (so the prior weighs as in a fit).
        weighted = (w / w.sum(axis=1, keepdims=True)) @ counts[refined] * refined.sum()
    else:
        weighted = np.zeros((len(weights), 4))
    cc, cw, wc, ww = weighted.T
    p_cw = (a + cw) / (a + b + cw + cc)
    p_wc = (a + wc) / (a + b + wc + ww)
    # One step maps accuracy p to p_wc + lam * p; iterate rather than divide by p_cw + p_wc.
    lam = 1.0 - p_cw - p_wc
    accuracy = p0.copy()
    for _ in range(rounds):
        accuracy = p_wc + lam * accuracy
    return RefinerValue(rounds, accuracy - round_cost * rounds)


def prob_better(a: np.ndarray, b: np.ndarray) -> float:
    """Posterior probability that the refiner with draws ``a`` is worth strictly more than the one with ``b``
    (paired draws; a tie, e.g. both planning no rounds, is not better)."""
    return float(np.mean(np.asarray(a) > np.asarray(b)))


def prob_at_least(a: np.ndarray, b: np.ndarray) -> float:
    """Posterior probability that ``a`` is worth at least as much as ``b`` (a tie counts: what elimination asks,
    so two refiners that both plan no rounds never knock each other out)."""
    return float(np.mean(np.asarray(a) >= np.asarray(b)))


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
