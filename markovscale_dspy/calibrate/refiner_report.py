"""What a refiner race reports, and the held-out comparison of the module before and after it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import dspy
from dspy.utils.parallelizer import ParallelExecutor

from markovscale_dspy.calibrate.report import CalibrationReport
from markovscale_dspy.core.statistics import binomial_interval, paired_difference, score_to_label
from markovscale_dspy.refine.loop import describe
from markovscale_dspy.refine.markov_refine import MarkovRefine
from markovscale_dspy.tracing import carry_context

__all__ = ["RefinerReport", "deployed_rounds", "held_out_comparison"]


@dataclass
class RefinerReport:
    """What a refiner race measured: every candidate, the choice, the calls, and the chains before and after.

    Attributes:
        candidates: Per candidate (the default first): ``source`` ("default", "verify_first", "yours",
            "proposed"), ``instructions``, ``examples`` refined, ``calls`` spent on its chains, ``p_cw`` / ``p_wc``
            (posterior means and 95% intervals), ``bound`` (stationary accuracy), ``regime``, ``planned_rounds``,
            ``value`` (expected accuracy at those rounds minus their cost), ``prob_beats_default`` and the rung it
            left the race at (``None``: it finished).
        chosen: Index of the chosen candidate (0: the default was kept).
        runner_up: Index of the challenger that finished the race best (``None``: none finished).
        gate: The probability the chosen challenger had to reach (``min_prob_better`` split over challengers).
        calls: ``round0`` (shared), ``refinement`` (all candidates' chains), ``proposals`` (reflection LM),
            ``total``, and ``every_candidate_everywhere`` -- what running every candidate on every example would
            have cost -- all counting only calls made now (chains from the trace store cost none).
        rungs: Examples per rung of the race.
        before: Calibration report of the default refiner's chains.
        after: Calibration report of the chosen refiner's chains (the returned module's model).
        held_out: With a valset: accuracy before and after on the same questions, and their paired difference.
    """

    candidates: list[dict[str, Any]]
    chosen: int
    runner_up: int | None
    gate: float
    min_prob_better: float
    round_cost: float
    calls: dict[str, int]
    rungs: list[int]
    before: CalibrationReport
    after: CalibrationReport
    held_out: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def chosen_source(self) -> str:
        return self.candidates[self.chosen]["source"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def deployed_rounds(module: MarkovRefine) -> int:
    """Rounds a calibrated closed-form module refines every question: its plan, or none when its confidence gate
    (``min_prob_improves``) is not passed."""
    gate_at = module.min_prob_improves or 0.0
    if gate_at > 0 and module.model.prob_improves() < gate_at:
        return 0
    return module.planned_rounds()


def held_out_comparison(
    sides: dict[str, MarkovRefine],
    examples: list[dspy.Example],
    metric: Callable[..., Any],
    threshold: float | None,
    num_threads: int | None,
) -> dict[str, Any]:
    """The modules on the same held-out questions, from the same round-0 answer, each refining for the rounds it
    would run (its closed-form plan, after its confidence gate): accuracy, the prediction, and each side's paired
    difference with ``before``."""
    plans = {name: deployed_rounds(module) for name, module in sides.items()}
    first_module = sides["before"]
    executor = ParallelExecutor(num_threads=num_threads, max_errors=len(examples) + 1, disable_progress_bar=True)

    def run(example: dspy.Example) -> tuple[bool, ...] | str:
        try:
            inputs = dict(example.inputs())
            first = first_module.run_chain(0, **inputs)
            outputs = dict(first.items())
            labels: list[bool] = []
            seen: dict[int, bool] = {}  # the same module on two sides (the default kept) answers once
            for name, module in sides.items():
                if id(module) not in seen:
                    rounds = plans[name]
                    pred = module.continue_chain(dspy.Prediction(**outputs), rounds, **inputs) if rounds else first
                    seen[id(module)] = score_to_label(metric(example, pred), threshold)
                labels.append(seen[id(module)])
            return tuple(labels)
        except Exception as exc:  # scored wrong on every side, as dspy.Evaluate scores a failure
            return describe(exc)

    results = executor.execute(carry_context(run), examples)
    rows = [r if isinstance(r, tuple) else (False,) * len(sides) for r in results]
    out: dict[str, Any] = {"examples": len(examples), "failed": sum(not isinstance(r, tuple) for r in results)}
    before = [r[0] for r in rows]
    for j, (name, module) in enumerate(sides.items()):
        labels = [r[j] for r in rows]
        k, n = sum(labels), len(labels)
        out[name] = {
            "rounds": plans[name],
            "accuracy": k / n if n else None,
            "interval": list(binomial_interval(k, n)),
            "predicted": float(module.model.expected_accuracy(plans[name])),
        }
        if name != "before":
            d = paired_difference(labels, before)
            out[name]["difference"] = {
                "diff": d.diff,
                "lo": d.lo,
                "hi": d.hi,
                "p_value": d.p_value,
                "only_this": d.a_only,
                "only_before": d.b_only,
            }
    out["difference"] = out["after"]["difference"]
    return out
