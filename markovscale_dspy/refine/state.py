"""The calibration state MarkovRefine saves and loads through DSPy's own ``save``/``load`` (JSON, never pickle).

It is a ``dspy`` Parameter, so ``module.save("x.json")`` writes it under the key of the attribute holding it
(``"markov"``), while prompt optimizers (which only touch ``Predict``) ignore it. Saved LM settings are scrubbed of
endpoints and credentials (:data:`ENDPOINT_KEYS`) wherever they appear in a state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dspy.predict.parameter import Parameter

from markovscale_dspy._exceptions import StateError
from markovscale_dspy._version import __version__
from markovscale_dspy.core.model import TransitionModel

__all__ = [
    "ENDPOINT_KEYS",
    "STATE_FORMAT",
    "MarkovState",
    "drop_unrestorable_lms",
    "load_into",
    "read_state_file",
    "scrub_lm_state",
]

#: Version 2 adds what the calibration was fitted for (``calibrated_for``: LM names) and what it spent
#: (``spend``: calls, tokens and dollars per question and per refinement round). Version 1 states still load.
STATE_FORMAT = "markovscale.state/2"
READABLE_FORMATS = ("markovscale.state/1", STATE_FORMAT)

#: LM settings that locate an endpoint or carry credentials: never written to a state, a trace key or a report.
ENDPOINT_KEYS = frozenset({"api_key", "api_base", "base_url", "extra_headers", "headers", "model_list"})


def scrub_lm_state(state: Any) -> Any:
    """A copy of a dumped DSPy state with :data:`ENDPOINT_KEYS` removed from every saved LM (``"lm"`` entries)."""
    if isinstance(state, dict):
        return {
            k: (
                {n: v for n, v in value.items() if n not in ENDPOINT_KEYS}
                if k == "lm" and isinstance(value, dict)
                else scrub_lm_state(value)
            )
            for k, value in state.items()
        }
    if isinstance(state, list):
        return [scrub_lm_state(v) for v in state]
    return state


def drop_unrestorable_lms(state: Any, path: str = "") -> list[str]:
    """Unpin, in place, saved LMs that no file can restore: engines holding no endpoint or key (``restorable =
    False`` on the engine class, e.g. a LiteLLM Router group). Returns ``"<where>: <model>"`` for each one."""
    dropped: list[str] = []
    if isinstance(state, dict):
        for key, value in list(state.items()):
            if key == "lm" and isinstance(value, dict) and _unrestorable(value):
                dropped.append(f"{path or 'program'}: {value.get('model')}")
                state[key] = None
            else:
                dropped += drop_unrestorable_lms(value, f"{path}.{key}" if path else str(key))
    elif isinstance(state, list):
        for i, value in enumerate(state):
            dropped += drop_unrestorable_lms(value, f"{path}[{i}]")
    return dropped


def _unrestorable(lm_state: dict[str, Any]) -> bool:
    engine = lm_state.get("engine")
    return isinstance(engine, dict) and str(engine.get("class", "")).endswith(UNRESTORABLE_ENGINES)


#: Engine classes whose saved LM cannot be rebuilt from a file (their endpoints and keys are never saved).
UNRESTORABLE_ENGINES = (":RouterEngine",)


def read_state_file(path: str | os.PathLike, key: str = "markov", owner: str = "MarkovRefine") -> dict[str, Any]:
    """The JSON object in a state file that holds a MarkovRefine state (a ``"markov"`` entry, or ``key``), or
    StateError."""
    path = Path(path)
    if path.suffix != ".json":
        raise StateError(f"{owner} loads JSON state only, never pickles: {path.name!r} is not a .json file")
    try:
        state = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise StateError(f"no state file at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StateError(f"{path} is not valid JSON ({exc}); the file is corrupt: restore it or recalibrate") from None
    if not isinstance(state, dict) or key not in state:
        raise StateError(
            f"{path} holds no {owner} state (no {key!r} entry): was it saved from another kind of program?"
        )
    return state


class MarkovState(Parameter):
    """Holds the fitted TransitionModel (or None) and the field names of the program it belongs to.

    Attributes:
        model: The calibrated chain.
        calibrated_for: The LM names the chain was fitted for: ``{"program": [names of round 0's LMs], "refiner":
            name of the refiner's LM}``; ``None`` when unknown (a version-1 state, a model assigned by hand).
            Names only (``lm.model``, e.g. ``"openai/gpt-4o-mini"`` or ``"router/pool"``), never endpoints or keys.
        spend: What calibration measured per question (``"round0"``) and per refinement round (``"refinement"``):
            mean ``calls``, ``prompt_tokens``, ``completion_tokens`` and ``cost`` (dollars; ``None`` if unknown)
            over the calls that reached the LM (cache hits excluded), and ``n`` such rounds.
    """

    def __init__(self, input_fields: list[str], answer_fields: list[str]):
        self.input_fields = list(input_fields)
        self.answer_fields = list(answer_fields)
        self.model: TransitionModel | None = None
        self.calibrated_for: dict[str, Any] | None = None
        self.spend: dict[str, Any] | None = None

    def dollars_per_round(self) -> float | None:
        """Measured dollars of one refinement round (``None`` if not measured or the price is unknown)."""
        refinement = (self.spend or {}).get("refinement") or {}
        cost = refinement.get("cost")
        return None if cost is None else float(cost)

    def reset(self) -> None:
        """Keep the calibration: DSPy's prompt optimizers reset every parameter of their student (``reset_copy``)
        to clear demos, and a calibration must not be lost silently on the way. Recalibrate after changing
        prompts if the rates may have moved."""

    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "markovscale_version": __version__,
            "program": {"inputs": self.input_fields, "answers": self.answer_fields},
            "model": self.model.to_dict() if self.model is not None else None,
            "calibrated_for": self.calibrated_for,
            "spend": self.spend,
        }

    def load_state(self, state: Any) -> MarkovState:
        self.model = self.parse(state, self.input_fields, self.answer_fields)
        self.calibrated_for = _mapping_or_none(state.get("calibrated_for"), "calibrated_for")
        self.spend = _mapping_or_none(state.get("spend"), "spend")
        return self

    @staticmethod
    def parse(state: Any, input_fields: list[str], answer_fields: list[str]) -> TransitionModel | None:
        """Validate a dumped state against a program's fields and return its model (raises StateError)."""
        if not isinstance(state, dict):
            raise StateError(f"MarkovRefine state must be a JSON object, got {type(state).__name__}")
        found = state.get("format")
        if found not in READABLE_FORMATS:
            raise StateError(
                f"MarkovRefine state has format {found!r}, this markovscale_dspy ({__version__}) reads "
                f"{' and '.join(map(repr, READABLE_FORMATS))}; recalibrate with this version or load it with the "
                f"version that wrote it ({state.get('markovscale_version', 'unknown')})"
            )
        program = state.get("program") or {}
        saved = (program.get("inputs"), program.get("answers"))
        if saved != (input_fields, answer_fields):
            raise StateError(
                f"state belongs to another program (inputs {saved[0]} -> answers {saved[1]}); this MarkovRefine "
                f"has inputs {input_fields} -> answers {answer_fields}. Load a state calibrated for this program"
            )
        model = state.get("model")
        return None if model is None else TransitionModel.from_dict(model)


def _mapping_or_none(value: Any, name: str) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    raise StateError(f"MarkovRefine state field {name!r} must be an object or null, got {type(value).__name__}")


def load_into(
    module: Any, state: dict[str, Any], path: str | os.PathLike, owner: str, allow_unsafe_lm_state: bool
) -> None:
    """``module.load_state(state)`` (DSPy's, all or nothing), with anything that does not fit as a StateError."""
    state.setdefault("metadata", {"dependency_versions": {}})
    try:
        module.load_state(state, allow_unsafe_lm_state=allow_unsafe_lm_state)
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateError(
            f"{Path(path)} does not fit this {owner} ({type(exc).__name__}: {exc}); build the module with the same "
            "program and signature as the one that was saved"
        ) from None
