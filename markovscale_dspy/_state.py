"""The calibration state MarkovRefine saves and loads through DSPy's own ``save``/``load`` (JSON, never pickle).

It is a ``dspy`` Parameter, so ``module.save("x.json")`` writes it under the key of the attribute holding it, even
when MarkovRefine is nested in a larger program, while prompt optimizers (which only touch ``Predict``) ignore it.
"""

from __future__ import annotations

from typing import Any

from dspy.predict.parameter import Parameter

from markovscale_dspy._exceptions import StateError
from markovscale_dspy._model import TransitionModel
from markovscale_dspy._version import __version__

__all__ = ["STATE_FORMAT", "MarkovState"]

STATE_FORMAT = "markovscale.state/1"


class MarkovState(Parameter):
    """Holds the fitted TransitionModel (or None) and the field names of the program it belongs to."""

    def __init__(self, input_fields: list[str], answer_fields: list[str]):
        self.input_fields = list(input_fields)
        self.answer_fields = list(answer_fields)
        self.model: TransitionModel | None = None

    def reset(self) -> None:
        self.model = None

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
