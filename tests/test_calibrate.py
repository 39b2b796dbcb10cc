"""MarkovCalibrator: a DSPy Teleprompter that fits the chain on a labelled trainset -- what it runs, what it fits,
how it reports, how it fails; and statistical checks of the fit against simulated worlds whose truth is known.

Statistical tolerances come from standard errors (estimates within 3 posterior SE of the truth) or, for repeated
experiments, from the binomial tail of the count they claim.
"""

import dspy
import pytest
from helpers import IMPROVING, calibrate_one_type, calibrated_model, refine, world
from scipy import stats

from markovscale_dspy import (
    CalibrationError,
    ConfigurationError,
    DataError,
    MarkovCalibrator,
    MarkovRefine,
    RoundZeroError,
    TransitionModel,
)
from markovscale_dspy.core.statistics import score_to_label
from markovscale_dspy.testing import FAULT_KINDS, SimulatedWorld


def calibrate(w, metric=None, student=None, **kwargs):
    kwargs.setdefault("rounds", 3)
    kwargs.setdefault("num_threads", 1)
    calibrator = MarkovCalibrator(metric or w.metric, **kwargs)
    with dspy.context(lm=w.lm()):
        program = calibrator.compile(student or refine(), trainset=w.examples)
    return program, calibrator


def test_compile_returns_a_calibrated_copy():
    student = refine()
    w = world()
    program, _ = calibrate(w, student=student)
    assert program is not student and not program._compiled
    # Oracle: replay the questions on a fresh copy of the world with the fixed policy (the same prompts, so the same
    # answers), grade every round with the metric, and fit the chain directly from those labels and answers.
    replay = w.fresh()
    labels, answers = [], []
    with dspy.context(lm=replay.lm()):
        for example in replay.examples:
            pred = refine(policy="fixed", max_rounds=3)(**example.inputs())
            labels.append([replay.metric(example, dspy.Prediction(**entry["outputs"])) for entry in pred.trajectory])
            answers.append([entry["answer_key"] for entry in pred.trajectory])
    assert program.model == TransitionModel.fit(labels, answers=answers)


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

    with pytest.raises(CalibrationError, match=r"stopped after 10 errors .*max_errors=10\): 10x metric: KeyError"):
        calibrate(world(10), metric=broken)
    with pytest.raises(CalibrationError, match="no usable chain among 10 trainset examples; failures: 10x KeyError"):
        calibrate(world(10), metric=broken, max_errors=11)


def test_failed_rounds_are_dropped_from_the_fit():
    w = world(40)
    student = refine()
    student.refiner.lm = w.lm(faults={"timeout": 0.5})
    program, calibrator = calibrate(w, student=student, rounds=4)
    failed = calibrator.report.failures["rounds_failed"]
    assert failed > 0 and program.model.n_transitions == 40 * 4 - failed


def test_no_successful_refinement_is_a_clear_error_with_the_report_kept():
    w = world(20)
    student = refine()
    student.refiner.lm = w.lm(faults={"server": 1.0})
    calibrator = MarkovCalibrator(w.metric, rounds=2, num_threads=1)
    with dspy.context(lm=w.lm()), pytest.raises(CalibrationError, match="no refinement round succeeded"):
        calibrator.compile(student, trainset=w.examples)
    assert calibrator.report.failures["rounds_failed"] == 40


# 48% of calls fail, every transient kind; a prompt over the context window is no transient failure: calibration
# stops at it (tests/test_failures.py).
TRANSIENT_FAULTS = {kind: 0.08 for kind in FAULT_KINDS if kind != "context_window"}


@pytest.mark.slow
def test_a_thousand_faulty_rounds_never_crash_calibration_or_forward():
    w = SimulatedWorld.homogeneous(400, seed=40, **IMPROVING)
    faulty = w.lm(faults=TRANSIENT_FAULTS)
    engine = w.last_fault_engine
    calibrator = MarkovCalibrator(w.metric, rounds=4, num_threads=4, question_types=1, max_errors=400)
    with dspy.context(lm=faulty):
        program = calibrator.compile(refine(max_rounds=4), trainset=w.examples)
        outcomes = {"ok": 0, "round0": 0}
        for example in w.examples:
            try:
                pred = refine(policy="fixed", max_rounds=4)(**example.inputs())
                outcomes["ok"] += 1
                assert pred.failed_rounds == sum(e["error"] is not None for e in pred.trajectory)
            except RoundZeroError:
                outcomes["round0"] += 1
    faults = sum(engine.fault_counts.values())
    failures = calibrator.report.failures
    assert failures["round0"]["failed"] == program.model.n0_failed == failures["chains_failed"]
    assert faults >= 1000 and program.model.n_transitions > 0
    assert failures["rounds_failed"] > 0 and failures["chains_failed"] > 0 and outcomes["ok"] > 0


# Bad input ---------------------------------------------------------------------------------------------------------


def test_empty_trainset_is_rejected():
    with pytest.raises(DataError, match="trainset is empty"):
        MarkovCalibrator(lambda e, p: True).compile(refine(), trainset=[])


def test_trainset_of_one_example_is_too_small():
    with pytest.raises(DataError, match="trainset has 1 example; calibration needs at least 2"):
        MarkovCalibrator(lambda e, p: True).compile(refine(), trainset=world(1).examples)


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


# DSPy integration and threads --------------------------------------------------------------------------------------


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


# Statistical checks against a known truth --------------------------------------------------------------------------


def test_improving_world_is_recognised():
    program, _ = calibrate(world(200, **IMPROVING))
    assert program.model.regime() == "improving"


PARAMS = ("p0", "p_cw", "p_wc")


def test_calibration_recovers_parameters_within_three_standard_errors():
    model = calibrate_one_type(IMPROVING, seed=0).model
    for name in PARAMS:
        estimate, se = getattr(model, name), model.standard_error(name)
        print(f"{name}: truth {IMPROVING[name]:.3f} estimate {estimate:.3f} se {se:.4f}")
        assert abs(estimate - IMPROVING[name]) <= 3 * se


REPETITIONS, LEVEL = 50, 0.95
# If each 95% interval covers the truth with probability 0.95, the number of the 50 seeded repetitions that cover it
# is X ~ Binomial(50, 0.95). Fail only when the count falls in that distribution's lower 0.1% tail: the threshold is
# the largest k with P(X < k) <= 0.001 (k = 42: P(X < 42) = 0.00076, P(X < 43) = 0.0032), so a correct calibrator
# fails this test with probability <= 0.001 per parameter (<= 0.003 for the three, by the union bound).
FALSE_ALARM = 0.001
MIN_COVERED = int(stats.binom.ppf(FALSE_ALARM, REPETITIONS, LEVEL))


@pytest.mark.slow
def test_95_percent_intervals_cover_the_truth_in_50_repetitions_as_often_as_the_binomial_tail_allows():
    covered = dict.fromkeys(PARAMS, 0)
    for seed in range(REPETITIONS):
        model = calibrate_one_type(IMPROVING, seed=100 + seed).model
        for name in PARAMS:
            lo, hi = model.interval(name, LEVEL)
            covered[name] += lo <= IMPROVING[name] <= hi
    print(f"coverage out of {REPETITIONS}: {covered}; threshold {MIN_COVERED}")
    tail = stats.binom(REPETITIONS, LEVEL).cdf
    assert tail(MIN_COVERED - 1) <= FALSE_ALARM < tail(MIN_COVERED)  # the threshold is the tail the comment claims
    assert all(count >= MIN_COVERED for count in covered.values())


@pytest.mark.slow
def test_calibration_estimates_answer_stickiness_within_three_standard_errors():
    model = calibrated_model(SimulatedWorld.homogeneous(300, seed=2, p_same_wrong=0.7, **IMPROVING), question_types=1)
    se = model.standard_error("p_same_wrong")
    assert abs(model.p_same_wrong - 0.7) <= 3 * se


@pytest.mark.slow
def test_calibration_estimates_rewording_of_correct_answers():
    w = SimulatedWorld.homogeneous(300, seed=3, p_change_correct=0.3, **IMPROVING)
    calibrator = MarkovCalibrator(w.metric, rounds=4, num_threads=1, question_types=1)
    module = refine(max_rounds=4, answer_key=lambda outputs: str(outputs["answer"]))  # raw text: "42" != "42.0"
    with dspy.context(lm=w.lm()):
        model = calibrator.compile(module, trainset=w.examples).model
    assert abs(model.p_change_correct - 0.3) <= 3 * model.standard_error("p_change_correct")
