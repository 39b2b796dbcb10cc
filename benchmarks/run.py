"""The project's benchmark run behind BENCHMARKS.md: every method side by side on the simulated presets and the
embedded model, with our own targets checked, in one run.

    python -m benchmarks.run                 # everything (~17 min on 2 cores)
    python -m benchmarks.run --skip-real     # simulated worlds only

Users compare methods on *their* model and task with ``markovscale bench`` instead.
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

from benchmarks.harness import (
    SimulationResult,
    cost_curve,
    decision_seconds,
    fit_seconds,
    run_real,
    run_simulation,
    throughput,
)
from benchmarks.worlds import PRESETS
from markovscale_dspy.core.statistics import paired_difference
from markovscale_dspy.evaluate.compare import frontier_at
from markovscale_dspy.evaluate.evaluation import MethodResult


def _say(text: str = "") -> None:
    print(text, flush=True)


def _table(result: SimulationResult) -> str:
    rows = ["| method | accuracy | 95% CI | LM calls / q | tokens / q | wall s |", "|---|---|---|---|---|---|"]
    for r in result.results:
        lo, hi = r.interval
        tokens = "–" if r.name == "hindsight oracle" else f"{r.mean_tokens:.0f}"
        wall = "–" if r.name == "hindsight oracle" else f"{r.seconds:.1f}"
        rows.append(
            f"| {r.name} | {100 * r.accuracy:.1f}% | {100 * lo:.1f}–{100 * hi:.1f} | {r.mean_calls:.2f} | "
            f"{tokens} | {wall} |"
        )
    return "\n".join(rows)


def _policies(result: SimulationResult) -> list[MethodResult]:
    return [r for r in result.results if r.name in ("closed_form", "belief", "belief + select best")]


def _curve_table(belief: list[MethodResult], oracle: list[MethodResult]) -> str:
    rows = [
        "| round cost | belief accuracy | belief calls / q | oracle accuracy | oracle calls / q |",
        "|---|---|---|---|---|",
    ]
    for b, o in zip(belief, oracle, strict=True):
        rows.append(
            f"| {b.name.split('@')[1]} | {100 * b.accuracy:.1f}% | {b.mean_calls:.2f} | "
            f"{100 * o.accuracy:.1f}% | {o.mean_calls:.2f} |"
        )
    return "\n".join(rows)


def _heterogeneous_targets(
    result: SimulationResult, belief: list[MethodResult], oracle: list[MethodResult]
) -> list[str]:
    best_fixed = max(result.fixed(), key=lambda r: (r.accuracy, -r.mean_calls))
    candidates = [*_policies(result), *belief]
    good = [r for r in candidates if r.accuracy >= best_fixed.accuracy]
    lines = []
    if good:
        best = min(good, key=lambda r: r.mean_calls)
        ratio = best.mean_calls / best_fixed.mean_calls
        lines.append(
            f"- Cheapest MarkovRefine setting at least as accurate as the best fixed N ({best_fixed.name}, "
            f"{100 * best_fixed.accuracy:.1f}% at {best_fixed.mean_calls:.2f} calls): {best.name}, "
            f"{100 * best.accuracy:.1f}% at {best.mean_calls:.2f} calls = {ratio:.0%} of its calls. Target "
            f"≤ 60%: **{'met' if ratio <= 0.6 else 'not met'}**."
        )
    else:
        lines.append(
            f"- No MarkovRefine setting reached the best fixed N ({100 * best_fixed.accuracy:.1f}%). "
            "Target: **not met**."
        )
    curve = sorted(oracle, key=lambda r: r.mean_calls)
    gaps = [(frontier_at(curve, b.mean_calls) - b.accuracy, b) for b in belief]
    gap, point = min(gaps, key=lambda g: g[0])
    lines.append(
        f"- Gap to the parameter oracle at equal calls, along the cost curve: {100 * gap:.1f} points at best "
        f"({point.name}, {point.mean_calls:.2f} calls), "
        f"{100 * max(g for g, _ in gaps):.1f} at worst. Target within 2 points: "
        f"**{'met' if gap <= 0.02 else 'not met'}**."
    )
    return lines


def _real_targets(result: SimulationResult) -> list[str]:
    by = {r.name: r for r in result.results}
    base, fixed3 = by["fixed-0"], by.get("fixed-3")
    lines = []
    for name in ("closed_form", "belief"):
        r = by[name]
        d = paired_difference(r.labels, base.labels)
        share = r.mean_calls / fixed3.mean_calls if fixed3 else float("nan")
        met = d.hi >= 0 and share <= 0.25
        lines.append(
            f"- {name}: {100 * r.accuracy:.1f}% vs no refinement {100 * base.accuracy:.1f}% on the same chains "
            f"(paired difference {100 * d.diff:+.1f}, 95% CI {100 * d.lo:+.1f} to {100 * d.hi:+.1f}, McNemar "
            f"p = {d.p_value:.2g}) at {share:.0%} of fixed-3's calls. Target not below no-refinement at ≤ 25% of "
            f"fixed-3's calls: **{'met' if met else 'not met'}**."
        )
    return lines


def cmd_bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from markovscale_dspy.reporting.plots import calibration_figure, frontier_figure

    stamp = time.strftime("%Y-%m-%d")
    md = [
        f"# markovscale bench — {stamp}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
        f"Command: `python -m benchmarks.run {' '.join(args.argv)}`",
        "",
    ]
    data: dict[str, Any] = {"date": stamp, "simulated": {}, "real": {}, "micro": {}}
    scale = args.scale
    models = []
    with dspy.context(warn_on_type_mismatch=False):
        for preset in [] if args.skip_sim else args.presets:
            started = time.perf_counter()
            n_train, n_test = int(600 * scale), int(1000 * scale)
            result = run_simulation(
                preset,
                n_train=n_train,
                n_test=n_test,
                max_rounds=6,
                round_cost=args.round_cost,
                seed=args.seed,
                num_threads=1,
                include_baselines=True,
            )
            oracle = cost_curve(preset, result.model, "oracle", n_test=n_test, max_rounds=6, seed=args.seed)
            belief = cost_curve(preset, result.model, "belief", n_test=n_test, max_rounds=6, seed=args.seed)
            models.append(result.model)
            png = frontier_figure(
                result.results,
                out / f"sim-{preset}.png",
                title=f"Simulated '{preset}' world: accuracy vs LM calls",
                curves={"belief, round cost 0-0.2": belief, "parameter oracle, round cost 0-0.2": oracle},
            )
            _say(f"\n## simulated: {preset} ({time.perf_counter() - started:.0f} s)\n{_table(result)}")
            _say(_curve_table(belief, oracle))
            md += [
                f"## Simulated world: `{preset}`",
                "",
                f"{n_train} calibration + {n_test} test questions, 6 rounds max, round cost {args.round_cost}; "
                f"components: {PRESETS[preset]}; self-judge TPR 0.8 / FPR 0.3. Calibrated: `{result.model!r}`.",
                "",
                _table(result),
                "",
                "Along the round cost (the user's accuracy-vs-calls knob):",
                "",
                _curve_table(belief, oracle),
                "",
                f"![{preset}]({png.name})",
                "",
            ]
            if preset == "heterogeneous":
                targets = _heterogeneous_targets(result, belief, oracle)
                md += ["Targets:", "", *targets, ""]
                _say("\n".join(targets))
            data["simulated"][preset] = {
                "results": [r.to_dict() for r in result.results],
                "belief_curve": [r.to_dict() for r in belief],
                "oracle_curve": [r.to_dict() for r in oracle],
                "model": result.model.to_dict(),
            }

        if not args.skip_real:
            from markovscale_dspy.integrations.local import LocalModel

            with LocalModel(n_parallel=2) as server:
                lm = server.lm(temperature=0.7, cache=False, num_retries=1)
                for task in args.tasks:
                    started = time.perf_counter()
                    result = run_real(
                        task,
                        lm,
                        n_train=int(args.real_train * scale),
                        n_test=int(args.real_test * scale),
                        max_rounds=3,
                        round_cost=args.round_cost,
                        seed=args.seed,
                        num_threads=args.threads,
                    )
                    models.append(result.model)
                    png = frontier_figure(
                        result.results, out / f"real-{task}.png", title=f"SmolLM2-135M on {task}: accuracy vs LM calls"
                    )
                    calibration = _report_from(result)
                    calib_png = calibration_figure(
                        calibration, out / f"real-{task}-calibration.png", title=f"SmolLM2-135M on {task}: calibration"
                    )
                    _say(f"\n## real: {task} ({time.perf_counter() - started:.0f} s)\n{_table(result)}")
                    targets = _real_targets(result)
                    _say("\n".join(targets))
                    md += [
                        f"## Embedded SmolLM2-135M: `{task}`",
                        "",
                        f"{result.settings['n_train']} calibration + {result.settings['n_test']} held-out "
                        f"questions, 3 rounds max, round cost {args.round_cost}, temperature 0.7, JSON adapter, "
                        f"LiteLLM route. Calibrated: `{result.model!r}`, P(helps) = "
                        f"{result.model.prob_improves():.2f}.",
                        "",
                        _table(result),
                        "",
                        f"![{task}]({png.name}) ![{task} calibration]({calib_png.name})",
                        "",
                        "Targets:",
                        "",
                        *targets,
                        "",
                    ]
                    data["real"][task] = {
                        "results": [r.to_dict() for r in result.results],
                        "model": result.model.to_dict(),
                    }
                if not args.skip_micro:
                    data["micro"]["throughput"] = throughput(lm, n=int(16 * max(scale, 1)), threads=(2, 4))

        if not args.skip_micro:
            model = max(models, key=lambda m: m.mixture is not None, default=None)
            if model is not None:
                data["micro"]["decision_seconds"] = decision_seconds(model)
            data["micro"]["fit_seconds_10k_chains"] = fit_seconds(10_000)
            md += _micro_markdown(data["micro"])
            _say("\n".join(_micro_markdown(data["micro"])))
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "results.md").write_text("\n".join(md))
    _say(f"\nWrote {out / 'results.md'}, {out / 'results.json'} and the figures in {out}.")
    return 0


def _report_from(result: SimulationResult) -> Any:
    from markovscale_dspy.calibrate.report import CalibrationReport

    data = dict(result.settings["calibration"])
    return CalibrationReport(**data)


def _micro_markdown(micro: dict[str, Any]) -> list[str]:
    lines = ["## Overhead and threads", ""]
    call = None
    if "throughput" in micro:
        runs = micro["throughput"]
        seq = (runs["sequential"]["calls_per_s"] + runs.get("sequential again", runs["sequential"])["calls_per_s"]) / 2
        call = 1.0 / seq
        lines += [
            "| calibration against the local server | LM calls | seconds | calls / s | vs sequential (mean of 2) |",
            "|---|---|---|---|---|",
        ]
        for name, row in micro["throughput"].items():
            lines.append(
                f"| {name} | {row['calls']} | {row['seconds']:.1f} | {row['calls_per_s']:.2f} | "
                f"{row['calls_per_s'] / seq:.2f}x |"
            )
        best = max((row["calls_per_s"] / seq, name) for name, row in micro["throughput"].items() if "thread" in name)
        lines += [
            "",
            f"Threaded calibration: best {best[0]:.2f}x sequential ({best[1]}). Target ≥ 1.3x: "
            f"**{'met' if best[0] >= 1.3 else 'not met'}**.",
            "",
        ]
    if "decision_seconds" in micro:
        for name, seconds in micro["decision_seconds"].items():
            share = f" = {seconds / call:.3%} of one local LM call ({call:.2f} s)" if call else ""
            verdict = f" Target < 1%: **{'met' if seconds / call < 0.01 else 'not met'}**." if call else ""
            lines.append(f"- One `{name}` stop decision: {1e3 * seconds:.3f} ms{share}.{verdict}")
    fit = micro.get("fit_seconds_10k_chains")
    if fit:
        lines.append(
            f"- Fitting 10,000 chains: {fit['chain']:.2f} s for the chain, {fit['question_types']:.2f} s "
            "for question types (EM, chosen by 5-fold held-out likelihood)."
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    bench = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    bench.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    bench.add_argument("--tasks", nargs="+", default=["winogrande", "arc_easy"], help="real tasks (embedded model)")
    bench.add_argument("--scale", type=float, default=1.0, help="multiply every sample size (default 1)")
    bench.add_argument("--real-train", type=int, default=60, help="calibration questions per real task")
    bench.add_argument("--real-test", type=int, default=40, help="held-out questions per real task")
    bench.add_argument("--round-cost", type=float, default=0.01)
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--out", default="bench-out")
    bench.add_argument("--skip-sim", action="store_true")
    bench.add_argument("--skip-real", action="store_true")
    bench.add_argument("--skip-micro", action="store_true")
    args = bench.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return cmd_bench(args)


if __name__ == "__main__":
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    sys.exit(main())
