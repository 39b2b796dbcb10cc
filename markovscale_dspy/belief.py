"""Per-question belief: a hidden-Markov filter over correctness, Bayes-optimal stopping, and smoothing.

Correctness is hidden at inference; what a round shows is whether its answer is the *same* as the previous one.
With the chain (``p_cw``, ``p_wc``) and two emission rates -- ``s`` = P(same answer | wrong -> wrong) (a wrong
answer sticks) and ``e`` = P(answer changes | correct -> correct) (rewording noise) -- the observation of round t
depends on the pair (X_{t-1}, X_t):

=================  ==============
pair               P(same answer)
=================  ==============
correct -> correct ``1 - e``
correct -> wrong   0
wrong -> correct   0
wrong -> wrong     ``s``
=================  ==============

Pure functions of floats (numpy only, no DSPy), like :mod:`markovscale_dspy.theory`. An observation is ``True``
(same answer), ``False`` (changed) or ``None`` (the round failed and kept the previous answer: no step happened).

Example:
    >>> from markovscale_dspy import belief
    >>> chain = dict(p_cw=0.1, p_wc=0.4, p_same_wrong=0.3, p_change_correct=0.0)
    >>> q = belief.update(0.5, True, **chain)  # the answer survived a round unchanged
    >>> round(q, 3)
    0.833
    >>> belief.should_refine(q, rounds_left=1, round_cost=0.02, **chain)  # a last round would lose on average
    False
    >>> belief.should_refine(q, rounds_left=3, round_cost=0.02, **chain)  # a check pays: a broken answer is repairable
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from markovscale_dspy.theory import TIE_TOLERANCE, _check_probability

__all__ = [
    "MAX_LOOKAHEAD",
    "continuation_value",
    "expected_gain",
    "filter_beliefs",
    "observation_probability",
    "should_refine",
    "smooth",
    "update",
]

#: Expectimax looks at most this many rounds ahead (2**12 observation paths); beyond, values change by < 1e-9
#: for any chain that moves, and the cost of deciding stays far below one LM call.
MAX_LOOKAHEAD = 12


def _params(p_cw: float, p_wc: float, p_same_wrong: float, p_change_correct: float) -> tuple[float, ...]:
    return (
        _check_probability("p_cw", p_cw),
        _check_probability("p_wc", p_wc),
        _check_probability("p_same_wrong", p_same_wrong),
        _check_probability("p_change_correct", p_change_correct),
    )


def _emissions(p_cw: float, p_wc: float, s: float, e: float) -> np.ndarray:
    """``M[o, x_prev, x]`` = P(X_t = x, o | X_{t-1} = x_prev), with x = 1 for correct and o = 1 for same."""
    move = np.array([[1 - p_wc, p_wc], [p_cw, 1 - p_cw]])  # move[x_prev, x]
    same = np.array([[s, 0.0], [0.0, 1 - e]])
    return np.stack([move * (1 - same), move * same])


def observation_probability(
    q: float, same: bool, p_cw: float, p_wc: float, p_same_wrong: float, p_change_correct: float
) -> float:
    """P(the next round's answer is the same / changed), given belief ``q`` that the current answer is correct."""
    p_cw, p_wc, s, e = _params(p_cw, p_wc, p_same_wrong, p_change_correct)
    p_same = q * (1 - p_cw) * (1 - e) + (1 - q) * (1 - p_wc) * s
    return p_same if same else 1.0 - p_same


def update(
    q: float, same: bool | None, p_cw: float, p_wc: float, p_same_wrong: float, p_change_correct: float
) -> float:
    """Belief that the new answer is correct after one round showed ``same`` (``None``: no step, no change)."""
    q = _check_probability("q", q)
    if same is None:
        return q
    p_cw, p_wc, s, e = _params(p_cw, p_wc, p_same_wrong, p_change_correct)
    joint = np.array([1 - q, q]) @ _emissions(p_cw, p_wc, s, e)[int(bool(same))]
    total = joint.sum()
    if total <= 0.0:
        # An observation the model calls impossible (e.g. "changed" when nothing ever changes): fall back to the
        # prediction without it rather than divide by zero.
        return float(q * (1 - p_cw) + (1 - q) * p_wc)
    return float(joint[1] / total)


def filter_beliefs(
    p0: float,
    observations: Sequence[bool | None],
    p_cw: float,
    p_wc: float,
    p_same_wrong: float,
    p_change_correct: float,
) -> list[float]:
    """Beliefs ``[q_0, q_1, ..., q_T]`` that the answer of each round is correct, given the rounds so far."""
    beliefs = [_check_probability("p0", p0)]
    for same in observations:
        beliefs.append(update(beliefs[-1], same, p_cw, p_wc, p_same_wrong, p_change_correct))
    return beliefs


def expected_gain(q: float, p_cw: float, p_wc: float) -> float:
    """Expected accuracy change of one more round from belief ``q``: ``p_wc (1 - q) - p_cw q``."""
    return p_wc * (1.0 - q) - p_cw * q


def continuation_value(
    q: float,
    rounds_left: int,
    round_cost: float,
    p_cw: float,
    p_wc: float,
    p_same_wrong: float,
    p_change_correct: float,
) -> float:
    """Expected value of running one more round now and then stopping optimally (exact expectimax).

    ``V(q, 0) = q`` and ``V(q, k) = max(q, -c + sum_o P(o | q) V(q'(q, o), k - 1))``: this returns the second
    term for ``k = rounds_left`` (``-inf`` when no round is left). Solved level by level over the ``2**k``
    observation paths (capped at :data:`MAX_LOOKAHEAD` rounds ahead).
    """
    p_cw, p_wc, s, e = _params(p_cw, p_wc, p_same_wrong, p_change_correct)
    if rounds_left <= 0:
        return float("-inf")
    depth = min(int(rounds_left), MAX_LOOKAHEAD)
    emissions = _emissions(p_cw, p_wc, s, e)
    # Forward: beliefs and observation probabilities on every path, level by level (children of node i at the
    # next level are 2i (changed) and 2i + 1 (same)).
    levels = [np.array([float(q)])]
    probs = []
    for _ in range(depth):
        b = np.stack([1 - levels[-1], levels[-1]], axis=1)
        joint = np.einsum("nx,oxy->noy", b, emissions)  # [node, obs, x]
        p_obs = joint.sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            nxt = np.where(p_obs > 0, joint[:, :, 1] / p_obs, 0.0)
        probs.append(p_obs)
        levels.append(nxt.reshape(-1))
    # Backward: value of the best stop/continue strategy below each node.
    value = levels[depth]
    for d in range(depth - 1, -1, -1):
        cont = -round_cost + (probs[d] * value.reshape(-1, 2)).sum(axis=1)
        value = cont if d == 0 else np.maximum(levels[d], cont)
    return float(value[0])


def should_refine(
    q: float,
    rounds_left: int,
    round_cost: float,
    p_cw: float,
    p_wc: float,
    p_same_wrong: float,
    p_change_correct: float,
) -> bool:
    """Whether another round beats stopping now with the current answer (strictly; ties stop)."""
    value = continuation_value(q, rounds_left, round_cost, p_cw, p_wc, p_same_wrong, p_change_correct)
    return value > q + TIE_TOLERANCE


def smooth(
    p0: float,
    observations: Sequence[bool | None],
    p_cw: float,
    p_wc: float,
    p_same_wrong: float,
    p_change_correct: float,
) -> list[float]:
    """Forward-backward: ``P(round t's answer is correct | all observations)`` for every round ``0..T``."""
    p0 = _check_probability("p0", p0)
    p_cw, p_wc, s, e = _params(p_cw, p_wc, p_same_wrong, p_change_correct)
    emissions = _emissions(p_cw, p_wc, s, e)
    identity = np.eye(2)
    steps = [identity if o is None else emissions[int(bool(o))] for o in observations]
    alphas = [np.array([1 - p0, p0])]
    for step in steps:
        a = alphas[-1] @ step
        alphas.append(a / a.sum() if a.sum() > 0 else alphas[-1])
    betas = [np.ones(2)]
    for step in reversed(steps):
        b = step @ betas[0]
        betas.insert(0, b / b.sum() if b.sum() > 0 else betas[0])
    posteriors = []
    for a, b in zip(alphas, betas, strict=True):
        g = a * b
        posteriors.append(float(g[1] / g.sum()) if g.sum() > 0 else float(a[1]))
    return posteriors
