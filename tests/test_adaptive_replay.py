"""The adaptive vote on simulated worlds (benchmarks/adaptive.py's replay): never more than 1 point below fixed voting
at its own mean calls, and the vectorised replay is exactly ``should_stop``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.adaptive import (
    MAX_CALLS,
    Prefixes,
    concave_hull,
    fit_model,
    random_vote_components,
    record,
    replay_fixed,
    replay_ours,
)
from markovscale_dspy.core.stopping import VotePrior, should_stop
from markovscale_dspy.testing import SimulatedWorld

COSTS = (0.0, 0.001, 0.003, 0.01, 0.02, 0.05)


@pytest.fixture(scope="module", params=[101, 202, 303])
def world(request):
    seed = request.param
    components = random_vote_components(seed)
    calibration = record(SimulatedWorld.mixture(200, components, seed=seed), MAX_CALLS, seed=seed)
    test = record(SimulatedWorld.mixture(1500, components, seed=seed + 1), MAX_CALLS, seed=seed + 1)
    return VotePrior.from_model(fit_model(calibration)), Prefixes.of(test)


def test_never_more_than_one_point_below_fixed_voting_at_its_own_calls(world):
    prior, prefixes = world
    fixed = [replay_fixed(prefixes, n).correct.astype(float) for n in range(1, MAX_CALLS + 1)]
    hx, _ = concave_hull(np.arange(1.0, MAX_CALLS + 1), np.array([f.mean() for f in fixed]))
    for cost in COSTS:
        ours = replay_ours(prefixes, prior, cost)
        x = float(ours.calls.mean())
        # Fixed voting at x calls: the hull's segment around x, i.e. vote sizes lo and hi mixed at random.
        i = min(int(np.searchsorted(hx, x, side="right")) - 1, len(hx) - 2)
        lo, hi = int(hx[i]), int(hx[i + 1])
        f = min(max((x - lo) / (hi - lo), 0.0), 1.0)
        diff = ours.correct - ((1 - f) * fixed[lo - 1] + f * fixed[hi - 1])  # paired, per question
        se = diff.std(ddof=1) / math.sqrt(diff.size)
        assert diff.mean() > -0.01 - 3 * se, (cost, x, diff.mean(), se)


def test_the_vectorised_replay_is_should_stop(world):
    prior, prefixes = world
    for cost in (0.0, 0.004, 0.03):
        outcome = replay_ours(prefixes, prior, cost)
        for q in range(0, len(prefixes.labels), 15):
            row = prefixes.labels[q].tolist()
            for k in range(1, MAX_CALLS + 1):
                counts = list(dict.fromkeys(row[:k]))
                counts = [row[:k].count(x) for x in counts]
                if should_stop(prior, counts, k, MAX_CALLS, cost)[0]:
                    break
            assert outcome.calls[q] == k, (q, cost, row)
