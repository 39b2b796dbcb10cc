"""Stop a calibration early, before paying for what cannot succeed.

Calibrator layer. The workers of one calibration share a :class:`RunGuard`: the first LM failure no retry can mend
(a rejected key, an unknown model, an invalid request, a prompt over the context window) stops it at once, and so
does the ``max_errors``-th error (a program that raises, a round 0 that does not parse, a metric that raises), as
``dspy.Evaluate`` stops. Workers that have not started then return without calling the LM; finished chains are
already in the trace store, so the fixed re-run pays only for the rest.
"""

from __future__ import annotations

import threading
from collections import Counter

from markovscale_dspy._exceptions import CalibrationError, ConfigurationError

__all__ = ["RunGuard"]


class RunGuard:
    """The first unrecoverable failure and the errors of one calibration, shared by its worker threads.

    Args:
        max_errors: Errors (round-0 failures, failed samples, metric exceptions) after which the calibration stops.

    Example:
        >>> guard = RunGuard(max_errors=2)
        >>> guard.error("KeyError: 'gold'"); guard.stopped
        False
        >>> guard.error("KeyError: 'gold'"); guard.stopped
        True
    """

    def __init__(self, max_errors: int):
        self.max_errors = max_errors
        self._lock = threading.Lock()
        self._errors: list[str] = []
        self._fatal: tuple[str, str] | None = None

    @property
    def stopped(self) -> bool:
        """Whether workers should stop starting new chains."""
        with self._lock:
            return self._fatal is not None or len(self._errors) >= self.max_errors

    def error(self, description: str) -> None:
        """Count one error (``"Type: message"``)."""
        with self._lock:
            self._errors.append(description)

    def fatal(self, description: str, fix: str) -> None:
        """Record a failure no retry can mend (the first one is the one reported)."""
        with self._lock:
            if self._fatal is None:
                self._fatal = (description, fix)

    def check(self, examples: int) -> None:
        """Raise if the calibration was stopped.

        Raises:
            ConfigurationError: an unrecoverable LM failure (what to fix is named).
            CalibrationError: ``max_errors`` errors (the commonest are listed).
        """
        with self._lock:
            fatal, errors = self._fatal, list(self._errors)
        if fatal is not None:
            description, fix = fatal
            raise ConfigurationError(
                f"calibration stopped at the first failure no retry can mend ({description}): {fix}. Chains finished "
                "before it are kept in the trace store"
            )
        if len(errors) >= self.max_errors:
            common = "; ".join(f"{n}x {e}" for e, n in Counter(errors).most_common(3))
            raise CalibrationError(
                f"calibration stopped after {len(errors)} errors on {examples} trainset examples (max_errors="
                f"{self.max_errors}): {common}. Fix the program or the metric, or allow more with "
                "MarkovCalibrator(max_errors=...) (default: dspy.settings.max_errors); finished chains are kept in "
                "the trace store"
            )
