"""MarkovRefine: wrap a DSPy program; round 0 runs it, later rounds refine the previous answer while it pays."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import types
import weakref
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import dspy
import orjson
from dspy.utils.saving import get_dependency_versions

from markovscale_dspy._exceptions import ConfigurationError, NotCalibratedError, StateError
from markovscale_dspy._warnings import warn
from markovscale_dspy.core.answers import AnswerKey, default_answer_key
from markovscale_dspy.core.model import TransitionModel
from markovscale_dspy.core.policies import Abstain, BeliefPolicy, FixedPolicy, Policy, resolve_policy
from markovscale_dspy.core.validation import check_callable, check_int, check_number
from markovscale_dspy.refine.budget import BudgetResult, allocate
from markovscale_dspy.refine.logprobs import LOGPROBS_FIELD, answer_confidence
from markovscale_dspy.refine.loop import (
    SELECT_MODES,
    Call,
    ChainState,
    Outcome,
    account_attributes,
    adrive,
    describe,
    drive,
    run_chain,
    traced_rounds,
)
from markovscale_dspy.refine.sampling import ROLLOUT_STRIDE, compose_rollout
from markovscale_dspy.refine.signatures import answer_fields, infer_signature, refinement_signature, uses_reasoning
from markovscale_dspy.refine.state import (
    MarkovState,
    drop_unrestorable_lms,
    load_into,
    read_state_file,
    scrub_lm_state,
)
from markovscale_dspy.spending import DollarCap, SpendingStopped, dollar_cap, metered
from markovscale_dspy.tracing import annotate, scrubbed_errors, span

__all__ = ["MarkovRefine"]

logger = logging.getLogger(__name__)

#: Rounds of one chain share a rollout namespace of ``ROLLOUT_STRIDE`` ids.
MAX_ROUNDS_LIMIT = ROLLOUT_STRIDE - 1
#: Marker: take the outer rollout id from the LM that answers the refinement.
_FROM_LM = object()


class MarkovRefine(dspy.Module):
    """Sequential refinement that stops by the Markov-chain theory of when refinement pays.

    Round 0 calls the wrapped program. Each refinement round calls ``self.refiner``, an ordinary DSPy predictor
    that sees the original inputs plus ``previous_<field>`` for every answer field and produces the answer again.
    A stopping policy decides before every round whether to run it:

    * ``"closed_form"`` (default): the paper's rule, ``optimal_rounds`` of the calibrated chain for every question,
      so a task where refinement hurts costs exactly one call;
    * ``"belief"``: per question, a hidden-Markov belief over which answer is correct, updated by whether the
      answer stayed, changed or returned to an earlier one and, when the LM gives token log-probabilities, by each
      answer's confidence, with Bayes-optimal (expectimax) stopping; stable answers stop early;
    * ``"fixed"``: always ``max_rounds`` (the baseline).

    Calibrate with :class:`MarkovCalibrator`, or assign a fitted :class:`TransitionModel` to ``.model``.

    Every refinement round is a fresh sample (its own ``rollout_id`` and ``temperature > 0``), so DSPy's cache never
    turns a refinement into a replay of an earlier round, and the LMs pinned on the wrapped program are respected.
    A refinement round that fails (LM error, parse error, empty answer) keeps the previous answer and is recorded
    in the trajectory; only a failure of round 0 raises (:class:`RoundZeroError`).

    Args:
        program: The DSPy program to refine (e.g. ``dspy.ChainOfThought("question -> answer")``).
        signature: The program's task signature; inferred when the program has a single predictor.
        max_rounds: Largest number of refinement rounds.
        round_cost: Accuracy (0.01 = one point) a round must be expected to add to be worth its cost (default 0).
        value_per_correct: Instead of ``round_cost``: dollars a correct answer is worth. The stopping cost is then
            the calibration's measured dollars per refinement round divided by this (a round costing $0.002 when a
            correct answer is worth $0.20 must add a point of accuracy). Needs a calibration that measured dollars.
        policy: ``"closed_form"``, ``"belief"``, ``"fixed"``, another registered name, or a policy object.
        temperature: Sampling temperature of refinement rounds (must be > 0).
        answer_key: Maps a round's answer fields to its identity (whether two rounds gave "the same answer");
            defaults to normalised values (whitespace, case, numbers in canonical form).
        min_prob_improves: Refine only if the calibration's posterior probability that refinement helps reaches
            this; below, answer in one call with ``stop_reason="uncertain"``. ``None``: the policy's default (0.9
            for ``"belief"``, 0 for ``"closed_form"``, which applies the paper's rule unchanged).
        select: ``"last"`` returns the final round's answer; ``"best"`` the visited answer with the highest smoothed
            posterior of being correct (forward-backward over the rounds).
        rollout_seed: Namespace of this module's rollout ids (change it to draw different samples).
        instructions: Replaces the default refinement instructions.
        refiner_lm: LM for refinement rounds (e.g. a stronger model than the drafter, or a cheaper one). By default
            the refiner uses its own pinned LM if any (``set_lm``), then ``refiner_lm``, then the wrapped program's
            single LM, then ``dspy.settings.lm``; with none of these the first refinement round raises
            ConfigurationError. The transition rates belong to the (round-0 LM, refiner LM) pair: a calibration
            records both names, and running with other LMs warns.
        confidence: Answer confidence from token log-probabilities (see :mod:`markovscale_dspy.refine.logprobs`):
            ``"auto"`` (default) reads it whenever a round's prediction carries ``logprobs`` (an LM built with
            ``logprobs=True``); ``True`` also asks for them -- on the refiner's calls, and on round 0 when the program
            uses the configured LM (``dspy.configure`` / ``dspy.context``) -- and removes them from the outputs;
            ``False`` ignores them; a callable ``fn(prediction) -> float | None`` defines it yourself. Without
            log-probabilities everything behaves exactly as if confidence did not exist.

    Example:
        >>> import dspy
        >>> from markovscale_dspy import MarkovRefine, TransitionModel
        >>> refine = MarkovRefine(dspy.ChainOfThought("question -> answer"), max_rounds=3)
        >>> refine.model = TransitionModel.fit([[False, True, True], [True, True, True], [False, True, True]])
        >>> refine.planned_rounds()  # refinement helps on this toy calibration
        3

        With an LM configured, ``refine(question="...")`` returns the program's outputs untouched, with
        MarkovRefine's account in ``pred.markovscale`` (rounds, stop_reason, trajectory, calls); the same values
        are also fields (``pred.rounds``, ...) where the program has no output of that name.
    """

    def __init__(
        self,
        program: dspy.Module,
        *,
        signature: str | type[dspy.Signature] | None = None,
        max_rounds: int = 4,
        round_cost: float | None = None,
        policy: str | Policy = "closed_form",
        temperature: float = 0.7,
        answer_key: AnswerKey | None = None,
        min_prob_improves: float | None = None,
        select: str = "last",
        rollout_seed: int = 0,
        instructions: str | None = None,
        refiner_lm: dspy.BaseLM | None = None,
        value_per_correct: float | None = None,
        confidence: bool | str | Any = "auto",
    ):
        super().__init__()
        task = infer_signature(program, signature)
        check_int("max_rounds", max_rounds, 0, MAX_ROUNDS_LIMIT)
        check_int("rollout_seed", rollout_seed, 0)
        check_number("round_cost", round_cost, 0, 1, hi_open=True, unit="accuracy per round", none_ok=True)
        check_number("value_per_correct", value_per_correct, 0, lo_open=True, unit="dollars", none_ok=True)
        if round_cost is not None and value_per_correct is not None:
            raise ConfigurationError(
                f"give round_cost ({round_cost}) or value_per_correct ({value_per_correct}), not both: "
                "value_per_correct derives the round cost from the calibration's measured dollars per round"
            )
        check_number("temperature", temperature, 0, lo_open=True, unit="refinement rounds must be fresh samples")
        if answer_key is not None:
            check_callable("answer_key", answer_key, "answer_key(outputs dict) -> hashable")
        check_number("min_prob_improves", min_prob_improves, 0, 1, none_ok=True)
        if refiner_lm is not None and not isinstance(refiner_lm, dspy.BaseLM):
            raise ConfigurationError(
                f"refiner_lm must be a dspy LM (e.g. dspy.LM('openai/gpt-4o')), got {refiner_lm!r}"
            )
        if select not in SELECT_MODES:
            raise ConfigurationError(f"select must be one of {SELECT_MODES}, got {select!r}")
        if not (confidence in ("auto", True, False) or (callable(confidence) and not isinstance(confidence, bool))):
            raise ConfigurationError(
                f"confidence must be 'auto', True, False or a function prediction -> float | None, got {confidence!r}"
            )
        resolve_policy(policy)  # fail now on an unknown policy, not at the first call

        self.program = program
        self.signature = task
        self.max_rounds = max_rounds
        self.round_cost = 0.0 if round_cost is None else float(round_cost)
        self.value_per_correct = None if value_per_correct is None else float(value_per_correct)
        self.policy = policy
        self.temperature = float(temperature)
        self.answer_key = answer_key
        self.min_prob_improves = min_prob_improves
        self.select = select
        self.rollout_seed = rollout_seed
        self.instructions = instructions
        self.refiner_lm = refiner_lm
        self.confidence = confidence
        self.answer_fields = answer_fields(task)
        refine_sig = refinement_signature(task, instructions)
        self.refiner = dspy.ChainOfThought(refine_sig) if uses_reasoning(program) else dspy.Predict(refine_sig)
        # The refiner is ours: its saved state drops endpoints and keys even when a parent program saves it.
        _scrub_saved_state(refiner_predict(self.refiner))
        self.markov = MarkovState(list(task.input_fields), self.answer_fields)

    # Learned state -----------------------------------------------------------------------------------------------

    #: Independent samples per question a calibration draws unless told otherwise (MarkovRefine plans no votes).
    default_parallel_samples = 0

    def chain_module(self) -> MarkovRefine:
        """The module whose chains a calibration runs and which records it: this one."""
        return self

    def calibration_plan(self) -> None:
        """What a calibration report shows as the plan: MarkovRefine has none (its policy decides per question)."""
        return None

    def record_calibration(self, model: TransitionModel, *, spend: dict[str, Any] | None = None) -> None:
        """Keep a calibration: the fitted model, the names of the LMs it was fitted for (the rates belong to them)
        and what a round cost (for ``value_per_correct``). :class:`MarkovCalibrator` calls this."""
        self.model = model
        self.markov.calibrated_for = self.lm_names()
        self.markov.spend = spend

    @property
    def model(self) -> TransitionModel | None:
        """The calibrated chain (``None`` until calibrated); assign a fitted model to reuse it."""
        return self.markov.model

    @model.setter
    def model(self, value: TransitionModel | None) -> None:
        """Assigning a model forgets what the previous one was fitted for and spent (a calibration sets both)."""
        if value is not None and not isinstance(value, TransitionModel):
            raise ConfigurationError(f"model must be a TransitionModel or None, got {type(value).__name__}")
        self.markov.model = value
        self.markov.calibrated_for = None
        self.markov.spend = None

    def lm_names(self) -> dict[str, Any]:
        """The names of the LMs this module runs with now: ``{"program": [round 0's], "refiner": refiner's}``.

        Names only (``lm.model``, plus the models behind a router group), never endpoints or keys; ``None`` where
        no LM resolves. A calibration records them, and :meth:`forward` warns when they differ.
        """
        program = sorted(
            {_lm_name(p.lm or dspy.settings.lm) or "none" for _, p in self.program.named_predictors()}
        ) or [_lm_name(dspy.settings.lm) or "none"]
        try:
            refiner = _lm_name(self._refiner_lm()[1])
        except ConfigurationError:
            refiner = None
        return {"program": program, "refiner": refiner}

    def stopping_cost(self) -> float:
        """The cost one refinement round must beat, in accuracy: ``round_cost``, or with ``value_per_correct`` the
        calibration's dollars per refinement round divided by the value of a correct answer.

        Raises:
            NotCalibratedError: ``value_per_correct`` is set but the calibration measured no dollars (none run, or
                the LM's price is unknown).
        """
        if self.value_per_correct is None:
            return self.round_cost
        dollars = self.markov.dollars_per_round()
        if dollars is None:
            raise NotCalibratedError(
                f"value_per_correct={self.value_per_correct} needs the dollars one refinement round costs, and "
                + (
                    "this MarkovRefine is not calibrated"
                    if self.model is None
                    else "its calibration measured none (the LM's price is unknown to LiteLLM)"
                )
                + ": calibrate with an LM whose price LiteLLM knows, give prices in the router config's model_info "
                "(input_cost_per_token, output_cost_per_token) or with litellm.register_model, or use round_cost"
            )
        return dollars / self.value_per_correct

    # Saving and loading -------------------------------------------------------------------------------------------

    def deepcopy(self) -> MarkovRefine:
        """A deep copy (DSPy's). Its refiner saves its own state: when the predictor cannot be deep-copied whole,
        DSPy copies its attributes one by one, which would leave the copy's ``dump_state`` bound to the original."""
        copy = super().deepcopy()
        _scrub_saved_state(refiner_predict(copy.refiner))
        return copy

    def reset_copy(self) -> MarkovRefine:
        """DSPy's ``reset_copy``, with the copy's refiner saving its own state (see :meth:`deepcopy`)."""
        copy = super().reset_copy()
        _scrub_saved_state(refiner_predict(copy.refiner))
        return copy

    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        """DSPy state of the module, with endpoints and headers of pinned LMs removed (they may hold secrets)."""
        return scrub_lm_state(super().dump_state(json_mode=json_mode))

    def save(self, path: str | os.PathLike, save_program: bool = False, modules_to_serialize: Any = None) -> None:
        """Write the state to a ``.json`` file (atomically: a crash mid-write never leaves a half file).

        Only JSON: state is never pickled. Load it with :meth:`load` into a MarkovRefine built the same way.
        """
        path = Path(path)
        if save_program or path.suffix != ".json":
            raise StateError(
                f"MarkovRefine saves its state as JSON only (got {path.name!r}"
                f"{', save_program=True' if save_program else ''}); use a path ending in .json"
            )
        state = self.dump_state()
        state["metadata"] = {"dependency_versions": get_dependency_versions()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        os.replace(tmp, path)

    def load(
        self, path: str | os.PathLike, allow_pickle: bool = False, allow_unsafe_lm_state: bool = False
    ) -> MarkovRefine:
        """Restore a state written by :meth:`save`; nothing is changed unless the whole file is valid.

        Raises:
            StateError: the file is missing, not JSON, corrupt, from another program or an incompatible version.
        """
        state = read_state_file(path)
        MarkovState.parse(state["markov"], self.markov.input_fields, self.markov.answer_fields)  # fail early
        for where in drop_unrestorable_lms(state):
            warn(
                f"{Path(path).name}: the LM pinned at {where} is a router group, which a file cannot restore (it "
                "holds no endpoints or keys); it is left unpinned: pin it again with set_lm(build_lm(group, "
                "router_config=...)) or pass it in dspy.context(lm=...)",
            )
        load_into(self, state, path, "MarkovRefine", allow_unsafe_lm_state)
        return self

    def planned_rounds(self) -> int:
        """Rounds the closed-form rule runs for this module's cost and cap (raises if not calibrated)."""
        return self._require_model("closed_form").optimal_rounds(self.stopping_cost(), self.max_rounds)

    def _require_model(self, policy_name: str) -> TransitionModel:
        if self.model is None:
            raise NotCalibratedError(
                f"policy {policy_name!r} needs a calibrated TransitionModel but this MarkovRefine has none: run "
                "MarkovCalibrator(metric).compile(refine, trainset=...), load a saved state with .load(path), or "
                "assign a fitted model to .model (policy='fixed' needs no model)"
            )
        return self.model

    # Calling -----------------------------------------------------------------------------------------------------

    def forward(self, **inputs: Any) -> dspy.Prediction:
        """Answer ``inputs`` with round 0 plus as many refinement rounds as the policy allows."""
        policy = self._effective_policy()
        state, chain = self._chain(inputs, policy, self.max_rounds, _select_for(policy, self.select))
        return self._annotated(drive(chain, self._call, traced_rounds(state)), policy)

    async def aforward(self, **inputs: Any) -> dspy.Prediction:
        """Async twin of :meth:`forward`."""
        policy = self._effective_policy()
        state, chain = self._chain(inputs, policy, self.max_rounds, _select_for(policy, self.select))
        return self._annotated(await adrive(chain, self._acall, traced_rounds(state)), policy)

    def run_chain(self, rounds: int, **inputs: Any) -> dspy.Prediction:
        """Run round 0 and exactly ``rounds`` refinement rounds, with no early stopping (used for calibration)."""
        check_int("rounds", rounds, 0, MAX_ROUNDS_LIMIT)
        state, chain = self._chain(inputs, FixedPolicy(), rounds, select="last")
        return drive(chain, self._call, traced_rounds(state))

    async def arun_chain(self, rounds: int, **inputs: Any) -> dspy.Prediction:
        """Async twin of :meth:`run_chain`."""
        check_int("rounds", rounds, 0, MAX_ROUNDS_LIMIT)
        state, chain = self._chain(inputs, FixedPolicy(), rounds, select="last")
        return await adrive(chain, self._acall, traced_rounds(state))

    def continue_chain(self, first: dspy.Prediction, rounds: int, **inputs: Any) -> dspy.Prediction:
        """Refine a given round-0 answer exactly ``rounds`` times, with no early stopping.

        :meth:`run_chain` with round 0 read from ``first`` (a prediction of the wrapped program on ``inputs``)
        instead of calling the program, so its account counts only the refinement calls. Refiners continued from
        the same round-0 answers differ only in their refinement rounds: :class:`RefinerOptimizer` compares
        refiners this way, paired.
        """
        check_int("rounds", rounds, 0, MAX_ROUNDS_LIMIT)
        if not isinstance(first, dspy.Prediction):
            raise ConfigurationError(f"first must be the program's dspy.Prediction for round 0, got {first!r:.80}")
        state, chain = self._chain(inputs, FixedPolicy(), rounds, select="last")

        def run(call: Call) -> Outcome:
            return self._outcome(first, None, {}) if call.round == 0 else self._call(call)

        return drive(chain, run, traced_rounds(state))

    def replay(self, recorded: dspy.Prediction, **inputs: Any) -> dspy.Prediction:
        """What this module would have answered, read off a longer recorded chain instead of calling the LM.

        A stopping policy decides from the rounds seen so far, and round ``t`` of a chain depends only on the rounds
        before it, so this module's run is a prefix of any longer chain recorded with the same program, refiner
        and rollout ids (e.g. a ``policy="fixed"`` run of ``max_rounds``). Reading answers off that chain compares
        methods on the same samples: no refinement is its round 0, fixed-N its round N, this policy its stop.

        Args:
            recorded: A prediction of a MarkovRefine run (``pred.markovscale.trajectory``) at least as long as
                this module would go.
            inputs: The question's inputs (as in the recorded call).

        Raises:
            ConfigurationError: ``recorded`` is not a MarkovRefine prediction, or this module would refine beyond
                the rounds it holds.
        """
        account = getattr(recorded, "markovscale", None)
        if account is None:
            raise ConfigurationError(
                f"replay needs a MarkovRefine prediction (with .markovscale), got {recorded!r:.80}"
            )
        trajectory = account.trajectory

        def read(call: Call) -> Outcome:
            if call.round >= len(trajectory):
                raise ConfigurationError(
                    f"this module would run refinement round {call.round}, but the recorded chain has only "
                    f"{len(trajectory) - 1}; record with policy='fixed' and max_rounds >= {self.max_rounds}"
                )
            entry = trajectory[call.round]
            error = None if entry.get("error") is None else RuntimeError(entry["error"])
            return Outcome(None if error else dspy.Prediction(**entry["outputs"]), error, entry.get("usage"))

        policy = self._effective_policy()
        _, chain = self._chain(inputs, policy, self.max_rounds, _select_for(policy, self.select))
        return drive(chain, read)

    def answer_with_budget(
        self,
        examples: Sequence[Any],
        *,
        budget: int,
        max_dollars: float | None = None,
        num_threads: int | None = None,
        display_progress: bool = False,
    ) -> BudgetResult:
        """Answer a batch under a total budget of refinement rounds, giving each round where it gains most.

        Round 0 runs for every question; then each refinement round goes to the question whose next round has the
        highest expected accuracy gain (from its belief, or from the population chain without emission rates),
        as long as that gain exceeds ``round_cost`` and the question has rounds left. Because each question's
        gains shrink as it is refined, this greedy order is optimal for a total budget. With ``num_threads > 1``
        the top questions are refined concurrently, one round each per step.

        Args:
            examples: ``dspy.Example``s (their inputs are used) or dicts of inputs.
            budget: Total refinement rounds for the whole batch (round-0 calls are not counted).
            max_dollars: A hard cap on what the whole batch spends, round 0 included: before each LM call its worst
                case must fit in what is left, or it is not made and no further round is allocated (questions
                whose round 0 was refused are in ``errors``; the others keep what they had, with
                ``stop_reason="max_dollars"``). Needs a price and ``max_tokens`` for every LM.
            num_threads: Concurrent LM calls (default ``dspy.settings.num_threads``).
            display_progress: Show a progress bar.

        Returns:
            A :class:`BudgetResult` with one prediction per example (in order), the rounds spent and the allocation
            log.
        """
        check_int("budget", budget, 0)
        check_number("max_dollars", max_dollars, 0, none_ok=True, unit="dollars")
        model = self._require_model("budget allocation")
        states = [
            ChainState(_inputs_of(e), self.answer_fields, self.answer_key or default_answer_key) for e in examples
        ]
        for state in states:
            self._check_inputs(state.inputs)
        result: list[BudgetResult] = []

        def attributes() -> dict[str, Any]:
            done = {"questions": len(states), "budget": budget}
            return {**done, "spent": result[0].spent, "failed": len(result[0].errors)} if result else done

        # Not a module call, so no tracer opened a span for it: one trace for the whole batch.
        cap = DollarCap.for_module(max_dollars, self, self.refiner_lm)
        with span("MarkovRefine.answer_with_budget", attributes, root="call"), dollar_cap(cap):
            result.append(
                allocate(
                    states,
                    model,
                    self.max_rounds,
                    self.stopping_cost(),
                    budget,
                    self._call,
                    num_threads,
                    self.select,
                    display_progress,
                )
            )
        return result[0]

    def _effective_policy(self) -> Policy:
        policy = resolve_policy(self.policy)
        if not policy.requires_model:
            return policy
        model = self.model
        if model is None:
            # No calibration is no evidence that refinement pays: answer in one call, and say so. (Prompt
            # optimizers run the module before it is calibrated; that must work.)
            warn(
                "MarkovRefine is not calibrated, so it answers with the wrapped program alone (stop_reason "
                "'uncalibrated'); calibrate it with MarkovCalibrator(metric).compile(refine, trainset=...), or use "
                "policy='fixed' to refine max_rounds times regardless",
            )
            return Abstain("uncalibrated")
        self._check_lms()
        threshold = self.min_prob_improves
        if threshold is None:
            threshold = getattr(policy, "min_prob_improves", 0.0)
        if isinstance(policy, BeliefPolicy) and model.mixture is not None:
            # With question types the population chain says little about whether *this* question's rounds pay
            # (one type may gain while the population does not): the per-question belief decides.
            return policy
        if threshold > 0:
            p = model.prob_improves()
            if p < threshold:
                regime = model.regime()
                reason = "uncertain" if regime == "improving" else regime
                return Abstain(reason, {"prob_improves": p, "min_prob_improves": threshold})
        return policy

    def _check_lms(self) -> None:
        """Warn when the LMs in use are not the ones the calibration was fitted for (the rates belong to them)."""
        fitted = self.markov.calibrated_for
        if not fitted:
            return
        now = self.lm_names()
        if now["program"] == fitted.get("program") and now["refiner"] == fitted.get("refiner"):
            return
        warn(
            f"MarkovRefine was calibrated with round 0 on {_names(fitted.get('program'))} and refinement on "
            f"{fitted.get('refiner')!r}, but runs round 0 on {_names(now['program'])} and refinement on "
            f"{now['refiner']!r}. p0, p_cw and p_wc belong to the (round-0 LM, refiner LM) pair, so its stopping "
            "decisions may be wrong for these LMs: recalibrate with them (MarkovCalibrator(metric).compile(...)) or "
            "run with the calibrated ones",
        )

    def _check_inputs(self, inputs: dict[str, Any]) -> None:
        missing = [name for name in self.signature.input_fields if name not in inputs]
        if missing:
            raise ConfigurationError(
                f"missing input field(s) {missing}; {type(self.program).__name__} takes "
                f"{list(self.signature.input_fields)}, got {list(inputs)}"
            )

    def _chain(
        self, inputs: dict[str, Any], policy: Policy, max_rounds: int, select: str | None = None
    ) -> tuple[ChainState, Generator[Call, Outcome, Any]]:
        """A question's chain state and the loop that drives it."""
        self._check_inputs(inputs)
        state = ChainState(dict(inputs), self.answer_fields, self.answer_key or default_answer_key)
        cost = self.stopping_cost() if policy.requires_model else self.round_cost
        return state, run_chain(state, policy, self.model, max_rounds, cost, select or self.select)

    def _annotated(self, prediction: dspy.Prediction, policy: Policy) -> dspy.Prediction:
        """The prediction, after telling the user's tracer (the module's span) how the refinement went."""
        name = self.policy if isinstance(self.policy, str) else type(self.policy).__name__
        if isinstance(policy, Abstain):
            name = f"{name} (abstained: {policy.reason})"
        annotate(lambda: account_attributes(prediction.markovscale, name))
        return prediction

    def _refiner_lm(self) -> tuple[Any, Any]:
        """``(lm to pass, lm that will answer)`` for refinement rounds.

        In order: the refiner's own pinned LM (``set_lm`` on the module or a parent pins it), ``refiner_lm``, the
        wrapped program's single LM, ``dspy.settings.lm``. Raises when none resolves, at the first refinement
        round, instead of recording the same "No LM is loaded" failure round after round.
        """
        predictor = refiner_predict(self.refiner)
        if predictor.lm is not None:
            return None, predictor.lm  # Predict uses its pinned LM when none is passed
        if self.refiner_lm is not None:
            return self.refiner_lm, self.refiner_lm
        try:
            program_lm = self.program.get_lm()
        except ValueError:  # several LMs pinned in the program: no single one to follow
            program_lm = None
        if program_lm is not None:
            return program_lm, program_lm
        if dspy.settings.lm is not None:
            return None, dspy.settings.lm
        pinned = sorted({getattr(p.lm, "model", repr(p.lm)) for _, p in self.program.named_predictors() if p.lm})
        raise ConfigurationError(
            "MarkovRefine cannot tell which LM should refine: "
            + (f"the program pins several LMs ({', '.join(pinned)}) " if pinned else "nothing is pinned ")
            + "and no LM is configured. Pass MarkovRefine(program, refiner_lm=dspy.LM(...)), pin one with "
            "refine.refiner.set_lm(lm), or dspy.configure(lm=...)"
        )

    def _refine_kwargs(
        self, call: Call, outer: Any = _FROM_LM, refiner: tuple[Any, Any] | None = None
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(call.kwargs)
        lm, answering = refiner if refiner is not None else self._refiner_lm()
        if lm is not None:
            kwargs["lm"] = lm
        # Compose with the answering LM's own rollout id (BestOfN/Refine give each attempt one), so every outer
        # attempt samples fresh refinements instead of replaying the first attempt's from the cache. A caller
        # running several chains of one question (MarkovScale) passes each chain's own ``outer``, and may pass
        # the ``refiner`` it resolved once (resolving walks the program, whose history grows with every call).
        own = self.rollout_seed * ROLLOUT_STRIDE + call.round
        if outer is _FROM_LM:
            outer = (getattr(answering, "kwargs", None) or {}).get("rollout_id")
        kwargs["config"] = {"rollout_id": compose_rollout(outer, own), "temperature": self.temperature}
        if self.confidence is True:
            kwargs["config"]["logprobs"] = True
        return kwargs

    def _round_zero_context(self) -> Any:
        """Ask round 0 for log-probabilities (``confidence=True``) where the program uses the configured LM."""
        lm = dspy.settings.lm
        if self.confidence is True and lm is not None and hasattr(lm, "copy"):
            return dspy.context(lm=lm.copy(logprobs=True))
        return contextlib.nullcontext()

    def _outcome(self, prediction: Any, error: BaseException | None, usage: dict[str, int]) -> Outcome:
        if error is not None:
            return Outcome(None, error, usage)
        confidence = self._confidence_of(prediction)
        if self.confidence is True and isinstance(prediction, dspy.Prediction) and LOGPROBS_FIELD in prediction:
            del prediction[LOGPROBS_FIELD]  # we asked for them: the program's outputs stay its own
        return Outcome(prediction, None, usage, confidence)

    def _confidence_of(self, prediction: Any) -> float | None:
        if self.confidence is False:
            return None
        try:
            if callable(self.confidence) and not isinstance(self.confidence, bool):
                value = self.confidence(prediction)
            else:
                value = answer_confidence(prediction, self.answer_fields)
        except Exception as exc:  # a confidence that cannot be read is no confidence, never a failed round
            if callable(self.confidence) and not isinstance(self.confidence, bool):
                _warn_once_about(self.confidence, exc)
            else:
                logger.debug("MarkovRefine: no confidence for this round: %s", exc)
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or value is None or not 0.0 <= number <= 1.0:  # NaN fails the range too
            if value is not None and callable(self.confidence) and not isinstance(self.confidence, bool):
                _warn_once_about(self.confidence, ValueError(f"it returned {value!r}, not a probability in [0, 1]"))
            return None
        return number

    def _call(self, call: Call, outer: Any = _FROM_LM, refiner: tuple[Any, Any] | None = None) -> Outcome:
        # Resolving the refiner's LM raises on a misconfiguration: that is the user's to fix, not a failed round.
        kwargs = call.kwargs if call.round == 0 else self._refine_kwargs(call, outer, refiner)
        with metered() as usage, scrubbed_errors():
            try:
                if call.round == 0:
                    with self._round_zero_context():
                        prediction = self.program(**kwargs)
                else:
                    prediction = self.refiner(**kwargs)
                error = None
            except (Exception, SpendingStopped) as exc:  # a failed or refused round is data; the chain decides
                prediction, error = None, exc
        return self._outcome(prediction, error, usage.to_dict())

    async def _acall(self, call: Call, outer: Any = _FROM_LM, refiner: tuple[Any, Any] | None = None) -> Outcome:
        kwargs = call.kwargs if call.round == 0 else self._refine_kwargs(call, outer, refiner)
        with metered() as usage, scrubbed_errors():
            try:
                if call.round > 0:
                    prediction = await self.refiner.acall(**kwargs)
                else:
                    with self._round_zero_context():
                        if hasattr(self.program, "aforward"):
                            prediction = await self.program.acall(**kwargs)
                        else:
                            prediction = await dspy.asyncify(self.program)(**kwargs)
                error = None
            except (Exception, SpendingStopped) as exc:
                prediction, error = None, exc
        return self._outcome(prediction, error, usage.to_dict())


def _scrub_saved_state(predict: dspy.Predict) -> None:
    """Make ``predict``'s saved state drop LM endpoints and keys, whoever saves it.

    Set on the instance rather than by a subclass: OpenTelemetry's DSPy instrumentor wraps every direct subclass of
    ``dspy.Predict`` by its name in ``dspy``, and fails (leaving DSPy half-instrumented) on one defined elsewhere.
    A deep copy of the predictor copies the bound method with it, bound to the copy.
    """
    predict.dump_state = types.MethodType(_scrubbed_dump_state, predict)


def _scrubbed_dump_state(predict: dspy.Predict, json_mode: bool = True) -> dict[str, Any]:
    return scrub_lm_state(dspy.Predict.dump_state(predict, json_mode=json_mode))


_warned_about: weakref.WeakSet = weakref.WeakSet()
_warned_lock = threading.Lock()


def _warn_once_about(confidence: Any, error: BaseException) -> None:
    """A user's ``confidence=`` function that raises or returns no probability is said once, at WARNING, with what
    went wrong (the rounds go on without confidence, as if the LM had given no log-probabilities)."""
    with _warned_lock:
        try:
            if confidence in _warned_about:
                return
            _warned_about.add(confidence)
        except TypeError:  # a callable that cannot be weakly referenced: said every time rather than never
            pass
    name = getattr(confidence, "__qualname__", type(confidence).__name__)
    logger.warning(
        "MarkovRefine: your confidence function %s failed (%s); rounds go on without confidence (said once)",
        name,
        describe(error),
        exc_info=error if error.__traceback__ is not None else None,
    )


def _lm_name(lm: Any) -> str | None:
    """An LM's name for the record: its model string, plus the models behind a router group (never endpoints)."""
    if lm is None:
        return None
    name = str(getattr(lm, "model", type(lm).__name__))
    models = getattr(getattr(lm, "engine", None), "model_names", None)
    return f"{name} [{', '.join(models)}]" if isinstance(models, list) and models else name


def _names(names: Any) -> str:
    return ", ".join(repr(n) for n in names) if isinstance(names, list) else repr(names)


def refiner_predict(refiner: dspy.Module) -> dspy.Predict:
    """The refiner's predictor (inside its ChainOfThought when the program reasons)."""
    return refiner.predict if isinstance(refiner, dspy.ChainOfThought) else refiner


def _select_for(policy: Policy, select: str) -> str:
    """An uncalibrated module has no posteriors to select by: it returns its only answer."""
    return "last" if isinstance(policy, Abstain) and policy.reason == "uncalibrated" else select


def _inputs_of(example: Any) -> dict[str, Any]:
    if isinstance(example, dspy.Example):
        try:
            return dict(example.inputs())
        except ValueError:
            raise ConfigurationError(
                "examples must have their inputs marked: dspy.Example(...).with_inputs(...)"
            ) from None
    if isinstance(example, dict):
        return dict(example)
    raise ConfigurationError(f"examples must be dspy.Example or dict of inputs, got {type(example).__name__}")
