"""Figures: a calibration's accuracy by round against the chain's prediction, and accuracy against LM calls.

Report layer; needs matplotlib (``pip install markovscale-dspy[plots]``). Figures are written as PNG files with
the headless Agg backend, so they work on servers and in CI.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from markovscale_dspy._exceptions import ConfigurationError
from markovscale_dspy.calibrate.report import CalibrationReport
from markovscale_dspy.core.theory import BOUND_KIND
from markovscale_dspy.reporting.evaluation import MethodResult

__all__ = ["calibration_figure", "frontier_figure"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigurationError("plots need matplotlib: pip install 'markovscale-dspy[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def calibration_figure(
    report: CalibrationReport, path: str | Path, *, title: str | None = None, horizon: int | None = None
) -> Path:
    """Observed accuracy per round (95% intervals) against ``accuracy_at(t)`` and the stationary bound."""
    plt = _pyplot()
    model = report.transition_model()
    rows = report.observed_accuracy
    horizon = max(horizon or 0, report.rounds, 6)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    t = np.arange(horizon + 1)
    ax.plot(t, model.accuracy_at(t), "-", color="#1f77b4", lw=2, label="predicted by the chain, accuracy_at(t)")
    observed = [r for r in rows if r["n"]]
    if observed:
        x = np.array([r["round"] for r in observed])
        y = np.array([r["accuracy"] for r in observed])
        err = np.array([[r["accuracy"] - r["lo"] for r in observed], [r["hi"] - r["accuracy"] for r in observed]])
        ax.errorbar(x, y, yerr=err, fmt="o", color="#d62728", capsize=4, label="observed in calibration (95% CI)")
    if report.stationary_accuracy is not None:
        kind = BOUND_KIND[report.regime]
        ax.axhline(
            report.stationary_accuracy,
            ls="--",
            color="#2ca02c",
            label=f"{kind} bound p_wc/(p_cw+p_wc) = {report.stationary_accuracy:.3f}",
        )
    ax.axhline(model.p0, ls=":", color="grey", label=f"single pass p0 = {model.p0:.3f}")
    ax.set_xlabel("refinement round t (0 = the program alone)")
    ax.set_ylabel("accuracy")
    ax.set_xticks(t)
    low = min([model.p0, *(r["lo"] for r in observed), report.stationary_accuracy or 1.0])
    high = max([model.p0, *(r["hi"] for r in observed), report.stationary_accuracy or 0.0])
    ax.set_ylim(max(0.0, low - 0.08), min(1.0, high + 0.08))
    return _save(
        plt,
        fig,
        ax,
        path,
        title or f"Refinement is {report.regime}: P(helps | data) = {report.prob_improves:.2f}",
        legend_size=8,
    )


def frontier_figure(
    results: Sequence[MethodResult],
    path: str | Path,
    *,
    title: str = "Accuracy vs LM calls",
    curves: dict[str, Sequence[MethodResult]] | None = None,
) -> Path:
    """Accuracy against mean LM calls per question: the fixed-N line, every other method a point (95% CI), and
    optional named ``curves`` (e.g. a policy at several round costs) as dashed lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    for name, curve in (curves or {}).items():
        points = sorted(curve, key=lambda r: r.mean_calls)
        ax.plot([r.mean_calls for r in points], [r.accuracy for r in points], "--.", lw=1, label=name)
    fixed = sorted((r for r in results if r.name.startswith("fixed-")), key=lambda r: r.mean_calls)
    if fixed:
        ax.plot(
            [r.mean_calls for r in fixed],
            [r.accuracy for r in fixed],
            "-o",
            color="grey",
            ms=4,
            label="fixed-N refinement (N = 0, 1, ...)",
        )
        for r in fixed:
            ax.annotate(
                r.name.removeprefix("fixed-"),
                (r.mean_calls, r.accuracy),
                textcoords="offset points",
                xytext=(3, -10),
                fontsize=7,
                color="grey",
            )
    markers = "sD^vP*Xh<>"
    others = [r for r in results if not r.name.startswith("fixed-")]
    for i, r in enumerate(others):
        lo, hi = r.interval
        oracle = "oracle" in r.name
        ax.errorbar(
            [r.mean_calls],
            [r.accuracy],
            yerr=[[r.accuracy - lo], [hi - r.accuracy]],
            fmt=markers[i % len(markers)],
            ms=7,
            capsize=3,
            label=r.name,
            mfc="none" if oracle else None,
        )
    ax.set_xlabel("LM calls per question (mean)")
    ax.set_ylabel("accuracy (95% CI)")
    return _save(plt, fig, ax, path, title, legend_size=7)


def _save(plt: Any, fig: Any, ax: Any, path: str | Path, title: str, legend_size: int) -> Path:
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
