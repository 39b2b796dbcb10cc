"""MarkovScale: spend a call budget the way the calibration says pays -- one call, refinement, a vote, or both."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import dspy
from dspy.utils.parallelizer import ParallelExecutor

from markovscale_dspy._exceptions import ConfigurationError, MarkovScaleError, NotCalibratedError, RoundZeroError
from markovscale_dspy._warnings import warn
from markovscale_dspy.core.answers import AnswerKey
from markovscale_dspy.core.model import TransitionModel
from markovscale_dspy.core.planner import KINDS, MAX_CALLS_LIMIT, Plan, Strategy, plan
from markovscale_dspy.core.policies import FixedPolicy
from markovscale_dspy.core.validation import check_int, check_number
from markovscale_dspy.core.voting import plurality_winner
from markovscale_dspy.refine.adaptive import VoteStopper, best_budget
from markovscale_dspy.refine.loop import (
    Call,
    Outcome,
    RefineAccount,
    RefinedPrediction,
    adrive,
    describe,
    drive,
    traced_rounds,
    unrecoverable,
)
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
from markovscale_dspy.spending import DollarCap, SpendingStopped, cap_reached, dollar_cap
from markovscale_dspy.tracing import annotate, carry_context, span
from markovscale_dspy.usage import Usage, measure_usage

__all__ = ["MarkovScale", "SampleChain", "ScaleAccount", "ScaledPrediction"]

#: Where a MarkovScale's calibration sits in its saved state.
_STATE_KEY = "refine.markov"


@dataclass(frozen=True)
class ScaleAccount:
    """MarkovScale's account of one answer: what ran, what it was predicted to score, what every chain did.

    Attributes:
        plan: What ran: ``"single"``, ``"refine"``, ``"vote"`` or ``"refine_vote"``.
        samples: Independent chains run (1 for single and refine; an adaptive vote may stop before its budget).
        rounds: Refinement rounds per chain.
        reason: Why: ``"best"`` (the plan's top strategy), ``"uncertain"`` (the confidence gate held a predicted
            gain back), ``"uncalibrated"`` (no calibration: one call) or ``"requested"`` (``run_strategy``).
        predicted: The strategy's predicted accuracy and interval (``None`` without a calibration).
        chains: Every chain's MarkovRefine account (``None`` where its sample failed).
        errors: Why a chain failed, per chain (``None`` if it did not).
        usage: LM calls and tokens of every chain.
        votes: Final answers and their votes, most voted first.
        selected_chain: The chain whose answer was returned.
        stop_reason: Why the vote stopped where it did: ``"settled"`` (the remaining chains could not change its
            answer), ``"not_worth_a_call"`` (one more chain was not worth ``call_cost``), ``"max_calls"`` (the plan's
            budget), ``"max_dollars"`` (the dollar cap refused the next call) or ``"fixed"`` (``adaptive=False``,
            one chain, or no vote model: every planned chain ran).
        stop_info: The numbers behind it: ``posterior`` (that the returned answer is correct, under the calibrated
            vote model), ``gain`` (what going on was expected to add, net of its cost) and ``budget`` (chains the
            plan allowed).
        unused: With ``speculate``, the usage of chains that answered after the vote was decided (paid, no vote).
        cancelled: With ``speculate``, chains cancelled in flight before their answer was read (not counted as paid:
            a provider that had already sent the answer when the request was cancelled may still bill it).
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
    stop_reason: str = "fixed"
    stop_info: dict[str, Any] = field(default_factory=dict)
    unused: list[dict[str, Any]] = field(default_factory=list)
    cancelled: int = 0

    @property
    def calls(self) -> int:
        """LM calls that reached a provider (cache hits are free): every voting chain's, and with ``speculate`` the
        chains that answered after the decision (paid, not used)."""
        return sum(u.get("calls", 0) for u in [*self.usage, *self.unused])

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
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    @classmethod
    def failed(cls, error: BaseException, usage: dict[str, int]) -> SampleChain:
        """A chain that raised: its round 0's cause (a RoundZeroError wraps it), kept to decide who must hear."""
        cause = error.__cause__ if isinstance(error, RoundZeroError) and error.__cause__ is not None else error
        return cls(None, describe(cause), usage, exception=error)


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
        concurrency: LM-backed chains in flight at once (threads in ``forward``, tasks in ``aforward``; default
            ``dspy.settings.num_threads``).
        adaptive: Decide per question, as answers arrive (default): a vote stops once the calibrated vote model says
            one more chain is not worth ``call_cost`` per call -- at ``call_cost=0``, once the remaining chains
            cannot change its answer, so it returns exactly the full vote's answer with fewer calls. The plan bounds
            the calls (an adaptive vote gets the budget that maximises its own expected accuracy minus
            ``call_cost`` per expected call). With ``concurrency > 1`` the chains the rule needs whatever they
            answer are launched together, so answers and calls stay those of the one-at-a-time rule. ``False`` runs
            every planned chain.
        speculate: In ``aforward``: keep ``concurrency`` chains in flight (its-hub's way), decide as they return,
            and cancel the rest once the vote is decided -- faster, but chains that answered after the decision
            are paid and not used (``pred.markovscale.unused``, ``cancelled``). ``forward`` (threads cannot cancel a
            request in flight) launches only the chains the vote needs, and warns.
        max_dollars: A hard cap on what one call spends: before each LM call its worst case must fit in what is
            left, or it is not made and no further chain starts; the vote counts the chains that finished
            (``stop_reason="max_dollars"``, spending in ``stop_info["dollar_cap"]``). Needs a price and
            ``max_tokens`` for every LM.

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
        >>> scale.plan().kind, pred.markovscale.plan, pred.markovscale.stop_info["budget"]
        ('vote', 'vote', 3)
        >>> pred.markovscale.calls < 3 or pred.markovscale.stop_reason == "max_calls"  # stops once the vote is settled
        True
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
        concurrency: int | None = None,
        adaptive: bool = True,
        speculate: bool = False,
        max_dollars: float | None = None,
    ):
        super().__init__()
        check_int("max_calls", max_calls, 1, MAX_CALLS_LIMIT)
        check_number("call_cost", call_cost, 0, 1, hi_open=True, unit="accuracy per LM call")
        check_number("min_prob_gain", min_prob_gain, 0, 1)
        strategies = tuple(strategies) if not isinstance(strategies, str) else (strategies,)
        if not strategies or any(k not in KINDS for k in strategies):
            raise ConfigurationError(f"strategies must be a non-empty subset of {KINDS}, got {strategies!r}")
        check_int("concurrency", concurrency, 1, none_ok=True)
        check_number("max_dollars", max_dollars, 0, none_ok=True, unit="dollars")
        for name, flag in (("adaptive", adaptive), ("speculate", speculate)):
            if not isinstance(flag, bool):
                raise ConfigurationError(f"{name} must be True or False, got {flag!r}")
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
        self.concurrency = concurrency
        self.adaptive = adaptive
        self.speculate = speculate
        self.max_dollars = max_dollars

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
        strategy = chosen.chosen.strategy
        if self.adaptive and strategy.kind in ("vote", "refine_vote"):
            # An adaptive vote rarely spends its budget, so it deserves a larger one than a fixed vote would.
            budget = best_budget(self.model, strategy.rounds, self.max_calls, self.call_cost)
            if budget:
                strategy = Strategy(budget, strategy.rounds)
                return strategy, chosen.reason, self._predicted_for(strategy)
        return strategy, chosen.reason, _predicted(chosen.chosen)

    def strategy(self) -> Strategy:
        """What :meth:`forward` runs: the plan's strategy, with an adaptive vote's budget (its own best)."""
        return self._choice()[0]

    def forward(self, **inputs: Any) -> ScaledPrediction:
        """Answer ``inputs`` with the planned strategy."""
        strategy, reason, predicted = self._choice()
        return _annotated(self._run(strategy, reason, predicted, inputs))

    async def aforward(self, **inputs: Any) -> ScaledPrediction:
        """Async twin of :meth:`forward`."""
        strategy, reason, predicted = self._choice()
        return _annotated(await self._arun(strategy, reason, predicted, inputs))

    def run_strategy(self, samples: int, rounds: int, **inputs: Any) -> ScaledPrediction:
        """Run all ``samples`` chains of ``rounds`` refinement rounds and vote, whatever the plan says and without
        stopping early (what :meth:`replay` reads adaptive runs off)."""
        strategy = self._strategy(samples, rounds)
        with span("MarkovScale.run_strategy", root="call"):  # not a module call: no tracer opened a span for it
            return _annotated(self._run(strategy, "requested", self._predicted_for(strategy), inputs, adaptive=False))

    async def arun_strategy(self, samples: int, rounds: int, **inputs: Any) -> ScaledPrediction:
        """Async twin of :meth:`run_strategy`."""
        strategy = self._strategy(samples, rounds)
        with span("MarkovScale.arun_strategy", root="call"):
            return _annotated(
                await self._arun(strategy, "requested", self._predicted_for(strategy), inputs, adaptive=False)
            )

    def run_samples(self, rounds: Sequence[int], **inputs: Any) -> list[SampleChain]:
        """Independent chains from fresh samples ``j = 0, 1, ...``, chain ``j`` refined ``rounds[j]`` rounds, and no
        vote: the raw material of every vote and hybrid strategy (the strategy ``n x T`` is the vote over chains
        ``0..n-1`` at round ``T``, exactly as :meth:`run_strategy` draws it)."""
        self.refine._check_inputs(inputs)
        rounds = [check_int("rounds", r, 0, MAX_SAMPLES) for r in rounds]
        with span("MarkovScale.run_samples", root="call"):
            return self._sample_chains(rounds, dict(inputs))

    def _strategy(self, samples: int, rounds: int) -> Strategy:
        check_int("samples", samples, 1, MAX_SAMPLES)
        check_int("rounds", rounds, 0, MAX_SAMPLES)
        return Strategy(samples, rounds)

    def _predicted_for(self, strategy: Strategy) -> dict[str, Any] | None:
        """The plan's prediction for ``strategy`` (a fixed run of it) and, when it stops adaptively, the rule's exact
        expected accuracy and calls."""
        if self.model is None:
            return None
        try:
            predicted = _predicted(self.plan().prediction(strategy.samples, strategy.rounds))
        except KeyError:
            return None
        stopper = self._stopper(strategy)
        if stopper is not None:
            expected = stopper.expected
            predicted["adaptive"] = {
                "accuracy": expected["accuracy"],
                "calls": expected["chains"] * (strategy.rounds + 1),
            }
        return predicted

    def _run(
        self, strategy: Strategy, reason: str, predicted: Any, inputs: dict[str, Any], adaptive: bool = True
    ) -> ScaledPrediction:
        self.refine._check_inputs(inputs)
        with dollar_cap(DollarCap.for_module(self.max_dollars, self, self.refine.refiner_lm)) as cap:
            return _capped(cap, self._run_capped(strategy, reason, predicted, inputs, adaptive))

    def _run_capped(
        self, strategy: Strategy, reason: str, predicted: Any, inputs: dict[str, Any], adaptive: bool
    ) -> ScaledPrediction:
        stopper = self._stopper(strategy) if adaptive else None
        if self.speculate and stopper is not None:
            warn(
                "MarkovScale(speculate=True) speculates only in aforward/acall (asyncio can cancel requests a decided "
                "vote no longer needs, threads cannot); this sync call launches only the chains the vote needs"
            )
        setup = self._setup([strategy.rounds])
        if stopper is None:
            runs = self._sample_chains([strategy.rounds] * strategy.samples, dict(inputs), setup=setup)
            return self._finish(strategy, reason, predicted, runs)
        runs: list[SampleChain] = []
        while not cap_reached() and (batch := stopper.next_batch(_keys(runs), self._threads(strategy.samples))):
            runs += self._sample_chains([strategy.rounds] * batch, dict(inputs), first=len(runs), setup=setup)
            _raise_what_must_be_heard(runs)  # no further wave for a key that was rejected
        return self._finish(strategy, reason, predicted, runs, stopper)

    async def _arun(
        self, strategy: Strategy, reason: str, predicted: Any, inputs: dict[str, Any], adaptive: bool = True
    ) -> ScaledPrediction:
        self.refine._check_inputs(inputs)
        with dollar_cap(DollarCap.for_module(self.max_dollars, self, self.refine.refiner_lm)) as cap:
            return _capped(cap, await self._arun_capped(strategy, reason, predicted, inputs, adaptive))

    async def _arun_capped(
        self, strategy: Strategy, reason: str, predicted: Any, inputs: dict[str, Any], adaptive: bool
    ) -> ScaledPrediction:
        gate = asyncio.Semaphore(self._threads(strategy.samples))
        setup = self._setup([strategy.rounds])

        async def one(index: int) -> SampleChain:
            async with gate:
                return await self._asample_chain(index, strategy.rounds, dict(inputs), setup)

        stopper = self._stopper(strategy) if adaptive else None
        if stopper is None:
            runs = list(await asyncio.gather(*(one(j) for j in range(strategy.samples))))
            return self._finish(strategy, reason, predicted, runs)
        if self.speculate:
            runs, unused, cancelled = await self._speculate(stopper, one)
            return self._finish(strategy, reason, predicted, runs, stopper, unused=unused, cancelled=cancelled)
        runs = []
        while not cap_reached() and (batch := stopper.next_batch(_keys(runs), self._threads(strategy.samples))):
            # gather cancels the batch's other tasks if one is cancelled (a caller's timeout): LiteLLM's async
            # client then closes their requests, so the server stops working on them
            runs += await asyncio.gather(*(one(j) for j in range(len(runs), len(runs) + batch)))
            _raise_what_must_be_heard(runs)
        return self._finish(strategy, reason, predicted, runs, stopper)

    async def _speculate(
        self, stopper: VoteStopper, one: Callable[[int], Any]
    ) -> tuple[list[SampleChain], list[SampleChain], int]:
        """Keep ``concurrency`` chains in flight, decide on the chains in index order as they return, and cancel
        what is in flight once the rule stops. Returns the chains that vote, the ones that answered after the
        decision (paid, not used) and how many were cancelled before answering."""
        width = self._threads(stopper.budget)
        pending: dict[asyncio.Task, int] = {}
        done: dict[int, SampleChain] = {}
        launched = 0
        used: list[SampleChain] = []
        try:
            while True:
                while len(pending) < width and launched < stopper.budget and not cap_reached():
                    pending[asyncio.ensure_future(one(launched))] = launched
                    launched += 1
                if not pending:  # the dollar cap stopped new chains: the vote is what finished
                    return used, [done[j] for j in sorted(done)], 0
                finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    done[pending.pop(task)] = task.result()
                while len(used) in done:  # the rule reads the chains in index order, like the sequential run
                    used.append(done.pop(len(used)))
                    if stopper.decide(_keys(used))[0]:
                        return used, [done[j] for j in sorted(done)], len(pending)
        finally:
            for task in pending:  # LiteLLM's async client closes the request: the server stops working on it
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    def replay(self, recorded: ScaledPrediction, **inputs: Any) -> ScaledPrediction:
        """What this module would have answered, read off a recorded run instead of calling the LM.

        Chain ``j`` of a question is the same fresh sample (and the same refinements) whichever strategy draws it,
        and the stopping rule decides from the chains before it, so an adaptive run is a prefix of a recorded run
        of all the plan's chains (``run_strategy(samples, rounds)`` or ``adaptive=False``). Reading it off that run
        compares stopping rules on the same samples; it equals the live run at ``concurrency=1`` (and at any
        concurrency, which launches only chains the rule needs).

        Raises:
            ConfigurationError: ``recorded`` is not a MarkovScale prediction, or holds fewer chains or rounds than
                this module would use.
        """
        account = getattr(recorded, "markovscale", None)
        if not isinstance(account, ScaleAccount):
            raise ConfigurationError(f"replay needs a MarkovScale prediction (with .markovscale), got {recorded!r:.80}")
        self.refine._check_inputs(inputs)
        strategy, reason, predicted = self._choice()
        recorded_runs = [_prefix(chain, error, usage, strategy.rounds) for chain, error, usage in _chains_of(account)]
        stopper = self._stopper(strategy)
        used = strategy.samples
        if stopper is not None:
            used = 0
            while used <= len(recorded_runs) and (batch := stopper.next_batch(_keys(recorded_runs[:used]), 1)):
                used += batch
        if used > len(recorded_runs):
            raise ConfigurationError(
                f"this module would use more than {len(recorded_runs)} chains of {strategy.rounds} rounds, but the "
                f"recorded run holds {len(recorded_runs)}; record with run_strategy({strategy.samples}, "
                f"{strategy.rounds}) (see strategy())"
            )
        return self._finish(strategy, reason, predicted, recorded_runs[:used], stopper)

    def _sampling(self, index: int) -> dict[str, Any]:
        return {"rollout": sample_rollout(self.rollout_seed, index), "temperature": self.temperature}

    def _threads(self, jobs: int) -> int:
        return max(1, min(jobs, self.concurrency or dspy.settings.num_threads or jobs))

    def _stopper(self, strategy: Strategy) -> VoteStopper | None:
        if not self.adaptive or self.model is None:
            return None
        return VoteStopper.for_strategy(self.model, strategy.samples, strategy.rounds, self.call_cost)

    def _setup(self, rounds: Sequence[int]) -> tuple[bool, tuple[Any, Any] | None]:
        """What every chain of one call shares, resolved once: whether the program pins LMs, and the refiner's
        ``(lm to pass, answering lm)`` (only when some chain refines; a misconfiguration raises here)."""
        return has_pinned_lm(self.program), self.refine._refiner_lm() if any(rounds) else None

    def _outer(self, index: int, refiner: tuple[Any, Any] | None) -> Any:
        """Chain ``index``'s rollout namespace for its refinements, so chains that reach the same answer still
        refine it independently."""
        own = sample_rollout(self.rollout_seed, index)
        return compose_rollout(rollout_of(refiner[1]), own) if refiner is not None else None

    def _sample_chain(
        self, index: int, rounds: int, inputs: dict[str, Any], setup: tuple[bool, tuple[Any, Any] | None]
    ) -> SampleChain:
        """Worker: sample ``index``, refined ``rounds`` rounds. Never raises (the executor would swallow it): a
        failure is returned, and :func:`_raise_what_must_be_heard` decides."""
        pinned, refiner = setup
        if cap_reached():
            return SampleChain.failed(
                SpendingStopped("the dollar cap was reached before this chain started", "cap"), {}
            )
        outer = self._outer(index, refiner)

        def run(call: Call) -> Outcome:
            if call.round == 0:
                return fresh_sample(self.program, call.kwargs, pinned=pinned, **self._sampling(index))
            return self.refine._call(call, outer=outer, refiner=refiner)

        with measure_usage() as usage, span(f"chain {index}", lambda: {"chain": index, "rounds": rounds}):
            try:
                state, chain = self.refine._chain(inputs, FixedPolicy(), rounds, "last")
                prediction = drive(chain, run, traced_rounds(state))
            except Exception as exc:
                return SampleChain.failed(exc, usage.to_dict())
        return SampleChain(prediction, None, usage.to_dict())

    async def _asample_chain(
        self, index: int, rounds: int, inputs: dict[str, Any], setup: tuple[bool, tuple[Any, Any] | None]
    ) -> SampleChain:
        """Async twin of :meth:`_sample_chain`."""
        pinned, refiner = setup
        if cap_reached():
            return SampleChain.failed(
                SpendingStopped("the dollar cap was reached before this chain started", "cap"), {}
            )
        outer = self._outer(index, refiner)

        async def run(call: Call) -> Outcome:
            if call.round == 0:
                return await afresh_sample(self.program, call.kwargs, pinned=pinned, **self._sampling(index))
            return await self.refine._acall(call, outer=outer, refiner=refiner)

        with measure_usage() as usage, span(f"chain {index}", lambda: {"chain": index, "rounds": rounds}):
            try:
                state, chain = self.refine._chain(inputs, FixedPolicy(), rounds, "last")
                prediction = await adrive(chain, run, traced_rounds(state))
            except Exception as exc:
                return SampleChain.failed(exc, usage.to_dict())
        return SampleChain(prediction, None, usage.to_dict())

    def _sample_chains(
        self, rounds: list[int], inputs: dict[str, Any], *, first: int = 0, setup: Any = None
    ) -> list[SampleChain]:
        """Chains ``j = first, first + 1, ...`` (chain ``j`` refined ``rounds[j - first]`` rounds) concurrently; their
        LM usage is added to the caller's tracker (DSPy's trackers do not see worker threads)."""
        setup = self._setup(rounds) if setup is None else setup
        jobs = [lambda j=j, r=r: self._sample_chain(j, r, inputs, setup) for j, r in enumerate(rounds, start=first)]
        results = _run_isolated(jobs, self._threads(len(jobs)))
        return [r if isinstance(r, SampleChain) else SampleChain(None, f"executor: {r!r}") for r in results]

    def _finish(
        self,
        strategy: Strategy,
        reason: str,
        predicted: Any,
        runs: list[SampleChain],
        stopper: VoteStopper | None = None,
        *,
        unused: Sequence[SampleChain] = (),
        cancelled: int = 0,
    ) -> ScaledPrediction:
        _raise_what_must_be_heard(runs)
        keys = _keys(runs)
        winner = plurality_winner(keys)
        if winner is None:
            errors = Counter(run.error for run in runs)
            raise RoundZeroError(
                f"every one of the {len(runs)} samples failed: "
                + "; ".join(f"{n}x {e}" for e, n in errors.most_common(3))
            )
        account = ScaleAccount(
            plan=strategy.kind,
            samples=len(runs),
            rounds=strategy.rounds,
            reason=reason,
            predicted=predicted,
            chains=[run.prediction.markovscale if run.error is None else None for run in runs],
            errors=[run.error for run in runs],
            usage=[run.usage for run in runs],
            votes=Counter(k for k in keys if k is not None).most_common(),
            selected_chain=winner,
            **_stop_of(stopper, keys, strategy.samples),
            unused=[run.usage for run in unused],
            cancelled=cancelled,
        )
        outputs = account.chains[winner].trajectory[-1]["outputs"]
        compat = {} if "plan" in outputs else {"plan": strategy.kind}
        prediction = ScaledPrediction(**outputs, **compat)
        prediction.markovscale = account
        return prediction


def _capped(cap: DollarCap | None, prediction: ScaledPrediction) -> ScaledPrediction:
    """The prediction, saying so when the dollar cap stopped the vote (and what it spent)."""
    if cap is not None:
        account = prediction.markovscale
        info = {**account.stop_info, "dollar_cap": cap.to_dict()}
        prediction.markovscale = replace(
            account, stop_reason="max_dollars" if cap.exhausted else account.stop_reason, stop_info=info
        )
    return prediction


def _annotated(prediction: ScaledPrediction) -> ScaledPrediction:
    """The prediction, after telling the user's tracer (the module's span) what ran and why it stopped."""
    annotate(lambda: _scale_attributes(prediction.markovscale))
    return prediction


def _scale_attributes(account: ScaleAccount) -> dict[str, Any]:
    total = Usage()
    for used in [*account.usage, *account.unused]:
        total = total + Usage.from_dict(used)
    predicted = account.predicted or {}
    return {
        "plan": account.plan,
        "samples": account.samples,
        "rounds": account.rounds,
        "reason": account.reason,
        "stop_reason": account.stop_reason,
        "votes": ", ".join(f"{n}" for _, n in account.votes),
        "winning_votes": account.votes[0][1] if account.votes else 0,
        "failed_samples": account.failed_samples,
        "cancelled": account.cancelled,
        "posterior": account.stop_info.get("posterior"),
        "predicted_accuracy": predicted.get("accuracy"),
        "calls": total.calls,
        "prompt_tokens": total.prompt_tokens,
        "completion_tokens": total.completion_tokens,
        "cost": total.cost,
    }


def _raise_what_must_be_heard(runs: Sequence[SampleChain]) -> None:
    """A failed chain is a sample that does not vote, unless no other chain can do better: a misconfiguration of
    this package (a program that returns no Prediction, a missing refiner LM) or an LM failure no retry can mend (a
    rejected key) is raised, naming the fix."""
    for run in runs:
        error = run.exception
        if error is None:
            continue
        if isinstance(error, MarkovScaleError) and not isinstance(error, RoundZeroError):
            raise error
        fix = unrecoverable(error)
        if fix is not None:
            raise ConfigurationError(f"{run.error}: {fix}") from error


def _keys(runs: Sequence[SampleChain]) -> list[Hashable | None]:
    """Each chain's final answer key (``None`` for a failed chain: it does not vote)."""
    return [None if r.error is not None else r.prediction.markovscale.trajectory[-1]["answer_key"] for r in runs]


def _stop_of(stopper: VoteStopper | None, keys: list[Hashable | None], budget: int) -> dict[str, Any]:
    if stopper is None:
        return {"stop_reason": "fixed", "stop_info": {"budget": budget}}
    _, info = stopper.decide(keys)
    return {
        "stop_reason": info["reason"],
        "stop_info": {"posterior": info["posterior"], "gain": info["gain"], "budget": budget},
    }


def _chains_of(account: ScaleAccount) -> list[tuple[RefineAccount | None, str | None, dict[str, Any]]]:
    return list(zip(account.chains, account.errors, account.usage, strict=True))


def _prefix(chain: RefineAccount | None, error: str | None, usage: dict[str, Any], rounds: int) -> SampleChain:
    """A recorded chain read at ``rounds`` refinement rounds: its answer then and the calls it had used."""
    if chain is None:
        return SampleChain(None, error, usage)
    if len(chain.trajectory) <= rounds:
        raise ConfigurationError(
            f"the recorded chains have {len(chain.trajectory) - 1} refinement rounds; this module's plan needs {rounds}"
        )
    kept = chain.trajectory[: rounds + 1]
    spent = Usage()
    for entry in kept:
        spent = spent + Usage.from_dict(entry.get("usage"))
    account = replace(
        chain,
        rounds=rounds,
        selected_round=rounds,
        trajectory=kept,
        failed_rounds=sum(e.get("error") is not None for e in kept[1:]),
    )
    prediction = RefinedPrediction(**kept[-1]["outputs"])
    prediction.markovscale = account
    return SampleChain(prediction, None, spent.to_dict())


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
        outcomes = executor.execute(carry_context(isolated), jobs)
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
