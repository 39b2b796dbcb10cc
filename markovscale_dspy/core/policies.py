"""Stopping policies: before every refinement round, decide from what is known so far whether to run it.

Policy layer: depends on the theory and the model, never on DSPy. A policy is a small object with a ``decide``
method that reads an immutable :class:`RoundContext` and returns a :class:`Decision`. It holds no per-call state,
so one instance can serve many threads; anything a policy wants to remember within a chain, it recomputes from the
context (the whole history of the chain is in it).

New policies plug in without touching the module: pass an instance as ``MarkovRefine(policy=...)`` or register a
name with :func:`register_policy`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from markovscale_dspy._exceptions import ConfigurationError, NotCalibratedError
from markovscale_dspy.core.evidence import AnswerBelief, Evidence
from markovscale_dspy.core.model import TransitionModel

__all__ = [
    "BeliefPolicy",
    "ClosedFormPolicy",
    "Decision",
    "FixedPolicy",
    "Policy",
    "RoundContext",
    "available_policies",
    "belief_of",
    "evidence_for",
    "observations",
    "observations_of",
    "register_policy",
    "resolve_policy",
]


@dataclass(frozen=True)
class RoundContext:
    """Everything a policy may look at before deciding on the next refinement round.

    Attributes:
        model: The calibrated chain, or ``None`` if the module is not calibrated.
        rounds_done: Refinement rounds attempted so far (0 before the first one).
        max_rounds: The module's cap on refinement rounds.
        round_cost: Accuracy one round must buy to be worth running.
        answer_keys: Normalised answer of every round so far (round 0 first); a failed round repeats the answer it
            kept.
        failed: For every round so far, whether it failed and kept the previous answer.
        inputs: The question's inputs (for policies that look at the question itself).
        confidences: Every round's answer confidence from token log-probabilities (``None`` where the LM gave
            none; empty when no round had any).
        select: How the module will choose the returned answer (``"last"`` or ``"best"``), so a policy can plan
            for it.
    """

    model: TransitionModel | None
    rounds_done: int
    max_rounds: int
    round_cost: float
    answer_keys: tuple[Hashable, ...] = ()
    failed: tuple[bool, ...] = ()
    inputs: Mapping[str, Any] = field(default_factory=dict)
    confidences: tuple[float | None, ...] = ()
    select: str = "last"


@dataclass(frozen=True)
class Decision:
    """A policy's verdict: run another round (``refine=True``) or stop, with a short machine-readable reason.

    ``info`` carries numbers worth showing in the trajectory (e.g. the planned rounds or a belief).
    """

    refine: bool
    reason: str
    info: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Policy(Protocol):
    """What MarkovRefine needs from a stopping policy."""

    #: Whether :meth:`decide` needs ``context.model``; the module refuses to start without one.
    requires_model: bool

    def decide(self, context: RoundContext) -> Decision:
        """Return whether to run refinement round ``context.rounds_done + 1``."""
        ...


def observations_of(keys: Sequence[Hashable], failed: Sequence[bool]) -> list[bool | None]:
    """Per refinement round: ``True`` if its answer equals the previous one, ``False`` if it changed, ``None`` if
    the round failed (it kept the previous answer, so the chain did not move)."""
    return [None if failed[t] else keys[t] == keys[t - 1] for t in range(1, len(keys))]


def observations(context: RoundContext) -> list[bool | None]:
    """:func:`observations_of` the rounds in ``context``."""
    return observations_of(context.answer_keys, context.failed)


def _emission_model(model: TransitionModel | None, what: str) -> TransitionModel:
    if model is None or not model.has_emissions:
        raise NotCalibratedError(
            f"{what} needs a TransitionModel with answer-change rates (p_same_wrong, p_change_correct); "
            "calibrate with MarkovCalibrator, which records them"
        )
    return model


@dataclass(frozen=True)
class FixedPolicy:
    """Always run ``max_rounds`` refinement rounds: the paper's sequential baseline (no model needed)."""

    requires_model: bool = field(default=False, init=False)

    def decide(self, context: RoundContext) -> Decision:
        if context.rounds_done < context.max_rounds:
            return Decision(True, "fixed")
        return Decision(False, "max_rounds")


@dataclass(frozen=True)
class ClosedFormPolicy:
    """Run ``optimal_rounds(p0, p_cw, p_wc, round_cost, max_rounds)`` rounds, the same number for every question.

    This is the paper's population rule: 0 rounds (one LM call) in the degrading or neutral regime, otherwise
    refine while the predicted marginal gain exceeds ``round_cost``.

    Stop reasons: ``"degrading"`` / ``"neutral"`` (refinement does not pay at all), ``"cost"`` (it improves, but
    not by more than one round's cost), ``"optimal_rounds"`` (the planned rounds are done).

    It applies the paper's rule as is: no confidence gate by default (``min_prob_improves = 0``).
    """

    requires_model: bool = field(default=True, init=False)
    min_prob_improves: float = field(default=0.0, init=False)

    def decide(self, context: RoundContext) -> Decision:
        model = context.model
        planned = model.optimal_rounds(round_cost=context.round_cost, max_rounds=context.max_rounds)
        info = {"planned_rounds": planned}
        if context.rounds_done < planned:
            return Decision(True, "closed_form", info)
        if planned == 0:
            regime = model.regime()
            return Decision(False, "cost" if regime == "improving" else regime, info)
        return Decision(False, "optimal_rounds", info)


def evidence_for(
    model: TransitionModel, confidences: Sequence[float | None], rounds: int
) -> tuple[Evidence, list[int | None] | None]:
    """The evidence model for a chain of ``rounds + 1`` answers, and their confidence bins.

    The model's confidence part is used only when this chain's answers carry confidence (its round 0 had one):
    without log-probabilities both filtering and planning are exactly those of a model without confidence.
    """
    values = list(confidences)[: rounds + 1]
    values += [None] * (rounds + 1 - len(values))
    bins = model.confidence_bins(values)
    evidence = model.evidence()
    if not bins or bins[0] is None:
        return evidence.without_confidence(), None
    return evidence, bins


def belief_of(model: TransitionModel, context: RoundContext) -> tuple[Evidence, AnswerBelief]:
    """The evidence model and the belief after the rounds in ``context`` (see :func:`evidence_for`)."""
    keys, failed = context.answer_keys, context.failed
    evidence, bins = evidence_for(model, context.confidences, len(keys) - 1)
    return evidence, evidence.filter(keys, failed, bins)


def _same_as_before(context: RoundContext) -> bool | None:
    obs = observations(context)
    return obs[-1] if obs else None


@dataclass(frozen=True)
class BeliefPolicy:
    """Per-question Bayes-optimal stopping on a hidden-Markov belief over which answer is correct.

    The filter (:mod:`markovscale_dspy.core.evidence`) runs over question type and the identity of the correct
    answer among those seen: every round's answer -- the same as before, a new one, or one that returns after a
    change -- and, when the LM gives token log-probabilities, its confidence update the belief. The belief starts
    at ``p0`` (moved by the first answer's confidence). Before each round an exact expectimax over the remaining
    rounds decides whether another round is worth ``round_cost``, planning for the answer the module will return
    (``select``): a question whose answer has stabilised stops early, one whose answer keeps changing is refined
    while that is expected to pay, and a degrading task costs one call.

    Stop reasons: ``"degrading"`` / ``"neutral"`` / ``"cost"`` (no round pays from the start), ``"stable_answer"``
    (stopped after an unchanged answer), ``"belief"`` (stopped after a change), ``"max_rounds"``. The belief after
    every round is in ``info["belief"]``, the expected gain of another round over stopping in ``info["advantage"]``.
    Without question types it refines only when ``P(refinement helps) >= 0.9`` by default (the module answers in one
    call with ``"uncertain"`` otherwise); with types, whether refining pays is a per-question matter the filter
    decides.
    """

    requires_model: bool = field(default=True, init=False)
    min_prob_improves: float = field(default=0.9, init=False)

    def decide(self, context: RoundContext) -> Decision:
        model = _emission_model(context.model, "policy 'belief'")
        evidence, belief = belief_of(model, context)
        info: dict[str, Any] = {"belief": float(belief.correct()[0])}
        left = context.max_rounds - context.rounds_done
        if left <= 0:
            return Decision(False, "max_rounds", info)
        refine, numbers = evidence.decide(belief, left, context.round_cost, context.select)
        info.update(numbers)
        if refine:
            return Decision(True, "belief", info)
        if context.rounds_done == 0:
            regime = model.regime()
            return Decision(False, "cost" if regime == "improving" else regime, info)
        return Decision(False, "stable_answer" if _same_as_before(context) else "belief", info)


@dataclass(frozen=True)
class Abstain:
    """Never refine, for a stated reason (used when the calibration is not confident that refinement helps)."""

    reason: str
    info: Mapping[str, Any] = field(default_factory=dict)
    requires_model: bool = field(default=False, init=False)

    def decide(self, context: RoundContext) -> Decision:
        return Decision(False, self.reason, self.info)


_REGISTRY: dict[str, Callable[[], Policy]] = {
    "fixed": FixedPolicy,
    "closed_form": ClosedFormPolicy,
    "belief": BeliefPolicy,
}


def register_policy(name: str, factory: Callable[[], Policy]) -> None:
    """Make ``MarkovRefine(policy=name)`` build its policy with ``factory()``.

    Example:
        >>> from markovscale_dspy import Decision, register_policy
        >>> class OneRound:
        ...     requires_model = False
        ...     def decide(self, context):
        ...         return Decision(context.rounds_done < 1, "one_round")
        >>> register_policy("one_round", OneRound)
    """
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"policy name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise ConfigurationError(f"policy factory for {name!r} must be callable, got {factory!r}")
    _REGISTRY[name] = factory


def available_policies() -> list[str]:
    """Names accepted by ``MarkovRefine(policy=...)``."""
    return sorted(_REGISTRY)


def resolve_policy(policy: str | Policy) -> Policy:
    """Turn a policy name or instance into an instance, with a clear error for anything else."""
    if isinstance(policy, str):
        try:
            return _REGISTRY[policy]()
        except KeyError:
            raise ConfigurationError(
                f"unknown policy {policy!r}; expected one of {', '.join(available_policies())} "
                "or an object with `requires_model` and `decide(context)`"
            ) from None
    if isinstance(policy, Policy):
        return policy
    raise ConfigurationError(
        f"policy must be a name ({', '.join(available_policies())}) or an object with `requires_model` and "
        f"`decide(context)`, got {policy!r}"
    )
