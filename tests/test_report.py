"""Reports: plain-words verdicts, text and Markdown calibration reports, figures, and the drift check (simulated)."""

import dspy
from helpers import DEGRADING, IMPROVING, model_from_rates, refine, world

from markovscale_dspy.evaluate.evaluation import evaluate
from markovscale_dspy.reporting.text import calibration_markdown, format_calibration, verdict


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


def test_verdict_reports_the_confidence_gate():
    from markovscale_dspy import TransitionModel

    unsure = TransitionModel.fit([[False, True], [True, True], [False, False], [True, False], [False, True]])
    assert 0.1 < unsure.prob_improves() < 0.9 and unsure.optimal_rounds(0.0, 3) > 0
    assert "confidence gate 0.9" in verdict(unsure, 0.0, 3, min_prob_improves=0.9)


def test_text_report_shows_estimates_regime_and_rounds(calibrated):
    _, report = calibrated
    text = format_calibration(report)
    assert "p_cw" in text and f"regime: {report.regime}" in text and "observed accuracy" in text


def test_markdown_report_has_every_section(calibrated):
    program, report = calibrated
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
    # The numbers in it, against the fitted model itself rather than the report the page was rendered from.
    model = program.model
    for name in ("p0", "p_cw", "p_wc"):
        lo, hi = model.interval(name, 0.95)
        assert f"| {getattr(model, name):.3f} | {lo:.3f} – {hi:.3f} |" in markdown
    assert (
        f"correct→correct {model.n_cc}, correct→wrong {model.n_cw}, wrong→correct {model.n_wc}, "
        f"wrong→wrong {model.n_ww}; round 0: {model.n0_correct}/{model.n0_total} correct"
    ) in markdown
    assert f"| 0 | {model.n0_correct / model.n0_total:.1%} | " in markdown


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
    from markovscale_dspy.reporting.text import drift_words

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
