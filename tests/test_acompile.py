"""The async calibration path: the same chains, fit, store and stops as the threaded one, through async clients."""

import dspy
import pytest

from markovscale_dspy import (
    CalibrationError,
    ConfigurationError,
    MarkovCalibrator,
    MarkovRefine,
    MarkovScale,
    register_price,
)
from markovscale_dspy.testing import SimulatedWorld

COUNTS = ("n0_correct", "n0_total", "n_cc", "n_cw", "n_wc", "n_ww")


def counts(model):
    return {name: getattr(model, name) for name in COUNTS}


def student():
    return MarkovRefine(dspy.Predict("question -> answer"), max_rounds=3)


def twin_worlds(**params):
    """Two identical worlds: the simulated LM answers a prompt by how often it has seen it, so each run needs its
    own world to see the same answers."""
    return [SimulatedWorld.homogeneous(**params) for _ in range(2)]


async def test_async_calibration_fits_what_the_threads_fit_and_resumes_from_the_same_store(tmp_path):
    first, w = twin_worlds(n=80, seed=11, p0=0.4, p_cw=0.1, p_wc=0.3)
    with dspy.context(lm=first.lm()):
        threaded = MarkovCalibrator(first.metric, num_threads=4, trace_dir=tmp_path / "a").compile(
            student(), trainset=first.examples
        )
    with dspy.context(lm=w.lm()):
        calibrator = MarkovCalibrator(w.metric, trace_dir=tmp_path / "b")
        awaited = await calibrator.acompile(student(), trainset=w.examples, concurrency=16)
        assert counts(awaited.model) == counts(threaded.model)
        assert calibrator.report.usage["calls"] == 80 * 4 and calibrator.report.chains_reused == 0
        calls = w.calls
        again = MarkovCalibrator(w.metric, trace_dir=tmp_path / "b")
        await again.acompile(student(), trainset=w.examples, concurrency=16)
    assert again.report.chains_reused == 80 and w.calls == calls  # every chain came from the store


@pytest.mark.slow  # thread and asyncio equality, with samples
async def test_async_calibration_of_a_vote_fits_the_same_vote_model():
    first, w = twin_worlds(n=60, seed=12, p0=0.5, p_cw=0.2, p_wc=0.1)
    scale = MarkovScale(dspy.Predict("question -> answer"), max_calls=4)
    with dspy.context(lm=first.lm()):
        threaded = MarkovCalibrator(first.metric, num_threads=3, parallel_samples=3, resume=False).compile(
            scale, trainset=first.examples
        )
    with dspy.context(lm=w.lm()):
        awaited = await MarkovCalibrator(w.metric, parallel_samples=3, resume=False).acompile(
            scale, trainset=w.examples, concurrency=32
        )
    assert counts(awaited.model) == counts(threaded.model)
    assert awaited.model.votes.to_dict() == threaded.model.votes.to_dict()


async def test_async_calibration_keeps_the_dollar_cap():
    w = SimulatedWorld.homogeneous(120, seed=13, p0=0.4, p_cw=0.1, p_wc=0.3)
    register_price("simulated/async-capped", 2e-6, 8e-6)
    lm = w.lm(name="async-capped", price=(2e-6, 8e-6), max_tokens=64)
    calibrator = MarkovCalibrator(w.metric, rounds=2, max_dollars=0.03, resume=False)
    with dspy.context(lm=lm), pytest.warns(UserWarning, match="stopped at max_dollars=0.03"):
        await calibrator.acompile(MarkovRefine(dspy.Predict("question -> answer"), max_rounds=2), trainset=w.examples)
    assert 0 < calibrator.report.usage["cost"] <= 0.03 and calibrator.report.dollar_cap["refused_calls"] > 0


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8"])
async def test_a_bad_concurrency_names_the_argument(bad):
    w = SimulatedWorld.homogeneous(5, seed=14, p0=0.4, p_cw=0.1, p_wc=0.3)
    with pytest.raises(ConfigurationError, match="concurrency"):
        await MarkovCalibrator(w.metric).acompile(student(), trainset=w.examples, concurrency=bad)


async def test_a_job_that_raises_ends_as_it_does_in_compile():
    def broken_key(outputs):
        raise ValueError("this answer has no key")

    w = SimulatedWorld.homogeneous(12, seed=15, p0=0.4, p_cw=0.1, p_wc=0.3)
    student = MarkovScale(dspy.Predict("question -> answer"), max_calls=2, answer_key=broken_key)
    errors = []
    with dspy.context(lm=w.lm()):
        for run in ("compile", "acompile"):
            calibrator = MarkovCalibrator(w.metric, parallel_samples=2, resume=False, max_errors=100)
            with pytest.raises(CalibrationError) as raised:
                if run == "compile":
                    calibrator.compile(student, trainset=w.examples)
                else:
                    await calibrator.acompile(student, trainset=w.examples, concurrency=4)
            errors.append(str(raised.value).split(":")[0])
    assert errors[0] == errors[1]
