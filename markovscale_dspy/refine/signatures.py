"""Signatures: find the task signature of a wrapped program and derive the refinement signature from it."""

from __future__ import annotations

import dspy

from markovscale_dspy._exceptions import ConfigurationError

__all__ = ["REFINE_INSTRUCTIONS", "answer_fields", "infer_signature", "refinement_signature", "uses_reasoning"]

REASONING = "reasoning"

REFINE_INSTRUCTIONS = (
    "Improve a previous attempt at the task below. You are given the task's inputs and the previous attempt's "
    "outputs (the fields starting with `previous_`); the previous attempt may be wrong. Check it carefully: if it "
    "is correct, give the same outputs again; if it is wrong, correct it. Always give complete outputs."
)


def _predictor_signature(program: dspy.Module) -> type[dspy.Signature] | None:
    if isinstance(program, dspy.Predict):
        return program.signature
    predictors = program.named_predictors()
    if len(predictors) == 1:
        return predictors[0][1].signature
    return None


def infer_signature(program: dspy.Module, signature: str | type[dspy.Signature] | None) -> type[dspy.Signature]:
    """The task signature: the explicit one if given, else the wrapped program's only predictor's.

    Raises:
        ConfigurationError: ``program`` is not a DSPy module, or it has several predictors and no ``signature``
            says which inputs and outputs the whole program has.
    """
    if not isinstance(program, dspy.Module):
        raise ConfigurationError(
            f"program must be a dspy.Module (e.g. dspy.ChainOfThought('question -> answer')), got {program!r}"
        )
    if signature is not None:
        try:
            return dspy.ensure_signature(signature)
        except Exception as exc:
            raise ConfigurationError(f"signature {signature!r} is not a valid DSPy signature: {exc}") from None
    found = _predictor_signature(program)
    if found is None:
        n = len(program.named_predictors())
        raise ConfigurationError(
            f"cannot infer the task signature of {type(program).__name__}: it has {n} predictors. Pass "
            "signature='inputs -> outputs' describing the whole program's inputs and outputs"
        )
    return found


def uses_reasoning(program: dspy.Module) -> bool:
    """Whether the wrapped program reasons before answering (then the refiner does too)."""
    sig = _predictor_signature(program)
    return sig is not None and REASONING in sig.output_fields


def answer_fields(signature: type[dspy.Signature]) -> list[str]:
    """Output fields that make up the answer (every output field except ``reasoning``)."""
    fields = [name for name in signature.output_fields if name != REASONING]
    if not fields:
        raise ConfigurationError(f"signature {signature.signature!r} has no output field besides reasoning")
    return fields


def refinement_signature(signature: type[dspy.Signature], instructions: str | None = None) -> type[dspy.Signature]:
    """Task inputs plus ``previous_<field>`` for every answer field, producing the same answer fields."""
    refine = signature
    if REASONING in refine.output_fields:
        refine = refine.delete(REASONING)
    for name in answer_fields(signature):
        if f"previous_{name}" in refine.fields:
            raise ConfigurationError(
                f"signature already has a field named 'previous_{name}'; rename it so the refinement input "
                "for the previous answer does not collide"
            )
        field = signature.output_fields[name]
        desc = (field.json_schema_extra or {}).get("desc", "")
        described = f"The previous attempt's `{name}` (may be wrong)" + (
            f". {name}: {desc}" if desc and not desc.startswith("${") else ""
        )
        refine = refine.append(f"previous_{name}", dspy.InputField(desc=described), type_=field.annotation)
        # Move the output after the new input so the prompt reads inputs first.
        refine = refine.delete(name).append(name, field, type_=field.annotation)
    original = (signature.instructions or "").strip()
    text = instructions or REFINE_INSTRUCTIONS
    if original:
        text = f"{text}\n\nThe task: {original}"
    return refine.with_instructions(text)
