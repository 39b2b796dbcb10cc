"""Benchmarks: stopping policies side by side on the same questions, against the fixed-N frontier and two limits.

Evaluation layer (above the module and the calibrator, below reports and the CLI).

On a simulated world every method gets a fresh copy of the same world, so the same prompt gets the same answer in
every method (common random numbers): differences between methods are differences of policy, not of luck. The
fixed-N baselines are read off one fixed-``max_rounds`` run, which is exact: fixed-N's chain is the first N rounds
of that run. Two limits frame the policies:

* the *parameter oracle* knows each question's true chain and runs its ``optimal_rounds`` -- the best a
  per-question number of rounds can do without labels (adaptive policies can beat it);
* the *hindsight oracle* knows the labels and stops at the first correct round of the fixed-max run (or at round 0
  if none is correct) -- what no stopping rule can beat.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy
import numpy as np

from markovscale_dspy._answers import normalize_answer
from markovscale_dspy._calibrate import MarkovCalibrator
from markovscale_dspy._model import TransitionModel
from markovscale_dspy._refine import MarkovRefine
from markovscale_dspy._usage import Usage
from markovscale_dspy.evaluation import MethodResult, evaluate
from markovscale_dspy.testing import ParameterOracle, SimulatedWorld

__all__ = [
    "JudgeAnswer",
    "SelfConsistency",
    "SimulationResult",
    "baselines",
    "fixed_curve",
    "fixed_family",
    "frontier_at",
    "run_simulation",
    "self_judge_reward",
]


class JudgeAnswer(dspy.Signature):
    """Judge whether the proposed answer to the question is correct."""

    question: str = dspy.InputField()
    proposed_answer: str = dspy.InputField()
    is_correct: bool = dspy.OutputField(desc="true if the proposed answer is correct")


def self_judge_reward(answer_field: str = "answer") -> Callable[[dict, Any], float]:
    """A reward for ``dspy.Refine`` / ``dspy.BestOfN`` that needs no gold label: the model judges its own answer.

    Returns 1.0 when the judge says correct, else 0.0 (also when the judge's output cannot be parsed).
    """
    judge = dspy.Predict(JudgeAnswer)

    def reward(args: dict, prediction: Any) -> float:
        question = str(next(iter(args.values()))) if len(args) == 1 else "\n".join(f"{k}: {v}" for k, v in args.items())
        try:
            verdict = judge(question=question, proposed_answer=str(getattr(prediction, answer_field, "")))
            return 1.0 if verdict.is_correct else 0.0
        except Exception:
            return 0.0

    return reward


class SelfConsistency(dspy.Module):
    """Baseline: ``n`` independent samples of the program, majority vote on the normalised answer."""

    def __init__(self, program: dspy.Module, n: int = 5, temperature: float = 0.7, answer_field: str = "answer"):
        super().__init__()
        self.program = program
        self.n = n
        self.temperature = temperature
        self.answer_field = answer_field

    def forward(self, **inputs: Any) -> dspy.Prediction:
        lm = dspy.settings.lm
        samples = []
        for i in range(self.n):
            with dspy.context(lm=lm.copy(rollout_id=10_000 + i, temperature=self.temperature)):
                try:
                    samples.append(self.program(**inputs))
                except Exception:  # a failed sample just does not vote
                    continue
        if not samples:
            raise RuntimeError("every self-consistency sample failed")
        votes = Counter(normalize_answer(getattr(s, self.answer_field, None)) for s in samples)
        winner = votes.most_common(1)[0][0]
        chosen = next(s for s in samples if normalize_answer(getattr(s, self.answer_field, None)) == winner)
        return dspy.Prediction(**dict(chosen.items()), rounds=len(samples) - 1)


def baselines(make: Callable[[], dspy.Module], n: int = 3) -> dict[str, dspy.Module]:
    """What users would pick instead: ``dspy.BestOfN`` and ``dspy.Refine`` with a self-judge reward (no gold
    label exists at inference), and self-consistency, each with ``n`` attempts."""
    return {
        f"dspy.BestOfN (N={n}, self-judge)": dspy.BestOfN(make(), N=n, reward_fn=self_judge_reward(), threshold=1.0),
        f"dspy.Refine (N={n}, self-judge)": dspy.Refine(make(), N=n, reward_fn=self_judge_reward(), threshold=1.0),
        f"self-consistency (N={n})": SelfConsistency(make(), n=n),
    }


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
) -> list[MethodResult]:
    """Fixed-N results for N = 0..max_rounds, read off the trajectories of one fixed-``max_rounds`` run."""
    curve = []
    for n in range(max_rounds + 1):
        labels, usage = [], Usage()
        for example, pred in zip(examples, predictions, strict=True):
            rounds = pred.trajectory[: n + 1]
            labels.append(bool(metric(example, dspy.Prediction(**rounds[-1]["outputs"]))))
            usage = sum((Usage.from_dict(entry.get("usage")) for entry in rounds), usage)
        curve.append(
            MethodResult(
                name=f"fixed-{n}",
                n=len(labels),
                correct=sum(labels),
                calls=usage.calls,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                seconds=run.seconds * usage.calls / max(run.calls, 1),
                rounds=n * len(labels),
                failures=0,
                labels=labels,
            )
        )
    return curve


def fixed_family(
    run: MethodResult, examples: Sequence[dspy.Example], metric: Callable[..., Any], max_rounds: int
) -> list[MethodResult]:
    """The fixed-N curve and the hindsight oracle from one fixed-``max_rounds`` run kept with its predictions
    (questions whose round 0 failed are left out)."""
    kept = [(e, p) for e, p in zip(examples, run.predictions, strict=True) if p is not None]
    examples, predictions = [e for e, _ in kept], [p for _, p in kept]
    return [*fixed_curve(run, predictions, examples, metric, max_rounds), hindsight(predictions, examples, metric)]


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
    include_baselines: bool = False,
    baseline_n: int = 3,
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
    results += fixed_family(full, world.examples, world.metric, max_rounds)

    methods: dict[str, dspy.Module] = {
        "closed_form": refine(policy="closed_form"),
        "belief": refine(policy="belief"),
        "belief + select best": refine(policy="belief", select="best"),
        "parameter oracle": refine(policy=ParameterOracle(test)),
    }
    if include_baselines:
        methods.update(baselines(make, n=baseline_n))
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


# Oracle at several costs: its accuracy-vs-calls curve, for comparisons at equal calls ---------------------------------


COSTS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)


def cost_curve(
    preset: str,
    model: TransitionModel,
    policy: str,
    *,
    n_test: int,
    max_rounds: int,
    seed: int,
    costs: Sequence[float] = COSTS,
    num_threads: int = 1,
    make: Callable[[], dspy.Module] | None = None,
) -> list[MethodResult]:
    """A policy run at several round costs on the test world: its accuracy-vs-calls curve.

    ``policy`` is a policy name, or ``"oracle"`` for the parameter oracle. The round cost is the user's knob for
    trading accuracy against calls, so policies are compared along these curves, at equal calls.
    """
    make = make or (lambda: dspy.Predict("question -> answer"))
    test = SimulatedWorld.preset(preset, n_test, seed=seed + 1)
    curve = []
    for cost in costs:
        chosen = ParameterOracle(test) if policy == "oracle" else policy
        module = MarkovRefine(make(), max_rounds=max_rounds, round_cost=cost, policy=chosen)
        module.model = model
        world = test.fresh()
        with dspy.context(lm=world.lm()):
            curve.append(
                evaluate(module, world.examples, world.metric, name=f"{policy}@{cost:g}", num_threads=num_threads)
            )
    return curve


# The real embedded model -------------------------------------------------------------------------------------------


def run_real(
    task_name: str,
    lm: dspy.LM,
    *,
    n_train: int = 60,
    n_test: int = 40,
    max_rounds: int = 3,
    round_cost: float = 0.01,
    seed: int = 0,
    num_threads: int = 2,
    include_baselines: bool = True,
    baseline_n: int = 3,
    adapter: dspy.Adapter | None = None,
) -> SimulationResult:
    """Every method on a real task with a real LM: calibration on ``n_train`` questions, disjoint ``n_test``."""
    from markovscale_dspy.datasets import load_task

    task = load_task(task_name)
    train, test = task.split(n_train, n_test, seed=seed)
    adapter = adapter or dspy.JSONAdapter()
    with dspy.context(lm=lm, adapter=adapter, warn_on_type_mismatch=False):
        calibrator = MarkovCalibrator(task.metric, rounds=max_rounds, num_threads=num_threads, resume=False)
        calibrated = calibrator.compile(
            MarkovRefine(task.program(), max_rounds=max_rounds, round_cost=round_cost), trainset=train
        )
        model = calibrated.model

        def refine(**kwargs: Any) -> MarkovRefine:
            module = MarkovRefine(task.program(), max_rounds=max_rounds, round_cost=round_cost, **kwargs)
            module.model = model
            return module

        results: list[MethodResult] = []
        full = evaluate(
            refine(policy="fixed"),
            test,
            task.metric,
            name=f"fixed-{max_rounds}",
            num_threads=num_threads,
            keep_predictions=True,
        )
        results += fixed_family(full, test, task.metric, max_rounds)
        methods: dict[str, dspy.Module] = {
            "closed_form": refine(policy="closed_form"),
            "belief": refine(policy="belief"),
        }
        if include_baselines:
            methods.update(baselines(task.program, n=baseline_n))
        for name, module in methods.items():
            results.append(evaluate(module, test, task.metric, name=name, num_threads=num_threads))
    return SimulationResult(
        preset=task_name,
        model=model,
        results=results,
        world={"task": task.description, "source": task.source},
        settings={
            "n_train": n_train,
            "n_test": n_test,
            "max_rounds": max_rounds,
            "round_cost": round_cost,
            "seed": seed,
            "calibration": calibrator.report.to_dict() | {"chains": []},
        },
    )


# Overheads and throughput --------------------------------------------------------------------------------------------


def decision_seconds(model: TransitionModel, *, max_rounds: int = 6, repeats: int = 300) -> dict[str, float]:
    """Median seconds of one stop decision, per policy (a mid-chain decision with an observed history)."""
    import statistics

    from markovscale_dspy._policies import RoundContext, resolve_policy

    context = RoundContext(model, 2, max_rounds, 0.01, answer_keys=("a", "b", "b"), failed=(False, False, False))
    out = {}
    for name in ("closed_form", "belief"):
        if name == "belief" and not model.has_emissions:
            continue
        policy = resolve_policy(name)
        policy.decide(context)  # warm caches (prob_improves, hidden chains)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            policy.decide(context)
            times.append(time.perf_counter() - started)
        out[name] = statistics.median(times)
    return out


def fit_seconds(n_chains: int = 10_000, rounds: int = 4, seed: int = 0) -> dict[str, float]:
    """Seconds to fit ``n_chains`` simulated chains: the chain itself, and question types by held-out likelihood."""
    from markovscale_dspy._mixture import chain_statistics, select_mixture

    rng = np.random.default_rng(seed)
    labels, answers = [], []
    for _ in range(n_chains):
        x = bool(rng.random() < 0.4)
        chain, keys = [x], [0]
        for _ in range(rounds):
            nxt = bool(rng.random() >= 0.1) if x else bool(rng.random() < 0.3)
            keys.append(keys[-1] + (nxt != x or (not x and rng.random() < 0.5)))
            chain.append(nxt)
            x = nxt
        labels.append(chain)
        answers.append(keys)
    started = time.perf_counter()
    TransitionModel.fit(labels, answers=answers)
    chain_time = time.perf_counter() - started
    started = time.perf_counter()
    select_mixture(chain_statistics(labels, answers))
    return {"chain": chain_time, "question_types": time.perf_counter() - started}


def throughput(
    lm: dspy.LM,
    task_name: str = "winogrande",
    *,
    n: int = 16,
    rounds: int = 2,
    threads: Sequence[int] = (2, 4),
    adapter: dspy.Adapter | None = None,
) -> dict[str, dict[str, float]]:
    """Calibration throughput (LM calls per second): sequential, threaded and async, in one run.

    Every configuration gets its own ``n`` questions (the server's prompt cache must not favour a later run) and
    sequential runs both first and last, so drift during the run shows up as a difference between the two.
    """
    import asyncio

    from markovscale_dspy.datasets import load_task

    task = load_task(task_name)
    plan = ["sequential", *(f"{k} threads" for k in threads), f"async ({max(threads)} concurrent)", "sequential again"]
    pool, _ = task.split(n * len(plan), 0, seed=7)
    adapter = adapter or dspy.JSONAdapter()
    out: dict[str, dict[str, float]] = {}
    with dspy.context(lm=lm, adapter=adapter):
        for i, name in enumerate(plan):
            examples = pool[i * n : (i + 1) * n]
            started = time.perf_counter()
            if name.startswith("async"):
                calls = asyncio.run(_async_chains(task, examples, rounds, max(threads)))
            else:
                k = 1 if name.startswith("sequential") else int(name.split()[0])
                calibrator = MarkovCalibrator(
                    task.metric, rounds=rounds, num_threads=k, store_traces=False, question_types=1
                )
                calibrator.compile(MarkovRefine(task.program(), max_rounds=rounds), trainset=examples)
                calls = calibrator.report.usage["calls"]
            seconds = time.perf_counter() - started
            out[name] = {"calls": calls, "seconds": seconds, "calls_per_s": calls / seconds}
    return out


async def _async_chains(task: Any, examples: Sequence[dspy.Example], rounds: int, limit: int) -> int:
    import asyncio

    module = MarkovRefine(task.program(), max_rounds=rounds)
    gate = asyncio.Semaphore(limit)

    async def one(example: dspy.Example) -> int:
        async with gate:
            pred = await module.arun_chain(rounds, **example.inputs())
        return sum((e.get("usage") or {}).get("calls", 0) for e in pred.trajectory)

    return sum(await asyncio.gather(*(one(e) for e in examples)))
