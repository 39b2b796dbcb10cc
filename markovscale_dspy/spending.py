"""A hard dollar cap, checked before every LM call.

Before a call reaches the LM, its worst-case price must fit in what is left of the cap: every byte of the prompt
counted as a token (a byte-level or SentencePiece tokenizer never makes more tokens than bytes), plus the chat
template's special tokens, plus ``max_tokens`` of completion, at the model's price (:func:`markovscale_dspy.usage
.price_of`: registered prices, then LiteLLM's cost map). A call that does not fit is not made: DSPy's LM raises
:class:`SpendingStopped` before it sends anything. A call whose price is unknown or whose completion is unbounded
(no ``max_tokens``) is refused too, with the fix: a cap that cannot be checked is no cap.

The check is a DSPy callback (``on_lm_start``), so it sees every call of every LM a program uses, pinned or not;
a run sets its cap with :func:`dollar_cap`, and each unit of work (a round, a sample) runs in :func:`metered`.
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

__all__ = ["DollarCap", "SpendingStopped", "current_cap", "dollar_cap", "metered", "worst_case_price"]

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
    prompt_tokens = sum(len(t.encode("utf-8")) for t in texts)
    prompt_tokens += TEMPLATE_TOKENS_PER_MESSAGE * (len(messages or []) + 1)
    return price[0] * prompt_tokens + price[1] * int(max_tokens)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multi-part content: its text parts (images are priced by the provider)
        return " ".join(str(part.get("text", part)) if isinstance(part, dict) else str(part) for part in content)
    return "" if content is None else str(content)


class Held:
    """Worst cases reserved by the calls of one :func:`metered` block, settled when it ends."""

    def __init__(self, cap: DollarCap):
        self.cap = cap
        self.dollars = 0.0


_cap: ContextVar[DollarCap | None] = ContextVar("markovscale_dollar_cap", default=None)
_held: ContextVar[Held | None] = ContextVar("markovscale_dollar_held", default=None)


class _CapCheck(BaseCallback):
    """Refuses, before it is made, an LM call whose worst case does not fit in the run's cap."""

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        held = _held.get()
        if held is None:
            return
        price = worst_case_price(instance, inputs.get("messages"), inputs.get("prompt"), inputs.get("kwargs") or {})
        if not held.cap.reserve(price):
            raise SpendingStopped(
                f"max_dollars={held.cap.max_dollars:g} reached: this call could cost up to ${price:.6f} and "
                f"${max(held.cap.left, 0.0):.6f} is left, so it was not made",
                "cap",
            )
        held.dollars += price


_CHECK = _CapCheck()


@contextmanager
def dollar_cap(cap: DollarCap | None) -> Iterator[DollarCap | None]:
    """Make ``cap`` the cap of every :func:`metered` block run inside (this thread, the tasks it starts, and worker
    threads started with :func:`markovscale_dspy.tracing.carry_context`)."""
    token = _cap.set(cap)
    try:
        yield cap
    finally:
        _cap.reset(token)


def current_cap() -> DollarCap | None:
    """The cap of the enclosing :func:`dollar_cap` block, if any."""
    return _cap.get()


@contextmanager
def metered() -> Iterator[Usage]:
    """:func:`markovscale_dspy.usage.measure_usage`, with every LM call inside checked against the run's cap first
    (:class:`SpendingStopped` if it does not fit) and settled at what the block measured when it ends."""
    cap = _cap.get()
    if cap is None:
        with measure_usage() as usage:
            yield usage
        return
    held = Held(cap)
    token = _held.set(held)
    callbacks = dspy.settings.get("callbacks", []) or []
    usage = Usage()
    try:
        # The check runs first, so a refused call never leaves another callback's span half open.
        with measure_usage() as usage, dspy.context(callbacks=[_CHECK, *[c for c in callbacks if c is not _CHECK]]):
            yield usage
    finally:
        _held.reset(token)
        cap.settle(held.dollars, usage.cost if usage.calls else 0.0)
