"""Benchmarks: stopping policies side by side on the same questions, against the fixed-N frontier and two limits.

Evaluation layer (above the module and the calibrator, below reports and the CLI).

On a simulated world every method gets a fresh copy of the same world, so the same prompt gets the same answer in
every method (common random numbers): differences between methods are differences of policy, not of luck. The
fixed-N baselines are read off one fixed-``max_rounds`` run, which is exact: fixed-N's chain is the first N rounds
of that run. Two limits frame the policies:

* the *parameter oracle* knows each question's true chain and runs its ``optimal_rounds`` -- the best a Markov
  stopping rule can do without labels;
* the *hindsight oracle* knows the labels and stops at the first correct round of the fixed-max run (or at round 0
  if none is correct) -- what no stopping rule can beat.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy
import numpy as np

from markovscale_dspy._calibrate import MarkovCalibrator
from markovscale_dspy._model import TransitionModel
from markovscale_dspy._refine import MarkovRefine
from markovscale_dspy.evaluation import MethodResult, evaluate
from markovscale_dspy.testing import ParameterOracle, SimulatedWorld

__all__ = ["SimulationResult", "fixed_curve", "frontier_at", "run_simulation"]


@dataclass
class SimulationResult:
    """Every method's result on one simulated world, with the calibrated model and the world's make-up."""

    preset: str
    model: TransitionModel
    results: list[MethodResult]
    world: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    def by_name(self, name: str) -> MethodResult:
        return next(r for r in self.results if r.name == name)

    def fixed(self) -> list[MethodResult]:
        return [r for r in self.results if r.name.startswith("fixed-")]


def fixed_curve(
    run: MethodResult,
    predictions: Sequence[dspy.Prediction],
    examples: Sequence[dspy.Example],
    metric: Callable[..., Any],
    max_rounds: int,
    seconds: float,
) -> list[MethodResult]:
    """Fixed-N results for N = 0..max_rounds, read off the trajectories of one fixed-``max_rounds`` run."""
    curve = []
    for n in range(max_rounds + 1):
        labels, calls, prompt, completion = [], 0, 0, 0
        for example, pred in zip(examples, predictions, strict=True):
            rounds = pred.trajectory[: n + 1]
            labels.append(bool(metric(example, dspy.Prediction(**rounds[-1]["outputs"]))))
            for entry in rounds:
                usage = entry.get("usage") or {}
                calls += usage.get("calls", 0)
                prompt += usage.get("prompt_tokens", 0)
                completion += usage.get("completion_tokens", 0)
        curve.append(
            MethodResult(
                name=f"fixed-{n}",
                n=len(labels),
                correct=sum(labels),
                calls=calls,
                prompt_tokens=prompt,
                completion_tokens=completion,
                seconds=seconds * calls / max(run.calls, 1),
                rounds=n * len(labels),
                failures=0,
                labels=labels,
            )
        )
    return curve


def hindsight(
    predictions: Sequence[dspy.Prediction], examples: Sequence[dspy.Example], metric: Callable[..., Any]
) -> MethodResult:
    """Stop each question at its first correct round (round 0 if none): the limit no stopping rule can beat."""
    labels, calls, rounds = [], 0, 0
    for example, pred in zip(examples, predictions, strict=True):
        correct = [bool(metric(example, dspy.Prediction(**e["outputs"]))) for e in pred.trajectory]
        stop = correct.index(True) if any(correct) else 0
        labels.append(correct[stop])
        calls += stop + 1
        rounds += stop
    return MethodResult(
        name="hindsight oracle",
        n=len(labels),
        correct=sum(labels),
        calls=calls,
        prompt_tokens=0,
        completion_tokens=0,
        seconds=0.0,
        rounds=rounds,
        failures=0,
        labels=labels,
    )


def frontier_at(curve: Sequence[MethodResult], calls: float) -> float:
    """Accuracy of the fixed-N frontier linearly interpolated to ``calls`` LM calls per question."""
    xs = [r.mean_calls for r in curve]
    ys = [r.accuracy for r in curve]
    return float(np.interp(calls, xs, ys))


def run_simulation(
    preset: str = "heterogeneous",
    *,
    n_train: int = 600,
    n_test: int = 2000,
    max_rounds: int = 6,
    round_cost: float = 0.0,
    seed: int = 0,
    num_threads: int = 1,
    program: Callable[[], dspy.Module] | None = None,
    extra: dict[str, Callable[[TransitionModel], dspy.Module]] | None = None,
) -> SimulationResult:
    """Calibrate on one world of ``preset``, then run every policy on a disjoint world of the same make-up.

    Methods: fixed-N for N = 0..max_rounds, MarkovRefine ``closed_form``, ``belief`` and ``belief`` with
    ``select="best"``, the parameter oracle and the hindsight oracle, plus any ``extra`` builders.
    """
    make = program or (lambda: dspy.Predict("question -> answer"))
    train = SimulatedWorld.preset(preset, n_train, seed=seed)
    test = SimulatedWorld.preset(preset, n_test, seed=seed + 1)
    calibrator = MarkovCalibrator(train.metric, rounds=max_rounds, num_threads=num_threads)
    with dspy.context(lm=train.lm()):
        calibrated = calibrator.compile(
            MarkovRefine(make(), max_rounds=max_rounds, round_cost=round_cost), trainset=train.examples
        )
    model = calibrated.model

    def refine(**kwargs: Any) -> MarkovRefine:
        module = MarkovRefine(make(), max_rounds=max_rounds, round_cost=round_cost, **kwargs)
        module.model = model
        return module

    results: list[MethodResult] = []

    # One fixed-max run gives the whole fixed-N frontier and the hindsight oracle.
    world = test.fresh()
    with dspy.context(lm=world.lm()):
        full = evaluate(
            refine(policy="fixed"),
            world.examples,
            world.metric,
            name=f"fixed-{max_rounds}",
            num_threads=num_threads,
            keep_predictions=True,
        )
    results += fixed_curve(full, full.predictions, world.examples, world.metric, max_rounds, full.seconds)
    results.append(hindsight(full.predictions, world.examples, world.metric))

    methods: dict[str, dspy.Module] = {
        "closed_form": refine(policy="closed_form"),
        "belief": refine(policy="belief"),
        "belief + select best": refine(policy="belief", select="best"),
        "parameter oracle": refine(policy=ParameterOracle(test)),
    }
    for name, builder in (extra or {}).items():
        methods[name] = builder(model)
    for name, module in methods.items():
        world = test.fresh()
        with dspy.context(lm=world.lm()):
            results.append(evaluate(module, world.examples, world.metric, name=name, num_threads=num_threads))
    return SimulationResult(
        preset=preset,
        model=model,
        results=results,
        world=test.summary(),
        settings={
            "n_train": n_train,
            "n_test": n_test,
            "max_rounds": max_rounds,
            "round_cost": round_cost,
            "seed": seed,
        },
    )
