"""The markovscale command, offline parts: report on a saved state, and clear errors for bad files."""

import dspy
from helpers import IMPROVING, model_from_rates, refine

from markovscale_dspy.cli import build_parser, main


def saved_state(tmp_path, model=None):
    module = refine()
    module.model = model or model_from_rates(**IMPROVING)
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


def test_demo_defaults_are_the_measured_ones():
    args = build_parser().parse_args(["demo"])
    assert (args.task, args.train, args.test, args.rounds) == ("winogrande", 100, 50, 3)
