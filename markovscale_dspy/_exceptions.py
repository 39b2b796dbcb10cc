"""The exceptions raised by markovscale_dspy: one base class, a few specific situations.

Every class also derives from the builtin a caller would naturally catch (``ValueError`` for bad input,
``RuntimeError`` for failures while running), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "ConfigurationError",
    "DataError",
    "MarkovScaleError",
    "NotCalibratedError",
    "RoundZeroError",
    "StateError",
]


class MarkovScaleError(Exception):
    """Base class of every error raised by markovscale_dspy."""


# Bad input ------------------------------------------------------------------------------------------------------


class ConfigurationError(MarkovScaleError, ValueError):
    """An argument has an invalid value (a probability outside [0, 1], an unknown policy, a bad field name...)."""


class DataError(MarkovScaleError, ValueError):
    """Labels, examples or a trainset cannot be used (empty, unlabelled, not booleans...)."""


class StateError(MarkovScaleError, ValueError):
    """A saved state is corrupt, belongs to another program, or comes from an incompatible version."""


class NotCalibratedError(MarkovScaleError, ValueError):
    """A policy needs a fitted TransitionModel and the module has none."""


# Failures while running -----------------------------------------------------------------------------------------


class RoundZeroError(MarkovScaleError, RuntimeError):
    """The wrapped program failed in round 0, so there is no answer to return or refine."""


class CalibrationError(MarkovScaleError, RuntimeError):
    """A calibration ran but produced too little usable data to fit the chain."""
