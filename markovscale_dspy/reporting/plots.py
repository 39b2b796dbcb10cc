"""Figures: a calibration's accuracy by round against the chain's prediction, accuracy against LM calls, and the
planner's predicted against observed accuracy of every strategy.

Report layer; needs matplotlib (``pip install markovscale-dspy[plots]``). Figures are written as PNG files with
the headless Agg backend, so they work on servers and in CI.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from markovscale_dspy._exceptions import ConfigurationError
from markovscale_dspy.calibrate.report import CalibrationReport
from markovscale_dspy.core.statistics import binomial_interval
from markovscale_dspy.core.theory import BOUND_KIND, accuracy_at

if TYPE_CHECKING:  # rendering reads these results; it never runs the evaluation that makes them
    from markovscale_dspy.calibrate.refiner_report import RefinerReport
    from markovscale_dspy.evaluate.configurations import ConfigurationComparison
    from markovscale_dspy.evaluate.evaluation import MethodResult

__all__ = ["calibration_figure", "comparison_figure", "frontier_figure", "refiner_figure", "strategy_figure"]


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


def refiner_figure(report: RefinerReport, path: str | Path, *, title: str | None = None) -> Path:
    """The chain before (the default refiner) and after (the chosen one): observed accuracy per round on the same
    round-0 answers (95% intervals), each chain's ``accuracy_at(t)`` and the bound it converges to."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    horizon = max(report.after.rounds, 6)
    t = np.arange(horizon + 1)
    sides = [("before", report.before, "#d62728")]
    if report.after is not report.before:
        sides.append(("after", report.after, "#1f77b4"))
    lows, highs = [], []
    for name, side, colour in sides:
        model = side.transition_model()
        label = "default refiner" if name == "before" else "chosen refiner"
        ax.plot(t, model.accuracy_at(t), "-", color=colour, lw=2, label=f"{label}: accuracy_at(t)")
        rows = [r for r in side.observed_accuracy if r["n"]]
        if rows:
            x = np.array([r["round"] for r in rows]) + (0.06 if name == "after" else -0.06)
            y = np.array([r["accuracy"] for r in rows])
            err = np.array([[r["accuracy"] - r["lo"] for r in rows], [r["hi"] - r["accuracy"] for r in rows]])
            ax.errorbar(x, y, yerr=err, fmt="o", color=colour, capsize=3, label=f"{label}: observed (95% CI)")
            lows += [r["lo"] for r in rows]
            highs += [r["hi"] for r in rows]
        if side.stationary_accuracy is not None:
            ax.axhline(
                side.stationary_accuracy,
                ls="--",
                color=colour,
                alpha=0.7,
                label=(f"{label}: {BOUND_KIND[side.regime]} bound {side.stationary_accuracy:.3f}"),
            )
            lows.append(side.stationary_accuracy)
            highs.append(side.stationary_accuracy)
    if report.after is report.before and report.runner_up is not None:
        # The default was kept: the best challenger's chain, predicted from its rates, shows what was turned down.
        row = report.candidates[report.runner_up]
        p0 = report.before.estimates["p0"]["mean"]
        p_cw, p_wc = row["p_cw"]["mean"], row["p_wc"]["mean"]
        label = f"best challenger ({row['source']}, not chosen)"
        ax.plot(t, accuracy_at(t, p0, p_cw, p_wc), "-", color="#7f7f7f", lw=1.5, label=f"{label}: accuracy_at(t)")
        ax.axhline(row["bound"], ls="--", color="#7f7f7f", alpha=0.7, label=f"{label}: bound {row['bound']:.3f}")
        lows.append(row["bound"])
        highs.append(row["bound"])
    ax.set_xlabel("refinement round t (0 = the program alone, shared by both)")
    ax.set_ylabel("accuracy")
    ax.set_xticks(t)
    ax.set_ylim(max(0.0, min(lows or [0.0]) - 0.08), min(1.0, max(highs or [1.0]) + 0.08))
    chosen = report.candidates[report.chosen]
    return _save(
        plt,
        fig,
        ax,
        path,
        title or f"Refiner: {chosen['source']} chosen ({report.before.regime} -> {report.after.regime})",
        legend_size=7,
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


_FAMILY_STYLE = {
    "refine": ("#1f77b4", "refine T rounds (1 chain)"),
    "vote": ("#d62728", "vote over n samples"),
    "refine_vote": ("#2ca02c", "vote over n chains of T rounds"),
}


def strategy_figure(
    plan: Any,
    path: str | Path,
    *,
    observed: Sequence[MethodResult] | dict[str, Any] | None = None,
    title: str = "Predicted vs observed accuracy by strategy",
) -> Path:
    """The planner's view: predicted accuracy against LM calls per question for every strategy it considered
    (lines with their intervals shaded; votes over refined chains as points with interval bars), the observed
    accuracy of each strategy when given (open markers with 95% intervals), and the chosen plan circled.

    Args:
        plan: A :class:`~markovscale_dspy.core.planner.Plan` or its ``to_dict()``.
        path: Where to write the PNG.
        observed: Measured strategies (``MethodResult``s named like the strategies, e.g. ``"vote n=5"``), or a dict
            name -> ``{"accuracy", "interval", "mean_calls"}``.
        title: Figure title.
    """
    plt = _pyplot()
    data = plan.to_dict() if hasattr(plan, "to_dict") else dict(plan)
    rows = data["predictions"]
    seen: dict[str, dict[str, Any]] = {}
    for r in observed or []:
        if isinstance(observed, dict):
            seen[r] = observed[r]
        else:
            seen[r.name] = {"accuracy": r.accuracy, "interval": list(r.interval), "mean_calls": r.mean_calls}
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=120)
    single = next(r for r in rows if r["kind"] == "single")
    for kind, (color, label) in _FAMILY_STYLE.items():
        family = [r for r in rows if r["kind"] == kind]
        if not family:
            continue
        if kind == "refine_vote":
            for r in family:
                ax.errorbar(
                    [r["calls"]],
                    [r["accuracy"]],
                    yerr=[[r["accuracy"] - r["interval"][0]], [r["interval"][1] - r["accuracy"]]],
                    fmt="s",
                    color=color,
                    ms=5,
                    capsize=2,
                    label=f"{label} (predicted)" if r is family[0] else None,
                )
                ax.annotate(
                    f"{r['samples']}x{r['rounds']}",
                    (r["calls"], r["accuracy"]),
                    textcoords="offset points",
                    xytext=(4, 3),
                    fontsize=6,
                    color=color,
                )
            continue
        line = [single, *family] if kind in ("refine",) else family
        x = [r["calls"] for r in line]
        ax.plot(x, [r["accuracy"] for r in line], "-", color=color, lw=1.8, label=f"{label} (predicted)")
        ax.fill_between(
            x, [r["interval"][0] for r in line], [r["interval"][1] for r in line], color=color, alpha=0.15, lw=0
        )
    ax.errorbar(
        [1],
        [single["accuracy"]],
        yerr=[[single["accuracy"] - single["interval"][0]], [single["interval"][1] - single["accuracy"]]],
        fmt="o",
        color="black",
        ms=5,
        capsize=3,
        label="single call (predicted)",
    )
    first = True
    for r in rows:
        o = seen.get(r["name"])
        if o is None:
            continue
        color = "black" if r["kind"] == "single" else _FAMILY_STYLE[r["kind"]][0]
        acc, (lo, hi) = o["accuracy"], o["interval"]
        ax.errorbar(
            [r["calls"] + 0.12],
            [acc],
            yerr=[[acc - lo], [hi - acc]],
            fmt="o",
            mfc="white",
            color=color,
            ms=5,
            capsize=2,
            alpha=0.9,
            label="observed (95% CI), shifted right" if first else None,
        )
        first = False
    chosen = data["chosen"]
    ax.plot(
        [chosen["calls"]],
        [chosen["accuracy"]],
        "o",
        ms=16,
        mfc="none",
        mec="black",
        mew=1.8,
        label=f"chosen: {chosen['name']} ({data['reason']})",
    )
    ax.set_xlabel("LM calls per question")
    ax.set_ylabel("accuracy")
    ax.set_xticks(range(1, int(data["max_calls"]) + 1))
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


def comparison_figure(comparison: ConfigurationComparison, path: str | Path, *, title: str | None = None) -> Path:
    """Accuracy (95% CI when held out) against dollars per question, or LM calls when some dollars are unknown."""
    plt = _pyplot()
    by_dollars = all(r.dollars is not None for r in comparison.results)
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    markers = "os^DvP*Xh<>"
    for i, r in enumerate(comparison.results):
        x = r.dollars if by_dollars else r.calls
        if r.held_out is not None:
            lo, hi = r.held_out.interval
        else:
            n = r.report.examples
            lo, hi = binomial_interval(round(r.predicted_accuracy * n), n)
        best = r.name == comparison.recommended
        ax.errorbar(
            [x],
            [r.accuracy],
            yerr=[[max(r.accuracy - lo, 0.0)], [max(hi - r.accuracy, 0.0)]],
            fmt=markers[i % len(markers)],
            ms=10 if best else 7,
            capsize=3,
            label=f"{r.name} ({r.rounds} rounds)" + (" — recommended" if best else ""),
        )
    ax.set_xlabel("dollars per question" if by_dollars else "LM calls per question (dollars unknown)")
    ax.set_ylabel("accuracy" + (" (held out, 95% CI)" if any(r.held_out for r in comparison.results) else ""))
    return _save(plt, fig, ax, path, title or "Configurations: accuracy against cost", legend_size=8)
