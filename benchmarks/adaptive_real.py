"""Deciding per question when a vote has enough answers, on the embedded model (issue 19): our exact stopping rule
against fixed-n self-consistency, Adaptive-Consistency, its-hub's BetaSelfConsistency and ESC, replayed on the same
recorded samples of SmolLM2-135M on Winogrande and ARC-Easy.

    flock /tmp/llm.lock python -m benchmarks.adaptive_real --record    # 200 questions x 8 samples per task (resumes)
    python -m benchmarks.adaptive_real --analyse                       # no LM: replay, cross-fit, bootstrap, report
    flock /tmp/llm.lock python -m benchmarks.adaptive_real --record --limit 10   # a first look (10 questions a task)

Recording: per task, the first ``--n`` questions of ``task.split(0, n, seed=0)``, each answered 8 times by
``MarkovScale(task.program(), max_calls=8, adaptive=False).run_samples([0] * 8, ...)`` (8 independent fresh
samples, temperature 0.7, ``dspy.JSONAdapter``, the llama.cpp server from ``LocalModel(n_parallel=2)``), each graded
by ``task.metric``. One JSON line per question is appended to ``benchmarks/results/adaptive-real-<task>.jsonl`` as
it finishes (question index and id, the 8 normalised answer keys, correctness, errors, seconds, tokens), so an
interrupted run resumes at the next question.

Analysis (``--analyse``, no LM): every question's 8 samples become labels (0 = correct, ``j >= 1`` = its ``j``-th
distinct wrong answer; a failed sample is a wrong answer that agrees with nothing) and every rule is replayed on them
in sample order with ``benchmarks.adaptive``'s replay code (a stopping rule sees only the answers before its
decision, so the replay is exact and the comparison paired). Our rule needs a vote model: 2-fold cross-fitting --
the questions are split in two seeded halves, ``VoteModel.fit`` on one half's graded samples (failed samples left
out, as ``MarkovCalibrator`` leaves them out) decides on the other half, and vice versa, so every question is
decided by a model that never saw it. Standard errors: paired bootstrap over questions (each half resampled
separately, the vote models refitted on every resample, the same resample for every rule).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.adaptive import (
    AC_DEFAULT,
    COSTS,
    ESC_WINDOWS,
    MAX_CALLS,
    Outcome,
    Prefixes,
    _b_summary,
    _point_verdict,
    _se,
    ac_thresholds,
    criteria,
    replay_ac,
    replay_esc,
    replay_fixed,
    replay_ours,
)
from markovscale_dspy.core.stopping import VotePrior
from markovscale_dspy.core.voting import VoteModel

TASKS = ("winogrande", "arc_easy")
N_QUESTIONS = 200
RESULTS = Path("benchmarks/results")
DATE = "2026-12-07"
RULES = ("fixed", "ac", "its_hub", "esc", "ours")
TITLES = {
    "fixed": "fixed n",
    "ac": "Adaptive-Consistency",
    "its_hub": "its-hub Beta SC",
    "esc": "ESC",
    "ours": "ours (cross-fitted)",
}
KNOB = {"fixed": "n", "ac": "threshold", "its_hub": "threshold", "esc": "window", "ours": "call_cost"}


def store_path(task: str, results: Path = RESULTS) -> Path:
    return results / f"adaptive-real-{task}.jsonl"


def load_rows(path: Path) -> dict[int, dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[int(row["index"])] = row
    return rows


# Recording (LM) -------------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def record_task(task_name: str, n: int, limit: int | None, store: Path, concurrency: int) -> dict[str, Any]:
    """Record questions ``0 .. min(n, limit) - 1`` of the task that ``store`` does not hold yet."""
    from markovscale_dspy import MarkovScale
    from markovscale_dspy.integrations.datasets import load_task

    task = load_task(task_name)
    _, examples = task.split(0, n, seed=0)
    done = load_rows(store)
    for i, row in done.items():
        if i < len(examples) and str(row["id"]) != str(examples[i].get("id")):
            raise SystemExit(f"{store}: question {i} is {row['id']!r}, but the split gives {examples[i].get('id')!r}")
    todo = [i for i in range(min(n, limit or n)) if i not in done]
    started = time.perf_counter()
    calls = failed = 0
    store.parent.mkdir(parents=True, exist_ok=True)
    for count, i in enumerate(todo, start=1):
        example = examples[i]
        t0 = time.perf_counter()
        module = MarkovScale(task.program(), max_calls=MAX_CALLS, adaptive=False, concurrency=concurrency)
        chains = module.run_samples([0] * MAX_CALLS, **example.inputs())
        keys, correct, errors, answers, tokens = [], [], [], [], 0
        for chain in chains:
            tokens += int(chain.usage.get("total_tokens") or 0)
            if chain.error is not None:
                keys.append(None)
                correct.append(False)
                errors.append(chain.error)
                answers.append(None)
                continue
            keys.append(_jsonable(chain.prediction.markovscale.trajectory[-1]["answer_key"]))
            try:
                ok, error = bool(task.metric(example, chain.prediction)), None
            except Exception as exc:  # a metric failure is recorded, not fatal
                ok, error = False, f"metric: {exc!r}"
            correct.append(ok)
            errors.append(error)
            answers.append(_jsonable(getattr(chain.prediction, "answer", None)))
        row = {
            "index": i,
            "id": str(example.get("id")),
            "gold": example.answer,
            "keys": keys,
            "correct": correct,
            "errors": errors,
            "answers": answers,
            "seconds": round(time.perf_counter() - t0, 3),
            "tokens": tokens,
            "calls": sum(int(c.usage.get("calls") or 0) for c in chains),
        }
        with store.open("a") as f:
            f.write(json.dumps(row) + "\n")
        calls += MAX_CALLS
        failed += sum(e is not None for e in errors)
        if count % 10 == 0 or count == len(todo):
            elapsed = time.perf_counter() - started
            print(
                f"{task_name}: {count}/{len(todo)} new questions, {calls} samples in {elapsed:.0f} s "
                f"({calls / elapsed:.2f} samples/s), {failed} failed",
                flush=True,
            )
    return {
        "task": task_name,
        "new_questions": len(todo),
        "samples": calls,
        "failed": failed,
        "seconds": time.perf_counter() - started,
    }


def record(args: argparse.Namespace) -> None:
    import dspy

    from markovscale_dspy.integrations.local import LocalModel

    log = Path(args.results) / "adaptive-real-record.log"
    with LocalModel(n_parallel=args.concurrency) as server:
        lm = server.lm(temperature=0.7, max_tokens=256, cache=False)
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter(), warn_on_type_mismatch=False):
            for task in args.tasks:
                stats = record_task(task, args.n, args.limit, store_path(task, Path(args.results)), args.concurrency)
                stats.update(date=time.strftime("%Y-%m-%d %H:%M:%S"), n=args.n, limit=args.limit)
                with log.open("a") as f:
                    f.write(json.dumps(stats) + "\n")
                print(json.dumps(stats), flush=True)


# Analysis (no LM) -----------------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    name: str
    rows: list[dict[str, Any]]
    labels: np.ndarray  # (questions, 8): 0 correct, j >= 1 the j-th distinct wrong answer (failures agree with nothing)
    failed: np.ndarray  # (questions, 8) bool
    graded: list[list[tuple[bool, str]]]  # per question, what a calibration would fit on (failed samples left out)
    inconsistent: int  # questions where one answer key was graded both correct and wrong
    vote8: (
        np.ndarray
    )  # the labels renamed so that 0 is the 8-vote answer: "correct" becomes "agrees with the vote of 8"


def vote8_labels(labels: np.ndarray) -> np.ndarray:
    """Each question's labels renamed so that its 8-vote answer (plurality, ties to the answer seen first) is 0 and
    every other answer keeps a distinct label: replaying a rule on them says whether it returns the 8-vote answer."""
    out = np.zeros_like(labels)
    for q, row in enumerate(labels.tolist()):
        order = list(dict.fromkeys(row))
        counts = [row.count(x) for x in order]
        winner = order[counts.index(max(counts))]
        rename = {x: (0 if x == winner else i + 1) for i, x in enumerate(order)}
        out[q] = [rename[x] for x in row]
    return out


def task_data(name: str, rows: dict[int, dict[str, Any]]) -> TaskData:
    ordered = [rows[i] for i in sorted(rows)]
    labels = np.zeros((len(ordered), MAX_CALLS), dtype=np.int64)
    failed = np.zeros((len(ordered), MAX_CALLS), dtype=bool)
    graded, inconsistent = [], 0
    for q, row in enumerate(ordered):
        wrong: dict[str, int] = {}
        seen: dict[str, bool] = {}
        fresh = 0
        question = []
        for k, (key, ok) in enumerate(zip(row["keys"], row["correct"], strict=True)):
            if key is None:  # the sample failed: a wrong answer shared with no other sample
                failed[q, k] = True
                fresh += 1
                labels[q, k] = 1000 + fresh
                continue
            text = json.dumps(key)
            if seen.setdefault(text, bool(ok)) != bool(ok):
                inconsistent += 1
            question.append((bool(ok), text))
            labels[q, k] = 0 if ok else wrong.setdefault(text, len(wrong) + 1)
        graded.append(question)
    return TaskData(name, ordered, labels, failed, graded, inconsistent, vote8_labels(labels))


def fit(graded: list[list[tuple[bool, str]]]) -> VoteModel:
    return VoteModel.fit(graded, bootstrap=0)


def settings() -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = [("fixed", float(n)) for n in range(1, MAX_CALLS + 1)]
    out += [("ac", t) for t in ac_thresholds()]
    out += [("its_hub", t) for t in ac_thresholds()]
    out += [("esc", float(w)) for w in ESC_WINDOWS]
    out += [("ours", c) for c in COSTS]
    return out


def peer_outcomes(p: Prefixes) -> list[Outcome]:
    out = [replay_fixed(p, n) for n in range(1, MAX_CALLS + 1)]
    out += [replay_ac(p, t) for t in ac_thresholds()]
    out += [replay_ac(p, t, first_check=2) for t in ac_thresholds()]
    out += [replay_esc(p, w) for w in ESC_WINDOWS]
    return out


def folds(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng([seed, 19]).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])


def ours_cross_fitted(
    data: TaskData, halves: tuple[np.ndarray, np.ndarray], fit_on: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[VoteModel]]:
    """Our rule on every question, decided by the model fitted on the other half (``fit_on``: the questions, with
    repeats, each half's model is fitted on; default the halves themselves). Returns ``(calls, correct, agrees
    with the 8-vote answer)`` of shape ``(questions, costs)`` and the two models."""
    n = len(data.labels)
    calls = np.zeros((n, len(COSTS)))
    correct = np.zeros((n, len(COSTS)))
    agree = np.zeros((n, len(COSTS)))
    fit_on = fit_on or halves
    models = []
    for test, train in ((halves[1], fit_on[0]), (halves[0], fit_on[1])):
        model = fit([data.graded[i] for i in train])
        models.append(model)
        prior = VotePrior.from_model(model)
        p, p8 = Prefixes.of(data.labels[test]), Prefixes.of(data.vote8[test])
        for j, c in enumerate(COSTS):
            o, o8 = replay_ours(p, prior, c), replay_ours(p8, prior, c)
            if not np.array_equal(o.calls, o8.calls):
                raise AssertionError("renaming the answers changed our rule's calls")
            calls[test, j], correct[test, j], agree[test, j] = o.calls, o.correct, o8.correct
    return calls, correct, agree, models


def curves_of(calls: np.ndarray, correct: np.ndarray, weights: np.ndarray | None = None) -> dict[str, Any]:
    if weights is None:
        mc, ma = calls.mean(axis=0), correct.mean(axis=0)
    else:
        mc, ma = weights @ calls / weights.sum(), weights @ correct / weights.sum()
    out: dict[str, tuple[list[float], list[float]]] = {}
    for j, (rule, _) in enumerate(settings()):
        xs, ys = out.setdefault(rule, ([], []))
        xs.append(float(mc[j]))
        ys.append(float(ma[j]))
    return {k: (np.asarray(x), np.asarray(y)) for k, (x, y) in out.items()}


def library_check(data: TaskData, halves: tuple[np.ndarray, np.ndarray], costs: tuple[float, ...]) -> dict[str, Any]:
    """The library's own stopper (``refine.adaptive.VoteStopper``, one chain at a time, as ``MarkovScale.replay``
    steps it) on the recorded keys, where a failed sample spends its call and does not vote: calls and correctness
    per question against the vectorised replay (which counts a failure as a lone wrong answer)."""
    from markovscale_dspy.core.voting import plurality_winner
    from markovscale_dspy.refine.adaptive import VoteStopper

    calls_v, correct_v, _, _ = ours_cross_fitted(data, halves)
    out = {}
    for cost in costs:
        j = COSTS.index(cost)
        calls_l = np.zeros(len(data.labels))
        correct_l = np.zeros(len(data.labels))
        for test, train in ((halves[1], halves[0]), (halves[0], halves[1])):
            stopper = VoteStopper(VotePrior.from_model(fit([data.graded[i] for i in train])), MAX_CALLS, cost)
            for q in test:
                row = data.rows[q]
                keys = [None if k is None else json.dumps(k) for k in row["keys"]]
                used = 0
                while batch := stopper.next_batch(keys[:used], 1):
                    used += batch
                winner = plurality_winner(keys[:used])
                calls_l[q] = used
                correct_l[q] = bool(winner is not None and row["correct"][winner])
        out[str(cost)] = {
            "same_calls": int(np.sum(calls_l == calls_v[:, j])),
            "same_correct": int(np.sum(correct_l == correct_v[:, j])),
            "questions": len(calls_l),
            "library_mean_calls": float(calls_l.mean()),
            "library_accuracy": float(correct_l.mean()),
            "replay_mean_calls": float(calls_v[:, j].mean()),
            "replay_accuracy": float(correct_v[:, j].mean()),
        }
    return out


def analyse_task(data: TaskData, *, bootstrap: int, seed: int, fold_seeds: int) -> dict[str, Any]:
    started = time.perf_counter()
    n = len(data.labels)
    halves = folds(n, seed)
    p = Prefixes.of(data.labels)
    peers = peer_outcomes(p)
    peers8 = peer_outcomes(Prefixes.of(data.vote8))
    peer_calls = np.stack([o.calls for o in peers], axis=1).astype(float)
    peer_correct = np.stack([o.correct for o in peers], axis=1).astype(float)
    peer_agree = np.stack([o.correct for o in peers8], axis=1).astype(float)
    if not np.array_equal(peer_calls, np.stack([o.calls for o in peers8], axis=1)):
        raise AssertionError("renaming the answers changed a peer's calls")
    ours_calls, ours_correct, ours_agree, models = ours_cross_fitted(data, halves)
    calls = np.hstack([peer_calls, ours_calls])
    correct = np.hstack([peer_correct, ours_correct])
    agree = np.hstack([peer_agree, ours_agree])
    point = criteria(curves_of(calls, correct))
    cols = settings()
    head = [("ours", 0.0), ("ac", AC_DEFAULT), ("its_hub", AC_DEFAULT)] + [("esc", float(w)) for w in ESC_WINDOWS[1:]]
    head_idx = [cols.index(h) for h in head]

    def headline(c: np.ndarray, a: np.ndarray, g: np.ndarray, w: np.ndarray | None) -> list[dict[str, float]]:
        def mean(x: np.ndarray) -> float:
            return float(x.mean() if w is None else w @ x / w.sum())

        base = head_idx[0]
        return [
            {
                "calls": mean(c[:, j]),
                "accuracy": mean(a[:, j]),
                "agree": mean(g[:, j]),
                "calls_minus_ours": mean(c[:, j] - c[:, base]),
                "accuracy_minus_ours": mean(a[:, j] - a[:, base]),
            }
            for j in head_idx
        ]

    head_point = headline(calls, correct, agree, None)
    head_reps = []

    # Paired bootstrap over questions: each half resampled on its own, both vote models refitted on the resample.
    rng = np.random.default_rng([seed, 77])
    reps, rep_curves = [], []
    for _ in range(bootstrap):
        fit_on = tuple(rng.choice(h, size=len(h), replace=True) for h in halves)
        weights = np.bincount(np.concatenate(fit_on), minlength=n).astype(float)
        oc, oa, og, _ = ours_cross_fitted(data, halves, fit_on)
        c = np.hstack([peer_calls, oc])
        a = np.hstack([peer_correct, oa])
        g = np.hstack([peer_agree, og])
        cur = curves_of(c, a, weights)
        rep_curves.append((cur, curves_of(c, g, weights)))
        reps.append(criteria(cur))
        head_reps.append(headline(c, a, g, weights))
    se: dict[str, Any] = {
        "a": {k: _se([r["a"][k] for r in reps]) for k in point["a"]},
        "a_single": {k: _se([r["a_single"][k] for r in reps]) for k in point["a_single"]},
        "a_minus": {k: _se([r["a"]["ours"] - r["a"][k] for r in reps]) for k in point["a"] if k != "ours"},
        "a_single_minus": {
            k: _se([r["a_single"]["ours"] - r["a_single"][k] for r in reps]) for k in point["a_single"] if k != "ours"
        },
        "c": {k: {s: _se([r["c"][k][s] for r in reps]) for s in ("linear", "hull")} for k in point["c"]},
        "acc1": _se([r["acc1"] for r in reps]),
        "acc8": _se([r["acc8"] for r in reps]),
        "acc8_minus_acc1": _se([r["acc8"] - r["acc1"] for r in reps]),
        "b": {},
    }
    for peer, b in point["b"].items():
        calls_se = [_se([r["b"][peer]["calls"][i] for r in reps]) for i in range(len(b["calls"]))]
        acc_se = [_se([r["b"][peer]["accuracy"][i] for r in reps]) for i in range(len(b["accuracy"]))]
        se["b"][peer] = {"calls": calls_se, "accuracy": acc_se}
        b["verdicts"] = [_point_verdict(*v) for v in zip(b["calls"], calls_se, b["accuracy"], acc_se, strict=True)]
    # SEs of every curve point (calls and accuracy), and of each point's accuracy minus fixed voting (linear) there.
    cur, cur8 = curves_of(calls, correct), curves_of(calls, agree)
    fixed_c, fixed_a = cur["fixed"]
    curve_rows: dict[str, list[dict[str, float]]] = {}
    for rule, (xs, ys) in cur.items():
        knobs = [k for r, k in cols if r == rule]
        rows = []
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            gap = [
                float(rc[rule][1][i] - np.interp(rc[rule][0][i], rc["fixed"][0], rc["fixed"][1]))
                for rc, _ in rep_curves
            ]
            rows.append(
                {
                    "knob": float(knobs[i]),
                    "calls": float(x),
                    "accuracy": float(y),
                    "calls_se": _se([float(rc[rule][0][i]) for rc, _ in rep_curves]),
                    "accuracy_se": _se([float(rc[rule][1][i]) for rc, _ in rep_curves]),
                    "minus_fixed": float(y - np.interp(x, fixed_c, fixed_a)),
                    "minus_fixed_se": _se(gap),
                    "agree": float(cur8[rule][1][i]),
                    "agree_se": _se([float(r8[rule][1][i]) for _, r8 in rep_curves]),
                }
            )
        curve_rows[rule] = rows
    head_rows = [
        {
            "rule": rule,
            "knob": knob,
            **pt,
            **{f"{k}_se": _se([hr[i][k] for hr in head_reps]) for k in pt},
        }
        for i, ((rule, knob), pt) in enumerate(zip(head, head_point, strict=True))
    ]
    # How much the verdicts move with the random split into halves (point estimates, no bootstrap).
    split = []
    for s in range(fold_seeds):
        oc, oa, _, _ = ours_cross_fitted(data, folds(n, 1000 + s))
        crit = criteria(curves_of(np.hstack([peer_calls, oc]), np.hstack([peer_correct, oa])))
        split.append(
            {
                "seed": 1000 + s,
                "a_single": crit["a_single"]["ours"],
                "a": crit["a"]["ours"],
                "c_linear": crit["c"]["ours"]["linear"],
                "b_ac_min": _b_summary({**crit["b"]["ac"], "verdicts": []})["min"],
                "b_esc_min": _b_summary({**crit["b"]["esc"], "verdicts": []})["min"],
            }
        )
    check = library_check(data, halves, (0.0, COSTS[len(COSTS) // 2], COSTS[-1]))
    return {
        "task": data.name,
        "questions": n,
        "samples_failed": int(data.failed.sum()),
        "questions_with_failure": int(data.failed.any(axis=1).sum()),
        "inconsistent_grades": data.inconsistent,
        "record_seconds": float(sum(r.get("seconds", 0.0) for r in data.rows)),
        "record_tokens": int(sum(r.get("tokens", 0) for r in data.rows)),
        "distinct_answers_mean": float(np.mean([len(set(row)) for row in data.labels.tolist()])),
        "fold_seed": seed,
        "models": [
            {"a": m.a, "b": m.b, "distractors": m.distractors, "alpha": m.alpha, "fitted_on": f"half {i + 1}"}
            for i, m in zip((0, 1), models, strict=True)
        ],
        "criteria": point,
        "se": se,
        "curves": curve_rows,
        "headline": head_rows,
        "split_sensitivity": split,
        "library_check": check,
        "bootstrap": bootstrap,
        "seconds": time.perf_counter() - started,
    }


# Reporting ------------------------------------------------------------------------------------------------------------


def _pct(x: float, digits: int = 1) -> str:
    return "not reached" if not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def _pm(x: float, se: float, scale: float = 100.0, digits: int = 1, unit: str = "") -> str:
    if not math.isfinite(x):
        return "not reached"
    if not math.isfinite(se):
        return f"{scale * x:+.{digits}f}{unit}"
    return f"{scale * x:+.{digits}f}{unit} ± {scale * se:.{digits}f}"


def _share(x: float, se: float) -> str:
    return (
        "not reached"
        if not math.isfinite(x)
        else f"{100 * x:.0f}% ± {100 * se:.0f}"
        if math.isfinite(se)
        else (f"{100 * x:.0f}%")
    )


def _collapse(rows: list[dict[str, float]]) -> list[tuple[float, float, dict[str, float]]]:
    """Group knob values with the same (calls, accuracy): ``(first knob, last knob, point)``."""
    groups: list[tuple[float, float, dict[str, float]]] = []
    for r in sorted(rows, key=lambda r: (r["calls"], r["knob"])):
        if groups and abs(groups[-1][2]["calls"] - r["calls"]) < 1e-12 and groups[-1][2]["accuracy"] == r["accuracy"]:
            groups[-1] = (groups[-1][0], r["knob"], groups[-1][2])
        else:
            groups.append((r["knob"], r["knob"], r))
    return groups


def _knob(rule: str, lo: float, hi: float) -> str:
    fmt = (lambda v: f"{v:g}") if rule in ("fixed", "esc") else (lambda v: f"{v:.4g}")
    return fmt(lo) if lo == hi else f"{fmt(lo)}–{fmt(hi)}"


def task_markdown(r: dict[str, Any]) -> list[str]:
    c, se = r["criteria"], r["se"]
    z = 1.96
    lines = [
        f"## {r['task']}: {r['questions']} questions x {MAX_CALLS} samples",
        "",
        f"Failed samples: {r['samples_failed']} of {r['questions'] * MAX_CALLS} (in {r['questions_with_failure']} "
        f"questions); answer keys graded both right and wrong within a question: {r['inconsistent_grades']}; "
        f"distinct answers per question (failures distinct): {r['distinct_answers_mean']:.2f} on average. "
        f"Recording: {r['record_seconds'] / 60:.1f} min of LM time, {r['record_tokens']:,} tokens.",
        "",
        f"- vote of 1: **{_pct(c['acc1'])}** (95% interval {_pct(c['acc1'] - z * se['acc1'])} to "
        f"{_pct(c['acc1'] + z * se['acc1'])}); vote of 8: **{_pct(c['acc8'])}** ({_pct(c['acc8'] - z * se['acc8'])} "
        f"to {_pct(c['acc8'] + z * se['acc8'])}); paired gain of the 8-vote "
        f"{_pm(c['acc8'] - c['acc1'], se['acc8_minus_acc1'])} points (bootstrap SE).",
        "- vote models (`VoteModel.fit` on one half's graded samples, deciding on the other half): "
        + "; ".join(
            f"{m['fitted_on']}: a {m['a']:.2f}, b {m['b']:.2f}, distractors {m['distractors']}, alpha {m['alpha']:.2f}"
            for m in r["models"]
        ),
        "",
        "### Curves (accuracy against mean calls; knob values with identical outcomes merged)",
        "",
        "`− fixed` is the point's accuracy minus fixed voting's at the same mean calls (linear between vote sizes), "
        "paired; `= vote of 8` is the share of questions on which the rule returns the answer the vote of all 8 "
        "samples returns. ± are bootstrap SEs.",
        "",
        "| rule | knob | mean calls | accuracy | − fixed (points) | = vote of 8 |",
        "|---|---|---|---|---|---|",
    ]
    for rule in RULES:
        for lo, hi, p in _collapse(r["curves"][rule]):
            lines.append(
                f"| {TITLES[rule]} | {KNOB[rule]} {_knob(rule, lo, hi)} | {p['calls']:.2f} ± {p['calls_se']:.2f} | "
                f"{100 * p['accuracy']:.1f}% ± {100 * p['accuracy_se']:.1f} | "
                f"{_pm(p['minus_fixed'], p['minus_fixed_se']) if rule != 'fixed' else ''} | "
                f"{100 * p['agree']:.1f}% ± {100 * p['agree_se']:.1f} |"
            )
    lines += [
        "",
        "### Our rule at call_cost 0 against the peers' fixed settings (paired, per question)",
        "",
        "At `call_cost=0` our rule stops only when the remaining samples cannot change the plurality answer, so it "
        "returns the 8-vote answer on every question whatever the vote model (the fit plays no part). `peer − ours`: "
        "paired differences of mean calls and accuracy, ± bootstrap SE.",
        "",
        "| rule | knob | mean calls | peer − ours, calls | accuracy | peer − ours, accuracy (points) | = vote of 8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in r["headline"]:
        ours = h["rule"] == "ours"
        lines.append(
            f"| {TITLES[h['rule']]} | {KNOB[h['rule']]} {h['knob']:g} | {h['calls']:.2f} ± {h['calls_se']:.2f} | "
            f"{'' if ours else _pm(h['calls_minus_ours'], h['calls_minus_ours_se'], scale=1.0, digits=2)} | "
            f"{100 * h['accuracy']:.1f}% ± {100 * h['accuracy_se']:.1f} | "
            f"{'' if ours else _pm(h['accuracy_minus_ours'], h['accuracy_minus_ours_se'])} | "
            f"{100 * h['agree']:.1f}% ± {100 * h['agree_se']:.1f} |"
        )
    lines += [
        "",
        "### The issue's criteria",
        "",
        f"Target for (a): the 8-vote accuracy minus 1 point = {_pct(c['acc8'] - 0.01)}.",
        "",
        "| rule | (a) best single knob, share of 8 calls | (a') along the curve | ours − rule, (a) | ours − rule, (a') "
        "| (c) worst point − fixed, linear | (c) hull |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule in ("ours", "ac", "its_hub", "esc"):
        diff_single = (
            _pm(c["a_single"]["ours"] - c["a_single"][rule], se["a_single_minus"][rule], digits=0)
            if rule != "ours"
            else ""
        )
        diff = _pm(c["a"]["ours"] - c["a"][rule], se["a_minus"][rule], digits=0) if rule != "ours" else ""
        lines.append(
            f"| {TITLES[rule]} | {_share(c['a_single'][rule], se['a_single'][rule])} | "
            f"{_share(c['a'][rule], se['a'][rule])} | {diff_single} | {diff} | "
            f"{_pm(c['c'][rule]['linear'], se['c'][rule]['linear'])} | "
            f"{_pm(c['c'][rule]['hull'], se['c'][rule]['hull'])} |"
        )
    lines += [
        "",
        "(b) For each swept point of the peer above one call: the peer's mean calls minus ours at the same accuracy "
        "(interpolated on our curve; positive = we need fewer), ± bootstrap SE; verdict by 2 SE; `unreached`: the "
        "peer's accuracy is above our curve's highest point (then our accuracy minus the peer's at the peer's calls "
        "is shown). `peer at or below one call`: the peer's accuracy there is no better than a single answer's, which "
        "every rule reaches with one call, so the difference says nothing about stopping.",
        "",
        "| peer | peer knob | peer calls | peer accuracy | peer calls − ours | ours − peer accuracy at its calls | "
        "verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for peer in ("ac", "esc"):
        b, bse = c["b"][peer], se["b"][peer]
        knobs = [row["knob"] for row in r["curves"][peer] if row["calls"] > 1.0 + 1e-9]
        seen = set()
        for i, (pc, pa) in enumerate(b["peer"]):
            if (round(pc, 9), round(pa, 9)) in seen:
                continue
            seen.add((round(pc, 9), round(pa, 9)))
            lines.append(
                f"| {TITLES[peer]} | {_knob(peer, knobs[i], knobs[i])} | {pc:.2f} | {100 * pa:.1f}% | "
                f"{_pm(b['calls'][i], bse['calls'][i], scale=1.0, digits=2)} | "
                f"{_pm(b['accuracy'][i], bse['accuracy'][i])} | {b['verdicts'][i]}"
                f"{' (peer at or below one call)' if pa <= c['acc1'] + 1e-12 else ''} |"
            )
    for peer in ("ac", "esc"):
        w = _b_summary(c["b"][peer])
        lines.append("")
        lines.append(
            f"(b) vs {TITLES[peer]}: {w['points']} points above one call; fewer {w['fewer']}, tie {w['tie']}, more "
            f"{w['more']}, unreached {w['unreached-tie'] + w['unreached-more']} ({w['unreached-more']} beyond 2 SE); "
            f"point estimates: ours fewer at every point: {'yes' if w['all_fewer'] else 'no'}; smallest difference "
            f"{w['min']:+.2f} calls, mean {w['mean']:+.2f}."
        )
    s = r["split_sensitivity"]
    if s:
        a1 = [x["a_single"] for x in s]
        cl = [x["c_linear"] for x in s]
        lines += [
            "",
            f"Other random splits into halves ({len(s)} seeds, point estimates): ours (a) {_pct(min(a1), 0)}–"
            f"{_pct(max(a1), 0)} of 8 calls, (c) worst point {100 * min(cl):+.1f} to {100 * max(cl):+.1f} points.",
        ]
    lines += ["", "Library check (the live `VoteStopper`, one chain at a time, failed samples not voting):", ""]
    for cost, v in r["library_check"].items():
        lines.append(
            f"- call_cost {float(cost):.4g}: same calls on {v['same_calls']}/{v['questions']} questions, same "
            f"correctness on {v['same_correct']}/{v['questions']}; library {v['library_mean_calls']:.2f} calls, "
            f"{_pct(v['library_accuracy'])}; replay {v['replay_mean_calls']:.2f} calls, {_pct(v['replay_accuracy'])}."
        )
    return lines


def figure(results: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 7.5), squeeze=False)
    style = {
        "fixed": ("k", "o"),
        "ac": ("tab:blue", "."),
        "its_hub": ("tab:cyan", "x"),
        "esc": ("tab:green", "s"),
        "ours": ("tab:red", "^"),
    }
    for col, r in enumerate(results):
        for row, (key, label) in enumerate((("accuracy", "accuracy (%)"), ("agree", "returns the 8-vote answer (%)"))):
            ax = axes[row, col]
            for rule, (color, marker) in style.items():
                pts = sorted((p["calls"], p[key]) for p in r["curves"][rule])
                ax.plot(
                    [x for x, _ in pts],
                    [100 * y for _, y in pts],
                    "-",
                    color=color,
                    marker=marker,
                    ms=3,
                    lw=1,
                    label=TITLES[rule],
                )
            if key == "accuracy":
                acc8, se8 = r["criteria"]["acc8"], r["se"]["acc8"]
                ax.axhline(100 * (acc8 - 0.01), color="grey", lw=0.6, ls=":")
                ax.axhspan(100 * (acc8 - 1.96 * se8), 100 * (acc8 + 1.96 * se8), color="grey", alpha=0.1, lw=0)
                ax.set_title(f"{r['task']} ({r['questions']} questions; shaded: 95% interval of vote-8)", fontsize=9)
            ax.set_xlim(0.8, MAX_CALLS + 0.2)
            ax.set_xlabel("mean LM calls per question")
            ax.set_ylabel(label)
            ax.tick_params(labelsize=8)
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def analyse(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    results = []
    for task in args.tasks:
        rows = load_rows(store_path(task, Path(args.results)))
        if not rows:
            print(f"{task}: nothing recorded yet; run with --record", file=sys.stderr)
            continue
        data = task_data(task, rows)
        r = analyse_task(data, bootstrap=args.bootstrap, seed=args.seed, fold_seeds=args.fold_seeds)
        results.append(r)
        c, se = r["criteria"], r["se"]
        print(
            f"{task}: n={r['questions']} vote-1 {_pct(c['acc1'])} ± {100 * se['acc1']:.1f}, vote-8 {_pct(c['acc8'])} ± "
            f"{100 * se['acc8']:.1f}; (a) ours {_share(c['a_single']['ours'], se['a_single']['ours'])} AC "
            f"{_share(c['a_single']['ac'], se['a_single']['ac'])} ESC "
            f"{_share(c['a_single']['esc'], se['a_single']['esc'])}"
            f"; (c) {_pm(c['c']['ours']['linear'], se['c']['ours']['linear'])} [{r['seconds']:.0f} s]",
            flush=True,
        )
    if not results:
        return
    out = Path(args.results) / "adaptive-real"
    log = Path(args.results) / "adaptive-real-record.log"
    sessions = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    wall = sum(s["seconds"] for s in sessions)
    samples = sum(s["samples"] for s in sessions)
    cmd = "python -m benchmarks.adaptive_real"
    header = [
        "# Adaptive stopping of a vote on the embedded model (SmolLM2-135M): ours against fixed-n, "
        "Adaptive-Consistency, its-hub and ESC",
        "",
        f"Recorded and analysed {DATE} on {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; recording wall time {wall / 60:.1f} min for {samples} samples over "
        f"{len(sessions)} sessions ({samples / wall if wall else float('nan'):.2f} samples/s); analysis "
        f"{time.perf_counter() - started:.0f} s. Reproduce from the repository root:",
        "",
        "```bash",
        f"LITELLM_LOCAL_MODEL_COST_MAP=True flock /tmp/llm.lock .venv/bin/{cmd} --record  # resumes from the .jsonl",
        f"LITELLM_LOCAL_MODEL_COST_MAP=True .venv/bin/{cmd} --analyse --bootstrap {args.bootstrap} --seed {args.seed}",
        "```",
        "",
        f"SmolLM2-135M-Instruct (Q4_1) through llama.cpp (`LocalModel(n_parallel=2)`), `dspy.JSONAdapter`, "
        f"temperature 0.7, `task.program()` (`dspy.Predict`, answer a `Literal` option letter); per question "
        f"{MAX_CALLS} independent samples from `MarkovScale(..., adaptive=False).run_samples([0] * 8)`, graded by "
        "`task.metric`; questions `task.split(0, 200, seed=0)`. Raw samples: `adaptive-real-<task>.jsonl`. Every rule "
        "is replayed on the same samples in sample order (paired). A failed sample is a wrong answer that agrees "
        "with nothing. Our rule: 2-fold cross-fitting (vote model fitted on one half's graded samples, deciding on "
        f"the other; fold seed {args.seed}); call costs 0 and {len(COSTS) - 1} log-spaced from {COSTS[1]} to "
        f"{COSTS[-1]}. Adaptive-Consistency / its-hub: every breakpoint of the Beta rule within {MAX_CALLS} answers "
        f"({len(ac_thresholds())} thresholds, default {AC_DEFAULT}); ESC windows {list(ESC_WINDOWS)}. Standard "
        f"errors: {args.bootstrap} paired bootstrap resamples of the questions (each half resampled separately, vote "
        "models refitted on each resample). With 200 questions per task the intervals are wide: an accuracy has a "
        "standard error of about 3.5 points, so differences of a few points between rules are within noise unless "
        "their paired SE says otherwise.",
        "",
    ]
    body = []
    for r in results:
        body += [*task_markdown(r), ""]
    md = "\n".join(header + body)
    png = figure(results, out.with_suffix(".png"))
    if png is not None:
        md += f"\n![accuracy against mean calls]({png.name})\n"
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "command": f"{cmd} --analyse --bootstrap {args.bootstrap} --seed {args.seed}",
                "date": DATE,
                "record_sessions": sessions,
                "tasks": results,
            },
            indent=1,
            default=float,
        )
    )
    print(md)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adaptive_real", description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="record samples with the embedded model (resumes)")
    parser.add_argument("--analyse", action="store_true", help="replay, cross-fit and report (no LM)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--n", type=int, default=N_QUESTIONS, help="questions per task")
    parser.add_argument("--limit", type=int, default=None, help="record only the first LIMIT questions this run")
    parser.add_argument("--concurrency", type=int, default=2, help="llama.cpp slots and sample threads")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="seed of the split into halves and of the bootstrap")
    parser.add_argument("--fold-seeds", type=int, default=10, help="other splits into halves to report the spread of")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    if not (args.record or args.analyse):
        args.record = args.analyse = True
    if args.record:
        record(args)
    if args.analyse:
        analyse(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
