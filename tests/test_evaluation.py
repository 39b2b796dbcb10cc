"""Evaluation and method comparison: accuracy, calls and rounds counted per method on the same examples, with
binomial intervals for accuracies and their differences (simulated)."""

import dspy
import pytest
from helpers import refine, world

from markovscale_dspy.core.statistics import binomial_interval
from markovscale_dspy.evaluate.evaluation import compare, evaluate
from markovscale_dspy.reporting.text import difference_interval, format_comparison


def test_evaluate_counts_accuracy_calls_and_rounds():
    w = world(30)
    with dspy.context(lm=w.lm()):
        result = evaluate(
            refine(policy="fixed", max_rounds=2), w.examples, w.metric, name="fixed-2", keep_predictions=True
        )
    assert (result.n, result.calls, result.rounds, result.failures) == (30, 90, 60, 0)
    # Graded by the world's own truth, not by the harness: each question's last answer against its gold label.
    truth = [p.answer == e.answer for e, p in zip(w.examples, result.predictions, strict=True)]
    assert result.correct == sum(truth) and result.calls == w.calls


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
