"""Choose a configuration: which model drafts (round 0) and which refines, by accuracy per dollar (or per call).

Evaluation layer. :func:`compare_configurations` calibrates MarkovRefine once per configuration on the same
questions, saves one state per configuration, evaluates each calibrated module on the same held-out questions, and
recommends the configuration with the best value for the user's cost: accuracy minus dollars per question over the
value of a correct answer (``value_per_correct``), or minus ``round_cost`` per LM call. ``markovscale
compare-configs`` runs it from the command line.

Example:
    >>> import dspy
    >>> from markovscale_dspy.testing import SimulatedWorld
    >>> world = SimulatedWorld.homogeneous(40, p0=0.4, p_cw=0.1, p_wc=0.3, seed=0)
    >>> cheap, strong = world.lm(name="cheap", price=(1e-7, 4e-7)), world.lm(name="strong", price=(3e-6, 1e-5))
    >>> result = compare_configurations(
    ...     lambda: dspy.Predict("question -> answer"),
    ...     [Configuration("cheap", cheap), Configuration("cheap+strong", cheap, strong)],
    ...     world.examples[:30], world.metric, testset=world.examples[30:], max_rounds=2,
    ...     value_per_correct=0.01, num_threads=1, store_traces=False)
    >>> [r.name for r in result.results], result.recommended in ("cheap", "cheap+strong")
    (['cheap', 'cheap+strong'], True)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from markovscale_dspy._exceptions import ConfigurationError, MarkovScaleError
from markovscale_dspy.calibrate.calibrator import MarkovCalibrator
from markovscale_dspy.calibrate.report import CalibrationReport
from markovscale_dspy.core.validation import check_int, check_number
from markovscale_dspy.evaluate.evaluation import MethodResult, evaluate
from markovscale_dspy.refine.markov_refine import MarkovRefine

__all__ = [
    "Configuration",
    "ConfigurationComparison",
    "ConfigurationResult",
    "compare_configurations",
]


@dataclass(frozen=True)
class Configuration:
    """One way to run MarkovRefine: the LM of round 0 (the program) and the LM of refinement rounds.

    Args:
        name: What the configuration is called in reports and state file names.
        lm: Round 0's LM (the program runs under ``dspy.context(lm=lm)``).
        refiner_lm: The refiner's LM; ``None`` refines with ``lm``.
    """

    name: str
    lm: Any
    refiner_lm: Any = None


@dataclass
class ConfigurationResult:
    """What one configuration achieved: its calibration, plan, spend and held-out result."""

    name: str
    lms: dict[str, Any]
    report: CalibrationReport
    stopping_cost: float | None
    rounds: int
    predicted_accuracy: float
    predicted: dict[str, float | None]
    held_out: MethodResult | None
    state_path: str | None
    objective: float | None
    note: str | None = None

    @property
    def accuracy(self) -> float:
        """Held-out accuracy when measured, else the calibrated chain's prediction."""
        return self.held_out.accuracy if self.held_out is not None else self.predicted_accuracy

    @property
    def dollars(self) -> float | None:
        """Dollars per question: held out when measured, else predicted from the calibration's spend."""
        return self.held_out.mean_cost if self.held_out is not None else self.predicted["cost"]

    @property
    def calls(self) -> float:
        return self.held_out.mean_calls if self.held_out is not None else float(self.predicted["calls"] or 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lms": self.lms,
            "estimates": self.report.estimates,
            "regime": self.report.regime,
            "prob_improves": self.report.prob_improves,
            "stopping_cost": self.stopping_cost,
            "rounds": self.rounds,
            "predicted_accuracy": self.predicted_accuracy,
            "predicted_per_question": self.predicted,
            "spend": self.report.spend,
            "held_out": None if self.held_out is None else self.held_out.to_dict(),
            "state": self.state_path,
            "objective": self.objective,
            "note": self.note,
        }


@dataclass
class ConfigurationComparison:
    """Every configuration's result, the recommendation and the cost it was made for."""

    results: list[ConfigurationResult]
    recommended: str | None
    criterion: str
    settings: dict[str, Any] = field(default_factory=dict)

    def by_name(self, name: str) -> ConfigurationResult:
        return next(r for r in self.results if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recommended": self.recommended,
            "criterion": self.criterion,
            "settings": self.settings,
            "results": [r.to_dict() for r in self.results],
        }


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "configuration"


def _predicted(spend: dict[str, Any] | None, rounds: int) -> dict[str, float | None]:
    """Per-question calls, tokens and dollars of round 0 plus ``rounds`` refinement rounds, from measured means."""
    spend = spend or {}
    first, later = spend.get("round0") or {}, spend.get("refinement") or {}
    out: dict[str, float | None] = {}
    for key in ("calls", "prompt_tokens", "completion_tokens", "cost"):
        a, b = first.get(key), later.get(key)
        out[key] = None if a is None or (rounds and b is None) else a + rounds * (b or 0.0)
    return out


def compare_configurations(
    program: Callable[[], dspy.Module],
    configurations: Sequence[Configuration],
    trainset: Sequence[dspy.Example],
    metric: Callable[..., Any],
    *,
    testset: Sequence[dspy.Example] | None = None,
    max_rounds: int = 3,
    round_cost: float | None = None,
    value_per_correct: float | None = None,
    out_dir: str | Path | None = None,
    num_threads: int | None = None,
    resume: bool = True,
    trace_dir: str | Path | None = None,
    store_traces: bool = True,
    min_prob_improves: float | None = None,
    on_result: Callable[[ConfigurationResult], None] | None = None,
) -> ConfigurationComparison:
    """Calibrate every configuration on the same questions and recommend one for the user's cost.

    Args:
        program: Builds a fresh copy of the program to refine.
        configurations: The configurations (names must be distinct).
        trainset: Labelled calibration questions (the same for every configuration).
        metric: ``metric(example, prediction)``.
        testset: Labelled held-out questions (the same for every configuration); without them the comparison
            rests on the calibrated chains' predictions.
        max_rounds: Refinement rounds calibrated and allowed.
        round_cost: Accuracy an LM call must buy (default 0.01 when ``value_per_correct`` is not given).
        value_per_correct: Dollars a correct answer is worth: each module stops by its measured dollars per round,
            and the recommendation maximises accuracy minus dollars per question / ``value_per_correct``.
        out_dir: Where to write one state per configuration (``<name>.json``); ``None`` writes none.
        num_threads: Concurrent questions.
        resume: Reuse calibration chains from the trace store.
        trace_dir: The trace store's directory.
        store_traces: Keep finished chains in the trace store.
        min_prob_improves: The modules' confidence gate (see MarkovRefine).
        on_result: Called with each configuration's result as soon as it is known.

    Returns:
        A :class:`ConfigurationComparison`; ``recommended`` is ``None`` when no configuration's cost is known.
    """
    if not configurations:
        raise ConfigurationError("compare_configurations needs at least one Configuration")
    names = [c.name for c in configurations]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"configuration names must be distinct, got {names}")
    check_int("max_rounds", max_rounds, 1)
    check_number("value_per_correct", value_per_correct, 0, lo_open=True, none_ok=True, unit="dollars")
    if round_cost is not None and value_per_correct is not None:
        raise ConfigurationError("give round_cost or value_per_correct, not both")
    per_call = 0.01 if round_cost is None else check_number("round_cost", round_cost, 0, 1, hi_open=True)
    criterion = (
        f"accuracy − dollars per question / {value_per_correct:g} (a correct answer is worth ${value_per_correct:g})"
        if value_per_correct is not None
        else f"accuracy − {per_call:g} × LM calls per question"
    )
    out = Path(out_dir) if out_dir is not None else None
    results = []
    for configuration in configurations:
        student = MarkovRefine(
            program(),
            max_rounds=max_rounds,
            round_cost=None if value_per_correct is not None else per_call,
            value_per_correct=value_per_correct,
            refiner_lm=configuration.refiner_lm,
            min_prob_improves=min_prob_improves,
        )
        calibrator = MarkovCalibrator(
            metric,
            num_threads=num_threads,
            resume=resume,
            trace_dir=trace_dir,
            store_traces=store_traces,
            question_types=1,
        )
        with dspy.context(lm=configuration.lm):
            calibrated = calibrator.compile(student, trainset=list(trainset))
            note = None
            try:
                stopping = calibrated.stopping_cost()
            except MarkovScaleError as exc:  # dollars unknown: plan without a cost, say so
                stopping, note = None, f"dollars unknown ({exc})"
                calibrated.value_per_correct, calibrated.round_cost = None, 0.0
            model = calibrated.model
            rounds = model.optimal_rounds(stopping or 0.0, max_rounds)
            if min_prob_improves and model.prob_improves() < min_prob_improves:
                rounds = 0  # the confidence gate holds refinement back until a calibration is surer
            held_out = None
            if testset:
                held_out = evaluate(calibrated, list(testset), metric, name=configuration.name, num_threads=num_threads)
        state_path = None
        if out is not None:
            state_path = str(out / f"{_slug(configuration.name)}.json")
            calibrated.save(state_path)
        predicted = _predicted(calibrated.markov.spend, rounds)
        result = ConfigurationResult(
            name=configuration.name,
            lms=dict(calibrated.markov.calibrated_for or {}),
            report=calibrator.report,
            stopping_cost=stopping,
            rounds=rounds,
            predicted_accuracy=float(model.accuracy_at(rounds)),
            predicted=predicted,
            held_out=held_out,
            state_path=state_path,
            objective=None,
            note=note,
        )
        if value_per_correct is not None:
            cost = result.dollars
            result.objective = None if cost is None else result.accuracy - cost / value_per_correct
        else:
            result.objective = result.accuracy - per_call * result.calls
        results.append(result)
        if on_result is not None:
            on_result(result)
    ranked = [r for r in results if r.objective is not None]
    recommended = max(ranked, key=lambda r: r.objective).name if ranked else None
    return ConfigurationComparison(
        results=results,
        recommended=recommended,
        criterion=criterion,
        settings={
            "n_train": len(trainset),
            "n_test": len(testset or []),
            "max_rounds": max_rounds,
            "round_cost": None if value_per_correct is not None else per_call,
            "value_per_correct": value_per_correct,
        },
    )
