"""Budget allocation over a batch: each refinement round goes to the question where it is expected to gain most.

Module layer, private; used by ``MarkovRefine.answer_with_budget``. The expected gain of one more round from a
belief ``q`` is ``p_wc (1 - q) - p_cw q`` (summed over question types; the belief sees answer identities and
confidence, as the belief policy's does). Along a question's chain it shrinks geometrically (the accuracy curve is
concave), so taking the largest current gain first is the optimal order for a total budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dspy
from dspy.utils.parallelizer import ParallelExecutor

from markovscale_dspy._exceptions import RoundZeroError
from markovscale_dspy.core import belief
from markovscale_dspy.core.model import TransitionModel
from markovscale_dspy.core.policies import Decision, evidence_for
from markovscale_dspy.core.theory import TIE_TOLERANCE
from markovscale_dspy.refine.loop import Call, ChainState, Outcome
from markovscale_dspy.spending import cap_reached
from markovscale_dspy.tracing import carry_context

__all__ = ["BudgetResult", "allocate"]


@dataclass
class BudgetResult:
    """What a budgeted batch produced.

    Attributes:
        predictions: One per example, in order; ``None`` where round 0 failed (see ``errors``).
        budget: Refinement rounds allowed.
        spent: Refinement rounds run (never more than ``budget``).
        log: One entry per allocated round: step, question index, the round, its expected gain, and the best gain
            among questions not chosen at that step.
        errors: Round-0 failures by question index.
    """

    predictions: list[dspy.Prediction | None]
    budget: int
    spent: int
    log: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)


def _belief_and_gain(state: ChainState, model: TransitionModel) -> tuple[float, float]:
    if model.has_emissions:
        evidence, bins = evidence_for(model, state.confidences, state.rounds)
        point = evidence.subset(slice(0, 1))
        b = point.filter(state.keys, state.failed, bins)
        return float(b.correct()[0]), point.expected_gain(b)
    q = float(model.accuracy_at(sum(not f for f in state.failed[1:])))
    return q, belief.expected_gain(q, model.p_cw, model.p_wc)


def _outcome(result: Any) -> Outcome:
    return result if isinstance(result, Outcome) else Outcome(error=RuntimeError(f"executor returned {result!r}"))


def allocate(
    states: list[ChainState],
    model: TransitionModel,
    max_rounds: int,
    round_cost: float,
    budget: int,
    call: Callable[[Call], Outcome],
    num_threads: int | None,
    select: str,
    display_progress: bool,
) -> BudgetResult:
    """Run round 0 for every state, then spend ``budget`` refinement rounds greedily by expected gain."""
    first = ParallelExecutor(
        num_threads=num_threads, max_errors=len(states) + 1, disable_progress_bar=not display_progress
    )
    threads = first.num_threads
    outcomes = first.execute(carry_context(lambda s: call(Call(0, dict(s.inputs)))), states)
    alive, errors = [], {}
    for i, (state, outcome) in enumerate(zip(states, outcomes, strict=True)):
        try:
            state.start(_outcome(outcome))
            alive.append(i)
        except RoundZeroError as exc:
            errors[i] = str(exc)

    def gain_of(i: int) -> float:
        q, gain = _belief_and_gain(states[i], model)
        states[i].note({"belief": q})
        return gain

    gains = {i: gain_of(i) for i in alive}
    spent, step, log = 0, 0, []
    while spent < budget and not cap_reached():
        candidates = [i for i in alive if states[i].rounds < max_rounds and gains[i] > round_cost + TIE_TOLERANCE]
        if not candidates:
            break
        candidates.sort(key=lambda i: (-gains[i], i))
        chosen = candidates[: min(threads, budget - spent)]
        rest = candidates[len(chosen) :]
        for i in chosen:
            log.append(
                {
                    "step": step,
                    "index": i,
                    "round": states[i].rounds + 1,
                    "gain": gains[i],
                    "best_unchosen_gain": gains[rest[0]] if rest else None,
                }
            )
        executor = ParallelExecutor(num_threads=threads, max_errors=len(chosen) + 1, disable_progress_bar=True)
        results = executor.execute(carry_context(lambda i: call(states[i].next_call())), chosen)
        for i, result in zip(chosen, results, strict=True):
            states[i].record(_outcome(result), Decision(True, "budget", {"gain": gains[i]}))
            gains[i] = gain_of(i)
        spent += len(chosen)
        step += 1

    predictions: list[dspy.Prediction | None] = [None] * len(states)
    for i in alive:
        if states[i].rounds >= max_rounds:
            reason = "max_rounds"
        elif cap_reached() and gains[i] > round_cost + TIE_TOLERANCE:
            reason = "max_dollars"
        elif gains[i] <= round_cost + TIE_TOLERANCE:
            reason = "cost"
        else:
            reason = "budget"
        predictions[i] = states[i].finish(Decision(False, reason, {"gain": gains[i]}), model, select)
    return BudgetResult(predictions=predictions, budget=budget, spent=spent, log=log, errors=errors)
