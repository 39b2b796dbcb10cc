"""A calibration as an MLflow run: its settings as params, its estimates as metrics, its report as artifacts.

Logged to the active run: the one MLflow's DSPy autolog opens around ``compile`` (``log_compiles=True``), or one
the user opened with ``mlflow.start_run()``. Nothing is logged without an active run, and MLflow is only used when
the user has imported it.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from markovscale_dspy.calibrate.report import CalibrationReport
from markovscale_dspy.reporting.plots import calibration_figure
from markovscale_dspy.reporting.text import calibration_markdown

__all__ = ["calibration_metrics", "calibration_params", "log_calibration"]


def calibration_params(report: CalibrationReport, calibrator: Any) -> dict[str, Any]:
    """What the calibration was asked to do (MLflow params: short strings)."""
    lms = report.calibrated_for or {}
    program = lms.get("program")
    return {
        "markovscale.rounds": report.rounds,
        "markovscale.trainset_size": report.examples,
        "markovscale.prior": json.dumps(getattr(calibrator, "prior", None)),
        "markovscale.question_types": str(getattr(calibrator, "question_types", None)),
        "markovscale.parallel_samples": str(getattr(calibrator, "parallel_samples", None)),
        "markovscale.program_lm": ", ".join(program) if isinstance(program, list) else str(program),
        "markovscale.refiner_lm": str(lms.get("refiner")),
    }


def calibration_metrics(report: CalibrationReport) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """``(metrics, step_metrics)``: the estimates with their interval ends, the verdict's numbers and the spend;
    per round (the step), the observed accuracy with its interval and the chain's prediction."""
    metrics: dict[str, float | None] = {}
    for name, estimate in report.estimates.items():
        for key in ("mean", "lo", "hi"):
            metrics[f"{name}_{key}" if key != "mean" else name] = estimate.get(key)
    metrics.update(
        {
            "prob_improves": report.prob_improves,
            "bound": report.stationary_accuracy,
            "convergence_rate": report.convergence_rate,
            "chains_used": report.chains_used,
            "chains_reused": report.chains_reused,
            "calls": report.usage.get("calls"),
            "dollars": report.usage.get("cost"),
            "answer_rate": (report.failures.get("round0") or {}).get("answer_rate"),
        }
    )
    for cost, rounds in report.recommended_rounds.items():
        metrics[f"recommended_rounds_at_cost_{cost}"] = rounds
    steps = []
    for row in report.observed_accuracy:
        for key, name in (("accuracy", "observed_accuracy"), ("lo", "observed_lo"), ("hi", "observed_hi")):
            steps.append((name, row[key], row["round"]))
        steps.append(("predicted_accuracy", row["predicted"], row["round"]))
    return _finite(metrics), [(k, float(v), t) for k, v, t in steps if _is_finite(v)]


def log_calibration(calibrator: Any, report: CalibrationReport) -> bool:
    """Log ``report`` to the active MLflow run; returns whether there was one to log to."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or mlflow.active_run() is None:
        return False
    active = mlflow.active_run().info.run_id
    if "markovscale.rounds" in mlflow.get_run(active).data.params:
        # A second calibration in the same run (MLflow params cannot change): a nested run of its own.
        with mlflow.start_run(run_name=type(calibrator).__name__, nested=True):
            _log(mlflow, calibrator, report)
    else:
        _log(mlflow, calibrator, report)
    return True


def _log(mlflow: Any, calibrator: Any, report: CalibrationReport) -> None:
    metrics, steps = calibration_metrics(report)
    mlflow.log_params({k: str(v)[:500] for k, v in calibration_params(report, calibrator).items()})
    mlflow.log_metrics({f"markovscale.{k}": v for k, v in metrics.items()})
    for name, value, step in steps:
        mlflow.log_metric(f"markovscale.{name}", value, step=step)
    mlflow.set_tag("markovscale.regime", report.regime)
    data = report.to_dict()
    mlflow.log_dict(data, "markovscale/calibration_report.json")
    with tempfile.TemporaryDirectory() as tmp:
        figure = None
        try:
            figure = calibration_figure(report, Path(tmp) / "calibration.png")
            mlflow.log_artifact(str(figure), "markovscale")
        except ImportError:  # matplotlib is optional: the report says so instead of a figure
            pass
        markdown = calibration_markdown(report, figure="calibration.png" if figure else None)
        mlflow.log_text(markdown, "markovscale/calibration_report.md")


def _is_finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _finite(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if _is_finite(v)}
