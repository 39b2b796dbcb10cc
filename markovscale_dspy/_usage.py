"""Measure the LM calls and tokens spent inside a block, per thread (DSPy's outer trackers miss worker threads)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import dspy
from dspy.utils.callback import BaseCallback

__all__ = ["Usage", "measure"]


@dataclass
class Usage:
    """LM calls (including cache hits and adapter retries) and the tokens providers reported (cache misses)."""

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

    def to_dict(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


class _CallCounter(BaseCallback):
    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def on_lm_start(self, call_id, instance, inputs):
        with self._lock:
            self.calls += 1


@contextmanager
def measure() -> Iterator[Usage]:
    """Count LM calls and tokens of everything run inside the block on this thread (and its async tasks).

    Example:
        >>> with measure() as usage:
        ...     pass  # run a program here
        >>> usage.calls
        0
    """
    usage = Usage()
    counter = _CallCounter()
    with dspy.context(callbacks=[*dspy.settings.callbacks, counter]), dspy.track_usage() as tracker:
        try:
            yield usage
        finally:
            for totals in tracker.get_total_tokens().values():
                usage.prompt_tokens += int(totals.get("prompt_tokens") or 0)
                usage.completion_tokens += int(totals.get("completion_tokens") or 0)
            usage.calls = counter.calls
