"""Measure the LM calls and tokens spent inside a block, per thread (DSPy's outer trackers miss worker threads)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import dspy

__all__ = ["Usage", "measure"]


@dataclass
class Usage:
    """LM calls that reached a provider and the tokens they reported (cache hits are free and not counted)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )

    @classmethod
    def from_dict(cls, data: dict[str, int] | None) -> Usage:
        """The inverse of :meth:`to_dict` (missing counts are 0; ``None`` is no usage)."""
        data = data or {}
        return cls(data.get("calls", 0), data.get("prompt_tokens", 0), data.get("completion_tokens", 0))

    def to_dict(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@contextmanager
def measure() -> Iterator[Usage]:
    """Count the LM calls and tokens of everything run inside the block on this thread (and its async tasks).

    Built on ``dspy.track_usage`` (one usage entry per call that reached the provider), not on callbacks, which
    would make DSPy dispatch callbacks for every module and adapter call.

    Example:
        >>> with measure() as usage:
        ...     pass  # run a program here
        >>> usage.calls
        0
    """
    usage = Usage()
    with dspy.track_usage() as tracker:
        try:
            yield usage
        finally:
            for entries in tracker.usage_data.values():
                usage.calls += len(entries)
                for entry in entries:
                    usage.prompt_tokens += int(entry.get("prompt_tokens") or 0)
                    usage.completion_tokens += int(entry.get("completion_tokens") or 0)
