"""Compare refinement methods on your own program, task and LM: every method on the same questions, side by side.

Reporting layer. :func:`compare_methods` calibrates MarkovRefine on a trainset, then runs on a disjoint test set:
no refinement and fixed-N refinement (read off one fixed-``max_rounds`` run: fixed-N's chain is the first N rounds of
it), MarkovRefine with the ``closed_form`` and ``belief`` policies, the hindsight limit, and the alternatives a DSPy
user would otherwise pick (``dspy.BestOfN`` and ``dspy.Refine`` with a self-judge reward, self-consistency).
``markovscale bench`` runs it from the command line.

The *hindsight oracle* knows the labels and stops at the first correct round of the fixed-max run (or at round 0 if
none is correct): what no stopping rule can beat.

With ``max_calls``, the calibration also draws parallel samples and the planner joins: :class:`MarkovScale` runs its
plan, and :func:`strategy_results` measures every strategy it considered (single call, refinement, votes, votes over
refined chains) on the same held-out questions, read off one grid of fresh samples and chains per question -- the
observed side of the planner's predicted-vs-observed figure.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy
import numpy as np
from dspy.utils.parallelizer import ParallelExecutor

from markovscale_dspy.calibrate.calibrator import MarkovCalibrator
from markovscale_dspy.core.answers import normalize_answer
from markovscale_dspy.core.model import TransitionModel
from markovscale_dspy.core.planner import Plan, Strategy
from markovscale_dspy.core.statistics import score_to_label
from markovscale_dspy.core.voting import plurality_winner
from markovscale_dspy.evaluate.evaluation import MethodResult, evaluate
from markovscale_dspy.refine.loop import describe
from markovscale_dspy.refine.markov_refine import MarkovRefine
from markovscale_dspy.refine.markov_scale import MarkovScale
from markovscale_dspy.usage import Usage

__all__ = [
    "ComparisonResult",
    "JudgeAnswer",
    "SelfConsistency",
    "baselines",
    "compare_methods",
    "fixed_curve",
    "fixed_family",
    "frontier_at",
    "grid_rounds",
    "hindsight",
    "read_off",
    "replayed",
    "self_judge_reward",
    "strategy_results",
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
class ComparisonResult:
    """Every method's result on one test set, with the calibrated model and a description of the task."""

    preset: str
    model: TransitionModel
    results: list[MethodResult]
    world: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    plan: Plan | None = None
    strategies: list[MethodResult] = field(default_factory=list)

    def by_name(self, name: str) -> MethodResult:
        return next(r for r in self.results if r.name == name)

    def fixed(self) -> list[MethodResult]:
        return [r for r in self.results if r.name.startswith("fixed-")]


def read_off(
    run: MethodResult,
    examples: Sequence[dspy.Example],
    metric: Callable[..., Any],
    name: str,
    choose: Callable[[dspy.Prediction, dspy.Example], tuple[dict[str, Any], list[dict[str, Any]]]],
) -> MethodResult:
    """A method's result read off the chains of one recorded run, question by question (the same samples).

    ``choose(prediction, example)`` returns the outputs the method would have given and the trajectory entries it
    would have paid for. A question whose recorded round 0 failed counts as wrong for every method, as in
    :func:`~markovscale_dspy.evaluate.evaluation.evaluate`, so results stay aligned for paired comparisons.
    """
    labels, usage, rounds, failures = [], Usage(), 0, 0
    for example, pred in zip(examples, run.predictions, strict=True):
        if pred is None:
            labels.append(False)
            failures += 1
            continue
        outputs, used = choose(pred, example)
        labels.append(bool(metric(example, dspy.Prediction(**outputs))))
        usage = sum((Usage.from_dict(entry.get("usage")) for entry in used), usage)
        rounds += len(used) - 1
    return MethodResult(
        name=name,
        n=len(labels),
        correct=sum(labels),
        calls=usage.calls,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cost=usage.cost,
        seconds=run.seconds * usage.calls / max(run.calls, 1),
        rounds=rounds,
        failures=failures,
        labels=labels,
    )


def fixed_curve(
    run: MethodResult, examples: Sequence[dspy.Example], metric: Callable[..., Any], max_rounds: int
) -> list[MethodResult]:
    """Fixed-N results for N = 0..max_rounds, read off the trajectories of one fixed-``max_rounds`` run."""

    def first(n: int) -> Callable[[dspy.Prediction, dspy.Example], Any]:
        def choose(pred: dspy.Prediction, example: dspy.Example) -> Any:
            used = pred.markovscale.trajectory[: n + 1]
            return used[-1]["outputs"], used

        return choose

    return [read_off(run, examples, metric, f"fixed-{n}", first(n)) for n in range(max_rounds + 1)]


def replayed(
    module: MarkovRefine, run: MethodResult, examples: Sequence[dspy.Example], metric: Callable[..., Any], name: str
) -> MethodResult:
    """``module`` (a stopping policy) read off a fixed-max run with :meth:`MarkovRefine.replay`: its answers are
    exactly those it would give live on the same samples, at no LM cost."""

    def choose(pred: dspy.Prediction, example: dspy.Example) -> Any:
        account = module.replay(pred, **example.inputs()).markovscale
        return account.trajectory[account.selected_round]["outputs"], account.trajectory

    return read_off(run, examples, metric, name, choose)


def fixed_family(
    run: MethodResult, examples: Sequence[dspy.Example], metric: Callable[..., Any], max_rounds: int
) -> list[MethodResult]:
    """The fixed-N curve and the hindsight oracle from one fixed-``max_rounds`` run kept with its predictions."""
    return [*fixed_curve(run, examples, metric, max_rounds), hindsight(run, examples, metric)]


def hindsight(run: MethodResult, examples: Sequence[dspy.Example], metric: Callable[..., Any]) -> MethodResult:
    """Stop each question at its first correct round (round 0 if none): the limit no stopping rule can beat."""

    def choose(pred: dspy.Prediction, example: dspy.Example) -> Any:
        trajectory = pred.markovscale.trajectory
        correct = [bool(metric(example, dspy.Prediction(**e["outputs"]))) for e in trajectory]
        stop = correct.index(True) if any(correct) else 0
        return trajectory[stop]["outputs"], trajectory[: stop + 1]

    return read_off(run, examples, metric, "hindsight oracle", choose)


def frontier_at(curve: Sequence[MethodResult], calls: float) -> float:
    """Accuracy of the fixed-N frontier linearly interpolated to ``calls`` LM calls per question."""
    xs = [r.mean_calls for r in curve]
    ys = [r.accuracy for r in curve]
    return float(np.interp(calls, xs, ys))


def grid_rounds(max_calls: int) -> list[int]:
    """Rounds to refine fresh sample ``j = 0 .. max_calls-1`` so that every strategy within ``max_calls`` calls
    can be read off the grid (``n x T`` is the vote over chains ``0..n-1`` at round ``T``)."""
    return [max_calls - 1] + [max(max_calls // (j + 1) - 1, 0) for j in range(1, max_calls)]


def _strategy_label(
    strategy: Strategy, run: dict[str, Any], example: dspy.Example, metric: Callable[..., Any], threshold: Any
) -> tuple[bool, Usage]:
    n, t = strategy.samples, strategy.rounds
    chains = run["chains"][:n]
    usage, keys = Usage(), []
    for chain in chains:
        if chain.error is not None:
            usage = usage + Usage.from_dict(chain.usage)
            keys.append(None)
            continue
        entries = chain.prediction.markovscale.trajectory[: t + 1]
        usage = sum((Usage.from_dict(e.get("usage")) for e in entries), usage)
        keys.append(entries[-1]["answer_key"])
    winner = plurality_winner(keys)
    if winner is None:
        return False, usage
    outputs = chains[winner].prediction.markovscale.trajectory[t]["outputs"]
    return score_to_label(metric(example, dspy.Prediction(**outputs)), threshold), usage


def strategy_results(
    scale: MarkovScale,
    examples: Sequence[dspy.Example],
    metric: Callable[..., Any],
    *,
    num_threads: int | None = None,
    threshold: float | None = None,
    display_progress: bool = False,
) -> list[MethodResult]:
    """Observed accuracy, calls and tokens of every strategy the calibrated ``scale`` plans among, on ``examples``.

    Per question, one grid of fresh samples refined by :func:`grid_rounds`, so every strategy is exactly what
    ``scale.run_strategy`` draws, all on the same samples (like the fixed-N family read off one fixed run).
    """
    plan = scale.plan()
    strategies = [p.strategy for p in plan.predictions]
    rounds = grid_rounds(scale.max_calls)[: max(s.samples for s in strategies)]

    def run(example: dspy.Example) -> dict[str, Any]:
        try:
            return {"chains": scale.run_samples(rounds, **example.inputs()), "error": None}
        except Exception as exc:  # e.g. missing inputs: every strategy counts it wrong
            return {"chains": [], "error": describe(exc)}

    executor = ParallelExecutor(
        num_threads=num_threads, max_errors=len(examples) + 1, disable_progress_bar=not display_progress
    )
    started = time.perf_counter()
    runs = executor.execute(run, list(examples))
    seconds = time.perf_counter() - started
    runs = [r if isinstance(r, dict) else {"chains": [], "error": f"executor: {r!r}"} for r in runs]
    total_calls = sum(sum(c.usage.get("calls", 0) for c in r["chains"]) for r in runs)
    results = []
    for strategy in strategies:
        labels, usage = [], Usage()
        for example, r in zip(examples, runs, strict=True):
            try:
                label, used = _strategy_label(strategy, r, example, metric, threshold)
            except Exception:  # a grid that could not be read (a failed chain) counts wrong
                label, used = False, Usage()
            labels.append(label)
            usage = usage + used
        results.append(
            MethodResult(
                name=strategy.name,
                n=len(labels),
                correct=sum(labels),
                calls=usage.calls,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                seconds=seconds * usage.calls / max(total_calls, 1),
                rounds=strategy.rounds * strategy.samples * len(labels),
                failures=sum(r["error"] is not None for r in runs),
                labels=labels,
            )
        )
    return results


def compare_methods(
    program: Callable[[], dspy.Module],
    trainset: Sequence[dspy.Example],
    testset: Sequence[dspy.Example],
    metric: Callable[..., Any],
    *,
    name: str = "task",
    max_rounds: int = 3,
    round_cost: float = 0.01,
    num_threads: int | None = None,
    include_baselines: bool = True,
    baseline_n: int = 3,
    resume: bool = False,
    description: dict[str, Any] | None = None,
    max_calls: int | None = None,
    parallel_samples: int | None = None,
    call_cost: float = 0.0,
    min_prob_gain: float = 0.9,
) -> ComparisonResult:
    """Calibrate on ``trainset`` and run every method on ``testset`` with the LM and adapter of ``dspy.settings``.

    Args:
        program: Builds a fresh copy of the program to refine (each method gets its own).
        trainset: Labelled calibration examples.
        testset: Labelled held-out examples, disjoint from ``trainset``.
        metric: ``metric(example, prediction)``.
        name: What the result is called in reports.
        max_rounds: Refinement rounds of the fixed-N family and the cap of MarkovRefine.
        round_cost: MarkovRefine's round cost.
        num_threads: Concurrent questions.
        include_baselines: Also run ``dspy.BestOfN``, ``dspy.Refine`` (self-judge) and self-consistency.
        baseline_n: Attempts of each baseline.
        resume: Reuse calibration chains from the trace store.
        description: What to say about the task and data in the result.
        max_calls: With a call budget, also calibrate the planner (``parallel_samples`` samples per question,
            default ``max_calls``), run :class:`MarkovScale` and measure every strategy it considered
            (``result.plan``, ``result.strategies``).
        parallel_samples: Independent samples per calibration question for the vote model.
        call_cost: The planner's cost of one LM call.
        min_prob_gain: The planner's confidence gate.

    Example:
        >>> import dspy
        >>> from markovscale_dspy.testing import SimulatedWorld
        >>> world = SimulatedWorld.homogeneous(50, p0=0.4, p_cw=0.1, p_wc=0.3, seed=0)
        >>> train, test = world.examples[:30], world.examples[30:]
        >>> with dspy.context(lm=world.lm()):
        ...     result = compare_methods(lambda: dspy.Predict("question -> answer"), train, test, world.metric,
        ...                              num_threads=1, include_baselines=False)
        >>> [r.name for r in result.results][:3]
        ['fixed-0', 'fixed-1', 'fixed-2']
    """
    samples = 0 if max_calls is None else (parallel_samples if parallel_samples is not None else max_calls)
    calibrator = MarkovCalibrator(
        metric, rounds=max_rounds, parallel_samples=samples, num_threads=num_threads, resume=resume
    )
    calibrated = calibrator.compile(
        MarkovRefine(program(), max_rounds=max_rounds, round_cost=round_cost), trainset=list(trainset)
    )
    model = calibrated.model

    def refine(**kwargs: Any) -> MarkovRefine:
        module = MarkovRefine(program(), max_rounds=max_rounds, round_cost=round_cost, **kwargs)
        module.model = model
        return module

    testset = list(testset)
    full = evaluate(
        refine(policy="fixed"),
        testset,
        metric,
        name=f"fixed-{max_rounds}",
        num_threads=num_threads,
        keep_predictions=True,
    )
    results = fixed_family(full, testset, metric, max_rounds)
    # The policies are read off the same chains: paired with fixed-N and with each other, at no extra LM cost.
    for policy in ("closed_form", "belief"):
        results.append(replayed(refine(policy=policy), full, testset, metric, policy))
    if include_baselines:
        methods: dict[str, dspy.Module] = dict(baselines(program, n=baseline_n))
    else:
        methods = {}
    plan, strategies = None, []
    if max_calls is not None:
        scale = MarkovScale(program(), max_calls=max_calls, call_cost=call_cost, min_prob_gain=min_prob_gain)
        scale.model = model
        plan = scale.plan()
        methods[f"MarkovScale ({plan.chosen.name})"] = scale
    for method, module in methods.items():
        results.append(evaluate(module, testset, metric, name=method, num_threads=num_threads))
    if max_calls is not None:
        strategies = strategy_results(scale, testset, metric, num_threads=num_threads)
    return ComparisonResult(
        preset=name,
        model=model,
        results=results,
        world=dict(description or {}),
        settings={
            "n_train": len(trainset),
            "n_test": len(testset),
            "max_rounds": max_rounds,
            "round_cost": round_cost,
            "calibration": calibrator.report.to_dict() | {"chains": []},
            **({"max_calls": max_calls, "parallel_samples": samples, "call_cost": call_cost} if max_calls else {}),
        },
        plan=plan,
        strategies=strategies,
    )
