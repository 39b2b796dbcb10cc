"""A disk store of finished calibration chains, so an interrupted calibration resumes without paying again.

Calibrator layer, private. Every chain is written as soon as it finishes, keyed by what determines its outcome:
the program (signatures, instructions, demos of the wrapped program and the refiner), the refinement settings,
the LM (model, sampling settings, endpoint -- hashed, never stored), the adapter, and the example. A re-run of
the same calibration finds every finished chain and calls the LM only for the rest.

Storage is ``diskcache`` with its JSON disk: values are JSON, never pickles, and the directory can be shared by
processes. Outputs that are not plain JSON (pydantic models, dates, enums, nested lists and dicts of them) are
stored in pydantic's JSON form and restored to the types of the program's output fields when a chain is reused.
Default location: ``$MARKOVSCALE_TRACE_DIR``, else ``~/.cache/markovscale/traces``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import diskcache
import dspy
from pydantic import TypeAdapter
from pydantic_core import PydanticSerializationError, to_jsonable_python

from markovscale_dspy.refine.state import ENDPOINT_KEYS

__all__ = [
    "DEFAULT_TRACE_DIR",
    "TraceStore",
    "UnknownLMIdentityError",
    "chain_key",
    "lm_fingerprint",
    "restore_outputs",
]

logger = logging.getLogger(__name__)

DEFAULT_TRACE_DIR = Path("~/.cache/markovscale/traces")
_FORMAT = "markovscale.trace/1"


def default_trace_dir() -> Path:
    return Path(os.environ.get("MARKOVSCALE_TRACE_DIR") or DEFAULT_TRACE_DIR).expanduser()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()


class UnknownLMIdentityError(Exception):
    """An LM whose answers cannot be told apart from another's (no named engine, no fingerprint)."""


def lm_fingerprint(lm: Any) -> dict[str, Any]:
    """What about an LM decides its answers: model, sampling settings, engine and endpoint (the last two hashed).

    Raises:
        UnknownLMIdentityError: the LM is not a ``dspy.LM`` with a named engine, nor a custom engine with a
            ``fingerprint`` (``DummyLM``, a ``BaseLM`` subclass, an engine object without one): two different such
            LMs would look alike, so their chains must not be shared.
    """
    if lm is None:
        return {"lm": None}
    engine = getattr(lm, "_engine_spec", None)
    if not isinstance(lm, dspy.LM):
        raise UnknownLMIdentityError(
            f"{type(lm).__name__} {getattr(lm, 'model', '')!r} has no identity to key chains by"
        )
    if engine is not None and not isinstance(engine, str):
        fingerprint = getattr(engine, "fingerprint", None)
        if not isinstance(fingerprint, str):
            raise UnknownLMIdentityError(
                f"the custom engine {type(engine).__qualname__} of {lm.model!r} has no `fingerprint` string"
            )
        engine = fingerprint
    kwargs = dict(getattr(lm, "kwargs", {}) or {})
    endpoint = {k: kwargs.pop(k) for k in list(kwargs) if k in ENDPOINT_KEYS}
    endpoint.pop("api_key", None)  # the key does not change answers
    return {
        "model": lm.model,
        "model_type": getattr(lm, "model_type", None),
        "kwargs": kwargs,
        "endpoint": _digest(endpoint) if endpoint else None,
        "engine": engine,
    }


def chain_key(
    program: Any,
    rounds: int,
    example: dspy.Example,
    trace_key: str | None = None,
    sample: int | None = None,
    purpose: Any = None,
) -> str:
    """Key of one calibration chain: program state, refinement settings, LM, adapter and example.

    ``trace_key`` stands in for the identity of LMs that have none (see :func:`lm_fingerprint`); without it such
    an LM raises UnknownLMIdentityError, and the chain is not stored or reused. With ``sample``, the key of the
    example's independent round-0 sample of that index instead (its own rollout id at the program's temperature),
    so a calibration that asks for more samples reuses the ones it already has. ``purpose`` (any JSON-able
    value) keeps chains of another kind apart (e.g. refinements continued from a given round-0 answer).
    """

    def identity(lm: Any) -> Any:
        try:
            return lm_fingerprint(lm)
        except UnknownLMIdentityError:
            if trace_key is None:
                raise
            return {"trace_key": trace_key, "model": getattr(lm, "model", type(lm).__name__)}

    state = {
        name: {
            "signature": predictor.signature.dump_state(),
            "demos": [demo.toDict() if hasattr(demo, "toDict") else demo for demo in predictor.demos],
            "lm": identity(predictor.lm) if predictor.lm is not None else None,
        }
        for name, predictor in program.named_predictors()
    }
    lm = program.program.get_lm() if _single_lm(program.program) else None
    settings = {
        "program": state,
        "rounds": rounds,
        "temperature": program.temperature,
        "rollout_seed": program.rollout_seed,
        "answer_fields": program.answer_fields,
        "lm": identity(lm or dspy.settings.lm),
        "refiner_lm": identity(program.refiner_lm) if program.refiner_lm is not None else None,
        "adapter": type(dspy.settings.adapter).__name__ if dspy.settings.adapter is not None else "ChatAdapter",
        "example": example.toDict(),
        "trace_key": trace_key,
    }
    if sample is not None:  # chains keep the keys they always had
        settings["sample"] = sample
    if purpose is not None:
        settings["purpose"] = purpose
    confidence = getattr(program, "confidence", "auto")
    if confidence != "auto":  # True asks the LM for more; False / a function record something else
        settings["confidence"] = (
            confidence if isinstance(confidence, bool) else getattr(confidence, "__qualname__", "fn")
        )
    return _digest(settings)


def _single_lm(program: Any) -> bool:
    try:
        return program.get_lm() is not None
    except ValueError:
        return False


class TraceStore:
    """Finished calibration chains on disk (JSON values in a ``diskcache.Cache``).

    Args:
        directory: Where to keep them (default ``$MARKOVSCALE_TRACE_DIR`` or ``~/.cache/markovscale/traces``).
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory).expanduser() if directory is not None else default_trace_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cache = diskcache.Cache(str(self.directory), disk=diskcache.JSONDisk, timeout=30)

    def get(self, key: str) -> list[dict[str, Any]] | None:
        """The trajectory stored under ``key``, or ``None``; an unreadable entry counts as missing."""
        try:
            value = self._cache.get(key)
        except Exception as exc:  # a damaged entry must not stop a calibration: recompute it
            logger.warning("ignoring unreadable trace %s: %s", key[:12], exc)
            return None
        if not isinstance(value, dict) or value.get("format") != _FORMAT:
            return None
        return value.get("trajectory")

    def put(self, key: str, trajectory: list[dict[str, Any]]) -> str | None:
        """Store a finished chain, its outputs in pydantic's JSON form. Returns ``None`` when stored, else why it
        could not be (an output pydantic cannot serialise): then nothing is stored."""
        try:
            value = {"format": _FORMAT, "trajectory": to_jsonable_python(trajectory)}
            json.dumps(value)
        except (PydanticSerializationError, TypeError, ValueError) as exc:
            return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        self._cache.set(key, value)
        return None

    def __len__(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        self._cache.close()

    def __repr__(self) -> str:
        return f"TraceStore({str(self.directory)!r}, chains={len(self)})"


def restore_outputs(outputs: dict[str, Any], types: dict[str, Any]) -> dict[str, Any]:
    """A stored round's outputs with their declared types back (``types``: output field name -> annotation), so a
    metric sees on a reused chain what it saw on the fresh one.

    Raises:
        ValueError: a stored value no longer fits its field's type (the program changed): recompute the chain.

    Example:
        >>> import pydantic
        >>> class Answer(pydantic.BaseModel):
        ...     value: int
        >>> restore_outputs({"answer": {"value": 3}, "reasoning": "r"}, {"answer": Answer, "reasoning": str})
        {'answer': Answer(value=3), 'reasoning': 'r'}
    """
    restored = dict(outputs)
    for name, annotation in types.items():
        if name in restored and annotation not in (str, Any, None):
            restored[name] = _adapter(annotation).validate_python(restored[name])
    return restored


def _adapter(annotation: Any) -> TypeAdapter:
    try:
        return _ADAPTERS[annotation]
    except (KeyError, TypeError):  # TypeError: an unhashable annotation is adapted each time
        adapter = TypeAdapter(annotation)
        try:
            _ADAPTERS[annotation] = adapter
        except TypeError:
            pass
        return adapter


_ADAPTERS: dict[Any, TypeAdapter] = {}
