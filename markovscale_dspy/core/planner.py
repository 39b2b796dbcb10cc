"""Planning inference compute: a single call, sequential refinement, a vote over samples, or both.

Policy layer (numpy/scipy only, no DSPy). A *strategy* runs ``samples`` independent chains of ``rounds``
refinement rounds each and returns the plurality answer of their final rounds:

============  =========================  ==========================================
kind          samples x rounds           LM calls
============  =========================  ==========================================
single        1 x 0                      1
refine        1 x T                      1 + T
vote          n x 0                      n
refine_vote   n x T  (n >= 2, T >= 1)    n (1 + T)
============  =========================  ==========================================

Every chain starts from a fresh sample of the program (its own rollout id, at the module's temperature), so all
strategies are built from the same kind of answer and their predictions are comparable. Predictions come from a
calibrated :class:`~markovscale_dspy.core.model.TransitionModel` with a vote model (``model.votes``): a sample is
correct with its question's own probability ``theta ~ Beta(a, b)``, and a chain started from a sample and refined
``T`` rounds is correct with probability ``pi + (theta - pi) lam**T`` (the chain's one-step map applied ``T`` times
to the question's own starting accuracy), with its wrong final answers drawn from the question's distractors like a
sample's. So every strategy -- one chain or ``n`` voted ones, refined or not -- is
:func:`~markovscale_dspy.core.voting.vote_accuracy` with that affine map (``n = 1`` gives ``pi + (E[theta] - pi)
lam**T``, the chain's own ``accuracy_at(T)`` from the samples' mean accuracy; the vote over refined chains is checked
against Monte Carlo in the tests). Assumed: the refinement rates do not depend on the question. Without a vote model
only the single call and refinement are planned, from the chain's ``p0``.

Uncertainty: every prediction is recomputed under paired draws of the chain's Beta posteriors and the vote model's
parametric-bootstrap refits; the interval is the central part of those values. The plan maximises predicted
``accuracy - call_cost * calls`` within ``max_calls`` but only claims a gain over a single call that the draws
support with probability at least ``min_prob_gain`` -- otherwise it falls back to the best strategy that does
(at worst the single call), the same kind of gate as ``MarkovRefine(min_prob_improves=...)``.

Example:
    >>> from markovscale_dspy.core.model import TransitionModel
    >>> from markovscale_dspy.core.planner import plan
    >>> model = TransitionModel(n0_correct=300, n0_total=1000, n_cc=900, n_cw=100, n_wc=400, n_ww=600)
    >>> chosen = plan(model, max_calls=4)  # no vote model: single call or refinement only
    >>> chosen.kind, chosen.calls
    ('refine', 4)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from markovscale_dspy._exceptions import ConfigurationError
from markovscale_dspy.core.model import TransitionModel
from markovscale_dspy.core.validation import check_int, check_number
from markovscale_dspy.core.voting import MAX_VOTES

__all__ = ["KINDS", "MAX_CALLS_LIMIT", "Plan", "Strategy", "StrategyPrediction", "candidates", "plan", "predict"]

#: The strategy kinds, in order of increasing machinery.
KINDS = ("single", "refine", "vote", "refine_vote")
#: Largest call budget the exact vote formulas are used for.
MAX_CALLS_LIMIT = 16
#: Posterior draws used when the model has no vote model (single and refine only).
CHAIN_DRAWS = 400
#: Predicted accuracies closer than this are equal (the exact formulas carry ~1e-12 of floating-point error when
#: the Beta concentration is large, which must not count as a gain).
ACCURACY_TOLERANCE = 1e-9


@dataclass(frozen=True, order=True)
class Strategy:
    """``samples`` independent chains of ``rounds`` refinement rounds, then a plurality vote over their answers."""

    samples: int
    rounds: int

    @property
    def kind(self) -> str:
        """``"single"``, ``"refine"``, ``"vote"`` or ``"refine_vote"``."""
        if self.samples == 1:
            return "single" if self.rounds == 0 else "refine"
        return "vote" if self.rounds == 0 else "refine_vote"

    @property
    def calls(self) -> int:
        """LM calls per question."""
        return self.samples * (1 + self.rounds)

    @property
    def name(self) -> str:
        """A short label: ``single``, ``refine T=3``, ``vote n=5``, ``refine_vote n=3 T=1``."""
        return {
            "single": "single",
            "refine": f"refine T={self.rounds}",
            "vote": f"vote n={self.samples}",
            "refine_vote": f"refine_vote n={self.samples} T={self.rounds}",
        }[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "samples": self.samples, "rounds": self.rounds, "calls": self.calls}


def candidates(max_calls: int, kinds: Iterable[str] = KINDS) -> list[Strategy]:
    """Every strategy of the given kinds within ``max_calls`` LM calls (the single call always included)."""
    max_calls = check_int("max_calls", max_calls, 1, MAX_CALLS_LIMIT)
    kinds = _check_kinds(kinds)
    out = []
    for n in range(1, max_calls + 1):
        for t in range(0, max_calls // n):
            s = Strategy(n, t)
            if s.kind in kinds or s.kind == "single":
                out.append(s)
    return out


def _check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ConfigurationError(f"strategies must be a non-empty subset of {KINDS}, got {kinds!r}")
    return kinds


@dataclass(frozen=True)
class StrategyPrediction:
    """What the calibration predicts for one strategy.

    Attributes:
        strategy: The strategy.
        accuracy: Predicted accuracy at the point estimates.
        interval: Central ``level`` interval of the expected accuracy over the posterior / bootstrap draws.
        objective: ``accuracy - call_cost * calls``.
        prob_gain: Posterior probability that its objective beats the single call's (``None`` for the single call).
        draws: The expected accuracy under every draw.
    """

    strategy: Strategy
    accuracy: float
    interval: tuple[float, float]
    objective: float
    prob_gain: float | None
    draws: np.ndarray = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.strategy.name

    def predictive_interval(self, questions: int, level: float = 0.95) -> tuple[float, float]:
        """Where the observed accuracy on ``questions`` new questions should fall: the draws' expected accuracies,
        each with the binomial noise of ``questions`` independent questions (a mixture of binomials)."""
        questions = check_int("questions", questions, 1)
        level = check_number("level", level, 0, 1, lo_open=True, hi_open=True)
        values = self.draws if self.draws.size else np.array([self.accuracy])
        k = np.arange(questions + 1)
        cdf = np.mean(stats.binom.cdf(k[None, :], questions, np.clip(values, 0, 1)[:, None]), axis=0)
        tail = (1 - level) / 2
        lo = int(np.searchsorted(cdf, tail, side="left"))
        hi = int(np.searchsorted(cdf, 1 - tail, side="left"))
        return lo / questions, min(hi, questions) / questions

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.strategy.to_dict(),
            "name": self.name,
            "accuracy": self.accuracy,
            "interval": list(self.interval),
            "objective": self.objective,
            "prob_gain": self.prob_gain,
        }


def _of_chosen(name: str, doc: str) -> property:
    """A read-only attribute of the chosen strategy, exposed on the plan."""
    return property(lambda plan: getattr(plan.chosen.strategy, name), doc=doc)


@dataclass(frozen=True)
class Plan:
    """The chosen strategy, and every candidate's prediction.

    Attributes:
        chosen: What runs.
        best: The candidate with the highest predicted objective (differs from ``chosen`` only when the
            confidence gate held it back).
        predictions: Every candidate, in order of (samples, rounds).
        max_calls: The call budget.
        call_cost: Accuracy one LM call must buy.
        min_prob_gain: The confidence gate.
        reason: ``"best"`` (the top candidate runs) or ``"uncertain"`` (the gate held the top one back).
        notes: Anything the planner could not consider (e.g. no vote model: no vote strategies).
    """

    chosen: StrategyPrediction
    best: StrategyPrediction
    predictions: tuple[StrategyPrediction, ...]
    max_calls: int
    call_cost: float
    min_prob_gain: float
    reason: str
    notes: tuple[str, ...] = ()

    kind = _of_chosen("kind", "What runs: 'single', 'refine', 'vote' or 'refine_vote'.")
    samples = _of_chosen("samples", "How many chains run in parallel (1 unless the plan votes).")
    rounds = _of_chosen("rounds", "Refinement rounds per chain after round 0.")
    calls = _of_chosen("calls", "LM calls per question: samples x (rounds + 1).")

    def prediction(self, samples: int, rounds: int) -> StrategyPrediction:
        """The prediction for ``samples`` chains of ``rounds`` rounds (KeyError if it was not a candidate)."""
        for p in self.predictions:
            if p.strategy == Strategy(samples, rounds):
                return p
        raise KeyError(f"no candidate with samples={samples}, rounds={rounds} (max_calls={self.max_calls})")

    def best_of(self, kind: str) -> StrategyPrediction | None:
        """The candidate of ``kind`` with the highest predicted objective (fewest calls on ties)."""
        pool = [p for p in self.predictions if p.strategy.kind == kind]
        return _argmax(pool) if pool else None

    def describe(self) -> str:
        """The plan in one paragraph of plain words."""
        c = self.chosen
        single = self.prediction(1, 0)
        lo, hi = c.interval
        words = {
            "single": "answer with a single call",
            "refine": f"refine the answer {c.strategy.rounds} round(s)",
            "vote": f"take a plurality vote over {c.strategy.samples} independent samples",
            "refine_vote": (
                f"run {c.strategy.samples} independent chains of {c.strategy.rounds} refinement round(s) and vote "
                "over their answers"
            ),
        }[c.strategy.kind]
        text = f"Plan: {words} ({c.strategy.calls} LM call(s) per question), predicted accuracy {c.accuracy:.1%}"
        text += f" (95% interval {lo:.1%}-{hi:.1%})"
        if c.strategy.kind != "single":
            text += f" vs {single.accuracy:.1%} for a single call; P(gain) = {c.prob_gain:.2f}"
        text += "."
        if self.reason == "uncertain":
            text += (
                f" The best prediction, {self.best.name} at {self.best.accuracy:.1%}, is not sure enough to beat a "
                f"single call (P(gain) = {self.best.prob_gain:.2f} < {self.min_prob_gain:g}); calibrate on more "
                "examples to settle it."
            )
        for note in self.notes:
            text += f" {note}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.to_dict(),
            "best": self.best.to_dict(),
            "reason": self.reason,
            "max_calls": self.max_calls,
            "call_cost": self.call_cost,
            "min_prob_gain": self.min_prob_gain,
            "notes": list(self.notes),
            "predictions": [p.to_dict() for p in self.predictions],
        }


def _argmax(pool: Sequence[StrategyPrediction]) -> StrategyPrediction:
    top = max(p.objective for p in pool)
    tied = [p for p in pool if p.objective >= top - ACCURACY_TOLERANCE]
    order = {kind: i for i, kind in enumerate(KINDS)}
    return min(tied, key=lambda p: (p.strategy.calls, order[p.strategy.kind], p.strategy))


def _chain_draws(model: TransitionModel, count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 104729])
    return {name: model.posterior(name).rvs(size=count, random_state=rng) for name in ("p0", "p_cw", "p_wc")}


def chain_affine(p_cw: np.ndarray | float, p_wc: np.ndarray | float, rounds: int) -> tuple[Any, Any]:
    """``(shift, scale)`` with ``P(correct after rounds) = shift + scale * P(correct at start)``: how ``rounds`` of
    refinement map a question's accuracy (what a vote over refined chains votes with).

    Example:
        >>> shift, scale = chain_affine(0.1, 0.3, 2)
        >>> round(float(shift + scale * 0.5), 4)  # accuracy 0.5 after two rounds
        0.66
    """
    p_cw, p_wc = np.asarray(p_cw, dtype=float), np.asarray(p_wc, dtype=float)
    lam = 1.0 - p_cw - p_wc
    scale = lam**rounds
    total = p_cw + p_wc
    pi = np.divide(p_wc, total, out=np.zeros_like(total), where=total > 0)
    return pi * (1.0 - scale), scale


def _chain_accuracy(p0: Any, p_cw: Any, p_wc: Any, rounds: int) -> Any:
    shift, scale = chain_affine(p_cw, p_wc, rounds)
    return shift + scale * np.asarray(p0, dtype=float)


def predict(
    model: TransitionModel,
    max_calls: int,
    call_cost: float = 0.0,
    *,
    kinds: Iterable[str] = KINDS,
    level: float = 0.95,
    seed: int = 0,
) -> list[StrategyPrediction]:
    """Predictions for every candidate strategy within ``max_calls`` (vote kinds only with ``model.votes``)."""
    max_calls = check_int("max_calls", max_calls, 1, min(MAX_CALLS_LIMIT, MAX_VOTES))
    call_cost = check_number("call_cost", call_cost, 0, 1, hi_open=True, unit="accuracy per LM call")
    level = check_number("level", level, 0, 1, lo_open=True, hi_open=True)
    kinds = _check_kinds(kinds)
    votes = model.votes
    if votes is None:
        kinds = tuple(k for k in kinds if k in ("single", "refine"))
    count = len(votes.draws) if votes is not None and votes.draws else CHAIN_DRAWS
    chain = _chain_draws(model, count, seed)
    tail = (1 - level) / 2
    rows = []
    for strategy in candidates(max_calls, kinds):
        n, t = strategy.samples, strategy.rounds
        if votes is None:  # single and refine only, from the chain's own round 0
            point = float(model.accuracy_at(t))
            draws = np.asarray(_chain_accuracy(chain["p0"], chain["p_cw"], chain["p_wc"], t), dtype=float)
        else:
            shift, scale = chain_affine(model.p_cw, model.p_wc, t)
            point = votes.accuracy(n, float(shift), float(scale))
            if votes.draws:
                shifts, scales = chain_affine(chain["p_cw"], chain["p_wc"], t)
                draws = votes.accuracy_draws(n, shifts, scales)
            else:
                draws = np.array([point])
        # A question whose samples all gave no answer is wrong, as dspy.Evaluate scores it (failures independent)
        answered = 1.0 - (1.0 - model.answer_rate) ** n
        rows.append((strategy, point * answered, draws * answered))
    single_draws = rows[0][2] - call_cost
    out = []
    for strategy, point, draws in rows:
        objective = point - call_cost * strategy.calls
        if strategy.kind == "single":
            prob = None
        elif draws.size == single_draws.size:
            prob = float(np.mean(draws - call_cost * strategy.calls > single_draws + ACCURACY_TOLERANCE))
        else:
            prob = float(objective > rows[0][1] - call_cost)
        lo, hi = (float(x) for x in np.quantile(draws, [tail, 1 - tail]))
        out.append(StrategyPrediction(strategy, point, (lo, hi), objective, prob, draws))
    return out


def plan(
    model: TransitionModel,
    max_calls: int = 8,
    call_cost: float = 0.0,
    min_prob_gain: float = 0.9,
    *,
    kinds: Iterable[str] = KINDS,
    level: float = 0.95,
    seed: int = 0,
) -> Plan:
    """Choose how to spend up to ``max_calls`` LM calls per question (see the module docstring).

    Args:
        model: The calibrated chain, with a vote model to consider votes.
        max_calls: LM calls per question at most.
        call_cost: Accuracy one LM call must buy (0: the most accurate strategy within the budget).
        min_prob_gain: Run a strategy other than the single call only if the calibration says, with at least this
            probability, that it beats the single call (0 disables the gate).
        kinds: The strategy kinds to consider.
        level: Level of the prediction intervals.
        seed: Seed of the posterior draws.
    """
    min_prob_gain = check_number("min_prob_gain", min_prob_gain, 0, 1)
    predictions = predict(model, max_calls, call_cost, kinds=kinds, level=level, seed=seed)
    best = _argmax(predictions)
    supported = [p for p in predictions if p.prob_gain is None or p.prob_gain >= min_prob_gain]
    chosen = _argmax(supported)
    notes = ()
    if model.votes is None and any(k in ("vote", "refine_vote") for k in _check_kinds(kinds)):
        notes = (
            "Votes were not considered: the calibration drew no parallel samples "
            "(MarkovCalibrator(metric, parallel_samples=8)).",
        )
    reason = "best" if chosen.strategy == best.strategy else "uncertain"
    return Plan(chosen, best, tuple(predictions), max_calls, float(call_cost), min_prob_gain, reason, notes)
