"""RefinerOptimizer: a DSPy optimizer that tunes a MarkovRefine's refiner for where its chain converges."""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import dspy
import numpy as np
from dspy.teleprompt import Teleprompter
from dspy.utils.parallelizer import ParallelExecutor

from markovscale_dspy._exceptions import CalibrationError, ConfigurationError
from markovscale_dspy.calibrate.calibrator import SKIPPED, ChainRun, MarkovCalibrator, check_examples, check_metric
from markovscale_dspy.calibrate.guard import RunGuard
from markovscale_dspy.calibrate.records import ChainRecord
from markovscale_dspy.calibrate.refiner_report import RefinerReport, held_out_comparison
from markovscale_dspy.calibrate.report import CalibrationReport, build_report, spend_of
from markovscale_dspy.calibrate.traces import TraceStore, chain_key
from markovscale_dspy.core import theory
from markovscale_dspy.core.racing import (
    DEFAULT_DRAWS,
    RefinerCounts,
    RefinerValue,
    bootstrap_weights,
    chain_counts,
    gate,
    prob_at_least,
    prob_better,
    value_draws,
)
from markovscale_dspy.core.statistics import binomial_interval
from markovscale_dspy.core.validation import check_int, check_number, check_prior
from markovscale_dspy.refine.loop import describe
from markovscale_dspy.refine.markov_refine import MAX_ROUNDS_LIMIT, MarkovRefine, refiner_predict
from markovscale_dspy.refine.sampling import has_pinned_lm
from markovscale_dspy.refine.signatures import refinement_signature
from markovscale_dspy.spending import cap_reached
from markovscale_dspy.tracing import carry_context, span
from markovscale_dspy.usage import Usage, measure_usage

__all__ = ["VERIFY_FIRST", "RefinerOptimizer"]

logger = logging.getLogger(__name__)

#: The built-in challenger: check before touching, keep unless clearly wrong (a "verify first" refinement prompt
#: took GPT-4o-mini's break rate from 2% to 0%, arXiv 2604.22273).
VERIFY_FIRST = (
    "Verify first, then decide. You are given the task's inputs and a previous attempt's outputs (the fields "
    "starting with `previous_`). Work out the task yourself and compare your result with the previous attempt. "
    "Keep the previous answer unless you find a clear, specific error in it; only then replace it with the "
    "corrected answer. Always give complete outputs."
)

#: Trace-store tag of a candidate's chain: refinements continued from the shared round 0.
_CONTINUED = "refiner race: continued from the shared round 0"


class RefinerOptimizer(Teleprompter):
    """Choose a MarkovRefine's refinement instructions by the chain's own objective, not by one-shot accuracy.

    A refinement chain converges to ``p_wc / (p_cw + p_wc)``: a refiner that breaks fewer correct answers raises
    that bound and can turn a task where refinement hurts into one where it pays. ``compile(refine,
    trainset=...)`` races candidate instructions -- the module's own (the default), a built-in "verify first,
    keep unless clearly wrong" one, yours, and optionally some a reflection LM proposes through DSPy's GEPA
    instruction proposer from the transitions that broke or fixed answers -- and returns a calibrated copy with
    the winner.

    How it spends calls:

    * **Round 0 once.** Round-0 answers do not depend on the refiner, so each example's is drawn once and every
      candidate refines that same answer: candidates differ only in their refinement rounds (paired).
    * **A race.** Successive halving: every surviving candidate runs its chains on the same growing prefix of the
      (shuffled) trainset; after each rung the candidates the posterior says are worse than the leader
      (probability of beating it below ``drop_below``) go, and at most ``1/eta`` of the rest stay. The default
      always stays, to the end: it is what the winner must beat.
    * **Honest selection.** A candidate's worth is the expected accuracy at the rounds the closed-form rule plans
      from its estimates, minus ``round_cost`` per round, drawn from the Beta posteriors of its rates with the
      same ``p0`` draws for all (paired). The leader replaces the default only if the posterior probability that
      it is worth more reaches ``min_prob_better``, split over the challengers (Bonferroni: with 6 challengers,
      0.9 becomes 0.983 each), so picking the luckiest of several does not pass the gate by chance.

    Chains are stored like calibration chains (resumable; keyed by the candidate's instructions and the shared
    round 0). ``self.report`` lists every candidate (``p_cw``, ``p_wc``, bound, regime, calls, probability of
    beating the default) and the chains before and after.

    Args:
        metric: ``metric(example, prediction, trace=None)`` returning a bool, a number (see ``threshold``) or a
            Prediction with ``.score``.
        candidates: Refinement instructions to try (strings), beside the module's own.
        verify_first: Also try the built-in :data:`VERIFY_FIRST` instructions.
        reflection_lm: An LM that proposes ``proposals`` more instructions after the first rung, from the leader's
            transitions that broke a correct answer or fixed a wrong one (DSPy's GEPA ``InstructionProposer``).
        proposals: How many instructions the reflection LM proposes (needs ``reflection_lm``).
        rounds: Refinement rounds per chain (default: the module's ``max_rounds``).
        round_cost: Accuracy a round must add to be worth it (default: the module's stopping cost).
        min_prob_better: Posterior probability, over all challengers, that the chosen one beats the default.
        drop_below: A candidate whose probability of beating the leader falls below this leaves the race.
        eta: Successive halving keeps at most ``1/eta`` of the challengers at each rung.
        first_rung: Examples in the first rung (default: the trainset divided by ``eta`` once per halving, at
            least 20).
        num_threads: Threads for DSPy's parallel executor.
        prior: ``(alpha, beta)`` of the Beta prior on each rate.
        threshold: A numeric score counts as correct at or above this (see :class:`MarkovCalibrator`).
        question_types: Question types of the returned module's fitted chain (see :class:`MarkovCalibrator`).
        resume: Reuse finished chains from the trace store.
        trace_dir: Where finished chains are stored.
        store_traces: Write finished chains to the store at all.
        trace_key: Names an LM without an identity of its own for the trace store.
        max_errors: Errors after which the optimisation stops (default ``dspy.settings.max_errors``).
        seed: Order of the examples in the race and the posterior draws.

    Example:
        >>> import dspy
        >>> from markovscale_dspy import MarkovRefine, RefinerOptimizer
        >>> from markovscale_dspy.testing import SimulatedWorld
        >>> world = SimulatedWorld.homogeneous(
        ...     120, p0=0.6, p_cw=0.25, p_wc=0.3, seed=0, refiner_effects={"verify first": {"p_cw": 0.1}})
        >>> optimizer = RefinerOptimizer(world.metric, rounds=2, num_threads=1, store_traces=False)
        >>> with dspy.context(lm=world.lm()):
        ...     refine = optimizer.compile(MarkovRefine(dspy.Predict("question -> answer"), max_rounds=2),
        ...                                trainset=world.examples)
        >>> optimizer.report.chosen_source, refine.model.regime()
        ('verify_first', 'improving')
    """

    def __init__(
        self,
        metric: Callable[..., Any],
        *,
        candidates: Sequence[str] | None = None,
        verify_first: bool = True,
        reflection_lm: dspy.BaseLM | None = None,
        proposals: int = 0,
        rounds: int | None = None,
        round_cost: float | None = None,
        min_prob_better: float = 0.9,
        drop_below: float = 0.05,
        eta: int = 2,
        first_rung: int | None = None,
        num_threads: int | None = None,
        prior: tuple[float, float] = (1.0, 1.0),
        threshold: float | None = None,
        question_types: int | str = "auto",
        resume: bool = True,
        trace_dir: Any = None,
        store_traces: bool = True,
        trace_key: str | None = None,
        display_progress: bool = False,
        max_errors: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.metric = check_metric(metric)
        self.candidates = _check_candidates(candidates)
        self.verify_first = bool(verify_first)
        if reflection_lm is not None and not isinstance(reflection_lm, dspy.BaseLM):
            raise ConfigurationError(
                f"reflection_lm must be a dspy LM (e.g. dspy.LM('openai/gpt-4o')), got {reflection_lm!r}"
            )
        self.reflection_lm = reflection_lm
        self.proposals = check_int("proposals", proposals, 0, 16)
        if self.proposals and reflection_lm is None:
            raise ConfigurationError(
                f"proposals={proposals} needs a reflection_lm to write them: RefinerOptimizer(metric, "
                "reflection_lm=dspy.LM('...'), proposals=...)"
            )
        self.rounds = check_int("rounds", rounds, 1, MAX_ROUNDS_LIMIT, none_ok=True)
        self.round_cost = check_number(
            "round_cost", round_cost, 0, 1, hi_open=True, unit="accuracy per round", none_ok=True
        )
        self.min_prob_better = check_number("min_prob_better", min_prob_better, 0.5, 1, hi_open=True)
        self.drop_below = check_number("drop_below", drop_below, 0, 0.5)
        self.eta = check_int("eta", eta, 2, 8)
        self.first_rung = check_int("first_rung", first_rung, 2, none_ok=True)
        self.num_threads = check_int("num_threads", num_threads, 1, none_ok=True)
        self.prior = check_prior(prior)
        self.threshold = check_number("threshold", threshold, none_ok=True)
        self.question_types = question_types
        self.resume = resume
        self.trace_dir = trace_dir
        self.store_traces = store_traces
        self.trace_key = trace_key
        self.display_progress = display_progress
        self.max_errors = check_int("max_errors", max_errors, 1, none_ok=True)
        self.seed = check_int("seed", seed, 0)
        self.report: RefinerReport | None = None
        # Chains are run, stored, reused and graded exactly as a calibration does it.
        self._calibrator = _Chains(
            self.metric,
            rounds=rounds,
            num_threads=num_threads,
            prior=prior,
            threshold=threshold,
            question_types=question_types,
            resume=resume,
            trace_dir=trace_dir,
            store_traces=store_traces,
            trace_key=trace_key,
            max_errors=max_errors,
        )

    def compile(
        self,
        student: MarkovRefine,
        *,
        trainset: Sequence[dspy.Example],
        valset: Sequence[dspy.Example] | None = None,
        **kwargs: Any,
    ) -> MarkovRefine:
        """A calibrated copy of ``student`` with the refinement instructions that won the race (the student is left
        untouched). ``valset`` (optional) is answered by the module before and after, for the report.

        Raises:
            ConfigurationError: ``student`` is not a MarkovRefine, or an LM failure no retry can mend.
            DataError: the trainset is empty or its examples lack inputs or labels.
            CalibrationError: no round 0 could be graded, or ``max_errors`` errors.
        """
        with span("RefinerOptimizer.compile", lambda: self._attributes(), root="compile"):
            race = self._prepare(student, trainset, valset)
            try:
                self._draw_round_zero(race)
                self._race(race)
                chosen = self._choose(race)
                return self._conclude(race, chosen, valset)
            finally:
                if race.store is not None:
                    race.store.close()

    # Named steps -------------------------------------------------------------------------------------------------

    def _prepare(
        self, student: MarkovRefine, trainset: Sequence[dspy.Example], valset: Sequence[dspy.Example] | None
    ) -> _Race:
        """Check the student and the trainset; one module per candidate; the order of the race."""
        self.report = None
        self._calibrator.firsts = {}
        if not isinstance(student, MarkovRefine):
            raise ConfigurationError(
                f"RefinerOptimizer tunes a MarkovRefine's refiner, got {type(student).__name__}; wrap the program: "
                "RefinerOptimizer(metric).compile(MarkovRefine(program), trainset=...)"
            )
        examples = check_examples(trainset, student, "trainset")
        if valset:  # a bad valset is said now, not after the race has been paid for
            check_examples(valset, student, "valset")
        rounds = self._calibrator._rounds_for(student)
        base = student.deepcopy()
        texts = [("default", _instructions_of(base))]
        if self.verify_first:
            texts.append(("verify_first", VERIFY_FIRST))
        texts += [("yours", text) for text in self.candidates]
        candidates: list[_Candidate] = []
        for source, text in texts:
            if any(c.instructions == text for c in candidates):
                continue  # the same instructions twice would be raced against themselves
            candidates.append(_Candidate(len(candidates), source, text, _with_instructions(base, text, source)))
        order = list(range(len(examples)))
        random.Random(self.seed).shuffle(order)
        store = TraceStore(self.trace_dir) if self.store_traces else None
        race = _Race(
            started=time.perf_counter(),
            base=base,
            examples=examples,
            order=order,
            rounds=rounds,
            round_cost=base.stopping_cost() if self.round_cost is None else self.round_cost,
            candidates=candidates,
            store=store,
            guard=RunGuard(self.max_errors or dspy.settings.max_errors),
            rng=np.random.default_rng(self.seed),
            prior=self.prior,
        )
        if store is not None and not self._calibrator._identifiable(base, rounds, examples):
            store.close()
            race.store = None
        return race

    def _draw_round_zero(self, race: _Race) -> None:
        """Each example's round-0 answer, once, graded (stored and reused like a calibration chain of 0 rounds)."""
        run = self._run(race, race.base)

        def work(index: int) -> ChainRecord:
            return self._calibrator._chain(run, 0, index, race.examples[index])

        results = self._execute(work, list(range(len(race.examples))))
        race.round0 = [
            r if isinstance(r, ChainRecord) else ChainRecord(index=i, failure=f"executor: {r!r}")
            for i, r in enumerate(results)
        ]
        race.firsts = self._calibrator.firsts
        self._close(race, run)
        race.guard.check(len(race.examples))
        graded = [r for r in race.round0 if r.failure is None and r.labels and r.labels[0] is not None]
        if not graded:
            raise CalibrationError(
                "no round-0 answer could be graded, so no refiner can be compared; failures: "
                + "; ".join(sorted({r.failure or r.metric_error or "no label" for r in race.round0})[:3])
            )
        race.usable = [i for i in race.order if self._usable(race, i)]
        race.correct0 = np.array([bool(race.round0[i].labels[0]) for i in race.usable])
        # One set of Bayesian-bootstrap weights over the examples, shared by every candidate: paired draws.
        race.weights = bootstrap_weights(len(race.usable), draws=DEFAULT_DRAWS, rng=race.rng)

    def _race(self, race: _Race) -> None:
        """Successive halving on the shared round-0 answers: every survivor refines the same examples per rung."""
        usable = race.usable
        race.rungs = _rung_sizes(
            len(usable), len(race.candidates) + self.proposals, self.eta, self.first_rung, 2 if self.proposals else 1
        )
        for number, size in enumerate(race.rungs):
            alive = [c for c in race.candidates if c.alive]
            self._run_chains(race, [(c, i) for c in alive for i in usable[c.reached : size]])
            for c in alive:
                c.reached = size
            race.guard.check(len(race.examples))
            if number == 0 and self.proposals and len(race.rungs) > 1:
                # Proposals are written from these examples' transitions, so they are judged on the others only.
                self._propose(race, usable[:size])
                for c in race.candidates:
                    c.reached = max(c.reached, size)
            self._value(race)
            if number < len(race.rungs) - 1:
                self._eliminate(race, number)

    def _choose(self, race: _Race) -> _Candidate:
        """The best finalist whose advantage over the default the posterior supports, else the default."""
        self._value(race)
        default = race.candidates[0]
        race.gate = gate(self.min_prob_better, len(race.candidates) - 1)
        for c in race.candidates[1:]:
            c.prob_beats_default = prob_better(c.value.draws, default.value.draws)
        supported = [c for c in race.candidates[1:] if c.alive and not c.broken and c.prob_beats_default >= race.gate]
        return max(supported, key=_rank) if supported else default

    def _conclude(self, race: _Race, chosen: _Candidate, valset: Sequence[dspy.Example] | None) -> MarkovRefine:
        """The chosen candidate's module, calibrated on its chains (round 0 shared), with the report."""
        default = race.candidates[0]
        after_records = self._full_records(race, chosen)
        before_records = self._full_records(race, default)
        failed0 = sum(r.failure is not None and not r.skipped for r in race.round0)
        model = self._calibrator._fit(after_records, race.rounds, 0).with_round0_failures(failed0)
        if model.n_transitions == 0:
            raise CalibrationError(
                "no refinement round of the race succeeded, so no refiner can be calibrated (see the logged round "
                "errors); fix the refiner's LM and re-run: round-0 answers come from the trace store"
            )
        module = chosen.module
        module.record_calibration(model, spend=spend_of(after_records))
        seconds = time.perf_counter() - race.started
        lms = module.markov.calibrated_for
        after = build_report(model, after_records, race.rounds, seconds, None, _directory(race), lms)
        if chosen is default:
            before = after
        else:
            before_model = self._calibrator._fit(before_records, race.rounds, 0).with_round0_failures(failed0)
            before = build_report(before_model, before_records, race.rounds, seconds, None, _directory(race), lms)
            default.module.record_calibration(before_model, spend=spend_of(before_records))
        held_out = None
        if valset:
            sides = {"before": default.module, "after": module}
            runner_up = self._runner_up(race, chosen)
            if runner_up is not None:  # the gate kept the default: how the best challenger does on new questions
                sides["best challenger"] = runner_up.module
            held_out = held_out_comparison(
                sides, check_examples(valset, module, "valset"), self.metric, self.threshold, self.num_threads
            )
            held_out["best challenger source"] = None if runner_up is None else runner_up.source
        self.report = _build_report(
            race, chosen, before, after, held_out, self.min_prob_better, time.perf_counter() - race.started
        )
        logger.info("RefinerOptimizer: chose %s (%s)", chosen.source, chosen.instructions[:60])
        return module

    # Helpers -----------------------------------------------------------------------------------------------------

    def _runner_up(self, race: _Race, chosen: _Candidate) -> _Candidate | None:
        """When the default was kept: the best finalist challenger, calibrated on its chains (else ``None``)."""
        best = _best_challenger(race)
        if chosen.index != 0 or best is None:
            return None
        model = self._calibrator._fit(self._full_records(race, best), race.rounds, 0)
        best.module.record_calibration(model)
        return best

    def _run(self, race: _Race, module: MarkovRefine) -> ChainRun:
        return ChainRun(
            program=module,
            store=race.store,
            guard=race.guard,
            pinned=has_pinned_lm(module.program),
            types={name: f.annotation for name, f in module.signature.output_fields.items()},
        )

    def _close(self, race: _Race, run: ChainRun) -> None:
        if run.unstored:
            logger.warning(
                "RefinerOptimizer: %d finished chains could not be stored for resuming (%s)",
                len(run.unstored),
                run.unstored[0],
            )

    def _execute(self, work: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        executor = ParallelExecutor(
            num_threads=self.num_threads, max_errors=len(items) + 1, disable_progress_bar=not self.display_progress
        )
        return executor.execute(carry_context(work), items) if items else []

    def _usable(self, race: _Race, index: int) -> bool:
        record = race.round0[index]
        return record.failure is None and bool(record.labels) and record.labels[0] is not None

    def _run_chains(self, race: _Race, jobs: list[tuple[_Candidate, int]]) -> None:
        runs = {c.index: self._run(race, c.module) for c, _ in jobs}

        def work(job: tuple[_Candidate, int]) -> ChainRecord:
            candidate, index = job
            with span(f"refiner {candidate.index} on example {index}", lambda: {"candidate": candidate.index}):
                return self._chain(race, runs[candidate.index], candidate, index)

        results = self._execute(work, jobs)
        for (candidate, index), record in zip(jobs, results, strict=True):
            if not isinstance(record, ChainRecord):
                record = ChainRecord(index=index, failure=f"executor: {record!r} (see the logged error)")
            candidate.records[index] = record
        for run in runs.values():
            self._close(race, run)

    def _chain(self, race: _Race, run: ChainRun, candidate: _Candidate, index: int) -> ChainRecord:
        """Worker: ``candidate`` refines example ``index``'s shared round-0 answer ``rounds`` times."""
        calibrator, example = self._calibrator, race.examples[index]
        record = ChainRecord(index=index)
        if race.guard.stopped or cap_reached():
            record.failure, record.skipped = SKIPPED, True
            return record
        first = race.firsts[index]
        key = None
        if race.store is not None:
            try:
                # Keyed by the round 0 it continues (its outputs, not only its answer: reasoning differs).
                purpose = [_CONTINUED, first.get("outputs")]
                key = chain_key(candidate.module, race.rounds, example, self.trace_key, purpose=purpose)
            except Exception as exc:  # the store is an optimisation: without a key, just run the chain
                logger.warning("trace store disabled for example %d: %s", index, describe(exc))
        trajectory = calibrator._reused(run, key)
        if trajectory is not None and trajectory[0].get("answer_key") != first.get("answer_key"):
            trajectory = None  # stored from another round 0 (the round-0 answer was redrawn): not paired, rerun
        record.reused = trajectory is not None
        if trajectory is None:
            prediction, error = None, None
            try:
                with dspy.context(trace=[]), measure_usage() as usage:
                    prediction = candidate.module.continue_chain(
                        dspy.Prediction(**first["outputs"]), race.rounds, **example.inputs()
                    )
            except Exception as exc:
                error = exc
            trajectory = calibrator._chain_ran(run, record, key, prediction, error, usage)
        if trajectory is not None:
            calibrator._label(record, example, trajectory, race.guard)
        return record

    def _value(self, race: _Race) -> None:
        """Each candidate's posterior worth from the chains it has run, paired through the shared weights."""
        for c in race.candidates:
            chains = []
            for i in race.usable:
                record = c.records.get(i)
                chain = record.observed_chain() if record is not None else []
                chains.append(chain if len(chain) >= 2 else None)
            table = chain_counts(chains)
            refined = ~np.isnan(table).any(axis=1)
            c.counts = (
                RefinerCounts(*(int(x) for x in table[refined].sum(axis=0))) if refined.any() else RefinerCounts()
            )
            # A refiner whose rounds mostly fail is not measured, whatever its prior says (and never chosen).
            c.broken = bool(c.records) and c.counts.total < 0.5 * len(c.records) * race.rounds
            c.value = value_draws(
                race.weights,
                race.correct0,
                table,
                max_rounds=race.base.max_rounds,
                round_cost=race.round_cost,
                prior=self.prior,
            )
            c.bound = theory.stationary_accuracy(*c.counts.means(self.prior))

    def _eliminate(self, race: _Race, rung: int) -> None:
        """Drop challengers whose rounds fail or that the posterior says lose to the leader, then keep at most
        1/eta of the rest (the default stays: it is what the winner must beat)."""
        # A proposal that joined at this rung has refined nothing yet: it is judged from the next rung on.
        challengers = [c for c in race.candidates[1:] if c.alive and c.records]
        for c in challengers:
            if c.broken:
                c.alive, c.eliminated_at = False, rung
        leader = max((c for c in race.candidates if c.alive and not c.broken), key=_rank, default=None)
        for c in challengers:
            # A tie is not a loss: two candidates that both plan no rounds do not knock each other out.
            if c.alive and c is not leader and prob_at_least(c.value.draws, leader.value.draws) < self.drop_below:
                c.alive, c.eliminated_at = False, rung
        rest = sorted((c for c in challengers if c.alive), key=_rank, reverse=True)
        for c in rest[max(1, math.ceil(len(challengers) / self.eta)) :]:
            c.alive, c.eliminated_at = False, rung

    def _propose(self, race: _Race, examples: list[int]) -> None:
        """New instructions from the reflection LM, written from the leader's transitions (DSPy's GEPA proposer)."""
        from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer

        self._value(race)
        leader = max((c for c in race.candidates if c.alive and not c.broken), key=_rank, default=race.candidates[0])
        feedback = _reflective_dataset(race, leader, examples)
        if not feedback:
            logger.warning(
                "RefinerOptimizer: no refinement changed correctness on the first rung; nothing to reflect on"
            )
            return
        proposer = InstructionProposer()
        rng = random.Random(self.seed)
        for k in range(self.proposals):
            batch = rng.sample(feedback, min(len(feedback), 8))
            lm = self.reflection_lm.copy(rollout_id=k, temperature=1.0) if k else self.reflection_lm
            try:
                with dspy.context(lm=lm), measure_usage() as usage:
                    text = proposer(
                        candidate={"refiner": leader.instructions},
                        reflective_dataset={"refiner": batch},
                        components_to_update=["refiner"],
                    ).get("refiner")
            except Exception as exc:  # a failed proposal is said and skipped: the race goes on without it
                logger.warning("RefinerOptimizer: the reflection LM's proposal %d failed: %s", k, describe(exc))
                continue
            race.proposal_usage = race.proposal_usage + usage
            text = (text or "").strip()
            if text and all(c.instructions != text for c in race.candidates):
                race.candidates.append(
                    _Candidate(len(race.candidates), "proposed", text, _with_instructions(race.base, text, "proposed"))
                )

    def _full_records(self, race: _Race, candidate: _Candidate) -> list[ChainRecord]:
        """The candidate's chains in trainset order, with round 0's usage (paid once, shared) on each."""
        out = []
        for index, shared in enumerate(race.round0):
            record = candidate.records.get(index)
            if record is None:
                if shared.failure is not None:
                    out.append(shared)
                continue
            if record.round_usage and shared.round_usage:
                # Round 0 was paid once and is shared; its confidence too (the continued chain has none for it).
                record = replace(
                    record,
                    round_usage=[shared.round_usage[0], *record.round_usage[1:]],
                    confidences=[shared.confidences[0] if shared.confidences else None, *record.confidences[1:]],
                )
                record.usage = sum((Usage.from_dict(u) for u in record.round_usage), Usage()).to_dict()
            out.append(record)
        return out

    def _attributes(self) -> dict[str, Any]:
        if self.report is None:
            return {}
        return {"chosen": self.report.chosen_source, "calls": self.report.calls["total"]}


# The race's state -----------------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    index: int
    source: str
    instructions: str
    module: MarkovRefine
    records: dict[int, ChainRecord] = field(default_factory=dict)
    reached: int = 0
    alive: bool = True
    eliminated_at: int | None = None
    counts: RefinerCounts = field(default_factory=RefinerCounts)
    value: RefinerValue | None = None
    prob_beats_default: float | None = None
    broken: bool = False
    bound: float | None = None

    def calls(self, *, reused: bool = False) -> int:
        """Calls its chains made now (``reused=True``: also what stored chains cost when they were run)."""
        return sum(Usage.from_dict(r.usage).calls for r in self.records.values() if reused or not r.reused)


def _best_challenger(race: _Race) -> _Candidate | None:
    """The challenger that finished the race best (the one the held-out check answers when the default is kept)."""
    finalists = [c for c in race.candidates[1:] if c.alive and not c.broken]
    return max(finalists, key=_rank) if finalists else None


def _rank(c: _Candidate) -> tuple[float, float, int]:
    """Order of merit: worth, then the bound (closer to paying when neither plans rounds), then the earlier."""
    return (c.value.mean, c.bound if c.bound is not None else 0.0, -c.index)


@dataclass
class _Race:
    started: float
    base: MarkovRefine
    examples: list[dspy.Example]
    order: list[int]
    rounds: int
    round_cost: float
    candidates: list[_Candidate]
    store: TraceStore | None
    guard: Any
    rng: np.random.Generator
    round0: list[ChainRecord] = field(default_factory=list)
    usable: list[int] = field(default_factory=list)
    correct0: np.ndarray | None = None
    weights: np.ndarray | None = None
    rungs: list[int] = field(default_factory=list)
    gate: float = 1.0
    proposal_usage: Usage = field(default_factory=Usage)
    prior: tuple[float, float] = (1.0, 1.0)
    firsts: dict[int, dict[str, Any]] = field(default_factory=dict)


class _Chains(MarkovCalibrator):
    """Runs, stores, reuses and grades chains exactly as a calibration does, and keeps each round 0 it saw (the
    outputs every candidate refines)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.firsts: dict[int, dict[str, Any]] = {}

    def _chain_end(
        self, run: ChainRun, record: ChainRecord, example: dspy.Example, trajectory: list[dict[str, Any]] | None
    ) -> ChainRecord:
        if trajectory and len(trajectory) == 1:  # a round-0 draw (candidates' chains are longer)
            self.firsts[record.index] = trajectory[0]
        return super()._chain_end(run, record, example, trajectory)


def _build_report(
    race: _Race,
    chosen: _Candidate,
    before: CalibrationReport,
    after: CalibrationReport,
    held_out: dict[str, Any] | None,
    min_prob_better: float,
    seconds: float,
) -> RefinerReport:
    rows = []
    a, b = race.prior
    p0 = (a + race.correct0.sum()) / (a + b + len(race.correct0))
    for c in race.candidates:
        p_cw, p_wc = c.counts.means(race.prior)
        rows.append(
            {
                "source": c.source,
                "instructions": c.instructions,
                "examples": len(c.records),
                "calls": c.calls(),
                "p_cw": {
                    "mean": p_cw,
                    "interval": _interval(c.counts.n_cw, c.counts.n_cc),
                },
                "p_wc": {
                    "mean": p_wc,
                    "interval": _interval(c.counts.n_wc, c.counts.n_ww),
                },
                "transitions": asdict(c.counts),
                "bound": theory.stationary_accuracy(p_cw, p_wc),
                "regime": theory.regime(p0, p_cw, p_wc),
                "planned_rounds": c.value.rounds,
                "value": c.value.mean,
                "prob_beats_default": c.prob_beats_default,
                "eliminated_at": c.eliminated_at,
                "refinements_failed": c.broken,
            }
        )
    round0 = sum(Usage.from_dict(r.usage).calls for r in race.round0 if not r.reused)
    refinement = sum(c.calls() for c in race.candidates)
    # The cost basis of the comparison: what the race's chains cost when they were run (stored ones included)
    # against every candidate refining every usable example at the measured calls per chain.
    round0_cost = sum(Usage.from_dict(r.usage).calls for r in race.round0)
    chains = sum(len(c.records) for c in race.candidates)
    chain_cost = sum(c.calls(reused=True) for c in race.candidates)
    per_chain = chain_cost / chains if chains else 0.0
    return RefinerReport(
        candidates=rows,
        chosen=chosen.index,
        runner_up=None if (best := _best_challenger(race)) is None else best.index,
        gate=race.gate,
        min_prob_better=min_prob_better,
        round_cost=race.round_cost,
        calls={
            "round0": round0,
            "refinement": refinement,
            "proposals": race.proposal_usage.calls,
            "total": round0 + refinement + race.proposal_usage.calls,
            "race": round0_cost + chain_cost + race.proposal_usage.calls,
            "every_candidate_everywhere": round(
                round0_cost + len(race.candidates) * len(race.usable) * per_chain + race.proposal_usage.calls
            ),
        },
        rungs=list(race.rungs),
        before=before,
        after=after,
        held_out=held_out,
        seconds=seconds,
    )


# Pure helpers ---------------------------------------------------------------------------------------------------


def _check_candidates(candidates: Any) -> list[str]:
    if candidates is None:
        return []
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence):
        raise ConfigurationError(
            f"candidates must be a list of instruction strings, got {type(candidates).__name__}: {candidates!r:.80}"
        )
    out = []
    for i, text in enumerate(candidates):
        if not isinstance(text, str) or not text.strip():
            raise ConfigurationError(f"candidates[{i}] must be a non-empty instruction string, got {text!r:.80}")
        out.append(text.strip())
    return out


def _instructions_of(module: MarkovRefine) -> str:
    """The refinement instructions the module uses now (without the task's own instructions appended to them)."""
    full = refiner_predict(module.refiner).signature.instructions
    task = (module.signature.instructions or "").strip()
    suffix = f"\n\nThe task: {task}" if task else ""
    return full[: -len(suffix)] if suffix and full.endswith(suffix) else full


def _with_instructions(base: MarkovRefine, text: str, source: str) -> MarkovRefine:
    """A copy of ``base`` whose refiner has ``text`` as its instructions (the default is ``base`` itself)."""
    if source == "default":
        return base
    module = base.deepcopy()
    module.instructions = text
    predictor = refiner_predict(module.refiner)
    predictor.signature = predictor.signature.with_instructions(
        refinement_signature(module.signature, text).instructions
    )
    return module


def _rung_sizes(n: int, candidates: int, eta: int, first: int | None, at_least: int = 1) -> list[int]:
    """Examples per rung: the challengers are cut to ``1/eta`` per rung until one is left, and each rung refines
    ``eta`` times as many examples as the one before, the last all of them (at least ``at_least`` rungs where the
    examples allow)."""
    halvings = max(math.ceil(math.log(candidates - 1, eta)) if candidates > 2 else 0, at_least - 1)
    sizes = [n]
    for _ in range(halvings):
        sizes.insert(0, math.ceil(sizes[0] / eta))
    floor = min(n, 20 if first is None else first)
    return sorted({max(size, floor) for size in sizes})


def _interval(successes: int, failures: int) -> list[float]:
    return list(binomial_interval(successes, successes + failures))


def _directory(race: _Race) -> str | None:
    return None if race.store is None else str(race.store.directory)


def _reflective_dataset(race: _Race, leader: _Candidate, examples: list[int]) -> list[dict[str, Any]]:
    """GEPA's reflective records from the leader's transitions: what broke a correct answer, what fixed a wrong one,
    what left a wrong one wrong."""
    feedback: list[dict[str, Any]] = []
    for index in examples:
        record = leader.records.get(index)
        if record is None:
            continue
        inputs = dict(race.examples[index].inputs())
        fields = race.base.answer_fields
        name = fields[0] if len(fields) == 1 else "answer"
        chain = record.observed()
        for (was, before), (now, after) in itertools.pairwise(chain):
            if was and not now:
                note = (
                    f"The previous answer {before!r} was correct and this refinement changed it to {after!r}, which "
                    "is wrong: it broke a correct answer. A refinement must keep a correct answer."
                )
            elif not was and now:
                note = f"The previous answer {before!r} was wrong and this refinement fixed it to {after!r}: good."
            elif not was:
                note = f"The previous answer {before!r} was wrong and this refinement left it wrong ({after!r})."
            else:
                continue
            feedback.append(
                {
                    "Inputs": {**inputs, f"previous_{name}": before},
                    "Generated Outputs": {name: after},
                    "Feedback": note,
                }
            )
    return feedback
