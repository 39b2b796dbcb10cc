"""What calibration observed on one trainset example: a chain of labelled rounds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ChainRecord", "jsonable"]


@dataclass
class ChainRecord:
    """What calibration observed on one trainset example.

    Attributes:
        index: Position of the example in the trainset.
        labels: Correctness of every round (``None`` where the round failed or could not be graded).
        answers: Normalised answer of every round.
        errors: Per round, the failure that kept the previous answer (``None`` if the round succeeded).
        failure: Why the whole chain is missing (round 0 or the worker failed), else ``None``.
        metric_error: The metric's exception on this example, if it raised.
        usage: LM calls, tokens and dollars spent on the chain (when it was first run, if reused).
        round_usage: The same per round (round 0 first).
        reused: Whether the chain came from the trace store instead of the LM.
        samples: Independent round-0 samples of the example (``parallel_samples``), each a dict with its
            ``label``, normalised ``answer``, ``error``, ``usage`` and whether it was ``reused``.
        confidences: Every round's answer confidence from token log-probabilities (``None`` where there was none).
        skipped: The chain never ran: the calibration had stopped (an unrecoverable failure or ``max_errors``).
    """

    index: int
    labels: list[bool | None] = field(default_factory=list)
    answers: list[Any] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    failure: str | None = None
    metric_error: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    round_usage: list[dict[str, Any]] = field(default_factory=list)
    reused: bool = False
    samples: list[dict[str, Any]] = field(default_factory=list)
    confidences: list[float | None] = field(default_factory=list)
    skipped: bool = False

    def observed(self) -> list[tuple[bool, Any]]:
        """The (label, answer) pairs the fit may use: failed rounds dropped (they kept the previous answer, so the
        chain did not move), and the chain cut where the metric could not grade a real answer."""
        chain: list[tuple[bool, Any]] = []
        for label, answer, error in zip(self.labels, self.answers, self.errors, strict=True):
            if error is not None:
                continue
            if label is None:
                break
            chain.append((label, _hashable(answer)))
        return chain

    def observed_confidences(self) -> list[float | None]:
        """The confidence of every round in :meth:`observed` (aligned with it)."""
        confidences = self.confidences or [None] * len(self.labels)
        out: list[float | None] = []
        for label, error, confidence in zip(self.labels, self.errors, confidences, strict=True):
            if error is not None:
                continue
            if label is None:
                break
            out.append(confidence)
        return out

    def observed_chain(self) -> list[bool]:
        """The labels of :meth:`observed`."""
        return [label for label, _ in self.observed()]

    def graded_samples(self) -> list[tuple[bool, Any]]:
        """The (label, answer) pairs of the samples that produced a gradable answer (failed ones do not vote)."""
        return [
            (s["label"], _hashable(s["answer"]))
            for s in self.samples
            if s.get("error") is None and s.get("label") is not None
        ]


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
