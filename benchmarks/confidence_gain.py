"""The belief policy's gain from answer confidence as a function of how informative it is (BENCHMARKS.md).

    python -m benchmarks.confidence_gain                      # ~12 min on 2 cores

The heterogeneous preset (fixable, stable and fragile questions) with a simulated confidence of AUROC 0.5-0.9,
emitted through token log-probabilities as a real server's; 400 calibration and 1500 test questions, 4 rounds.
The answers are the same at every AUROC (confidence is drawn from its own random stream), so every row is paired
with the no-confidence row and the parameter oracle.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.harness import world_study
from benchmarks.worlds import preset_world

AUROCS = (0.5, 0.6, 0.7, 0.8, 0.9)
COSTS = (0.01, 0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.confidence_gain", description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=1500)
    args = parser.parse_args(argv)
    rows = []
    baseline = {}
    oracle = {}
    for auroc in (None, *AUROCS):
        train = preset_world("heterogeneous", args.train, seed=20, confidence_auroc=auroc)
        test = preset_world("heterogeneous", args.test, seed=21, confidence_auroc=auroc)
        for select in ("last", "best"):
            study = world_study(train, test, costs=COSTS, select=select, logprobs=auroc is not None, oracle=not oracle)
            oracle = oracle or study.oracle
            if auroc is None:
                baseline[select] = study
            for cost in COSTS:
                r, base, o = study.policy[cost], baseline[select].policy[cost], oracle[cost]
                closure = (r.accuracy - base.accuracy) / (o.accuracy - base.accuracy)
                kept = study.model.confidence is not None
                rows.append(
                    f"| {'none' if auroc is None else auroc} | {select} | {cost:g} | {100 * r.accuracy:.1f}% | "
                    f"{r.mean_calls:.2f} | {100 * (r.accuracy - base.accuracy):+.1f} | "
                    f"{'–' if auroc is None else f'{closure:.0%}'} | {'yes' if kept else 'no'} |"
                )
                print(rows[-1], flush=True)
    best_fixed = max(baseline["last"].fixed, key=lambda r: r.accuracy)
    lines = [
        f"Best fixed N: {best_fixed.name}, {100 * best_fixed.accuracy:.1f}% at {best_fixed.mean_calls:.2f} calls. "
        "Parameter oracle: "
        + ", ".join(f"cost {c:g}: {100 * o.accuracy:.1f}% at {o.mean_calls:.2f} calls" for c, o in oracle.items())
        + ".",
        "",
        "| confidence AUROC | select | round cost | belief accuracy | LM calls / q | vs no confidence (points) | "
        "share of the gap to the oracle closed | confidence kept by the fit |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
