"""Issue 12: the belief over which seen answer is correct -- filter, answer returns, confidence, planning for select."""

import collections
import itertools

import numpy as np
import pytest

from markovscale_dspy.core import evidence as evidence_module
from markovscale_dspy.core.belief import HiddenChains
from markovscale_dspy.core.evidence import Evidence, Observation, answer_slots, observations_of

CHAIN = {"p0": 0.4, "p_cw": 0.2, "p_wc": 0.35, "p_same_wrong": 0.5, "p_change_correct": 0.0}


def single(p_return=0.15, confidence=None, **overrides):
    params = {**CHAIN, **overrides}
    arrays = [np.array([[params[k]]]) for k in ("p0", "p_cw", "p_wc", "p_same_wrong", "p_change_correct")]
    return Evidence(np.ones((1, 1)), *arrays, p_return=np.array([[p_return]]), confidence=confidence)


def two_types(confidence=None):
    return Evidence(
        np.array([[0.6, 0.4]]),
        np.array([[0.3, 0.7]]),
        np.array([[0.05, 0.4]]),
        np.array([[0.5, 0.05]]),
        np.array([[0.2, 0.8]]),
        np.array([[0.0, 0.0]]),
        p_return=np.array([[0.1, 0.3]]),
        confidence=confidence,
    )


def test_answer_slots_and_observations():
    keys = ["a", "a", "b", "a", "c", None]
    assert answer_slots(keys) == [1, 1, 2, 1, 3, 4]
    kinds = [o.kind if o else None for o in observations_of(keys, [False, False, False, False, True, False])]
    assert kinds == ["same", "new", "return", None, "new"]


def test_without_returns_the_filter_is_the_two_state_filter():
    """Until an answer could return (at most one change), identity adds nothing to same/changed."""
    ev = single()
    two = HiddenChains.single(**CHAIN)
    for keys in (["a"], ["a", "a", "a"], ["a", "b"], ["a", "a", "b", "b"]):
        obs = [keys[t] == keys[t - 1] for t in range(1, len(keys))]
        expected = two.correct(two.filter(obs)[-1])
        assert float(ev.filter(keys, [False] * len(keys)).correct()[0]) == pytest.approx(expected, abs=1e-12)


def test_a_returning_answer_is_evidence_of_correctness():
    ev = single()
    back = float(ev.filter(["a", "b", "a"], [False] * 3).correct()[0])
    new = float(ev.filter(["a", "b", "c"], [False] * 3).correct()[0])
    assert back > new + 0.2


def _simulate(rng, n_rounds=4):
    """A chain drawn from exactly the model the filter assumes (one type, per-answer return rate)."""
    p, rho = CHAIN, 0.15
    x = rng.random() < p["p0"]
    fresh = itertools.count()
    keys, labels = ["gold" if x else f"w{next(fresh)}"], [x]

    def wrong_change(previous):
        candidates = [k for k in dict.fromkeys(keys) if k not in (previous, "gold")]
        u = rng.random()
        for i, key in enumerate(candidates):
            if u < (i + 1) * rho:
                return key
        return f"w{next(fresh)}"

    for _ in range(n_rounds):
        previous = keys[-1]
        if x:
            if rng.random() < p["p_cw"]:
                x, key = False, wrong_change(previous)
            else:
                key = previous
        elif rng.random() < p["p_wc"]:
            x, key = True, "gold"
        elif rng.random() < p["p_same_wrong"]:
            key = previous
        else:
            key = wrong_change(previous)
        keys.append(key)
        labels.append(x)
    return keys, labels


def test_filter_matches_monte_carlo_of_its_own_model():
    """P(current answer correct | pattern of answers) against 60,000 simulated chains: chi-square over the 25
    commonest patterns, at the 0.1% level."""
    rng = np.random.default_rng(0)
    counts = collections.defaultdict(lambda: [0, 0])
    for _ in range(60_000):
        keys, labels = _simulate(rng)
        pattern = tuple(answer_slots(keys))
        counts[pattern][0] += labels[-1]
        counts[pattern][1] += 1
    ev = single()
    chi2 = 0.0
    top = sorted(counts.items(), key=lambda kv: -kv[1][1])[:25]
    for pattern, (correct, n) in top:
        q = float(ev.filter(list(pattern), [False] * len(pattern)).correct()[0])
        chi2 += (correct - n * q) ** 2 / (n * q * (1 - q))
    from scipy import stats

    print(f"chi2 = {chi2:.1f} on {len(top)} patterns (0.1% critical value {stats.chi2.ppf(0.999, len(top)):.1f})")
    assert chi2 < stats.chi2.ppf(0.999, len(top))


def test_observation_probabilities_sum_to_one():
    conf = np.array([[[[0.7, 0.3], [0.2, 0.8]], [[0.5, 0.5], [0.4, 0.6]]]])
    ev = two_types(conf)
    belief = ev.filter(["a", "b", "b", "c"], [False] * 4, [0, 1, 1, 0])
    total = sum(ev.probability(belief, o) for o in _possible(belief, ev.bins))
    assert total == pytest.approx(1.0, abs=1e-12)


def _possible(belief, bins):
    kinds = [Observation("same", belief.current)]
    kinds += [Observation("return", a) for a in range(1, belief.seen + 1) if a != belief.current]
    kinds += [Observation("new", belief.seen + 1)]
    levels = range(bins) if bins else [None]
    return [Observation(o.kind, o.slot, b) for o in kinds for b in levels]


def _brute_force(ev, belief, left, cost, select):
    """Value of one more round then stopping optimally, by plain recursion over every observation."""
    value = -cost
    for observation in _possible(belief, ev.bins):
        p = ev.probability(belief, observation)
        if p <= 0:
            continue
        after = ev.update(belief, observation)
        stop = float((after.best() if select == "best" else after.correct())[0])
        cont = _brute_force(ev, after, left - 1, cost, select) if left > 1 else -np.inf
        value += p * max(stop, cont)
    return value


@pytest.mark.parametrize("select", ["last", "best"])
@pytest.mark.parametrize("confident", [False, True])
def test_expectimax_equals_brute_force(select, confident):
    conf = np.array([[[[0.7, 0.3], [0.2, 0.8]], [[0.5, 0.5], [0.4, 0.6]]]]) if confident else None
    ev = two_types(conf)
    for keys, bins in ((["a"], [1]), (["a", "b"], [0, 0]), (["a", "b", "a"], [1, 0, 1])):
        belief = ev.filter(keys, [False] * len(keys), bins if confident else None)
        stop = float((belief.best() if select == "best" else belief.correct())[0])
        for left in (1, 2, 3):
            exact = _brute_force(ev, belief, left, 0.01, select) - stop
            assert float(ev.advantage(belief, left, 0.01, select)[0]) == pytest.approx(exact, abs=1e-10)


def test_planning_for_the_best_answer_values_rounds_at_least_as_much():
    ev = two_types()
    for keys in (["a"], ["a", "a"], ["a", "b"], ["a", "b", "a"]):
        belief = ev.filter(keys, [False] * len(keys))
        best = float(ev.advantage(belief, 3, 0.0, "best")[0]) + float(belief.best()[0])
        last = float(ev.advantage(belief, 3, 0.0, "last")[0]) + float(belief.correct()[0])
        assert best >= last - 1e-12


def test_select_best_makes_a_risky_round_worth_it():
    """A refinement that breaks as often as it fixes: returning the last answer, the round loses on average; able to
    return the best-supported answer seen (the new answer's confidence says which), it can only help."""
    conf = np.array([[[[0.9, 0.1], [0.1, 0.9]]]])
    ev = single(p0=0.6, p_cw=0.3, p_wc=0.3, p_same_wrong=0.5, confidence=conf)
    belief = ev.start(None)  # the first answer came without confidence; the next one will have it
    assert ev.decide(belief, 1, 0.0, "last")[0] is False
    assert ev.decide(belief, 1, 0.0, "best")[0] is True


def test_coarse_lookahead_is_a_lower_bound(monkeypatch):
    conf = np.array([[[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], [[0.5, 0.3, 0.2], [0.3, 0.3, 0.4]]]])
    ev = two_types(conf)
    belief = ev.start(1)
    exact = float(ev.advantage(belief, 4, 0.0)[0])
    monkeypatch.setattr(evidence_module, "NODE_BUDGET", 40)
    coarse = float(two_types(conf).advantage(belief, 4, 0.0)[0])
    print(f"exact {exact:.5f} coarse {coarse:.5f}")
    assert coarse <= exact + 1e-12 and coarse > exact - 0.05


def test_a_long_lookahead_stays_cheap():
    import time

    conf = np.array([[[[0.7, 0.2, 0.1, 0.0], [0.1, 0.3, 0.3, 0.3]], [[0.4, 0.3, 0.2, 0.1], [0.3, 0.3, 0.2, 0.2]]]])
    ev = two_types(conf)
    started = time.perf_counter()
    ev.advantage(ev.start(2), 12, 0.01, "best")
    assert time.perf_counter() - started < 2.0


def test_confidence_moves_the_round_zero_belief():
    conf = np.array([[[[0.8, 0.2], [0.2, 0.8]]]])
    ev = single(confidence=conf)
    low, high = (float(ev.start(b).correct()[0]) for b in (0, 1))
    # Bayes: odds(0.4) * likelihood ratio
    assert high == pytest.approx(0.4 * 4 / (0.4 * 4 + 0.6))
    assert low == pytest.approx(0.4 * 0.25 / (0.4 * 0.25 + 0.6))
    assert float(ev.start(None).correct()[0]) == pytest.approx(0.4)


def test_an_uninformative_confidence_changes_nothing():
    flat = np.array([[[[0.3, 0.7], [0.3, 0.7]]]])
    informed, plain = single(confidence=flat), single()
    keys = ["a", "b", "b", "a"]
    b1 = informed.filter(keys, [False] * 4, [0, 1, 0, 1])
    b2 = plain.filter(keys, [False] * 4)
    assert np.allclose(b1.joint, b2.joint)
    # planning over observations that carry no information is planning without them
    assert float(informed.advantage(b1, 3, 0.01)[0]) == pytest.approx(float(plain.advantage(b2, 3, 0.01)[0]))
