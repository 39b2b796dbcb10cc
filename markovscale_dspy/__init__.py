"""markovscale-dspy: principled, measurable inference-time compute for DSPy programs.

Refinement is modelled as a two-state Markov chain over answer correctness (MarkovScale, arXiv 2602.01120):
``MarkovCalibrator`` learns ``p0``, ``p_cw`` and ``p_wc`` on a labelled trainset, and ``MarkovRefine`` refines only
while refinement is expected to pay. ``MarkovScale`` plans a whole call budget from the same calibration (with
``parallel_samples``): a single call, refinement, a vote over samples, or votes over refined chains.

Example:
    >>> import dspy
    >>> from markovscale_dspy import MarkovCalibrator, MarkovRefine
    >>> refine = MarkovRefine(dspy.ChainOfThought("question -> answer"), max_rounds=4)
    >>> calibrator = MarkovCalibrator(metric=lambda example, pred, trace=None: example.answer == pred.answer)
    >>> # calibrated = calibrator.compile(refine, trainset=trainset); calibrated(question="...")

Layout (a path tells its layer; nothing imports from a layer above it):

* ``core/`` -- the maths, no DSPy: theory, belief filters, confidence emission, TransitionModel, question types,
  policies, statistics, the vote model and the planner;
* ``usage`` -- the meter (LM calls, tokens, dollars), the ground floor of everything that calls an LM;
* ``refine/`` -- the refinement loop, fresh samples, the MarkovRefine and MarkovScale modules;
* ``integrations/`` and ``testing`` -- beside ``refine/``: LMs (LiteLLM, Router), the embedded llama.cpp server,
  bundled datasets, the simulated world;
* ``calibrate/`` -- the MarkovCalibrator teleprompter, its trace store and report;
* ``evaluate/`` -- running programs to compare them (methods, strategies, configurations);
* ``reporting/`` -- rendering only: text, Markdown pages, plots;
* ``cli`` -- the ``markovscale`` command.

``import markovscale_dspy`` loads the modules a program needs, not the reporting or the local-server code: those
load when first used (``markovscale_dspy.LocalModel``, ``markovscale_dspy.load_task``).
"""

from typing import Any as _Any

from markovscale_dspy._exceptions import (
    CalibrationError,
    ConfigurationError,
    DataError,
    MarkovScaleError,
    NotCalibratedError,
    RoundZeroError,
    StateError,
)
from markovscale_dspy._version import __version__
from markovscale_dspy.calibrate.calibrator import REPORT_SINKS as _REPORT_SINKS
from markovscale_dspy.calibrate.calibrator import Calibratable, MarkovCalibrator, fit_chains
from markovscale_dspy.calibrate.records import ChainRecord
from markovscale_dspy.calibrate.refiner_optimizer import VERIFY_FIRST, RefinerOptimizer
from markovscale_dspy.calibrate.refiner_report import RefinerReport
from markovscale_dspy.calibrate.report import CalibrationReport
from markovscale_dspy.core import belief, theory
from markovscale_dspy.core.answers import default_answer_key, normalize_answer
from markovscale_dspy.core.model import TransitionModel
from markovscale_dspy.core.planner import Plan, Strategy, StrategyPrediction
from markovscale_dspy.core.policies import (
    BeliefPolicy,
    ClosedFormPolicy,
    Decision,
    FixedPolicy,
    Policy,
    RoundContext,
    available_policies,
    register_policy,
)
from markovscale_dspy.core.voting import VoteModel
from markovscale_dspy.integrations.lms import build_lm
from markovscale_dspy.refine.budget import BudgetResult
from markovscale_dspy.refine.loop import RefineAccount, RefinedPrediction
from markovscale_dspy.refine.markov_refine import MarkovRefine
from markovscale_dspy.refine.markov_scale import MarkovScale, ScaleAccount, ScaledPrediction
from markovscale_dspy.usage import Usage, measure_usage, register_price

__all__ = [
    "VERIFY_FIRST",
    "BeliefPolicy",
    "BudgetResult",
    "Calibratable",
    "CalibrationError",
    "CalibrationReport",
    "ChainRecord",
    "ClosedFormPolicy",
    "ConfigurationError",
    "DataError",
    "Decision",
    "FixedPolicy",
    "LocalModel",
    "MarkovCalibrator",
    "MarkovRefine",
    "MarkovScale",
    "MarkovScaleError",
    "NotCalibratedError",
    "Plan",
    "Policy",
    "RefineAccount",
    "RefinedPrediction",
    "RefinerOptimizer",
    "RefinerReport",
    "RoundContext",
    "RoundZeroError",
    "ScaleAccount",
    "ScaledPrediction",
    "StateError",
    "Strategy",
    "StrategyPrediction",
    "TransitionModel",
    "Usage",
    "VoteModel",
    "__version__",
    "available_policies",
    "belief",
    "build_lm",
    "default_answer_key",
    "fit_chains",
    "load_task",
    "measure_usage",
    "normalize_answer",
    "register_policy",
    "register_price",
    "theory",
]

#: Public names whose modules load on first use (the llama.cpp server, the bundled datasets).
_LAZY = {
    "LocalModel": "markovscale_dspy.integrations.local",
    "load_task": "markovscale_dspy.integrations.datasets",
}


def _publish(obj: _Any) -> _Any:
    """Name exceptions and functions by their public path, so tracebacks and docs say ``markovscale_dspy.X`` (as
    httpx does).

    Other classes keep their defining module: doctest finds a class's method examples only in the module the class
    says it comes from (so they would silently stop running), ``typing.get_type_hints`` resolves annotations there,
    and ``dspy.Refine`` reads a DSPy module's source through it.
    """
    is_exception = isinstance(obj, type) and issubclass(obj, BaseException)
    if is_exception or (callable(obj) and not isinstance(obj, type)):
        try:
            obj.__module__ = __name__
        except (AttributeError, TypeError):  # builtins and some extension types cannot be renamed
            pass
    return obj


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        import importlib

        value = _publish(getattr(importlib.import_module(_LAZY[name]), name))
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


for _name in __all__:
    if _name not in _LAZY and not _name.startswith("__"):
        _publish(globals()[_name])
del _name


def _log_calibration_to_mlflow(calibrator: MarkovCalibrator, report: CalibrationReport) -> None:
    """Log each calibration to the active MLflow run, when the user runs MLflow (the logger loads only then)."""
    import sys

    if "mlflow" in sys.modules:
        from markovscale_dspy.reporting.mlflow import log_calibration

        log_calibration(calibrator, report)


_REPORT_SINKS.append(_log_calibration_to_mlflow)
