"""The package's errors: raised by real misuse and failures, each catchable as MarkovScaleError and as the builtin a
caller would naturally catch (ValueError for bad input, RuntimeError for a run that failed)."""

import dspy
import pytest
from helpers import IMPROVING, model_from_rates, refine, world

from markovscale_dspy import (
    CalibrationError,
    ConfigurationError,
    DataError,
    MarkovCalibrator,
    MarkovScaleError,
    NotCalibratedError,
    RoundZeroError,
    StateError,
    TransitionModel,
)


def _forward_on_a_failing_server():
    w = world(3)
    with dspy.context(lm=w.lm(faults={"server": 1.0})):
        refine(policy="fixed")(**w.examples[0].inputs())


def _calibrate_with_a_metric_that_raises():
    def broken(example, pred, trace=None):
        raise KeyError("gold")

    w = world(5)
    with dspy.context(lm=w.lm()):
        MarkovCalibrator(broken, rounds=1, num_threads=1).compile(refine(), trainset=w.examples)


def _belief_policy_without_answer_change_rates():
    module = refine(
        model=model_from_rates(**IMPROVING), policy="belief", min_prob_improves=0.0
    )  # fitted without answers: no emission rates
    w = world(3)
    with dspy.context(lm=w.lm()):
        module(**w.examples[0].inputs())


def test_every_error_shares_one_base_class(tmp_path):
    # Each error is provoked through the public API, not looked up in the class hierarchy: the test fails if a
    # misuse raises the wrong kind of error, a bare builtin, or nothing at all.
    cases = [
        (ConfigurationError, ValueError, lambda: refine(max_rounds=-1)),
        (DataError, ValueError, lambda: TransitionModel.fit([])),
        (StateError, ValueError, lambda: refine().load(tmp_path / "missing.json")),
        (NotCalibratedError, ValueError, _belief_policy_without_answer_change_rates),
        (RoundZeroError, RuntimeError, _forward_on_a_failing_server),
        (CalibrationError, RuntimeError, _calibrate_with_a_metric_that_raises),
    ]
    for expected, builtin, provoke in cases:
        with pytest.raises(MarkovScaleError) as info:
            provoke()
        assert type(info.value) is expected, (expected.__name__, repr(info.value))
        with pytest.raises(builtin):
            provoke()
