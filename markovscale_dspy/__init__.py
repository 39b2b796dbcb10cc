"""markovscale-dspy: principled, measurable inference-time refinement for DSPy programs.

Refinement is modelled as a two-state Markov chain over answer correctness (MarkovScale, arXiv 2602.01120):
``MarkovCalibrator`` learns ``p0``, ``p_cw`` and ``p_wc`` on a labelled trainset, and ``MarkovRefine`` refines only
while refinement is expected to pay.

Example:
    >>> import dspy
    >>> from markovscale_dspy import MarkovCalibrator, MarkovRefine
    >>> refine = MarkovRefine(dspy.ChainOfThought("question -> answer"), max_rounds=4)
    >>> calibrator = MarkovCalibrator(metric=lambda example, pred, trace=None: example.answer == pred.answer)
    >>> # calibrated = calibrator.compile(refine, trainset=trainset); calibrated(question="...")
"""

from markovscale_dspy import belief, theory
from markovscale_dspy._answers import default_answer_key, normalize_answer
from markovscale_dspy._budget import BudgetResult
from markovscale_dspy._calibrate import CalibrationReport, ChainRecord, MarkovCalibrator
from markovscale_dspy._exceptions import (
    CalibrationError,
    ConfigurationError,
    DataError,
    MarkovScaleError,
    NotCalibratedError,
    RoundZeroError,
    StateError,
)
from markovscale_dspy._model import TransitionModel
from markovscale_dspy._policies import (
    BeliefPolicy,
    ClosedFormPolicy,
    Decision,
    FixedPolicy,
    Policy,
    RoundContext,
    available_policies,
    register_policy,
)
from markovscale_dspy._refine import MarkovRefine
from markovscale_dspy._usage import Usage, measure
from markovscale_dspy._version import __version__

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
    "MarkovScaleError",
    "NotCalibratedError",
    "Policy",
    "RoundContext",
    "RoundZeroError",
    "StateError",
    "TransitionModel",
    "Usage",
    "__version__",
    "available_policies",
    "belief",
    "default_answer_key",
    "measure",
    "normalize_answer",
    "register_policy",
    "theory",
]
