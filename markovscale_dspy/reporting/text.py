"""Turn calibrations and evaluations into words: terminal text, Markdown, and a plain verdict.

Report layer: reads the data the lower layers produce (CalibrationReport, TransitionModel, MethodResult) and never
calls an LM. The verdict says plainly whether refinement helps; when it hurts, that is the result to show.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from markovscale_dspy.calibrate.report import CalibrationReport
from markovscale_dspy.core import statistics
from markovscale_dspy.core.model import PARAMETERS, TransitionModel
from markovscale_dspy.core.theory import BOUND_KIND

if TYPE_CHECKING:  # rendering reads these results; it never runs the evaluation that makes them
    from markovscale_dspy.calibrate.refiner_report import RefinerReport
    from markovscale_dspy.evaluate.configurations import ConfigurationComparison
    from markovscale_dspy.evaluate.evaluation import MethodResult

__all__ = [
    "calibration_markdown",
    "cap_words",
    "comparison_markdown",
    "configurations_markdown",
    "difference_interval",
    "dollars",
    "drift_words",
    "format_calibration",
    "format_comparison",
    "format_model",
    "format_plan",
    "lms_and_spend_markdown",
    "markdown_table",
    "observed_in_calibration",
    "paired_markdown",
    "paired_words",
    "percent",
    "plan_markdown",
    "refiner_markdown",
    "refiner_words",
    "round0_words",
    "verdict",
    "votes_markdown",
]

_LABELS = {
    "p0": "single-pass accuracy",
    "p_cw": "a refinement breaks a correct answer",
    "p_wc": "a refinement fixes a wrong answer",
}


def percent(x: float | None) -> str:
    """``x`` as a percentage with one decimal (``n/a`` for ``None``)."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def dollars(x: float | None) -> str:
    """Dollars for a report: ``$0.00123`` (4 significant digits), or ``unknown`` when the price is unknown.

    Example:
        >>> dollars(0.0012345), dollars(None), dollars(0.0)
        ('$0.001234', 'unknown', '$0')
    """
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "unknown"
    return f"${x:.4g}"


def verdict(
    model: TransitionModel, round_cost: float = 0.0, max_rounds: int = 8, min_prob_improves: float = 0.0
) -> str:
    """One paragraph in plain words: does refinement help this program on this task, and what will MarkovRefine do.

    The headline follows the posterior probability that refinement helps: HELPS above 90%, HURTS below 10%,
    UNCERTAIN in between (then the point estimates are reported as a lean, not a finding). ``min_prob_improves``
    is the module's confidence gate, if any.
    """
    p0, p_cw, p_wc = model.p0, model.p_cw, model.p_wc
    helps = model.prob_improves()
    regime = model.regime()
    planned = model.optimal_rounds(round_cost, max_rounds)
    bound = model.stationary_accuracy()
    moves = f"each refinement round breaks {percent(p_cw)} of correct answers and fixes {percent(p_wc)} of wrong ones"
    direction = {"improving": "rises", "degrading": "falls", "neutral": "stays"}[regime]
    which = BOUND_KIND[regime]
    course = f"so accuracy {direction} from {percent(p0)} towards {percent(bound)} (the {which} bound)"
    if helps >= 0.9:
        head = "Refinement HELPS here"
    elif helps <= 0.1:
        head = "Refinement HURTS here"
    else:
        lean = {"improving": "helps a little", "degrading": "hurts a little", "neutral": "changes nothing"}[regime]
        head = f"Refinement's effect is UNCERTAIN here (at the estimates it {lean})"
    text = f"{head}: {moves}, {course}. Probability that refinement helps, given the data: {helps:.0%}."
    if 0.1 < helps < 0.9:
        text += " Calibrate on more examples to settle it."
    if planned > 0 and helps < min_prob_improves:
        text += (
            f" MarkovRefine (closed form, confidence gate {min_prob_improves:g}) does not refine until a "
            "calibration is surer: one LM call per question."
        )
    elif planned == 0:
        text += " MarkovRefine (closed form) does not refine: one LM call per question."
    else:
        cost = f" at a cost of {round_cost:g} accuracy per round" if round_cost else ""
        text += f" MarkovRefine (closed form) runs {planned} refinement round(s){cost}."
    return text


def format_model(model: TransitionModel, level: float = 0.95) -> list[str]:
    """Estimates with credible intervals, one line each."""
    lines = []
    for name, label in _LABELS.items():
        lo, hi = model.interval(name, level)
        lines.append(f"  {name:<5} {getattr(model, name):6.3f}  [{lo:.3f}, {hi:.3f}]  {label}")
    return lines


def _bound_words(report: CalibrationReport) -> str:
    if report.stationary_accuracy is None:
        return "no bound (the chain never moves)"
    kind = BOUND_KIND[report.regime]
    return f"{kind} bound (stationary accuracy) {report.stationary_accuracy:.3f}"


def round0_words(report: CalibrationReport) -> str:
    """How often round 0 gave no answer and what that does to the accuracy a user will see ("" when never)."""
    r0 = report.failures.get("round0") or {}
    if not r0.get("failed"):
        return ""
    lo, hi = r0["interval"]
    return (
        f"round 0 gave no answer on {r0['failed']} of {r0['questions']} questions ({percent(r0['rate'])} "
        f"[{percent(lo)}, {percent(hi)}]; commonest: {r0['commonest']}): p0, p_cw, p_wc describe the answered "
        f"questions, and scored as dspy.Evaluate scores failures (wrong), single-pass accuracy is "
        f"{percent(r0['expected_accuracy_round0'])} of all questions"
    )


def format_calibration(
    report: CalibrationReport, round_cost: float = 0.0, max_rounds: int | None = None, min_prob_improves: float = 0.0
) -> str:
    """Terminal text for a calibration: estimates, regime, bound, recommended rounds, fit check, failures."""
    model = report.transition_model()
    max_rounds = report.rounds if max_rounds is None else max_rounds
    usage = report.usage
    lines = [
        f"Calibration: {report.chains_used} of {report.examples} chains used, round 0 + {report.rounds} refinement "
        f"rounds each ({usage.get('calls', 0)} LM calls, {usage.get('total_tokens', 0)} tokens, "
        f"{dollars(usage.get('cost'))}, {report.seconds:.0f} s"
        + (f"; {report.chains_reused} chains reused from {report.trace_store}" if report.chains_reused else "")
        + ("; chains not stored (no trace store, or an LM without identity)" if report.trace_store is None else "")
        + ")",
        "  estimates with 95% credible intervals:",
        *format_model(model),
        f"  regime: {report.regime}; {_bound_words(report)}; convergence rate {report.convergence_rate:.3f}/round",
        f"  P(refinement helps | data) = {report.prob_improves:.3f}",
        "  recommended refinement rounds by cost per round: "
        + ", ".join(f"{float(c):g} -> {t}" for c, t in report.recommended_rounds.items()),
        "  round   observed accuracy (95% CI)      predicted by the chain",
    ]
    for row in report.observed_accuracy:
        lines.append(
            f"  {row['round']:>5}   {percent(row['accuracy']):>6} [{percent(row['lo'])}, {percent(row['hi'])}]"
            f"   {percent(row['predicted']):>6}   (n={row['n']})"
        )
    f = report.failures
    if round0_words(report):
        lines.append("  " + round0_words(report))
    errors = ", ".join(f"{k} x{v}" for k, v in f["round_errors"].items()) or "none"
    lines.append(
        f"  failures: {f['chains_failed']} chains, {f['rounds_failed']} refinement rounds ({errors}), "
        f"{len(f['metric_errors'])} metric errors"
    )
    if report.dollar_cap:
        lines.append("  " + cap_words(report.dollar_cap))
    lines.append("  " + drift_words(report))
    lines.append("  " + verdict(model, round_cost, max_rounds, min_prob_improves))
    if report.votes:
        v = report.votes
        lines.append(
            f"  votes: {v['samples']} samples; per-question accuracy {percent(v['mean_accuracy'])} (sd "
            f"{percent(v['accuracy_sd'])}); two wrong answers agree with probability {v['wrong_agreement']:.2f}"
        )
    if report.plan:
        lines.append("  " + format_plan(report.plan))
    return "\n".join(lines)


def cap_words(cap: dict[str, Any]) -> str:
    """The dollar cap in a sentence: what was spent and left, and whether it stopped the calibration."""
    stopped = (
        f"it stopped the calibration ({cap['refused_calls']} calls refused before they were made)"
        if cap.get("refused_calls")
        else "it was not reached"
    )
    return (
        f"dollar cap ${cap['max_dollars']:g}: {dollars(cap['spent'])} spent, {dollars(max(cap['left'], 0.0))} left; "
        f"{stopped}"
    )


def drift_words(report: CalibrationReport) -> str:
    """The drift check in a sentence: do the transition rates change with the round?"""
    parts = []
    for name in ("p_cw", "p_wc"):
        check = (report.drift or {}).get(name) or {}
        p = check.get("p_value")
        if p is None:
            parts.append(f"{name}: not enough transitions to test")
        elif p < 0.01:
            parts.append(f"{name} DRIFTS with the round (chi-square p = {p:.3g})")
        elif p < 0.05:
            parts.append(f"{name}: weak evidence of drift (chi-square p = {p:.2f}, below 0.05 but not 0.01)")
        else:
            parts.append(f"{name}: no evidence of drift (chi-square p = {p:.2f})")
    drifting = any("DRIFTS" in part for part in parts)
    advice = (
        " The homogeneous chain is then an approximation: calibrate with as many rounds as you will run."
        if drifting
        else ""
    )
    return "Drift check: " + "; ".join(parts) + "." + advice


def difference_interval(a: MethodResult, b: MethodResult, level: float = 0.95) -> tuple[float, float, float]:
    """Accuracy of ``a`` minus accuracy of ``b`` with a normal-approximation interval (independent samples)."""
    return statistics.difference_interval(a.correct, a.n, b.correct, b.n, level)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table: one header row, a rule, and one row per sequence of cells.

    Example:
        >>> print(markdown_table(["a", "b"], [[1, 2]]))
        | a | b |
        |---|---|
        | 1 | 2 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def paired_words(a: MethodResult, b: MethodResult, level: float = 0.95) -> str:
    """``a`` against ``b`` on the same questions, in a sentence whose wording follows the paired statistics.

    "better"/"worse" only when the exact McNemar test rejects "no difference" at 5% (then the interval excludes
    zero too, up to the normal approximation); otherwise the difference is called noise at this sample size.
    """
    d = statistics.paired_difference(a.labels, b.labels, level)
    if d.n == 0:
        return f"{a.name} vs {b.name}: no question answered by both."
    stats_text = (
        f"{100 * d.diff:+.1f} points ({level:.0%} CI {100 * d.lo:+.1f} to {100 * d.hi:+.1f}; McNemar p = "
        f"{d.p_value:.2g}; {d.a_only} questions only {a.name} got right, {d.b_only} only {b.name})"
    )
    if d.p_value < 0.05:
        word = "better than" if d.diff > 0 else "worse than"
        return f"{a.name} is {word} {b.name} on the same {d.n} questions: {stats_text}."
    return (
        f"{a.name} vs {b.name} on the same {d.n} questions: {stats_text}; no difference detectable at this sample size."
    )


def paired_markdown(results: Sequence[MethodResult], baseline: MethodResult, level: float = 0.95) -> str:
    """Each method minus ``baseline`` on the same questions: paired difference, interval, McNemar p-value."""
    rows = []
    for r in results:
        if r is baseline or r.n != baseline.n:
            continue
        d = statistics.paired_difference(r.labels, baseline.labels, level)
        rows.append(
            [
                r.name,
                f"{100 * d.diff:+.1f}",
                f"{100 * d.lo:+.1f} to {100 * d.hi:+.1f}",
                f"{d.p_value:.2g}",
                f"{d.a_only} / {d.b_only}",
            ]
        )
    header = [
        f"method − {baseline.name} (same questions)",
        "points",
        f"{level:.0%} CI",
        "McNemar p",
        "only method right / only baseline right",
    ]
    return markdown_table(header, rows)


def format_comparison(results: Sequence[MethodResult]) -> str:
    """Side-by-side table of methods: accuracy with intervals, calls, tokens, time."""
    header = (
        f"  {'method':<28} {'accuracy (95% CI)':<24} {'LM calls/q':>10} {'tokens/q':>9} {'$/q':>10} "
        f"{'rounds/q':>9} {'wall s':>7} {'failed':>6}"
    )
    lines = [header]
    for r in results:
        lo, hi = r.interval
        lines.append(
            f"  {r.name:<28} {percent(r.accuracy):>6} [{percent(lo)}, {percent(hi)}]   {r.mean_calls:>10.2f} "
            f"{r.mean_tokens:>9.0f} {dollars(r.mean_cost):>10} {r.mean_rounds:>9.2f} {r.seconds:>7.1f} "
            f"{r.failures:>6}"
        )
    return "\n".join(lines)


def comparison_markdown(results: Sequence[MethodResult]) -> str:
    """Side-by-side Markdown table of methods (the Markdown twin of :func:`format_comparison`)."""
    header = [
        "method",
        "accuracy",
        "95% CI",
        "LM calls / question",
        "tokens / question",
        "$ / question",
        "rounds / question",
    ]
    rows = []
    for r in results:
        lo, hi = r.interval
        rows.append(
            [
                r.name,
                percent(r.accuracy),
                f"{percent(lo)} – {percent(hi)}",
                f"{r.mean_calls:.2f}",
                f"{r.mean_tokens:.0f}",
                dollars(r.mean_cost),
                f"{r.mean_rounds:.2f}",
                f"{r.seconds:.1f}",
                r.failures,
            ]
        )
    return markdown_table([*header, "wall s", "failed"], rows)


def _recommended(report: CalibrationReport) -> list[tuple[float, int]]:
    return [(float(c), t) for c, t in report.recommended_rounds.items()]


def calibration_markdown(
    report: CalibrationReport,
    *,
    title: str = "Calibration report",
    context: dict[str, Any] | None = None,
    round_cost: float = 0.0,
    max_rounds: int | None = None,
    figure: str | None = None,
    min_prob_improves: float = 0.0,
    plan_figure: str | None = None,
) -> str:
    """A Markdown report of a calibration (and, via ``context``, of where it ran); with parallel samples, also the
    vote model, and for a MarkovScale the plan (``plan_figure``: its predicted-accuracy figure)."""
    model = report.transition_model()
    max_rounds = report.rounds if max_rounds is None else max_rounds
    out = [f"# {title}", ""]
    if context:
        out += [f"- **{k}**: {v}" for k, v in context.items()] + [""]
    out += ["## Verdict", "", verdict(model, round_cost, max_rounds, min_prob_improves), ""]
    estimates = [
        [f"`{name}`", label, f"{getattr(model, name):.3f}", "{:.3f} – {:.3f}".format(*model.interval(name))]
        for name, label in _LABELS.items()
    ]
    out += [
        "## Estimates (95% credible intervals)",
        "",
        markdown_table(["parameter", "meaning", "estimate", "95% interval"], estimates),
    ]
    bound = "none (frozen chain)" if report.stationary_accuracy is None else f"{report.stationary_accuracy:.3f}"
    out += [
        "",
        f"- regime: **{report.regime}**; stationary accuracy (the bound refinement converges to): {bound}",
        f"- convergence rate: {report.convergence_rate:.3f} per round",
        f"- P(refinement helps | data): {report.prob_improves:.3f}",
        f"- transitions observed: correct→correct {model.n_cc}, correct→wrong {model.n_cw}, "
        f"wrong→correct {model.n_wc}, wrong→wrong {model.n_ww}; round 0: {model.n0_correct}/{model.n0_total} "
        "correct",
        "",
    ]
    if model.confidence is not None:
        fit = model.confidence
        ratios = fit.likelihood_ratios()
        score = "n/a" if fit.auroc is None else f"{fit.auroc:.3f}"
        out[-1:-1] = [
            f"- answer confidence (token log-probabilities): AUROC {score} for correctness on the calibration "
            f"answers; {fit.bins} bins, likelihood ratio correct : wrong from {ratios.min():.2f} to "
            f"{ratios.max():.2f}; held-out gain {fit.heldout_gain[0]:.2f} ± {fit.heldout_gain[1]:.2f} nats per chain"
        ]
    if figure:
        out += [f"![accuracy by round]({figure})", ""]
    observed = [
        [
            r["round"],
            percent(r["accuracy"]),
            f"{percent(r['lo'])} – {percent(r['hi'])}",
            percent(r["predicted"]),
            r["n"],
        ]
        for r in report.observed_accuracy
    ]
    transitions = []
    for row in report.transitions_by_round:
        c, w = row["cc"] + row["cw"], row["wc"] + row["ww"]
        transitions.append(
            [
                row["round"],
                row["cc"],
                row["cw"],
                row["wc"],
                row["ww"],
                percent(row["cw"] / c if c else None),
                percent(row["wc"] / w if w else None),
            ]
        )
    out += [
        "## Observed vs predicted accuracy by round",
        "",
        markdown_table(["round", "observed", "95% CI", "predicted `accuracy_at(t)`", "n"], observed),
        "",
        "## Transitions by round (drift check)",
        "",
        markdown_table(["round", "C→C", "C→W", "W→C", "W→W", "P(C→W)", "P(W→C)"], transitions),
        "",
        drift_words(report),
        "",
        "## Recommended rounds by cost",
        "",
        markdown_table(
            ["cost per round", "rounds"], [[f"{float(c):g}", t] for c, t in report.recommended_rounds.items()]
        ),
    ]
    f = report.failures
    out += [
        "",
        "## Failures",
        "",
        f"- chains whose round 0 failed: {f['chains_failed']}"
        + (f" ({round0_words(report)})" if round0_words(report) else ""),
        f"- refinement rounds that failed and kept the previous answer: {f['rounds_failed']} {f['round_errors'] or ''}",
        f"- metric errors: {len(f['metric_errors'])}",
        "",
    ]
    out += lms_and_spend_markdown(report)
    if report.votes:
        out += [votes_markdown(report.votes), ""]
    if report.plan:
        out += [plan_markdown(report.plan), ""]
        if plan_figure:
            out += [f"![predicted accuracy by strategy]({plan_figure})", ""]
    usage = report.usage
    out += [
        f"Cost: {usage.get('calls', 0)} LM calls, {usage.get('prompt_tokens', 0)} prompt + "
        f"{usage.get('completion_tokens', 0)} completion tokens, {dollars(usage.get('cost'))}, "
        f"{report.seconds:.0f} s.",
        "",
    ]
    return "\n".join(out)


def spend_rows(spend: dict[str, Any] | None) -> list[tuple[str, str, str, str, str, int]]:
    """A report's measured spend (``report.spend``) as rows: round, LM calls, prompt and completion tokens, dollars, n.

    Only rounds with measurements appear; both the calibration report and the configuration comparison print these.
    """
    rows = []
    for key, label in (("round0", "round 0"), ("refinement", "one refinement round")):
        row = (spend or {}).get(key) or {}
        if row.get("n"):
            rows.append(
                (
                    label,
                    f"{row['calls']:.2f}",
                    f"{row['prompt_tokens']:.0f}",
                    f"{row['completion_tokens']:.0f}",
                    dollars(row.get("cost")),
                    row["n"],
                )
            )
    return rows


def lms_and_spend_markdown(report: CalibrationReport) -> list[str]:
    """Which LMs the calibration was fitted for (names only) and what round 0 and a refinement round cost."""
    out: list[str] = []
    lms = report.calibrated_for or {}
    if lms:
        out += [
            "## Fitted for",
            "",
            f"- round 0 (the program): {', '.join(f'`{n}`' for n in lms.get('program') or []) or 'unknown'}",
            f"- refinement rounds (the refiner): `{lms.get('refiner')}`",
            "",
            "The transition rates belong to this pair of LMs: MarkovRefine warns when it runs with others.",
            "",
        ]
    if report.dollar_cap:
        out += ["## Dollar cap", "", cap_words(report.dollar_cap), ""]
    rows = spend_rows(report.spend)
    if rows:
        out += [
            "## What a round costs (measured on calls that reached the LM)",
            "",
            markdown_table(["round", "LM calls", "prompt tokens", "completion tokens", "dollars", "n"], rows),
            "",
        ]
    return out


def votes_markdown(votes: dict[str, Any]) -> str:
    """The vote model of a calibration report (``report.votes``) as Markdown: its fit and the in-sample check."""
    m = "unbounded" if votes["distractors"] is None else votes["distractors"]
    lines = [
        "## Voting over independent samples",
        "",
        f"{votes['samples']} samples of {votes['questions']} questions. Per-question accuracy: mean "
        f"{percent(votes['mean_accuracy'])}, spread (sd over questions) {percent(votes['accuracy_sd'])} -- Beta("
        f"{votes['a']:.3g}, {votes['b']:.3g}). Wrong answers: {m} distractor(s) per question; two wrong answers "
        f"to one question agree with probability {votes['wrong_agreement']:.2f}"
        + ("" if votes["clusters_estimated"] else " (assumed: no question had two wrong answers to measure it)")
        + f". Intervals from {votes['bootstrap']} parametric-bootstrap refits.",
        "",
    ]
    if votes.get("split_correct"):
        lines += [
            f"Warning: on {votes['split_correct']} question(s) correct samples came under different answer keys; "
            "they split their votes, which the model does not account for (pass an answer_key that normalises "
            "them).",
            "",
        ]
    rows = []
    for row in votes["curve"]:
        observed = "n/a" if not row["questions"] else f"{percent(row['observed'])} ± {percent(1.96 * (row['se'] or 0))}"
        interval = "n/a" if row["lo"] is None else f"{percent(row['lo'])} – {percent(row['hi'])}"
        rows.append([row["n"], observed, percent(row["predicted"]), interval])
    lines += [
        markdown_table(
            ["votes", "in-sample (every subset of each question's samples)", "predicted", "95% interval"], rows
        )
    ]
    return "\n".join(lines)


def plan_markdown(plan: Any, observed: Sequence[MethodResult] | None = None) -> str:
    """A plan (a :class:`~markovscale_dspy.core.planner.Plan` or its ``to_dict()``) as Markdown: the choice in
    words and every candidate's prediction, with the observed result of each strategy when given."""
    data = plan.to_dict() if hasattr(plan, "to_dict") else plan
    seen = {r.name: r for r in observed or []}
    header = ["strategy", "LM calls", "predicted accuracy", "95% interval", "P(beats a single call)"]
    if seen:
        header += ["observed", "observed 95% CI"]
    rows = []
    for p in data["predictions"]:
        name = p["name"] + (" **(chosen)**" if p["name"] == data["chosen"]["name"] else "")
        row = [
            name,
            p["calls"],
            percent(p["accuracy"]),
            f"{percent(p['interval'][0])} – {percent(p['interval'][1])}",
            "–" if p["prob_gain"] is None else f"{p['prob_gain']:.2f}",
        ]
        if seen:
            o = seen.get(p["name"])
            row += (
                ["n/a", "n/a"]
                if o is None
                else [percent(o.accuracy), f"{percent(o.interval[0])} – {percent(o.interval[1])}"]
            )
        rows.append(row)
    cost = f", cost {data['call_cost']:g} per call" if data["call_cost"] else ""
    return "\n".join(
        [
            "## The plan",
            "",
            f"Budget: {data['max_calls']} LM calls per question{cost}; confidence gate P(gain) >= "
            f"{data['min_prob_gain']:g}. {format_plan(data)}",
            "",
            markdown_table(header, rows),
        ]
    )


def observed_in_calibration(report: CalibrationReport) -> dict[str, dict[str, Any]]:
    """What the calibration itself observed, per strategy name, for :func:`~markovscale_dspy.reporting.plots.
    strategy_figure`: votes over ``n`` of each question's samples (in-sample, every subset) and the calibration
    chains' accuracy after ``T`` rounds (their round 0 is the program's own call, not a fresh sample)."""
    out: dict[str, dict[str, Any]] = {}
    for row in (report.votes or {}).get("curve", []):
        if row["questions"] and row["n"] > 1:
            half = 1.96 * (row["se"] or 0.0)
            out[f"vote n={row['n']}"] = {
                "accuracy": row["observed"],
                "interval": [row["observed"] - half, row["observed"] + half],
                "mean_calls": row["n"],
            }
    for row in report.observed_accuracy:
        if row["n"]:
            name = "single" if row["round"] == 0 else f"refine T={row['round']}"
            out[name] = {
                "accuracy": row["accuracy"],
                "interval": [row["lo"], row["hi"]],
                "mean_calls": row["round"] + 1,
            }
    return out


def format_plan(plan: Any) -> str:
    """The plan in one line of words (from a Plan or its ``to_dict()``)."""
    data = plan.to_dict() if hasattr(plan, "to_dict") else plan
    c = data["chosen"]
    text = (
        f"Chosen: {c['name']} ({c['calls']} call(s)), predicted {percent(c['accuracy'])} "
        f"[{percent(c['interval'][0])}, {percent(c['interval'][1])}]"
    )
    if data["reason"] == "uncertain":
        b = data["best"]
        text += (
            f"; the best prediction, {b['name']} at {percent(b['accuracy'])}, is held back by the confidence gate "
            f"(P(gain) = {b['prob_gain']:.2f})"
        )
    for note in data.get("notes", []):
        text += f". {note}"
    return text + "."


def _interval(estimate: dict[str, float]) -> str:
    return f"{estimate['mean']:.3f} [{estimate['lo']:.3f}, {estimate['hi']:.3f}]"


def configurations_markdown(comparison: ConfigurationComparison, *, figure: str | None = None) -> str:
    """The comparison as Markdown: the recommendation, the chains, the plan, and what each costs and scores."""
    out = ["## Recommendation", ""]
    if comparison.recommended is None:
        out += ["No configuration's cost is known, so none is recommended (see the notes below).", ""]
    else:
        best = comparison.by_name(comparison.recommended)
        out += [
            f"**{best.name}** (round 0 on {', '.join(f'`{n}`' for n in best.lms.get('program') or [])}, refinement "
            f"on `{best.lms.get('refiner')}`): {percent(best.accuracy)} accuracy at {dollars(best.dollars)} and "
            f"{best.calls:.2f} LM calls per question, {best.rounds} refinement round(s). Criterion: "
            f"{comparison.criterion}.",
            "",
        ]
    if figure:
        out += [f"![accuracy against cost]({figure})", ""]
    chain_rows = [
        [
            r.name,
            ", ".join(f"`{n}`" for n in r.lms.get("program") or []),
            f"`{r.lms.get('refiner')}`",
            *(_interval(r.report.estimates[p]) for p in PARAMETERS),
            r.report.regime,
            f"{r.report.prob_improves:.2f}",
        ]
        for r in comparison.results
    ]
    out += [
        "## Calibrated chains (95% credible intervals)",
        "",
        markdown_table(
            ["configuration", "round 0 LM", "refiner LM", "p0", "p_cw", "p_wc", "regime", "P(helps)"], chain_rows
        ),
        "",
    ]
    rows = []
    for r in comparison.results:
        held = r.held_out
        if held is not None:
            lo, hi = held.interval
            measured = [f"{percent(held.accuracy)} [{percent(lo)}, {percent(hi)}]", f"{held.mean_calls:.2f}"]
            measured += [f"{held.mean_tokens:.0f}", dollars(held.mean_cost)]
        else:
            measured = ["not measured", "", "", ""]
        predicted_tokens = (r.predicted["prompt_tokens"] or 0) + (r.predicted["completion_tokens"] or 0)
        rows.append(
            [
                r.name,
                "n/a" if r.stopping_cost is None else f"{r.stopping_cost:.4g}",
                r.rounds,
                percent(r.predicted_accuracy),
                f"{r.predicted['calls']:.2f}" if r.predicted["calls"] is not None else "n/a",
                f"{predicted_tokens:.0f}",
                dollars(r.predicted["cost"]),
                *measured,
                "n/a" if r.objective is None else f"{r.objective:.4f}",
            ]
        )
    out += [
        "## Plan, spend and held-out result per question",
        "",
        markdown_table(
            [
                "configuration",
                "stopping cost (accuracy/round)",
                "optimal rounds",
                "predicted accuracy",
                "predicted calls",
                "predicted tokens",
                "predicted $",
                "held-out accuracy (95% CI)",
                "calls",
                "tokens",
                "$",
                "objective",
            ],
            rows,
        ),
        "",
    ]
    spend = [[r.name, *row] for r in comparison.results for row in spend_rows(r.report.spend)]
    if spend:
        out += [
            "## Measured per round during calibration",
            "",
            markdown_table(
                ["configuration", "round", "LM calls", "prompt tokens", "completion tokens", "dollars", "n"], spend
            ),
            "",
        ]
    notes = [f"- {r.name}: {r.note}" for r in comparison.results if r.note]
    if notes:
        out += ["## Notes", "", *notes, ""]
    return "\n".join(out)


def refiner_words(report: RefinerReport) -> str:
    """What a refiner race chose and why, in a few lines (what ``markovscale calibrate --optimize-refiner`` says)."""
    chosen = report.candidates[report.chosen]
    calls = report.calls
    made, race, every = calls["total"], calls.get("race", calls["total"]), calls["every_candidate_everywhere"]
    raced = (
        f"Raced {len(report.candidates)} refiners on the same {report.rungs[-1] if report.rungs else 0} round-0 answers"
    )
    if every:
        stored = f" ({made} made now, the rest from the trace store)" if race > made else ""
        spend = (
            f"{race} LM calls{stored}, {percent(1 - race / every)} fewer than every refiner on every example ({every})"
        )
    else:
        spend = f"{made} LM calls made now (the chains came from caches that recorded no calls: no saving measured)"
    lines = [f"{raced} (rungs {report.rungs}): {spend}."]
    if report.chosen == 0:
        best = None if report.runner_up is None else report.candidates[report.runner_up]
        why = (
            f"no challenger's advantage is supported (best finalist: {best['source']}, P(beats default) = "
            f"{best['prob_beats_default']:.3f} < {report.gate:.3f})"
            if best is not None
            else "no challenger finished the race"
        )
        lines.append(f"Kept the default refiner: {why}.")
    else:
        lines.append(
            f"Chose the {chosen['source']} refiner: P(beats default) = {chosen['prob_beats_default']:.3f} >= "
            f"{report.gate:.3f} (min_prob_better {report.min_prob_better:g} over {len(report.candidates) - 1} "
            f"challengers)."
        )
    before, after = report.before, report.after
    lines.append(
        f"Chain before: {before.regime}, bound {percent(before.stationary_accuracy)}; after: {after.regime}, "
        f"bound {percent(after.stationary_accuracy)}."
    )
    if report.held_out:
        h, d = report.held_out, report.held_out["difference"]
        lines.append(
            f"Held out ({h['examples']} questions, same round 0): {percent(h['before']['accuracy'])} before "
            f"({h['before']['rounds']} rounds), {percent(h['after']['accuracy'])} after ({h['after']['rounds']} "
            f"rounds); difference {_points(d)}."
        )
        if "best challenger" in h:
            c = h["best challenger"]
            lines.append(
                f"The best challenger ({h['best challenger source']}) on the same questions: "
                f"{percent(c['accuracy'])} ({c['rounds']} rounds); against the default {_points(c['difference'])}."
            )
    return "\n".join(lines)


def refiner_markdown(report: RefinerReport, *, figure: str | None = None) -> str:
    """The race as a Markdown section: every candidate, the choice, the chains before and after."""
    rows = []
    for i, c in enumerate(report.candidates):
        text = c["instructions"].replace("|", "\\|").replace("\n", " ")
        rows.append(
            [
                ("**chosen** " if i == report.chosen else "") + c["source"],
                text if len(text) <= 80 else text[:77] + "...",
                c["examples"],
                c["calls"],
                f"{c['p_cw']['mean']:.3f} [{c['p_cw']['interval'][0]:.3f}, {c['p_cw']['interval'][1]:.3f}]",
                f"{c['p_wc']['mean']:.3f} [{c['p_wc']['interval'][0]:.3f}, {c['p_wc']['interval'][1]:.3f}]",
                percent(c["bound"]),
                c["regime"],
                c["planned_rounds"],
                percent(c["value"]),
                "-" if c["prob_beats_default"] is None else f"{c['prob_beats_default']:.3f}",
                "finished" if c["eliminated_at"] is None else f"rung {c['eliminated_at'] + 1}",
            ]
        )
    header = [
        "refiner",
        "instructions",
        "examples",
        "calls",
        "p_cw [95%]",
        "p_wc [95%]",
        "bound",
        "regime",
        "rounds",
        "worth",
        "P(beats default)",
        "race",
    ]
    parts = [
        "## Refiner race",
        "",
        refiner_words(report).replace("\n", "\n\n"),
        "",
        "Worth: expected accuracy at the rounds the closed-form rule plans, minus the round cost "
        f"({report.round_cost:g} per round); p0 is shared by every refiner (the same round-0 answers).",
        "",
        markdown_table(header, rows),
    ]
    if figure:
        parts += ["", f"![chains before and after]({figure})"]
    return "\n".join(parts) + "\n"


def _points(d: dict[str, Any]) -> str:
    return (
        f"{100 * d['diff']:+.1f} points, 95% CI {100 * d['lo']:+.1f} to {100 * d['hi']:+.1f}, "
        f"McNemar p = {d['p_value']:.3g}"
    )
