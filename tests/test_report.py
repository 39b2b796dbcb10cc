"""Reports and evaluation: plain-words verdicts, tables, Markdown, and side-by-side evaluation (simulated)."""

import dspy
import pytest
from helpers import DEGRADING, IMPROVING, model_from_rates, refine, world

from markovscale_dspy import MarkovCalibrator
from markovscale_dspy.core.statistics import binomial_interval
from markovscale_dspy.reporting.evaluation import compare, evaluate
from markovscale_dspy.reporting.report import (
    calibration_markdown,
    difference_interval,
    format_calibration,
    format_comparison,
    verdict,
)


def test_verdict_says_plainly_when_refinement_hurts():
    text = verdict(model_from_rates(**DEGRADING))
    assert text.startswith("Refinement HURTS here") and "one LM call per question" in text and "falls" in text


def test_verdict_says_when_refinement_helps_and_how_many_rounds():
    text = verdict(model_from_rates(**IMPROVING), round_cost=0.01, max_rounds=8)
    assert text.startswith("Refinement HELPS here") and "runs 6 refinement round(s)" in text


def test_verdict_admits_uncertainty():
    from markovscale_dspy import TransitionModel

    unsure = TransitionModel.fit([[False, True], [True, False], [False, False], [True, True]])
    assert "UNCERTAIN" in verdict(unsure) and "Calibrate on more examples" in verdict(unsure)


@pytest.fixture
def calibrated():
    w = world(60)
    calibrator = MarkovCalibrator(w.metric, rounds=3, num_threads=1)
    with dspy.context(lm=w.lm()):
        program = calibrator.compile(refine(), trainset=w.examples)
    return program, calibrator.report


def test_text_report_shows_estimates_regime_and_rounds(calibrated):
    _, report = calibrated
    text = format_calibration(report)
    assert "p_cw" in text and f"regime: {report.regime}" in text and "observed accuracy" in text


def test_markdown_report_has_every_section(calibrated):
    _, report = calibrated
    markdown = calibration_markdown(report, context={"model": "simulated"})
    for section in (
        "## Verdict",
        "## Estimates",
        "## Observed vs predicted",
        "## Transitions by round",
        "## Recommended rounds",
        "## Failures",
    ):
        assert section in markdown


def test_evaluate_counts_accuracy_calls_and_rounds():
    w = world(30)
    with dspy.context(lm=w.lm()):
        result = evaluate(refine(policy="fixed", max_rounds=2), w.examples, w.metric, name="fixed-2")
    assert (result.n, result.calls, result.rounds, result.failures) == (30, 90, 60, 0)
    assert result.correct == sum(result.labels) and result.prompt_tokens > 0


def test_evaluate_counts_failed_questions_as_wrong():
    w = world(10)
    with dspy.context(lm=w.lm(faults={"server": 1.0})):
        result = evaluate(refine(policy="fixed"), w.examples, w.metric, name="broken")
    assert (result.correct, result.failures) == (0, 10) and "RoundZeroError" in result.errors[0]


def test_compare_runs_methods_on_the_same_examples(calibrated):
    program, _ = calibrated
    w = world(20, seed=9)
    with dspy.context(lm=w.lm()):
        results = compare({"none": refine(policy="fixed", max_rounds=0), "markov": program}, w.examples, w.metric)
    assert [r.name for r in results] == ["none", "markov"] and all(r.n == 20 for r in results)
    assert "accuracy (95% CI)" in format_comparison(results)


def test_binomial_interval_contains_the_proportion():
    lo, hi = binomial_interval(30, 100)
    assert lo < 0.3 < hi and binomial_interval(0, 10)[0] == 0.0


def test_difference_interval_is_centred_on_the_difference():
    w = world(40)
    with dspy.context(lm=w.lm()):
        a = evaluate(refine(policy="fixed", max_rounds=3), w.examples, w.metric, name="a")
        b = evaluate(refine(policy="fixed", max_rounds=0), w.examples, w.metric, name="b")
    diff, lo, hi = difference_interval(a, b)
    assert diff == pytest.approx(a.accuracy - b.accuracy) and lo < diff < hi


def test_calibration_figure_is_a_png(calibrated, tmp_path):
    from markovscale_dspy.reporting.plots import calibration_figure

    path = calibration_figure(calibrated[1], tmp_path / "c.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_frontier_figure_is_a_png(tmp_path):
    from markovscale_dspy.reporting.plots import frontier_figure

    w = world(20)
    with dspy.context(lm=w.lm()):
        results = [
            evaluate(refine(policy="fixed", max_rounds=n), w.examples, w.metric, name=f"fixed-{n}") for n in range(3)
        ]
    assert frontier_figure(results, tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_drift_check_flags_rates_that_change_with_the_round(calibrated):
    from markovscale_dspy.reporting.report import drift_words

    _, report = calibrated
    report.drift = {"p_cw": {"p_value": 0.0001}, "p_wc": {"p_value": 0.6}}
    assert "p_cw DRIFTS with the round" in drift_words(report) and "p_wc: no evidence of drift" in drift_words(report)


def test_drift_test_detects_changing_rates_and_not_constant_ones():
    from markovscale_dspy.calibrate.report import _drift

    changing = [
        {"round": 1, "cc": 90, "cw": 10, "wc": 30, "ww": 70},
        {"round": 2, "cc": 50, "cw": 50, "wc": 30, "ww": 70},
    ]
    drift = _drift(changing)
    assert drift["p_cw"]["p_value"] < 0.001 and drift["p_wc"]["p_value"] > 0.5


def test_verdict_reports_the_confidence_gate():
    from markovscale_dspy import TransitionModel

    unsure = TransitionModel.fit([[False, True], [True, True], [False, False], [True, False], [False, True]])
    assert 0.1 < unsure.prob_improves() < 0.9 and unsure.optimal_rounds(0.0, 3) > 0
    assert "confidence gate 0.9" in verdict(unsure, 0.0, 3, min_prob_improves=0.9)
