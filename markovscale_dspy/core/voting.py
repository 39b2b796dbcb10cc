"""Majority (plurality) voting over independent samples: how often it is right, and a vote model fitted to data.

Core layer (numpy/scipy only, no DSPy). The model of one question's answer distribution:

* a sample is correct with the question's own probability ``theta``; over questions ``theta ~ Beta(a, b)`` (a
  question's difficulty varies: a pooled ``p0`` would make voting look better than it is on hard questions);
* a wrong sample picks one of the question's distractors; the distractors' shares ``w`` are drawn from a symmetric
  Dirichlet with parameter ``alpha`` over ``distractors = m`` of them, or, with ``distractors=None``, from a
  Dirichlet process of concentration ``alpha`` (free-form answers: unboundedly many wrong answers). Wrong answers
  that agree are what makes plurality voting fail; ``alpha`` says how much they agree;
* ``theta`` and ``w`` are independent, and samples are independent given the question.

The plurality vote over ``n`` samples is correct when the correct answer gets more votes than every wrong answer;
a tie between the correct answer and ``j`` wrong answers counts ``1 / (j + 1)`` (the tie goes to the answer seen
first, which by exchangeability is each tied answer with equal probability).

Its expected accuracy has an exact form. Given ``c`` correct and ``r`` wrong votes, the wrong votes fall into a
partition of ``r`` whose probability is the Dirichlet-multinomial (or Ewens) partition law, so
``credit(c, r) = sum_partitions P(partition | r) * [c beats / ties the largest part]``; and the number of correct
votes is Beta-binomial. After ``T`` refinement rounds of a two-state chain, a chain started from a sample is
correct with probability ``shift + scale * theta`` (affine in ``theta``), so the same formula with the affine map
gives the vote over refined chains (:func:`vote_accuracy`).

Example:
    >>> from markovscale_dspy.core import voting
    >>> round(voting.vote_accuracy(1, a=7.0, b=3.0, distractors=3, alpha=1.0), 3)  # one sample: the mean
    0.7
    >>> round(voting.vote_accuracy(5, a=7.0, b=3.0, distractors=3, alpha=1.0), 3)  # five votes
    0.853
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
from scipy import optimize
from scipy.special import betaln, digamma, gammaln

from markovscale_dspy._exceptions import ConfigurationError, DataError, StateError
from markovscale_dspy.core.validation import check_int, check_number

__all__ = [
    "MAX_DISTRACTORS",
    "MAX_VOTES",
    "VoteModel",
    "correct_votes",
    "credit",
    "credit_table",
    "fit_clusters",
    "fit_difficulty",
    "partition_probabilities",
    "partitions",
    "plurality_winner",
    "subset_vote_accuracy",
    "vote_accuracy",
    "wrong_agreement",
]

#: Largest number of votes the exact formulas handle (integer partitions of up to this many wrong votes).
MAX_VOTES = 24
#: Finite numbers of distractors the fit considers; beyond, the unbounded (Dirichlet-process) law is used.
MAX_DISTRACTORS = 24
#: Bounds of the fitted concentrations (difficulty ``a + b``; distractor ``alpha``).
_KAPPA = (1e-2, 1e4)
_ALPHA = (1e-3, 1e3)
#: Grid points over log(alpha) in the distractor fit (a step of 0.058 in log(alpha) before the parabolic polish).
_ALPHA_GRID = 241
_FORMAT = "markovscale.vote_model/1"


# Partitions of the wrong votes ----------------------------------------------------------------------------------------


@cache
def partitions(r: int) -> tuple[tuple[int, ...], ...]:
    """Integer partitions of ``r`` as tuples of parts in decreasing order (``partitions(0) == ((),)``).

    Example:
        >>> partitions(4)
        ((4,), (3, 1), (2, 2), (2, 1, 1), (1, 1, 1, 1))
    """
    check_int("r", r, 0, MAX_VOTES)

    def build(rest: int, largest: int) -> list[tuple[int, ...]]:
        if rest == 0:
            return [()]
        return [(first, *tail) for first in range(min(rest, largest), 0, -1) for tail in build(rest - first, first)]

    return tuple(build(r, r))


def _check_cluster_params(distractors: Any, alpha: Any) -> tuple[int | None, float]:
    if distractors is not None:
        distractors = check_int("distractors", distractors, 1)
    return distractors, check_number("alpha", alpha, 0, lo_open=True)


def partition_probabilities(r: int, distractors: int | None, alpha: float) -> np.ndarray:
    """Probability of each of :func:`partitions` ``(r)``: how ``r`` wrong votes split over distinct wrong answers.

    ``distractors = m`` uses the symmetric Dirichlet(``alpha``)-multinomial over ``m`` distractors, whose partition
    law is ``m!/(m-k)! / prod(mult!) * r!/prod(parts!) * Gamma(m alpha)/Gamma(m alpha + r) *
    prod(Gamma(alpha + part)/Gamma(alpha))`` for ``k`` parts; ``distractors=None`` uses the Ewens law of a Dirichlet
    process with concentration ``alpha``, ``r!/(prod(parts) prod(mult!)) * alpha^k Gamma(alpha)/Gamma(alpha + r)``.
    """
    distractors, alpha = _check_cluster_params(distractors, alpha)
    parts = partitions(r)
    logp = np.full(len(parts), -np.inf)
    for i, lam in enumerate(parts):
        k = len(lam)
        if distractors is not None and k > distractors:
            continue
        common = math.lgamma(r + 1) - sum(math.lgamma(x + 1) for x in lam)
        common -= sum(math.lgamma(c + 1) for c in Counter(lam).values())
        if distractors is None:
            model = k * math.log(alpha) + math.lgamma(alpha) - math.lgamma(alpha + r) + sum(math.lgamma(x) for x in lam)
        else:
            m = distractors
            model = math.lgamma(m + 1) - math.lgamma(m - k + 1) + math.lgamma(m * alpha) - math.lgamma(m * alpha + r)
            model += sum(math.lgamma(alpha + x) - math.lgamma(alpha) for x in lam)
        logp[i] = common + model
    p = np.exp(logp - np.max(logp))
    return p / p.sum()


def credit(correct: int, wrong: Sequence[int]) -> float:
    """Credit of a plurality vote with ``correct`` correct votes and wrong votes split as ``wrong`` (part sizes).

    1 if the correct answer has strictly the most votes, 0 if a wrong answer has more, ``1 / (j + 1)`` when it ties
    with ``j`` wrong answers.

    Example:
        >>> credit(2, (1, 1)), credit(2, (2, 1)), credit(1, (2,)), credit(0, ())
        (1.0, 0.5, 0.0, 0.0)
    """
    if correct <= 0:
        return 0.0
    top = max(wrong, default=0)
    if correct > top:
        return 1.0
    if correct < top:
        return 0.0
    return 1.0 / (1 + sum(1 for x in wrong if x == correct))


def credit_table(n_max: int, distractors: int | None, alpha: float) -> np.ndarray:
    """``table[c, r]``: expected credit of a vote with ``c`` correct votes and ``r`` wrong ones (``c + r <= n_max``)."""
    n_max = check_int("n_max", n_max, 0, MAX_VOTES)
    table = np.zeros((n_max + 1, n_max + 1))
    for r in range(n_max + 1):
        probs = partition_probabilities(r, distractors, alpha)
        parts = partitions(r)
        for c in range(n_max + 1 - r):
            table[c, r] = float(sum(p * credit(c, lam) for p, lam in zip(probs, parts, strict=True) if p > 0))
    return table


def correct_votes(n: int, a: float, b: float, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """``P(c correct votes out of n)``, c = 0..n, when each vote is correct with ``shift + scale * theta`` and
    ``theta ~ Beta(a, b)`` (votes independent given ``theta``).

    Exact: with ``phi = (shift + scale) theta + shift (1 - theta)``, both coefficients are probabilities, so
    ``phi^c (1 - phi)^(n - c)`` expands with non-negative terms into ``theta^j (1 - theta)^(n - j)``, whose
    expectations are ``B(a + j, b + n - j) / B(a, b)``.
    """
    n = check_int("n", n, 0, MAX_VOTES)
    one, zero = float(shift) + float(scale), float(shift)  # P(correct) at theta = 1 and at theta = 0
    if not (-1e-12 <= zero <= 1 + 1e-12 and -1e-12 <= one <= 1 + 1e-12):
        raise ConfigurationError(f"shift + scale * theta must stay a probability, got shift={shift}, scale={scale}")
    one, zero = min(max(one, 0.0), 1.0), min(max(zero, 0.0), 1.0)
    j = np.arange(n + 1)
    moments = np.exp(betaln(a + j, b + n - j) - betaln(a, b))  # E[theta^j (1 - theta)^(n - j)]
    out = np.zeros(n + 1)
    for c in range(n + 1):
        # correct factor: (one*theta + zero*(1-theta))^c ; wrong factor: ((1-one)*theta + (1-zero)*(1-theta))^(n-c)
        first = np.array([math.comb(c, i) * one**i * zero ** (c - i) for i in range(c + 1)])
        second = np.array([math.comb(n - c, i) * (1 - one) ** i * (1 - zero) ** (n - c - i) for i in range(n - c + 1)])
        coef = np.convolve(first, second)  # coefficient of theta^j (1 - theta)^(n - j)
        out[c] = math.comb(n, c) * float(coef @ moments)
    return out / out.sum()


def vote_accuracy(
    n: int,
    a: float,
    b: float,
    distractors: int | None,
    alpha: float,
    shift: float = 0.0,
    scale: float = 1.0,
    table: np.ndarray | None = None,
) -> float:
    """Expected accuracy of a plurality vote over ``n`` independent answers (see the module docstring).

    Args:
        n: Votes (``n = 1`` is a single answer).
        a: First parameter of the Beta law of per-question accuracy over questions.
        b: Second parameter of that law.
        distractors: Number of distractors per question, or ``None`` for unboundedly many.
        alpha: Dirichlet parameter of the distractors' shares (concentration when ``distractors`` is ``None``).
        shift: With ``scale``, each vote is correct with probability ``shift + scale * theta`` -- for votes over
            chains refined ``T`` rounds, ``shift = pi (1 - lam**T)`` and ``scale = lam**T``.
        scale: See ``shift``.
        table: A precomputed :func:`credit_table` of at least ``n`` votes for these distractor parameters.
    """
    n = check_int("n", n, 1, MAX_VOTES)
    if table is None or table.shape[0] <= n:
        table = credit_table(n, distractors, alpha)
    probs = correct_votes(n, a, b, shift, scale)
    return float(sum(probs[c] * table[c, n - c] for c in range(n + 1)))


def wrong_agreement(distractors: int | None, alpha: float) -> float:
    """Probability that two wrong answers to the same question agree: ``(alpha + 1) / (m alpha + 1)``, or
    ``1 / (alpha + 1)`` for unboundedly many distractors."""
    distractors, alpha = _check_cluster_params(distractors, alpha)
    if distractors is None:
        return 1.0 / (alpha + 1.0)
    return (alpha + 1.0) / (distractors * alpha + 1.0)


def plurality_winner(keys: Sequence[Hashable | None]) -> int | None:
    """Index of the answer a plurality vote returns: the most frequent key, ties going to the key seen first.

    ``None`` keys (failed samples) do not vote; returns ``None`` when nothing voted.

    Example:
        >>> plurality_winner(["b", "a", "a", "b", "c"])  # "a" and "b" tie, "b" came first
        0
    """
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    top = max(counts.values())
    winner = next(k for k in keys if k is not None and counts[k] == top)
    return keys.index(winner)


# In-sample vote accuracy ----------------------------------------------------------------------------------------------


def subset_vote_accuracy(correct: int, wrong: Sequence[int], n: int) -> float:
    """Expected plurality credit of ``n`` votes drawn without replacement from one question's observed answers
    (``correct`` correct ones, wrong ones in groups of sizes ``wrong``): the in-sample vote accuracy.

    Exact, by dynamic programming over the wrong groups on (wrong votes drawn, largest group, groups at it).
    """
    total = correct + sum(wrong)
    n = check_int("n", n, 1, total)
    states: dict[tuple[int, int, int], float] = {(0, 0, 0): 1.0}
    for size in wrong:
        nxt: dict[tuple[int, int, int], float] = {}
        for (drawn, top, ntop), weight in states.items():
            for x in range(0, min(size, n - drawn) + 1):
                if x > top:
                    key = (drawn + x, x, 1)
                elif x == top and x > 0:
                    key = (drawn + x, top, ntop + 1)
                else:
                    key = (drawn + x, top, ntop)
                nxt[key] = nxt.get(key, 0.0) + weight * math.comb(size, x)
        states = nxt
    value = 0.0
    for (drawn, top, ntop), weight in states.items():
        c = n - drawn
        if 0 <= c <= correct and c > 0:
            share = 1.0 if c > top else (0.0 if c < top else 1.0 / (1 + ntop))
            value += weight * math.comb(correct, c) * share
    return value / math.comb(total, n)


# Fitting --------------------------------------------------------------------------------------------------------------


def fit_difficulty(samples: Sequence[int], correct: Sequence[int]) -> tuple[float, float]:
    """Maximum-likelihood Beta(a, b) of per-question accuracy from ``correct[i]`` of ``samples[i]`` (Beta-binomial).

    The concentration ``a + b`` is kept in [0.01, 1e4] (1e4 is indistinguishable from one pooled accuracy).
    """
    k_arr, c_arr = np.asarray(samples, dtype=float), np.asarray(correct, dtype=float)
    if k_arr.size == 0 or np.any(c_arr > k_arr) or np.any(c_arr < 0) or np.any(k_arr < 1):
        raise DataError("fit_difficulty needs, per question, 0 <= correct <= samples with samples >= 1")
    pairs = Counter(zip(k_arr.tolist(), c_arr.tolist(), strict=True))
    kk = np.array([p[0] for p in pairs])
    cc = np.array([p[1] for p in pairs])
    ww = np.array(list(pairs.values()), dtype=float)
    if not np.any(kk >= 2):
        raise DataError("the spread of accuracy over questions needs at least one question with 2 or more samples")

    def nll(x: np.ndarray) -> tuple[float, np.ndarray]:
        mu = 1.0 / (1.0 + math.exp(-x[0]))
        kappa = math.exp(x[1])
        a, b = mu * kappa, (1.0 - mu) * kappa
        value = -float(np.sum(ww * (betaln(cc + a, kk - cc + b) - betaln(a, b))))
        common = digamma(a + b) - digamma(kk + a + b)
        da = -float(np.sum(ww * (digamma(cc + a) - digamma(a) + common)))
        db = -float(np.sum(ww * (digamma(kk - cc + b) - digamma(b) + common)))
        dmu = kappa * mu * (1.0 - mu)
        return value, np.array([dmu * (da - db), a * da + b * db])

    mean = float(np.clip(np.sum(ww * cc) / np.sum(ww * kk), 1e-4, 1 - 1e-4))
    # Method-of-moments start: Var(c/K) = mu (1 - mu) (1 + (K - 1) rho) / K with rho = 1 / (kappa + 1).
    share = cc / kk
    var = float(np.sum(ww * (share - mean) ** 2) / np.sum(ww))
    k_mean = float(np.sum(ww * kk) / np.sum(ww))
    rho = (var * k_mean / (mean * (1 - mean)) - 1) / max(k_mean - 1, 1e-9)
    kappa_mom = float(np.clip(1.0 / max(rho, 1e-4) - 1.0, _KAPPA[0], _KAPPA[1]))
    bounds = [(-12.0, 12.0), (math.log(_KAPPA[0]), math.log(_KAPPA[1]))]
    best = None
    for kappa0 in (kappa_mom, 2.0):
        x0 = np.array([math.log(mean / (1 - mean)), math.log(kappa0)])
        res = optimize.minimize(nll, x0, jac=True, method="SLSQP", bounds=bounds)
        if best is None or res.fun < best.fun - 1e-9:
            best = res
    mu = 1.0 / (1.0 + math.exp(-best.x[0]))
    kappa = math.exp(best.x[1])
    return mu * kappa, (1.0 - mu) * kappa


def _cluster_loglik(stats: tuple[Counter, Counter, Counter], distractors: int | None, alpha: float) -> float:
    """Log-likelihood of observed wrong-answer partitions, up to terms common to every law."""
    by_k, by_r, by_size = stats
    if distractors is None:
        ll = sum(n * (k * math.log(alpha)) for k, n in by_k.items())
        ll += sum(n * (math.lgamma(alpha) - math.lgamma(alpha + r)) for r, n in by_r.items())
        return ll + sum(n * math.lgamma(s) for s, n in by_size.items())
    m = distractors
    if max(by_k, default=0) > m:
        return -math.inf
    ll = sum(n * (math.lgamma(m + 1) - math.lgamma(m - k + 1)) for k, n in by_k.items())
    ll += sum(n * (math.lgamma(m * alpha) - math.lgamma(m * alpha + r)) for r, n in by_r.items())
    return ll + sum(n * (math.lgamma(alpha + s) - math.lgamma(alpha)) for s, n in by_size.items())


def _partition_stats(wrong: Sequence[Sequence[int]]) -> tuple[Counter, Counter, Counter]:
    informative = [tuple(parts) for parts in wrong if sum(parts) >= 2]
    return (
        Counter(len(p) for p in informative),
        Counter(sum(p) for p in informative),
        Counter(s for p in informative for s in p),
    )


def fit_clusters(wrong: Sequence[Sequence[int]]) -> tuple[int | None, float, bool]:
    """Maximum-likelihood distractor law from each question's wrong answers grouped by identity (group sizes).

    Tries ``m = 1 .. MAX_DISTRACTORS`` distractors and the unbounded law, each at its best ``alpha``.

    Returns:
        ``(distractors, alpha, estimated)``; without any question with two or more wrong answers nothing can be
        estimated and the cautious ``(1, 1.0, False)`` is returned: every wrong answer agrees (the worst case for
        voting).
    """
    stats = _partition_stats(wrong)
    if not stats[1]:
        return 1, 1.0, False
    # Every law on a fine grid of log(alpha) at once (the parametric bootstrap refits hundreds of times), each
    # maximum polished by the vertex of the parabola through its grid neighbours; ties go to fewer distractors.
    laws = [*range(max(stats[0]), MAX_DISTRACTORS + 1), None]
    grid = np.linspace(math.log(_ALPHA[0]), math.log(_ALPHA[1]), _ALPHA_GRID)
    table = _cluster_loglik_grid(stats, laws, np.exp(grid))
    best: tuple[float, int | None, float] | None = None
    for m, row in zip(laws, table, strict=True):
        i = int(np.argmax(row))
        ll, x = float(row[i]), float(grid[i])
        if 0 < i < grid.size - 1:
            curve = row[i + 1] - 2 * row[i] + row[i - 1]
            if curve < 0:
                vertex = x - (grid[1] - grid[0]) * (row[i + 1] - row[i - 1]) / (2 * curve)
                at_vertex = _cluster_loglik(stats, m, math.exp(vertex))
                if at_vertex > ll:
                    ll, x = at_vertex, float(vertex)
        if best is None or ll > best[0] + 1e-9:
            best = (ll, m, math.exp(x))
    return best[1], best[2], True


def _cluster_loglik_grid(
    stats: tuple[Counter, Counter, Counter], laws: Sequence[int | None], alphas: np.ndarray
) -> np.ndarray:
    """:func:`_cluster_loglik` for every law (row) and alpha (column) at once."""
    by_k, by_r, by_size = stats
    k, nk = np.array(list(by_k)), np.array(list(by_k.values()))
    r, nr = np.array(list(by_r)), np.array(list(by_r.values()))
    size, ns = np.array(list(by_size)), np.array(list(by_size.values()))
    m = np.array([law for law in laws if law is not None], dtype=float)[:, None]
    ma = m * alphas[None, :]
    finite = (
        (gammaln(m + 1) - gammaln(m - k[None, :] + 1)) @ nk[:, None]
        + (gammaln(ma)[:, :, None] - gammaln(ma[:, :, None] + r)) @ nr
        + (ns @ (gammaln(alphas[None, :] + size[:, None]) - gammaln(alphas)[None, :]))[None, :]
    )
    if None not in laws:
        return finite
    unbounded = (
        float(nk @ k) * np.log(alphas)
        + (gammaln(alphas)[:, None] - gammaln(alphas[:, None] + r)) @ nr
        + float(ns @ gammaln(size))
    )
    return np.vstack([finite, unbounded[None, :]])


# Simulation (for the parametric bootstrap and for tests) --------------------------------------------------------------


def simulate_question(
    samples: int, a: float, b: float, distractors: int | None, alpha: float, rng: np.random.Generator
) -> tuple[int, tuple[int, ...]]:
    """Draw one question from the model and ``samples`` answers to it: ``(correct, wrong group sizes)``."""
    theta = rng.beta(a, b) if a > 0 and b > 0 else 0.5
    c = int(rng.binomial(samples, theta))
    r = samples - c
    if r == 0:
        return c, ()
    if distractors is None:
        groups: list[int] = []
        for i in range(r):
            if not groups or rng.random() < alpha / (alpha + i):
                groups.append(1)
            else:
                j = rng.choice(len(groups), p=np.asarray(groups) / i)
                groups[j] += 1
        return c, tuple(sorted(groups, reverse=True))
    shares = rng.gamma(alpha, size=distractors)
    if shares.sum() <= 0:  # alpha so small that every gamma draw underflowed: all mass on one distractor
        shares = np.zeros(distractors)
        shares[rng.integers(distractors)] = 1.0
    counts = rng.multinomial(r, shares / shares.sum())
    return c, tuple(sorted((int(x) for x in counts if x), reverse=True))


# The fitted vote model ------------------------------------------------------------------------------------------------


def _check_question(q: Any, i: int) -> tuple[int, int, tuple[int, ...]]:
    try:
        samples, correct, wrong = int(q[0]), int(q[1]), tuple(int(x) for x in q[2])
    except (TypeError, ValueError, IndexError):
        raise StateError(
            f"vote model question {i} must be [samples, correct, [wrong group sizes]], got {q!r}"
        ) from None
    if samples < 1 or not 0 <= correct <= samples or any(x < 1 for x in wrong) or correct + sum(wrong) != samples:
        raise StateError(f"vote model question {i} is inconsistent: {q!r}")
    return samples, correct, tuple(sorted(wrong, reverse=True))


@dataclass(frozen=True)
class VoteModel:
    """How plurality voting over independent samples behaves on a task, fitted on calibration samples.

    Per-question accuracy ``theta ~ Beta(a, b)``; wrong answers over ``distractors`` distractors (``None``:
    unboundedly many) with symmetric Dirichlet(``alpha``) shares; see the module docstring. ``draws`` are
    parametric-bootstrap refits ``(a, b, distractors, alpha)`` that carry the estimation uncertainty into every
    prediction.

    Attributes:
        questions: Per calibration question, ``(samples, correct, wrong group sizes)``: the data.
        a: Beta parameter of per-question accuracy.
        b: Beta parameter of per-question accuracy.
        distractors: Distractors per question (``None``: unbounded).
        alpha: Dirichlet parameter of the distractors' shares (the concentration when unbounded).
        clusters_estimated: Whether any question had two wrong answers to estimate agreement from (else the
            cautious "every wrong answer agrees" is assumed).
        split_correct: Questions whose correct samples came under more than one answer key (they would split
            their votes, which the model does not account for).
        draws: Bootstrap refits, one tuple per replicate.
        seed: Seed of the bootstrap.

    Example:
        >>> from markovscale_dspy.core.voting import VoteModel
        >>> data = [[(True, "a"), (True, "a"), (False, "b")], [(False, "c"), (False, "c"), (True, "d")]] * 20
        >>> model = VoteModel.fit(data, bootstrap=20)
        >>> round(model.mean_accuracy, 2)
        0.5
    """

    questions: tuple[tuple[int, int, tuple[int, ...]], ...]
    a: float
    b: float
    distractors: int | None
    alpha: float
    clusters_estimated: bool = True
    split_correct: int = 0
    draws: tuple[tuple[float, float, int | None, float], ...] = ()
    seed: int = 0
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # Construction ------------------------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls, samples: Sequence[Sequence[tuple[bool, Hashable]]], *, bootstrap: int = 200, seed: int = 0
    ) -> VoteModel:
        """Fit from each calibration question's samples, ``(correct, answer key)`` pairs.

        Args:
            samples: One list per question of its graded samples (failed samples left out).
            bootstrap: Parametric-bootstrap replicates for the intervals (0: none; predictions then have no
                interval).
            seed: Seed of the bootstrap.

        Raises:
            DataError: no question has two or more samples (the spread over questions cannot be estimated).
        """
        check_int("bootstrap", bootstrap, 0)
        questions, split = [], 0
        for i, question in enumerate(samples):
            graded = list(question)
            for label, _ in graded:
                if not isinstance(label, (bool, np.bool_)):
                    raise DataError(f"sample labels must be bools, got {label!r} in question {i}")
            if not graded:
                continue
            split += len({key for label, key in graded if label}) > 1
            wrong = Counter(key for label, key in graded if not label)
            correct = sum(bool(label) for label, _ in graded)
            questions.append((len(graded), correct, tuple(sorted(wrong.values(), reverse=True))))
        return cls.from_questions(questions, bootstrap=bootstrap, seed=seed, split_correct=split)

    @classmethod
    def from_questions(
        cls,
        questions: Sequence[tuple[int, int, Sequence[int]]],
        *,
        bootstrap: int = 200,
        seed: int = 0,
        split_correct: int = 0,
    ) -> VoteModel:
        """Fit from per-question ``(samples, correct, wrong group sizes)``."""
        data = tuple(_check_question(q, i) for i, q in enumerate(questions))
        if not data:
            raise DataError("no graded sample: the vote model needs samples of at least one question")
        a, b = fit_difficulty([q[0] for q in data], [q[1] for q in data])
        m, alpha, estimated = fit_clusters([q[2] for q in data])
        draws = _bootstrap(data, a, b, m, alpha, check_int("bootstrap", bootstrap, 0), seed) if estimated else ()
        if not estimated and bootstrap:
            draws = _bootstrap_difficulty(data, a, b, bootstrap, seed)
        return cls(data, a, b, m, alpha, estimated, int(split_correct), draws, seed)

    # What it says ------------------------------------------------------------------------------------------------

    @property
    def mean_accuracy(self) -> float:
        """Mean single-sample accuracy over questions, ``a / (a + b)``."""
        return self.a / (self.a + self.b)

    @property
    def accuracy_sd(self) -> float:
        """Standard deviation of per-question accuracy over questions (0: every question alike)."""
        mu = self.mean_accuracy
        return math.sqrt(mu * (1 - mu) / (self.a + self.b + 1))

    @property
    def agreement(self) -> float:
        """Probability that two wrong answers to a question agree (see :func:`wrong_agreement`)."""
        return wrong_agreement(self.distractors, self.alpha)

    @property
    def max_samples(self) -> int:
        """Most samples observed for one question (in-sample vote accuracy exists up to this many votes)."""
        return max(q[0] for q in self.questions)

    def _table(self, n: int, distractors: int | None, alpha: float) -> np.ndarray:
        """A credit table covering ``n`` votes, shared by every ``n`` (tables are built for 8 votes at least)."""
        key = ("table", distractors, alpha)
        table = self._cache.get(key)
        if table is None or table.shape[0] <= n:
            table = self._cache[key] = credit_table(max(n, 8), distractors, alpha)
        return table

    def accuracy(self, n: int, shift: float = 0.0, scale: float = 1.0) -> float:
        """Predicted accuracy of a plurality vote over ``n`` samples (``shift``/``scale``: see
        :func:`vote_accuracy`)."""
        n = check_int("n", n, 1, MAX_VOTES)
        table = self._table(n, self.distractors, self.alpha)
        return vote_accuracy(n, self.a, self.b, self.distractors, self.alpha, shift, scale, table)

    def accuracy_draws(self, n: int, shift: float | np.ndarray = 0.0, scale: float | np.ndarray = 1.0) -> np.ndarray:
        """The prediction of :meth:`accuracy` under every bootstrap refit (``shift``/``scale`` may be arrays with
        one value per refit, e.g. drawn from the chain's posterior)."""
        n = check_int("n", n, 1, MAX_VOTES)
        count = len(self.draws)
        shifts = np.broadcast_to(np.asarray(shift, dtype=float), (count,))
        scales = np.broadcast_to(np.asarray(scale, dtype=float), (count,))
        out = np.empty(count)
        for i, (a, b, m, alpha) in enumerate(self.draws):
            table = self._table(n, m, alpha)
            out[i] = vote_accuracy(n, a, b, m, alpha, shifts[i], scales[i], table)
        return out

    def observed_accuracy(self, n: int) -> tuple[float, float, int]:
        """In-sample vote accuracy over ``n`` of each question's own samples (averaged over every subset).

        Returns:
            ``(accuracy, standard error over questions, questions)`` over the questions with at least ``n``
            samples; ``(nan, nan, 0)`` if there are none.
        """
        n = check_int("n", n, 1)
        values = [subset_vote_accuracy(c, w, n) for s, c, w in self.questions if s >= n]
        if not values:
            return math.nan, math.nan, 0
        arr = np.asarray(values)
        se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else math.nan
        return float(arr.mean()), se, int(arr.size)

    # Serialisation -----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` restores an equal model."""
        return {
            "format": _FORMAT,
            "questions": [[s, c, list(w)] for s, c, w in self.questions],
            "fit": {
                "a": self.a,
                "b": self.b,
                "distractors": self.distractors,
                "alpha": self.alpha,
                "clusters_estimated": self.clusters_estimated,
            },
            "split_correct": self.split_correct,
            "bootstrap": {"seed": self.seed, "draws": [list(d) for d in self.draws]},
            "estimates": {
                "mean_accuracy": self.mean_accuracy,
                "accuracy_sd": self.accuracy_sd,
                "wrong_agreement": self.agreement,
            },
        }

    @classmethod
    def from_dict(cls, data: Any) -> VoteModel:
        """Rebuild a model from :meth:`to_dict` output; the fit must be the one its data give (else StateError)."""
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise StateError(f"not a vote model (expected format {_FORMAT!r}, found {found!r})")
        try:
            questions = tuple(_check_question(q, i) for i, q in enumerate(data["questions"]))
            fit = data["fit"]
            a, b, alpha = float(fit["a"]), float(fit["b"]), float(fit["alpha"])
            m = None if fit["distractors"] is None else int(fit["distractors"])
            draws = tuple(
                (float(x[0]), float(x[1]), None if x[2] is None else int(x[2]), float(x[3]))
                for x in data["bootstrap"]["draws"]
            )
            model = cls(
                questions,
                a,
                b,
                m,
                alpha,
                bool(fit["clusters_estimated"]),
                int(data.get("split_correct", 0)),
                draws,
                int(data["bootstrap"]["seed"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise StateError(f"vote model is malformed: {type(exc).__name__}: {exc}") from None
        if not questions or any(x <= 0 for x in (a, b, alpha)) or any(d[0] <= 0 or d[1] <= 0 for d in draws):
            raise StateError("vote model has no data or a non-positive parameter: the state was edited or corrupted")
        refit_a, refit_b = fit_difficulty([q[0] for q in questions], [q[1] for q in questions])
        if not (math.isclose(refit_a, a, rel_tol=1e-3) and math.isclose(refit_b, b, rel_tol=1e-3)):
            raise StateError(
                f"vote model difficulty Beta({a:.4g}, {b:.4g}) disagrees with its data (which give "
                f"Beta({refit_a:.4g}, {refit_b:.4g})); the state was edited or corrupted: recalibrate"
            )
        return model

    def __repr__(self) -> str:
        m = "unbounded" if self.distractors is None else self.distractors
        return (
            f"VoteModel(mean_accuracy={self.mean_accuracy:.3f}, accuracy_sd={self.accuracy_sd:.3f}, "
            f"distractors={m}, wrong_agreement={self.agreement:.3f}, questions={len(self.questions)})"
        )


def simulate_questions(
    samples: Sequence[int], a: float, b: float, distractors: int | None, alpha: float, rng: np.random.Generator
) -> list[tuple[int, tuple[int, ...]]]:
    """:func:`simulate_question` for many questions at once (vectorised for a finite number of distractors)."""
    if distractors is None:
        return [simulate_question(k, a, b, None, alpha, rng) for k in samples]
    k = np.asarray(samples, dtype=np.int64)
    correct = rng.binomial(k, rng.beta(a, b, size=k.size))
    shares = rng.gamma(alpha, size=(k.size, distractors))
    empty = shares.sum(axis=1) <= 0  # alpha so small that every gamma draw underflowed: one distractor takes all
    shares[empty, rng.integers(distractors, size=int(empty.sum()))] = 1.0
    counts = rng.multinomial(k - correct, shares / shares.sum(axis=1, keepdims=True))
    counts = -np.sort(-counts, axis=1)
    return [(int(c), tuple(int(x) for x in row if x)) for c, row in zip(correct, counts, strict=True)]


def _bootstrap(
    data: tuple[tuple[int, int, tuple[int, ...]], ...],
    a: float,
    b: float,
    m: int | None,
    alpha: float,
    replicates: int,
    seed: int,
) -> tuple[tuple[float, float, int | None, float], ...]:
    """Parametric bootstrap: simulate every question (same sample counts) from the fit and refit, ``replicates``
    times."""
    rng = np.random.default_rng([seed, 7919])
    sizes = [q[0] for q in data]
    draws = []
    for _ in range(replicates):
        sim = simulate_questions(sizes, a, b, m, alpha, rng)
        ra, rb = fit_difficulty(sizes, [c for c, _ in sim])
        rm, ralpha, _ = fit_clusters([w for _, w in sim])
        draws.append((ra, rb, rm, ralpha))
    return tuple(draws)


def _bootstrap_difficulty(
    data: tuple[tuple[int, int, tuple[int, ...]], ...], a: float, b: float, replicates: int, seed: int
) -> tuple[tuple[float, float, int | None, float], ...]:
    """Bootstrap of the difficulty alone, when agreement could not be estimated (it stays at the cautious 1)."""
    rng = np.random.default_rng([seed, 7919])
    draws = []
    for _ in range(replicates):
        correct = [int(rng.binomial(q[0], rng.beta(a, b))) for q in data]
        ra, rb = fit_difficulty([q[0] for q in data], correct)
        draws.append((ra, rb, 1, 1.0))
    return tuple(draws)
