"""What a tracer sees of a refinement: one trace per call, a span per round, ``markovscale.*`` attributes.

DSPy users watch programs through MLflow (``mlflow.dspy.autolog()``) or OpenTelemetry (OpenInference's
``DSPyInstrumentor``). Both keep the active span in a context variable, which DSPy's thread pool does not carry
into its workers: :func:`carry_context` does, so samples and chains run in threads stay in their caller's trace.

Spans and attributes go to whichever tracer is running, through its own active-span API, and only inside a trace
the user started: this module never imports MLflow or OpenTelemetry (it looks for them in ``sys.modules``, where a
user who traces has put them), and outside a trace every function here does nothing.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeVar

import dspy
from dspy.dsp.utils.settings import thread_local_overrides
from dspy.utils.callback import BaseCallback

from markovscale_dspy.usage import detach_meter

__all__ = ["PREFIX", "annotate", "carry_context", "scrub_endpoints", "scrubbed_errors", "span"]

#: Every attribute this package sets on a span starts with this.
PREFIX = "markovscale."

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def carry_context(fn: Callable[[T], R]) -> Callable[[T], R]:
    """``fn`` for a DSPy ``ParallelExecutor``, run in the context of the thread that calls this (its active span).

    Each job runs in its own copy of that context, with the executor's per-thread DSPy settings (its own usage
    tracker) and no enclosing usage meter, as it would in a fresh thread.
    """
    context = contextvars.copy_context()
    caller = threading.get_ident()

    @functools.wraps(fn)
    def run(item: T) -> R:
        if threading.get_ident() == caller:  # the executor's one-thread path: already in the caller's context
            return fn(item)
        overrides = thread_local_overrides.get()  # what the executor set for this worker

        def inside() -> R:
            thread_local_overrides.set(overrides)
            detach_meter()
            return fn(item)

        return context.copy().run(inside)

    return run


# Endpoints in error text ------------------------------------------------------------------------------------------

#: A URL, or an IP address or ``localhost`` with or without a port: where an LM server is, not what went wrong.
_ENDPOINT = re.compile(
    r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>()]+|\b(?:localhost|\d{1,3}(?:\.\d{1,3}){3})(?::\d{1,5})?\b", re.IGNORECASE
)


def scrub_endpoints(text: str) -> str:
    """``text`` with URLs, IP addresses and ``localhost:port`` replaced by ``<endpoint>``.

    Example:
        >>> scrub_endpoints("cannot reach http://10.0.0.7:8000/v1 (retry in 3.5 s)")
        'cannot reach <endpoint> (retry in 3.5 s)'
    """
    return _ENDPOINT.sub("<endpoint>", text)


class _ScrubErrors(BaseCallback):
    """Replaces endpoints in an LM's exception as it leaves the LM, before a tracer records it on the LM's span or
    any span around it (MLflow's callback runs after this one; OpenTelemetry's wrappers sit outside the call)."""

    def on_lm_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        if exception is None:
            return
        exception.args = tuple(scrub_endpoints(a) if isinstance(a, str) else a for a in exception.args)
        message = getattr(exception, "message", None)
        if isinstance(message, str):
            try:
                exception.message = scrub_endpoints(message)
            except AttributeError:  # a read-only message: its args were scrubbed
                pass


_SCRUB = _ScrubErrors()


def scrubbed_errors() -> AbstractContextManager:
    """Inside a trace being recorded, LM calls in the block raise with endpoints replaced in their message (so no
    server address reaches the trace); elsewhere nothing changes."""
    if "mlflow" not in sys.modules and "opentelemetry.trace" not in sys.modules:
        return nullcontext()
    if _mlflow_span() is None and _otel_span() is None:  # nothing is recording here: no callback to dispatch
        return nullcontext()
    callbacks = dspy.settings.get("callbacks", []) or []
    if any(c is _SCRUB for c in callbacks):
        return nullcontext()
    return dspy.context(callbacks=[_SCRUB, *callbacks])


# The tracers ------------------------------------------------------------------------------------------------------


def _mlflow_span() -> Any:
    """MLflow's active span, if MLflow is tracing here."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or "mlflow.tracing" not in sys.modules:
        return None
    try:
        return mlflow.get_current_active_span()
    except Exception:  # tracing is the user's view, never a reason to fail their call
        return None


def _otel_span() -> Any:
    """The active OpenTelemetry span, if one is recording here."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    current = trace.get_current_span()
    return current if current.is_recording() else None


def _otel_tracer() -> Any:
    """A tracer of the global provider, if it is a real one (an SDK provider, not the no-op default)."""
    trace = sys.modules.get("opentelemetry.trace")
    provider = None if trace is None else trace.get_tracer_provider()
    if provider is None or not hasattr(provider, "add_span_processor"):
        return None
    return provider.get_tracer("markovscale_dspy")


def _value(value: Any) -> Any:
    """An attribute value both tracers accept: a bool, int, float or str (NaN and None are left out)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _prefixed(attributes: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in attributes.items():
        value = _value(value)
        if value is not None:
            out[PREFIX + key] = value
    return out


def annotate(attributes: Callable[[], Mapping[str, Any]]) -> None:
    """Set ``attributes()`` (``markovscale.``-prefixed) on the active span of MLflow and of OpenTelemetry, if any
    (a function, so nothing is computed when no tracer is loaded)."""
    if "mlflow" not in sys.modules and "opentelemetry.trace" not in sys.modules:
        return
    values = _prefixed(attributes())
    if not values:
        return
    for current in {id(s): s for s in (_mlflow_span(), _otel_span()) if s is not None}.values():
        try:
            current.set_attributes(values)
        except Exception as exc:  # a tracer refusing an attribute must not fail the call
            logger.debug("could not set span attributes: %s", exc)


def span(
    name: str, attributes: Callable[[], Mapping[str, Any]] | None = None, *, root: str | None = None
) -> AbstractContextManager:
    """A child span of the active one, named ``name``, with ``attributes()`` set when it closes.

    In MLflow when an MLflow span is active, else in OpenTelemetry when a recording span is active and the global
    provider is an SDK one; nothing outside a trace. With ``root`` it also opens a trace of its own where the user
    traces such work, so that its calls share one trace instead of one each: ``"call"`` for a call of ours that is
    not a module call (MLflow autolog's ``log_traces``, an OpenTelemetry-instrumented DSPy), ``"compile"`` for a
    calibration (``log_traces_from_compile=True``, an instrumented DSPy).
    """
    if "mlflow" not in sys.modules and "opentelemetry.trace" not in sys.modules:
        return nullcontext()  # no tracer loaded: nothing to look up, per round
    return _span(name, attributes, root)


@contextmanager
def _span(name: str, attributes: Callable[[], Mapping[str, Any]] | None, root: str | None) -> Iterator[None]:
    opened = _open(name, root)
    if opened is None:
        yield
        return
    manager, handle = opened
    try:
        yield
    except BaseException as exc:
        _close(handle, attributes)
        manager.__exit__(type(exc), exc, exc.__traceback__)
        raise
    else:
        # Not sys.exc_info(): inside a caller's ``except`` block it is the caller's handled exception.
        _close(handle, attributes)
        manager.__exit__(None, None, None)


def _close(handle: Any, attributes: Callable[[], Mapping[str, Any]] | None) -> None:
    if attributes is not None:
        try:
            handle.set_attributes(_prefixed(attributes()))
        except Exception as exc:  # a tracer refusing an attribute must not fail the call
            logger.debug("could not set span attributes: %s", exc)


def _open(name: str, root: str | None) -> tuple[Any, Any] | None:
    if _mlflow_span() is not None or (root is not None and _mlflow_traces(root)):
        import mlflow

        manager = mlflow.start_span(name=name)
        return manager, manager.__enter__()
    if _otel_span() is not None or (root is not None and _otel_instrumented()):
        tracer = _otel_tracer()
        if tracer is not None:
            manager = tracer.start_as_current_span(name)
            return manager, manager.__enter__()
    return None


def _mlflow_traces(what: str) -> bool:
    """Whether MLflow's DSPy autolog traces module calls (``what="call"``) or what runs inside an optimizer's
    compile (``"compile"``)."""
    if "mlflow.dspy" not in sys.modules:
        return False
    try:
        from mlflow.utils.autologging_utils import autologging_is_disabled, get_autologging_config

        setting = "log_traces_from_compile" if what == "compile" else "log_traces"
        return not autologging_is_disabled("dspy") and bool(get_autologging_config("dspy", setting, False))
    except Exception:
        return False


def _otel_instrumented() -> bool:
    """Whether an OpenTelemetry instrumentor wraps DSPy's module calls (OpenInference's wraps ``Module.__call__``)."""
    dspy = sys.modules.get("dspy")
    return dspy is not None and hasattr(dspy.Module.__call__, "__wrapped__")
