"""The calibration report: counts, estimates with intervals, the regime verdict, fit and drift checks."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from markovscale_dspy._exceptions import StateError
from markovscale_dspy.calibrate.records import ChainRecord
from markovscale_dspy.core.model import PARAMETERS, TransitionModel
from markovscale_dspy.core.planner import Plan
from markovscale_dspy.core.statistics import binomial_interval, homogeneity_test
from markovscale_dspy.core.voting import VoteModel
from markovscale_dspy.usage import Usage

__all__ = ["REPORT_COSTS", "CalibrationReport", "build_report", "spend_of", "vote_summary"]

#: Round costs the report gives the recommended number of rounds for.
REPORT_COSTS = (0.0, 0.005, 0.01, 0.02, 0.05)


@dataclass
class CalibrationReport:
    """Everything a calibration measured: counts, estimates with intervals, the regime verdict, fit checks.

    ``to_dict()`` is JSON-able; the report layer renders it as text, Markdown and plots.
    """

    model: dict[str, Any]
    rounds: int
    examples: int
    chains_used: int
    estimates: dict[str, dict[str, float]]
    regime: str
    stationary_accuracy: float | None
    convergence_rate: float
    prob_improves: float
    recommended_rounds: dict[str, int]
    observed_accuracy: list[dict[str, float]]
    transitions_by_round: list[dict[str, int]]
    failures: dict[str, Any]
    usage: dict[str, int]
    seconds: float
    valset: dict[str, Any] | None = None
    chains_reused: int = 0
    trace_store: str | None = None
    reused_usage: dict[str, int] = field(default_factory=dict)
    drift: dict[str, Any] = field(default_factory=dict)
    calibrated_for: dict[str, Any] | None = None
    spend: dict[str, Any] | None = None
    chains: list[dict[str, Any]] = field(default_factory=list, repr=False)
    votes: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    dollar_cap: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationReport:
        """Rebuild a report saved with :meth:`to_dict` (e.g. the ``report.json`` the CLI writes)."""
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise StateError(f"not a calibration report: {exc}") from None

    @classmethod
    def from_model(cls, model: TransitionModel, horizon: int = 8) -> CalibrationReport:
        """A report of a model alone (no calibration chains at hand): predictions, bounds and recommendations."""
        return build_report(model, [], horizon, 0.0, None)

    def transition_model(self) -> TransitionModel:
        return TransitionModel.from_dict(self.model)


def _drift(by_round: list[dict[str, int]]) -> dict[str, Any]:
    """Do the transition rates change with the round? A chi-square test of homogeneity per rate."""
    out: dict[str, Any] = {}
    for name, (hit, miss) in {"p_cw": ("cw", "cc"), "p_wc": ("wc", "ww")}.items():
        rows = [(r["round"], r[hit], r[miss]) for r in by_round if r[hit] + r[miss] > 0]
        test = homogeneity_test([(h, m) for _, h, m in rows])
        out[name] = {
            "rates": {str(t): h / (h + m) for t, h, m in rows},
            "chi2": None if test is None else test[0],
            "p_value": None if test is None else test[1],
        }
    return out


def _mean(usages: list[Usage]) -> dict[str, Any]:
    n = len(usages)
    total = sum(usages, Usage())
    return {
        "n": n,
        "calls": total.calls / n if n else None,
        "prompt_tokens": total.prompt_tokens / n if n else None,
        "completion_tokens": total.completion_tokens / n if n else None,
        "cost": total.cost / n if n and total.cost is not None else None,
    }


def spend_of(records: list[ChainRecord]) -> dict[str, Any]:
    """Mean calls, tokens and dollars of round 0 and of one refinement round, over rounds that reached the LM.

    Rounds served from DSPy's cache cost nothing and say nothing about the price, so they are left out; ``cost``
    is ``None`` when some round's price is unknown.
    """
    first, later = [], []
    for r in records:
        for t, data in enumerate(r.round_usage):
            usage = Usage.from_dict(data)
            if usage.calls:
                (later if t else first).append(usage)
    return {"round0": _mean(first), "refinement": _mean(later)}


def vote_summary(votes: VoteModel, level: float = 0.95) -> dict[str, Any]:
    """The vote model in numbers: its fit, and vote accuracy by number of votes, in-sample (every subset of each
    question's own samples) against the prediction with its interval."""
    curve = []
    tail = (1 - level) / 2
    for n in range(1, votes.max_samples + 1):
        observed, se, questions = votes.observed_accuracy(n)
        draws = votes.accuracy_draws(n)
        lo, hi = (float(np.quantile(draws, q)) for q in (tail, 1 - tail)) if draws.size else (None, None)
        curve.append(
            {
                "n": n,
                "observed": observed,
                "se": se,
                "questions": questions,
                "predicted": votes.accuracy(n),
                "lo": lo,
                "hi": hi,
            }
        )
    return {
        "questions": len(votes.questions),
        "samples": sum(q[0] for q in votes.questions),
        "mean_accuracy": votes.mean_accuracy,
        "accuracy_sd": votes.accuracy_sd,
        "a": votes.a,
        "b": votes.b,
        "distractors": votes.distractors,
        "alpha": votes.alpha,
        "wrong_agreement": votes.agreement,
        "clusters_estimated": votes.clusters_estimated,
        "split_correct": votes.split_correct,
        "bootstrap": len(votes.draws),
        "curve": curve,
    }


def build_report(
    model: TransitionModel,
    records: list[ChainRecord],
    rounds: int,
    seconds: float,
    valset: dict[str, Any] | None,
    trace_store: str | None = None,
    calibrated_for: dict[str, Any] | None = None,
    plan: Plan | None = None,
) -> CalibrationReport:
    observed = []
    by_round = []
    for t in range(rounds + 1):
        labels = [r.labels[t] for r in records if len(r.labels) > t and r.labels[t] is not None]
        k, n = sum(labels), len(labels)
        lo, hi = binomial_interval(k, n)
        observed.append(
            {
                "round": t,
                "correct": k,
                "n": n,
                "accuracy": k / n if n else float("nan"),
                "lo": lo,
                "hi": hi,
                "predicted": float(model.accuracy_at(t)),
            }
        )
        if t:
            counts = Counter()
            for r in records:
                if len(r.labels) > t and r.errors[t] is None and None not in (r.labels[t - 1], r.labels[t]):
                    counts[("c" if r.labels[t - 1] else "w") + ("c" if r.labels[t] else "w")] += 1
            by_round.append({"round": t, **{k: counts.get(k, 0) for k in ("cc", "cw", "wc", "ww")}})
    drift = _drift(by_round)
    round_errors = Counter(e.split(":", 1)[0] for r in records for e in r.errors if e)
    sample_errors = Counter(s["error"].split(":", 1)[0] for r in records for s in r.samples if s.get("error"))
    round0 = [r.failure for r in records if r.failure is not None and not r.skipped]
    failures = {
        "round0": {
            "failed": len(round0),
            "questions": len(records),
            "rate": len(round0) / len(records) if records else 0.0,
            "interval": list(binomial_interval(len(round0), len(records))) if records else [0.0, 0.0],
            "commonest": Counter(round0).most_common(1)[0][0] if round0 else None,
            "answer_rate": model.answer_rate,
            "expected_accuracy_round0": float(model.expected_accuracy(0)),
        },
        "chains_failed": sum(r.failure is not None for r in records),
        "chain_failures": [{"index": r.index, "error": r.failure} for r in records if r.failure],
        "rounds_failed": sum(round_errors.values()),
        "round_errors": dict(round_errors),
        "metric_errors": [{"index": r.index, "error": r.metric_error} for r in records if r.metric_error],
        **(
            {"samples_failed": sum(sample_errors.values()), "sample_errors": dict(sample_errors)}
            if sample_errors
            else {}
        ),
    }
    usage, reused = Usage(), Usage()
    for r in records:
        spent = Usage.from_dict(r.usage)
        if r.reused:
            reused = reused + spent
        else:
            usage = usage + spent
        for sample in r.samples:
            spent = Usage.from_dict(sample.get("usage"))
            if sample.get("reused"):
                reused = reused + spent
            else:
                usage = usage + spent
    try:
        bound = model.stationary_accuracy()
    except ValueError:
        bound = None
    return CalibrationReport(
        model=model.to_dict(),
        rounds=rounds,
        examples=len(records),
        chains_used=sum(bool(r.observed_chain()) for r in records),
        estimates={
            name: {
                "mean": getattr(model, name),
                "lo": model.interval(name)[0],
                "hi": model.interval(name)[1],
                "se": model.standard_error(name),
            }
            for name in PARAMETERS
        },
        regime=model.regime(),
        stationary_accuracy=bound,
        convergence_rate=model.convergence_rate(),
        prob_improves=model.prob_improves(),
        recommended_rounds={str(c): model.optimal_rounds(c, rounds) for c in REPORT_COSTS},
        observed_accuracy=observed,
        transitions_by_round=by_round,
        failures=failures,
        usage=usage.to_dict(),
        seconds=seconds,
        valset=valset,
        chains_reused=sum(r.reused for r in records),
        trace_store=trace_store,
        drift=drift,
        calibrated_for=calibrated_for,
        spend=spend_of(records) if records else None,
        reused_usage=reused.to_dict(),
        chains=[asdict(r) for r in records],
        votes=vote_summary(model.votes) if model.votes is not None else None,
        plan=plan.to_dict() if plan is not None else None,
    )
