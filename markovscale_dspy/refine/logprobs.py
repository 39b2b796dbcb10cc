"""A round's answer confidence, read from the LM's token log-probabilities.

Module layer. When an LM is asked for log-probabilities (``dspy.LM(..., logprobs=True)``, or
``MarkovRefine(confidence=True)``, which asks for them), DSPy 3.4 puts the completion's tokens on the prediction as
``prediction.logprobs`` (``{"content": [{"token", "logprob", "top_logprobs"}, ...]}``; LiteLLM's objects with the
same attributes are read too). Custom engines feed the same path through ``Response(logprobs=...)``.

**Definition.** The confidence of an answer is the probability the LM gave to the *answer value's own tokens*, given
everything it wrote before them: ``exp(sum of their log-probabilities)``. For a multiple-choice answer that is one
token, it is the probability of the option letter; for several answer fields it is the product over fields. The
tokens are located in the completion text by the adapter's format:

* ChatAdapter: the text after ``[[ ## answer ## ]]`` up to the next field marker, without surrounding whitespace;
* JSONAdapter (and structured outputs): the value of the ``"answer"`` key, inside its quotes for a string (a token
  that straddles the quote, e.g. ``"B``, counts: its probability is the letter's);
* XMLAdapter: the text inside ``<answer>...</answer>``.

Format tokens (field markers, keys, braces, quotes) never count: under a JSON schema or grammar they have
probability 1 and would say nothing. **With ChainOfThought** the reasoning is written first, so the confidence is
the probability of the answer *given that reasoning*: reasoning tokens are not counted, and a model that reasons its
way to an answer usually commits to it, which makes the answer tokens confident even when the reasoning is wrong.
Such confidence tends to carry less information than a direct answer's; the calibrator measures how much (and drops
it when it carries none).

A round whose prediction has no ``logprobs``, or whose answer tokens cannot be found, has no confidence (``None``):
the belief then uses what it would have used without confidence.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["LOGPROBS_FIELD", "ConfidenceFn", "answer_confidence", "answer_spans", "token_logprobs"]

#: Where DSPy puts the completion's token log-probabilities on a prediction.
LOGPROBS_FIELD = "logprobs"

#: A user-supplied definition: ``fn(prediction) -> float in [0, 1] or None``.
ConfidenceFn = Callable[[Any], "float | None"]


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def token_logprobs(logprobs: Any) -> list[tuple[str, float]]:
    """``[(token text, log-probability), ...]`` from DSPy / OpenAI / LiteLLM shapes (empty if malformed)."""
    if logprobs is None:
        return []
    content = (
        logprobs if isinstance(logprobs, Sequence) and not isinstance(logprobs, str) else _get(logprobs, "content")
    )
    if not content:
        return []
    tokens = []
    for item in content:
        token, logprob = _get(item, "token"), _get(item, "logprob")
        if token is None or logprob is None:
            return []
        try:
            tokens.append((str(token), float(logprob)))
        except (TypeError, ValueError):
            return []
    return tokens


def _stripped(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def _chat_span(text: str, name: str) -> tuple[int, int] | None:
    headers = list(re.finditer(rf"\[\[ ## {re.escape(name)} ## \]\]", text))
    if not headers:
        return None
    start = headers[-1].end()
    following = re.compile(r"\[\[ ## \w+ ## \]\]").search(text, start)
    return _stripped(text, start, following.start() if following else len(text))


def _json_span(text: str, name: str) -> tuple[int, int] | None:
    keys = list(re.finditer(rf"{re.escape(json.dumps(name))}\s*:\s*", text))
    if not keys:
        return None
    start = keys[-1].end()
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return None
    if text[start] == '"':
        return (start + 1, end - 1) if end - 1 > start + 1 else None
    return start, end


def _xml_span(text: str, name: str) -> tuple[int, int] | None:
    found = list(re.finditer(rf"<{re.escape(name)}>(.*?)</{re.escape(name)}>", text, re.S))
    return _stripped(text, found[-1].start(1), found[-1].end(1)) if found else None


def answer_spans(text: str, fields: Sequence[str]) -> list[tuple[int, int]] | None:
    """Character spans of every answer field's value in a completion (``None`` if a field is not found)."""
    spans = []
    for name in fields:
        if f"[[ ## {name} ## ]]" in text:
            span = _chat_span(text, name)
        elif f"<{name}>" in text:
            span = _xml_span(text, name)
        else:
            span = _json_span(text, name)
        if span is None:
            return None
        spans.append(span)
    return spans


def answer_confidence(prediction: Any, fields: Sequence[str]) -> float | None:
    """The probability of the answer fields' tokens in ``prediction.logprobs`` (see the module docstring).

    Example:
        >>> tokens = [{"token": t, "logprob": lp} for t, lp in [('{"answer": "', 0.0), ("B", -0.5), ('"}', 0.0)]]
        >>> round(answer_confidence({"answer": "B", "logprobs": {"content": tokens}}, ["answer"]), 4)
        0.6065
    """
    logprobs = _get(prediction, LOGPROBS_FIELD)
    tokens = token_logprobs(logprobs)
    if not tokens:
        return None
    text = "".join(token for token, _ in tokens)
    spans = answer_spans(text, fields)
    if spans is None:
        return None
    total, offset, counted = 0.0, 0, 0
    for token, logprob in tokens:
        start, end = offset, offset + len(token)
        offset = end
        if end > start and any(start < hi and end > lo for lo, hi in spans):
            total += logprob
            counted += 1
    if counted == 0 or not math.isfinite(total):
        return None
    return min(1.0, max(0.0, math.exp(total)))
