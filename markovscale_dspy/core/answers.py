"""Answer identity: when do two rounds give "the same answer"?

Pure functions, no DSPy. The default key normalises every answer field (case, whitespace, trailing punctuation,
numbers to a canonical form) so that ``"42"``, ``" 42.0 "`` and ``"42."`` are one answer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

__all__ = ["AnswerKey", "default_answer_key", "is_empty_answer", "normalize_answer"]

#: Maps the answer fields of one round to a hashable identity.
AnswerKey = Callable[[Mapping[str, Any]], Hashable]

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d*)?$")
_SPACES = re.compile(r"\s+")


def _canonical_number(x: float) -> str:
    if math.isinf(x) or math.isnan(x):
        return str(x)
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(float(f"{x:.12g}"))


def normalize_answer(value: Any) -> Hashable:
    """Canonical form of one answer value.

    Strings are stripped, lower-cased, their inner whitespace collapsed and trailing ``.`` removed; a string that
    is a number (``"1,000"``, ``"$3.50"``, ``"42.0"``) becomes its canonical number. Numbers are canonicalised the
    same way, sequences element-wise, anything else is kept (``repr`` if it is not hashable).

    Example:
        >>> normalize_answer(" 42.0 "), normalize_answer("1,000"), normalize_answer("Paris.")
        ('42', '1000', 'paris')
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return _canonical_number(float(value))
    if isinstance(value, str):
        text = _SPACES.sub(" ", value.strip().lower()).rstrip(".").strip()
        number = text.lstrip("$").rstrip("%").strip()
        if _THOUSANDS.match(number):
            number = number.replace(",", "")
        if _NUMBER.match(number):
            return _canonical_number(float(number))
        return text
    if isinstance(value, Sequence):
        return tuple(normalize_answer(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def default_answer_key(outputs: Mapping[str, Any]) -> Hashable:
    """Identity of a round's answer: the normalised values of its answer fields, in field order."""
    return tuple(normalize_answer(v) for v in outputs.values())


def is_empty_answer(outputs: Mapping[str, Any]) -> bool:
    """Whether a round produced no answer at all (every answer field missing, ``None`` or blank)."""
    return all(v is None or (isinstance(v, str) and not v.strip()) for v in outputs.values())
