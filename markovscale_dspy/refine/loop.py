"""The refinement loop, in one place: one question's chain state, the generator that runs it, and its two drivers.

Module layer. :func:`run_chain` is written once: it yields the :class:`Call` it needs next and receives its
:class:`Outcome`; :func:`drive` runs it with a sync call function, :func:`adrive` with an async one (and a replay
reads recorded outcomes through the same loop). A :class:`ChainState` lives for one call and is never stored on the
module, which keeps ``MarkovRefine.forward`` free of mutation and thread-safe. Every round leaves a
:class:`RoundEntry` in the trajectory: a plain JSON-able dict (it is stored by the trace store and read by users as
``pred.trajectory[t]["outputs"]``) whose keys are declared here, once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Generator, Hashable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypedDict

import dspy

from markovscale_dspy._exceptions import ConfigurationError, NotCalibratedError, RoundZeroError
from markovscale_dspy._warnings import warn
from markovscale_dspy.core.answers import default_answer_key, is_empty_answer
from markovscale_dspy.core.model import TransitionModel
from markovscale_dspy.core.policies import Decision, Policy, RoundContext, evidence_for, observations_of
from markovscale_dspy.spending import SpendingStopped
from markovscale_dspy.tracing import scrub_endpoints, span
from markovscale_dspy.usage import Usage

__all__ = [
    "SELECT_MODES",
    "Call",
    "ChainState",
    "Outcome",
    "RefineAccount",
    "RefinedPrediction",
    "RoundEntry",
    "adrive",
    "describe",
    "drive",
    "error_kind",
    "run_chain",
    "unrecoverable",
]

logger = logging.getLogger(__name__)

#: How the returned answer is chosen among the visited ones.
SELECT_MODES = ("last", "best")


@dataclass(frozen=True)
class Call:
    """One LM-backed step the chain asks its driver to run (round 0 = the wrapped program)."""

    round: int
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """What one call produced; ``confidence`` is its answer's confidence from token log-probabilities, if any."""

    prediction: Any = None
    error: BaseException | None = None
    usage: dict[str, int] | None = None
    confidence: float | None = None


#: A URL, or an IP address or ``localhost`` with or without a port: where an LM server is, not what went wrong.
def describe(error: BaseException) -> str:
    """``Type: first line of the message`` (short enough for trajectories and reports), with endpoints replaced by
    ``<endpoint>``: the text is kept in outputs, traces and reports, where a server's address does not belong."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {scrub_endpoints(text[0])[:200]}" if text else type(error).__name__


class RoundEntry(TypedDict, total=False):
    """One round of a trajectory (round 0 = the wrapped program). Plain JSON-able values, so the trace store keeps
    it as it is and users read it as a dict.

    Attributes:
        round: The round's index.
        outputs: The program's outputs after this round (a failed round repeats the previous ones).
        answer_key: The answer's identity (normalised answer fields).
        error: ``"Type: message"`` of the failure that kept the previous answer, else ``None``.
        error_kind: ``"parse"``, ``"empty"``, ``"fatal"``, ``"lm"`` or ``"other"`` (only on failed rounds).
        fix: For a ``"fatal"`` failure, what to change (see :func:`unrecoverable`).
        decision: Why the policy asked for this round (refinement rounds only).
        usage: LM calls, tokens and dollars of this round (see :class:`markovscale_dspy.Usage`).
        confidence: The answer's confidence from token log-probabilities, when the LM gave them.
        belief: What the policy computed after this round (e.g. the belief that the answer is correct).
    """

    round: int
    outputs: dict[str, Any]
    answer_key: Hashable
    error: str | None
    error_kind: str
    fix: str
    decision: str
    usage: dict[str, Any] | None
    confidence: float
    belief: float


@dataclass(frozen=True)
class RefineAccount:
    """MarkovRefine's account of one answer: how many rounds ran, why it stopped, what every round did.

    ``calls`` and ``cost`` (dollars) add up the usage of every round.

    Attributes:
        rounds: Refinement rounds attempted (0 = the wrapped program's answer alone).
        stop_reason: Why refinement stopped (``"max_rounds"``, ``"degrading"``, ``"stable_answer"``, ...).
        stop_info: Numbers behind the decision (planned rounds, belief, ``prob_improves``).
        failed_rounds: Refinement rounds that failed and kept the previous answer.
        selected_round: The round whose answer was returned.
        belief: Final belief that the answer is correct (belief policy), else ``None``.
        trajectory: One entry per round: outputs, normalised answer, decision, error, LM usage, and the answer's
            ``confidence`` when the LM gave token log-probabilities.
        posteriors: Smoothed probability that each round is correct (``select="best"``), else ``None``.
    """

    rounds: int
    stop_reason: str
    stop_info: dict[str, Any]
    failed_rounds: int
    selected_round: int
    belief: float | None
    trajectory: list[RoundEntry]
    posteriors: list[float] | None = None

    @property
    def calls(self) -> int:
        """LM calls that reached a provider over all rounds (cache hits are free)."""
        return sum((entry.get("usage") or {}).get("calls", 0) for entry in self.trajectory)

    @property
    def cost(self) -> float | None:
        """Dollars over all rounds (``None`` when some call's price is unknown; cache hits are free)."""
        total: float | None = 0.0
        for entry in self.trajectory:
            usage = entry.get("usage") or {}
            spent = usage.get("cost", 0.0 if not usage.get("calls") else None)
            total = None if total is None or spent is None else total + spent
        return total


#: Compatibility fields: set on the prediction only when the wrapped program has no output of that name.
METADATA_FIELDS = ("rounds", "stop_reason", "stop_info", "failed_rounds", "selected_round", "belief", "trajectory")


class RefinedPrediction(dspy.Prediction):
    """The wrapped program's outputs, untouched, with MarkovRefine's account in ``.markovscale``.

    ``pred.markovscale`` is an attribute, not a field, so it can never collide with a program output (ReAct's
    ``trajectory``, a field named ``rounds``). For programs without such outputs the familiar names
    (``pred.rounds``, ``pred.stop_reason``, ``pred.trajectory``, ...) are also set as fields.
    """

    #: Class-level default: DSPy's Example then stores ``markovscale`` as an attribute, not as a field.
    markovscale: RefineAccount | None = None


class EmptyAnswerError(ValueError):
    """A round returned no answer at all."""


def error_kind(error: BaseException) -> str:
    """``"parse"`` / ``"empty"`` (the model's own behaviour: worth remembering), ``"fatal"`` (no retry can mend it:
    see :func:`unrecoverable`), ``"lm"`` (a transient service failure: timeout, rate limit, transport, server) or
    ``"other"``; ``"budget"`` for a call the dollar cap refused."""
    if isinstance(error, SpendingStopped):
        return "budget"
    if isinstance(error, dspy.AdapterParseError):
        return "parse"
    if isinstance(error, EmptyAnswerError):
        return "empty"
    if unrecoverable(error) is not None:
        return "fatal"
    if isinstance(error, dspy.LMError):
        return "lm"
    return "other"


#: LM failures that no retry can mend, most specific first, with the fix to name.
_UNRECOVERABLE = (
    (
        dspy.LMAuthError,
        "the provider rejected the credentials: give a valid API key (--api-key-env VAR, $MARKOVSCALE_API_KEY, the "
        "provider's own variable such as OPENAI_API_KEY, or api_key= in build_lm / dspy.LM)",
    ),
    (dspy.LMBillingError, "the provider refused for billing or quota: check the account's plan and credit"),
    (
        dspy.LMUnsupportedModelError,
        "the provider does not know this model: check the model name (--model / dspy.LM('provider/model')) and the "
        "server it is sent to (--api-base)",
    ),
    (
        dspy.ContextWindowExceededError,
        "the prompt does not fit the model's context window: shorten the inputs or demos, lower max_tokens, or use a "
        "model with a longer context",
    ),
    (
        dspy.LMInvalidRequestError,
        "the provider rejected the request as invalid: check the LM's settings (model, temperature, max_tokens, "
        "response format) against what the provider accepts",
    ),
    (
        dspy.LMConfigurationError,
        "the LM is not configured: give the model, its key and endpoint (dspy.configure(lm=...), build_lm(...))",
    ),
    (dspy.LMUnsupportedFeatureError, "the LM does not support a feature the program asks for (see the message)"),
)


def unrecoverable(error: BaseException | None) -> str | None:
    """The fix for an LM failure that no retry can mend -- a rejected key, an unknown model, an invalid request, a
    prompt over the context window -- or ``None`` for anything else (transient failures, parse errors, a
    program's own exceptions). The error's causes are searched too (a RoundZeroError wraps the LM's error).

    Example:
        >>> unrecoverable(dspy.LMAuthError("Incorrect API key provided")).startswith("the provider rejected")
        True
        >>> unrecoverable(dspy.LMTimeoutError("slow")) is None
        True
    """
    seen = 0
    while error is not None and seen < 8:
        for kind, fix in _UNRECOVERABLE:
            if isinstance(error, kind):
                return fix
        # LiteLLM reports a missing key as a server error (500), which DSPy would retry: recognise the SDK's words
        if isinstance(error, dspy.LMError) and any(words in str(error) for words in _MISSING_KEY_WORDS):
            return _UNRECOVERABLE[0][1]
        error, seen = error.__cause__, seen + 1
    return None


#: How the OpenAI SDK (under LiteLLM) says that no key was given.
_MISSING_KEY_WORDS = ("Missing credentials", "api_key client option must be set")


def _outputs_of(prediction: Any) -> dict[str, Any]:
    if isinstance(prediction, dspy.Prediction):
        return dict(prediction.items())
    if isinstance(prediction, dict):
        return dict(prediction)
    raise ConfigurationError(f"the wrapped program must return a dspy.Prediction, got {type(prediction).__name__}")


@dataclass
class ChainState:
    """Everything known about one question's chain so far."""

    inputs: dict[str, Any]
    answer_fields: list[str]
    key_of: Callable[[Mapping[str, Any]], Hashable] = default_answer_key
    outputs: dict[str, Any] = field(default_factory=dict)
    answer: dict[str, Any] = field(default_factory=dict)
    trajectory: list[RoundEntry] = field(default_factory=list)
    keys: list[Hashable] = field(default_factory=list)
    failed: list[bool] = field(default_factory=list)
    confidences: list[float | None] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        """Refinement rounds attempted so far."""
        return len(self.trajectory) - 1

    def start(self, outcome: Outcome) -> None:
        """Record round 0; a failed round 0 raises (there is nothing to return or refine)."""
        if outcome.error is not None:
            raise RoundZeroError(f"round 0 (the wrapped program) failed: {describe(outcome.error)}") from outcome.error
        outputs = _outputs_of(outcome.prediction)
        absent = [name for name in self.answer_fields if name not in outputs]
        if absent:
            raise RoundZeroError(
                f"the wrapped program returned no {absent} (it returned {list(outputs)}); pass signature= matching "
                "the program's real outputs"
            )
        self.outputs = outputs
        self.answer = {name: outputs[name] for name in self.answer_fields}
        entry: RoundEntry = {"round": 0, "outputs": outputs, "answer_key": self.key_of(self.answer), "error": None}
        if outcome.confidence is not None:
            entry["confidence"] = outcome.confidence
        self._append({**entry, "usage": outcome.usage}, False, outcome.confidence)

    def next_call(self) -> Call:
        previous = {f"previous_{name}": value for name, value in self.answer.items()}
        return Call(self.rounds + 1, {**self.inputs, **previous})

    def record(self, outcome: Outcome, decision: Decision) -> None:
        """Record a refinement round; a failure keeps the previous answer and says why."""
        entry: RoundEntry = {"round": self.rounds + 1, "decision": decision.reason, "usage": outcome.usage}
        error = outcome.error
        if error is None:
            new_outputs = _outputs_of(outcome.prediction)
            new_answer = {name: new_outputs.get(name) for name in self.answer_fields}
            if is_empty_answer(new_answer):
                error = EmptyAnswerError("the refinement returned an empty answer")
        if error is None:
            self.outputs, self.answer = new_outputs, new_answer
            entry.update(outputs=new_outputs, answer_key=self.key_of(new_answer), error=None)
            if outcome.confidence is not None:
                entry["confidence"] = outcome.confidence
        else:
            logger.info(
                "MarkovRefine round %d failed, keeping the previous answer: %s", entry["round"], describe(error)
            )
            entry.update(
                outputs=dict(self.outputs),
                answer_key=self.keys[-1],
                error=describe(error),
                error_kind=error_kind(error),
            )
            fix = unrecoverable(error)
            if fix is not None:  # every later round would fail the same way: say so, not only in the trajectory
                entry["fix"] = fix
                warn(f"MarkovRefine: a refinement round failed ({describe(error)}): {fix}; it kept the previous answer")
        self._append(entry, error is not None, outcome.confidence if error is None else None)

    def _append(self, entry: RoundEntry, failed: bool, confidence: float | None = None) -> None:
        self.trajectory.append(entry)
        self.keys.append(entry["answer_key"])
        self.failed.append(failed)
        self.confidences.append(confidence)

    def context(
        self, model: TransitionModel | None, max_rounds: int, round_cost: float, select: str = "last"
    ) -> RoundContext:
        confidences = tuple(self.confidences) if any(c is not None for c in self.confidences) else ()
        return RoundContext(
            model,
            self.rounds,
            max_rounds,
            round_cost,
            tuple(self.keys),
            tuple(self.failed),
            self.inputs,
            confidences,
            select,
        )

    def note(self, info: Mapping[str, Any]) -> None:
        """Attach what a policy computed after the latest round (e.g. the belief) to that round's entry."""
        self.trajectory[-1].update(info)

    def observations(self) -> list[bool | None]:
        return observations_of(self.keys, self.failed)

    def finish(self, stop: Decision, model: TransitionModel | None, select: str) -> dspy.Prediction:
        chosen = len(self.trajectory) - 1
        extra: dict[str, Any] = {}
        if select == "best":
            if model is None or not model.has_emissions:
                raise NotCalibratedError(
                    "select='best' needs a calibrated TransitionModel with answer-change rates: run MarkovCalibrator"
                )
            evidence, bins = evidence_for(model, self.confidences, self.rounds)
            posteriors = evidence.posteriors(self.keys, self.failed, bins)
            # Highest smoothed posterior; on ties the latest round (it has seen the most refinement).
            chosen = max(range(len(posteriors)), key=lambda t: posteriors[t] + 1e-12 * t)
            extra = {"posteriors": posteriors}
        outputs = self.trajectory[chosen]["outputs"]
        account = RefineAccount(
            rounds=self.rounds,
            stop_reason=stop.reason,
            stop_info=dict(stop.info),
            failed_rounds=sum(self.failed),
            selected_round=chosen,
            belief=self.trajectory[-1].get("belief"),
            trajectory=self.trajectory,
            posteriors=extra.get("posteriors"),
        )
        compat = {name: getattr(account, name) for name in METADATA_FIELDS if name not in outputs}
        if account.posteriors is not None and "posteriors" not in outputs:
            compat["posteriors"] = account.posteriors
        prediction = RefinedPrediction(**outputs, **compat)
        prediction.markovscale = account
        return prediction


def run_chain(
    state: ChainState, policy: Policy, model: TransitionModel | None, max_rounds: int, round_cost: float, select: str
) -> Generator[Call, Outcome, dspy.Prediction]:
    """The refinement loop: yields calls, receives their outcomes, returns the prediction."""
    state.start((yield Call(0, dict(state.inputs))))
    while True:
        decision = policy.decide(state.context(model, max_rounds, round_cost, select))
        state.note(decision.info)
        if not decision.refine or state.rounds >= max_rounds:
            # The cap is the reason whenever it is what stops the chain (max_rounds=0 included).
            capped = decision.refine or max_rounds == 0
            stop = Decision(False, "max_rounds", decision.info) if capped else decision
            return state.finish(stop, model, select)
        state.record((yield state.next_call()), decision)


def drive(
    chain: Generator[Call, Outcome, Any],
    run: Callable[[Call], Outcome],
    observe: Callable[[Call], AbstractContextManager] | None = None,
) -> Any:
    """Run ``chain`` to its end with ``run(call) -> Outcome``; returns what the chain returns.

    ``observe(call)``, if given, is entered around each call and the chain's handling of its outcome (a tracer's
    span for the round, which then sees the round's entry complete).
    """
    call = next(chain)
    while True:
        with observe(call) if observe is not None else nullcontext():
            outcome = run(call)
            try:
                call = chain.send(outcome)
            except StopIteration as stop:
                return stop.value


async def adrive(
    chain: Generator[Call, Outcome, Any],
    run: Callable[[Call], Awaitable[Outcome]],
    observe: Callable[[Call], AbstractContextManager] | None = None,
) -> Any:
    """Async twin of :func:`drive`: ``run`` is awaited."""
    call = next(chain)
    while True:
        with observe(call) if observe is not None else nullcontext():
            outcome = await run(call)
            try:
                call = chain.send(outcome)
            except StopIteration as stop:
                return stop.value


def traced_rounds(state: ChainState) -> Callable[[Call], AbstractContextManager]:
    """For :func:`drive`: a span per round of ``state``'s chain in the user's tracer, with what the round did."""

    def observe(call: Call) -> AbstractContextManager:
        name = f"round {call.round}: {'program' if call.round == 0 else 'refine'}"
        return span(name, lambda: round_attributes(state, call.round))

    return observe


def round_attributes(state: ChainState, index: int) -> dict[str, Any]:
    """What a tracer's span of round ``index`` says about it (see :mod:`markovscale_dspy.tracing`)."""
    if index >= len(state.trajectory):
        return {"round": index}
    entry = state.trajectory[index]
    usage = entry.get("usage") or {}
    out: dict[str, Any] = {
        "round": index,
        "decision": entry.get("decision"),
        "error_kind": entry.get("error_kind"),
        "confidence": entry.get("confidence"),
        "belief": entry.get("belief"),
        "calls": usage.get("calls"),
        "cost": usage.get("cost"),
    }
    if index > 0:
        out["answer_changed"] = None if entry.get("error") else state.keys[index] != state.keys[index - 1]
    return out


def account_attributes(account: RefineAccount, policy: str) -> dict[str, Any]:
    """What a tracer's span of a whole refinement says: the policy, why it stopped, what it cost."""
    total = Usage()
    for entry in account.trajectory:
        total = total + Usage.from_dict(entry.get("usage"))
    return {
        "policy": policy,
        "rounds": account.rounds,
        "stop_reason": account.stop_reason,
        "selected_round": account.selected_round,
        "failed_rounds": account.failed_rounds,
        "belief": account.belief,
        "calls": total.calls,
        "prompt_tokens": total.prompt_tokens,
        "completion_tokens": total.completion_tokens,
        "cost": total.cost,
    }
