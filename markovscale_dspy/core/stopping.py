"""Deciding per question, as answers arrive, whether one more vote is worth its call: Bayes-optimal stopping under a
calibrated vote model.

Core layer (numpy/scipy only, no DSPy). The generative model is the one of :mod:`markovscale_dspy.core.voting`: a
question's samples are correct with ``phi = shift + scale * theta``, ``theta ~ Beta(a, b)`` over questions, and wrong
samples fall on the question's distractors (symmetric Dirichlet(``alpha``) shares over ``distractors`` of them, or a
Dirichlet process of concentration ``alpha``). Samples of one question are exchangeable, so after ``n`` answers
grouped into clusters by identity (counts ``n_1, ..., n_K`` in order of first appearance) the probability of the
observed *sequence* under "cluster ``i`` is the correct answer" is

    E[phi^n_i (1 - phi)^(n - n_i)] * W(counts without n_i),

and under "no cluster is correct" ``E[(1 - phi)^n] * W(counts)``, where ``W(l_1..l_k)`` is the probability that ``r``
wrong answers split into a given set partition with block sizes ``l`` (Dirichlet-multinomial:
``m!/(m-k)! Gamma(m alpha)/Gamma(m alpha + r) prod Gamma(alpha + l)/Gamma(alpha)``; Ewens:
``alpha^k Gamma(alpha)/Gamma(alpha + r) prod (l - 1)!``). Normalising gives :func:`cluster_posterior`; the ratio of
the sequence probabilities with and without one more answer gives :func:`next_answer_probabilities`.

Both depend on the counts only, not on their order, and the plurality answer (ties to the answer seen first) has the
largest count, so ``P(returned answer correct)`` is a function of the sorted count vector. That makes the sorted
counts (an integer partition of ``n``, at most a few hundred for ``n <= 16``) a sufficient state, and the stopping
problem is solved exactly by backward induction over (partition, calls left) in :func:`stopping_table`:

    V(s, 0) = P(leader correct | s)
    V(s, R) = max(P(leader correct | s), -call_cost + sum_s' P(s' | s) V(s', R - 1))

Stop when continuing (optimally) does not beat stopping by more than nothing: at ``call_cost > 0`` that is the DP;
at ``call_cost == 0`` the rule stops only when the remaining calls cannot change the returned answer ("settled"),
so it returns exactly the answer of the full ``max_calls`` vote, with fewer calls.

The prior may be a mixture of components (:class:`VotePrior`): a question draws a component, then its accuracy and
distractors. Every formula above becomes a weighted sum over components, so a world made of kinds of questions (or
the bootstrap refits of a fit) is handled exactly.

Example:
    >>> from markovscale_dspy.core.stopping import VotePrior, should_stop
    >>> prior = VotePrior.single(a=6.0, b=2.0, distractors=3, alpha=0.5)
    >>> stop, info = should_stop(prior, [3], calls_made=3, max_calls=8, call_cost=0.01)
    >>> stop, info["reason"], round(info["posterior"], 3)
    (True, 'not_worth_a_call', 0.97)
    >>> stop, info = should_stop(prior, [1, 1], calls_made=2, max_calls=8, call_cost=0.01)
    >>> stop, info["reason"]
    (False, 'worth_a_call')
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.special import logsumexp

from markovscale_dspy._exceptions import ConfigurationError
from markovscale_dspy.core.validation import check_int, check_number
from markovscale_dspy.core.voting import VoteModel, correct_votes

__all__ = [
    "MAX_STOP_CALLS",
    "StoppingTable",
    "VotePrior",
    "certain_calls",
    "cluster_posterior",
    "evaluate_policy",
    "leader_posterior",
    "next_answer_probabilities",
    "settled",
    "should_stop",
    "stopping_table",
]

#: Largest call budget of the exact dynamic programme (partitions of up to 16 answers: 231 at n = 16).
MAX_STOP_CALLS = 16
#: A continuation must beat stopping by more than this (floating-point noise of the exact sums is ~1e-15).
_GAIN_TOLERANCE = 1e-12

Component = tuple[float, float, float, "int | None", float]


# The prior ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VotePrior:
    """The law of one question's answers: a mixture of vote-model components.

    Attributes:
        components: ``(weight, a, b, distractors, alpha)`` per component (weights normalised): with probability
            ``weight`` a question has accuracy ``theta ~ Beta(a, b)`` and wrong answers over ``distractors``
            distractors (``None``: unboundedly many) with Dirichlet(``alpha``) shares.
        shift: With ``scale``, a sample is correct with probability ``shift + scale * theta`` (votes over refined
            chains; 0 and 1 for plain samples).
        scale: See ``shift``.

    Example:
        >>> VotePrior.single(a=2.0, b=1.0, distractors=None, alpha=1.0).mean_accuracy
        0.6666666666666666
    """

    components: tuple[Component, ...]
    shift: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.components, (tuple, list)) or not self.components:
            raise ConfigurationError(f"components must be a non-empty sequence, got {self.components!r}")
        clean = []
        for i, comp in enumerate(self.components):
            try:
                weight, a, b, m, alpha = comp
            except (TypeError, ValueError):
                raise ConfigurationError(
                    f"component {i} must be (weight, a, b, distractors, alpha), got {comp!r}"
                ) from None
            clean.append(
                (
                    check_number(f"weight of component {i}", weight, 0, lo_open=True),
                    check_number(f"a of component {i}", a, 0, lo_open=True),
                    check_number(f"b of component {i}", b, 0, lo_open=True),
                    check_int(f"distractors of component {i}", m, 1, none_ok=True),
                    check_number(f"alpha of component {i}", alpha, 0, lo_open=True),
                )
            )
        total = sum(c[0] for c in clean)
        object.__setattr__(self, "components", tuple((w / total, *rest) for w, *rest in clean))
        shift = check_number("shift", self.shift)
        scale = check_number("scale", self.scale)
        if not (-1e-12 <= shift <= 1 + 1e-12 and -1e-12 <= shift + scale <= 1 + 1e-12):
            raise ConfigurationError(f"shift + scale * theta must stay a probability, got shift={shift}, scale={scale}")
        object.__setattr__(self, "shift", shift)
        object.__setattr__(self, "scale", scale)

    @classmethod
    def single(
        cls, a: float, b: float, distractors: int | None, alpha: float, shift: float = 0.0, scale: float = 1.0
    ) -> VotePrior:
        """One component (what a fitted :class:`~markovscale_dspy.core.voting.VoteModel` says)."""
        return cls(((1.0, a, b, distractors, alpha),), shift, scale)

    @classmethod
    def from_model(cls, model: VoteModel, *, shift: float = 0.0, scale: float = 1.0, draws: bool = False) -> VotePrior:
        """The prior of a fitted vote model: its point estimate, or with ``draws=True`` the equal-weight mixture of
        its bootstrap refits (the estimation uncertainty, integrated over; the fit itself if it has none)."""
        if not isinstance(model, VoteModel):
            raise ConfigurationError(f"model must be a VoteModel or a VotePrior, got {type(model).__name__}")
        if draws and model.draws:
            return cls(tuple((1.0, a, b, m, alpha) for a, b, m, alpha in model.draws), shift, scale)
        return cls.single(model.a, model.b, model.distractors, model.alpha, shift, scale)

    @property
    def mean_accuracy(self) -> float:
        """Mean probability that a sample is correct, over questions."""
        return sum(w * (self.shift + self.scale * a / (a + b)) for w, a, b, _, _ in self.components)


def _as_prior(model: VoteModel | VotePrior) -> VotePrior:
    return model if isinstance(model, VotePrior) else VotePrior.from_model(model)


# Exact sequence likelihoods ---------------------------------------------------------------------------------------


def _log_wrong_partition(parts: Sequence[int], distractors: int | None, alpha: float) -> float:
    """Log-probability that ``sum(parts)`` wrong answers of one question form one given set partition (blocks in
    order of first appearance) with these block sizes."""
    k, r = len(parts), sum(parts)
    if r == 0:
        return 0.0
    if distractors is None:
        out = k * math.log(alpha) + math.lgamma(alpha) - math.lgamma(alpha + r)
        return out + sum(math.lgamma(x) for x in parts)
    m = distractors
    if k > m:
        return -math.inf
    out = math.lgamma(m + 1) - math.lgamma(m - k + 1) + math.lgamma(m * alpha) - math.lgamma(m * alpha + r)
    return out + sum(math.lgamma(alpha + x) - math.lgamma(alpha) for x in parts)


class _Likelihoods:
    """Per-state hypothesis log-likelihoods of one prior up to ``n_max`` answers (cached, cost-independent)."""

    def __init__(self, prior: VotePrior, n_max: int):
        self.prior = prior
        self.n_max = n_max
        # log E[phi^c (1 - phi)^r] per component: the exact Beta-binomial expansion of voting.correct_votes.
        self.log_moments = []
        with np.errstate(divide="ignore"):
            for _, a, b, _, _ in prior.components:
                table = np.full((n_max + 1, n_max + 1), -np.inf)
                for n in range(n_max + 1):
                    law = correct_votes(n, a, b, prior.shift, prior.scale)
                    for c in range(n + 1):
                        table[c, n - c] = math.log(law[c]) - math.log(math.comb(n, c)) if law[c] > 0 else -np.inf
                self.log_moments.append(table)
        self.log_weights = [math.log(w) for w, *_ in prior.components]
        self._cache: dict[tuple[int, ...], np.ndarray] = {}

    def hypotheses(self, state: tuple[int, ...]) -> np.ndarray:
        """Log P(sequence, hypothesis) for "cluster i correct" (i over ``state``) and, last, "none correct"."""
        out = self._cache.get(state)
        if out is not None:
            return out
        n = sum(state)
        per_comp = np.full((len(self.prior.components), len(state) + 1), -np.inf)
        for j, (_, _, _, m, alpha) in enumerate(self.prior.components):
            moments = self.log_moments[j]
            for i, x in enumerate(state):
                if i > 0 and state[i - 1] == x:  # equal counts: equal likelihoods
                    per_comp[j, i] = per_comp[j, i - 1]
                    continue
                rest = state[:i] + state[i + 1 :]
                per_comp[j, i] = moments[x, n - x] + _log_wrong_partition(rest, m, alpha)
            per_comp[j, -1] = moments[0, n] + _log_wrong_partition(state, m, alpha)
        per_comp += np.asarray(self.log_weights)[:, None]
        out = logsumexp(per_comp, axis=0) if per_comp.shape[0] > 1 else per_comp[0]
        self._cache[state] = out
        return out

    def log_sequence(self, state: tuple[int, ...]) -> float:
        return float(logsumexp(self.hypotheses(state)))

    def posterior(self, state: tuple[int, ...]) -> np.ndarray:
        h = self.hypotheses(state)
        total = logsumexp(h)
        if not np.isfinite(total):
            raise ConfigurationError(f"answer counts {list(state)} are impossible under this vote model")
        return np.exp(h - total)

    def transitions(self, state: tuple[int, ...]) -> list[tuple[float, tuple[int, ...]]]:
        """``(probability, next sorted state)`` for the next answer: joining a cluster of each distinct size, or new."""
        base = self.log_sequence(state)
        out = []
        for i, x in enumerate(state):
            if i > 0 and state[i - 1] == x:
                continue
            mult = state.count(x)
            nxt = tuple(sorted((*state[:i], x + 1, *state[i + 1 :]), reverse=True))
            p = mult * math.exp(self.log_sequence(nxt) - base)
            if p > 0:
                out.append((p, nxt))
        nxt = (*state, 1)
        p = math.exp(self.log_sequence(nxt) - base)
        if p > 0:
            out.append((p, nxt))
        return out


@lru_cache(maxsize=32)
def _likelihoods(prior: VotePrior, n_max: int) -> _Likelihoods:
    return _Likelihoods(prior, n_max)


def _check_counts(counts: Any, limit: int) -> tuple[int, ...]:
    try:
        values = tuple(counts)
    except TypeError:
        raise ConfigurationError(f"counts must be a sequence of positive vote counts, got {counts!r}") from None
    out = []
    for x in values:
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) or x < 1:
            raise ConfigurationError(f"counts must be positive integers (votes per distinct answer), got {counts!r}")
        out.append(int(x))
    if sum(out) > limit:
        raise ConfigurationError(f"counts must add up to at most {limit} answers, got {sum(out)} in {counts!r}")
    return tuple(out)


def _sorted_posterior(prior: VotePrior, counts: tuple[int, ...], n_max: int) -> np.ndarray:
    """Posterior over ``counts`` in their given order (plus "none" last), computed on the sorted state."""
    order = sorted(range(len(counts)), key=lambda i: -counts[i])
    post_sorted = _likelihoods(prior, n_max).posterior(tuple(counts[i] for i in order))
    out = np.empty(len(counts) + 1)
    out[order] = post_sorted[:-1]
    out[-1] = post_sorted[-1]
    return out


# Public posterior and predictive ----------------------------------------------------------------------------------


def cluster_posterior(model: VoteModel | VotePrior, counts: Sequence[int]) -> np.ndarray:
    """Posterior probability that each observed answer is the correct one, and (last) that none is.

    Args:
        model: A fitted vote model (its point estimate is used) or a :class:`VotePrior`.
        counts: Votes per distinct answer, in any order (e.g. order of first appearance).

    Returns:
        An array of ``len(counts) + 1`` probabilities summing to 1.

    Example:
        >>> prior = VotePrior.single(a=6.0, b=2.0, distractors=3, alpha=0.5)
        >>> cluster_posterior(prior, [1, 3]).round(3)
        array([0.083, 0.902, 0.015])
    """
    prior = _as_prior(model)
    state = _check_counts(counts, MAX_STOP_CALLS + 1)
    return _sorted_posterior(prior, state, MAX_STOP_CALLS + 1)


def leader_posterior(model: VoteModel | VotePrior, counts: Sequence[int]) -> float:
    """P(the plurality answer is correct): the posterior of the largest count (0 with no answer yet)."""
    state = _check_counts(counts, MAX_STOP_CALLS + 1)
    if not state:
        return 0.0
    leader = state.index(max(state))
    return float(cluster_posterior(model, state)[leader])


def next_answer_probabilities(model: VoteModel | VotePrior, counts: Sequence[int]) -> np.ndarray:
    """Predictive probability that the next answer joins each observed answer, and (last) that it is a new one.

    Example:
        >>> prior = VotePrior.single(a=6.0, b=2.0, distractors=3, alpha=0.5)
        >>> next_answer_probabilities(prior, [3]).round(3)
        array([0.804, 0.196])
    """
    prior = _as_prior(model)
    state = _check_counts(counts, MAX_STOP_CALLS)
    lik = _likelihoods(prior, MAX_STOP_CALLS + 1)
    base = lik.log_sequence(tuple(sorted(state, reverse=True)))
    if not np.isfinite(base):
        raise ConfigurationError(f"answer counts {list(state)} are impossible under this vote model")
    out = np.empty(len(state) + 1)
    for i in range(len(state)):
        grown = (*state[:i], state[i] + 1, *state[i + 1 :])
        out[i] = math.exp(lik.log_sequence(tuple(sorted(grown, reverse=True))) - base)
    out[-1] = math.exp(lik.log_sequence(tuple(sorted((*state, 1), reverse=True))) - base)
    return out


def settled(counts: Sequence[int], remaining: int) -> bool:
    """Whether ``remaining`` more answers cannot change the plurality answer (ties to the answer seen first).

    Args:
        counts: Votes per distinct answer **in order of first appearance** (the order decides ties).
        remaining: Answers still to come.

    Example:
        >>> settled([1, 4], 3)  # the first answer could reach 4 and would win the tie
        False
        >>> settled([4, 1], 3)  # the second could only tie, and ties go to the first
        True
    """
    state = _check_counts(counts, 10**9)
    remaining = check_int("remaining", remaining, 0)
    if not state:
        return remaining == 0
    top = max(state)
    leader = state.index(top)
    if remaining > top:  # a new answer could take every remaining vote and pass the leader
        return False
    return all(x + remaining < top or (x + remaining == top and i > leader) for i, x in enumerate(state) if i != leader)


def _settled_any_order(state: tuple[int, ...], remaining: int) -> bool:
    """:func:`settled` whatever the order of first appearance (what a sorted state knows)."""
    if not state:
        return remaining == 0
    second = state[1] if len(state) > 1 else 0
    return remaining <= state[0] and second + remaining < state[0]


# The stopping table -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoppingTable:
    """The exact stopping policy of one prior, budget and call cost, over every (sorted counts, calls left) state.

    Attributes:
        prior: The prior the policy is optimal for.
        max_calls: The call budget per question.
        call_cost: Accuracy (as a probability) one call is worth giving up.
        stop: ``{(sorted counts, calls left): stop?}``.
        value_stop: ``{sorted counts: P(leader correct)}``.
        value_continue: ``{(sorted counts, calls left): expected accuracy minus the cost of the calls, following
            the policy after one more call}`` (``-inf`` with no call left).
        accuracy: Expected accuracy of the policy from no answer, under the prior.
        expected_calls: Expected calls of the policy from no answer, under the prior. At ``call_cost == 0`` an
            upper bound: the table does not know the order in which answers appeared, :func:`should_stop` does (it
            also stops on ties the leader would win).
    """

    prior: VotePrior
    max_calls: int
    call_cost: float
    stop: dict[tuple[tuple[int, ...], int], bool]
    value_stop: dict[tuple[int, ...], float]
    value_continue: dict[tuple[tuple[int, ...], int], float]
    accuracy: float
    expected_calls: float

    def value(self, state: tuple[int, ...], remaining: int) -> float:
        """Value of a state under the policy: accuracy minus the cost of the calls still to make."""
        key = (state, remaining)
        return self.value_stop[state] if self.stop[key] else self.value_continue[key]


def _build(prior: VotePrior, max_calls: int, call_cost: float) -> StoppingTable:
    lik = _likelihoods(prior, max_calls + 1)
    # Reachable sorted states by number of answers (finite distractors cap the number of clusters).
    layers: list[set[tuple[int, ...]]] = [{()}]
    moves: dict[tuple[int, ...], list[tuple[float, tuple[int, ...]]]] = {}
    for _ in range(max_calls):
        nxt: set[tuple[int, ...]] = set()
        for s in layers[-1]:
            moves[s] = lik.transitions(s)
            nxt.update(t for _, t in moves[s])
        layers.append(nxt)
    value_stop = {(): 0.0}
    for layer in layers[1:]:
        for s in layer:
            value_stop[s] = float(lik.posterior(s)[0])  # sorted: the leader is first
    stop: dict[tuple[tuple[int, ...], int], bool] = {}
    cont: dict[tuple[tuple[int, ...], int], float] = {}
    value: dict[tuple[tuple[int, ...], int], float] = {}
    acc: dict[tuple[tuple[int, ...], int], float] = {}
    calls: dict[tuple[tuple[int, ...], int], float] = {}
    for remaining in range(max_calls + 1):
        for n in range(max_calls - remaining + 1):
            for s in layers[n]:
                key = (s, remaining)
                if remaining == 0:
                    cont[key], halt = -math.inf, True
                else:
                    nexts = [(p, (t, remaining - 1)) for p, t in moves[s]]
                    cont[key] = -call_cost + sum(p * value[k] for p, k in nexts)
                    if not s:
                        halt = False  # no answer to return yet
                    elif call_cost == 0:
                        halt = _settled_any_order(s, remaining)
                    else:
                        halt = cont[key] - value_stop[s] <= _GAIN_TOLERANCE
                stop[key] = halt
                if halt:
                    value[key], acc[key], calls[key] = value_stop[s], value_stop[s], 0.0
                else:
                    value[key] = cont[key]
                    acc[key] = sum(p * acc[k] for p, k in nexts)
                    calls[key] = 1.0 + sum(p * calls[k] for p, k in nexts)
    root = ((), max_calls)
    return StoppingTable(prior, max_calls, call_cost, stop, value_stop, cont, acc[root], calls[root])


@lru_cache(maxsize=256)
def _cached_table(prior: VotePrior, max_calls: int, call_cost: float) -> StoppingTable:
    return _build(prior, max_calls, call_cost)


def stopping_table(model: VoteModel | VotePrior, max_calls: int, call_cost: float) -> StoppingTable:
    """The exact stopping policy by backward induction (cached per prior, budget and cost).

    Args:
        model: A fitted vote model (its point estimate) or a :class:`VotePrior`.
        max_calls: Calls per question at most (1 to 16).
        call_cost: What one call costs, in accuracy (0.01: a call must buy at least one point of accuracy).

    Example:
        >>> prior = VotePrior.single(a=6.0, b=2.0, distractors=3, alpha=0.5)
        >>> table = stopping_table(prior, max_calls=8, call_cost=0.0)
        >>> from markovscale_dspy.core.voting import vote_accuracy
        >>> abs(table.accuracy - vote_accuracy(8, 6.0, 2.0, 3, 0.5)) < 1e-12  # at no cost: the full vote's answer
        True
        >>> table.expected_calls < 8
        True
    """
    prior = _as_prior(model)
    max_calls = check_int("max_calls", max_calls, 1, MAX_STOP_CALLS)
    call_cost = check_number("call_cost", call_cost, 0)
    return _cached_table(prior, max_calls, call_cost)


def should_stop(
    model: VoteModel | VotePrior,
    counts: Sequence[int],
    calls_made: int,
    max_calls: int,
    call_cost: float,
) -> tuple[bool, dict[str, Any]]:
    """Whether to stop sampling a question now, and why.

    Args:
        model: A fitted vote model (its point estimate) or a :class:`VotePrior`.
        counts: Votes per distinct answer so far, **in order of first appearance** (failed calls do not vote).
        calls_made: Calls spent on the question so far (at least ``sum(counts)``).
        max_calls: The budget (1 to 16).
        call_cost: What one call costs, in accuracy; 0 spends calls until the answer cannot change.

    Returns:
        ``(stop, info)``; ``info`` has ``posterior`` (P(the plurality answer is correct)), ``gain`` (expected
        accuracy of continuing optimally, net of the calls' cost, minus stopping now), ``remaining`` (calls left)
        and ``reason``: ``"max_calls"``, ``"settled"`` (the remaining calls cannot change the answer),
        ``"not_worth_a_call"``, ``"worth_a_call"``, ``"no_answer"`` (nothing to return yet) or ``"unexplained"``
        (counts the model gives no probability, e.g. more distinct answers than its distractors: keep voting).

    Example:
        >>> prior = VotePrior.single(a=6.0, b=2.0, distractors=3, alpha=0.5)
        >>> should_stop(prior, [5, 1], calls_made=6, max_calls=8, call_cost=0.0)[1]["reason"]
        'settled'
    """
    prior = _as_prior(model)
    max_calls = check_int("max_calls", max_calls, 1, MAX_STOP_CALLS)
    call_cost = check_number("call_cost", call_cost, 0)
    state = _check_counts(counts, max_calls)
    calls_made = check_int("calls_made", calls_made, sum(state), max_calls)
    remaining = max_calls - calls_made
    table = _cached_table(prior, max_calls, call_cost)
    key = tuple(sorted(state, reverse=True))
    if key not in table.value_stop:  # e.g. more distinct answers than the fit has distractors
        # The model cannot weigh these counts, but an answer the remaining calls cannot change needs no model.
        reason = "max_calls" if remaining == 0 else "settled" if settled(state, remaining) else "unexplained"
        stop = reason != "unexplained"
        return stop, {"posterior": math.nan, "gain": math.nan, "remaining": remaining, "reason": reason}
    posterior = table.value_stop[key]
    gain = table.value_continue[(key, remaining)] - posterior if remaining else -math.inf
    info = {"posterior": posterior, "gain": gain, "remaining": remaining}
    if remaining == 0:
        return True, {**info, "reason": "max_calls"}
    if not state:
        return False, {**info, "reason": "no_answer"}
    if settled(state, remaining):
        return True, {**info, "reason": "settled"}
    if call_cost > 0 and table.stop[(key, remaining)]:
        return True, {**info, "reason": "not_worth_a_call"}
    return False, {**info, "reason": "worth_a_call"}


def certain_calls(
    model: VoteModel | VotePrior, counts: Sequence[int], calls_made: int, max_calls: int, call_cost: float
) -> int:
    """Calls :func:`should_stop` will ask for from here whatever the answers turn out to be: the fewest further
    answers after which it could stop (0 when it stops now). Launching that many at once never pays for a call the
    sequential rule would not make, so concurrent sampling keeps its answers and its calls.

    Args:
        model: A fitted vote model (its point estimate) or a :class:`VotePrior`.
        counts: Votes per distinct answer so far, in order of first appearance.
        calls_made: Calls spent so far (failed ones included).
        max_calls: The budget.
        call_cost: What one call costs, in accuracy.

    Example:
        >>> prior = VotePrior.single(a=6.0, b=2.0, distractors=3, alpha=0.5)
        >>> certain_calls(prior, [], 0, max_calls=8, call_cost=0.0)  # four agreeing answers settle a vote of 8
        4
        >>> certain_calls(prior, [4], 4, max_calls=8, call_cost=0.0)
        0
    """
    prior = _as_prior(model)
    max_calls = check_int("max_calls", max_calls, 1, MAX_STOP_CALLS)
    call_cost = check_number("call_cost", call_cost, 0)
    state = _check_counts(counts, max_calls)
    calls_made = check_int("calls_made", calls_made, sum(state), max_calls)
    if should_stop(prior, state, calls_made, max_calls, call_cost)[0]:
        return 0
    key = tuple(sorted(state, reverse=True))
    if key not in _cached_table(prior, max_calls, call_cost).value_stop:
        return 1  # a state the model does not explain: one call at a time
    return _fewest_to_stop(prior, max_calls, call_cost, key, max_calls - calls_made)


@lru_cache(maxsize=65536)
def _fewest_to_stop(prior: VotePrior, max_calls: int, call_cost: float, state: tuple[int, ...], remaining: int) -> int:
    """Fewest answers from a sorted state until the rule could stop, under the most favourable order of first
    appearance (so never more than the rule really needs)."""
    if remaining == 0:
        return 0
    if state:
        second = state[1] if len(state) > 1 else 0
        if remaining <= state[0] and second + remaining <= state[0]:  # settled if the leader was seen first
            return 0
        if call_cost > 0 and _cached_table(prior, max_calls, call_cost).stop[(state, remaining)]:
            return 0
    moves = _likelihoods(prior, max_calls + 1).transitions(state)
    return 1 + min(_fewest_to_stop(prior, max_calls, call_cost, nxt, remaining - 1) for _, nxt in moves)


def evaluate_policy(
    model: VoteModel | VotePrior, decide: Callable[[tuple[int, ...], int], bool], max_calls: int
) -> tuple[float, float]:
    """Exact expected accuracy and calls of any stopping rule that decides from the sorted counts and the calls left.

    Args:
        model: The law of the answers (a fitted vote model's point estimate, or a :class:`VotePrior`).
        decide: ``decide(sorted counts, calls left) -> stop?``; asked once at least one answer is in and calls are
            left (with no call left the rule stops).
        max_calls: The budget (1 to 16).

    Returns:
        ``(accuracy, expected calls)`` of the plurality answer (ties to the first seen) when the rule stops.

    Example:
        >>> from markovscale_dspy.core.voting import vote_accuracy
        >>> prior = VotePrior.single(a=6.0, b=2.0, distractors=3, alpha=0.5)
        >>> accuracy, calls = evaluate_policy(prior, lambda counts, left: sum(counts) == 5, max_calls=8)
        >>> round(calls, 9), abs(accuracy - vote_accuracy(5, 6.0, 2.0, 3, 0.5)) < 1e-12  # a fixed vote of five
        (5.0, True)
    """
    prior = _as_prior(model)
    max_calls = check_int("max_calls", max_calls, 1, MAX_STOP_CALLS)
    if not callable(decide):
        raise ConfigurationError(f"decide must be callable, got {decide!r}")
    lik = _likelihoods(prior, max_calls + 1)
    memo: dict[tuple[int, ...], tuple[float, float]] = {}

    def walk(state: tuple[int, ...]) -> tuple[float, float]:
        if state in memo:
            return memo[state]
        remaining = max_calls - sum(state)
        if state and (remaining == 0 or decide(state, remaining)):
            out = (float(lik.posterior(state)[0]), 0.0)
        else:
            acc, calls = 0.0, 1.0
            for p, nxt in lik.transitions(state):
                a, c = walk(nxt)
                acc += p * a
                calls += p * c
            out = (acc, calls)
        memo[state] = out
        return out

    return walk(())
