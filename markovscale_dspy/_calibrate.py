"""MarkovCalibrator: a DSPy optimizer that learns p0, p_cw and p_wc of a MarkovRefine from labelled chains."""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import dspy
from dspy.teleprompt import Teleprompter
from dspy.utils.parallelizer import ParallelExecutor
from scipy import stats

from markovscale_dspy._chain import describe as _describe
from markovscale_dspy._exceptions import CalibrationError, ConfigurationError, DataError, StateError
from markovscale_dspy._mixture import ChainMixture, chain_statistics, fit_mixture, select_mixture
from markovscale_dspy._model import PARAMETERS, TransitionModel, _check_prior
from markovscale_dspy._refine import MAX_ROUNDS_LIMIT, MarkovRefine
from markovscale_dspy._traces import TraceStore, chain_key
from markovscale_dspy._usage import Usage, measure

__all__ = ["CalibrationReport", "ChainRecord", "MarkovCalibrator", "binomial_interval", "score_to_label"]

logger = logging.getLogger(__name__)

#: Fewer labelled examples than this cannot inform the chain at all.
MIN_TRAINSET = 2

#: ``question_types="auto"`` looks for latent types only with at least this many calibration chains.
MIN_CHAINS_FOR_TYPES = 100

#: Round costs the report gives the recommended number of rounds for.
REPORT_COSTS = (0.0, 0.005, 0.01, 0.02, 0.05)


def score_to_label(score: Any, threshold: float) -> bool:
    """Turn a metric's return value (bool, number, or a Prediction with ``.score``) into correct / wrong."""
    value = getattr(score, "score", score)
    if isinstance(value, bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"metric returned {score!r}; expected a bool, a number or a Prediction with .score") from None
    if math.isnan(number):
        raise DataError("metric returned NaN")
    return number >= threshold


@dataclass
class ChainRecord:
    """What calibration observed on one trainset example.

    Attributes:
        index: Position of the example in the trainset.
        labels: Correctness of every round (``None`` where the round failed or could not be graded).
        answers: Normalised answer of every round.
        errors: Per round, the failure that kept the previous answer (``None`` if the round succeeded).
        failure: Why the whole chain is missing (round 0 or the worker failed), else ``None``.
        metric_error: The metric's exception on this example, if it raised.
        usage: LM calls and tokens spent on the chain (when it was first run, if reused).
        reused: Whether the chain came from the trace store instead of the LM.
    """

    index: int
    labels: list[bool | None] = field(default_factory=list)
    answers: list[Any] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    failure: str | None = None
    metric_error: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    reused: bool = False

    def observed(self) -> list[tuple[bool, Any]]:
        """The (label, answer) pairs the fit may use: failed rounds dropped (they kept the previous answer, so the
        chain did not move), and the chain cut where the metric could not grade a real answer."""
        chain: list[tuple[bool, Any]] = []
        for label, answer, error in zip(self.labels, self.answers, self.errors, strict=True):
            if error is not None:
                continue
            if label is None:
                break
            chain.append((label, _hashable(answer)))
        return chain

    def observed_chain(self) -> list[bool]:
        """The labels of :meth:`observed`."""
        return [label for label, _ in self.observed()]


@dataclass
class CalibrationReport:
    """Everything a calibration measured: counts, estimates with intervals, the regime verdict, fit checks.

    ``to_dict()`` is JSON-able; the report layer renders it as text, Markdown and plots.
    """

    model: dict[str, Any]
    rounds: int
    examples: int
    chains_used: int
    estimates: dict[str, dict[str, float]]
    regime: str
    stationary_accuracy: float | None
    convergence_rate: float
    prob_improves: float
    recommended_rounds: dict[str, int]
    observed_accuracy: list[dict[str, float]]
    transitions_by_round: list[dict[str, int]]
    failures: dict[str, Any]
    usage: dict[str, int]
    seconds: float
    valset: dict[str, Any] | None = None
    chains_reused: int = 0
    reused_usage: dict[str, int] = field(default_factory=dict)
    drift: dict[str, Any] = field(default_factory=dict)
    chains: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationReport:
        """Rebuild a report saved with :meth:`to_dict` (e.g. the ``report.json`` the CLI writes)."""
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise StateError(f"not a calibration report: {exc}") from None

    @classmethod
    def from_model(cls, model: TransitionModel, horizon: int = 8) -> CalibrationReport:
        """A report of a model alone (no calibration chains at hand): predictions, bounds and recommendations."""
        return _build_report(model, [], horizon, 0.0, None)

    def transition_model(self) -> TransitionModel:
        return TransitionModel.from_dict(self.model)


class MarkovCalibrator(Teleprompter):
    """Learn when refinement pays: run full refinement chains on a labelled trainset and fit the Markov chain.

    ``compile(student, trainset=...)`` runs round 0 plus ``rounds`` refinements on every example (no early
    stopping, so every transition is observed), labels each round with ``metric(example, prediction)``, fits a
    :class:`TransitionModel` and returns a calibrated copy of the student (the student is left untouched). The
    calibrator keeps a :class:`CalibrationReport` in ``self.report``.

    Calibrate with the LM, temperature and adapter you will use at inference: the transition rates belong to that
    decoding setup. Run prompt optimizers (which reset parameters) before calibrating, not after.

    Args:
        metric: ``metric(example, prediction, trace=None)`` returning a bool, a number (compared with
            ``threshold``) or a Prediction with ``.score``.
        rounds: Refinement rounds per calibration chain.
        num_threads: Threads for DSPy's parallel executor (defaults to ``dspy.settings.num_threads``).
        prior: ``(alpha, beta)`` of the Beta prior on each parameter.
        threshold: A numeric score counts as correct when it is at least this.
        question_types: Latent question types to fit (a mixture of chains, by EM) for the belief policy:
            ``"auto"`` chooses 1-4 by 5-fold held-out likelihood (with at least 100 chains), an integer forces it,
            1 turns it off.
        resume: Reuse finished chains from the trace store (``False``: recompute every chain, like ``--fresh``).
        trace_dir: Where finished chains are stored (default ``$MARKOVSCALE_TRACE_DIR`` or
            ``~/.cache/markovscale/traces``).
        store_traces: Write finished chains to the store at all.
        display_progress: Show a progress bar.

    Example:
        >>> import dspy
        >>> from markovscale_dspy import MarkovCalibrator, MarkovRefine
        >>> from markovscale_dspy.testing import SimulatedWorld
        >>> world = SimulatedWorld.homogeneous(40, p0=0.4, p_cw=0.1, p_wc=0.3, seed=0)
        >>> calibrator = MarkovCalibrator(world.metric, rounds=3, num_threads=1)
        >>> with dspy.context(lm=world.lm()):
        ...     refine = calibrator.compile(MarkovRefine(dspy.Predict("question -> answer")),
        ...                                 trainset=world.examples)
        >>> refine.model.regime()
        'improving'
    """

    def __init__(
        self,
        metric: Callable[..., Any],
        *,
        rounds: int = 4,
        num_threads: int | None = None,
        prior: tuple[float, float] = (1.0, 1.0),
        threshold: float = 1.0,
        question_types: int | str = "auto",
        resume: bool = True,
        trace_dir: str | os.PathLike | None = None,
        store_traces: bool = True,
        display_progress: bool = False,
    ):
        super().__init__()
        if not callable(metric):
            raise ConfigurationError(f"metric must be callable as metric(example, prediction), got {metric!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= MAX_ROUNDS_LIMIT:
            raise ConfigurationError(f"rounds must be an integer in [1, {MAX_ROUNDS_LIMIT}], got {rounds!r}")
        if num_threads is not None and (
            isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
        ):
            raise ConfigurationError(f"num_threads must be a positive integer or None, got {num_threads!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ConfigurationError(f"threshold must be a number, got {threshold!r}")
        if question_types != "auto" and (
            isinstance(question_types, bool) or not isinstance(question_types, int) or not 1 <= question_types <= 8
        ):
            raise ConfigurationError(f"question_types must be 'auto' or an integer in [1, 8], got {question_types!r}")
        self.metric = metric
        self.rounds = rounds
        self.num_threads = num_threads
        self.prior = _check_prior(prior)
        self.threshold = float(threshold)
        self.question_types = question_types
        self.resume = resume
        self.trace_dir = trace_dir
        self.store_traces = store_traces
        self.display_progress = display_progress
        self.report: CalibrationReport | None = None

    def compile(
        self,
        student: MarkovRefine,
        *,
        trainset: Sequence[dspy.Example],
        valset: Sequence[dspy.Example] | None = None,
        **kwargs: Any,
    ) -> MarkovRefine:
        """Calibrate a copy of ``student`` on ``trainset``; ``valset`` (optional) is only evaluated for the report.

        Raises:
            ConfigurationError: ``student`` is not a MarkovRefine.
            DataError: the trainset is empty or its examples lack inputs or labels.
            CalibrationError: no chain could be observed (every round 0 or every metric call failed).
        """
        if not isinstance(student, MarkovRefine):
            raise ConfigurationError(
                f"MarkovCalibrator calibrates a MarkovRefine, got {type(student).__name__}; wrap your program: "
                "MarkovRefine(program)"
            )
        examples = _check_examples(trainset, student, "trainset")
        started = time.perf_counter()
        program = student.deepcopy()
        program.model = None
        records = self._observe(program, examples)
        observed = [r.observed() for r in records]
        usable = [c for c in observed if c]
        if not usable:
            reasons = Counter(r.failure or r.metric_error or "no graded round" for r in records)
            raise CalibrationError(
                f"no usable chain among {len(records)} trainset examples; failures: "
                + "; ".join(f"{n}x {reason}" for reason, n in reasons.most_common(3))
            )
        labels = [[label for label, _ in c] for c in usable]
        answers = [[answer for _, answer in c] for c in usable]
        model = TransitionModel.fit(labels, prior=self.prior, answers=answers)
        model = model.with_mixture(self._question_types(labels, answers))
        program.model = model
        program._compiled = True
        if model.n_transitions == 0:
            self.report = _build_report(model, records, self.rounds, time.perf_counter() - started, None)
            errors = Counter(e.split(":", 1)[0] for r in records for e in r.errors if e)
            raise CalibrationError(
                "no refinement round succeeded, so p_cw and p_wc cannot be estimated "
                f"(failed rounds: {dict(errors) or 'none run'}); fix the refiner's LM and re-run (chains lost to LM "
                "errors are recomputed, the others come from the trace store). The partial report is in "
                "calibrator.report"
            )
        valset_result = None
        if valset:
            valset_result = _evaluate(
                program, _check_examples(valset, student, "valset"), self.metric, self.threshold, self.num_threads
            )
        self.report = _build_report(model, records, self.rounds, time.perf_counter() - started, valset_result)
        logger.info("MarkovCalibrator: %r", model)
        return program

    def _question_types(self, labels: list[list[bool]], answers: list[list[Any]]) -> ChainMixture | None:
        """Latent question types by EM; ``"auto"`` picks their number by held-out likelihood (1 = no mixture)."""
        stats = chain_statistics(labels, answers)
        if self.question_types == "auto":
            if len(labels) < MIN_CHAINS_FOR_TYPES or self.rounds < 2:
                return None  # too little data to tell types apart
            mixture = select_mixture(stats, prior=self.prior)
        elif self.question_types == 1:
            return None
        else:
            mixture = fit_mixture(stats, self.question_types, prior=self.prior)
        return mixture if mixture.components > 1 else None

    def _observe(self, program: MarkovRefine, examples: list[dspy.Example]) -> list[ChainRecord]:
        executor = ParallelExecutor(
            num_threads=self.num_threads, max_errors=len(examples) + 1, disable_progress_bar=not self.display_progress
        )
        jobs = list(enumerate(examples))
        store = TraceStore(self.trace_dir) if self.store_traces else None
        try:
            results = executor.execute(lambda job: self._chain(program, store, *job), jobs)
        finally:
            if store is not None:
                store.close()
        # The worker never raises, but the executor may still return None (cancelled) or an exception object.
        return [
            r if isinstance(r, ChainRecord) else ChainRecord(index=i, failure=f"executor: {r!r}")
            for (i, _), r in zip(jobs, results, strict=True)
        ]

    def _chain(self, program: MarkovRefine, store: TraceStore | None, index: int, example: dspy.Example) -> ChainRecord:
        """Worker: one full chain and its labels. Pure (returns its record) because the executor may re-run it;
        the store write is idempotent (same key, same chain)."""
        record = ChainRecord(index=index)
        key = None
        if store is not None:
            try:
                key = chain_key(program, self.rounds, example)
            except Exception as exc:  # the store is an optimisation: without a key, just run the chain
                logger.warning("trace store disabled for example %d: %s", index, _describe(exc))
        trajectory = store.get(key) if key is not None and self.resume else None
        if trajectory is not None:
            record.reused = True
        else:
            usage = Usage()
            try:
                with dspy.context(trace=[]), measure() as usage:
                    prediction = program.run_chain(self.rounds, **example.inputs())
            except Exception as exc:
                record.failure = _describe(exc)
                record.usage = usage.to_dict()
                return record
            trajectory = [{**entry, "answer_key": _jsonable(entry["answer_key"])} for entry in prediction.trajectory]
            # Only chains that are the model's own behaviour are remembered; a round lost to a transient service
            # failure (timeout, rate limit, dead server) is recomputed by the next run.
            if key is not None and all(e.get("error_kind") in (None, "parse", "empty") for e in trajectory):
                store.put(key, trajectory)
        self._label(record, example, trajectory)
        return record

    def _label(self, record: ChainRecord, example: dspy.Example, trajectory: list[dict[str, Any]]) -> None:
        usage = Usage()
        for entry in trajectory:
            usage = usage + Usage.from_dict(entry.get("usage"))
            record.errors.append(entry["error"])
            record.answers.append(_jsonable(entry["answer_key"]))
            label = None
            if entry["error"] is None and record.metric_error is None:
                try:
                    label = score_to_label(self.metric(example, dspy.Prediction(**entry["outputs"])), self.threshold)
                except Exception as exc:  # a broken metric is reported per example, never aborts the run
                    record.metric_error = _describe(exc)
            record.labels.append(label)
        record.usage = usage.to_dict()


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def _check_examples(dataset: Any, student: MarkovRefine, name: str) -> list[dspy.Example]:
    if dataset is None or isinstance(dataset, (str, bytes)) or not isinstance(dataset, Sequence):
        raise DataError(f"{name} must be a list of dspy.Example, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise DataError(f"{name} is empty: calibration needs labelled examples (a few hundred for tight intervals)")
    needed = list(student.signature.input_fields)
    for i, example in enumerate(dataset):
        if not isinstance(example, dspy.Example):
            raise DataError(f"{name}[{i}] must be a dspy.Example, got {type(example).__name__}")
        try:
            inputs = example.inputs()
        except ValueError:
            raise DataError(
                f"{name}[{i}] has no input fields marked; build it with dspy.Example(...).with_inputs({needed})"
            ) from None
        missing = [f for f in needed if f not in inputs]
        if missing:
            raise DataError(f"{name}[{i}] lacks input field(s) {missing} of the program (it has {list(inputs)})")
        if not list(example.labels().keys()):
            raise DataError(f"{name}[{i}] has no label fields (only inputs {list(inputs)}); the metric needs a label")
    if name == "trainset" and len(dataset) < MIN_TRAINSET:
        raise DataError(
            f"trainset has {len(dataset)} example; calibration needs at least {MIN_TRAINSET} to estimate anything "
            "(a few hundred for tight intervals)"
        )
    return list(dataset)


def _evaluate(
    program: MarkovRefine,
    examples: list[dspy.Example],
    metric: Callable[..., Any],
    threshold: float,
    num_threads: int | None,
) -> dict[str, Any]:
    executor = ParallelExecutor(num_threads=num_threads, max_errors=len(examples) + 1, disable_progress_bar=True)

    def run(example: dspy.Example) -> tuple[bool, int] | None:
        try:
            pred = program(**example.inputs())
            return score_to_label(metric(example, pred), threshold), pred.rounds
        except Exception:
            return None

    results = [r for r in executor.execute(run, examples) if isinstance(r, tuple)]
    n = len(results)
    correct = sum(ok for ok, _ in results)
    return {
        "examples": len(examples),
        "answered": n,
        "accuracy": correct / n if n else None,
        "interval": list(binomial_interval(correct, n)) if n else None,
        "mean_rounds": sum(r for _, r in results) / n if n else None,
    }


def binomial_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Jeffreys interval of a binomial proportion ``k / n`` (``nan`` bounds when ``n == 0``)."""
    if n == 0:
        return float("nan"), float("nan")
    lo, hi = stats.beta(k + 0.5, n - k + 0.5).interval(level)
    return float(0.0 if k == 0 else lo), float(1.0 if k == n else hi)


def _drift(by_round: list[dict[str, int]]) -> dict[str, Any]:
    """Do the transition rates change with the round? A chi-square test of homogeneity per rate."""
    out: dict[str, Any] = {}
    for name, (hit, miss) in {"p_cw": ("cw", "cc"), "p_wc": ("wc", "ww")}.items():
        rows = [(r["round"], r[hit], r[miss]) for r in by_round if r[hit] + r[miss] > 0]
        rates = {str(t): h / (h + m) for t, h, m in rows}
        if len(rows) < 2 or sum(h for _, h, _ in rows) == 0 or sum(m for _, _, m in rows) == 0:
            out[name] = {"rates": rates, "chi2": None, "p_value": None}
            continue
        chi2, p_value, _, _ = stats.chi2_contingency([[h, m] for _, h, m in rows])
        out[name] = {"rates": rates, "chi2": float(chi2), "p_value": float(p_value)}
    return out


def _build_report(
    model: TransitionModel, records: list[ChainRecord], rounds: int, seconds: float, valset: dict[str, Any] | None
) -> CalibrationReport:
    observed = []
    by_round = []
    for t in range(rounds + 1):
        labels = [r.labels[t] for r in records if len(r.labels) > t and r.labels[t] is not None]
        k, n = sum(labels), len(labels)
        lo, hi = binomial_interval(k, n)
        observed.append(
            {
                "round": t,
                "correct": k,
                "n": n,
                "accuracy": k / n if n else float("nan"),
                "lo": lo,
                "hi": hi,
                "predicted": float(model.accuracy_at(t)),
            }
        )
        if t:
            counts = Counter()
            for r in records:
                if len(r.labels) > t and r.errors[t] is None and None not in (r.labels[t - 1], r.labels[t]):
                    counts[("c" if r.labels[t - 1] else "w") + ("c" if r.labels[t] else "w")] += 1
            by_round.append({"round": t, **{k: counts.get(k, 0) for k in ("cc", "cw", "wc", "ww")}})
    drift = _drift(by_round)
    round_errors = Counter(e.split(":", 1)[0] for r in records for e in r.errors if e)
    failures = {
        "chains_failed": sum(r.failure is not None for r in records),
        "chain_failures": [{"index": r.index, "error": r.failure} for r in records if r.failure],
        "rounds_failed": sum(round_errors.values()),
        "round_errors": dict(round_errors),
        "metric_errors": [{"index": r.index, "error": r.metric_error} for r in records if r.metric_error],
    }
    usage, reused = Usage(), Usage()
    for r in records:
        spent = Usage.from_dict(r.usage)
        if r.reused:
            reused = reused + spent
        else:
            usage = usage + spent
    try:
        bound = model.stationary_accuracy()
    except ValueError:
        bound = None
    return CalibrationReport(
        model=model.to_dict(),
        rounds=rounds,
        examples=len(records),
        chains_used=sum(bool(r.observed_chain()) for r in records),
        estimates={
            name: {
                "mean": getattr(model, name),
                "lo": model.interval(name)[0],
                "hi": model.interval(name)[1],
                "se": model.standard_error(name),
            }
            for name in PARAMETERS
        },
        regime=model.regime(),
        stationary_accuracy=bound,
        convergence_rate=model.convergence_rate(),
        prob_improves=model.prob_improves(),
        recommended_rounds={str(c): model.optimal_rounds(c, rounds) for c in REPORT_COSTS},
        observed_accuracy=observed,
        transitions_by_round=by_round,
        failures=failures,
        usage=usage.to_dict(),
        seconds=seconds,
        valset=valset,
        chains_reused=sum(r.reused for r in records),
        drift=drift,
        reused_usage=reused.to_dict(),
        chains=[asdict(r) for r in records],
    )
