"""Stopping on worlds nobody tuned for: the belief policy on heterogeneous worlds drawn at random (BENCHMARKS.md).

    python -m benchmarks.random_worlds --worlds 30            # ~25 s per world on 2 cores
    python -m benchmarks.random_worlds --worlds 30 --select best

Every world draws 2-4 kinds of questions (random chains and answer stickiness) and every question its own
parameters around its kind's (:func:`benchmarks.worlds.random_world`); 400 calibration and 800 test questions,
4 rounds. For each round cost it reports belief against the fixed-N frontier at belief's own calls, the parameter
oracle, and whether a lower cost bought lower accuracy (one-sided exact McNemar test on the test questions).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import paired_drop, world_study
from benchmarks.worlds import random_kinds, random_world

COSTS = (0.0, 0.01, 0.02, 0.05)


def run(
    worlds: range,
    *,
    select: str,
    n_train: int,
    n_test: int,
    confidence_auroc: float | None,
    store: Path | None = None,
) -> list[dict]:
    """One row per world; with ``store`` (JSON lines) rows are appended as worlds finish and reused on a re-run."""
    done = {}
    if store is not None and store.exists():
        done = {row["world"]: row for row in map(json.loads, store.read_text().splitlines())}
    rows = []
    for seed in worlds:
        if seed in done:
            rows.append(done[seed])
            continue
        started = time.perf_counter()
        kinds = random_kinds(seed)
        train = random_world(kinds, n_train, seed=2 * seed, confidence_auroc=confidence_auroc)
        test = random_world(kinds, n_test, seed=2 * seed + 1, confidence_auroc=confidence_auroc)
        study = world_study(train, test, costs=COSTS, select=select, logprobs=confidence_auroc is not None)
        pairs = [(a, b) for i, a in enumerate(COSTS) for b in COSTS[i + 1 :]]
        drops = [(a, b, *paired_drop(study.policy[a], study.policy[b])) for a, b in pairs]
        worst = min(drops, key=lambda d: d[4])
        rows.append(
            {
                "world": seed,
                "kinds": len(kinds),
                "types": study.model.mixture.components if study.model.mixture is not None else 1,
                "fixed": [r.accuracy for r in study.fixed],
                "belief": {c: (r.accuracy, r.mean_calls) for c, r in study.policy.items()},
                "oracle": {c: (r.accuracy, r.mean_calls) for c, r in study.oracle.items()},
                "frontier_gap": {c: study.frontier_gap(c) for c in COSTS},
                "oracle_gap": {c: study.oracle_gap(c) for c in COSTS},
                "worst_drop": {"lower": worst[0], "higher": worst[1], "diff": worst[2], "n": worst[3], "p": worst[4]},
                "seconds": time.perf_counter() - started,
            }
        )
        rows[-1] = json.loads(json.dumps(rows[-1], default=float))  # the same types as when read back
        if store is not None:
            with store.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        print(_line(rows[-1]), flush=True)
    return rows


def _by_cost(mapping: dict) -> dict[float, object]:
    return {float(c): v for c, v in mapping.items()}


def _line(row: dict) -> str:
    gap = _by_cost(row["frontier_gap"])
    cells = " ".join(
        f"[{c:g}: {100 * a:.1f}% @ {n:.2f}, {100 * gap[c]:+.1f}]" for c, (a, n) in _by_cost(row["belief"]).items()
    )
    d = row["worst_drop"]
    return (
        f"world {row['world']} ({row['kinds']} kinds, {row['types']} types) {cells} | worst cost pair "
        f"{d['lower']:g}<{d['higher']:g}: {100 * d['diff']:+.1f} (n={d['n']}, p={d['p']:.2g}) {row['seconds']:.0f}s"
    )


def markdown(rows: list[dict]) -> str:
    header = "| world | kinds / fitted types | best fixed-N | " + " | ".join(f"cost {c:g}" for c in COSTS) + " |"
    lines = [header, "|" + "---|" * (3 + len(COSTS))]
    for row in rows:
        gap, oracle_gap = _by_cost(row["frontier_gap"]), _by_cost(row["oracle_gap"])
        cells = [
            f"{100 * a:.1f}% @ {n:.2f} ({100 * gap[c]:+.1f} / {100 * oracle_gap[c]:+.1f})"
            for c, (a, n) in _by_cost(row["belief"]).items()
        ]
        lines.append(
            f"| {row['world']} | {row['kinds']} / {row['types']} | {100 * max(row['fixed']):.1f}% | "
            + " | ".join(cells)
            + " |"
        )
    gaps = np.array([_by_cost(row["frontier_gap"])[c] for row in rows for c in COSTS])
    oracle = np.array([_by_cost(row["oracle_gap"])[c] for row in rows for c in COSTS])
    tests = len(rows) * len(COSTS) * (len(COSTS) - 1) // 2
    alpha = 0.05 / tests
    flagged = [row for row in rows if row["worst_drop"]["p"] < alpha]
    below = [(row["world"], c) for row in rows for c in COSTS if _by_cost(row["frontier_gap"])[c] < -0.01]
    lines += [
        "",
        "Cells: belief accuracy @ LM calls per question (points over the fixed-N frontier at those calls / points "
        "behind the parameter oracle at the same cost).",
        "",
        f"- belief minus the fixed-N frontier at its own calls: mean {100 * gaps.mean():+.1f} points, "
        f"min {100 * gaps.min():+.1f}; more than 1 point below it: {len(below)} of {gaps.size} (world, cost) cells"
        + (f" {below}" if below else ""),
        f"- parameter oracle minus belief at the same cost: mean {100 * oracle.mean():+.1f} points, "
        f"median {100 * np.median(oracle):+.1f}, range {100 * oracle.min():+.1f} to {100 * oracle.max():+.1f}",
        f"- a lower round cost buying lower accuracy beyond noise (one-sided exact McNemar, Bonferroni over "
        f"{tests} cost pairs, family-wise 5%): {len(flagged)} world(s)"
        + "".join(
            f"; world {r['world']}: cost {r['worst_drop']['lower']:g} vs {r['worst_drop']['higher']:g} "
            f"{100 * r['worst_drop']['diff']:+.1f} points, p = {r['worst_drop']['p']:.2g}"
            for r in flagged
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.random_worlds", description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, default=30, help="number of worlds (seeds 0..N-1)")
    parser.add_argument("--first", type=int, default=0, help="first world seed")
    parser.add_argument("--select", choices=("last", "best"), default="last")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=800)
    parser.add_argument("--confidence-auroc", type=float, default=None)
    parser.add_argument("--out", default=None, help="JSON-lines file of the rows (resumed when it exists)")
    args = parser.parse_args(argv)
    rows = run(
        range(args.first, args.first + args.worlds),
        select=args.select,
        n_train=args.train,
        n_test=args.test,
        confidence_auroc=args.confidence_auroc,
        store=Path(args.out) if args.out else None,
    )
    print()
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
