"""A simulated world with known chain parameters, for offline tests of refinement (yours and ours).

:class:`SimulatedWorld` is a set of questions, each with its own hidden ``p0``, ``p_cw``, ``p_wc`` and answer
stickiness, and a DSPy custom engine that answers them: a round-0 prompt is answered correctly with probability
``p0``; a refinement prompt (one with a ``previous_<answer>`` input) looks at the previous answer it is shown and
moves by the question's chain. Because the truth is known, estimates and policies can be checked against it.
With ``refiner_effects``, the refinement chain also depends on the refiner's instructions (a phrase in the prompt
scales ``p_cw`` and ``p_wc``), so a refiner optimizer can be checked against the truth too.

It plugs into DSPy as a real ``dspy.LM`` (``engine=`` / ``async_engine=``), so everything in between -- adapters,
signatures, caching, threads -- is the real thing. With ``confidence_auroc`` set, an LM that asks for token
log-probabilities (``world.lm(logprobs=True)``) gets them, as from a real server: the answer value's token carries
a confidence whose AUROC for correctness is ``confidence_auroc`` (0.5: no information), while every answer stays
exactly what it would have been without it. Randomness is keyed on the seed, the prompt and how many times
that prompt was seen, so runs are reproducible and identical whether questions are answered sequentially or in
threads (each question's chain stays on one thread).

Example:
    >>> import dspy
    >>> from markovscale_dspy.testing import SimulatedWorld
    >>> world = SimulatedWorld.homogeneous(5, p0=0.5, p_cw=0.1, p_wc=0.3, seed=1)
    >>> program = dspy.Predict("question -> answer")
    >>> with dspy.context(lm=world.lm()):
    ...     pred = program(**world.examples[0].inputs())
    >>> world.calls
    1
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from statistics import NormalDist
from typing import Any

import dspy
from dspy._vendor.lm15.result import response_to_events
from dspy._vendor.lm15.types import StreamDeltaEvent, TextDelta, TokenLogprob
from dspy.lm15 import Message, Response, TextPart, Usage

from markovscale_dspy._exceptions import ConfigurationError
from markovscale_dspy.core.answers import normalize_answer
from markovscale_dspy.usage import record_cost

__all__ = [
    "FAULT_KINDS",
    "JUDGE_FIELD",
    "SimQuestion",
    "SimulatedEngine",
    "SimulatedWorld",
    "simulated_confidence",
]

#: Faults the engine can inject, each at its own rate.
FAULT_KINDS = ("timeout", "rate_limit", "transport", "server", "context_window", "garbage", "empty")

# Simulated values never contain blank lines, so a field's value ends at the first one.
_FIELD_BLOCK = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n|\Z)", re.S)
_QUESTION_ID = re.compile(r"#(\d+)\b")

#: An output field with this name asks the world to judge a proposed answer (a self-judge / verifier prompt);
#: the proposed answer is read from the ``proposed_answer`` input.
JUDGE_FIELD = "is_correct"


@dataclass(frozen=True)
class SimQuestion:
    """One simulated question and the hidden chain that governs its answers.

    Attributes:
        id: Index of the question in its world.
        question: The question text (carries ``#id`` so the engine can recognise it).
        answer: The gold answer.
        p0: P(round 0 correct).
        p_cw: P(a refinement breaks a correct answer).
        p_wc: P(a refinement fixes a wrong answer).
        p_same_wrong: P(a wrong answer that stays wrong stays *the same* wrong answer); 1.0 = wrong answers stick.
            (With distractors, a wrong answer that changes is redrawn from them and may land on the same one.)
        p_change_correct: P(a correct answer that stays correct is written differently, e.g. ``"42.0"``).
        judge_tpr: P(a self-judge calls a correct answer correct).
        judge_fpr: P(a self-judge calls a wrong answer correct).
        kind: Free label of the component this question was drawn from (for mixtures).
        distractors: The wrong answers this question attracts (empty: any number near the gold answer, each
            about equally likely, so wrong answers rarely agree).
        distractor_weights: How often each distractor is chosen when an answer is wrong (normalised).
        confidence_auroc: AUROC of this question's answer confidence for correctness (``None``: the world's).
    """

    id: int
    question: str
    answer: str
    p0: float
    p_cw: float
    p_wc: float
    p_same_wrong: float = 1.0
    p_change_correct: float = 0.0
    judge_tpr: float = 0.8
    judge_fpr: float = 0.3
    kind: str = "default"
    distractors: tuple[str, ...] = ()
    distractor_weights: tuple[float, ...] = ()
    confidence_auroc: float | None = None

    def __post_init__(self) -> None:
        for name in ("p0", "p_cw", "p_wc", "p_same_wrong", "p_change_correct", "judge_tpr", "judge_fpr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigurationError(f"{name} of question {self.id} must be in [0, 1], got {value!r}")
        object.__setattr__(self, "distractors", tuple(str(d) for d in self.distractors))
        object.__setattr__(self, "distractor_weights", tuple(float(w) for w in self.distractor_weights))
        weights = self.distractor_weights
        if len(weights) != len(self.distractors) or any(w < 0 for w in weights) or (weights and sum(weights) <= 0):
            raise ConfigurationError(
                f"question {self.id} needs one non-negative distractor weight per distractor (with a positive sum), "
                f"got distractors {self.distractors} and weights {weights}"
            )
        if self.answer in self.distractors:
            raise ConfigurationError(f"question {self.id}: the gold answer {self.answer!r} cannot be a distractor")
        _check_auroc(self.confidence_auroc, f"confidence_auroc of question {self.id}")


def _check_effects(effects: Any) -> dict[str, dict[str, float]]:
    if effects is None:
        return {}
    if not isinstance(effects, Mapping):
        raise ConfigurationError(
            f"refiner_effects must be a dict {{phrase: {{'p_cw': factor, 'p_wc': factor}}}}, got {effects!r}"
        )
    out: dict[str, dict[str, float]] = {}
    for phrase, factors in effects.items():
        if not isinstance(phrase, str) or not phrase.strip():
            raise ConfigurationError(f"refiner_effects phrases must be non-empty strings, got {phrase!r}")
        if not isinstance(factors, Mapping) or not set(factors) <= {"p_cw", "p_wc", "garbage"}:
            raise ConfigurationError(
                f"refiner_effects[{phrase!r}] must be a dict with keys among 'p_cw', 'p_wc', 'garbage', got {factors!r}"
            )
        for key, factor in factors.items():
            top = 1.0 if key == "garbage" else math.inf
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= factor <= top:
                kind = "a rate in [0, 1]" if key == "garbage" else "a factor >= 0"
                raise ConfigurationError(f"refiner_effects[{phrase!r}][{key!r}] must be {kind}, got {factor!r}")
        out[phrase] = {k: float(v) for k, v in factors.items()}
    return out


def _check_auroc(value: Any, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
        raise ConfigurationError(f"{name} must be strictly between 0 and 1 (0.5: no information), got {value!r}")


#: Mean logit of a simulated confidence, half-way between correct and wrong answers (typical confidence ~0.73).
_CONFIDENCE_CENTRE = 1.0


def simulated_confidence(correct: bool, auroc: float, rng: random.Random) -> float:
    """A confidence for an answer: ``sigmoid(z)``, ``z ~ Normal(+-d/2 + 1, 1)`` with ``d = sqrt(2) Phi^-1(auroc)``,
    so that correct and wrong answers' confidences are separated with exactly this AUROC."""
    d = math.sqrt(2.0) * NormalDist().inv_cdf(auroc)
    z = rng.gauss(_CONFIDENCE_CENTRE + (d / 2 if correct else -d / 2), 1.0)
    return 1.0 / (1.0 + math.exp(-z))


_PIECES = re.compile(r"\s+|\w+|[^\w\s]")


def _token_logprobs(text: str, span: tuple[int, int], confidence: float) -> tuple[TokenLogprob, ...]:
    """The text as tokens (words, spaces, punctuation) with probability 1, the answer value as one token with
    probability ``confidence``."""
    lo, hi = span
    tokens = [TokenLogprob(token=piece, logprob=0.0) for piece in _PIECES.findall(text[:lo])]
    tokens.append(TokenLogprob(token=text[lo:hi], logprob=math.log(max(confidence, 1e-300))))
    tokens += [TokenLogprob(token=piece, logprob=0.0) for piece in _PIECES.findall(text[hi:])]
    return tuple(tokens)


def _output_fields(system: str) -> dict[str, str]:
    """Output field names and their declared types, from DSPy's system prompt."""
    block = system.split("Your output fields are:", 1)[-1].split("All interactions", 1)[0]
    return dict(re.findall(r"^\d+\.\s+`(\w+)`\s*\(([^)]*)\)", block, re.M))


def _filler(kind: str) -> Any:
    """A well-typed placeholder for an output field the simulation does not model."""
    if kind.startswith("Literal["):
        # A choice (e.g. ReAct's next tool): "finish" when offered, so agents end, else the first option.
        options = re.findall(r"'([^']*)'", kind)
        return "finish" if "finish" in options else (options[0] if options else "")
    kind = kind.lower()
    if kind.startswith("dict"):
        return {}
    if kind.startswith("list"):
        return []
    if kind.startswith("bool"):
        return False
    if kind.startswith(("int", "float")):
        return 0
    return "Simulated reasoning."


def _system_text(request: Any) -> str:
    system = request.system
    if isinstance(system, str):
        return system
    return "".join(getattr(part, "text", "") for part in system or ())


#: Component keys that shape a world for voting (see :meth:`SimulatedWorld.mixture`).
_STRUCTURE = ("p0_concentration", "n_distractors", "distractor_concentration")


def _draw_structure(
    structure: Mapping[str, Any], params: Mapping[str, Any], gold: str, rng: random.Random
) -> dict[str, Any]:
    """Per-question difficulty and distractors for one question (see :meth:`SimulatedWorld.mixture`)."""
    out: dict[str, Any] = {}
    concentration = structure.get("p0_concentration")
    if concentration is not None:
        mean = float(params.get("p0", 0.5))
        if not (isinstance(concentration, (int, float)) and concentration > 0 and 0 < mean < 1):
            raise ConfigurationError(
                f"p0_concentration must be a positive number and p0 inside (0, 1), got {concentration!r}, {mean!r}"
            )
        out["p0"] = rng.betavariate(concentration * mean, concentration * (1 - mean))
    count = structure.get("n_distractors")
    if count is not None:
        if not isinstance(count, int) or not 1 <= count <= 18:
            raise ConfigurationError(f"n_distractors must be an integer in [1, 18], got {count!r}")
        alpha = float(structure.get("distractor_concentration", 1.0))
        if not alpha > 0:
            raise ConfigurationError(f"distractor_concentration must be positive, got {alpha!r}")
        near = [str(int(gold) + d) for d in (*range(-9, 0), *range(1, 10))]
        out["distractors"] = tuple(rng.sample(near, count))
        weights = [rng.gammavariate(alpha, 1.0) for _ in range(count)]
        if sum(weights) <= 0:
            weights = [1.0 if j == 0 else 0.0 for j in range(count)]
        out["distractor_weights"] = tuple(w / sum(weights) for w in weights)
    elif "distractor_concentration" in structure:
        raise ConfigurationError("distractor_concentration needs n_distractors")
    return out


class SimulatedEngine:
    """DSPy custom engine (``complete(request) -> Response``) that answers by the world's hidden chains.

    Args:
        world: The world whose questions it answers.
        faults: Optional ``{kind: rate}``; each call fails with that kind with that probability (see FAULT_KINDS).
    """

    def __init__(self, world: SimulatedWorld, faults: Mapping[str, float] | None = None):
        self.world = world
        self.faults = dict(faults or {})
        unknown = set(self.faults) - set(FAULT_KINDS)
        if unknown:
            raise ConfigurationError(f"unknown fault kind(s) {sorted(unknown)}; expected some of {FAULT_KINDS}")
        for kind, rate in self.faults.items():
            if not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
                raise ConfigurationError(f"fault rate for {kind!r} must be in [0, 1], got {rate!r}")
        if sum(self.faults.values()) > 1.0:
            raise ConfigurationError(f"fault rates add up to more than 1: {self.faults}")
        self._lock = threading.Lock()
        self._seen: Counter[str] = Counter()
        self.calls = 0
        self.fault_counts: Counter[str] = Counter()

    def __deepcopy__(self, memo: dict) -> SimulatedEngine:
        return self  # engines are shared services; Module.deepcopy() must not clone their counters

    @property
    def fingerprint(self) -> str:
        """Identity of what this engine answers (world and faults), for caches such as the trace store."""
        world = [
            (q.question, q.answer, q.p0, q.p_cw, q.p_wc, q.p_same_wrong, q.p_change_correct)
            + ((q.distractors, q.distractor_weights) if q.distractors else ())
            + ((q.confidence_auroc,) if q.confidence_auroc is not None else ())
            for q in self.world.questions
        ]
        parts = [self.world.seed, self.world.answer_field, world, sorted(self.faults.items())]
        if self.world.confidence_auroc is not None:
            parts.append(self.world.confidence_auroc)
        if self.world.refiner_effects:
            parts.append(sorted((k, sorted(v.items())) for k, v in self.world.refiner_effects.items()))
        text = json.dumps(parts)
        return hashlib.sha256(text.encode()).hexdigest()

    def _rng(self, text: str) -> tuple[random.Random, random.Random]:
        """The answer's randomness, and an independent stream for its confidence (drawing a confidence never
        changes an answer)."""
        with self._lock:
            self.calls += 1
            self._seen[text] += 1
            occurrence = self._seen[text]
        digest = hashlib.sha256(f"{self.world.seed}|{occurrence}|{text}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big")), random.Random(int.from_bytes(digest[8:16], "big"))

    def stream(self, request: Any) -> Iterator[Any]:
        """The answer of :meth:`complete` as stream events, so ``dspy.streamify`` and stream listeners work.

        The text arrives line by line, as a real server's tokens would, so field listeners see a field begin,
        grow and end.
        """
        for event in response_to_events(self.complete(request)):
            if event.type == "delta" and event.delta.type == "text":
                for piece in event.delta.text.splitlines(keepends=True):
                    yield StreamDeltaEvent(delta=TextDelta(text=piece, part_index=event.delta.part_index))
            else:
                yield event

    def complete(self, request: Any) -> Response:
        system = _system_text(request)
        user = request.messages[-1].text or ""
        rng, confidence_rng = self._rng(user)
        fault = self._draw_fault(rng)
        if fault is not None:
            return self._fault(fault, request)
        inputs = {name: value.strip() for name, value in _FIELD_BLOCK.findall(user)}
        fields = _output_fields(system) or {self.world.answer_field: "str"}
        values = {name: _filler(kind) for name, kind in fields.items()}
        if f"previous_{self.world.answer_field}" in inputs and self.world.garbles(system, rng):
            return self._fault("garbage", request)  # these refinement instructions make the LM answer off-format
        if JUDGE_FIELD in fields:
            values[JUDGE_FIELD] = self.world.judge(inputs, rng)
        elif self.world.answer_field in fields:
            # The instructions matter only with refiner_effects (and a subclass's respond(inputs, rng) still works).
            extra = {"system": system} if self.world.refiner_effects else {}
            values[self.world.answer_field] = self.world.respond(inputs, rng, **extra)
        if "JSON" in system.split("In adhering to this structure", 1)[0]:
            text = json.dumps(values)
        else:
            text = (
                "\n\n".join(
                    f"[[ ## {k} ## ]]\n{json.dumps(v) if isinstance(v, (dict, list, bool)) else v}"
                    for k, v in values.items()
                )
                + "\n\n[[ ## completed ## ]]"
            )
        usage = Usage(input_tokens=len((system + user).split()), output_tokens=len(text.split()))
        logprobs = None
        if getattr(request.config, "logprobs", None) is not None and JUDGE_FIELD not in fields:
            logprobs = self._logprobs(inputs, values, text, confidence_rng)
        return self._priced(
            Response(
                id=f"sim-{self.calls}",
                model=request.model,
                message=Message.assistant(TextPart(text)),
                finish_reason="stop",
                usage=usage,
                logprobs=logprobs,
            )
        )

    def _priced(self, response: Response) -> Response:
        """Report the call's dollars at the LM's price (as a paid API's engine would)."""
        price_in, price_out = self.world.prices.get(response.model, (0.0, 0.0))
        usage = response.usage
        record_cost(response.model, price_in * (usage.input_tokens or 0) + price_out * (usage.output_tokens or 0))
        return response

    def _logprobs(
        self, inputs: Mapping[str, str], values: Mapping[str, Any], text: str, rng: random.Random
    ) -> tuple[TokenLogprob, ...] | None:
        """Token log-probabilities of a response whose answer value carries a simulated confidence."""
        field = self.world.answer_field
        if field not in values:
            return None
        q = self.world.truth(inputs.get(self.world.question_field, ""))
        auroc = q.confidence_auroc if q.confidence_auroc is not None else self.world.confidence_auroc
        if auroc is None:
            return None
        value = str(values[field])
        chat = f"[[ ## {field} ## ]]\n{value}"
        if chat in text:
            lo = text.rindex(chat) + len(chat) - len(value)
        else:
            marker = f"{json.dumps(field)}: {json.dumps(values[field])}"
            lo = text.rindex(marker) + len(marker) - len(json.dumps(values[field])) + 1
        correct = normalize_answer(value) == normalize_answer(q.answer)
        return _token_logprobs(text, (lo, lo + len(value)), simulated_confidence(correct, auroc, rng))

    def _draw_fault(self, rng: random.Random) -> str | None:
        if not self.faults:
            return None
        u, acc = rng.random(), 0.0
        for kind in FAULT_KINDS:
            acc += self.faults.get(kind, 0.0)
            if u < acc:
                with self._lock:
                    self.fault_counts[kind] += 1
                return kind
        return None

    def _fault(self, kind: str, request: Any) -> Response:
        from dspy.lm15 import ContextLengthError, RateLimitError, ServerError, TimeoutError, TransportError

        provider = "simulated"
        if kind == "timeout":
            raise TimeoutError("simulated timeout", provider=provider)
        if kind == "rate_limit":
            raise RateLimitError("simulated rate limit", provider=provider, status=429)
        if kind == "transport":
            raise TransportError("simulated connection reset")
        if kind == "server":
            raise ServerError("simulated server error", provider=provider, status=500)
        if kind == "context_window":
            raise ContextLengthError("simulated context window exceeded", provider=provider, status=400)
        text = "I'm ready to help. What's your next question?" if kind == "garbage" else ""
        return self._priced(
            Response(
                id="sim-fault",
                model=request.model,
                message=Message.assistant(TextPart(text or " ")),
                finish_reason="stop",
                usage=Usage(input_tokens=1, output_tokens=len(text.split())),
            )
        )


class _AsyncSimulatedEngine:
    """Async twin of SimulatedEngine (the simulation is instantaneous, so it just delegates)."""

    def __init__(self, engine: SimulatedEngine):
        self.engine = engine

    async def complete(self, request: Any) -> Response:
        return self.engine.complete(request)

    async def stream(self, request: Any) -> AsyncIterator[Any]:
        for event in self.engine.stream(request):
            yield event

    def __deepcopy__(self, memo: dict) -> _AsyncSimulatedEngine:
        return self


class SimulatedWorld:
    """Questions with hidden per-question chains, the LM that answers them, and the metric that grades them.

    Args:
        questions: The questions (see :meth:`homogeneous` and :meth:`mixture` to generate them).
        seed: Seed of the answers' randomness.
        question_field: Input field holding the question text.
        answer_field: Output field holding the answer.
        confidence_auroc: When set, LMs that ask for log-probabilities get an answer confidence with this AUROC for
            correctness (per-question ``SimQuestion.confidence_auroc`` overrides it); ``None`` (default): no
            log-probabilities, as from a provider that has none.
        refiner_effects: How the refiner's instructions shape the chain: ``{phrase: {"p_cw": factor, "p_wc":
            factor}}``. A refinement prompt whose instructions contain ``phrase`` (case-insensitive) has every
            question's ``p_cw`` and ``p_wc`` multiplied by these factors (clipped to [0, 1]; several matching
            phrases multiply); ``"garbage": rate`` makes that share of its responses unparseable (instructions a
            model misreads). ``None`` (default): the instructions do not matter.

    Example:
        >>> world = SimulatedWorld.homogeneous(
        ...     3, p0=0.5, p_cw=0.2, p_wc=0.3, refiner_effects={"verify first": {"p_cw": 0.1}})
        >>> world.chain_for(world.questions[0], "Verify first, then answer.")
        (0.5, 0.020000000000000004, 0.3)
    """

    def __init__(
        self,
        questions: Sequence[SimQuestion],
        *,
        seed: int = 0,
        question_field: str = "question",
        answer_field: str = "answer",
        confidence_auroc: float | None = None,
        refiner_effects: Mapping[str, Mapping[str, float]] | None = None,
    ):
        if not questions:
            raise ConfigurationError("a simulated world needs at least one question")
        _check_auroc(confidence_auroc, "confidence_auroc")
        self.questions = list(questions)
        self.confidence_auroc = confidence_auroc
        self.refiner_effects = _check_effects(refiner_effects)
        self.seed = seed
        self.question_field = question_field
        self.answer_field = answer_field
        self._by_id = {q.id: q for q in self.questions}
        self.prices: dict[str, tuple[float, float]] = {}
        self.engine = SimulatedEngine(self)

    # Construction ------------------------------------------------------------------------------------------------

    @classmethod
    def homogeneous(
        cls,
        n: int,
        *,
        p0: float,
        p_cw: float,
        p_wc: float,
        p_same_wrong: float = 1.0,
        p_change_correct: float = 0.0,
        seed: int = 0,
        **kwargs: Any,
    ) -> SimulatedWorld:
        """``n`` questions that all share one chain."""
        params = {
            "p0": p0,
            "p_cw": p_cw,
            "p_wc": p_wc,
            "p_same_wrong": p_same_wrong,
            "p_change_correct": p_change_correct,
        }
        return cls.mixture(n, [(1.0, params)], seed=seed, **kwargs)

    @classmethod
    def mixture(
        cls, n: int, components: Sequence[tuple[float, Mapping[str, Any]]], *, seed: int = 0, **kwargs: Any
    ) -> SimulatedWorld:
        """``n`` questions whose chains are drawn from weighted components.

        Args:
            n: Number of questions.
            components: ``(weight, params)`` pairs; params are SimQuestion fields (``p0``, ``p_cw``, ``p_wc``,
                optionally ``p_same_wrong``, ``p_change_correct``, ``kind``), plus optional structure that makes
                the world realistic for voting (without these keys a component gives exactly the questions it
                always gave):

                * ``p0_concentration``: per-question difficulty -- each question's ``p0`` is drawn from
                  ``Beta(c * p0, c * (1 - p0))`` (mean ``p0``; smaller ``c``, more spread);
                * ``n_distractors``: each question gets this many distinct wrong answers, and every wrong answer
                  (round 0, a broken answer, a wrong answer that changes) is one of them;
                * ``distractor_concentration``: their weights are drawn from a symmetric Dirichlet with this
                  parameter (default 1; small values make one distractor dominate, so wrong votes agree).
                * ``confidence_auroc``: AUROC of the answers' simulated confidence (see :class:`SimQuestion`).
            seed: Seed of the draw and of the answers.
        """
        if not isinstance(n, int) or n < 1:
            raise ConfigurationError(f"n must be a positive integer, got {n!r}")
        if not components:
            raise ConfigurationError("mixture needs at least one (weight, params) component")
        rng = random.Random(f"world|{seed}")
        weights = [float(w) for w, _ in components]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigurationError(f"mixture weights must be >= 0 with a positive sum, got {weights}")
        # Stratified: each component gets its share of the n questions (largest remainders), in shuffled order.
        shares = [w / sum(weights) * n for w in weights]
        counts = [int(x) for x in shares]
        for index in sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])[: n - sum(counts)]:
            counts[index] += 1
        assignment = [index for index, count in enumerate(counts) for _ in range(count)]
        rng.shuffle(assignment)
        questions = []
        for i, index in enumerate(assignment):
            params = dict(components[index][1])
            params.setdefault("kind", f"component{index}")
            structure = {key: params.pop(key) for key in _STRUCTURE if key in params}
            gold = str(rng.randint(10, 999))
            if structure:  # its own random stream: worlds without structure keep their exact draws
                params.update(_draw_structure(structure, params, gold, random.Random(f"world|{seed}|{i}|structure")))
            questions.append(
                SimQuestion(
                    id=i, question=f"Simulated question #{i}: what is the hidden number?", answer=gold, **params
                )
            )
        return cls(questions, seed=seed, **kwargs)

    def fresh(self) -> SimulatedWorld:
        """The same questions and seed with a new engine: replays exactly the same answers to the same prompts."""
        world = SimulatedWorld(
            self.questions,
            seed=self.seed,
            question_field=self.question_field,
            answer_field=self.answer_field,
            confidence_auroc=self.confidence_auroc,
            refiner_effects=self.refiner_effects,
        )
        world.prices = dict(self.prices)
        return world

    # What users touch --------------------------------------------------------------------------------------------

    @property
    def examples(self) -> list[dspy.Example]:
        """One labelled ``dspy.Example`` per question, inputs marked."""
        return [
            dspy.Example(**{self.question_field: q.question, self.answer_field: q.answer}).with_inputs(
                self.question_field
            )
            for q in self.questions
        ]

    def lm(
        self,
        *,
        faults: Mapping[str, float] | None = None,
        name: str = "world",
        price: tuple[float, float] = (0.0, 0.0),
        **kwargs: Any,
    ) -> dspy.LM:
        """A ``dspy.LM`` backed by this world's engine (``kwargs`` go to ``dspy.LM``; retries default to 0).

        With ``faults``, the LM gets its own engine that fails at those rates (see :data:`FAULT_KINDS`); the
        world's call counter then counts only fault-free engines, and the LM's engine is ``lm.engine``-reachable
        via :attr:`last_fault_engine`.

        Args:
            faults: ``{kind: rate}`` of injected failures.
            name: The LM is ``simulated/<name>`` (give a drafter and a refiner different names).
            price: Dollars per prompt and per completion token, reported for every call (see ``measure_usage``).
        """
        self.prices[f"simulated/{name}"] = (float(price[0]), float(price[1]))
        engine = self.engine if faults is None else SimulatedEngine(self, faults)
        if faults is not None:
            self.last_fault_engine = engine
        kwargs.setdefault("temperature", 0.7)
        kwargs.setdefault("num_retries", 0)
        kwargs.setdefault("cache", False)
        return dspy.LM(f"simulated/{name}", engine=engine, async_engine=_AsyncSimulatedEngine(engine), **kwargs)

    @property
    def calls(self) -> int:
        """LM calls the world's engine has answered."""
        return self.engine.calls

    def metric(self, example: dspy.Example, prediction: Any, trace: Any = None) -> bool:
        """Exact match of the normalised answer."""
        return normalize_answer(getattr(prediction, self.answer_field, None)) == normalize_answer(
            example[self.answer_field]
        )

    def truth(self, example_or_question: Any) -> SimQuestion:
        """The hidden parameters of an example (or question text)."""
        text = example_or_question
        if isinstance(example_or_question, dspy.Example):
            text = example_or_question[self.question_field]
        match = _QUESTION_ID.search(str(text))
        if match is None or int(match.group(1)) not in self._by_id:
            raise ConfigurationError(f"not a question of this world: {str(text)[:80]!r}")
        return self._by_id[int(match.group(1))]

    def summary(self) -> dict[str, Any]:
        """Mean true parameters and the share of each component."""
        n = len(self.questions)
        kinds = Counter(q.kind for q in self.questions)
        means = {k: sum(asdict(q)[k] for q in self.questions) / n for k in ("p0", "p_cw", "p_wc", "p_same_wrong")}
        return {"questions": n, "kinds": dict(kinds), **means}

    # The simulation ----------------------------------------------------------------------------------------------

    def _wrong(self, q: SimQuestion, rng: random.Random, avoid: str | None = None) -> str:
        if q.distractors:  # a wrong answer that changes is redrawn from all distractors (it may land on the same)
            return rng.choices(q.distractors, weights=q.distractor_weights)[0]
        gold = int(q.answer)
        while True:
            candidate = str(gold + rng.choice([-1, 1]) * rng.randint(1, 9))
            if candidate != avoid:
                return candidate

    def judge(self, inputs: Mapping[str, str], rng: random.Random) -> bool:
        """A self-judge's verdict on ``inputs["proposed_answer"]``: right with the question's TPR / FPR."""
        q = self.truth(inputs.get(self.question_field, ""))
        correct = normalize_answer(inputs.get("proposed_answer")) == normalize_answer(q.answer)
        return rng.random() < (q.judge_tpr if correct else q.judge_fpr)

    def chain_for(self, question: SimQuestion, instructions: str) -> tuple[float, float, float]:
        """``(p0, p_cw, p_wc)`` of ``question`` under a refiner with these instructions (see ``refiner_effects``)."""
        p_cw, p_wc = question.p_cw, question.p_wc
        text = instructions.lower()
        for phrase, factors in self.refiner_effects.items():
            if phrase.lower() in text:
                p_cw *= factors.get("p_cw", 1.0)
                p_wc *= factors.get("p_wc", 1.0)
        return question.p0, min(p_cw, 1.0), min(p_wc, 1.0)

    def garbles(self, system: str, rng: random.Random) -> bool:
        """Whether a refinement prompt with these instructions gets an unparseable response (``"garbage"``)."""
        text = system.lower()
        rate = max((f.get("garbage", 0.0) for p, f in self.refiner_effects.items() if p.lower() in text), default=0)
        return rate > 0 and rng.random() < rate

    def respond(self, inputs: Mapping[str, str], rng: random.Random, system: str = "") -> str:
        """The answer the world gives to a prompt with these input fields (``system``: the prompt's instructions,
        which matter with ``refiner_effects``)."""
        q = self.truth(inputs.get(self.question_field, ""))
        previous = inputs.get(f"previous_{self.answer_field}")
        if previous is None:  # round 0
            return q.answer if rng.random() < q.p0 else self._wrong(q, rng)
        if self.refiner_effects:
            _, p_cw, p_wc = self.chain_for(q, system)
            q = replace(q, p_cw=p_cw, p_wc=p_wc)
        was_correct = normalize_answer(previous) == normalize_answer(q.answer)
        if was_correct:
            if rng.random() < q.p_cw:
                return self._wrong(q, rng)
            if rng.random() < q.p_change_correct:  # same answer, written differently from the previous round
                return q.answer if previous.strip() != q.answer else f"{q.answer}.0"
            return previous
        if rng.random() < q.p_wc:
            return q.answer
        if rng.random() < q.p_same_wrong:
            return previous
        return self._wrong(q, rng, avoid=normalize_answer(previous))
