"""MarkovScale: spend a call budget the way the calibration says pays -- one call, refinement, a vote, or both."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy
from dspy.utils.parallelizer import ParallelExecutor

from markovscale_dspy._exceptions import ConfigurationError, NotCalibratedError, RoundZeroError
from markovscale_dspy._warnings import warn
from markovscale_dspy.core.answers import AnswerKey
from markovscale_dspy.core.model import TransitionModel
from markovscale_dspy.core.planner import KINDS, MAX_CALLS_LIMIT, Plan, Strategy, plan
from markovscale_dspy.core.policies import FixedPolicy
from markovscale_dspy.core.validation import check_int, check_number
from markovscale_dspy.core.voting import plurality_winner
from markovscale_dspy.refine.loop import Call, Outcome, RefineAccount, adrive, describe, drive
from markovscale_dspy.refine.markov_refine import MarkovRefine
from markovscale_dspy.refine.sampling import (
    MAX_SAMPLES,
    afresh_sample,
    compose_rollout,
    fresh_sample,
    has_pinned_lm,
    rollout_of,
    sample_rollout,
)
from markovscale_dspy.refine.state import MarkovState, load_into, read_state_file, scrub_lm_state
from markovscale_dspy.usage import measure_usage

__all__ = ["MarkovScale", "SampleChain", "ScaleAccount", "ScaledPrediction"]

#: Where a MarkovScale's calibration sits in its saved state.
_STATE_KEY = "refine.markov"


@dataclass(frozen=True)
class ScaleAccount:
    """MarkovScale's account of one answer: what ran, what it was predicted to score, what every chain did.

    Attributes:
        plan: What ran: ``"single"``, ``"refine"``, ``"vote"`` or ``"refine_vote"``.
        samples: Independent chains run (1 for single and refine).
        rounds: Refinement rounds per chain.
        reason: Why: ``"best"`` (the plan's top strategy), ``"uncertain"`` (the confidence gate held a predicted
            gain back), ``"uncalibrated"`` (no calibration: one call) or ``"requested"`` (``run_strategy``).
        predicted: The strategy's predicted accuracy and interval (``None`` without a calibration).
        chains: Every chain's MarkovRefine account (``None`` where its sample failed).
        errors: Why a chain failed, per chain (``None`` if it did not).
        usage: LM calls and tokens of every chain.
        votes: Final answers and their votes, most voted first.
        selected_chain: The chain whose answer was returned.
    """

    plan: str
    samples: int
    rounds: int
    reason: str
    predicted: dict[str, Any] | None
    chains: list[RefineAccount | None]
    errors: list[str | None]
    usage: list[dict[str, int]]
    votes: list[tuple[Hashable, int]]
    selected_chain: int

    @property
    def calls(self) -> int:
        """LM calls that reached a provider over all chains (cache hits are free)."""
        return sum(u.get("calls", 0) for u in self.usage)

    @property
    def failed_samples(self) -> int:
        return sum(e is not None for e in self.errors)

    @property
    def trajectory(self) -> list[dict[str, Any]]:
        """The rounds of the chain whose answer was returned."""
        chain = self.chains[self.selected_chain]
        return chain.trajectory if chain is not None else []


class ScaledPrediction(dspy.Prediction):
    """The wrapped program's outputs, untouched, with MarkovScale's account in ``.markovscale``.

    ``pred.markovscale.plan`` names what ran; ``pred.plan`` is also set when the program has no output of that name.
    """

    markovscale: ScaleAccount | None = None


@dataclass
class SampleChain:
    """One chain started from a fresh sample: its prediction (``None`` if the sample failed, then ``error`` says
    why) and the LM calls and tokens it used."""

    prediction: Any = None
    error: str | None = None
    usage: dict[str, int] = field(default_factory=dict)


class MarkovScale(dspy.Module):
    """Choose, from one calibration, between a single call, refinement, a vote over samples, and both.

    ``MarkovCalibrator(metric, parallel_samples=K)`` calibrates it: full refinement chains give the chain
    (``p0``, ``p_cw``, ``p_wc``), ``K`` independent samples per question give the vote model (how accuracy varies
    over questions and how wrong answers agree). From them :meth:`plan` predicts the accuracy of every strategy
    within ``max_calls`` LM calls per question -- a single call, ``T`` refinement rounds, a plurality vote over
    ``n`` samples, and ``n`` refinement chains voted over -- and picks the one maximising predicted accuracy minus
    ``call_cost`` per call, claiming a gain over a single call only when the calibration supports it with
    probability ``min_prob_gain`` (see :mod:`markovscale_dspy.core.planner`).

    ``forward`` runs the plan: samples and chains concurrently (threads; ``aforward`` uses asyncio), each sample
    with its own rollout id and ``temperature`` (composed with any outer attempt's, like MarkovRefine's rounds), and
    returns the plurality answer, ties going to the answer seen first. ``pred.markovscale`` is a
    :class:`ScaleAccount` (what ran, its prediction, every chain's rounds, calls and tokens). A failed sample does not
    vote; only when all fail does the call raise :class:`RoundZeroError`.

    Args:
        program: The DSPy program (e.g. ``dspy.ChainOfThought("question -> answer")``).
        max_calls: LM calls per question at most (1-16).
        call_cost: Accuracy (0.01 = one point) an LM call must buy; 0 picks the most accurate strategy.
        min_prob_gain: Run anything but a single call only if the calibration says with at least this probability
            that it beats the single call (0 disables the gate).
        strategies: Kinds the planner may choose among (the single call is always allowed).
        signature: The program's task signature; inferred when it has a single predictor.
        temperature: Sampling temperature of samples and refinement rounds (> 0).
        answer_key: What makes two answers "the same" (for votes and refinement); normalised values by default.
        rollout_seed: Namespace of rollout ids (change it to draw different samples).
        instructions: Replaces the refinement instructions.
        refiner_lm: LM for refinement rounds (see MarkovRefine).
        num_threads: Samples run concurrently (default: all of them, at most ``dspy.settings.num_threads``).

    Example:
        >>> import dspy
        >>> from markovscale_dspy import MarkovCalibrator, MarkovScale
        >>> from markovscale_dspy.testing import SimulatedWorld
        >>> world = SimulatedWorld.mixture(200, [(1.0, {"p0": 0.7, "p_cw": 0.3, "p_wc": 0.1,
        ...     "p0_concentration": 4, "n_distractors": 3})], seed=0)
        >>> calibrator = MarkovCalibrator(world.metric, rounds=2, parallel_samples=4, num_threads=1)
        >>> with dspy.context(lm=world.lm()):
        ...     scale = calibrator.compile(MarkovScale(dspy.Predict("question -> answer"), max_calls=3),
        ...                                trainset=world.examples)
        ...     pred = scale(**world.examples[0].inputs())
        >>> scale.plan().kind, pred.markovscale.plan, pred.markovscale.calls
        ('vote', 'vote', 3)
    """

    def __init__(
        self,
        program: dspy.Module,
        *,
        max_calls: int = 8,
        call_cost: float = 0.0,
        min_prob_gain: float = 0.9,
        strategies: Iterable[str] = KINDS,
        signature: str | type[dspy.Signature] | None = None,
        temperature: float = 0.7,
        answer_key: AnswerKey | None = None,
        rollout_seed: int = 0,
        instructions: str | None = None,
        refiner_lm: dspy.BaseLM | None = None,
        num_threads: int | None = None,
    ):
        super().__init__()
        check_int("max_calls", max_calls, 1, MAX_CALLS_LIMIT)
        check_number("call_cost", call_cost, 0, 1, hi_open=True, unit="accuracy per LM call")
        check_number("min_prob_gain", min_prob_gain, 0, 1)
        strategies = tuple(strategies) if not isinstance(strategies, str) else (strategies,)
        if not strategies or any(k not in KINDS for k in strategies):
            raise ConfigurationError(f"strategies must be a non-empty subset of {KINDS}, got {strategies!r}")
        check_int("num_threads", num_threads, 1, none_ok=True)
        # The chain machinery (refiner predictor, calibration state, rollout ids) is MarkovRefine's.
        self.refine = MarkovRefine(
            program,
            signature=signature,
            max_rounds=max_calls - 1,
            policy="fixed",
            temperature=temperature,
            answer_key=answer_key,
            rollout_seed=rollout_seed,
            instructions=instructions,
            refiner_lm=refiner_lm,
        )
        self.max_calls = max_calls
        self.call_cost = float(call_cost)
        self.min_prob_gain = float(min_prob_gain)
        self.strategies = strategies
        self.num_threads = num_threads

    # What it wraps and what it learned ----------------------------------------------------------------------------

    #: Independent samples per question a calibration draws unless told otherwise (the vote model needs them).
    default_parallel_samples = 8

    def chain_module(self) -> MarkovRefine:
        """The MarkovRefine whose chains a calibration runs and which records it."""
        return self.refine

    def calibration_plan(self) -> Plan:
        """The plan a calibration report shows (see :meth:`plan`)."""
        return self.plan()

    @property
    def program(self) -> dspy.Module:
        return self.refine.program

    @property
    def signature(self) -> type[dspy.Signature]:
        return self.refine.signature

    @property
    def temperature(self) -> float:
        return self.refine.temperature

    @property
    def rollout_seed(self) -> int:
        return self.refine.rollout_seed

    @property
    def model(self) -> TransitionModel | None:
        """The calibrated chain with its vote model (``None`` until calibrated)."""
        return self.refine.model

    @model.setter
    def model(self, value: TransitionModel | None) -> None:
        self.refine.model = value

    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        """DSPy state of the module, with endpoints and headers of pinned LMs removed (they may hold secrets)."""
        return scrub_lm_state(super().dump_state(json_mode=json_mode))

    def save(self, path: str | os.PathLike, save_program: bool = False, modules_to_serialize: Any = None) -> None:
        """Write the state to a ``.json`` file: JSON only, atomic, endpoints scrubbed (as ``MarkovRefine.save``)."""
        MarkovRefine.save(self, path, save_program, modules_to_serialize)

    def load(
        self, path: str | os.PathLike, allow_pickle: bool = False, allow_unsafe_lm_state: bool = False
    ) -> MarkovScale:
        """Restore a state written by :meth:`save`; nothing is changed unless the whole file is valid.

        Raises:
            StateError: the file is missing, not JSON, corrupt, from another program or an incompatible version.
        """
        state = read_state_file(path, key=_STATE_KEY, owner="MarkovScale")
        markov = self.refine.markov
        MarkovState.parse(state[_STATE_KEY], markov.input_fields, markov.answer_fields)  # fail early
        load_into(self, state, path, "MarkovScale", allow_unsafe_lm_state)
        return self

    def plan(self) -> Plan:
        """The strategy the calibration supports, with every candidate's prediction and interval.

        Raises:
            NotCalibratedError: the module has no calibration.
        """
        model = self.model
        if model is None:
            raise NotCalibratedError(
                "MarkovScale has no calibration to plan from: run MarkovCalibrator(metric, parallel_samples=8)"
                ".compile(scale, trainset=...), or load a saved state with .load(path)"
            )
        key = ("plan", self.max_calls, self.call_cost, self.min_prob_gain, self.strategies)
        if key not in model._cache:  # the model is immutable, so its plan for these settings never changes
            model._cache[key] = plan(model, self.max_calls, self.call_cost, self.min_prob_gain, kinds=self.strategies)
        return model._cache[key]

    # Calling ------------------------------------------------------------------------------------------------------

    def _choice(self) -> tuple[Strategy, str, dict[str, Any] | None]:
        if self.model is None:
            warn(
                "MarkovScale is not calibrated, so it answers with the wrapped program alone (reason "
                "'uncalibrated'); calibrate it with MarkovCalibrator(metric, parallel_samples=8).compile(scale, "
                "trainset=...)",
            )
            return Strategy(1, 0), "uncalibrated", None
        chosen = self.plan()
        return chosen.chosen.strategy, chosen.reason, _predicted(chosen.chosen)

    def forward(self, **inputs: Any) -> ScaledPrediction:
        """Answer ``inputs`` with the planned strategy."""
        strategy, reason, predicted = self._choice()
        return self._run(strategy, reason, predicted, inputs)

    async def aforward(self, **inputs: Any) -> ScaledPrediction:
        """Async twin of :meth:`forward`."""
        strategy, reason, predicted = self._choice()
        return await self._arun(strategy, reason, predicted, inputs)

    def run_strategy(self, samples: int, rounds: int, **inputs: Any) -> ScaledPrediction:
        """Run ``samples`` chains of ``rounds`` refinement rounds and vote, whatever the plan says."""
        strategy = self._strategy(samples, rounds)
        return self._run(strategy, "requested", self._predicted_for(strategy), inputs)

    async def arun_strategy(self, samples: int, rounds: int, **inputs: Any) -> ScaledPrediction:
        """Async twin of :meth:`run_strategy`."""
        strategy = self._strategy(samples, rounds)
        return await self._arun(strategy, "requested", self._predicted_for(strategy), inputs)

    def run_samples(self, rounds: Sequence[int], **inputs: Any) -> list[SampleChain]:
        """Independent chains from fresh samples ``j = 0, 1, ...``, chain ``j`` refined ``rounds[j]`` rounds, and no
        vote: the raw material of every vote and hybrid strategy (the strategy ``n x T`` is the vote over chains
        ``0..n-1`` at round ``T``, exactly as :meth:`run_strategy` draws it)."""
        self.refine._check_inputs(inputs)
        return self._sample_chains([check_int("rounds", r, 0, MAX_SAMPLES) for r in rounds], dict(inputs))

    def _strategy(self, samples: int, rounds: int) -> Strategy:
        check_int("samples", samples, 1, MAX_SAMPLES)
        check_int("rounds", rounds, 0, MAX_SAMPLES)
        return Strategy(samples, rounds)

    def _predicted_for(self, strategy: Strategy) -> dict[str, Any] | None:
        if self.model is None:
            return None
        try:
            return _predicted(self.plan().prediction(strategy.samples, strategy.rounds))
        except KeyError:
            return None

    def _run(self, strategy: Strategy, reason: str, predicted: Any, inputs: dict[str, Any]) -> ScaledPrediction:
        self.refine._check_inputs(inputs)
        runs = self._sample_chains([strategy.rounds] * strategy.samples, dict(inputs))
        return self._finish(strategy, reason, predicted, runs)

    async def _arun(self, strategy: Strategy, reason: str, predicted: Any, inputs: dict[str, Any]) -> ScaledPrediction:
        self.refine._check_inputs(inputs)
        gate = asyncio.Semaphore(self._threads(strategy.samples))
        setup = self._setup([strategy.rounds])

        async def one(index: int) -> SampleChain:
            async with gate:
                return await self._asample_chain(index, strategy.rounds, dict(inputs), setup)

        runs = list(await asyncio.gather(*(one(j) for j in range(strategy.samples))))
        return self._finish(strategy, reason, predicted, runs)

    def _sampling(self, index: int) -> dict[str, Any]:
        return {"rollout": sample_rollout(self.rollout_seed, index), "temperature": self.temperature}

    def _threads(self, jobs: int) -> int:
        return max(1, min(jobs, self.num_threads or dspy.settings.num_threads or jobs))

    def _setup(self, rounds: Sequence[int]) -> tuple[bool, tuple[Any, Any] | None]:
        """What every chain of one call shares, resolved once: whether the program pins LMs, and the refiner's
        ``(lm to pass, answering lm)`` (only when some chain refines; a misconfiguration raises here)."""
        return has_pinned_lm(self.program), self.refine._refiner_lm() if any(rounds) else None

    def _sample_chain(
        self, index: int, rounds: int, inputs: dict[str, Any], setup: tuple[bool, tuple[Any, Any] | None]
    ) -> SampleChain:
        """Worker: sample ``index``, refined ``rounds`` rounds. Never raises (the executor may re-run it)."""
        pinned, refiner = setup
        own = sample_rollout(self.rollout_seed, index)
        # The chain's refinements get their own namespace, so chains that reach the same answer still refine it
        # independently.
        outer = compose_rollout(rollout_of(refiner[1]), own) if refiner is not None else None

        def run(call: Call) -> Outcome:
            if call.round == 0:
                return fresh_sample(self.program, call.kwargs, pinned=pinned, **self._sampling(index))
            return self.refine._call(call, outer=outer, refiner=refiner)

        with measure_usage() as usage:
            try:
                prediction = drive(self.refine._chain(inputs, FixedPolicy(), rounds, "last"), run)
            except RoundZeroError as exc:
                return SampleChain(None, describe(exc.__cause__ or exc), usage.to_dict())
        return SampleChain(prediction, None, usage.to_dict())

    async def _asample_chain(
        self, index: int, rounds: int, inputs: dict[str, Any], setup: tuple[bool, tuple[Any, Any] | None]
    ) -> SampleChain:
        pinned, refiner = setup
        own = sample_rollout(self.rollout_seed, index)
        outer = compose_rollout(rollout_of(refiner[1]), own) if refiner is not None else None

        async def run(call: Call) -> Outcome:
            if call.round == 0:
                return await afresh_sample(self.program, call.kwargs, pinned=pinned, **self._sampling(index))
            return await self.refine._acall(call, outer=outer, refiner=refiner)

        with measure_usage() as usage:
            try:
                prediction = await adrive(self.refine._chain(inputs, FixedPolicy(), rounds, "last"), run)
            except RoundZeroError as exc:
                return SampleChain(None, describe(exc.__cause__ or exc), usage.to_dict())
        return SampleChain(prediction, None, usage.to_dict())

    def _sample_chains(self, rounds: list[int], inputs: dict[str, Any]) -> list[SampleChain]:
        """Chains ``j = 0..len(rounds)-1`` concurrently; their LM usage is added to the caller's tracker (DSPy's
        trackers do not see worker threads)."""
        setup = self._setup(rounds)
        jobs = [lambda j=j, r=r: self._sample_chain(j, r, inputs, setup) for j, r in enumerate(rounds)]
        results = _run_isolated(jobs, self._threads(len(jobs)))
        return [r if isinstance(r, SampleChain) else SampleChain(None, f"executor: {r!r}") for r in results]

    def _finish(self, strategy: Strategy, reason: str, predicted: Any, runs: list[SampleChain]) -> ScaledPrediction:
        keys = [
            None if run.error is not None else run.prediction.markovscale.trajectory[-1]["answer_key"] for run in runs
        ]
        winner = plurality_winner(keys)
        if winner is None:
            errors = Counter(run.error for run in runs)
            raise RoundZeroError(
                f"every one of the {len(runs)} samples failed: "
                + "; ".join(f"{n}x {e}" for e, n in errors.most_common(3))
            )
        account = ScaleAccount(
            plan=strategy.kind,
            samples=strategy.samples,
            rounds=strategy.rounds,
            reason=reason,
            predicted=predicted,
            chains=[run.prediction.markovscale if run.error is None else None for run in runs],
            errors=[run.error for run in runs],
            usage=[run.usage for run in runs],
            votes=Counter(k for k in keys if k is not None).most_common(),
            selected_chain=winner,
        )
        outputs = account.chains[winner].trajectory[-1]["outputs"]
        compat = {} if "plan" in outputs else {"plan": strategy.kind}
        prediction = ScaledPrediction(**outputs, **compat)
        prediction.markovscale = account
        return prediction


def _predicted(prediction: Any) -> dict[str, Any]:
    return {"strategy": prediction.name, "accuracy": prediction.accuracy, "interval": list(prediction.interval)}


def _run_isolated(jobs: list[Callable[[], Any]], threads: int) -> list[Any]:
    """Run ``jobs`` on up to ``threads`` threads with DSPy's settings, each under its own usage tracker, and add
    what they used to the caller's tracker (so ``dspy.track_usage`` and evaluations count every call once)."""

    def isolated(job: Callable[[], Any]) -> tuple[Any, dict[str, list]]:
        with dspy.context(usage_tracker=None), dspy.track_usage() as tracker:
            result = job()
        return result, {lm: list(entries) for lm, entries in tracker.usage_data.items()}

    if threads <= 1:
        outcomes = [isolated(job) for job in jobs]
    else:
        executor = ParallelExecutor(num_threads=threads, max_errors=len(jobs) + 1, disable_progress_bar=True)
        outcomes = executor.execute(isolated, jobs)
    parent = dspy.settings.usage_tracker
    results = []
    for outcome in outcomes:
        if isinstance(outcome, tuple):
            result, used = outcome
            if parent is not None:
                for lm, entries in used.items():
                    parent.usage_data[lm].extend(entries)
            results.append(result)
        else:
            results.append(outcome)
    return results
