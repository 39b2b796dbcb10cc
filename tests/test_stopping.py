"""Adaptive stopping of a vote (core/stopping.py) against brute force: the posterior and the predictive law against
Monte Carlo of the generative model, the dynamic programme against an exhaustive expectimax over every labelled answer
sequence, and the zero-cost rule against enumerating every continuation."""

from __future__ import annotations

import itertools
import math
import re
from functools import cache

import numpy as np
import pytest
from scipy import integrate, stats
from scipy.special import gammaln
from test_voting import _restricted_growth_strings

from markovscale_dspy._exceptions import ConfigurationError
from markovscale_dspy.core import stopping
from markovscale_dspy.core.stopping import VotePrior
from markovscale_dspy.core.voting import VoteModel, plurality_winner, vote_accuracy

# A generative sampler of answer sequences, written independently of the module -----------------------------------


def simulate_sequences(n, count, a, b, distractors, alpha, rng, shift=0.0, scale=1.0):
    """``count`` questions x ``n`` answers in order; label 0 is the correct answer, 1.. are wrong answers."""
    phi = shift + scale * rng.beta(a, b, size=count)
    correct = rng.random((count, n)) < phi[:, None]
    labels = np.zeros((count, n), dtype=np.int64)
    if distractors is not None:
        shares = rng.dirichlet(np.full(distractors, alpha), size=count)
        cum = np.cumsum(shares, axis=1)
        u = rng.random((count, n))
        wrong = np.minimum((u[:, :, None] > cum[:, None, :]).sum(axis=2), distractors - 1) + 1
        labels = np.where(correct, 0, wrong)
        return labels
    # Chinese restaurant process over the wrong answers: a new one with alpha / (alpha + r), else copy a uniformly
    # chosen earlier wrong answer.
    made = np.zeros(count, dtype=np.int64)
    wrong_so_far = np.zeros(count, dtype=np.int64)
    for t in range(n):
        new = rng.random(count) < alpha / (alpha + wrong_so_far)
        if t:
            scores = np.where(labels[:, :t] > 0, rng.random((count, t)), -1.0)  # uniform over earlier wrong ones
            pick = labels[np.arange(count), np.argmax(scores, axis=1)]
        else:
            pick = np.zeros(count, dtype=np.int64)
        wrong = ~correct[:, t]
        made += wrong & new
        labels[:, t] = np.where(wrong, np.where(new, made, pick), 0)
        wrong_so_far += wrong
    return labels


def first_seen_counts(row):
    """Counts per distinct answer in order of first appearance, and the index of the correct one (or None)."""
    order, counts = [], []
    for x in row:
        if x in order:
            counts[order.index(x)] += 1
        else:
            order.append(x)
            counts.append(1)
    return counts, (order.index(0) if 0 in order else None)


def group_by_state(labels):
    """{sorted counts: list of (counts in first-seen order, index of the correct cluster)}."""
    out = {}
    for row in labels.tolist():
        counts, truth = first_seen_counts(row)
        out.setdefault(tuple(sorted(counts, reverse=True)), []).append((counts, truth))
    return out


WORLDS = [
    (6.0, 2.0, 3, 0.5, 0.0, 1.0),
    (2.0, 1.2, 2, 0.3, 0.0, 1.0),  # many hard questions, one distractor dominates
    (1.5, 2.5, 1, 1.0, 0.0, 1.0),  # mostly wrong, every wrong answer the same: voting hurts
    (3.0, 1.5, None, 0.7, 0.0, 1.0),  # free-form wrong answers (Dirichlet process)
    (2.0, 2.0, 4, 1.0, 0.3, 0.6),  # votes over refined chains: correct with 0.3 + 0.6 theta
]


@pytest.mark.parametrize(
    "a,b,m,alpha,shift,scale",
    # two worlds in the fast suite (finite and free-form distractors), the rest with the slow tests
    [
        *WORLDS[:1],
        *(pytest.param(*w, marks=pytest.mark.slow) for w in WORLDS[1:3]),
        WORLDS[3],
        pytest.param(*WORLDS[4], marks=pytest.mark.slow),
    ],
)
def test_the_posterior_of_every_cluster_matches_monte_carlo(a, b, m, alpha, shift, scale):
    n, count = 5, 100_000
    rng = np.random.default_rng([11, n, int(10 * a), m or 0])
    prior = VotePrior.single(a, b, m, alpha, shift, scale)
    groups = group_by_state(simulate_sequences(n, count, a, b, m, alpha, rng, shift, scale))
    checked = 0
    for state, rows in groups.items():
        if len(rows) < 400:
            continue
        post = stopping.cluster_posterior(prior, state)
        # P(the correct answer is a cluster of size x), for each size present, and P(no cluster is correct).
        for x in set(state):
            p = sum(post[i] for i, y in enumerate(state) if y == x)
            hits = sum(truth is not None and counts[truth] == x for counts, truth in rows)
            se = math.sqrt(max(p * (1 - p), 1e-4) / len(rows))
            assert abs(hits / len(rows) - p) < 4 * se, (state, x, hits / len(rows), p)
        none = sum(truth is None for _, truth in rows) / len(rows)
        assert abs(none - post[-1]) < 4 * math.sqrt(max(post[-1] * (1 - post[-1]), 1e-4) / len(rows))
        # The plurality answer (ties to the first seen) is correct with the leader's posterior, whatever the order.
        won = sum(truth is not None and _leader(c) == truth for c, truth in rows)
        p = stopping.leader_posterior(prior, state)
        assert abs(won / len(rows) - p) < 4 * math.sqrt(max(p * (1 - p), 1e-4) / len(rows)), state
        checked += 1
    assert checked >= (3 if m == 1 else 5)  # one distractor: only (5), (4, 1), (3, 2)


def _leader(counts):
    return counts.index(max(counts))


@pytest.mark.parametrize("a,b,m,alpha,shift,scale", WORLDS[:2] + WORLDS[3:4])
def test_the_next_answer_law_matches_monte_carlo(a, b, m, alpha, shift, scale):
    n, count = 4, 100_000
    rng = np.random.default_rng([12, int(10 * a), m or 0])
    prior = VotePrior.single(a, b, m, alpha, shift, scale)
    labels = simulate_sequences(n + 1, count, a, b, m, alpha, rng, shift, scale)
    rows = {}
    for row in labels.tolist():
        counts, _ = first_seen_counts(row[:n])
        order = list(dict.fromkeys(row[:n]))
        joined = order.index(row[n]) if row[n] in order else len(order)
        rows.setdefault(tuple(counts), []).append(joined)
    checked = 0
    for counts, joined in rows.items():
        if len(joined) < 1500:
            continue
        pred = stopping.next_answer_probabilities(prior, counts)
        assert pred.sum() == pytest.approx(1.0, abs=1e-12)
        seen = np.bincount(joined, minlength=len(pred)) / len(joined)
        se = np.sqrt(np.maximum(pred * (1 - pred), 1e-4) / len(joined))
        assert np.all(np.abs(seen - pred) < 4 * se), (counts, seen, pred)
        checked += 1
    assert checked >= 4


# The dynamic programme against exhaustive expectimax ---------------------------------------------------------------


def _phi_moment(c, r, a, b, shift, scale):
    """E[phi^c (1 - phi)^r] by numerical integration over theta."""

    def f(t):
        phi = shift + scale * t
        return phi**c * (1 - phi) ** r * stats.beta.pdf(t, a, b)

    return integrate.quad(f, 0, 1, epsabs=1e-13, epsrel=1e-11, limit=200)[0]


def _canonical(seq):
    """Relabel a sequence by order of first appearance (what the decision maker sees)."""
    names = {}
    return tuple(names.setdefault(x, len(names)) for x in seq)


def _joint_law(a, b, m, alpha, shift, scale, n_max):
    """{observed canonical sequence: {canonical label of the correct answer or None: probability}} for every length
    up to ``n_max``, by enumerating every sequence of actual answers ("C" and distractors 0..m-1) with the Dirichlet
    moments of the distractor shares (finite m) or the Chinese restaurant process (m = None)."""
    moments = {
        (c, r): _phi_moment(c, r, a, b, shift, scale) for n in range(n_max + 1) for c in range(n + 1) for r in [n - c]
    }
    law = {}
    for n in range(n_max + 1):
        if m is not None:
            sequences = itertools.product(["C", *range(m)], repeat=n)
        else:  # wrong answers as CRP labels: enumerate restricted growth strings of the wrong positions
            sequences = _crp_sequences(n)
        for seq in sequences:
            c = sum(x == "C" for x in seq)
            wrong = [x for x in seq if x != "C"]
            if m is not None:
                dirichlet = gammaln(m * alpha) - gammaln(m * alpha + len(wrong))
                dirichlet += sum(gammaln(alpha + wrong.count(d)) - gammaln(alpha) for d in range(m))
                p = moments[(c, len(wrong))] * math.exp(dirichlet)
            else:
                p = moments[(c, len(wrong))] * _crp_probability(wrong, alpha)
            obs = _canonical(seq)
            truth = obs[seq.index("C")] if "C" in seq else None
            cell = law.setdefault(obs, {})
            cell[truth] = cell.get(truth, 0.0) + p
    return law


def _crp_sequences(n):
    for mask in itertools.product([True, False], repeat=n):
        slots = mask.count(False)
        for labels in _growth(slots):
            it = iter(labels)
            yield tuple("C" if is_c else next(it) for is_c in mask)


def _growth(r):
    """Restricted growth strings of length ``r`` (set partitions, blocks numbered by first appearance)."""
    return iter([()]) if r == 0 else _restricted_growth_strings(r)


def _crp_probability(labels, alpha):
    p, sizes = 1.0, {}
    for i, x in enumerate(labels):
        p *= sizes[x] / (alpha + i) if x in sizes else alpha / (alpha + i)
        sizes[x] = sizes.get(x, 0) + 1
    return p


def _winner(obs):
    return plurality_winner(list(obs))  # canonical labels: index of the first occurrence is the label's position


def _expectimax(law, max_calls, cost):
    """Optimal value from no answer, over observed sequences (no sorted-state shortcut, no sufficiency assumed)."""

    @cache
    def value(obs):
        total = sum(law[obs].values())
        if obs:
            winner_label = obs[_winner(obs)]
            stop = law[obs].get(winner_label, 0.0) / total
        else:
            stop = 0.0
        if len(obs) == max_calls:
            return stop
        children = [(*obs, k) for k in range(max(obs, default=-1) + 2)]
        cont = -cost + sum(sum(law[ch].values()) / total * value(ch) for ch in children if ch in law)
        return cont if not obs else max(stop, cont)

    return value(())


@pytest.mark.parametrize(
    "a,b,m,alpha,shift,scale,max_calls,cost",
    [
        (6.0, 2.0, 3, 0.5, 0.0, 1.0, 5, 0.01),
        (2.0, 1.2, 2, 0.3, 0.0, 1.0, 6, 0.003),
        (1.5, 2.5, 1, 1.0, 0.0, 1.0, 6, 0.001),  # voting hurts: the optimum stops early even at a tiny cost
        (3.0, 1.5, None, 0.7, 0.0, 1.0, 5, 0.02),
        (2.0, 2.0, 2, 1.0, 0.3, 0.6, 5, 0.005),
    ],
)
def test_the_dynamic_programme_equals_exhaustive_expectimax(a, b, m, alpha, shift, scale, max_calls, cost):
    law = _joint_law(a, b, m, alpha, shift, scale, max_calls)
    table = stopping.stopping_table(VotePrior.single(a, b, m, alpha, shift, scale), max_calls, cost)
    brute = _expectimax(law, max_calls, cost)
    assert table.value((), max_calls) == pytest.approx(brute, abs=1e-9)
    assert table.accuracy - cost * table.expected_calls == pytest.approx(brute, abs=1e-9)


def test_the_table_looks_further_than_one_call():
    # After one answer, one more call can never change the plurality answer (the first answer wins a 1-1 tie), so a
    # one-step look-ahead sees exactly no gain and would always stop at one call; the exact programme sees the gain
    # of the calls after it (a rule that stops here would fail this test).
    prior = VotePrior.single(6.0, 2.0, 3, 0.5)
    nxt = stopping.next_answer_probabilities(prior, [1])
    one_step = nxt[0] * stopping.leader_posterior(prior, [2]) + nxt[1] * stopping.leader_posterior(prior, [1, 1])
    assert one_step == pytest.approx(stopping.leader_posterior(prior, [1]), abs=1e-12)
    stop, info = stopping.should_stop(prior, [1], 1, 8, 0.01)
    assert not stop and info["gain"] > 0.05 and info["reason"] == "worth_a_call"


def test_at_no_cost_the_policy_returns_the_full_vote_and_saves_calls():
    for a, b, m, alpha, shift, scale in WORLDS:
        prior = VotePrior.single(a, b, m, alpha, shift, scale)
        for max_calls in (3, 8):
            table = stopping.stopping_table(prior, max_calls, 0.0)
            full = vote_accuracy(max_calls, a, b, m, alpha, shift, scale)
            assert table.accuracy == pytest.approx(full, abs=1e-10)
            assert table.expected_calls < max_calls


def test_the_policy_s_accuracy_and_calls_match_a_replay_of_simulated_questions():
    a, b, m, alpha = 3.0, 1.5, 3, 0.6
    prior, max_calls, cost = VotePrior.single(a, b, m, alpha), 8, 0.01
    table = stopping.stopping_table(prior, max_calls, cost)
    labels = simulate_sequences(max_calls, 20_000, a, b, m, alpha, np.random.default_rng(5))
    right, calls = [], []
    for row in labels.tolist():
        for k in range(1, max_calls + 1):
            counts, truth = first_seen_counts(row[:k])
            if stopping.should_stop(prior, counts, k, max_calls, cost)[0]:
                break
        right.append(truth is not None and _leader(counts) == truth)
        calls.append(k)
    right, calls = np.asarray(right, float), np.asarray(calls, float)
    assert abs(right.mean() - table.accuracy) < 4 * right.std() / math.sqrt(right.size)
    # The table cannot see the order of first appearance (should_stop can), so at a positive cost they agree exactly
    # in law.
    assert abs(calls.mean() - table.expected_calls) < 4 * calls.std() / math.sqrt(calls.size)


def test_evaluating_a_rule_exactly_agrees_with_the_table_and_with_fixed_votes():
    prior = VotePrior.single(3.0, 1.5, 3, 0.6)
    for cost in (0.0, 0.004, 0.03):
        table = stopping.stopping_table(prior, 8, cost)
        acc, calls = stopping.evaluate_policy(prior, lambda s, r, t=table: t.stop[(s, r)], 8)
        assert (acc, calls) == pytest.approx((table.accuracy, table.expected_calls), abs=1e-12)
    for n in (1, 3, 6):
        acc, calls = stopping.evaluate_policy(prior, lambda s, r, n=n: sum(s) >= n, 8)
        assert calls == pytest.approx(n) and acc == pytest.approx(vote_accuracy(n, 3.0, 1.5, 3, 0.6), abs=1e-12)


# The zero-cost rule: never stop while the answer can still change -----------------------------------------------


def _can_change(obs, remaining):
    """Whether some continuation of ``remaining`` answers (existing or new ones) changes the plurality answer."""
    start = obs[_winner(obs)]
    for tail in itertools.product(range(max(obs) + 1 + remaining), repeat=remaining):
        seq = (*obs, *tail)
        if seq[_winner(seq)] != start:
            return True
    return False


@pytest.mark.parametrize("max_calls", [4, 6])
def test_at_no_cost_it_stops_exactly_when_the_answer_cannot_change(max_calls):
    prior = VotePrior.single(2.0, 1.2, 4, 0.4)
    stops = 0
    for n in range(1, max_calls):
        for obs in set(map(_canonical, itertools.product(range(n), repeat=n))):
            counts = [obs.count(k) for k in range(max(obs) + 1)]
            stop, info = stopping.should_stop(prior, counts, n, max_calls, 0.0)
            assert stop == (not _can_change(obs, max_calls - n)), (obs, info)
            assert info["reason"] == ("settled" if stop else "worth_a_call")
            stops += stop
    assert stops > 0
    stop, info = stopping.should_stop(prior, [1, 2], max_calls, max_calls, 0.0)
    assert stop and info["reason"] == "max_calls" and info["posterior"] == stopping.leader_posterior(prior, [2, 1])


def test_settled_uses_the_order_of_first_appearance():
    assert stopping.settled([3, 1], 2) and not stopping.settled([1, 3], 2)
    assert not stopping.settled([3], 4) and stopping.settled([3], 3)  # a new answer needs 4 to pass 3


# The fitted model, and errors -----------------------------------------------------------------------------------


def test_a_fitted_vote_model_is_used_through_its_point_estimate_or_its_bootstrap_mixture():
    rng = np.random.default_rng(3)
    labels = simulate_sequences(8, 300, 4.0, 1.5, 3, 0.6, rng)
    data = [[(x == 0, int(x)) for x in row] for row in labels.tolist()]
    model = VoteModel.fit(data, bootstrap=10, seed=1)
    point = VotePrior.from_model(model)
    assert stopping.cluster_posterior(model, [3, 1]) == pytest.approx(stopping.cluster_posterior(point, [3, 1]))
    mixture = VotePrior.from_model(model, draws=True)
    assert len(mixture.components) == 10
    assert 0.5 < stopping.leader_posterior(mixture, [3, 1]) < 1
    # More distinct answers than two distractors and the correct answer can explain: keep voting.
    stop, info = stopping.should_stop(VotePrior.single(4.0, 1.5, 2, 0.6), [1, 1, 1, 1], 4, 8, 0.5)
    assert not stop and info["reason"] == "unexplained"


@pytest.mark.parametrize(
    "kwargs,bad",
    [
        ({"max_calls": 17}, "17"),
        ({"max_calls": 0}, "0"),
        ({"call_cost": -0.1}, "-0.1"),
        ({"call_cost": float("nan")}, "nan"),
        ({"counts": [2, 0]}, "[2, 0]"),
        ({"counts": [True]}, "[True]"),
        ({"counts": [2, 1], "calls_made": 2}, "2"),
        ({"calls_made": 9}, "9"),
    ],
)
def test_bad_arguments_raise_configuration_errors_naming_the_value(kwargs, bad):
    args = {
        "model": VotePrior.single(2.0, 1.0, 3, 1.0),
        "counts": [1],
        "calls_made": 1,
        "max_calls": 8,
        "call_cost": 0.01,
        **kwargs,
    }
    with pytest.raises(ConfigurationError, match="got " + re.escape(bad)):
        stopping.should_stop(**args)


def test_bad_priors_raise_configuration_errors_naming_the_value():
    with pytest.raises(ConfigurationError, match="-1.0"):
        VotePrior.single(-1.0, 1.0, 3, 1.0)
    with pytest.raises(ConfigurationError, match="distractors of component 0 .* got 0"):
        VotePrior.single(1.0, 1.0, 0, 1.0)
    with pytest.raises(ConfigurationError, match="shift=0.5, scale=0.8"):
        VotePrior.single(1.0, 1.0, 3, 1.0, shift=0.5, scale=0.8)
    with pytest.raises(ConfigurationError, match="dict"):
        stopping.leader_posterior({"a": 1}, [1])
    with pytest.raises(ConfigurationError, match=r"got \(\)"):
        VotePrior(())
    mixture = VotePrior([(3, 2.0, 1.0, 3, 1.0), (1, 1.0, 2.0, None, 0.5)])  # a list is fine; weights normalised
    assert [c[0] for c in mixture.components] == [0.75, 0.25]
