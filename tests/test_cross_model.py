"""A refiner on another model, and money as the cost: what a calibration records, the warnings, value_per_correct."""

import json
import warnings

import dspy
import pytest
from dspy.lm15 import Message, Response, TextPart
from dspy.lm15 import Usage as LMUsage

from markovscale_dspy import ConfigurationError, MarkovCalibrator, MarkovRefine, NotCalibratedError, Usage
from markovscale_dspy.reporting.text import calibration_markdown
from markovscale_dspy.testing import SimulatedWorld
from markovscale_dspy.usage import measure_usage, price_of, register_price

CHEAP = (1e-7, 4e-7)
STRONG = (3e-6, 1e-5)


@pytest.fixture
def world():
    return SimulatedWorld.homogeneous(60, p0=0.4, p_cw=0.1, p_wc=0.3, seed=3)


def calibrate(world, **kwargs):
    cheap, strong = world.lm(name="cheap", price=CHEAP), world.lm(name="strong", price=STRONG)
    calibrator = MarkovCalibrator(world.metric, num_threads=1, store_traces=False)
    with dspy.context(lm=cheap):
        module = MarkovRefine(dspy.Predict("question -> answer"), max_rounds=3, refiner_lm=strong, **kwargs)
        return calibrator.compile(module, trainset=world.examples), calibrator, cheap, strong


def test_a_calibration_records_the_model_names_and_what_a_round_costs(world, tmp_path):
    refine, calibrator, _, _ = calibrate(world)
    assert refine.markov.calibrated_for == {"program": ["simulated/cheap"], "refiner": "simulated/strong"}
    spend = refine.markov.spend
    assert spend["round0"]["n"] == 60 and spend["refinement"]["n"] == 180 and spend["refinement"]["calls"] == 1.0
    round0 = spend["round0"]["prompt_tokens"] * CHEAP[0] + spend["round0"]["completion_tokens"] * CHEAP[1]
    refinement = spend["refinement"]["prompt_tokens"] * STRONG[0] + spend["refinement"]["completion_tokens"] * STRONG[1]
    assert spend["round0"]["cost"] == pytest.approx(round0) and spend["refinement"]["cost"] == pytest.approx(refinement)
    assert calibrator.report.usage["cost"] == pytest.approx(60 * round0 + 180 * refinement)
    refine.save(tmp_path / "state.json")
    saved = json.loads((tmp_path / "state.json").read_text())["markov"]
    assert saved["format"] == "markovscale.state/2" and saved["calibrated_for"]["refiner"] == "simulated/strong"
    fresh = MarkovRefine(dspy.Predict("question -> answer"), max_rounds=3).load(tmp_path / "state.json")
    assert fresh.markov.calibrated_for == refine.markov.calibrated_for and fresh.markov.spend == spend
    markdown = calibration_markdown(calibrator.report)
    assert "## Fitted for" in markdown and "`simulated/strong`" in markdown and "## What a round costs" in markdown


def test_running_with_other_lms_than_the_calibration_warns(world):
    refine, _, cheap, strong = calibrate(world)
    question = world.examples[0].inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the calibrated pair: silent
        with dspy.context(lm=cheap):
            refine(**question)
    refine.refiner_lm = None  # now the drafter refines too
    with dspy.context(lm=cheap), pytest.warns(UserWarning, match=r"refinement on 'simulated/strong', but runs .*"):
        refine(**question)
    refine.refiner_lm = strong
    with dspy.context(lm=strong), pytest.warns(UserWarning, match=r"round 0 on 'simulated/cheap'.* round 0 on"):
        refine(**question)


def test_a_version_1_state_still_loads(world, tmp_path):
    refine, _, _, _ = calibrate(world)
    refine.save(tmp_path / "state.json")
    state = json.loads((tmp_path / "state.json").read_text())
    state["markov"]["format"] = "markovscale.state/1"
    del state["markov"]["calibrated_for"], state["markov"]["spend"]
    (tmp_path / "old.json").write_text(json.dumps(state))
    old = MarkovRefine(dspy.Predict("question -> answer"), max_rounds=3).load(tmp_path / "old.json")
    assert old.model == refine.model and old.markov.calibrated_for is None and old.markov.spend is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing recorded, nothing to compare
        with dspy.context(lm=world.lm(name="anything")):
            old(**world.examples[0].inputs())


def test_value_per_correct_turns_measured_dollars_into_the_stopping_cost(world):
    refine, _, _, _ = calibrate(world, value_per_correct=0.05)
    dollars = refine.markov.dollars_per_round()
    assert refine.stopping_cost() == pytest.approx(dollars / 0.05)
    assert refine.planned_rounds() == refine.model.optimal_rounds(dollars / 0.05, 3)
    refine.value_per_correct = 1e-6  # a correct answer worth almost nothing: no round pays
    assert refine.planned_rounds() == 0
    refine.value_per_correct = 1e6  # worth a fortune: every round pays
    assert refine.planned_rounds() == 3


def test_value_per_correct_needs_measured_dollars(world):
    with pytest.raises(ConfigurationError, match="give round_cost .* or value_per_correct .*, not both"):
        MarkovRefine(dspy.Predict("question -> answer"), round_cost=0.01, value_per_correct=0.1)
    with pytest.raises(ConfigurationError, match="value_per_correct must be a number > 0"):
        MarkovRefine(dspy.Predict("question -> answer"), value_per_correct=0)
    refine, _, cheap, _ = calibrate(world, value_per_correct=0.05)
    refine.markov.spend["refinement"]["cost"] = None  # as when the LM's price is unknown
    with pytest.raises(NotCalibratedError, match="its calibration measured none"):
        refine.planned_rounds()
    uncalibrated = MarkovRefine(dspy.Predict("question -> answer"), value_per_correct=0.05)
    with dspy.context(lm=cheap), pytest.warns(UserWarning, match="not calibrated"):
        assert uncalibrated(**world.examples[0].inputs()).markovscale.rounds == 0


class _Unpriced:
    """A custom engine that reports tokens but no price."""

    fingerprint = "unpriced"

    def complete(self, request):
        return Response(
            id="x",
            model=request.model,
            message=Message.assistant(TextPart('{"answer": "1"}')),
            finish_reason="stop",
            usage=LMUsage(input_tokens=7, output_tokens=3),
        )


def test_dollars_are_unknown_for_an_unpriced_model_and_priced_once_registered():
    lm = dspy.LM("custom/unpriced-model-xyz", engine=_Unpriced(), cache=False)
    with measure_usage() as usage:
        lm("hello")
    assert usage.calls == 1 and usage.prompt_tokens == 7 and usage.cost is None
    assert price_of("custom/unpriced-model-xyz") is None
    register_price("custom/unpriced-model-xyz", 1e-6, 2e-6)
    with measure_usage() as usage:
        lm("hello again")
    assert usage.cost == pytest.approx(7e-6 + 6e-6)


def test_usage_without_dollars_is_unknown_and_sums_stay_unknown():
    assert Usage.from_dict({"calls": 2, "prompt_tokens": 5}).cost is None  # recorded before dollars existed
    assert Usage.from_dict({}).cost == 0.0 and Usage.from_dict(None).cost == 0.0
    assert (Usage(1, 1, 1, 0.5) + Usage(1, 1, 1, None)).cost is None
    assert (Usage(1, 1, 1, 0.5) + Usage(1, 1, 1, 0.25)).to_dict()["cost"] == 0.75


def test_nested_meters_count_dollars_once(world):
    lm = world.lm(name="nested", price=(1e-6, 0.0))
    program = dspy.Predict("question -> answer")
    with dspy.context(lm=lm), measure_usage() as outer:
        with measure_usage() as inner:
            program(**world.examples[0].inputs())
        program(**world.examples[1].inputs())
    assert inner.calls == 1 and outer.calls == 2
    assert outer.cost == pytest.approx(1e-6 * outer.prompt_tokens)
    assert inner.cost == pytest.approx(1e-6 * inner.prompt_tokens)
