"""Evaluate programs side by side on the same questions: accuracy with intervals, LM calls, tokens, wall time.

Evaluation layer: above the module and the calibrator, below the report and the CLI. Every question runs in its own
worker with its own meter (DSPy's outer usage trackers do not see worker threads), and a question whose program
fails counts as wrong and is reported, never raised.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import dspy
from dspy.utils.parallelizer import ParallelExecutor

from markovscale_dspy.core.statistics import binomial_interval, score_to_label
from markovscale_dspy.refine.loop import describe as _describe
from markovscale_dspy.usage import Usage, measure_usage

__all__ = ["MethodResult", "compare", "evaluate"]


@dataclass
class MethodResult:
    """How one method did on an evaluation set."""

    name: str
    n: int
    correct: int
    calls: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    rounds: int
    failures: int
    cost: float | None = None
    labels: list[bool] = field(default_factory=list, repr=False)
    errors: list[str] = field(default_factory=list, repr=False)
    predictions: list[Any] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return binomial_interval(self.correct, self.n)

    @property
    def mean_calls(self) -> float:
        return self.calls / self.n if self.n else float("nan")

    @property
    def mean_tokens(self) -> float:
        return (self.prompt_tokens + self.completion_tokens) / self.n if self.n else float("nan")

    @property
    def mean_cost(self) -> float | None:
        """Dollars per question (``None`` when some call's price is unknown)."""
        return self.cost / self.n if self.n and self.cost is not None else None

    @property
    def mean_rounds(self) -> float:
        return self.rounds / self.n if self.n else float("nan")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("predictions")
        data.update(
            accuracy=self.accuracy,
            interval=list(self.interval),
            mean_calls=self.mean_calls,
            mean_tokens=self.mean_tokens,
            mean_cost=self.mean_cost,
            mean_rounds=self.mean_rounds,
        )
        return data


def evaluate(
    program: dspy.Module,
    examples: Sequence[dspy.Example],
    metric: Callable[..., Any],
    *,
    name: str,
    num_threads: int | None = None,
    threshold: float | None = None,
    display_progress: bool = False,
    keep_predictions: bool = False,
) -> MethodResult:
    """Run ``program`` on every example and grade it with ``metric``.

    ``rounds`` counts refinement rounds when the program reports them (``prediction.markovscale.rounds`` or a
    ``rounds`` field), else 0. With
    ``keep_predictions`` the predictions (``None`` where the program failed) are kept on the result.
    """

    def run(example: dspy.Example) -> dict[str, Any]:
        out: dict[str, Any] = {"label": False, "rounds": 0, "error": None, "prediction": None}
        with measure_usage() as usage:
            try:
                prediction = program(**example.inputs())
                out["prediction"] = prediction
                out["label"] = score_to_label(metric(example, prediction), threshold)
                account = getattr(prediction, "markovscale", None)  # MarkovRefine's; else a plain ``rounds`` field
                out["rounds"] = int(account.rounds if account is not None else getattr(prediction, "rounds", 0) or 0)
            except Exception as exc:  # a failed question is a wrong answer, reported
                out["error"] = _describe(exc)
        out["usage"] = usage.to_dict()
        return out

    executor = ParallelExecutor(
        num_threads=num_threads, max_errors=len(examples) + 1, disable_progress_bar=not display_progress
    )
    started = time.perf_counter()
    results = executor.execute(run, list(examples))
    seconds = time.perf_counter() - started
    results = [
        r
        if isinstance(r, dict)
        else {"label": False, "rounds": 0, "error": f"executor: {r!r}", "usage": {}, "prediction": None}
        for r in results
    ]
    usage = sum((Usage.from_dict(r["usage"]) for r in results), Usage())
    return MethodResult(
        name=name,
        n=len(results),
        correct=sum(r["label"] for r in results),
        calls=usage.calls,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cost=usage.cost,
        seconds=seconds,
        rounds=sum(r["rounds"] for r in results),
        failures=sum(r["error"] is not None for r in results),
        labels=[bool(r["label"]) for r in results],
        errors=[r["error"] for r in results if r["error"]],
        predictions=[r["prediction"] for r in results] if keep_predictions else [],
    )


def compare(
    methods: Mapping[str, dspy.Module],
    examples: Sequence[dspy.Example],
    metric: Callable[..., Any],
    *,
    num_threads: int | None = None,
    display_progress: bool = False,
    on_result: Callable[[MethodResult], None] | None = None,
) -> list[MethodResult]:
    """Evaluate each method on the same examples, one after the other (so wall times do not interfere)."""
    results = []
    for name, program in methods.items():
        result = evaluate(
            program, examples, metric, name=name, num_threads=num_threads, display_progress=display_progress
        )
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
