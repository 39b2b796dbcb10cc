"""Issue 12: stopping that generalises -- the belief policy on heterogeneous worlds drawn at random.

Nothing here is tuned to a preset: every world draws 2-4 kinds of questions with random chains and answer stickiness
(:func:`benchmarks.worlds.random_kinds`), and every question draws its own parameters from continuous laws around its
kind's (:func:`benchmarks.worlds.random_world`), so no finite set of question types fits a world exactly.
"""

import numpy as np
import pytest

from benchmarks.harness import paired_drop, world_study
from benchmarks.worlds import random_kinds, random_world

COSTS = (0.0, 0.01, 0.02, 0.05)


def study(seed, n_train=400, n_test=800, costs=COSTS, **kwargs):
    kinds = random_kinds(seed)
    train = random_world(kinds, n_train, seed=2 * seed)
    test = random_world(kinds, n_test, seed=2 * seed + 1)
    return world_study(train, test, rounds=4, costs=costs, **kwargs)


def describe(seed, result):
    fixed = " ".join(f"{r.accuracy:.3f}" for r in result.fixed)
    lines = [f"world {seed}: {result.model!r}", f"  fixed-N (N = 0..4): {fixed}"]
    for cost, r in result.policy.items():
        o = result.oracle[cost]
        lines.append(
            f"  cost {cost:<4g}: belief {r.accuracy:.3f} at {r.mean_calls:.2f} calls, "
            f"{100 * result.frontier_gap(cost):+.1f} points over the fixed-N frontier at its calls; "
            f"parameter oracle {o.accuracy:.3f} at {o.mean_calls:.2f} calls ({100 * result.oracle_gap(cost):+.1f})"
        )
    return "\n".join(lines)


@pytest.mark.slow
def test_smoke_random_world_runs_and_rounds_shrink_with_cost():
    """Fast version: one small world. Exact property checked: for every question, a higher round cost never runs
    more rounds (the expectimax value of another round falls with its cost, on the same observations)."""
    result = study(3, n_train=150, n_test=150, costs=(0.0, 0.02, 0.1))
    print("\n" + describe(3, result))
    low, mid, high = (result.policy[c] for c in (0.0, 0.02, 0.1))
    assert low.n == mid.n == high.n == 150
    assert low.calls >= mid.calls >= high.calls
    assert all(1 <= r.mean_calls <= 5 for r in (low, mid, high))


@pytest.mark.slow
def test_belief_generalises_to_random_heterogeneous_worlds():
    """Six random worlds, 400 calibration / 800 test questions, 4 rounds, round costs 0, 0.01, 0.02, 0.05:

    * on every world and cost, belief is never more than 1 point below the fixed-N frontier at its own calls;
    * a lower round cost never buys lower accuracy beyond noise: one-sided exact McNemar test on the questions the
      two costs disagree on, Bonferroni-corrected over every (world, pair of costs) at a family-wise 5%;
    * on average over worlds and costs, belief beats the frontier by at least 3 points.

    The gap to the parameter oracle (which knows every question's own chain) is printed per world and cost.
    """
    worlds = range(6)
    results = [study(seed) for seed in worlds]
    pairs = [(a, b) for i, a in enumerate(COSTS) for b in COSTS[i + 1 :]]
    alpha = 0.05 / (len(results) * len(pairs))
    gaps, oracle_gaps, failures = [], [], []
    for seed, result in zip(worlds, results, strict=True):
        print("\n" + describe(seed, result))
        for cost in COSTS:
            gaps.append(result.frontier_gap(cost))
            oracle_gaps.append(result.oracle_gap(cost))
            if result.frontier_gap(cost) < -0.01:
                failures.append(f"world {seed}, cost {cost}: {100 * result.frontier_gap(cost):+.1f} vs the frontier")
        for lower, higher in pairs:
            diff, discordant, p = paired_drop(result.policy[lower], result.policy[higher])
            if p < alpha:
                failures.append(
                    f"world {seed}: cost {lower} is {100 * diff:+.1f} points vs cost {higher} "
                    f"({discordant} discordant questions, p = {p:.2g} < {alpha:.2g})"
                )
    print(
        f"\nbelief - fixed-N frontier at its calls: mean {100 * np.mean(gaps):+.1f} points, min "
        f"{100 * np.min(gaps):+.1f}; parameter oracle - belief at the same cost: mean "
        f"{100 * np.mean(oracle_gaps):+.1f}, range {100 * np.min(oracle_gaps):+.1f} to {100 * np.max(oracle_gaps):+.1f}"
    )
    assert not failures, "\n".join(failures)
    assert np.mean(gaps) >= 0.03
