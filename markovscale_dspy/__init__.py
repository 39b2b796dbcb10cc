"""markovscale-dspy: principled, measurable inference-time refinement for DSPy programs.

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

* ``core/`` -- the maths, no DSPy: theory, belief filters (same/changed; answer identities and confidence), confidence
  emission, TransitionModel, question types, policies, statistics, the vote model and the planner;
* ``refine/`` -- the MarkovRefine module and its refinement loop, and the MarkovScale planner module;
* ``calibrate/`` -- the MarkovCalibrator teleprompter, its trace store and report;
* ``reporting/`` -- evaluation, method comparison, text/Markdown reports, plots;
* ``integrations/`` -- LMs (LiteLLM, Router), the embedded llama.cpp server, bundled datasets;
* ``testing`` (the simulated world) and ``cli`` (the ``markovscale`` command).
"""

import importlib as _importlib
import sys as _sys

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
from markovscale_dspy.calibrate.calibrator import MarkovCalibrator
from markovscale_dspy.calibrate.records import ChainRecord
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
from markovscale_dspy.refine.budget import BudgetResult
from markovscale_dspy.refine.markov_refine import MarkovRefine
from markovscale_dspy.refine.markov_scale import MarkovScale, ScaleAccount
from markovscale_dspy.refine.usage import Usage, measure

__all__ = [
    "BeliefPolicy",
    "BudgetResult",
    "CalibrationError",
    "CalibrationReport",
    "ChainRecord",
    "ClosedFormPolicy",
    "ConfigurationError",
    "DataError",
    "Decision",
    "FixedPolicy",
    "MarkovCalibrator",
    "MarkovRefine",
    "MarkovScale",
    "MarkovScaleError",
    "NotCalibratedError",
    "Plan",
    "Policy",
    "RoundContext",
    "RoundZeroError",
    "ScaleAccount",
    "StateError",
    "Strategy",
    "StrategyPrediction",
    "TransitionModel",
    "Usage",
    "VoteModel",
    "__version__",
    "available_policies",
    "belief",
    "default_answer_key",
    "measure",
    "normalize_answer",
    "register_policy",
    "theory",
]

# The 0.1.0 module paths keep working: ``markovscale_dspy.lms`` is ``markovscale_dspy.integrations.lms``, etc.
for _old, _new in {
    "theory": "core.theory",
    "belief": "core.belief",
    "lms": "integrations.lms",
    "local": "integrations.local",
    "datasets": "integrations.datasets",
    "evaluation": "reporting.evaluation",
    "report": "reporting.report",
    "plots": "reporting.plots",
}.items():
    globals()[_old] = _sys.modules[f"{__name__}.{_old}"] = _importlib.import_module(f"{__name__}.{_new}")
del _old, _new
