"""theory: closed forms against Monte-Carlo simulation, optimal_rounds against brute force, input checks."""

import math

import numpy as np
import pytest

from markovscale_dspy.core import theory

# (p0, p_cw, p_wc): improving, degrading, neutral, frozen, oscillating, re-sampling (lam = 0), absorbing.
GRID = [
    (0.4, 0.1, 0.3),
    (0.7, 0.3, 0.1),
    (0.25, 0.3, 0.1),
    (0.6, 0.0, 0.0),
    (0.2, 0.8, 0.7),
    (0.9, 0.95, 0.9),
    (0.5, 0.6, 0.4),
    (0.3, 0.0, 0.2),
    (1.0, 0.2, 0.0),
]
N_CHAINS = 100_000
ROUNDS = 8


def simulate(p0, p_cw, p_wc, rng):
    state = rng.random(N_CHAINS) < p0
    acc = [state.mean()]
    for _ in range(ROUNDS):
        u = rng.random(N_CHAINS)
        state = np.where(state, u >= p_cw, u < p_wc)
        acc.append(state.mean())
    return np.array(acc)


@pytest.mark.parametrize("p0,p_cw,p_wc", GRID)
def test_accuracy_at_matches_monte_carlo(p0, p_cw, p_wc):
    observed = simulate(p0, p_cw, p_wc, np.random.default_rng(7))
    predicted = theory.accuracy_at(np.arange(ROUNDS + 1), p0, p_cw, p_wc)
    se = np.sqrt(np.maximum(predicted * (1 - predicted), 1e-12) / N_CHAINS)
    z = np.abs(observed - predicted) / se
    print(f"max |z| = {z.max():.2f} for {(p0, p_cw, p_wc)}")
    assert np.all(np.abs(observed - predicted) <= 4 * se + 1e-12)


def closed_form(t, p0, p_cw, p_wc):
    """The paper's closed form written out: pi + (p0 - pi) * (1 - p_cw - p_wc) ** t, pi = p_wc / (p_cw + p_wc)."""
    pi = p_wc / (p_cw + p_wc)
    return pi + (p0 - pi) * (1 - p_cw - p_wc) ** t


def test_accuracy_at_scalar_returns_float():
    value = theory.accuracy_at(3, 0.4, 0.1, 0.3)
    assert type(value) is float and value == pytest.approx(0.75 - 0.35 * 0.6**3, abs=1e-15)


def test_accuracy_at_broadcasts_over_arrays():
    t = np.array([[0, 1], [2, 3]])
    got = theory.accuracy_at(t, 0.4, 0.1, 0.3)
    assert got.shape == (2, 2)
    assert got == pytest.approx(closed_form(t, 0.4, 0.1, 0.3), abs=1e-15)


def test_accuracy_at_round_zero_is_p0():
    assert theory.accuracy_at(0, 0.37, 0.2, 0.6) == 0.37


def test_accuracy_at_frozen_chain_stays_at_p0():
    assert theory.accuracy_at(5, 0.6, 0.0, 0.0) == 0.6


def test_oscillating_chain_overshoots_at_round_one():
    p0, p_cw, p_wc = 0.2, 0.8, 0.7
    pi = theory.stationary_accuracy(p_cw, p_wc)
    assert theory.accuracy_at(1, p0, p_cw, p_wc) > pi > theory.accuracy_at(2, p0, p_cw, p_wc)


def test_stationary_accuracy():
    assert theory.stationary_accuracy(0.1, 0.3) == pytest.approx(0.75)


def test_stationary_accuracy_of_frozen_chain_raises():
    with pytest.raises(ValueError, match="frozen"):
        theory.stationary_accuracy(0.0, 0.0)


def test_convergence_rate():
    assert theory.convergence_rate(0.8, 0.7) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "p0,p_cw,p_wc,expected",
    [
        (0.4, 0.1, 0.3, "improving"),
        (0.8, 0.1, 0.3, "degrading"),
        (0.75, 0.1, 0.3, "neutral"),
        (0.5, 0.0, 0.0, "neutral"),
    ],
)
def test_regime(p0, p_cw, p_wc, expected):
    assert theory.regime(p0, p_cw, p_wc) == expected


def test_improves_is_strict_at_the_fixed_point():
    assert not theory.improves(0.75, 0.1, 0.3)


def test_improves_below_the_bound():
    assert theory.improves(0.74, 0.1, 0.3)


def brute_force_rounds(p0, p_cw, p_wc, c, max_rounds):
    t = np.arange(max_rounds + 1)
    objective = theory.accuracy_at(t, p0, p_cw, p_wc) - c * t
    return int(np.flatnonzero(objective >= objective.max() - theory.TIE_TOLERANCE)[0])


def test_optimal_rounds_equals_brute_force_on_random_cases():
    rng = np.random.default_rng(2026)
    mismatches = []
    for _ in range(5000):
        p0, p_cw, p_wc = rng.random(3)
        if rng.random() < 0.1:  # exercise exact zeros (absorbing and frozen chains)
            p_cw = 0.0
        c = rng.choice([0.0, rng.random() * 0.05, rng.random() * 0.5])
        max_rounds = int(rng.integers(0, 30))
        got = theory.optimal_rounds(p0, p_cw, p_wc, c, max_rounds)
        want = brute_force_rounds(p0, p_cw, p_wc, c, max_rounds)
        if got != want:
            mismatches.append((p0, p_cw, p_wc, c, max_rounds, got, want))
    assert mismatches == []


def test_optimal_rounds_on_oscillating_chains_equals_brute_force():
    rng = np.random.default_rng(11)
    for _ in range(2000):
        p_cw, p_wc = rng.uniform(0.5, 1.0, 2)
        p0, c = rng.random(), rng.random() * 0.1
        assert theory.optimal_rounds(p0, p_cw, p_wc, c, 12) == brute_force_rounds(p0, p_cw, p_wc, c, 12)


def test_optimal_rounds_is_zero_when_degrading():
    assert theory.optimal_rounds(0.9, 0.3, 0.1, 0.0, 8) == 0


def test_optimal_rounds_closed_form_example():
    # gains 0.14 * 0.6**t: rounds 1..6 gain more than 0.01, round 7 does not.
    assert theory.optimal_rounds(0.4, 0.1, 0.3, round_cost=0.01, max_rounds=20) == 6


def test_optimal_rounds_with_zero_cost_stops_when_gains_vanish():
    assert theory.optimal_rounds(0.4, 0.5, 0.5, 0.0, 50) == 1  # lam = 0: one re-sample is all there is


def test_optimal_rounds_handles_huge_caps():
    assert theory.optimal_rounds(0.4, 1e-6, 1e-6, 0.0, 10**9) < 10**9


def test_rounds_to_target_closed_form():
    t = theory.rounds_to_target(0.4, 0.1, 0.3, 0.7)
    assert theory.accuracy_at(t, 0.4, 0.1, 0.3) >= 0.7 > theory.accuracy_at(t - 1, 0.4, 0.1, 0.3)


def test_rounds_to_target_unreachable_bound():
    assert theory.rounds_to_target(0.4, 0.1, 0.3, 0.75) is None


def test_rounds_to_target_already_met():
    assert theory.rounds_to_target(0.8, 0.1, 0.3, 0.5) == 0


def test_rounds_to_target_respects_max_rounds():
    assert theory.rounds_to_target(0.4, 0.1, 0.3, 0.74, max_rounds=2) is None


def test_rounds_to_target_oscillating_peak_at_round_one():
    assert theory.rounds_to_target(0.2, 0.8, 0.7, 0.5) == 1


def test_rounds_to_target_agrees_with_scan():
    rng = np.random.default_rng(5)
    for _ in range(2000):
        p0, p_cw, p_wc, target = rng.random(4)
        t = np.arange(200)
        reached = np.flatnonzero(theory.accuracy_at(t, p0, p_cw, p_wc) >= target - theory.TIE_TOLERANCE)
        want = int(reached[0]) if reached.size else None
        got = theory.rounds_to_target(p0, p_cw, p_wc, target, max_rounds=199)
        assert got == want, (p0, p_cw, p_wc, target)


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, "x", None])
def test_invalid_probability_names_the_argument_and_value(bad):
    with pytest.raises(ValueError, match=r"p_cw must be a probability in \[0, 1\], got"):
        theory.accuracy_at(1, 0.5, bad, 0.2)


def test_invalid_p0_is_named():
    with pytest.raises(ValueError, match="p0 must be a probability"):
        theory.regime(2.0, 0.1, 0.1)


def test_negative_round_cost_is_rejected():
    with pytest.raises(ValueError, match="round_cost must be a finite number >= 0, got -0.1"):
        theory.optimal_rounds(0.4, 0.1, 0.3, round_cost=-0.1)


def test_negative_max_rounds_is_rejected():
    with pytest.raises(ValueError, match="max_rounds must be a non-negative integer, got -1"):
        theory.optimal_rounds(0.4, 0.1, 0.3, max_rounds=-1)


def test_fractional_t_is_rejected():
    with pytest.raises(ValueError, match="t must be a non-negative integer"):
        theory.accuracy_at(1.5, 0.4, 0.1, 0.3)
