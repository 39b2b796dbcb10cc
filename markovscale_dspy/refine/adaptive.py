"""Per-question stopping of a vote, as answers arrive: when one more sample (or refined chain) is worth its calls.

Module layer: a thin wrapper of :mod:`markovscale_dspy.core.stopping` that speaks in answer keys instead of vote
counts. The calibrated vote model says how accuracy varies over questions and how wrong answers agree; with the
chain's transition rates it says the same of answers refined ``rounds`` times. From it, after every answer, the
posterior that the plurality answer is correct decides whether one more chain is worth ``call_cost`` per call; at
``call_cost=0`` the vote stops only when the remaining chains cannot change its answer, so it returns exactly the
full vote's answer with fewer calls.

:meth:`VoteStopper.next_batch` says how many chains to launch at once: the ones the rule will need whatever they
answer (at most ``concurrency``). Launched together they never buy a chain the one-at-a-time rule would not, so
concurrent runs keep its answers and its calls.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from markovscale_dspy.core.model import TransitionModel
from markovscale_dspy.core.planner import chain_affine
from markovscale_dspy.core.stopping import MAX_STOP_CALLS, VotePrior, certain_calls, should_stop, stopping_table

__all__ = ["VoteStopper", "best_budget"]


@dataclass(frozen=True)
class VoteStopper:
    """The stopping rule of one vote: its prior, its budget of chains and what a chain costs.

    Args:
        prior: The law of one question's answers (the vote model, shifted by ``rounds`` of refinement).
        budget: Chains at most.
        chain_cost: What one chain costs in accuracy (``call_cost`` times its calls).

    Example:
        >>> from markovscale_dspy.core.stopping import VotePrior
        >>> stopper = VoteStopper(VotePrior.single(a=6.0, b=2.0, distractors=3, alpha=0.5), budget=8, chain_cost=0.0)
        >>> stopper.next_batch([], concurrency=8)  # four agreeing answers would settle it: launch four at once
        4
        >>> stopper.decide(["42", "42", "42", "42"])[0]
        True
    """

    prior: VotePrior
    budget: int
    chain_cost: float

    @property
    def expected(self) -> dict[str, float]:
        """The rule's exact expected accuracy and chains per question under its prior."""
        table = stopping_table(self.prior, self.budget, self.chain_cost)
        return {"accuracy": table.accuracy, "chains": table.expected_calls}

    @classmethod
    def for_strategy(cls, model: TransitionModel, samples: int, rounds: int, call_cost: float) -> VoteStopper | None:
        """The rule for a vote over ``samples`` chains of ``rounds`` refinement rounds, or ``None`` when there is
        nothing to decide (one chain, no vote model, or a budget beyond the exact rule's)."""
        if samples < 2 or model.votes is None or samples > MAX_STOP_CALLS:
            return None
        shift, scale = chain_affine(model.p_cw, model.p_wc, rounds) if rounds else (0.0, 1.0)
        prior = VotePrior.from_model(model.votes, shift=float(shift), scale=float(scale))
        return cls(prior, samples, call_cost * (rounds + 1))

    def decide(self, keys: Sequence[Hashable | None]) -> tuple[bool, dict[str, Any]]:
        """``(stop, info)`` after the chains so far (``None`` for a failed one: it spent its calls, it does not
        vote); ``info`` has the reason, the posterior that the plurality answer is correct and the expected gain of
        going on (see :func:`~markovscale_dspy.core.stopping.should_stop`)."""
        return should_stop(self.prior, _counts(keys), len(keys), self.budget, self.chain_cost)

    def next_batch(self, keys: Sequence[Hashable | None], concurrency: int) -> int:
        """How many chains to launch now: 0 when the rule stops, else the ones it needs whatever they answer (at
        least one, at most ``concurrency``)."""
        if self.decide(keys)[0]:
            return 0
        needed = certain_calls(self.prior, _counts(keys), len(keys), self.budget, self.chain_cost)
        return max(1, min(concurrency, needed, self.budget - len(keys)))


def _counts(keys: Sequence[Hashable | None]) -> list[int]:
    """Votes per distinct answer in order of first appearance (failed chains do not vote)."""
    counts: dict[Hashable, int] = {}
    for key in keys:
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
    return list(counts.values())


def best_budget(model: TransitionModel, rounds: int, max_calls: int, call_cost: float) -> int:
    """The budget of chains an adaptive vote over chains of ``rounds`` refinement rounds should get within
    ``max_calls`` calls: the one maximising its exact expected accuracy minus ``call_cost`` per expected call. A
    fixed vote's best size is smaller: the adaptive rule rarely spends its whole budget, so a larger one costs little.

    Example:
        >>> from markovscale_dspy.core.model import TransitionModel
        >>> from markovscale_dspy.core.voting import VoteModel
        >>> votes = VoteModel(questions=((8, 6, (2,)),) * 50, a=6.0, b=2.0, distractors=3, alpha=0.5)
        >>> model = TransitionModel(n0_correct=75, n0_total=100, n_cc=1, n_cw=1, n_wc=1, n_ww=1, votes=votes)
        >>> best_budget(model, rounds=0, max_calls=8, call_cost=0.02)
        8
    """
    per_chain = rounds + 1
    # No larger than the samples per calibration question: the vote model was not fitted beyond them.
    most = model.votes.max_samples if model.votes is not None else 0
    budgets = range(2, min(max_calls // per_chain, MAX_STOP_CALLS, most) + 1)
    best, value = 0, -float("inf")
    for n in budgets:
        stopper = VoteStopper.for_strategy(model, n, rounds, call_cost)
        if stopper is None:
            continue
        expected = stopper.expected
        objective = expected["accuracy"] - call_cost * per_chain * expected["chains"]
        if objective > value + 1e-12:  # ties go to the smaller budget
            best, value = n, objective
    return best
