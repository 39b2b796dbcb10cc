"""MarkovCalibrator: a DSPy Teleprompter that fits the chain on a labelled trainset."""

import dspy
import pytest
from helpers import IMPROVING, refine, world

from markovscale_dspy import (
    CalibrationError,
    ConfigurationError,
    DataError,
    MarkovCalibrator,
    MarkovRefine,
    TransitionModel,
)
from markovscale_dspy.core.statistics import score_to_label


def calibrate(w, metric=None, student=None, **kwargs):
    kwargs.setdefault("rounds", 3)
    kwargs.setdefault("num_threads", 1)
    calibrator = MarkovCalibrator(metric or w.metric, **kwargs)
    with dspy.context(lm=w.lm()):
        program = calibrator.compile(student or refine(), trainset=w.examples)
    return program, calibrator


def test_compile_returns_a_calibrated_copy():
    student = refine()
    program, _ = calibrate(world(), student=student)
    assert program is not student and isinstance(program.model, TransitionModel) and not program._compiled


def test_student_is_untouched():
    student = refine()
    state = student.dump_state()
    calibrate(world(), student=student)
    assert student.model is None and student.dump_state() == state and not student._compiled


def test_runs_full_chains_without_early_stopping():
    w = world(30)
    program, _ = calibrate(w, rounds=4)
    assert w.calls == 30 * 5 and program.model.n_transitions == 30 * 4


def test_labels_come_from_the_metric():
    w = world(30)
    program, _ = calibrate(w, metric=lambda example, pred, trace=None: True)
    assert program.model.n0_correct == 30 and program.model.n_cw == 0


def test_float_metric_is_thresholded():
    assert score_to_label(0.7, 0.5) and not score_to_label(0.3, 0.5)


def test_prediction_with_score_is_accepted():
    assert score_to_label(dspy.Prediction(score=1.0, feedback="ok"), 1.0)


def test_metric_returning_text_is_rejected():
    with pytest.raises(DataError, match="metric returned 'yes'"):
        score_to_label("yes", 1.0)


def test_report_has_counts_estimates_regime_and_rounds():
    w = world(60)
    program, calibrator = calibrate(w)
    report = calibrator.report
    assert report.regime == program.model.regime()
    assert report.estimates["p_cw"]["lo"] < report.estimates["p_cw"]["mean"] < report.estimates["p_cw"]["hi"]
    assert [row["round"] for row in report.observed_accuracy] == [0, 1, 2, 3]
    assert report.observed_accuracy[0]["n"] == 60 and report.usage["calls"] == 60 * 4


def test_report_is_json_serialisable():
    import json

    _, calibrator = calibrate(world(20))
    assert json.loads(json.dumps(calibrator.report.to_dict()))["examples"] == 20


def test_valset_is_evaluated_for_the_report_only():
    w, v = world(40), world(30, seed=5)
    calibrator = MarkovCalibrator(w.metric, rounds=2, num_threads=1)
    with dspy.context(lm=w.lm()):
        calibrator.compile(refine(), trainset=w.examples, valset=v.examples)
    assert calibrator.report.valset["examples"] == 30 and 0 <= calibrator.report.valset["accuracy"] <= 1


def test_metric_that_raises_on_some_examples_is_reported_per_example():
    w = world(20)
    flaky = lambda ex, pred, trace=None: 1 / 0 if "#3:" in ex.question else w.metric(ex, pred)  # noqa: E731
    program, calibrator = calibrate(w, metric=flaky)
    assert calibrator.report.failures["metric_errors"] == [{"index": 3, "error": "ZeroDivisionError: division by zero"}]
    assert program.model.n0_total == 19


def test_metric_that_always_raises_is_a_clear_error():
    def broken(example, pred, trace=None):
        raise KeyError("gold")

    with pytest.raises(CalibrationError, match="no usable chain among 10 trainset examples; failures: 10x KeyError"):
        calibrate(world(10), metric=broken)


def test_failed_rounds_are_dropped_from_the_fit():
    w = world(40)
    student = refine()
    student.refiner.lm = w.lm(faults={"timeout": 0.5})
    program, calibrator = calibrate(w, student=student, rounds=4)
    failed = calibrator.report.failures["rounds_failed"]
    assert failed > 0 and program.model.n_transitions == 40 * 4 - failed


def test_empty_trainset_is_rejected():
    with pytest.raises(DataError, match="trainset is empty"):
        MarkovCalibrator(lambda e, p: True).compile(refine(), trainset=[])


def test_examples_without_inputs_are_rejected():
    with pytest.raises(DataError, match=r"trainset\[0\] has no input fields marked"):
        MarkovCalibrator(lambda e, p: True).compile(refine(), trainset=[dspy.Example(question="q", answer="a")])


def test_examples_without_labels_are_rejected():
    with pytest.raises(DataError, match=r"trainset\[0\] has no label fields"):
        unlabelled = dspy.Example(question="q").with_inputs("question")
        MarkovCalibrator(lambda e, p: True).compile(refine(), trainset=[unlabelled])


def test_examples_missing_a_program_input_are_rejected():
    example = dspy.Example(query="q", answer="a").with_inputs("query")
    with pytest.raises(DataError, match=r"lacks input field\(s\) \['question'\]"):
        MarkovCalibrator(lambda e, p: True).compile(refine(), trainset=[example])


def test_student_must_be_a_markov_refine():
    with pytest.raises(ConfigurationError, match="calibrates a MarkovRefine, got Predict"):
        MarkovCalibrator(lambda e, p: True).compile(dspy.Predict("question -> answer"), trainset=world().examples)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rounds": 0}, "rounds must be an integer in \\[1, 999\\] or None, got 0"),
        ({"num_threads": 0}, "num_threads must be a positive integer or None, got 0"),
        ({"prior": (0, 1)}, "prior must be a pair"),
        ({"threshold": "high"}, "threshold must be a number"),
    ],
)
def test_invalid_calibrator_arguments_are_named(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        MarkovCalibrator(lambda e, p: True, **kwargs)


def test_metric_must_be_callable():
    with pytest.raises(ConfigurationError, match="metric must be callable"):
        MarkovCalibrator("exact_match")


def test_compile_fires_dspy_compile_callbacks():
    seen = []

    class Spy(dspy.utils.callback.BaseCallback):
        def on_compile_start(self, call_id, instance, inputs):
            seen.append(type(instance).__name__)

    w = world(5)
    with dspy.context(callbacks=[Spy()]):
        calibrate(w, rounds=1)
    assert seen == ["MarkovCalibrator"]


def test_calibrated_module_is_reusable_with_other_policies():
    program, _ = calibrate(world(60))
    other = MarkovRefine(dspy.Predict("question -> answer"), policy="fixed", round_cost=0.02)
    other.model = program.model
    assert other.planned_rounds() == program.model.optimal_rounds(0.02, 4)


def test_threaded_calibration_equals_sequential():
    seq, _ = calibrate(world(80, seed=3), num_threads=1)
    par, _ = calibrate(world(80, seed=3), num_threads=8)
    assert seq.model == par.model


def test_improving_world_is_recognised():
    program, _ = calibrate(world(200, **IMPROVING))
    assert program.model.regime() == "improving"
