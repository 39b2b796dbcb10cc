"""The project's benchmark harness: simulated presets, the parameter oracle, real-model runs and micro-benchmarks.

Not part of the library: these are our own acceptance measurements (BENCHMARKS.md). Run them with
``python -m benchmarks.run`` (see ``--help``).

On a simulated world every method gets a fresh copy of the same world, so the same prompt gets the same answer in
every method (common random numbers): differences between methods are differences of policy, not of luck.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import dspy
import numpy as np

from benchmarks.worlds import ParameterOracle, preset_world
from markovscale_dspy import MarkovCalibrator, MarkovRefine, TransitionModel
from markovscale_dspy.evaluate.compare import ComparisonResult, baselines, compare_methods, fixed_family, frontier_at
from markovscale_dspy.evaluate.evaluation import MethodResult, evaluate
from markovscale_dspy.testing import SimulatedWorld

SimulationResult = ComparisonResult


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
) -> ComparisonResult:
    """Calibrate on one world of ``preset``, then run every policy on a disjoint world of the same make-up.

    Methods: fixed-N for N = 0..max_rounds, MarkovRefine ``closed_form``, ``belief`` and ``belief`` with
    ``select="best"``, the parameter oracle and the hindsight oracle, plus any ``extra`` builders.
    """
    make = program or (lambda: dspy.Predict("question -> answer"))
    train = preset_world(preset, n_train, seed=seed)
    test = preset_world(preset, n_test, seed=seed + 1)
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
    return ComparisonResult(
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
    test = preset_world(preset, n_test, seed=seed + 1)
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


def run_real(
    task_name: str,
    lm: dspy.LM,
    *,
    n_train: int = 60,
    n_test: int = 40,
    seed: int = 0,
    adapter: dspy.Adapter | None = None,
    **kwargs: Any,
) -> ComparisonResult:
    """Every method on a bundled task with a real LM: calibration on ``n_train`` questions, disjoint ``n_test``."""
    from markovscale_dspy.integrations.datasets import load_task

    task = load_task(task_name)
    train, test = task.split(n_train, n_test, seed=seed)
    with dspy.context(lm=lm, adapter=adapter or dspy.JSONAdapter(), warn_on_type_mismatch=False):
        result = compare_methods(
            task.program,
            train,
            test,
            task.metric,
            name=task_name,
            description={"task": task.description, "source": task.source},
            **kwargs,
        )
    result.settings["seed"] = seed
    return result


# Overheads and throughput --------------------------------------------------------------------------------------------


def decision_seconds(model: TransitionModel, *, max_rounds: int = 6, repeats: int = 300) -> dict[str, float]:
    """Median seconds of one stop decision, per policy (a mid-chain decision with an observed history)."""
    import statistics

    from markovscale_dspy.core.policies import RoundContext, resolve_policy

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
    from markovscale_dspy.core.mixture import chain_statistics, select_mixture

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

    from markovscale_dspy.integrations.datasets import load_task

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
        return sum((e.get("usage") or {}).get("calls", 0) for e in pred.markovscale.trajectory)

    return sum(await asyncio.gather(*(one(e) for e in examples)))


# The planner (MarkovScale) on simulated worlds ----------------------------------------------------------------------


def run_planner(
    preset: str,
    *,
    n_train: int = 600,
    n_test: int = 1000,
    max_calls: int = 8,
    parallel_samples: int = 8,
    rounds: int | None = None,
    call_cost: float = 0.0,
    min_prob_gain: float = 0.9,
    seed: int = 0,
    baselines_at: Sequence[int] | None = None,
    make: Callable[[], dspy.Module] | None = None,
) -> ComparisonResult:
    """Calibrate MarkovScale on one world of ``preset``, then on a disjoint world of the same make-up run the plan,
    MarkovRefine (closed form), self-consistency and ``dspy.BestOfN`` (self-judge) at each budget in
    ``baselines_at`` (default: ``max_calls``; ``()``: none), and measure every strategy the planner considered.
    Question types are not fitted (neither the planner nor the closed form uses them)."""
    from markovscale_dspy import MarkovScale
    from markovscale_dspy.evaluate.compare import SelfConsistency, self_judge_reward, strategy_results

    make = make or (lambda: dspy.Predict("question -> answer"))
    train = preset_world(preset, n_train, seed=seed)
    test = preset_world(preset, n_test, seed=seed + 1)
    rounds = max_calls - 1 if rounds is None else rounds
    calibrator = MarkovCalibrator(
        train.metric, rounds=rounds, parallel_samples=parallel_samples, num_threads=1, question_types=1
    )
    student = MarkovScale(make(), max_calls=max_calls, call_cost=call_cost, min_prob_gain=min_prob_gain, concurrency=1)
    with dspy.context(lm=train.lm()):
        scale = calibrator.compile(student, trainset=train.examples)
    plan = scale.plan()
    refine = MarkovRefine(make(), max_rounds=max_calls - 1, round_cost=call_cost)
    refine.model = scale.model
    methods: dict[str, dspy.Module] = {f"MarkovScale ({plan.chosen.name})": scale, "MarkovRefine closed_form": refine}
    for n in (max_calls,) if baselines_at is None else baselines_at:
        methods[f"self-consistency (N={n})"] = SelfConsistency(make(), n=n)
        methods[f"dspy.BestOfN (N={n}, self-judge)"] = dspy.BestOfN(
            make(), N=n, reward_fn=self_judge_reward(), threshold=1.0
        )
    results = []
    for name, module in methods.items():
        world = test.fresh()
        with dspy.context(lm=world.lm()):
            results.append(evaluate(module, world.examples, world.metric, name=name, num_threads=1))
    world = test.fresh()
    with dspy.context(lm=world.lm()):
        strategies = strategy_results(scale, world.examples, world.metric, num_threads=1)
    return ComparisonResult(
        preset=preset,
        model=scale.model,
        results=results,
        world=test.summary(),
        settings={
            "n_train": n_train,
            "n_test": n_test,
            "max_calls": max_calls,
            "parallel_samples": parallel_samples,
            "rounds": rounds,
            "call_cost": call_cost,
            "seed": seed,
            "calibration": calibrator.report.to_dict() | {"chains": []},
        },
        plan=plan,
        strategies=strategies,
    )


def run_real_planner(
    task_name: str,
    lm: dspy.LM,
    *,
    n_train: int = 80,
    n_test: int = 60,
    max_calls: int = 4,
    parallel_samples: int = 4,
    call_cost: float = 0.0,
    min_prob_gain: float = 0.9,
    seed: int = 0,
    num_threads: int = 2,
    adapter: dspy.Adapter | None = None,
    baselines: bool = False,
) -> ComparisonResult:
    """The planner on a bundled task with a real LM: calibrate MarkovScale (round 0 + ``max_calls - 1`` rounds and
    ``parallel_samples`` samples per question), then measure every strategy on disjoint questions, read off one grid
    of chains per question. The planner's own row is its chosen strategy's row of the grid (the same draws
    ``MarkovScale.forward`` makes); self-consistency over ``n`` samples is the grid's ``vote n=...`` row. With
    ``baselines``, MarkovRefine (closed form) and ``dspy.BestOfN`` (self-judge) run too."""
    from markovscale_dspy import MarkovScale
    from markovscale_dspy.evaluate.compare import self_judge_reward, strategy_results
    from markovscale_dspy.integrations.datasets import load_task

    task = load_task(task_name)
    train, test = task.split(n_train, n_test, seed=seed)
    with dspy.context(lm=lm, adapter=adapter or dspy.JSONAdapter(), warn_on_type_mismatch=False):
        calibrator = MarkovCalibrator(
            task.metric,
            parallel_samples=parallel_samples,
            num_threads=num_threads,
            question_types=1,
            display_progress=True,
        )
        student = MarkovScale(task.program(), max_calls=max_calls, call_cost=call_cost, min_prob_gain=min_prob_gain)
        scale = calibrator.compile(student, trainset=train)
        plan = scale.plan()
        strategies = strategy_results(scale, test, task.metric, num_threads=num_threads, display_progress=True)
        chosen = next(r for r in strategies if r.name == plan.chosen.name)
        results = [replace(chosen, name=f"MarkovScale ({plan.chosen.name})")]
        if baselines:
            refine = MarkovRefine(task.program(), max_rounds=max_calls - 1, round_cost=call_cost)
            refine.model = scale.model
            methods: dict[str, dspy.Module] = {
                "MarkovRefine closed_form": refine,
                f"dspy.BestOfN (N={max_calls}, self-judge)": dspy.BestOfN(
                    task.program(), N=max_calls, reward_fn=self_judge_reward(), threshold=1.0
                ),
            }
            results += [
                evaluate(module, test, task.metric, name=name, num_threads=num_threads)
                for name, module in methods.items()
            ]
    return ComparisonResult(
        preset=task_name,
        model=scale.model,
        results=results,
        world={"task": task.description, "source": task.source},
        settings={
            "n_train": n_train,
            "n_test": n_test,
            "max_calls": max_calls,
            "parallel_samples": parallel_samples,
            "rounds": max_calls - 1,
            "call_cost": call_cost,
            "seed": seed,
            "calibration": calibrator.report.to_dict() | {"chains": []},
        },
        plan=plan,
        strategies=strategies,
    )


# Policies along the round cost on any pair of worlds (random worlds, confidence) -------------------------------------


@dataclass
class WorldStudy:
    """A calibrated policy at several round costs on one test world, beside the fixed-N frontier and the oracle.

    Every method ran on a fresh copy of the same test world (common random numbers), so per-question labels are
    paired across methods: ``policy[c].labels[i]`` and ``fixed[n].labels[i]`` are the same question.
    """

    model: TransitionModel
    fixed: list[MethodResult]
    policy: dict[float, MethodResult]
    oracle: dict[float, MethodResult]
    settings: dict[str, Any] = field(default_factory=dict)

    def frontier_gap(self, cost: float) -> float:
        """Policy accuracy minus the fixed-N frontier interpolated at the policy's own calls."""
        result = self.policy[cost]
        return result.accuracy - frontier_at(self.fixed, result.mean_calls)

    def oracle_gap(self, cost: float) -> float:
        """Parameter-oracle accuracy minus policy accuracy, at the same round cost."""
        return self.oracle[cost].accuracy - self.policy[cost].accuracy

    def best_fixed(self) -> MethodResult:
        return max(self.fixed, key=lambda r: (r.accuracy, -r.mean_calls))


def world_study(
    train: SimulatedWorld,
    test: SimulatedWorld,
    *,
    rounds: int = 4,
    costs: Sequence[float] = (0.0, 0.01, 0.02, 0.05),
    select: str = "last",
    logprobs: bool = False,
    model: TransitionModel | None = None,
    num_threads: int = 1,
    oracle: bool = True,
    make: Callable[[], dspy.Module] | None = None,
) -> WorldStudy:
    """Calibrate ``policy="belief"`` on ``train`` (unless ``model`` is given) and run it on ``test`` at every cost.

    ``logprobs=True`` asks the simulated LM for token log-probabilities, so a world with ``confidence_auroc`` gives
    every answer a confidence; the answers themselves are the same either way.
    """
    make = make or (lambda: dspy.Predict("question -> answer"))
    if model is None:
        calibrator = MarkovCalibrator(train.metric, rounds=rounds, num_threads=num_threads, store_traces=False)
        with dspy.context(lm=train.fresh().lm(logprobs=logprobs)):
            model = calibrator.compile(MarkovRefine(make(), max_rounds=rounds), trainset=train.examples).model

    def run(module: MarkovRefine, name: str, keep: bool = False) -> MethodResult:
        world = test.fresh()
        module.model = model
        with dspy.context(lm=world.lm(logprobs=logprobs)):
            return evaluate(
                module, world.examples, world.metric, name=name, num_threads=num_threads, keep_predictions=keep
            )

    full = run(MarkovRefine(make(), max_rounds=rounds, policy="fixed"), f"fixed-{rounds}", keep=True)
    fixed = fixed_family(full, test.examples, test.metric, rounds)[:-1]  # without the hindsight oracle
    policy = {
        cost: run(
            MarkovRefine(make(), max_rounds=rounds, round_cost=cost, policy="belief", select=select), f"belief@{cost:g}"
        )
        for cost in costs
    }
    oracles = {}
    if oracle:
        oracles = {
            cost: run(
                MarkovRefine(make(), max_rounds=rounds, round_cost=cost, policy=ParameterOracle(test)),
                f"oracle@{cost:g}",
            )
            for cost in costs
        }
    settings = {"rounds": rounds, "costs": list(costs), "select": select, "logprobs": logprobs}
    return WorldStudy(model, fixed, policy, oracles, settings)


def paired_drop(lower_cost: MethodResult, higher_cost: MethodResult) -> tuple[float, int, float]:
    """Whether the lower round cost bought lower accuracy: ``(accuracy difference, discordant questions, p)``.

    ``p`` is the one-sided exact binomial (McNemar) tail of the questions only the higher cost got right, among the
    questions the two runs disagree on: small ``p`` means the drop is beyond the noise of this test set.
    """
    from scipy import stats

    worse = sum(1 for a, b in zip(lower_cost.labels, higher_cost.labels, strict=True) if b and not a)
    better = sum(1 for a, b in zip(lower_cost.labels, higher_cost.labels, strict=True) if a and not b)
    n = worse + better
    p = float(stats.binom.sf(worse - 1, n, 0.5)) if n else 1.0
    return lower_cost.accuracy - higher_cost.accuracy, n, p
