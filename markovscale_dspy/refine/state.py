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

__all__ = ["ENDPOINT_KEYS", "STATE_FORMAT", "MarkovState", "read_state_file", "scrub_lm_state"]

STATE_FORMAT = "markovscale.state/1"

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
    """Holds the fitted TransitionModel (or None) and the field names of the program it belongs to."""

    def __init__(self, input_fields: list[str], answer_fields: list[str]):
        self.input_fields = list(input_fields)
        self.answer_fields = list(answer_fields)
        self.model: TransitionModel | None = None

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
        }

    def load_state(self, state: Any) -> MarkovState:
        self.model = self.parse(state, self.input_fields, self.answer_fields)
        return self

    @staticmethod
    def parse(state: Any, input_fields: list[str], answer_fields: list[str]) -> TransitionModel | None:
        """Validate a dumped state against a program's fields and return its model (raises StateError)."""
        if not isinstance(state, dict):
            raise StateError(f"MarkovRefine state must be a JSON object, got {type(state).__name__}")
        found = state.get("format")
        if found != STATE_FORMAT:
            raise StateError(
                f"MarkovRefine state has format {found!r}, this markovscale_dspy ({__version__}) reads "
                f"{STATE_FORMAT!r}; recalibrate with this version or load it with the version that wrote it "
                f"({state.get('markovscale_version', 'unknown')})"
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
