"""Measure the LM calls, tokens and dollars spent inside a block, per thread (DSPy's outer trackers miss workers).

Calls and tokens come from ``dspy.track_usage``. Dollars come from two places:

* engines that know what a call cost (the LiteLLM Router engine, which reads LiteLLM's ``response_cost`` for the
  deployment that answered, or the simulated world) report it with :func:`record_cost`;
* for every other LM, the tokens are priced per model: prices registered with :func:`register_price` (self-hosted
  models declared by ``build_lm`` cost 0 unless given), else LiteLLM's cost map (``litellm.model_cost``, when the
  calls went through LiteLLM).

A model with no known price makes the dollars *unknown* (``cost is None``), never silently zero. Cache hits cost
nothing and are not counted, exactly like their tokens.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import dspy

__all__ = ["Usage", "detach_meter", "measure_usage", "price_of", "record_cost", "register_price"]


@dataclass
class Usage:
    """LM calls that reached a provider, the tokens they reported and their price in dollars.

    ``cost`` is ``None`` when some call's price is unknown (a hosted model missing from LiteLLM's cost map, a
    custom LM): sums with an unknown part stay unknown. Cache hits are free and not counted.
    """

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        cost = None if self.cost is None or other.cost is None else self.cost + other.cost
        return Usage(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            cost,
        )

    @classmethod
    def from_dict(cls, data: dict[str, int] | None) -> Usage:
        """The inverse of :meth:`to_dict` (missing counts are 0; ``None`` is no usage).

        Usage recorded before dollars were measured has no ``cost``: it is unknown unless no call was made.
        """
        data = data or {}
        calls = data.get("calls", 0)
        cost = data.get("cost") if "cost" in data else (0.0 if not calls else None)
        return cls(calls, data.get("prompt_tokens", 0), data.get("completion_tokens", 0), cost)

    def to_dict(self) -> dict[str, int | float | None]:
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cost": self.cost,
        }


# Prices ------------------------------------------------------------------------------------------------------------

_prices: dict[str, tuple[float, float] | None] = {}
_prices_lock = threading.Lock()


def register_price(model: str, input_cost_per_token: float, output_cost_per_token: float) -> None:
    """Dollars per prompt and completion token of ``model`` (the LM's ``model`` string), used by :func:`measure_usage`.

    Example:
        >>> register_price("openai/my-self-hosted-model", 0.0, 0.0)
        >>> from markovscale_dspy.usage import price_of
        >>> price_of("openai/my-self-hosted-model")
        (0.0, 0.0)
    """
    with _prices_lock:
        _prices[model] = (float(input_cost_per_token), float(output_cost_per_token))


def price_of(model: str) -> tuple[float, float] | None:
    """``(dollars per prompt token, per completion token)`` of ``model``, or ``None`` when unknown.

    Registered prices first, then LiteLLM's cost map if LiteLLM is loaded (calls through LiteLLM load it; a run
    that never touched LiteLLM does not pay its import time for pricing).
    """
    with _prices_lock:
        if model in _prices:
            return _prices[model]
    litellm = sys.modules.get("litellm")
    if litellm is None:
        return None
    try:
        info = litellm.get_model_info(model)
        price = (float(info["input_cost_per_token"] or 0.0), float(info["output_cost_per_token"] or 0.0))
    except Exception:  # not in the cost map: unknown, never zero
        price = None
    with _prices_lock:
        return _prices.setdefault(model, price)


# Dollars reported by engines -----------------------------------------------------------------------------------------


@dataclass
class _Meter:
    dollars: float | None = 0.0
    models: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, model: str, dollars: float | None) -> None:
        with self.lock:
            self.models.add(model)
            self.dollars = None if self.dollars is None or dollars is None else self.dollars + float(dollars)

    def absorb(self, other: _Meter) -> None:
        with other.lock:
            models, dollars = set(other.models), other.dollars
        with self.lock:
            self.models |= models
            self.dollars = None if self.dollars is None or dollars is None else self.dollars + dollars


_meter: ContextVar[_Meter | None] = ContextVar("markovscale_cost_meter", default=None)


def record_cost(model: str, dollars: float | None) -> None:
    """Report the price of one call to ``model`` (the LM's ``model`` string) to the enclosing :func:`measure_usage`
    blocks.

    For engines that know what a call cost; ``None`` means the price is unknown. Calls of a model that reported
    its cost this way are not priced again from their tokens.
    """
    meter = _meter.get()
    if meter is not None:
        meter.add(model, dollars)


def detach_meter() -> None:
    """Leave the enclosing :func:`measure_usage` blocks of this context (a worker thread counts its own calls)."""
    _meter.set(None)


@contextmanager
def measure_usage() -> Iterator[Usage]:
    """Count the LM calls, tokens and dollars of everything run inside the block on this thread (and its tasks).

    Built on ``dspy.track_usage`` (one usage entry per call that reached the provider), not on callbacks, which
    would make DSPy dispatch callbacks for every module and adapter call.

    Example:
        >>> with measure_usage() as usage:
        ...     pass  # run a program here
        >>> usage.calls, usage.cost
        (0, 0.0)
    """
    usage = Usage()
    meter = _Meter()
    parent = _meter.get()
    token = _meter.set(meter)
    try:
        with dspy.track_usage() as tracker:
            yield usage
    finally:
        _meter.reset(token)
        if parent is not None:
            parent.absorb(meter)
        cost = meter.dollars
        for model, entries in tracker.usage_data.items():
            usage.calls += len(entries)
            prompt = sum(int(entry.get("prompt_tokens") or 0) for entry in entries)
            completion = sum(int(entry.get("completion_tokens") or 0) for entry in entries)
            usage.prompt_tokens += prompt
            usage.completion_tokens += completion
            if model in meter.models or cost is None:
                continue
            price = price_of(model)
            cost = None if price is None else cost + price[0] * prompt + price[1] * completion
        usage.cost = cost
