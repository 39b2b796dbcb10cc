"""MarkovCalibrator: a DSPy optimizer that learns p0, p_cw and p_wc of a MarkovRefine from labelled chains, and how
voting over independent samples behaves for a MarkovScale."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import dspy
from dspy.teleprompt import Teleprompter
from dspy.utils.parallelizer import ParallelExecutor

from markovscale_dspy._exceptions import CalibrationError, ConfigurationError, DataError, RoundZeroError
from markovscale_dspy._warnings import warn
from markovscale_dspy.calibrate.guard import RunGuard
from markovscale_dspy.calibrate.records import ChainRecord, jsonable
from markovscale_dspy.calibrate.report import CalibrationReport, build_report, spend_of
from markovscale_dspy.calibrate.traces import TraceStore, UnknownLMIdentityError, chain_key, restore_outputs
from markovscale_dspy.core.answers import default_answer_key, is_empty_answer
from markovscale_dspy.core.mixture import chain_statistics, fit_mixture, select_mixture
from markovscale_dspy.core.model import TransitionModel
from markovscale_dspy.core.statistics import PARTIAL_SCORE, binomial_interval, score_to_label
from markovscale_dspy.core.validation import check_callable, check_int, check_number, check_prior
from markovscale_dspy.core.voting import VoteModel
from markovscale_dspy.integrations.mlflow import autolog_compile, follow_autolog
from markovscale_dspy.refine.logprobs import LOGPROBS_FIELD
from markovscale_dspy.refine.loop import Outcome, describe, error_kind, unrecoverable
from markovscale_dspy.refine.markov_refine import MAX_ROUNDS_LIMIT, MarkovRefine
from markovscale_dspy.refine.sampling import MAX_SAMPLES, afresh_sample, fresh_sample, has_pinned_lm, sample_rollout
from markovscale_dspy.spending import DollarCap, SpendingStopped, cap_reached, dollar_cap
from markovscale_dspy.tracing import carry_context, span
from markovscale_dspy.usage import Usage, measure_usage

__all__ = ["MarkovCalibrator", "fit_chains"]

logger = logging.getLogger(__name__)

#: Fewer labelled examples than this cannot inform the chain at all.
MIN_TRAINSET = 2

#: ``question_types="auto"`` looks for latent types only with at least this many calibration chains.
MIN_CHAINS_FOR_TYPES = 100

#: Parametric-bootstrap refits of the vote model (its prediction intervals).
VOTE_BOOTSTRAP = 200


class MarkovCalibrator(Teleprompter):
    """Learn when refinement pays: run full refinement chains on a labelled trainset and fit the Markov chain.

    ``compile(student, trainset=...)`` runs round 0 plus ``rounds`` refinements on every example (no early
    stopping, so every transition is observed), labels each round with ``metric(example, prediction)``, fits a
    :class:`TransitionModel` and returns a calibrated copy of the student (the student is left untouched). The
    calibrator keeps a :class:`CalibrationReport` in ``self.report``.

    With ``parallel_samples=K`` it also draws ``K`` independent round-0 samples of every example (each its own
    rollout id, at the student's temperature, concurrently with the chains and resumable like them), grades them
    and fits a :class:`~markovscale_dspy.core.voting.VoteModel` -- how accuracy varies over questions and how wrong
    answers agree -- which :class:`MarkovScale` plans votes from. The student may be a :class:`MarkovRefine` or a
    :class:`MarkovScale` (which gets ``K = 8`` samples unless told otherwise).

    Calibrate with the LM, temperature and adapter you will use at inference: the transition rates belong to that
    decoding setup. Run prompt optimizers (which reset parameters) before calibrating, not after.

    Args:
        metric: ``metric(example, prediction, trace=None)`` returning a bool, a number (compared with
            ``threshold``) or a Prediction with ``.score``.
        rounds: Refinement rounds per calibration chain; ``None`` (default) uses the student's ``max_rounds``
            (``max_calls - 1`` for a MarkovScale). A different number warns: rates fitted on fewer rounds than the
            module runs are extrapolated.
        parallel_samples: Independent round-0 samples per example for the vote model (0: none, else at least 2);
            ``None`` (default): 8 for a MarkovScale, 0 for a MarkovRefine.
        num_threads: Threads for DSPy's parallel executor (defaults to ``dspy.settings.num_threads``).
        prior: ``(alpha, beta)`` of the Beta prior on each parameter.
        threshold: A numeric score counts as correct when it is at least this. ``None`` (default) accepts only
            all-or-nothing scores (bools, 1/0) and raises ConfigurationError on a partial score such as 0.8.
        question_types: Latent question types to fit (a mixture of chains, by EM) for the belief policy:
            ``"auto"`` chooses 1-4 by 5-fold held-out likelihood (with at least 100 chains), an integer forces it,
            1 turns it off.
        resume: Reuse finished chains from the trace store (``False``: recompute every chain, like ``--fresh``).
        trace_dir: Where finished chains are stored (default ``$MARKOVSCALE_TRACE_DIR`` or
            ``~/.cache/markovscale/traces``).
        store_traces: Write finished chains to the store at all.
        trace_key: Names the LM for the trace store when it has no identity of its own (``DummyLM``, a custom
            ``BaseLM``, an engine without ``fingerprint``). Without it such calibrations neither store nor reuse
            chains: two different LMs must never share them.
        display_progress: Show a progress bar.
        max_errors: Errors (a round 0 that raises or does not parse, a metric that raises; a failed parallel sample
            is data: it does not vote) after which calibration stops with a CalibrationError listing them;
            ``None``: DSPy's ``max_errors`` setting.
            An LM failure no retry can mend (rejected key, unknown model, invalid request, prompt over the context
            window) stops it at the first occurrence. Either way nothing more is paid for, and finished chains stay
            in the trace store.
        max_dollars: A hard cap on what the calibration spends: before each LM call its worst case (every prompt
            byte a token, plus ``max_tokens`` of completion, at the model's price) must fit in what is left, or the
            call is not made and no new chain starts. The model is fitted on the chains that finished (a warning
            says how many); they are stored, so a re-run with a larger cap pays only for the rest. The report's
            ``dollar_cap`` says what was spent and left. Needs a price for every LM (LiteLLM's cost map or
            ``register_price``) and ``max_tokens`` on each.

    Round-0 failures the calibration survives are scored as ``dspy.Evaluate`` scores them: the model keeps how
    many there were (``model.n0_failed``), ``model.expected_accuracy(t)`` counts them as wrong, the report shows the
    rate beside ``p0``, and a warning names the commonest error.

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
        rounds: int | None = None,
        parallel_samples: int | None = None,
        num_threads: int | None = None,
        prior: tuple[float, float] = (1.0, 1.0),
        threshold: float | None = None,
        question_types: int | str = "auto",
        resume: bool = True,
        trace_dir: str | os.PathLike | None = None,
        store_traces: bool = True,
        display_progress: bool = False,
        trace_key: str | None = None,
        max_errors: int | None = None,
        max_dollars: float | None = None,
    ):
        super().__init__()
        # Validate and store each argument as given (a bad value fails here, not an hour into a calibration).
        self.metric = check_metric(metric)
        self.rounds = check_int("rounds", rounds, 1, MAX_ROUNDS_LIMIT, none_ok=True)
        self.parallel_samples = check_int("parallel_samples", parallel_samples, 0, MAX_SAMPLES, none_ok=True)
        if parallel_samples == 1:
            raise ConfigurationError(
                "parallel_samples=1 cannot tell how accuracy varies between questions; draw at least 2 (e.g. 8), "
                "or 0 for none"
            )
        self.num_threads = check_int("num_threads", num_threads, 1, none_ok=True)
        self.prior = check_prior(prior)
        self.threshold = check_number("threshold", threshold, none_ok=True)
        self.question_types = (
            question_types if question_types == "auto" else check_int("question_types", question_types, 1, 8)
        )
        self.resume = resume
        self.trace_dir = trace_dir
        self.store_traces = store_traces
        self.display_progress = display_progress
        self.trace_key = trace_key
        self.max_errors = check_int("max_errors", max_errors, 1, none_ok=True)
        self.max_dollars = check_number("max_dollars", max_dollars, 0, none_ok=True, unit="dollars")
        self.report: CalibrationReport | None = None

    def compile(
        self,
        student: Calibratable,
        *,
        trainset: Sequence[dspy.Example],
        valset: Sequence[dspy.Example] | None = None,
        **kwargs: Any,
    ) -> Calibratable:
        """Calibrate a copy of ``student`` on ``trainset``; ``valset`` (optional) is only evaluated for the report.

        Raises:
            ConfigurationError: ``student`` is not a MarkovRefine or MarkovScale.
            DataError: the trainset is empty or its examples lack inputs or labels.
            CalibrationError: no chain could be observed (every round 0 or every metric call failed), or no
                sample could be graded when samples were asked for.
        """
        job = self._prepare(student, trainset)
        with job.observing():
            records, store_dir = self._observe(job)
        return self._conclude(job, records, store_dir, valset)

    async def acompile(
        self,
        student: Calibratable,
        *,
        trainset: Sequence[dspy.Example],
        valset: Sequence[dspy.Example] | None = None,
        concurrency: int | None = None,
    ) -> Calibratable:
        """Async twin of :meth:`compile`: chains and samples run as asyncio tasks through the LMs' async clients,
        at most ``concurrency`` at once (default ``num_threads``, else ``dspy.settings.num_threads``) -- for hosted
        APIs and server fleets, where the client, not the server, limits how many calls are in flight. Resumes
        from the trace store, stops, caps and reports exactly as :meth:`compile` (the valset, if any, is evaluated
        with threads)."""
        width = check_int("concurrency", concurrency, 1, none_ok=True) or self.num_threads or dspy.settings.num_threads
        # MLflow's autolog patches compile only: do here what its patch does there (a run, compile-time tracing).
        with autolog_compile(type(self).__name__):
            job = self._prepare(student, trainset)
            with job.observing():
                records, store_dir = await self._aobserve(job, width)
            return self._conclude(job, records, store_dir, valset)

    def _prepare(self, student: Calibratable, trainset: Sequence[dspy.Example]) -> _Job:
        """Check the student and the trainset, copy the student, and set up what the run shares."""
        self.report = None  # a failed compile must not leave the previous run's report behind
        started = time.perf_counter()
        chains = _check_student(student).chain_module()
        examples = check_examples(trainset, chains, "trainset")
        rounds, samples = self._rounds_for(chains), self._samples_for(student)
        program = student.deepcopy()  # the student stays untouched
        refine = program.chain_module()
        return _Job(
            started=started,
            chains=chains,
            examples=examples,
            rounds=rounds,
            samples=samples,
            program=program,
            refine=refine,
            guard=RunGuard(self.max_errors or dspy.settings.max_errors),
            cap=DollarCap.for_module(self.max_dollars, refine, refine.refiner_lm),
        )

    def _conclude(
        self, job: _Job, records: list[ChainRecord], store_dir: str | None, valset: Sequence[dspy.Example] | None
    ) -> Calibratable:
        """Fit what was observed, record it on the program, report it (or say why not)."""
        rounds, samples, cap, refine, program = job.rounds, job.samples, job.cap, job.refine, job.program
        if cap is not None and cap.exhausted:
            _warn_capped(cap, records)
        _check_metric_scores(records)
        try:
            job.guard.check(len(job.examples))
        except (CalibrationError, ConfigurationError):
            # what the finished chains measured stays readable (calibrator.report.failures) after a stopped run
            seconds = time.perf_counter() - job.started
            self.report = self._partial_report(records, rounds, samples, seconds, store_dir, cap)
            raise
        model = self._fit(records, rounds, samples)
        model = model.with_round0_failures(_warn_round0_failures(records))
        refine.record_calibration(model, spend=spend_of(records))
        lms = refine.markov.calibrated_for

        def report(valset_result: dict[str, Any] | None = None, plan: Any = None) -> CalibrationReport:
            seconds = time.perf_counter() - job.started
            return _with_cap(
                build_report(model, records, rounds, seconds, valset_result, store_dir, lms, plan=plan), cap
            )

        if model.n_transitions == 0:
            self.report = report()
            raise CalibrationError(_no_transition_message(records))
        valset_result = None
        if valset:
            valset_result = _evaluate(
                program, check_examples(valset, job.chains, "valset"), self.metric, self.threshold, self.num_threads
            )
        self.report = report(valset_result, program.calibration_plan())
        logger.info("MarkovCalibrator: %r", model)
        _publish(self, self.report)
        return program

    def _partial_report(
        self,
        records: list[ChainRecord],
        rounds: int,
        samples: int,
        seconds: float,
        store_dir: str | None,
        cap: DollarCap | None = None,
    ) -> CalibrationReport | None:
        """The report of a stopped calibration, fitted on the chains it finished (None if none is usable)."""
        try:
            model = self._fit(records, rounds, samples).with_round0_failures(
                sum(r.failure is not None and not r.skipped for r in records)
            )
        except (CalibrationError, ValueError):
            return None
        return _with_cap(build_report(model, records, rounds, seconds, None, store_dir), cap)

    def _fit(self, records: list[ChainRecord], rounds: int, samples: int) -> TransitionModel:
        """The chain (and the vote model, with samples) from the observed chains."""
        reused = sum(r.reused for r in records)
        logger.info("MarkovCalibrator: %d of %d chains reused from the trace store", reused, len(records))
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
        confidences = [r.observed_confidences() for r, c in zip(records, observed, strict=True) if c]
        model = fit_chains(
            labels, answers, confidences, rounds=rounds, prior=self.prior, question_types=self.question_types
        )
        return model.with_votes(self._votes(records)) if samples else model

    def _samples_for(self, student: Calibratable) -> int:
        if self.parallel_samples is None:
            return student.default_parallel_samples
        if self.parallel_samples == 0 and student.default_parallel_samples > 0:
            warn(
                f"MarkovCalibrator(parallel_samples=0) calibrates a {type(student).__name__} without samples, so it "
                "can only plan a single call or refinement; draw samples (e.g. parallel_samples=8) to consider votes",
            )
        return self.parallel_samples

    def _votes(self, records: list[ChainRecord]) -> VoteModel:
        graded = [r.graded_samples() for r in records]
        if sum(len(g) >= 2 for g in graded) == 0:
            reasons = Counter(
                (s.get("error") or s.get("metric_error") or "").split(":", 1)[0] for r in records for s in r.samples
            )
            raise CalibrationError(
                "no trainset example has two graded samples, so the vote model cannot be fitted (sample failures: "
                f"{dict(reasons)}); fix the LM or the metric and re-run (finished samples come from the trace store)"
            )
        return VoteModel.fit(graded, bootstrap=VOTE_BOOTSTRAP, seed=0)

    def _rounds_for(self, student: MarkovRefine) -> int:
        """Chain length: ``rounds`` if given (warning when it differs from the student's cap), else the cap."""
        if self.rounds is None:
            if student.max_rounds < 1:
                raise ConfigurationError(
                    "the student has max_rounds=0, so there is no refinement to calibrate; give "
                    "MarkovCalibrator(rounds=...) or build MarkovRefine(program, max_rounds=...) with max_rounds >= 1"
                )
            return student.max_rounds
        if self.rounds != student.max_rounds:
            warn(
                f"MarkovCalibrator(rounds={self.rounds}) calibrates chains of a different length than the "
                f"student's max_rounds={student.max_rounds}; "
                + (
                    "rounds beyond the calibrated ones are extrapolated by the homogeneous chain"
                    if self.rounds < student.max_rounds
                    else "the extra calibrated rounds are never run"
                )
                + ". Leave rounds=None to calibrate exactly the rounds the module can run",
            )
        return self.rounds

    def _start_run(self, job: _Job) -> tuple[list[tuple[int, dspy.Example, int | None]], ChainRun]:
        """One job per chain and one per sample (so samples run as concurrently as chains), and what they share."""
        program, examples, rounds = job.refine, job.examples, job.rounds
        jobs = [(i, example, None) for i, example in enumerate(examples)]
        jobs += [(i, example, j) for j in range(job.samples) for i, example in enumerate(examples)]
        store = (
            TraceStore(self.trace_dir) if self.store_traces and self._identifiable(program, rounds, examples) else None
        )
        run = ChainRun(
            program=program,
            store=store,
            guard=job.guard,
            pinned=has_pinned_lm(program.program),  # once: walking the program costs as much as its history
            types={name: f.annotation for name, f in program.signature.output_fields.items()},
        )
        return jobs, run

    def _observe(self, job: _Job) -> tuple[list[ChainRecord], str | None]:
        jobs, run = self._start_run(job)
        executor = ParallelExecutor(
            num_threads=self.num_threads, max_errors=len(jobs) + 1, disable_progress_bar=not self.display_progress
        )

        def work(item: tuple[int, dspy.Example, int | None]) -> Any:
            index, example, sample = item
            with _job_span(index, sample):
                if sample is None:
                    return self._chain(run, job.rounds, index, example)
                return self._sample(run, index, example, sample)

        try:
            results = executor.execute(carry_context(work), jobs)
        finally:
            if run.store is not None:
                run.store.close()
        return self._collect(job, jobs, results, run)

    async def _aobserve(self, job: _Job, concurrency: int) -> tuple[list[ChainRecord], str | None]:
        jobs, run = self._start_run(job)
        gate = asyncio.Semaphore(concurrency)

        async def work(item: tuple[int, dspy.Example, int | None]) -> Any:
            index, example, sample = item
            async with gate:
                try:
                    with _job_span(index, sample):
                        if sample is None:
                            return await self._achain(run, job.rounds, index, example)
                        return await self._asample(run, index, example, sample)
                except Exception as exc:  # as DSPy's executor does for compile: the job's record says it failed
                    logger.error("MarkovCalibrator: a calibration job failed: %s", describe(exc))
                    return exc

        tasks = [asyncio.ensure_future(work(item)) for item in jobs]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # cancelled from outside: nothing may still write to the store once it closes
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if run.store is not None:
                run.store.close()
        return self._collect(job, jobs, results, run)

    def _collect(
        self, job: _Job, jobs: list[tuple[int, dspy.Example, int | None]], results: list[Any], run: ChainRun
    ) -> tuple[list[ChainRecord], str | None]:
        """Each chain's record with its samples, in trainset order; what could not be stored or reused, said."""
        n = len(job.examples)
        # The workers never raise, but the executor may still return None (cancelled) or an exception object.
        records = [
            r if isinstance(r, ChainRecord) else ChainRecord(index=i, failure=f"executor: {r!r}")
            for (i, _, _), r in zip(jobs[:n], results[:n], strict=True)
        ]
        for (i, _, j), r in zip(jobs[n:], results[n:], strict=True):
            records[i].samples.append(
                r if isinstance(r, dict) else {"sample": j, "label": None, "answer": None, "error": f"executor: {r!r}"}
            )
        for record in records:
            record.samples.sort(key=lambda s: s["sample"])
        if run.refits:
            logger.warning(
                "MarkovCalibrator: %d stored chains no longer fit the program's output types and were paid for again "
                "(%s)",
                len(run.refits),
                run.refits[0],
            )
        if run.unstored:
            reason = Counter(run.unstored).most_common(1)[0][0]
            logger.warning(
                "MarkovCalibrator: %d finished chains or samples could not be stored for resuming, so a re-run pays "
                "for them again (%s); make the program's outputs JSON-serialisable by pydantic",
                len(run.unstored),
                reason,
            )
        return records, None if run.store is None else str(run.store.directory)

    def _sample(self, run: ChainRun, index: int, example: dspy.Example, sample: int) -> dict[str, Any]:
        """Worker: independent round-0 sample ``sample`` of one example, graded. Pure, like :meth:`_chain`."""
        if run.guard.stopped or cap_reached():
            return _skipped_sample(sample)
        key = self._key(run, index, example, 0, sample=sample)
        stored = self._reused(run, key)
        if stored is None:
            with dspy.context(trace=[]):
                outcome = fresh_sample(run.program.program, dict(example.inputs()), **_sampling(run, sample))
            return self._graded_sample(run, example, sample, self._sample_ran(run, key, outcome), reused=False)
        return self._graded_sample(run, example, sample, stored[0], reused=True)

    async def _asample(self, run: ChainRun, index: int, example: dspy.Example, sample: int) -> dict[str, Any]:
        """Async twin of :meth:`_sample`."""
        if run.guard.stopped or cap_reached():
            return _skipped_sample(sample)
        key = self._key(run, index, example, 0, sample=sample)
        stored = self._reused(run, key)
        if stored is None:
            with dspy.context(trace=[]):
                outcome = await afresh_sample(run.program.program, dict(example.inputs()), **_sampling(run, sample))
            return self._graded_sample(run, example, sample, self._sample_ran(run, key, outcome), reused=False)
        return self._graded_sample(run, example, sample, stored[0], reused=True)

    def _sample_ran(self, run: ChainRun, key: str | None, outcome: Outcome) -> dict[str, Any]:
        """A sample just drawn, as the store keeps it (stored, unless a service failure lost it)."""
        entry = _sample_entry(run.program, outcome)
        if outcome.error is not None and unrecoverable(outcome.error) is not None:
            _count_error(run.guard, outcome.error)  # a failed sample is data (it does not vote), a bad key is not
        self._store(run, key, [entry])
        return entry

    def _graded_sample(
        self, run: ChainRun, example: dspy.Example, sample: int, entry: dict[str, Any], *, reused: bool
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sample": sample,
            "label": None,
            "answer": entry["answer_key"],
            "error": entry["error"],
            "usage": entry.get("usage") or {},
            "reused": reused,
        }
        if entry["error"] is None:
            try:
                out["label"] = score_to_label(self.metric(example, dspy.Prediction(**entry["outputs"])), self.threshold)
            except Exception as exc:  # reported with the record and counted against max_errors
                out["metric_error"] = describe(exc)
                run.guard.error(f"metric: {describe(exc)}")
        return out

    def _key(
        self, run: ChainRun, index: int, example: dspy.Example, rounds: int, sample: int | None = None
    ) -> str | None:
        if run.store is None:
            return None
        try:
            return chain_key(run.program, rounds, example, self.trace_key, sample=sample)
        except Exception as exc:  # the store is an optimisation: without a key, just run the chain
            logger.warning("trace store disabled for example %d: %s", index, describe(exc))
            return None

    def _reused(self, run: ChainRun, key: str | None) -> list[dict[str, Any]] | None:
        """The stored trajectory under ``key`` with its outputs' types restored, or ``None`` (not stored, not
        resuming, or stored by a program whose output types changed)."""
        if key is None or not self.resume:
            return None
        trajectory = run.store.get(key)
        if trajectory is None:
            return None
        try:
            return [
                {**e, "outputs": restore_outputs(e["outputs"], run.types) if e.get("outputs") is not None else None}
                for e in trajectory
            ]
        except (ValueError, TypeError, KeyError) as exc:
            run.refits.append(describe(exc))
            return None

    def _store(self, run: ChainRun, key: str | None, trajectory: list[dict[str, Any]]) -> None:
        # Only chains that are the model's own behaviour are remembered; a round lost to a service failure
        # (timeout, rate limit, dead server, rejected key) is recomputed by the next run.
        if key is None or any(e.get("error_kind") not in (None, "parse", "empty") for e in trajectory):
            return
        reason = run.store.put(key, trajectory)
        if reason is not None:
            run.unstored.append(reason)

    def _identifiable(self, program: MarkovRefine, rounds: int, examples: list[dspy.Example]) -> bool:
        """Whether chains can be keyed by the LM's identity (else they are neither stored nor reused)."""
        try:
            chain_key(program, rounds, examples[0], self.trace_key)
        except UnknownLMIdentityError as exc:
            logger.warning(
                "MarkovCalibrator: finished chains are not stored or reused, because %s; pass "
                "MarkovCalibrator(trace_key='...') naming the LM to make them resumable",
                exc,
            )
            return False
        except Exception:  # any other key failure is handled per example
            pass
        return True

    def _chain(self, run: ChainRun, rounds: int, index: int, example: dspy.Example) -> ChainRecord:
        """Worker: one full chain and its labels. Pure (returns its record) because the executor may re-run it;
        the store write is idempotent (same key, same chain)."""
        record, key, trajectory = self._chain_start(run, rounds, index, example)
        if trajectory is None and not record.skipped:
            usage, prediction, error = Usage(), None, None
            try:
                with dspy.context(trace=[]), measure_usage() as usage:
                    prediction = run.program.run_chain(rounds, **example.inputs())
            except Exception as exc:
                error = exc
            trajectory = self._chain_ran(run, record, key, prediction, error, usage)
        return self._chain_end(run, record, example, trajectory)

    async def _achain(self, run: ChainRun, rounds: int, index: int, example: dspy.Example) -> ChainRecord:
        """Async twin of :meth:`_chain`."""
        record, key, trajectory = self._chain_start(run, rounds, index, example)
        if trajectory is None and not record.skipped:
            usage, prediction, error = Usage(), None, None
            try:
                with dspy.context(trace=[]), measure_usage() as usage:
                    prediction = await run.program.arun_chain(rounds, **example.inputs())
            except Exception as exc:
                error = exc
            trajectory = self._chain_ran(run, record, key, prediction, error, usage)
        return self._chain_end(run, record, example, trajectory)

    def _chain_start(
        self, run: ChainRun, rounds: int, index: int, example: dspy.Example
    ) -> tuple[ChainRecord, str | None, list[dict[str, Any]] | None]:
        """A chain's record, its store key and its stored trajectory (``None``: run it, unless the record says it
        was skipped because the calibration had stopped)."""
        record = ChainRecord(index=index)
        if run.guard.stopped or cap_reached():
            record.failure, record.skipped = SKIPPED, True
            return record, None, None
        key = self._key(run, index, example, rounds)
        trajectory = self._reused(run, key)
        record.reused = trajectory is not None
        return record, key, trajectory

    def _chain_end(
        self, run: ChainRun, record: ChainRecord, example: dspy.Example, trajectory: list[dict[str, Any]] | None
    ) -> ChainRecord:
        if trajectory is not None:
            self._label(record, example, trajectory, run.guard)
        return record

    def _chain_ran(
        self,
        run: ChainRun,
        record: ChainRecord,
        key: str | None,
        prediction: Any,
        error: BaseException | None,
        usage: Usage,
    ) -> list[dict[str, Any]] | None:
        """The trajectory of a chain just run, stored (``None``, with the failure on ``record``, if round 0 failed)."""
        if error is not None:
            cause = error.__cause__ if isinstance(error, RoundZeroError) and error.__cause__ else error
            record.failure = describe(cause)
            record.usage = usage.to_dict()
            if isinstance(cause, SpendingStopped):  # the cap refused round 0: not an error, and nothing paid
                record.skipped = True
            else:
                _count_error(run.guard, error)
            return None
        # Token log-probabilities are summarised by each round's confidence; the store keeps that, not them.
        trajectory = [
            {
                **entry,
                "outputs": {k: v for k, v in entry["outputs"].items() if k != LOGPROBS_FIELD},
                "answer_key": jsonable(entry["answer_key"]),
            }
            for entry in prediction.markovscale.trajectory
        ]
        for entry in trajectory:
            if entry.get("error_kind") == "fatal":
                run.guard.fatal(f"refinement round {entry['round']}: {entry['error']}", entry.get("fix", ""))
        self._store(run, key, trajectory)
        return trajectory

    def _label(
        self, record: ChainRecord, example: dspy.Example, trajectory: list[dict[str, Any]], guard: RunGuard
    ) -> None:
        usage = Usage()
        for entry in trajectory:
            spent = Usage.from_dict(entry.get("usage"))
            usage = usage + spent
            record.round_usage.append(spent.to_dict())
            record.errors.append(entry["error"])
            record.answers.append(jsonable(entry["answer_key"]))
            record.confidences.append(entry.get("confidence") if entry["error"] is None else None)
            label = None
            if entry["error"] is None and record.metric_error is None:
                try:
                    label = score_to_label(self.metric(example, dspy.Prediction(**entry["outputs"])), self.threshold)
                except Exception as exc:  # reported per example and counted against max_errors
                    record.metric_error = describe(exc)
                    guard.error(f"metric: {describe(exc)}")
            record.labels.append(label)
        record.usage = usage.to_dict()


#: Called with ``(calibrator, report)`` after each calibration. The package registers its MLflow logger here
#: (``markovscale_dspy/__init__.py``), so this layer never imports the layers that render reports.
REPORT_SINKS: list[Callable[[MarkovCalibrator, CalibrationReport], Any]] = []


def _publish(calibrator: MarkovCalibrator, report: CalibrationReport) -> None:
    """Hand the report to every sink; a sink that fails is said, and the calibration is kept."""
    for sink in REPORT_SINKS:
        try:
            sink(calibrator, report)
        except Exception as exc:
            logger.warning("MarkovCalibrator: the calibration could not be logged by %s: %s", sink, describe(exc))


def _warn_capped(cap: DollarCap, records: list[ChainRecord]) -> None:
    finished = sum(r.failure is None and all(e is None for e in r.errors) for r in records)
    warn(
        f"calibration stopped at max_dollars={cap.max_dollars:g}: {finished} of {len(records)} chains finished "
        f"(${cap.spent:.4f} spent, ${max(cap.max_dollars - cap.spent, 0.0):.4f} left); the model is fitted on what "
        "finished, which is stored, so a re-run with a larger max_dollars pays only for the rest"
    )


def _with_cap(report: CalibrationReport, cap: DollarCap | None) -> CalibrationReport:
    if cap is not None:
        report.dollar_cap = cap.to_dict()
    return report


#: Why a chain or sample did not run: the calibration had already stopped.
SKIPPED = "skipped: the calibration stopped"


@dataclass
class _Job:
    """One calibration: what it was given and what its workers share, from the checks to the report."""

    started: float
    chains: MarkovRefine
    examples: list[dspy.Example]
    rounds: int
    samples: int
    program: Calibratable
    refine: MarkovRefine
    guard: RunGuard
    cap: DollarCap | None

    @contextmanager
    def observing(self) -> Iterator[None]:
        """While the chains run: one trace where the user traces optimizers, and the dollar cap in force."""
        attributes = {"examples": len(self.examples), "rounds": self.rounds}
        with span("MarkovCalibrator.compile", lambda: attributes, root="compile"), dollar_cap(self.cap):
            yield


def _job_span(index: int, sample: int | None) -> Any:
    if sample is None:
        return span(f"chain {index}", lambda: {"chain": index})
    return span(f"sample {sample} of chain {index}", lambda: {"chain": index, "sample": sample})


def _skipped_sample(sample: int) -> dict[str, Any]:
    return {"sample": sample, "label": None, "answer": None, "error": SKIPPED, "usage": {}, "skipped": True}


def _sampling(run: ChainRun, sample: int) -> dict[str, Any]:
    """How sample ``sample`` is drawn: its own rollout id, the module's temperature (as MarkovScale draws it)."""
    program = run.program
    return {
        "rollout": sample_rollout(program.rollout_seed, sample),
        "temperature": program.temperature,
        "pinned": run.pinned,
    }


@dataclass
class ChainRun:
    """What the workers of one calibration share."""

    program: MarkovRefine
    store: TraceStore | None
    guard: RunGuard
    pinned: bool
    types: dict[str, Any]
    unstored: list[str] = field(default_factory=list)
    refits: list[str] = field(default_factory=list)


def _count_error(guard: RunGuard, error: BaseException) -> None:
    """A failed round 0 or sample: an unrecoverable LM failure stops the calibration, anything else counts."""
    fix = unrecoverable(error)
    cause = error.__cause__ if isinstance(error, RoundZeroError) and error.__cause__ is not None else error
    if fix is not None:
        guard.fatal(describe(cause), fix)
    else:
        guard.error(describe(cause))


def _sample_entry(program: MarkovRefine, outcome: Any) -> dict[str, Any]:
    """A sample as the trace store keeps it (the shape of a chain's round-0 entry)."""
    usage = outcome.usage or {}
    error = outcome.error
    outputs = None
    if error is None:
        try:
            outputs = dict(outcome.prediction.items())
        except AttributeError:
            error = TypeError(f"the program returned {type(outcome.prediction).__name__}, not a dspy.Prediction")
    if error is None:
        answer = {name: outputs.get(name) for name in program.answer_fields}
        if is_empty_answer(answer):
            return {
                "outputs": None,
                "answer_key": None,
                "error": "EmptyAnswerError",
                "error_kind": "empty",
                "usage": usage,
            }
        key = (program.answer_key or default_answer_key)(answer)
        return {"outputs": outputs, "answer_key": jsonable(key), "error": None, "usage": usage}
    return {
        "outputs": None,
        "answer_key": None,
        "error": describe(error),
        "error_kind": error_kind(error),
        "usage": usage,
    }


@runtime_checkable
class Calibratable(Protocol):
    """What MarkovCalibrator needs from a student (MarkovRefine and MarkovScale both provide it).

    ``chain_module()`` is the MarkovRefine whose chains are run and which records the calibration;
    ``default_parallel_samples`` the independent samples per question drawn unless the calibrator is told otherwise
    (0 for a module that plans no votes); ``calibration_plan()`` what the calibrated module will do, for the report
    (``None`` when there is nothing to plan).
    """

    default_parallel_samples: int

    def chain_module(self) -> MarkovRefine: ...

    def calibration_plan(self) -> Any: ...

    def deepcopy(self) -> Any: ...


def _check_student(student: Any) -> Calibratable:
    if not isinstance(student, Calibratable):
        raise ConfigurationError(
            f"MarkovCalibrator calibrates a MarkovRefine, got {type(student).__name__}; wrap your program: "
            "MarkovRefine(program) (or MarkovScale(program) to plan votes too)"
        )
    return student


def check_metric(metric: Any) -> Callable[..., Any]:
    """``metric`` if DSPy's way of calling a metric, ``metric(example, prediction)`` (with ``trace=None`` allowed),
    fits its signature; else a ConfigurationError naming the metric and the fix, before any LM call is paid for.

    Example:
        >>> check_metric(lambda example, pred, trace=None: True) is not None
        True
        >>> check_metric(lambda gold, pred, trace, pred_name, pred_trace: 1.0)
        Traceback (most recent call last):
        ...
        markovscale_dspy.ConfigurationError: the metric <lambda>(gold, pred, trace, pred_name, pred_trace) ...
    """
    check_callable("metric", metric, "metric(example, prediction, trace=None)")
    try:
        signature = inspect.signature(metric)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check
        return metric
    try:
        signature.bind(None, None)
    except TypeError as exc:
        name = getattr(metric, "__qualname__", None) or type(metric).__name__
        required = [
            p.name
            for p in signature.parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        hint = (
            "this is GEPA's feedback-metric form: give the arguments after the prediction defaults, e.g. "
            "def metric(gold, pred, trace=None, pred_name=None, pred_trace=None)"
            if len(required) > 2
            else "DSPy passes the example and the prediction: def metric(example, pred, trace=None)"
        )
        raise ConfigurationError(
            f"the metric {name}{signature} cannot be called as DSPy calls a metric, metric(example, prediction) "
            f"({exc}); {hint}"
        ) from None
    return metric


def _warn_round0_failures(records: list[ChainRecord]) -> int:
    """Say how many chains' round 0 gave no answer and the commonest error; return how many."""
    failed = [r.failure for r in records if r.failure is not None and not r.skipped]
    if failed:
        error, count = Counter(failed).most_common(1)[0]
        warn(
            f"round 0 gave no answer on {len(failed)} of {len(records)} calibration questions (commonest: {count}x "
            f"{error}); they are scored as wrong, as dspy.Evaluate scores them (model.expected_accuracy, the "
            "report's answer rate), and p0, p_cw, p_wc describe the answered questions"
        )
    return len(failed)


def _check_metric_scores(records: list[ChainRecord]) -> None:
    """A metric that gives partial credit needs a threshold: say so before fitting anything."""
    errors = [r.metric_error for r in records] + [s.get("metric_error") for r in records for s in r.samples]
    partial = next((e for e in errors if e and PARTIAL_SCORE in e), None)
    if partial is not None:
        raise ConfigurationError(
            f"the metric gives partial credit ({partial.split(': ', 1)[-1]}). The finished chains are kept in "
            "the trace store, so re-running with a threshold costs no LM call"
        )


def _no_transition_message(records: list[ChainRecord]) -> str:
    errors = Counter(e.split(":", 1)[0] for r in records for e in r.errors if e)
    return (
        "no refinement round succeeded, so p_cw and p_wc cannot be estimated "
        f"(failed rounds: {dict(errors) or 'none run'}); fix the refiner's LM and re-run (chains lost to LM "
        "errors are recomputed, the others come from the trace store). The partial report is in "
        "calibrator.report"
    )


def fit_chains(
    labels: Sequence[Sequence[bool]],
    answers: Sequence[Sequence[Any]],
    confidences: Sequence[Sequence[float | None]] | None = None,
    *,
    rounds: int,
    prior: tuple[float, float] = (1.0, 1.0),
    question_types: int | str = "auto",
) -> TransitionModel:
    """The model MarkovCalibrator fits to labelled chains: the chain, answer emissions, the confidence emission
    (when the answers carry confidence that says something) and question types.

    Args:
        labels: Per chain, the correctness of every round that produced an answer.
        answers: Per chain, the answer identity of those rounds.
        confidences: Per chain, their confidence (``None`` where a round had none), or ``None``.
        rounds: Refinement rounds the chains were run for (types need at least 2).
        prior: Beta prior of every rate.
        question_types: ``"auto"`` (1-4 by held-out likelihood, with at least 100 chains), or a fixed number.
    """
    has_confidence = confidences is not None and any(x is not None for chain in confidences for x in chain)
    model = TransitionModel.fit(
        labels, prior=prior, answers=answers, confidences=confidences if has_confidence else None
    )
    n_bins = model.confidence.bins if model.confidence is not None else 0
    bins = [model.confidence_bins(chain) for chain in confidences] if n_bins else None
    stats = chain_statistics(labels, answers, bins, n_bins)
    if question_types == "auto":
        if len(labels) < MIN_CHAINS_FOR_TYPES or rounds < 2:
            return model  # too little data to tell types apart
        mixture = select_mixture(stats, prior=prior)
    elif question_types == 1:
        return model
    else:
        mixture = fit_mixture(stats, question_types, prior=prior)
    return model.with_mixture(mixture if mixture.components > 1 else None)


def check_examples(dataset: Any, student: MarkovRefine, name: str) -> list[dspy.Example]:
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
    """The calibrated module on the valset, scored as ``dspy.Evaluate`` scores it: a question that fails is wrong
    (its error is counted and named), so the accuracy is comparable with ``model.expected_accuracy``."""
    executor = ParallelExecutor(num_threads=num_threads, max_errors=len(examples) + 1, disable_progress_bar=True)

    def run(example: dspy.Example) -> tuple[bool, int] | str:
        try:
            pred = program(**example.inputs())
            return score_to_label(metric(example, pred), threshold), pred.markovscale.rounds
        except Exception as exc:
            return describe(exc)

    outcomes = [
        r if isinstance(r, (tuple, str)) else f"executor: {r!r}" for r in executor.execute(carry_context(run), examples)
    ]
    answered = [r for r in outcomes if isinstance(r, tuple)]
    errors = Counter(r for r in outcomes if isinstance(r, str))
    n, correct = len(outcomes), sum(ok for ok, _ in answered)
    return {
        "examples": len(examples),
        "answered": len(answered),
        "accuracy": correct / n if n else None,
        "interval": list(binomial_interval(correct, n)) if n else None,
        "mean_rounds": sum(r for _, r in answered) / len(answered) if answered else None,
        "failed": sum(errors.values()),
        "errors": dict(errors.most_common(3)),
    }


# MLflow's DSPy autolog patches the optimizers that exist when it runs: if it ran before this module was imported,
# extend it to MarkovCalibrator now (a no-op when MLflow is not loaded).
follow_autolog()
