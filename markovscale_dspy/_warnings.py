"""Warnings that point at the user's line, not into DSPy or this package.

A warning raised inside ``MarkovRefine.forward`` is several frames below the user's call, and DSPy's callback
wrapper sits in between, so a fixed ``stacklevel`` lands in ``dspy/utils/callback.py``. :func:`warn` counts the
frames that belong to this package or to DSPy and attributes the warning to the first frame outside them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from functools import cache

__all__ = ["warn"]


@cache
def _internal_prefixes() -> tuple[str, ...]:
    prefixes = [os.path.dirname(os.path.abspath(__file__)) + os.sep]
    spec = importlib.util.find_spec("dspy")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        prefixes.append(os.path.abspath(location) + os.sep)
    return tuple(prefixes)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first caller outside markovscale_dspy and DSPy.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn("calibrate first")
        >>> caught[0].filename == __file__ or caught[0].filename.startswith("<doctest")
        True
    """
    prefixes = _internal_prefixes()
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(prefixes):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
