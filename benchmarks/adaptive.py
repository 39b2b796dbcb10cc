"""Deciding per question when a vote has enough answers (issue 19): our exact stopping rule against fixed-n
self-consistency, Adaptive-Consistency, its-hub's BetaSelfConsistency and ESC, all replayed on the same recorded
samples.

    python -m benchmarks.adaptive                       # 4 planner worlds + 12 random ones, 2000 test questions each
    python -m benchmarks.adaptive --random 2 --test 500 # a quick look

For every world: 200 calibration questions x 8 samples fit the vote model (``VoteModel.fit``, as a user would
calibrate), then 2000 test questions each get a recorded sequence of ``max_calls = 8`` independent answers (correct,
or which distractor). Every rule is replayed on the same sequences in sample order (a stopping rule only sees the
answers before its decision, so the replay is exact and the comparison is paired), each swept over its own knob to a
curve of accuracy against mean calls:

* fixed-n self-consistency, n = 1..8 (plurality, ties to the answer seen first);
* Adaptive-Consistency (Aggarwal et al., EMNLP 2023, ``BetaStoppingCriteria``): after every answer, stop when
  ``P(p1 > p2) = 1 - I_0.5(v1 + 1, v2 + 1) >= threshold`` with ``v1, v2`` the top two counts; swept over every
  threshold at which its behaviour changes within 8 answers (default 0.95 marked);
* its-hub ``BetaSelfConsistency``: the same probability, but only checked from the second answer on (identical to
  Adaptive-Consistency for thresholds above 0.75, the value after one answer);
* ESC (Li et al., ICLR 2024): windows of ``w`` answers, stop at the first window whose answers are all identical and
  return that answer, else the plurality of all; answers left after the last full window are drawn too, so the whole
  budget can be used (w = 3: windows 3 + 3, then 2 more); swept over w = 1..8;
* ours, ``markovscale_dspy.core.stopping.should_stop`` with the fitted model, swept over ``call_cost``; and the same
  rule with the world's true parameters (the oracle, for scale).

Rules that decide from the sorted counts (fixed votes, Adaptive-Consistency, its-hub, ours) are also evaluated exactly
under each world's own law (``core.stopping.evaluate_policy``), which separates differences too small for 2000
questions to resolve.

Answers are drawn from each simulated question's hidden parameters (``p0`` and its distractors' weights), the law the
world's DSPy engine answers round-0 prompts with, without going through DSPy (a quarter of a million calls).
Standard errors: bootstrap over test questions (the same resample for every rule, so paired); the calibration set is
held fixed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import betainc

from benchmarks.worlds import PLANNER_PRESETS
from markovscale_dspy.core.stopping import VotePrior, evaluate_policy, stopping_table
from markovscale_dspy.core.voting import VoteModel
from markovscale_dspy.testing import SimulatedWorld

MAX_CALLS = 8
#: Call costs our rule is swept over (accuracy one call must buy).
COSTS = (0.0, *(float(f"{c:.3g}") for c in np.geomspace(1e-4, 0.3, 36)))
ESC_WINDOWS = tuple(range(1, MAX_CALLS + 1))
AC_DEFAULT = 0.95
PLANNER_WORLDS = ("realistic-hurts", "realistic-helps", "realistic-both", "realistic-mixed")
#: Expected accuracies this close are equal in the exact comparison (0.001 points: a rule with a tiny call cost gives up
#: about 1e-6 of accuracy against the full vote; exact float equality would call that "not reached").
EXACT_TOL = 1e-5
#: A curve point at one call is the single answer, which every rule can reach: (b) compares above it.
SINGLE = 1.0 + 1e-9


def ac_probability(v1: np.ndarray | int, v2: np.ndarray | int) -> np.ndarray:
    """Adaptive-Consistency's Beta stopping probability ``1 - I_0.5(v1 + 1, v2 + 1)``."""
    return 1.0 - betainc(np.asarray(v1) + 1.0, np.asarray(v2) + 1.0, 0.5)


def ac_thresholds(max_calls: int = MAX_CALLS) -> tuple[float, ...]:
    """Every threshold at which the Beta rule's decisions change within ``max_calls`` answers (and the default)."""
    values = {
        float(ac_probability(v1, v2))
        for n in range(1, max_calls + 1)
        for v1 in range(1, n + 1)
        for v2 in range(0, min(v1, n - v1) + 1)
    }
    return tuple(sorted(values | {AC_DEFAULT}))


# Worlds ---------------------------------------------------------------------------------------------------------------


def random_vote_components(seed: int) -> list[tuple[float, dict[str, Any]]]:
    """A random world for votes: accuracy ``Beta(a, b)`` with ``a ~ U(2, 6)``, ``b ~ U(1.2, 2)`` (between Beta(2, 1.2)
    and Beta(6, 2)), 2-4 distractors per question with Dirichlet(``alpha ~ U(0.3, 1)``) weights (agreeing wrong
    answers). Chain parameters are placeholders: only round-0 samples are used."""
    rng = np.random.default_rng([seed, 1919])
    a, b = float(rng.uniform(2.0, 6.0)), float(rng.uniform(1.2, 2.0))
    params = {
        "p0": a / (a + b),
        "p_cw": 0.1,
        "p_wc": 0.3,
        "kind": "vote",
        "p0_concentration": a + b,
        "n_distractors": int(rng.integers(2, 5)),
        "distractor_concentration": float(rng.uniform(0.3, 1.0)),
    }
    return [(1.0, params)]


def world_components(name: str) -> list[tuple[float, dict[str, Any]]]:
    if name in PLANNER_PRESETS:
        return PLANNER_PRESETS[name]
    if name.startswith("random-"):
        return random_vote_components(int(name.split("-", 1)[1]))
    raise ValueError(f"unknown world {name!r}")


def true_prior(components: Sequence[tuple[float, dict[str, Any]]]) -> VotePrior:
    """The world's own law of answers, as a (mixture) prior: what the oracle knows."""
    return VotePrior(
        tuple(
            (
                float(w),
                p["p0_concentration"] * p["p0"],
                p["p0_concentration"] * (1 - p["p0"]),
                int(p["n_distractors"]),
                float(p.get("distractor_concentration", 1.0)),
            )
            for w, p in components
        )
    )


def record(world: SimulatedWorld, samples: int, seed: int) -> np.ndarray:
    """``samples`` independent answers per question: 0 = correct, ``j >= 1`` = the question's ``j``-th distractor."""
    rng = np.random.default_rng([seed, 2024])
    out = np.zeros((len(world.questions), samples), dtype=np.int64)
    for i, q in enumerate(world.questions):
        correct = rng.random(samples) < q.p0
        wrong = rng.choice(len(q.distractor_weights), size=samples, p=np.asarray(q.distractor_weights)) + 1
        out[i] = np.where(correct, 0, wrong)
    return out


def fit_model(labels: np.ndarray) -> VoteModel:
    """The vote model a user would calibrate from these graded samples (answer key = the answer)."""
    return VoteModel.fit([[(x == 0, int(x)) for x in row] for row in labels.tolist()], bootstrap=0)


# Replay -----------------------------------------------------------------------------------------------------------


@dataclass
class Prefixes:
    """What every rule may look at after the first ``k + 1`` answers of each question (``[:, k]``)."""

    labels: np.ndarray
    leader_correct: np.ndarray  # the plurality answer (ties to the first seen) is correct
    v1: np.ndarray
    v2: np.ndarray
    settled: np.ndarray  # the remaining answers cannot change the plurality answer (order-aware)
    state_ids: np.ndarray
    states: list[tuple[int, ...]] = field(default_factory=list)

    @classmethod
    def of(cls, labels: np.ndarray) -> Prefixes:
        n, budget = labels.shape
        shape = (n, budget)
        leader_correct, settled = np.zeros(shape, bool), np.zeros(shape, bool)
        v1, v2, state_ids = np.zeros(shape, int), np.zeros(shape, int), np.zeros(shape, int)
        index: dict[tuple[int, ...], int] = {}
        for q, row in enumerate(labels.tolist()):
            order: list[int] = []
            counts: list[int] = []
            for k, x in enumerate(row):
                if x in order:
                    counts[order.index(x)] += 1
                else:
                    order.append(x)
                    counts.append(1)
                top = max(counts)
                leader = counts.index(top)  # first seen among the tied
                ranked = sorted(counts, reverse=True)
                leader_correct[q, k] = order[leader] == 0
                v1[q, k], v2[q, k] = ranked[0], ranked[1] if len(ranked) > 1 else 0
                remaining = budget - k - 1
                settled[q, k] = remaining <= top and all(
                    c + remaining < top or (c + remaining == top and i > leader)
                    for i, c in enumerate(counts)
                    if i != leader
                )
                state_ids[q, k] = index.setdefault(tuple(ranked), len(index))
        return cls(labels, leader_correct, v1, v2, settled, state_ids, list(index))


@dataclass(frozen=True)
class Outcome:
    """Per test question: calls spent and whether the returned answer was correct."""

    calls: np.ndarray
    correct: np.ndarray


def _first_stop(stop: np.ndarray) -> np.ndarray:
    """Index of the first ``True`` per row (the last column is always a stop)."""
    stop = stop.copy()
    stop[:, -1] = True
    return np.argmax(stop, axis=1)


def replay_fixed(p: Prefixes, n: int) -> Outcome:
    return Outcome(np.full(len(p.labels), n), p.leader_correct[:, n - 1].copy())


def replay_ac(p: Prefixes, threshold: float, first_check: int = 1) -> Outcome:
    """Adaptive-Consistency's Beta rule (``first_check = 2``: its-hub's BetaSelfConsistency)."""
    stop = ac_probability(p.v1, p.v2) >= threshold
    stop[:, : first_check - 1] = False
    k = _first_stop(stop)
    rows = np.arange(len(k))
    return Outcome(k + 1, p.leader_correct[rows, k])


def replay_esc(p: Prefixes, window: int) -> Outcome:
    """ESC: stop at the first full window of identical answers and return that answer, else the plurality of all
    (answers left over after the last full window are drawn too, so the whole budget can be used)."""
    labels = p.labels
    n, budget = labels.shape
    calls = np.full(n, budget)
    correct = p.leader_correct[:, -1].copy()
    done = np.zeros(n, bool)
    for start in range(0, budget - window + 1, window):
        block = labels[:, start : start + window]
        same = ~done & np.all(block == block[:, :1], axis=1)
        calls[same] = start + block.shape[1]
        correct[same] = block[same, 0] == 0
        done |= same
    return Outcome(calls, correct)


def replay_ours(p: Prefixes, prior: VotePrior, cost: float) -> Outcome:
    """Our rule, vectorised: exactly ``should_stop`` (settled with the order of appearance, else the table)."""
    table = stopping_table(prior, p.labels.shape[1], cost)
    budget = p.labels.shape[1]
    lookup = np.zeros((len(p.states), budget + 1), bool)
    if cost > 0:
        for sid, state in enumerate(p.states):
            for remaining in range(budget - sum(state) + 1):
                lookup[sid, remaining] = table.stop.get((state, remaining), False)  # unexplained: keep voting
    remaining = budget - 1 - np.arange(budget)[None, :]
    stop = p.settled | lookup[p.state_ids, np.broadcast_to(remaining, p.state_ids.shape)]
    k = _first_stop(stop)
    return Outcome(k + 1, p.leader_correct[np.arange(len(k)), k])


# Curves and the criteria ----------------------------------------------------------------------------------


def calls_to_reach(calls: np.ndarray, acc: np.ndarray, target: float, tol: float = 1e-12) -> float:
    """Fewest mean calls at which the piecewise-linear curve (points sorted by calls) reaches ``target`` (less
    ``tol``: accuracies that close are equal)."""
    order = np.lexsort((acc, calls))
    c, a = calls[order], acc[order]
    target -= tol
    if a[0] >= target:
        return float(c[0])
    for i in range(len(c) - 1):
        if a[i + 1] >= target:
            if a[i] >= target:
                return float(c[i])
            return float(c[i] + (target - a[i]) / (a[i + 1] - a[i]) * (c[i + 1] - c[i]))
    return math.nan


def concave_hull(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upper concave hull of points (what mixing two fixed vote sizes at random achieves)."""
    pts = sorted(zip(x.tolist(), y.tolist(), strict=True))
    hull: list[tuple[float, float]] = []
    for pt in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (pt[1] - y1) - (y2 - y1) * (pt[0] - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(pt)
    hx, hy = zip(*hull, strict=True)
    return np.asarray(hx), np.asarray(hy)


def accuracy_at(calls: np.ndarray, acc: np.ndarray, x: float) -> float:
    """Accuracy of the curve at ``x`` mean calls: linear between points (the best point at equal calls), flat
    beyond its ends (a rule that stops by itself does not spend more)."""
    xs = np.unique(calls)
    ys = np.array([acc[calls == v].max() for v in xs])
    return float(np.interp(x, xs, ys))


def criteria(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], ours: str = "ours", tol: float = 1e-12
) -> dict[str, Any]:
    """The issue's criteria on one world from each rule's ``(mean calls, accuracy)`` points (accuracies within
    ``tol`` count as equal)."""
    fixed_calls, fixed_acc = curves["fixed"]
    acc8 = float(fixed_acc[-1])
    target = acc8 - 0.01
    out: dict[str, Any] = {"acc8": acc8, "acc1": float(fixed_acc[0])}
    # (a) calls to come within 1 point of the full vote, as a share of its calls: along the curve (mixing two
    # neighbouring knob values at random), and with the best single knob value.
    out["a"] = {name: calls_to_reach(c, a, target) / MAX_CALLS for name, (c, a) in curves.items() if name != "fixed"}
    out["a_single"] = {
        name: float(np.min(c[a >= target], initial=np.inf)) / MAX_CALLS
        for name, (c, a) in curves.items()
        if name != "fixed"
    }
    # (b) at each accuracy a peer reaches (above a single call), the peer's calls minus ours (nan: our curve does not
    # reach it), and our accuracy minus the peer's at the peer's calls.
    oc, oa = curves[ours]
    out["b"] = {}
    for peer in [p for p in ("ac", "esc") if p in curves]:
        pc, pa = curves[peer]
        keep = pc > SINGLE
        out["b"][peer] = {
            "calls": [float(c - calls_to_reach(oc, oa, a, tol)) for c, a in zip(pc[keep], pa[keep], strict=True)],
            "accuracy": [accuracy_at(oc, oa, c) - float(a) for c, a in zip(pc[keep], pa[keep], strict=True)],
            "peer": [[float(c), float(a)] for c, a in zip(pc[keep], pa[keep], strict=True)],
        }
    # (c) how far below fixed voting at its own mean calls (linear between vote sizes, and the concave hull).
    hx, hy = concave_hull(fixed_calls, fixed_acc)
    out["c"] = {}
    for name, (c, a) in curves.items():
        if name == "fixed":
            continue
        linear = a - np.interp(c, fixed_calls, fixed_acc)
        hull = a - np.interp(c, hx, hy)
        out["c"][name] = {"linear": float(linear.min()), "hull": float(hull.min())}
    return out


# One world ----------------------------------------------------------------------------------------------------------


@dataclass
class WorldStudy:
    name: str
    prior: VotePrior
    model: VoteModel
    settings: list[tuple[str, float]]  # (rule, knob) per column
    calls: np.ndarray  # (questions, settings)
    correct: np.ndarray
    exact: dict[str, tuple[np.ndarray, np.ndarray]]  # expected (calls, accuracy) under the world's law
    seconds: float

    def curves(self, weights: np.ndarray | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if weights is None:
            calls, acc = self.calls.mean(axis=0), self.correct.mean(axis=0)
        else:
            total = weights.sum()
            calls, acc = weights @ self.calls / total, weights @ self.correct / total
        out: dict[str, tuple[list[float], list[float]]] = {}
        for j, (rule, _) in enumerate(self.settings):
            xs, ys = out.setdefault(rule, ([], []))
            xs.append(float(calls[j]))
            ys.append(float(acc[j]))
        return {k: (np.asarray(x), np.asarray(y)) for k, (x, y) in out.items()}


def study(name: str, *, n_cal: int, n_test: int, seed: int) -> WorldStudy:
    started = time.perf_counter()
    components = world_components(name)
    calibration = SimulatedWorld.mixture(n_cal, components, seed=2 * seed + 100)
    test = SimulatedWorld.mixture(n_test, components, seed=2 * seed + 101)
    model = fit_model(record(calibration, MAX_CALLS, seed=2 * seed + 100))
    prefixes = Prefixes.of(record(test, MAX_CALLS, seed=2 * seed + 101))
    fitted, oracle = VotePrior.from_model(model), true_prior(components)
    runs: list[tuple[str, float, Outcome]] = [("fixed", n, replay_fixed(prefixes, n)) for n in range(1, MAX_CALLS + 1)]
    runs += [("ac", t, replay_ac(prefixes, t)) for t in ac_thresholds()]
    runs += [("its_hub", t, replay_ac(prefixes, t, first_check=2)) for t in ac_thresholds()]
    runs += [("esc", w, replay_esc(prefixes, w)) for w in ESC_WINDOWS]
    runs += [("ours", c, replay_ours(prefixes, fitted, c)) for c in COSTS]
    runs += [("oracle", c, replay_ours(prefixes, oracle, c)) for c in COSTS]
    return WorldStudy(
        name,
        oracle,
        model,
        [(rule, float(knob)) for rule, knob, _ in runs],
        np.stack([o.calls for _, _, o in runs], axis=1).astype(float),
        np.stack([o.correct for _, _, o in runs], axis=1).astype(float),
        exact_curves(oracle, fitted),
        time.perf_counter() - started,
    )


def exact_curves(law: VotePrior, fitted: VotePrior) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Expected ``(calls, accuracy)`` of every rule that decides from the sorted counts, under the world's own law
    (no test-question noise): fixed votes, Adaptive-Consistency, its-hub, ours (the fitted table's decisions; at cost
    0 without the order of appearance, so its calls are an upper bound) and ours with the true prior."""

    def top_two(s: tuple[int, ...]) -> tuple[int, int]:
        return s[0], s[1] if len(s) > 1 else 0

    ours = {c: stopping_table(fitted, MAX_CALLS, c) for c in COSTS}
    rules: dict[str, list[Any]] = {
        "fixed": [lambda s, r, n=n: sum(s) >= n for n in range(1, MAX_CALLS + 1)],
        "ac": [lambda s, r, t=t: ac_probability(*top_two(s)) >= t for t in ac_thresholds()],
        "its_hub": [lambda s, r, t=t: sum(s) >= 2 and ac_probability(*top_two(s)) >= t for t in ac_thresholds()],
        "ours": [
            lambda s, r, tb=table: tb.stop.get((s, r), False)  # unexplained: keep voting
            for table in ours.values()
        ],
    }
    out = {}
    for rule, deciders in rules.items():
        points = [evaluate_policy(law, d, MAX_CALLS) for d in deciders]
        out[rule] = (np.array([c for _, c in points]), np.array([a for a, _ in points]))
    tables = [stopping_table(law, MAX_CALLS, c) for c in COSTS]
    out["oracle"] = (np.array([t.expected_calls for t in tables]), np.array([t.accuracy for t in tables]))
    return out


def _se(values: list[float]) -> float:
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def summarise(ws: WorldStudy, *, bootstrap: int, seed: int) -> dict[str, Any]:
    """Point estimates of the criteria and their paired bootstrap standard errors."""
    point = criteria(ws.curves())
    rng = np.random.default_rng([seed, 77])
    n = ws.calls.shape[0]
    reps = [criteria(ws.curves(rng.multinomial(n, np.full(n, 1.0 / n)).astype(float))) for _ in range(bootstrap)]
    se: dict[str, Any] = {
        "a": {k: _se([r["a"][k] for r in reps]) for k in point["a"]},
        "a_single": {k: _se([r["a_single"][k] for r in reps]) for k in point["a_single"]},
        # paired: the same resample for both rules
        "a_minus": {k: _se([r["a"]["ours"] - r["a"][k] for r in reps]) for k in point["a"] if k != "ours"},
        "c": {k: {s: _se([r["c"][k][s] for r in reps]) for s in ("linear", "hull")} for k in point["c"]},
        "b": {},
    }
    for peer, b in point["b"].items():
        calls_se = [_se([r["b"][peer]["calls"][i] for r in reps]) for i in range(len(b["calls"]))]
        acc_se = [_se([r["b"][peer]["accuracy"][i] for r in reps]) for i in range(len(b["accuracy"]))]
        se["b"][peer] = {"calls": calls_se, "accuracy": acc_se}
        b["verdicts"] = [_point_verdict(*v) for v in zip(b["calls"], calls_se, b["accuracy"], acc_se, strict=True)]
    curves = {k: {"calls": c.tolist(), "accuracy": a.tolist()} for k, (c, a) in ws.curves().items()}
    knobs: dict[str, list[float]] = {}
    for rule, knob in ws.settings:
        knobs.setdefault(rule, []).append(knob)
    m = ws.model
    exact = criteria(ws.exact, tol=EXACT_TOL)
    for b in exact["b"].values():
        b["verdicts"] = ["fewer" if d > 0 else "more" if math.isfinite(d) else "unreached-more" for d in b["calls"]]
    return {
        "exact": {
            "criteria": exact,
            "curves": {k: {"calls": c.tolist(), "accuracy": a.tolist()} for k, (c, a) in ws.exact.items()},
        },
        "world": ws.name,
        "true": [list(c) for c in ws.prior.components],
        "fitted": {"a": m.a, "b": m.b, "distractors": m.distractors, "alpha": m.alpha},
        "curves": curves,
        "knobs": knobs,
        "criteria": point,
        "se": se,
        "questions": n,
        "seconds": ws.seconds,
    }


def _point_verdict(d_calls: float, se_calls: float, d_acc: float, se_acc: float) -> str:
    """One peer point: ``fewer`` / ``more`` calls beyond 2 SE, else ``tie``; ``unreached-*`` when our curve stops
    below the peer's accuracy (judged by the accuracy gap at the peer's calls)."""
    if math.isfinite(d_calls):
        if not math.isfinite(se_calls):
            return "fewer" if d_calls > 0 else "more"
        return "fewer" if d_calls > 2 * se_calls else "more" if d_calls < -2 * se_calls else "tie"
    return "unreached-more" if math.isfinite(se_acc) and d_acc < -2 * se_acc else "unreached-tie"


def _b_summary(b: dict[str, Any]) -> dict[str, Any]:
    calls = np.asarray(b["calls"], dtype=float)
    finite = calls[np.isfinite(calls)]
    counts = {v: b["verdicts"].count(v) for v in ("fewer", "tie", "more", "unreached-tie", "unreached-more")}
    return {
        "min": float(finite.min()) if finite.size else math.nan,  # over the points our curve reaches
        "mean": float(finite.mean()) if finite.size else math.nan,
        "points": int(calls.size),
        "all_fewer": bool(calls.size and np.all(np.isfinite(calls)) and np.all(calls > 0)),
        "none_worse": counts["more"] + counts["unreached-more"] == 0,
        **counts,
    }


# Reporting ----------------------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.0f}%"


def _pm(x: float, se: float, scale: float = 100.0, digits: int = 1) -> str:
    if not math.isfinite(x):
        return "not reached"
    return f"{scale * x:+.{digits}f} ± {scale * se:.{digits}f}" if math.isfinite(se) else f"{scale * x:+.{digits}f}"


def verdicts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"worlds": len(rows)}
    for key in ("a", "a_single"):
        values = {k: np.array([r["criteria"][key][k] for r in rows]) for k in rows[0]["criteria"][key]}
        ses = np.array([r["se"][key]["ours"] for r in rows])
        out[key] = {
            "mean": {k: float(v.mean()) for k, v in values.items()},
            "range": {k: [float(v.min()), float(v.max())] for k, v in values.items()},
            "ours_mean_se": float(math.sqrt(np.nansum(ses**2)) / len(rows)),
            "ours_worlds_at_most_70": int(np.sum(values["ours"] <= 0.70)),
            "pass": bool(values["ours"].mean() <= 0.70),
        }
    out["b"] = {}
    for peer in ("ac", "esc"):
        per_world = [_b_summary(r["criteria"]["b"][peer]) for r in rows]
        out["b"][peer] = {
            "worlds_all_fewer": sum(w["all_fewer"] for w in per_world),
            "worlds_none_worse": sum(w["none_worse"] for w in per_world),
            "min": float(min(w["min"] for w in per_world)),
            "mean_of_means": float(np.nanmean([w["mean"] for w in per_world])),
            **{
                v: sum(w[v] for w in per_world)
                for v in ("points", "fewer", "tie", "more", "unreached-tie", "unreached-more")
            },
        }
    out["b"]["pass"] = all(out["b"][p]["worlds_all_fewer"] == len(rows) for p in ("ac", "esc"))
    out["b"]["pass_within_noise"] = all(out["b"][p]["worlds_none_worse"] == len(rows) for p in ("ac", "esc"))
    exact = [r["exact"]["criteria"] for r in rows]
    b_exact = [_b_summary(e["b"]["ac"]) for e in exact]
    out["exact"] = {
        key: {
            "mean": {k: float(np.mean([e[key][k] for e in exact])) for k in exact[0][key]},
            "range": {
                k: [float(np.min([e[key][k] for e in exact])), float(np.max([e[key][k] for e in exact]))]
                for k in exact[0][key]
            },
        }
        for key in ("a", "a_single")
    }
    out["exact"]["b_ac"] = {
        "worlds_all_fewer": sum(w["all_fewer"] for w in b_exact),
        "min": float(min(w["min"] for w in b_exact)),
        "points": sum(w["points"] for w in b_exact),
        "fewer": sum(w["fewer"] for w in b_exact),
    }
    out["exact"]["c_min_hull"] = float(min(e["c"]["ours"]["hull"] for e in exact))
    c = np.array([r["criteria"]["c"]["ours"]["linear"] for r in rows])
    ch = np.array([r["criteria"]["c"]["ours"]["hull"] for r in rows])
    out["c"] = {
        "min_linear": float(c.min()),
        "min_hull": float(ch.min()),
        "mean_linear": float(c.mean()),
        "mean_hull": float(ch.mean()),
        "pass_linear": bool(c.min() >= -0.01),
        "pass_hull": bool(ch.min() >= -0.01),
    }
    return out


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any], header: str) -> str:
    lines = [header, ""]
    lines += [
        "## Worlds",
        "",
        "| world | true (weight, a, b, distractors, alpha) | fitted a, b, distractors, alpha | single call "
        "| vote of 8 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        true = "; ".join(f"({w:.2f}, {a:.2f}, {b:.2f}, {m}, {al:.2f})" for w, a, b, m, al in r["true"])
        f = r["fitted"]
        lines.append(
            f"| {r['world']} | {true} | {f['a']:.2f}, {f['b']:.2f}, {f['distractors']}, {f['alpha']:.2f} | "
            f"{100 * r['criteria']['acc1']:.1f}% | {100 * r['criteria']['acc8']:.1f}% |"
        )
    rules = ("ours", "oracle", "ac", "its_hub", "esc")
    names = "ours (fitted) | ours, true prior | Adaptive-Consistency | its-hub Beta SC | ESC"
    for key, title, how in (
        (
            "a_single",
            "(a) Calls to come within 1 point of the 8-vote accuracy, best single knob value, share of 8 calls",
            "Per world: the fewest mean calls of any one setting of the rule's knob (cost, threshold, window) whose "
            "accuracy is at least the 8-vote accuracy minus 1 point. ± is the bootstrap SE.",
        ),
        (
            "a",
            "(a') The same along each curve (mixing two neighbouring knob values at random), share of 8 calls",
            "The curve is piecewise linear between a rule's knob values; `ours − X` is the paired difference.",
        ),
    ):
        lines += ["", f"## {title}", "", how, ""]
        extra = " ours − AC | ours − ESC |" if key == "a" else ""
        lines += [f"| world | {names} |{extra}", "|---|---|---|---|---|---|" + ("---|---|" if extra else "")]
        for r in rows:
            a, se = r["criteria"][key], r["se"][key]
            cells = [f"{_pct(a[k])} ± {100 * se[k]:.0f}" if math.isfinite(a[k]) else "not reached" for k in rules]
            if key == "a":
                cells += [_pm(a["ours"] - a[k], r["se"]["a_minus"][k], digits=0) for k in ("ac", "esc")]
            lines.append(f"| {r['world']} | " + " | ".join(cells) + " |")
        s = summary[key]
        tail = " | |" if key == "a" else ""
        lines.append(
            "| **mean** | "
            + " | ".join(
                f"**{_pct(s['mean'][k])}**" + (f" ± {100 * s['ours_mean_se']:.0f}" if k == "ours" else "")
                for k in rules
            )
            + f" |{tail}"
        )
        lines.append(
            "| range | " + " | ".join(f"{_pct(s['range'][k][0])}–{_pct(s['range'][k][1])}" for k in rules) + f" |{tail}"
        )
    lines += [
        "",
        "## (b) At every accuracy a peer reaches, the peer's calls minus ours",
        "",
        "For each swept point of the peer with more than one call (one call is the single answer, shared by every "
        "rule), our calls at the same accuracy are interpolated on our curve: `min` and `mean` are the peer's calls "
        "minus ours per question (positive: we need fewer), ± bootstrap SE of the minimum's point. Points: `fewer` / "
        "`tie` / `more` by 2 SE; `unreached`: the peer's accuracy is above our curve's highest point (counted as tie "
        "or more by our accuracy minus the peer's at the peer's calls, 2 SE).",
        "",
        "| world | vs AC: min | vs AC: mean | AC points fewer / tie / more / unreached | vs ESC: min | vs ESC: mean | "
        "ESC points fewer / tie / more / unreached |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for peer in ("ac", "esc"):
            b = r["criteria"]["b"][peer]
            w = _b_summary(b)
            calls = np.asarray(b["calls"], dtype=float)
            se = np.asarray(r["se"]["b"][peer]["calls"], dtype=float)
            worst = int(np.argmin(np.where(np.isfinite(calls), calls, np.inf)))
            cells += [
                _pm(w["min"], se[worst], scale=1.0, digits=2),
                f"{w['mean']:+.2f}",
                f"{w['fewer']} / {w['tie']} / {w['more']} / {w['unreached-tie'] + w['unreached-more']}"
                + (f" ({w['unreached-more']} worse)" if w["unreached-more"] else ""),
            ]
        lines.append(f"| {r['world']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## (c) Accuracy minus fixed voting at the rule's own mean calls (worst point of the sweep), points",
        "",
        "Fixed voting between two vote sizes: linear between adjacent sizes, and the upper concave hull (randomising "
        "between any two sizes; stricter).",
        "",
        "| world | ours: linear | ours: hull | ours, true prior: hull | AC: hull | its-hub: hull | ESC: hull |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c, se = r["criteria"]["c"], r["se"]["c"]
        cells = [_pm(c["ours"]["linear"], se["ours"]["linear"]), _pm(c["ours"]["hull"], se["ours"]["hull"])]
        cells += [_pm(c[k]["hull"], se[k]["hull"]) for k in ("oracle", "ac", "its_hub", "esc")]
        lines.append(f"| {r['world']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Expected under each world's own law (exact, no test-question noise)",
        "",
        "Rules that decide from the sorted counts (fixed votes, Adaptive-Consistency, its-hub, ours) evaluated exactly "
        "by `core.stopping.evaluate_policy` under the world's true parameters; ours uses the decisions of the table "
        "fitted on the calibration set (at cost 0 without the order of appearance, so its calls there are an upper "
        "bound). ESC decides from the order of the answers and is not included. Accuracies within 0.001 points count "
        "as equal.",
        "",
        "| world | (a') ours | (a') true prior | (a') AC | (a) ours | (a) AC | (b) vs AC: min | (b) vs AC: mean "
        "| (b) AC points fewer / all | (c) ours: hull |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = r["exact"]["criteria"]
        w = _b_summary(e["b"]["ac"])
        lines.append(
            f"| {r['world']} | {_pct(e['a']['ours'])} | {_pct(e['a']['oracle'])} | {_pct(e['a']['ac'])} | "
            f"{_pct(e['a_single']['ours'])} | {_pct(e['a_single']['ac'])} | {w['min']:+.3f} | {w['mean']:+.2f} | "
            f"{w['fewer']} / {w['points']} | {100 * e['c']['ours']['hull']:+.2f} |"
        )
    se_ = summary["exact"]
    lines.append(
        f"| **mean** | **{_pct(se_['a']['mean']['ours'])}** | {_pct(se_['a']['mean']['oracle'])} | "
        f"{_pct(se_['a']['mean']['ac'])} | **{_pct(se_['a_single']['mean']['ours'])}** | "
        f"{_pct(se_['a_single']['mean']['ac'])} | {se_['b_ac']['min']:+.3f} | | {se_['b_ac']['fewer']} / "
        f"{se_['b_ac']['points']} | {100 * se_['c_min_hull']:+.2f} (min) |"
    )
    s = summary
    sa, sa1, sb, sc = s["a"], s["a_single"], s["b"], s["c"]
    rng_ = sa1["range"]
    lines += [
        "",
        "## The issue's criteria",
        "",
        f"- (a) ours reaches the 8-vote accuracy within 1 point at **{_pct(sa1['mean']['ours'])} ± "
        f"{100 * sa1['ours_mean_se']:.0f}** of its calls on average over {len(rows)} worlds with one call cost "
        f"({_pct(sa['mean']['ours'])} ± {100 * sa['ours_mean_se']:.0f} along the curve); criterion at most 70%: "
        f"**{'met' if sa1['pass'] else 'not met'}**; {sa1['ours_worlds_at_most_70']} of {len(rows)} worlds at or below "
        f"70%. Ranges over worlds (single knob value): ours {_pct(rng_['ours'][0])}–{_pct(rng_['ours'][1])}, with the "
        f"true prior {_pct(rng_['oracle'][0])}–{_pct(rng_['oracle'][1])}, Adaptive-Consistency "
        f"{_pct(rng_['ac'][0])}–{_pct(rng_['ac'][1])}, ESC {_pct(rng_['esc'][0])}–{_pct(rng_['esc'][1])} (the issue "
        "quotes 51–67% for a rule knowing the true prior, 66–83% for Adaptive-Consistency, 66–81% for ESC).",
        f"- (b) fewer calls at every accuracy the peer reaches (point estimates): Adaptive-Consistency in "
        f"{sb['ac']['worlds_all_fewer']} of {len(rows)} worlds, ESC in {sb['esc']['worlds_all_fewer']} of {len(rows)}: "
        f"**{'met' if sb['pass'] else 'not met'}**. Over all peer points: vs AC {sb['ac']['fewer']} fewer, "
        f"{sb['ac']['tie']} tie, {sb['ac']['more']} more, {sb['ac']['unreached-tie'] + sb['ac']['unreached-more']} "
        f"unreached ({sb['ac']['unreached-more']} beyond 2 SE); vs ESC {sb['esc']['fewer']} fewer, {sb['esc']['tie']} "
        f"tie, {sb['esc']['more']} more, {sb['esc']['unreached-tie'] + sb['esc']['unreached-more']} unreached "
        f"({sb['esc']['unreached-more']} beyond 2 SE). No point worse beyond 2 SE in "
        f"{sb['ac']['worlds_none_worse']} (AC) and {sb['esc']['worlds_none_worse']} (ESC) of {len(rows)} worlds. "
        f"Smallest difference: {sb['ac']['min']:+.2f} calls (AC), {sb['esc']['min']:+.2f} (ESC); mean of the "
        f"per-world means: {sb['ac']['mean_of_means']:+.2f} (AC), {sb['esc']['mean_of_means']:+.2f} (ESC).",
        f"- (c) worst point of our sweep against fixed voting at the same mean calls, over all worlds: "
        f"{100 * sc['min_linear']:+.2f} points (linear between vote sizes), {100 * sc['min_hull']:+.2f} (concave "
        f"hull); never below −1 point: **{'met' if sc['pass_hull'] and sc['pass_linear'] else 'not met'}**.",
        f"- Exactly, under each world's law (no test-question noise): ours within 1 point of the 8-vote accuracy at "
        f"{_pct(se_['a']['mean']['ours'])} of its calls on average along the curve "
        f"({_pct(se_['a_single']['mean']['ours'])} with one cost), Adaptive-Consistency "
        f"{_pct(se_['a']['mean']['ac'])} ({_pct(se_['a_single']['mean']['ac'])}); "
        f"fewer calls than Adaptive-Consistency at {se_['b_ac']['fewer']} of its {se_['b_ac']['points']} points above "
        f"one call, in {se_['b_ac']['worlds_all_fewer']} of {len(rows)} worlds at every point (smallest difference "
        f"{se_['b_ac']['min']:+.3f} calls); worst point against fixed voting {100 * se_['c_min_hull']:+.2f} points.",
    ]
    return "\n".join(lines)


def figure(rows: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cols = 4
    rows_n = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.2 * rows_n), squeeze=False)
    style = {
        "fixed": ("k", "o", "fixed n"),
        "ac": ("tab:blue", ".", "Adaptive-Consistency"),
        "esc": ("tab:green", "s", "ESC"),
        "ours": ("tab:red", "^", "ours (fitted)"),
        "oracle": ("tab:red", "", "ours (true prior)"),
    }
    for ax, r in zip(axes.flat, rows, strict=False):
        for rule, (color, marker, label) in style.items():
            c = np.asarray(r["curves"][rule]["calls"])
            a = np.asarray(r["curves"][rule]["accuracy"])
            order = np.argsort(c)
            ls = "--" if rule == "oracle" else "-"
            ax.plot(c[order], 100 * a[order], ls, color=color, marker=marker, ms=3, lw=1, label=label)
        ax.axhline(100 * (r["criteria"]["acc8"] - 0.01), color="grey", lw=0.6, ls=":")
        ax.set_title(r["world"], fontsize=9)
        ax.set_xlim(0.8, MAX_CALLS + 0.2)
        lo = 100 * r["criteria"]["acc1"] - 1
        ax.set_ylim(lo, 100 * max(max(r["curves"][k]["accuracy"]) for k in style) + 0.5)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.supxlabel("mean LM calls per question")
    fig.supylabel("accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adaptive", description=__doc__.splitlines()[0])
    parser.add_argument("--random", type=int, default=12, help="random worlds (seeds 0..N-1)")
    parser.add_argument("--no-planner-worlds", action="store_true")
    parser.add_argument("--calibration", type=int, default=200, help="calibration questions (8 samples each)")
    parser.add_argument("--test", type=int, default=2000, help="test questions per world")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/adaptive-sim")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    names = ([] if args.no_planner_worlds else list(PLANNER_WORLDS)) + [f"random-{i}" for i in range(args.random)]
    rows = []
    for i, name in enumerate(names):
        ws = study(name, n_cal=args.calibration, n_test=args.test, seed=args.seed * 1000 + i)
        row = summarise(ws, bootstrap=args.bootstrap, seed=args.seed * 1000 + i)
        rows.append(row)
        a, b = row["criteria"]["a_single"], row["criteria"]["b"]
        print(
            f"{name}: vote-8 {100 * row['criteria']['acc8']:.1f}%  calls to within 1 pt: ours {_pct(a['ours'])} "
            f"oracle {_pct(a['oracle'])} AC {_pct(a['ac'])} ESC {_pct(a['esc'])}  (b) min vs AC "
            f"{_b_summary(b['ac'])['min']:+.2f} vs ESC {_b_summary(b['esc'])['min']:+.2f}  "
            f"(c) {100 * row['criteria']['c']['ours']['hull']:+.2f}  [{ws.seconds:.1f}s]",
            flush=True,
        )
    summary = verdicts(rows)
    command = "python -m benchmarks.adaptive " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        f"# Adaptive stopping of a vote: ours against fixed-n, Adaptive-Consistency, its-hub and ESC\n\n"
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; {time.perf_counter() - started:.0f} s. Reproduce from the repository root: "
        f"`{command.strip()}`.\n\n"
        f"{len(rows)} worlds; per world {args.calibration} calibration questions x {MAX_CALLS} samples (fit: "
        f"`VoteModel.fit`), {args.test} test questions x {MAX_CALLS} recorded answers, every rule replayed on the same "
        f"answers; {args.bootstrap} paired bootstrap resamples of the test questions for the standard errors (the "
        f"calibration set is held fixed). Our call costs: 0 and {len(COSTS) - 1} log-spaced from {COSTS[1]} to "
        f"{COSTS[-1]}; Adaptive-Consistency thresholds: every "
        f"breakpoint of its rule within {MAX_CALLS} answers ({len(ac_thresholds())} values, default {AC_DEFAULT}); "
        f"ESC windows {list(ESC_WINDOWS)} (answers after the last full window are drawn too)."
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = figure(rows, out.with_suffix(".png"))
    md = markdown(rows, summary, header)
    if png is not None:
        md += f"\n\n![accuracy against mean calls per world]({png.name})\n"
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(
        json.dumps({"command": command.strip(), "summary": summary, "worlds": rows}, indent=1, default=float)
    )
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
