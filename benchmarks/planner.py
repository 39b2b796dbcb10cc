"""The planner's benchmark behind BENCHMARKS.md ("MarkovScale: the planner"): what MarkovScale chooses, what every
strategy was predicted to score and what it scored, on simulated worlds and on the embedded model.

    python -m benchmarks.planner --skip-real                       # simulated worlds only
    flock /tmp/llm.lock python -m benchmarks.planner --skip-sim --port 18431   # the embedded model (llama.cpp)

Writes ``planner.md`` (tables), ``planner.json`` (raw numbers) and one predicted-vs-observed figure per world or
task into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import dspy

from benchmarks.harness import run_planner, run_real_planner
from benchmarks.worlds import PLANNER_PRESETS, PRESETS
from markovscale_dspy import TransitionModel
from markovscale_dspy.evaluate.compare import ComparisonResult

#: (world, call budget, budgets the baselines run at): the comparisons BENCHMARKS.md reports.
SIMULATED = (
    ("hurts", 3, (3,)),
    ("realistic-hurts", 8, (3, 8)),
    ("realistic-helps", 8, (8,)),
    ("realistic-both", 8, (8,)),
    ("realistic-mixed", 8, (8,)),
)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def strategy_table(result: ComparisonResult) -> str:
    """Every strategy the planner considered: predicted (with the predictive interval for this many questions)
    against observed."""
    observed = {r.name: r for r in result.strategies}
    rows = [
        "| strategy | LM calls / q | predicted | 95% interval (expected) | 95% interval (these questions) | observed "
        "| 95% CI | P(beats single) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in result.plan.predictions:
        o = observed[p.name]
        lo, hi = p.predictive_interval(o.n)
        inside = "" if lo <= o.accuracy <= hi else " (outside)"
        mark = " **(chosen)**" if p.strategy == result.plan.chosen.strategy else ""
        prob = "–" if p.prob_gain is None else f"{p.prob_gain:.2f}"
        olo, ohi = o.interval
        rows.append(
            f"| {p.name}{mark} | {o.mean_calls:.2f} | {_pct(p.accuracy)} | {_pct(p.interval[0])}–{_pct(p.interval[1])} "
            f"| {_pct(lo)}–{_pct(hi)} | {_pct(o.accuracy)}{inside} | {_pct(olo)}–{_pct(ohi)} | {prob} |"
        )
    return "\n".join(rows)


def methods_table(result: ComparisonResult) -> str:
    rows = ["| method | accuracy | 95% CI | LM calls / q | tokens / q |", "|---|---|---|---|---|"]
    for r in result.results:
        lo, hi = r.interval
        rows.append(
            f"| {r.name} | {_pct(r.accuracy)} | {_pct(lo)}–{_pct(hi)} | {r.mean_calls:.2f} | {r.mean_tokens:.0f} |"
        )
    return "\n".join(rows)


def _section(title: str, result: ComparisonResult, png: Path | None, intro: str) -> list[str]:
    out = [f"### {title}", "", intro, "", f"Calibrated: `{result.model!r}`.", "", result.plan.describe(), ""]
    out += [methods_table(result), "", strategy_table(result), ""]
    if png is not None:
        out += [f"![{title}]({png.name})", ""]
    return out


def _figure(result: ComparisonResult, path: Path, title: str) -> Path | None:
    try:
        from markovscale_dspy.reporting.plots import strategy_figure

        return strategy_figure(result.plan, path, observed=result.strategies, title=title)
    except Exception as exc:  # no matplotlib: tables only
        _say(f"  (no figure: {exc})")
        return None


def model_summary(model: TransitionModel) -> dict[str, Any]:
    """The fitted numbers of a model (not its data: the calibration questions and bootstrap refits stay out)."""
    out: dict[str, Any] = {"repr": repr(model), "p0": model.p0, "p_cw": model.p_cw, "p_wc": model.p_wc}
    votes = model.votes
    if votes is not None:
        out["votes"] = {
            "mean_accuracy": votes.mean_accuracy,
            "accuracy_sd": votes.accuracy_sd,
            "a": votes.a,
            "b": votes.b,
            "distractors": votes.distractors,
            "alpha": votes.alpha,
            "wrong_agreement": votes.agreement,
            "questions": len(votes.questions),
        }
    return out


def _aggregate(result: Any) -> dict[str, Any]:
    """A method's numbers without its per-question labels (the run reproduces them)."""
    return {k: v for k, v in result.to_dict().items() if k not in ("labels", "errors")}


def _record(result: ComparisonResult) -> dict[str, Any]:
    return {
        "model": model_summary(result.model),
        "plan": result.plan.to_dict(),
        "methods": [_aggregate(r) for r in result.results],
        "strategies": [_aggregate(r) for r in result.strategies],
        "settings": {k: v for k, v in result.settings.items() if k != "calibration"},
        "world": result.world,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.planner", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/planner")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the simulated sample sizes")
    parser.add_argument("--tasks", nargs="+", default=["winogrande", "arc_easy"])
    parser.add_argument("--real-train", type=int, default=80)
    parser.add_argument("--real-test", type=int, default=60)
    parser.add_argument("--real-baselines", action="store_true", help="also MarkovRefine and dspy.BestOfN (slow)")
    parser.add_argument(
        "--port", type=int, help="fixed port of the embedded model, so an interrupted run resumes its calibration"
    )
    parser.add_argument("--real-max-calls", type=int, default=4)
    parser.add_argument("--real-samples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-sim", action="store_true")
    parser.add_argument("--skip-real", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.planner " + " ".join(sys.argv[1:] if argv is None else argv)
    md = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; command: `{command}`.",
        "",
    ]
    data: dict[str, Any] = {"simulated": {}, "real": {}}
    with dspy.context(warn_on_type_mismatch=False):
        for preset, budget, baselines_at in [] if args.skip_sim else SIMULATED:
            started = time.perf_counter()
            n_train, n_test = int(600 * args.scale), int(1000 * args.scale)
            result = run_planner(
                preset, n_train=n_train, n_test=n_test, max_calls=budget, seed=args.seed, baselines_at=baselines_at
            )
            name = f"sim-{preset}-{budget}"
            png = _figure(result, out / f"{name}.png", f"Simulated '{preset}', up to {budget} calls")
            components = {**PRESETS, **PLANNER_PRESETS}[preset]
            intro = (
                f"{n_train} calibration questions (round 0 + {budget - 1} rounds, 8 samples each) + {n_test} test "
                f"questions, budget {budget} calls; components: `{components}`; self-judge TPR 0.8 / FPR 0.3."
            )
            md += _section(f"Simulated `{preset}`, budget {budget}", result, png, intro)
            data["simulated"][name] = _record(result)
            _say(f"\n## {name} ({time.perf_counter() - started:.0f} s)")
            _say(methods_table(result) + "\n" + strategy_table(result))
        if not args.skip_real:
            from markovscale_dspy.integrations.local import LocalModel

            with LocalModel(n_parallel=args.threads, port=args.port) as server:
                lm = server.lm(temperature=0.7, cache=False, num_retries=1)
                for task in args.tasks:
                    started = time.perf_counter()
                    result = run_real_planner(
                        task,
                        lm,
                        n_train=args.real_train,
                        n_test=args.real_test,
                        max_calls=args.real_max_calls,
                        parallel_samples=args.real_samples,
                        seed=args.seed,
                        num_threads=args.threads,
                        baselines=args.real_baselines,
                    )
                    name = f"real-{task}"
                    png = _figure(
                        result, out / f"{name}.png", f"SmolLM2-135M on {task}, up to {args.real_max_calls} calls"
                    )
                    seconds = time.perf_counter() - started
                    intro = (
                        f"{args.real_train} calibration questions (round 0 + {args.real_max_calls - 1} rounds, "
                        f"{args.real_samples} samples each) + {args.real_test} held-out questions, budget "
                        f"{args.real_max_calls} calls, temperature 0.7, JSON adapter; {seconds:.0f} s."
                    )
                    md += _section(f"Embedded SmolLM2-135M: `{task}`", result, png, intro)
                    data["real"][name] = _record(result)
                    _say(f"\n## {name} ({time.perf_counter() - started:.0f} s)\n{methods_table(result)}")
                    _say(strategy_table(result))
    (out / "planner.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "planner.md").write_text("\n".join(md))
    _say(f"\nWrote {out / 'planner.md'}, {out / 'planner.json'} and the figures.")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    sys.exit(main())
