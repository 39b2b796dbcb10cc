"""The Markdown pages the ``markovscale`` command writes, and the run context at the top of each.

Reporting layer: renders what the evaluation and calibration layers measured; never calls an LM.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from markovscale_dspy._version import __version__
from markovscale_dspy.reporting.text import (
    comparison_markdown,
    configurations_markdown,
    paired_markdown,
    plan_markdown,
)

if TYPE_CHECKING:  # the comparison harness loads only when a comparison runs
    from markovscale_dspy.evaluate.compare import ComparisonResult
    from markovscale_dspy.evaluate.configurations import ConfigurationComparison
    from markovscale_dspy.evaluate.evaluation import MethodResult

__all__ = ["bench_page", "configurations_page", "context_markdown", "run_context"]


def run_context(fields: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
    """What a report says about its run: the caller's ``fields`` (model, task, sizes...), then the machine, the
    date, the package version and the seed, so a reader can reproduce it.

    Example:
        >>> context = run_context({"task": "winogrande"}, seed=0)
        >>> list(context)
        ['task', 'machine', 'date', 'markovscale-dspy', 'seed']
    """
    context = {k: v for k, v in fields.items() if v is not None}
    context["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    context["date"] = time.strftime("%Y-%m-%d %H:%M")
    context["markovscale-dspy"] = __version__
    if seed is not None:
        context["seed"] = seed
    return context


def context_markdown(title: str, context: dict[str, Any]) -> list[str]:
    """A page's title and its run context as a bullet list."""
    return [f"# {title}", "", *(f"- **{k}**: {v}" for k, v in context.items()), ""]


def bench_page(
    title: str,
    context: dict[str, Any],
    result: ComparisonResult,
    verdict: str,
    baseline: MethodResult,
    paired: Sequence[str],
    *,
    frontier_figure: str | None = None,
    plan_figure: str | None = None,
) -> str:
    """``markovscale bench``'s page: the verdict, every method on the same held-out questions, paired differences
    against ``baseline``, and the planner's predicted against observed accuracy by strategy."""
    out = context_markdown(title, context)
    out += ["## Verdict", "", verdict, ""]
    out += ["## Methods on the same held-out questions", "", comparison_markdown(result.results), ""]
    out += ["## Paired differences against no refinement", "", paired_markdown(result.results, baseline), ""]
    out += [" ".join(paired), ""]
    if frontier_figure:
        out += [f"![accuracy vs LM calls]({frontier_figure})", ""]
    if result.plan is not None:
        out += [
            plan_markdown(result.plan, result.strategies),
            "",
            "Observed: every strategy run on the held-out questions (one grid of fresh samples and chains per "
            "question). Predicted: from the calibration alone.",
            "",
        ]
        if plan_figure:
            out += [f"![predicted vs observed accuracy by strategy]({plan_figure})", ""]
    return "\n".join(out)


def configurations_page(
    title: str, context: dict[str, Any], result: ConfigurationComparison, *, figure: str | None = None
) -> str:
    """``markovscale compare-configs``'s page: the run context, then the comparison."""
    return "\n".join([*context_markdown(title, context), configurations_markdown(result, figure=figure)])
