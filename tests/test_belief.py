"""belief: the hidden-Markov filter, expectimax and smoothing against brute force over hidden paths, question-type
mixtures, and the calibration of the belief on a simulated world."""

import itertools

import dspy
import numpy as np
import pytest
from helpers import brute_force_joint, brute_force_posteriors, calibrated_model, refine

from benchmarks.worlds import preset_world
from markovscale_dspy.core import belief

CHAIN = {"p_cw": 0.15, "p_wc": 0.35, "p_same_wrong": 0.4, "p_change_correct": 0.05}


def test_same_answer_raises_the_belief():
    assert belief.update(0.5, True, **CHAIN) > 0.5


def test_changed_answer_lowers_a_high_belief():
    assert belief.update(0.9, False, **CHAIN) < 0.9


def test_failed_round_leaves_the_belief_alone():
    assert belief.update(0.42, None, **CHAIN) == 0.42


def test_update_averages_to_the_chain_prediction():
    q = 0.3
    p_same = belief.observation_probability(q, True, **CHAIN)
    mean = p_same * belief.update(q, True, **CHAIN) + (1 - p_same) * belief.update(q, False, **CHAIN)
    assert mean == pytest.approx(q * (1 - CHAIN["p_cw"]) + (1 - q) * CHAIN["p_wc"])


def test_filter_starts_at_p0():
    assert belief.filter_beliefs(0.37, [True, False], **CHAIN)[0] == 0.37


def test_impossible_observation_falls_back_to_the_prediction():
    frozen = {"p_cw": 0.0, "p_wc": 0.0, "p_same_wrong": 1.0, "p_change_correct": 0.0}
    assert belief.update(0.6, False, **frozen) == pytest.approx(0.6)


def enumerate_value(p0, horizon, cost, p_cw, p_wc, p_same_wrong, p_change_correct):
    """Best expected (final correctness - cost x rounds) over every stop/continue strategy, from hidden paths."""
    nodes = [h for d in range(horizon) for h in itertools.product((0, 1), repeat=d)]  # decision points
    move = {1: (p_cw, 1 - p_cw), 0: (1 - p_wc, p_wc)}  # P(next = wrong), P(next = correct)

    def emit(prev, cur, o):
        if prev and cur:
            return 1 - p_change_correct if o else p_change_correct
        if not prev and not cur:
            return p_same_wrong if o else 1 - p_same_wrong
        return 0.0 if o else 1.0

    def value(strategy, x, history, p):
        if len(history) == horizon or not strategy[history]:
            return p * (x - cost * len(history))
        total = 0.0
        for nxt in (0, 1):
            for o in (0, 1):
                q = p * move[x][nxt] * emit(x, nxt, o)
                if q > 0:
                    total += value(strategy, nxt, (*history, o), q)
        return total

    best = -np.inf
    for choice in itertools.product((False, True), repeat=len(nodes)):
        strategy = dict(zip(nodes, choice, strict=True))
        best = max(best, value(strategy, 1, (), p0) + value(strategy, 0, (), 1 - p0))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_expectimax_equals_brute_force_over_all_strategies(seed):
    rng = np.random.default_rng(seed)
    p0, p_cw, p_wc, s, e = rng.random(5)
    e *= 0.3
    cost = rng.choice([0.0, 0.01, 0.05])
    horizon = 3
    brute = enumerate_value(p0, horizon, cost, p_cw, p_wc, s, e)
    chain = (p_cw, p_wc, s, e)
    mine = max(p0, belief.continuation_value(p0, horizon, cost, *chain))
    assert mine == pytest.approx(brute, abs=1e-12)


def test_smoothing_with_no_observations_is_the_prediction():
    p0 = 0.3
    smoothed = belief.smooth(p0, [None, None], **CHAIN)
    assert smoothed == pytest.approx([p0, p0, p0])


def test_smoothing_last_round_equals_filtering():
    obs = [False, True, True]
    assert belief.smooth(0.4, obs, **CHAIN)[-1] == pytest.approx(belief.filter_beliefs(0.4, obs, **CHAIN)[-1])


def test_smoothing_revises_an_early_round_by_later_evidence():
    # After a change, later rounds that keep the new answer make the *old* answer look worse than filtering said.
    obs = [False, True, True, True]
    assert belief.smooth(0.5, obs, **CHAIN)[0] < belief.filter_beliefs(0.5, obs, **CHAIN)[0]


def test_mixture_of_one_type_equals_the_single_chain():
    single = belief.HiddenChains.single(0.4, **CHAIN)
    obs = [False, True, None, True]
    assert [single.correct(b) for b in single.filter(obs)] == pytest.approx(belief.filter_beliefs(0.4, obs, **CHAIN))


def test_mixture_filter_learns_the_type():
    # type 0 never changes its answer; type 1 moves a lot
    chains = belief.HiddenChains(
        weights=np.array([0.5, 0.5]),
        p0=np.array([0.8, 0.3]),
        p_cw=np.array([0.0, 0.1]),
        p_wc=np.array([0.0, 0.5]),
        p_same_wrong=np.array([1.0, 0.2]),
        p_change_correct=np.array([0.0, 0.0]),
    )
    b = chains.update(chains.initial(), False)
    assert b[0].sum() == pytest.approx(0.0) and b[1].sum() == pytest.approx(1.0)


def random_chains(rng, types):
    weights = rng.random(types) + 0.1
    return belief.HiddenChains(
        weights=weights / weights.sum(),
        p0=rng.random(types),
        p_cw=rng.random(types),
        p_wc=rng.random(types),
        p_same_wrong=rng.random(types),
        p_change_correct=rng.random(types) * 0.3,
    )


@pytest.mark.parametrize("seed", range(8))
def test_filter_and_smoother_equal_brute_force_over_hidden_paths(seed):
    rng = np.random.default_rng(seed)
    chains = random_chains(rng, types=1 + seed % 3)
    observations = [(None, True, False)[i] for i in rng.integers(0, 3, size=4)]
    filtered = [chains.correct(b) for b in chains.filter(observations)]
    expected_filtered = [brute_force_joint(chains, observations[:t])[t][:, 1].sum() for t in range(5)]
    assert filtered == pytest.approx(expected_filtered, abs=1e-12)
    assert chains.smooth(observations) == pytest.approx(brute_force_posteriors(chains, observations), abs=1e-12)


def test_single_chain_smoothing_equals_brute_force_over_hidden_paths():
    single = belief.HiddenChains.single(0.4, **CHAIN)
    for observations in itertools.product((None, True, False), repeat=3):
        expected = brute_force_posteriors(single, list(observations))
        assert belief.smooth(0.4, list(observations), **CHAIN) == pytest.approx(expected, abs=1e-12)


@pytest.mark.slow
def test_belief_is_calibrated():
    """Among questions whose belief falls in a bin, the share actually correct matches the bin."""
    model = calibrated_model(preset_world("heterogeneous", 600, seed=20), rounds=5)
    module = refine(model=model, policy="fixed", max_rounds=5)
    w = preset_world("heterogeneous", 3000, seed=21)
    chains = model.hidden_chains()
    rng = np.random.default_rng(0)
    beliefs, labels = [], []
    with dspy.context(lm=w.lm()):
        for example in w.examples:
            pred = module(**example.inputs())
            t = int(rng.integers(0, len(pred.trajectory)))  # one round per question: independent pairs
            obs = [
                None
                if pred.trajectory[s]["error"]
                else pred.trajectory[s]["answer_key"] == pred.trajectory[s - 1]["answer_key"]
                for s in range(1, t + 1)
            ]
            beliefs.append(chains.correct(chains.filter(obs)[-1]))
            labels.append(w.metric(example, dspy.Prediction(**pred.trajectory[t]["outputs"])))
    beliefs, labels = np.array(beliefs), np.array(labels)
    edges = np.linspace(0, 1, 11)
    checked = 0
    for lo, hi in itertools.pairwise(edges):
        inside = (beliefs >= lo) & (beliefs < hi if hi < 1 else beliefs <= hi)
        if inside.sum() < 30:
            continue
        expected, observed = beliefs[inside].sum(), labels[inside].sum()
        se = np.sqrt((beliefs[inside] * (1 - beliefs[inside])).sum())
        print(f"  bin [{lo:.1f}, {hi:.1f}): n={inside.sum()} observed {observed} expected {expected:.1f} (se {se:.1f})")
        assert abs(observed - expected) <= 3 * se + 1
        checked += 1
    assert checked >= 4
