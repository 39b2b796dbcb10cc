"""A hard dollar cap, checked before every LM call.

Before a call reaches the LM, its worst-case price must fit in what is left of the cap: every byte of the prompt
counted as a token (a byte-level or SentencePiece tokenizer never makes more tokens than bytes), plus the chat
template's special tokens, plus ``max_tokens`` of completion, at the model's price (:func:`markovscale_dspy.usage
.price_of`: registered prices, then LiteLLM's cost map). A call that does not fit is not made: DSPy's LM raises
:class:`SpendingStopped` before it sends anything. A call whose price is unknown or whose completion is unbounded
(no ``max_tokens``) is refused too, with the fix: a cap that cannot be checked is no cap.

The check is a DSPy callback (``on_lm_start``), so it sees every call of every LM a program uses, pinned or not,
in the program's own worker threads too; a run sets its cap with :func:`dollar_cap`, and each unit of work (a
round, a sample) runs in :func:`metered`, which settles its calls at what they measured. A call that reserved but
was never measured (cancelled or failed after it was sent, or made in a thread whose usage DSPy does not report
back) stays charged at its worst case: a provider may bill it. The prompt bound counts text, tool definitions and
response schemas; images are not counted (their price depends on the provider's resizing), so a cap over calls
with images is only as hard as the images' share is small.
:class:`SpendingStopped` derives from ``BaseException`` because DSPy runs callbacks inside ``except Exception``:
an ordinary exception would be logged and the call made anyway. Code of this package that runs programs catches
it and records the refused call; what finished is kept.

Example:
    >>> cap = DollarCap(0.05)
    >>> cap.reserve(0.03), cap.reserve(0.03)
    (True, False)
    >>> cap.settle(0.03, 0.01); round(cap.left, 4)
    0.04
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback

from markovscale_dspy._exceptions import ConfigurationError
from markovscale_dspy.core.validation import check_number
from markovscale_dspy.usage import Usage, measure_usage, price_of

__all__ = ["DollarCap", "SpendingStopped", "cap_reached", "dollar_cap", "metered", "worst_case_price"]

#: Special tokens a chat template may add per message, and once per prompt: counted on top of the bytes.
TEMPLATE_TOKENS_PER_MESSAGE = 16


class SpendingStopped(BaseException):
    """An LM call was not made: its worst case did not fit in the dollar cap, or could not be priced.

    Attributes:
        reason: ``"cap"`` (it did not fit), ``"unpriced"`` (no known price) or ``"unbounded"`` (no ``max_tokens``).
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class DollarCap:
    """Dollars a run may spend: settled (measured) spending plus the worst case of the calls in flight.

    Thread-safe; shared by all the workers of one run.

    Args:
        max_dollars: The cap (a finite number >= 0).
    """

    def __init__(self, max_dollars: float):
        self.max_dollars = check_number("max_dollars", max_dollars, 0, unit="dollars")
        self._lock = threading.Lock()
        self.spent = 0.0
        self.reserved = 0.0
        self.refused = 0

    @property
    def left(self) -> float:
        """Dollars not yet spent or reserved."""
        with self._lock:
            return self.max_dollars - self.spent - self.reserved

    def reserve(self, dollars: float) -> bool:
        """Hold ``dollars`` for a call about to be made; ``False`` (and nothing held) if they do not fit."""
        with self._lock:
            if self.spent + self.reserved + dollars > self.max_dollars:
                self.refused += 1
                return False
            self.reserved += dollars
            return True

    def settle(self, reserved: float, spent: float | None) -> None:
        """Replace held worst cases by what the calls measured (``None``: unknown, so the worst case stays spent)."""
        with self._lock:
            self.reserved -= reserved
            self.spent += reserved if spent is None else spent

    @property
    def exhausted(self) -> bool:
        """Whether a call was refused (the run should start no new work)."""
        with self._lock:
            return self.refused > 0

    @classmethod
    def for_lms(cls, max_dollars: float | None, lms: Iterable[Any]) -> DollarCap | None:
        """A cap of ``max_dollars`` (``None``: no cap) after checking that every LM in ``lms`` has a price and
        bounded completions, so the cap can be enforced.

        Raises:
            ConfigurationError: a bad ``max_dollars``, an LM without a known price or without ``max_tokens``.
        """
        if max_dollars is None:
            return None
        cap = cls(max_dollars)
        for lm in {id(lm): lm for lm in lms if lm is not None}.values():
            try:
                worst_case_price(lm, [], "", {})
            except SpendingStopped as exc:
                raise ConfigurationError(str(exc)) from None
        return cap

    @classmethod
    def for_module(cls, max_dollars: float | None, module: dspy.Module, *extra_lms: Any) -> DollarCap | None:
        """:meth:`for_lms` over every LM ``module`` can call: the configured one, each predictor's pinned one, and
        ``extra_lms`` (e.g. a refiner LM passed at call time)."""
        if max_dollars is None:
            return None
        pinned = [predictor.lm for _, predictor in module.named_predictors()]
        return cls.for_lms(max_dollars, [dspy.settings.lm, *extra_lms, *pinned])

    def to_dict(self) -> dict[str, float | int]:
        with self._lock:
            return {
                "max_dollars": self.max_dollars,
                "spent": self.spent,
                "left": self.max_dollars - self.spent - self.reserved,
                "refused_calls": self.refused,
            }


def worst_case_price(lm: Any, messages: list[dict[str, Any]] | None, prompt: str | None, kwargs: dict) -> float:
    """The most one call of ``lm`` with this prompt can cost.

    Raises:
        SpendingStopped: the model has no known price, or the completion is unbounded (no ``max_tokens``).
    """
    model = str(getattr(lm, "model", type(lm).__name__))
    price = price_of(model)
    if price is None:
        raise SpendingStopped(
            f"max_dollars cannot be checked for model {model!r}: its price is unknown (not in LiteLLM's cost map); "
            f"register it with markovscale_dspy.register_price({model!r}, dollars_per_prompt_token, "
            "dollars_per_completion_token)",
            "unpriced",
        )
    settings = {**(getattr(lm, "kwargs", None) or {}), **kwargs}
    max_tokens = settings.get("max_tokens") or settings.get("max_completion_tokens")
    if not max_tokens:
        raise SpendingStopped(
            f"max_dollars cannot be checked for model {model!r}: its completions are unbounded; set max_tokens on "
            "the LM (dspy.LM(..., max_tokens=512), or --max-tokens)",
            "unbounded",
        )
    texts = [prompt or ""] + [_text(m.get("content")) for m in messages or []]
    # Tool definitions and a response schema are sent, and billed, as prompt tokens.
    texts += [json.dumps(settings[key], default=str) for key in ("tools", "response_format") if settings.get(key)]
    prompt_tokens = sum(len(t.encode("utf-8")) for t in texts)
    prompt_tokens += TEMPLATE_TOKENS_PER_MESSAGE * (len(messages or []) + 1)
    completions = int(settings.get("n") or 1)
    return price[0] * prompt_tokens + price[1] * int(max_tokens) * completions


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multi-part content: its text parts (an image is not text: see the module doc)
        return " ".join(
            (part.get("text") or "") if isinstance(part, dict) else str(part)
            for part in content
            if not isinstance(part, dict) or part.get("type", "text") == "text"
        )
    return "" if content is None else str(content)


class Held:
    """The calls one :func:`metered` block made under its caps: how many, and the worst cases they reserved.

    Shared by every thread the block's calls run in (DSPy carries the callback that holds it into its workers).
    """

    def __init__(self, caps: tuple[DollarCap, ...]):
        self.caps = caps
        self.lock = threading.Lock()
        self.calls = 0
        self.dollars = 0.0
        self.largest = 0.0

    def reserve(self, price: float) -> DollarCap | None:
        """Hold ``price`` in every cap; the cap it did not fit in (nothing held then), or ``None``."""
        for i, cap in enumerate(self.caps):
            if not cap.reserve(price):
                for earlier in self.caps[:i]:
                    earlier.settle(price, 0.0)
                return cap
        with self.lock:
            self.calls += 1
            self.dollars += price
            self.largest = max(self.largest, price)
        return None

    def settle(self, usage: Usage) -> None:
        """Replace the held worst cases by what the block measured. A call that reserved but was never measured (it
        ran in a thread of the program's own, or was cancelled or failed after it was sent: a provider may bill it)
        is charged at the largest worst case held."""
        with self.lock:
            unmeasured = max(self.calls - usage.calls, 0)
            reserved, largest = self.dollars, self.largest
        measured = None if usage.cost is None else (usage.cost if usage.calls else 0.0)
        spent = None if measured is None else measured + unmeasured * largest
        for cap in self.caps:
            cap.settle(reserved, spent)


_caps: ContextVar[tuple[DollarCap, ...]] = ContextVar("markovscale_dollar_caps", default=())


class _CapCheck(BaseCallback):
    """Refuses, before it is made, an LM call whose worst case does not fit in the caps of one :func:`metered`
    block. One instance per block, holding its :class:`Held`: DSPy carries callbacks into the worker threads a
    program starts (``dspy.Parallel``, its executor), where a context variable would not reach."""

    def __init__(self, held: Held):
        self.held = held

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        price = worst_case_price(instance, inputs.get("messages"), inputs.get("prompt"), inputs.get("kwargs") or {})
        full = self.held.reserve(price)
        if full is not None:
            raise SpendingStopped(
                f"max_dollars={full.max_dollars:g} reached: this call could cost up to ${price:.6f} and "
                f"${max(full.left, 0.0):.6f} is left, so it was not made",
                "cap",
            )


@contextmanager
def dollar_cap(cap: DollarCap | None) -> Iterator[DollarCap | None]:
    """Add ``cap`` to the caps of every :func:`metered` block run inside (this thread, the tasks it starts, and
    worker threads started with :func:`markovscale_dspy.tracing.carry_context`); an enclosing cap still applies.
    ``None`` adds nothing."""
    if cap is None:
        yield None
        return
    token = _caps.set((*_caps.get(), cap))
    try:
        yield cap
    finally:
        _caps.reset(token)


def cap_reached() -> bool:
    """Whether any enclosing cap has refused a call (work should not start)."""
    return any(cap.exhausted for cap in _caps.get())


@contextmanager
def metered() -> Iterator[Usage]:
    """:func:`markovscale_dspy.usage.measure_usage`, with every LM call inside checked against the enclosing caps first
    (:class:`SpendingStopped` if it does not fit) and settled at what the block measured when it ends."""
    caps = _caps.get()
    if not caps:
        with measure_usage() as usage:
            yield usage
        return
    held = Held(caps)
    callbacks = dspy.settings.get("callbacks", []) or []
    usage = Usage()
    try:
        # The check runs first, so a refused call never leaves another callback's span half open; an enclosing
        # block's check is left out (its caps are this block's too, and this block settles them).
        others = [c for c in callbacks if not isinstance(c, _CapCheck)]
        with measure_usage() as usage, dspy.context(callbacks=[_CapCheck(held), *others]):
            yield usage
    finally:
        held.settle(usage)
