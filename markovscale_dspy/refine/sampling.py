"""Fresh samples of a program: rollout ids and the independent round-0 draws votes and calibration share.

Module layer. DSPy's cache keys a call by its inputs and ``rollout_id``, so every sample and every refinement round
gets an id of its own (composed with any outer attempt's, e.g. ``dspy.BestOfN``'s) at a temperature above 0. The
functions take plain arguments -- a program, a temperature, a rollout namespace -- so MarkovScale and the
calibrator draw the same samples without either knowing the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import dspy

from markovscale_dspy.core.validation import check_int
from markovscale_dspy.refine.loop import Outcome
from markovscale_dspy.spending import SpendingStopped, metered
from markovscale_dspy.tracing import scrubbed_errors

__all__ = [
    "MAX_SAMPLES",
    "ROLLOUT_STRIDE",
    "afresh_sample",
    "compose_rollout",
    "fresh_sample",
    "has_pinned_lm",
    "rollout_of",
    "sample_rollout",
]

#: Rollout ids of one chain are ``rollout_seed * ROLLOUT_STRIDE + round``.
ROLLOUT_STRIDE = 1000
#: Most independent samples per question (calibration or inference).
MAX_SAMPLES = ROLLOUT_STRIDE - 1


def compose_rollout(outer: Any, own: int) -> Any:
    """A rollout id for ``own`` inside an outer attempt's id: distinct for every (outer, own) pair.

    Example:
        >>> compose_rollout(None, 3), compose_rollout(2, 3), compose_rollout("a", 3)
        (3, 3000003, 'a/3')
    """
    if outer is None:
        return own
    if isinstance(outer, int) and not isinstance(outer, bool):
        return (outer + 1) * ROLLOUT_STRIDE**2 + own
    return f"{outer}/{own}"


def sample_rollout(rollout_seed: int, index: int) -> int:
    """Own rollout id of independent sample ``index`` (composed with any outer attempt's id when used).

    Example:
        >>> sample_rollout(2, 5)
        2005
    """
    return rollout_seed * ROLLOUT_STRIDE + check_int("index", index, 0, MAX_SAMPLES)


def rollout_of(lm: Any) -> Any:
    """The rollout id an LM was given (``None`` when it has none)."""
    return (getattr(lm, "kwargs", None) or {}).get("rollout_id")


def has_pinned_lm(program: dspy.Module) -> bool:
    """Whether any predictor of ``program`` has its own LM (then samples need a copy of the program)."""
    return any(p.lm is not None for _, p in program.named_predictors())


@contextlib.contextmanager
def _fresh_program(
    program: dspy.Module, own: int, temperature: float, pinned: bool | None = None
) -> Iterator[dspy.Module]:
    """The program set up to draw fresh sample ``own`` at ``temperature``: the configured LM through
    ``dspy.context``, and every pinned LM through a copy of the program (its other LMs keep their own settings).
    ``pinned`` is :func:`has_pinned_lm` if the caller knows it (walking the program costs as much as its history)."""
    module = program
    if has_pinned_lm(program) if pinned is None else pinned:
        module = program.deepcopy()
        for _, predictor in module.named_predictors():
            if predictor.lm is not None:
                rid = compose_rollout(rollout_of(predictor.lm), own)
                predictor.lm = predictor.lm.copy(rollout_id=rid, temperature=temperature)
    lm = dspy.settings.lm
    if lm is None:
        yield module
        return
    with dspy.context(lm=lm.copy(rollout_id=compose_rollout(rollout_of(lm), own), temperature=temperature)):
        yield module


def fresh_sample(
    program: dspy.Module, inputs: dict[str, Any], *, rollout: int, temperature: float, pinned: bool | None = None
) -> Outcome:
    """An independent round-0 sample of ``program``: own rollout id ``rollout`` (see :func:`sample_rollout`; composed
    with the LM's) at ``temperature``. What calibration draws and what votes use, so the two agree. A failure is
    returned, not raised (a failed sample does not vote)."""
    with metered() as usage, scrubbed_errors():
        try:
            with _fresh_program(program, rollout, temperature, pinned) as module:
                prediction, error = module(**inputs), None
        except (Exception, SpendingStopped) as exc:  # a failed or refused sample is data: it does not vote
            prediction, error = None, exc
    return Outcome(prediction, error, usage.to_dict())


async def afresh_sample(
    program: dspy.Module, inputs: dict[str, Any], *, rollout: int, temperature: float, pinned: bool | None = None
) -> Outcome:
    """Async twin of :func:`fresh_sample`."""
    with metered() as usage, scrubbed_errors():
        try:
            with _fresh_program(program, rollout, temperature, pinned) as module:
                if hasattr(module, "aforward"):
                    prediction = await module.acall(**inputs)
                else:
                    prediction = await dspy.asyncify(module)(**inputs)
                error = None
        except (Exception, SpendingStopped) as exc:
            prediction, error = None, exc
    return Outcome(prediction, error, usage.to_dict())
