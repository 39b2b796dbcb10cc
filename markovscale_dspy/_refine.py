"""MarkovRefine: wrap a DSPy program; round 0 runs it, later rounds refine the previous answer while it pays."""

from __future__ import annotations

import logging
from collections.abc import Generator, Hashable
from dataclasses import dataclass
from typing import Any

import dspy

from markovscale_dspy._answers import AnswerKey, default_answer_key, is_empty_answer
from markovscale_dspy._exceptions import ConfigurationError, NotCalibratedError, RoundZeroError
from markovscale_dspy._model import TransitionModel
from markovscale_dspy._policies import FixedPolicy, Policy, RoundContext, resolve_policy
from markovscale_dspy._signatures import answer_fields, infer_signature, refinement_signature, uses_reasoning
from markovscale_dspy._state import MarkovState

__all__ = ["MarkovRefine"]

logger = logging.getLogger(__name__)

#: Rollout ids of one chain are ``rollout_seed * ROLLOUT_STRIDE + round``.
ROLLOUT_STRIDE = 1000
MAX_ROUNDS_LIMIT = ROLLOUT_STRIDE - 1


@dataclass(frozen=True)
class _Call:
    """One LM-backed step the chain asks its driver to run."""

    round: int
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class _Outcome:
    prediction: Any = None
    error: BaseException | None = None


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


class MarkovRefine(dspy.Module):
    """Sequential refinement that stops by the Markov-chain theory of when refinement pays.

    Round 0 calls the wrapped program. Each refinement round calls ``self.refiner``, an ordinary DSPy predictor
    that sees the original inputs plus ``previous_<field>`` for every answer field and produces the answer again.
    A stopping policy decides before every round whether to run it: ``"closed_form"`` (default) runs the
    ``optimal_rounds`` of the calibrated chain, so a task where refinement hurts costs exactly one call;
    ``"fixed"`` always runs ``max_rounds`` (the baseline). Calibrate with :class:`MarkovCalibrator`, or assign a
    fitted :class:`TransitionModel` to ``.model``.

    Every refinement round is a fresh sample (its own ``rollout_id`` and ``temperature > 0``), so DSPy's cache never
    turns a refinement into a replay of an earlier round, and the LMs pinned on the wrapped program are respected.
    A refinement round that fails (LM error, parse error, empty answer) keeps the previous answer and is recorded
    in the trajectory; only a failure of round 0 raises (:class:`RoundZeroError`).

    Args:
        program: The DSPy program to refine (e.g. ``dspy.ChainOfThought("question -> answer")``).
        signature: The program's task signature; inferred when the program has a single predictor.
        max_rounds: Largest number of refinement rounds.
        round_cost: Accuracy (0.01 = one point) a round must be expected to add to be worth its cost.
        policy: ``"closed_form"``, ``"fixed"``, another registered name, or a policy object.
        temperature: Sampling temperature of refinement rounds (must be > 0).
        answer_key: Maps a round's answer fields to its identity; defaults to normalised values.
        rollout_seed: Namespace of this module's rollout ids (change it to draw different samples).
        instructions: Replaces the default refinement instructions.

    Example:
        >>> import dspy
        >>> from markovscale_dspy import MarkovRefine, TransitionModel
        >>> refine = MarkovRefine(dspy.ChainOfThought("question -> answer"), max_rounds=3)
        >>> refine.model = TransitionModel.fit([[False, True, True], [True, True, True], [False, True, True]])
        >>> refine.planned_rounds()  # refinement helps on this toy calibration
        3

        With an LM configured, ``refine(question="...")`` returns the answer with ``rounds``, ``stop_reason`` and
        ``trajectory``.
    """

    def __init__(
        self,
        program: dspy.Module,
        *,
        signature: str | type[dspy.Signature] | None = None,
        max_rounds: int = 4,
        round_cost: float = 0.0,
        policy: str | Policy = "closed_form",
        temperature: float = 0.7,
        answer_key: AnswerKey | None = None,
        rollout_seed: int = 0,
        instructions: str | None = None,
    ):
        super().__init__()
        task = infer_signature(program, signature)
        _check_int("max_rounds", max_rounds, 0, MAX_ROUNDS_LIMIT)
        _check_int("rollout_seed", rollout_seed, 0, None)
        if isinstance(round_cost, bool) or not isinstance(round_cost, (int, float)) or not 0 <= round_cost < 1:
            raise ConfigurationError(f"round_cost must be a number in [0, 1) (accuracy per round), got {round_cost!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigurationError(
                f"temperature must be > 0 so refinement rounds are fresh samples, got {temperature!r}"
            )
        if answer_key is not None and not callable(answer_key):
            raise ConfigurationError(f"answer_key must be callable (outputs dict -> hashable), got {answer_key!r}")
        resolve_policy(policy)  # fail now on an unknown policy, not at the first call

        self.program = program
        self.signature = task
        self.max_rounds = max_rounds
        self.round_cost = float(round_cost)
        self.policy = policy
        self.temperature = float(temperature)
        self.answer_key = answer_key
        self.rollout_seed = rollout_seed
        self.instructions = instructions
        self.answer_fields = answer_fields(task)
        refine_sig = refinement_signature(task, instructions)
        self.refiner = dspy.ChainOfThought(refine_sig) if uses_reasoning(program) else dspy.Predict(refine_sig)
        self.markov = MarkovState(list(task.input_fields), self.answer_fields)

    # Learned state -----------------------------------------------------------------------------------------------

    @property
    def model(self) -> TransitionModel | None:
        """The calibrated chain (``None`` until calibrated); assign a fitted model to reuse it."""
        return self.markov.model

    @model.setter
    def model(self, value: TransitionModel | None) -> None:
        if value is not None and not isinstance(value, TransitionModel):
            raise ConfigurationError(f"model must be a TransitionModel or None, got {type(value).__name__}")
        self.markov.model = value

    def planned_rounds(self) -> int:
        """Rounds the closed-form rule runs for this module's cost and cap (raises if not calibrated)."""
        return self._require_model("closed_form").optimal_rounds(self.round_cost, self.max_rounds)

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
        return _drive(self._chain(inputs, *self._settings()), self._call)

    async def aforward(self, **inputs: Any) -> dspy.Prediction:
        """Async twin of :meth:`forward`."""
        return await _adrive(self._chain(inputs, *self._settings()), self._acall)

    def run_chain(self, rounds: int, **inputs: Any) -> dspy.Prediction:
        """Run round 0 and exactly ``rounds`` refinement rounds, with no early stopping (used for calibration)."""
        _check_int("rounds", rounds, 0, MAX_ROUNDS_LIMIT)
        return _drive(self._chain(inputs, FixedPolicy(), rounds), self._call)

    async def arun_chain(self, rounds: int, **inputs: Any) -> dspy.Prediction:
        """Async twin of :meth:`run_chain`."""
        _check_int("rounds", rounds, 0, MAX_ROUNDS_LIMIT)
        return await _adrive(self._chain(inputs, FixedPolicy(), rounds), self._acall)

    def _settings(self) -> tuple[Policy, int]:
        policy = resolve_policy(self.policy)
        if policy.requires_model:
            self._require_model(self.policy if isinstance(self.policy, str) else type(policy).__name__)
        return policy, self.max_rounds

    def _chain(self, inputs: dict[str, Any], policy: Policy, max_rounds: int) -> Generator[_Call, _Outcome, Any]:
        """The refinement loop, written once for sync and async drivers: it yields calls and receives outcomes."""
        missing = [name for name in self.signature.input_fields if name not in inputs]
        if missing:
            raise ConfigurationError(
                f"missing input field(s) {missing}; {type(self.program).__name__} takes "
                f"{list(self.signature.input_fields)}, got {list(inputs)}"
            )
        key_of = self.answer_key or default_answer_key
        model = self.model

        outcome = yield _Call(0, dict(inputs))
        if outcome.error is not None:
            raise RoundZeroError(f"round 0 (the wrapped program) failed: {_describe(outcome.error)}") from outcome.error
        outputs = _outputs_of(outcome.prediction)
        absent = [name for name in self.answer_fields if name not in outputs]
        if absent:
            raise RoundZeroError(
                f"the wrapped program returned no {absent} (it returned {list(outputs)}); pass signature= matching "
                "the program's real outputs"
            )
        answer = {name: outputs[name] for name in self.answer_fields}
        trajectory = [{"round": 0, "outputs": outputs, "answer_key": key_of(answer), "error": None}]
        keys: list[Hashable] = [trajectory[0]["answer_key"]]
        failed: list[bool] = [False]

        rounds = 0
        while True:
            context = RoundContext(model, rounds, max_rounds, self.round_cost, tuple(keys), tuple(failed))
            decision = policy.decide(context)
            if not decision.refine or rounds >= max_rounds:
                stop_reason = decision.reason if not decision.refine else "max_rounds"
                stop_info = dict(decision.info)
                break
            rounds += 1
            previous = {f"previous_{name}": value for name, value in answer.items()}
            outcome = yield _Call(rounds, {**inputs, **previous})
            entry: dict[str, Any] = {"round": rounds, "decision": decision.reason, **decision.info}
            error = outcome.error
            if error is None:
                new_outputs = _outputs_of(outcome.prediction)
                new_answer = {name: new_outputs.get(name) for name in self.answer_fields}
                if is_empty_answer(new_answer):
                    error = ValueError("the refinement returned an empty answer")
            if error is None:
                outputs, answer = new_outputs, new_answer
                entry.update(outputs=outputs, answer_key=key_of(answer), error=None)
            else:
                logger.info("MarkovRefine round %d failed, keeping the previous answer: %s", rounds, _describe(error))
                entry.update(outputs=dict(outputs), answer_key=keys[-1], error=_describe(error))
            trajectory.append(entry)
            keys.append(entry["answer_key"])
            failed.append(error is not None)

        return dspy.Prediction(
            **outputs,
            rounds=rounds,
            stop_reason=stop_reason,
            stop_info=stop_info,
            failed_rounds=sum(failed),
            trajectory=trajectory,
        )

    def _refine_lm(self) -> Any:
        """LM for refinement rounds: the refiner's own pin, else the wrapped program's single pin, else settings."""
        predictor = self.refiner.predict if isinstance(self.refiner, dspy.ChainOfThought) else self.refiner
        if predictor.lm is not None:
            return None  # Predict uses its pinned LM when none is passed
        try:
            return self.program.get_lm()
        except ValueError:
            return None  # several LMs in the program: no single one to follow, use the configured default

    def _refine_kwargs(self, call: _Call) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(call.kwargs)
        lm = self._refine_lm()
        if lm is not None:
            kwargs["lm"] = lm
        kwargs["config"] = {
            "rollout_id": self.rollout_seed * ROLLOUT_STRIDE + call.round,
            "temperature": self.temperature,
        }
        return kwargs

    def _call(self, call: _Call) -> _Outcome:
        try:
            if call.round == 0:
                return _Outcome(self.program(**call.kwargs))
            return _Outcome(self.refiner(**self._refine_kwargs(call)))
        except Exception as exc:  # a failed round is data, not a crash; the chain decides what it means
            return _Outcome(error=exc)

    async def _acall(self, call: _Call) -> _Outcome:
        try:
            if call.round == 0:
                if hasattr(self.program, "aforward"):
                    return _Outcome(await self.program.acall(**call.kwargs))
                return _Outcome(await dspy.asyncify(self.program)(**call.kwargs))
            return _Outcome(await self.refiner.acall(**self._refine_kwargs(call)))
        except Exception as exc:
            return _Outcome(error=exc)


def _check_int(name: str, value: Any, lo: int, hi: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigurationError(f"{name} must be an integer {bound}, got {value!r}")


def _outputs_of(prediction: Any) -> dict[str, Any]:
    if isinstance(prediction, dspy.Prediction):
        return dict(prediction.items())
    if isinstance(prediction, dict):
        return dict(prediction)
    raise ConfigurationError(f"the wrapped program must return a dspy.Prediction, got {type(prediction).__name__}")


def _drive(chain: Generator[_Call, _Outcome, Any], run: Any) -> Any:
    try:
        call = next(chain)
        while True:
            call = chain.send(run(call))
    except StopIteration as stop:
        return stop.value


async def _adrive(chain: Generator[_Call, _Outcome, Any], run: Any) -> Any:
    try:
        call = next(chain)
        while True:
            call = chain.send(await run(call))
    except StopIteration as stop:
        return stop.value
