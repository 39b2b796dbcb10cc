"""Per-question belief: a hidden-Markov filter over correctness, Bayes-optimal stopping, and smoothing.

This module is the two-state filter whose only observation is "same answer or changed" (the paper's chain plus two
emission rates); :mod:`markovscale_dspy.core.evidence` extends it with answer identities and confidence and is what
``policy="belief"`` runs. The functions here stay for direct use and as the reference the extension reduces to.

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

Pure functions of floats (numpy only, no DSPy), like :mod:`markovscale_dspy.core.theory`. An observation is ``True``
(same answer), ``False`` (changed) or ``None`` (the round failed and kept the previous answer: no step happened).

Example:
    >>> from markovscale_dspy.core import belief
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
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from markovscale_dspy.core.theory import TIE_TOLERANCE
from markovscale_dspy.core.validation import check_probability

__all__ = [
    "MAX_LOOKAHEAD",
    "ChainParameters",
    "HiddenChains",
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
        check_probability("p_cw", p_cw),
        check_probability("p_wc", p_wc),
        check_probability("p_same_wrong", p_same_wrong),
        check_probability("p_change_correct", p_change_correct),
    )


@dataclass(frozen=True, eq=False)
class ChainParameters:
    """Per question type: its weight, the chain (``p0``, ``p_cw``, ``p_wc``) and the same/changed emissions.

    ``p_same_wrong`` = P(a wrong answer repeats | it stays wrong); ``p_change_correct`` = P(a correct answer is
    reworded | it stays correct). The filters (:class:`HiddenChains`, ``Evidence``) share these arrays.
    """

    weights: np.ndarray
    p0: np.ndarray
    p_cw: np.ndarray
    p_wc: np.ndarray
    p_same_wrong: np.ndarray
    p_change_correct: np.ndarray


@dataclass(frozen=True, eq=False)
class HiddenChains(ChainParameters):
    """One or more question types, each a chain with its own parameters; a question belongs to one unknown type.

    The belief is a ``(K, 2)`` array: ``b[k, x]`` = P(type k and the current answer is ``x``), x = 1 for correct.
    A single type is the plain chain of the paper; several types (fitted by EM, see ``TransitionModel.mixture``)
    let the filter learn what kind of question it is looking at from how its answers move.
    """

    @classmethod
    def single(cls, p0: float, p_cw: float, p_wc: float, p_same_wrong: float, p_change_correct: float) -> HiddenChains:
        p0 = check_probability("p0", p0)
        p_cw, p_wc, s, e = _params(p_cw, p_wc, p_same_wrong, p_change_correct)
        return cls(*(np.array([x]) for x in (1.0, p0, p_cw, p_wc, s, e)))

    @cached_property
    def steps(self) -> np.ndarray:
        """``M[o, k, x_prev, x]`` = P(X_t = x, observation o | X_{t-1} = x_prev, type k); o = 1 means same."""
        move = np.stack([np.stack([1 - self.p_wc, self.p_wc], -1), np.stack([self.p_cw, 1 - self.p_cw], -1)], 1)
        zero = np.zeros_like(self.p0)
        same = np.stack([np.stack([self.p_same_wrong, zero], -1), np.stack([zero, 1 - self.p_change_correct], -1)], 1)
        return np.stack([move * (1 - same), move * same])

    def initial(self) -> np.ndarray:
        return np.stack([self.weights * (1 - self.p0), self.weights * self.p0], -1)

    def update(self, b: np.ndarray, same: bool | None) -> np.ndarray:
        """Belief after one more round (``None``: the round failed, nothing moved)."""
        if same is None:
            return b
        nxt = np.einsum("kx,kxy->ky", b, self.steps[int(bool(same))])
        total = nxt.sum()
        if total <= 0.0:  # an observation the model calls impossible: keep the prediction without it
            return self.predict(b)
        return nxt / total

    def predict(self, b: np.ndarray) -> np.ndarray:
        """Belief after one more round whose answer is not looked at."""
        nxt = np.einsum("kx,okxy->ky", b, self.steps)
        return nxt / nxt.sum()

    def filter(self, observations: Sequence[bool | None]) -> list[np.ndarray]:
        beliefs = [self.initial()]
        for same in observations:
            beliefs.append(self.update(beliefs[-1], same))
        return beliefs

    @staticmethod
    def correct(b: np.ndarray) -> float:
        """P(the current answer is correct)."""
        return float(b[..., 1].sum(-1) / b.sum((-1, -2)))

    def expected_gain(self, b: np.ndarray) -> float:
        """Expected accuracy change of one more round from belief ``b``."""
        return self.correct(self.predict(b)) - self.correct(b)

    def continuation_value(self, b: np.ndarray, rounds_left: int, round_cost: float) -> float:
        """Exact expectimax value of refining once more and then stopping optimally (``-inf`` if no round left)."""
        if rounds_left <= 0:
            return float("-inf")
        depth = min(int(rounds_left), MAX_LOOKAHEAD)
        levels = [b[None] / b.sum()]  # [node, k, x]
        probs = []
        for _ in range(depth):
            joint = np.einsum("nkx,okxy->noky", levels[-1], self.steps)
            p_obs = joint.sum((2, 3))
            with np.errstate(invalid="ignore", divide="ignore"):
                nxt = np.where(p_obs[:, :, None, None] > 0, joint / p_obs[:, :, None, None], 0.0)
            probs.append(p_obs)
            levels.append(nxt.reshape(-1, *b.shape))
        value = levels[depth][..., 1].sum(-1)
        for d in range(depth - 1, -1, -1):
            cont = -round_cost + (probs[d] * value.reshape(-1, 2)).sum(axis=1)
            value = cont if d == 0 else np.maximum(levels[d][..., 1].sum(-1), cont)
        return float(value[0])

    def should_refine(self, b: np.ndarray, rounds_left: int, round_cost: float) -> bool:
        """Whether another round beats stopping now (strictly; ties stop)."""
        return self.continuation_value(b, rounds_left, round_cost) > self.correct(b) + TIE_TOLERANCE

    def smooth(self, observations: Sequence[bool | None]) -> list[float]:
        """Forward-backward: P(round t's answer is correct | all observations) for every round."""
        identity = np.broadcast_to(np.eye(2), (len(self.p0), 2, 2))
        steps = [identity if o is None else self.steps[int(bool(o))] for o in observations]
        alphas = [self.initial()]
        for step in steps:
            a = np.einsum("kx,kxy->ky", alphas[-1], step)
            alphas.append(a / a.sum() if a.sum() > 0 else alphas[-1])
        betas = [np.ones_like(alphas[0])]
        for step in reversed(steps):
            b = np.einsum("kxy,ky->kx", step, betas[0])
            betas.insert(0, b / b.sum() if b.sum() > 0 else betas[0])
        out = []
        for a, b in zip(alphas, betas, strict=True):
            g = a * b
            out.append(float(g[:, 1].sum() / g.sum()) if g.sum() > 0 else self.correct(a))
        return out


def observation_probability(
    q: float, same: bool, p_cw: float, p_wc: float, p_same_wrong: float, p_change_correct: float
) -> float:
    """P(the next round's answer is the same / changed), given belief ``q`` that the current answer is correct."""
    p_cw, p_wc, s, e = _params(p_cw, p_wc, p_same_wrong, p_change_correct)
    p_same = q * (1 - p_cw) * (1 - e) + (1 - q) * (1 - p_wc) * s
    return p_same if same else 1.0 - p_same


def _belief(q: float) -> np.ndarray:
    q = check_probability("q", q)
    return np.array([[1 - q, q]])


def update(
    q: float, same: bool | None, p_cw: float, p_wc: float, p_same_wrong: float, p_change_correct: float
) -> float:
    """Belief that the new answer is correct after one round showed ``same`` (``None``: no step, no change)."""
    chain = HiddenChains.single(0.5, p_cw, p_wc, p_same_wrong, p_change_correct)
    return chain.correct(chain.update(_belief(q), same))


def filter_beliefs(
    p0: float,
    observations: Sequence[bool | None],
    p_cw: float,
    p_wc: float,
    p_same_wrong: float,
    p_change_correct: float,
) -> list[float]:
    """Beliefs ``[q_0, q_1, ..., q_T]`` that the answer of each round is correct, given the rounds so far."""
    chain = HiddenChains.single(p0, p_cw, p_wc, p_same_wrong, p_change_correct)
    return [chain.correct(b) for b in chain.filter(observations)]


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
    chain = HiddenChains.single(0.5, p_cw, p_wc, p_same_wrong, p_change_correct)
    return chain.continuation_value(_belief(q), rounds_left, round_cost)


def should_refine(q: float, rounds_left: int, round_cost: float, **rates: float) -> bool:
    """Whether another round beats stopping now with the current answer (strictly; ties stop).

    ``rates`` are the chain's ``p_cw``, ``p_wc``, ``p_same_wrong`` and ``p_change_correct``.
    """
    return HiddenChains.single(0.5, **rates).should_refine(_belief(q), rounds_left, round_cost)


def smooth(p0: float, observations: Sequence[bool | None], **rates: float) -> list[float]:
    """Forward-backward: ``P(round t's answer is correct | all observations)`` for every round ``0..T``.

    ``rates`` are the chain's ``p_cw``, ``p_wc``, ``p_same_wrong`` and ``p_change_correct``, as for
    :func:`filter_beliefs`.
    """
    return HiddenChains.single(p0, **rates).smooth(observations)
