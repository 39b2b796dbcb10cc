"""The markovscale command, offline parts: report on a saved state, and clear errors for bad files."""

import dspy
from helpers import IMPROVING, model_from_rates, refine

from markovscale_dspy.cli import main


def saved_state(tmp_path, model=None):
    module = refine(model=model or model_from_rates(**IMPROVING))
    path = tmp_path / "state.json"
    module.save(path)
    return path


def test_report_prints_estimates_regime_and_rounds(tmp_path, capsys):
    assert main(["report", str(saved_state(tmp_path)), "--cost", "0.01", "--max-rounds", "8"]) == 0
    out = capsys.readouterr().out
    assert "regime: improving" in out and "cost 0.01/round -> 6 round(s)" in out and "Refinement HELPS" in out


def test_report_on_a_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope.json")]) == 2
    assert "no state file at" in capsys.readouterr().err


def test_report_on_corrupt_json_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "state.json"
    path.write_text("{not json")
    assert main(["report", str(path)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_report_on_a_plain_dspy_program_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "program.json"
    dspy.Predict("question -> answer").save(path)
    assert main(["report", str(path)]) == 2
    assert "holds no MarkovRefine state" in capsys.readouterr().err


def test_report_on_an_uncalibrated_state_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "state.json"
    refine().save(path)
    assert main(["report", str(path)]) == 2
    assert "uncalibrated" in capsys.readouterr().err


def test_report_writes_markdown_and_a_png(tmp_path, capsys):
    path = saved_state(tmp_path)
    assert main(["report", str(path)]) == 0
    markdown = path.with_suffix(".report.md").read_text()
    png = path.with_suffix(".report.png").read_bytes()
    assert "## Verdict" in markdown and "Refinement HELPS" in markdown and "report.png" in markdown
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_uses_the_calibration_sidecar_when_present(tmp_path, capsys):
    import json

    from helpers import world

    from markovscale_dspy import MarkovCalibrator

    w = world(60)
    calibrator = MarkovCalibrator(w.metric, rounds=3, num_threads=1)
    with dspy.context(lm=w.lm()):
        program = calibrator.compile(refine(), trainset=w.examples)
    program.save(tmp_path / "s.json")
    (tmp_path / "s.report.json").write_text(json.dumps({"calibration": calibrator.report.to_dict()}))
    assert main(["report", str(tmp_path / "s.json")]) == 0
    markdown = (tmp_path / "s.report.md").read_text()
    assert "| 0 | " in markdown and "(n=" not in markdown and "| 60 |" in markdown  # observed rows, n = 60
