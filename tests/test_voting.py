"""The vote model: exact plurality maths against brute force and Monte Carlo, the fit, and its predictions on a
simulated world (predicted vote accuracy against observed for n = 1, 3, 5, 7)."""

import itertools
import json
import math
from collections import Counter
from functools import cache

import dspy
import numpy as np
import pytest
from scipy import integrate, optimize, stats
from scipy.special import gammaln

from markovscale_dspy import MarkovCalibrator, MarkovScale, TransitionModel, VoteModel
from markovscale_dspy._exceptions import ConfigurationError, DataError, StateError
from markovscale_dspy.core import voting
from markovscale_dspy.core.statistics import binomial_interval

# Exact maths -----------------------------------------------------------------------------------------------------


def test_partitions_are_the_integer_partitions():
    assert [len(voting.partitions(r)) for r in range(9)] == [1, 1, 2, 3, 5, 7, 11, 15, 22]
    for r in range(1, 9):
        assert all(sum(p) == r and list(p) == sorted(p, reverse=True) for p in voting.partitions(r))


def _dm_sequence_logprob(counts, m, alpha):
    r = sum(counts)
    return gammaln(m * alpha) - gammaln(m * alpha + r) + sum(gammaln(alpha + x) - gammaln(alpha) for x in counts)


@pytest.mark.parametrize("m,alpha", [(1, 0.5), (3, 0.7), (4, 2.0)])
def test_partition_law_of_a_finite_dirichlet_matches_enumerating_every_labelled_sequence(m, alpha):
    for r in range(1, 6):
        totals = Counter()
        for seq in itertools.product(range(m), repeat=r):
            counts = [seq.count(j) for j in range(m)]
            part = tuple(sorted((x for x in counts if x), reverse=True))
            totals[part] += math.exp(_dm_sequence_logprob(counts, m, alpha))
        probs = voting.partition_probabilities(r, m, alpha)
        for part, p in zip(voting.partitions(r), probs, strict=True):
            assert p == pytest.approx(totals.get(part, 0.0), abs=1e-12)


def _restricted_growth_strings(r):
    def grow(prefix, top):
        if len(prefix) == r:
            yield prefix
            return
        for k in range(top + 2):
            yield from grow((*prefix, k), max(top, k))

    yield from grow((0,), 0)


@pytest.mark.parametrize("alpha", [0.3, 1.0, 4.0])
def test_ewens_partition_law_matches_the_chinese_restaurant_process(alpha):
    for r in range(1, 7):
        totals = Counter()
        for seq in _restricted_growth_strings(r):
            p, sizes = 1.0, []
            for i, table in enumerate(seq):
                if table == len(sizes):
                    p *= alpha / (alpha + i) if i else 1.0
                    sizes.append(1)
                else:
                    p *= sizes[table] / (alpha + i)
                    sizes[table] += 1
            totals[tuple(sorted(sizes, reverse=True))] += p
        probs = voting.partition_probabilities(r, None, alpha)
        for part, p in zip(voting.partitions(r), probs, strict=True):
            assert p == pytest.approx(totals[part], abs=1e-12)


def test_credit_counts_ties_as_a_fair_share():
    assert voting.credit(3, (2, 1)) == 1.0
    assert voting.credit(2, (2, 2)) == pytest.approx(1 / 3)
    assert voting.credit(1, (1, 1, 1)) == 0.25
    assert voting.credit(1, (2,)) == 0.0
    assert voting.credit(0, ()) == 0.0


def _compositions(n, parts):
    if parts == 1:
        yield (n,)
        return
    for first in range(n + 1):
        for rest in _compositions(n - first, parts - 1):
            yield (first, *rest)


def _exact_vote(n, theta, shares):
    """Plurality credit of n votes by enumerating every count vector (theta: P(correct); shares: wrong answers)."""
    probs = [theta] + [(1 - theta) * w for w in shares]
    total = 0.0
    for counts in _compositions(n, len(probs)):
        p = stats.multinomial.pmf(counts, n, probs)
        total += p * voting.credit(counts[0], tuple(sorted((c for c in counts[1:] if c), reverse=True)))
    return total


@pytest.mark.slow
def test_vote_accuracy_at_a_fixed_accuracy_matches_enumeration_over_dirichlet_shares():
    # One question type: theta fixed (a huge Beta concentration), shares drawn from a symmetric Dirichlet(alpha):
    # average the exact enumeration over many share draws (Monte Carlo over shares only).
    rng = np.random.default_rng(0)
    theta, m, alpha, n = 0.55, 3, 0.8, 4
    shares = rng.dirichlet([alpha] * m, size=1500)
    values = np.array([_exact_vote(n, theta, w) for w in shares])
    predicted = voting.vote_accuracy(n, theta * 1e7, (1 - theta) * 1e7, m, alpha)
    assert abs(values.mean() - predicted) < 4 * values.std(ddof=1) / math.sqrt(values.size)


def _simulate_votes(rng, n, a, b, m, alpha, questions, shift=0.0, scale=1.0):
    credits = np.empty(questions)
    for i in range(questions):
        theta = shift + scale * rng.beta(a, b)
        shares = rng.dirichlet([alpha] * m)
        counts = rng.multinomial(n, [theta, *((1 - theta) * shares)])
        credits[i] = voting.credit(counts[0], tuple(sorted((c for c in counts[1:] if c), reverse=True)))
    return credits


@pytest.mark.parametrize("n,a,b,m,alpha", [(3, 2.0, 1.5, 3, 0.6), (5, 0.7, 0.9, 2, 0.3), (6, 4.0, 2.0, 5, 2.0)])
def test_vote_accuracy_matches_monte_carlo(n, a, b, m, alpha):
    credits = _simulate_votes(np.random.default_rng(n), n, a, b, m, alpha, 40_000)
    se = credits.std(ddof=1) / math.sqrt(credits.size)
    assert abs(credits.mean() - voting.vote_accuracy(n, a, b, m, alpha)) < 4 * se


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.3, 0.5), (0.9, -0.6), (0.2, 0.0)])
def test_correct_votes_law_matches_numerical_integration(shift, scale):
    a, b, n = 1.7, 2.4, 5
    law = voting.correct_votes(n, a, b, shift, scale)
    for c in range(n + 1):

        def integrand(theta, c=c):
            phi = shift + scale * theta
            return stats.binom.pmf(c, n, phi) * stats.beta.pdf(theta, a, b)

        assert law[c] == pytest.approx(integrate.quad(integrand, 0, 1)[0], abs=1e-9)


def test_a_vote_over_refined_chains_matches_monte_carlo_of_the_chains():
    """The hybrid prediction: n chains, each a fresh sample refined T rounds by the two-state chain, wrong answers
    drawn from the question's distractors, then a plurality vote over the finals."""
    rng = np.random.default_rng(11)
    a, b, m, alpha, p_cw, p_wc, n, t = 2.0, 2.0, 4, 1.0, 0.15, 0.45, 3, 2
    questions = 20_000
    credits = np.empty(questions)
    for i in range(questions):
        theta = rng.beta(a, b)
        shares = rng.dirichlet([alpha] * m)
        finals = []
        for _ in range(n):
            answer = -1 if rng.random() < theta else rng.choice(m, p=shares)  # -1 is the correct answer
            for _ in range(t):
                if answer == -1:
                    if rng.random() < p_cw:
                        answer = rng.choice(m, p=shares)
                elif rng.random() < p_wc:
                    answer = -1
                elif rng.random() < 0.5:  # a wrong answer that changes is redrawn from the distractors
                    answer = rng.choice(m, p=shares)
            finals.append(answer)
        counts = Counter(finals)
        credits[i] = voting.credit(counts.pop(-1, 0), tuple(sorted(counts.values(), reverse=True)))
    lam = 1 - p_cw - p_wc
    pi = p_wc / (p_cw + p_wc)
    predicted = voting.vote_accuracy(n, a, b, m, alpha, shift=pi * (1 - lam**t), scale=lam**t)
    assert abs(credits.mean() - predicted) < 4 * credits.std(ddof=1) / math.sqrt(questions)


def test_plurality_winner_breaks_ties_by_first_seen_and_skips_failures():
    assert voting.plurality_winner(["b", "a", "a", "b", "c"]) == 0
    assert voting.plurality_winner([None, "a", "b", "b"]) == 2
    assert voting.plurality_winner([None, None]) is None


def test_in_sample_vote_accuracy_matches_enumerating_every_subset():
    answers = ["c"] * 3 + ["x"] * 2 + ["y", "z"]
    for n in range(1, len(answers) + 1):
        total = 0.0
        subsets = list(itertools.combinations(range(len(answers)), n))
        for subset in subsets:
            votes = Counter(answers[i] for i in subset)
            total += voting.credit(votes.pop("c", 0), tuple(sorted(votes.values(), reverse=True)))
        assert voting.subset_vote_accuracy(3, (2, 1, 1), n) == pytest.approx(total / len(subsets))


# Fitting ---------------------------------------------------------------------------------------------------------


@cache
def _fitted(m, alpha, a=2.0, b=1.5, questions=2000, samples=8, seed=5):
    rng = np.random.default_rng(seed)
    data = voting.simulate_questions([samples] * questions, a, b, m, alpha, rng)
    return VoteModel.from_questions([(samples, c, w) for c, w in data], bootstrap=200, seed=seed)


def _inside_bootstrap(value, draws, level=0.99):
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return lo <= value <= hi


@pytest.mark.slow  # a statistical run (bootstrap refits)
def test_the_fit_recovers_the_difficulty_law_within_its_bootstrap_range():
    model = _fitted(3, 0.6)
    draws = np.array([(d[0], d[1]) for d in model.draws])
    assert _inside_bootstrap(2.0 / 3.5, draws[:, 0] / draws.sum(axis=1))  # mean accuracy
    assert _inside_bootstrap(3.5, draws.sum(axis=1))  # concentration a + b


@pytest.mark.parametrize("m, alpha", [(None, 2.0), (1, 1.0), (3, 0.3), (8, 5.0)])
def test_the_distractor_fit_finds_the_maximum_of_a_scalar_search_over_every_law(m, alpha):
    """Oracle: for every law, a bounded scalar search over log(alpha) of the exact log-likelihood."""
    rng = np.random.default_rng(31)
    sim = voting.simulate_questions(rng.integers(2, 12, size=60).tolist(), 2.0, 2.0, m, alpha, rng)
    parts = voting._partition_stats([w for _, w in sim])
    bounds = (math.log(voting._ALPHA[0]), math.log(voting._ALPHA[1]))
    oracle = max(
        -optimize.minimize_scalar(
            lambda x, law=law: -voting._cluster_loglik(parts, law, math.exp(x)), bounds=bounds, method="bounded"
        ).fun
        for law in [*range(max(parts[0]), voting.MAX_DISTRACTORS + 1), None]
    )
    law, fitted, estimated = voting.fit_clusters([w for _, w in sim])
    assert estimated and voting._cluster_loglik(parts, law, fitted) >= oracle - 1e-5


@pytest.mark.slow
def test_the_fit_recovers_the_number_of_distractors_and_their_agreement():
    model = _fitted(3, 0.6)
    assert model.distractors == 3
    assert _inside_bootstrap(0.6, [d[3] for d in model.draws if d[2] == 3])
    unbounded = _fitted(None, 2.0)
    assert unbounded.distractors is None or unbounded.distractors >= 15
    assert _inside_bootstrap(
        voting.wrong_agreement(None, 2.0), [voting.wrong_agreement(d[2], d[3]) for d in unbounded.draws]
    )


@pytest.mark.slow  # a statistical run (coverage over many fits)
def test_the_prediction_interval_covers_the_truth():
    model = _fitted(3, 0.6)
    for n in (3, 5, 7):
        truth = voting.vote_accuracy(n, 2.0, 1.5, 3, 0.6)
        assert _inside_bootstrap(truth, model.accuracy_draws(n))


def test_in_sample_and_predicted_vote_accuracy_agree_within_standard_errors():
    model = _fitted(3, 0.6)
    for n in (1, 3, 5, 7):
        observed, se, _ = model.observed_accuracy(n)
        assert abs(observed - model.accuracy(n)) < 4 * se


def test_vote_model_fit_from_graded_samples():
    data = [[(True, "a"), (True, "a"), (False, "b")], [(False, "c"), (False, "c"), (True, "d")]] * 20
    model = VoteModel.fit(data, bootstrap=10)
    assert model.questions[0] == (3, 2, (1,))
    assert model.questions[1] == (3, 1, (2,))
    assert model.split_correct == 0
    assert len(model.draws) == 10


def test_vote_model_input_errors():
    with pytest.raises(DataError, match="at least one question with 2 or more samples"):
        VoteModel.fit([[(True, "a")], [(False, "b")]], bootstrap=0)
    with pytest.raises(DataError, match="must be bools"):
        VoteModel.fit([[(1, "a"), (0, "b")]], bootstrap=0)
    with pytest.raises(ConfigurationError, match="distractors must be a positive integer"):
        voting.partition_probabilities(3, 0, 1.0)


def test_without_two_wrong_answers_agreement_is_assumed_the_worst():
    model = VoteModel.from_questions([(3, 3, ()), (3, 2, (1,))] * 10, bootstrap=5)
    assert not model.clusters_estimated
    assert model.distractors == 1 and model.agreement == 1.0


# Saving ----------------------------------------------------------------------------------------------------------


def test_vote_model_round_trips_through_json_and_rejects_edits():
    model = _fitted(3, 0.6)
    data = json.loads(json.dumps(model.to_dict()))
    assert VoteModel.from_dict(data) == model
    data["fit"]["a"] *= 1.5
    with pytest.raises(StateError, match="disagrees with its data"):
        VoteModel.from_dict(data)
    with pytest.raises(StateError, match="not a vote model"):
        VoteModel.from_dict({"format": "something else"})


def test_transition_models_carry_votes_and_old_states_still_load():
    chain = TransitionModel(n0_correct=30, n0_total=100, n_cc=90, n_cw=10, n_wc=40, n_ww=60)
    with_votes = chain.with_votes(_fitted(3, 0.6))
    restored = TransitionModel.from_dict(json.loads(json.dumps(with_votes.to_dict())))
    assert restored == with_votes and restored.votes == with_votes.votes
    old = chain.to_dict()  # what 0.1.x wrote: no "votes"
    assert "votes" not in old and TransitionModel.from_dict(old).votes is None
    assert repr(chain) == repr(TransitionModel.from_dict(old))


# On a simulated world --------------------------------------------------------------------------------------------


@cache
def _world_run():
    from benchmarks.worlds import preset_world

    train = preset_world("realistic-hurts", 600, seed=0)
    test = preset_world("realistic-hurts", 1000, seed=1)
    calibrator = MarkovCalibrator(train.metric, rounds=1, parallel_samples=8, num_threads=1, question_types=1)
    with dspy.context(lm=train.lm()), pytest.warns(UserWarning, match="different length"):
        scale = calibrator.compile(
            MarkovScale(dspy.Predict("question -> answer"), concurrency=1), trainset=train.examples
        )
    with dspy.context(lm=test.lm()):
        grids = [scale.run_samples([0] * 7, **e.inputs()) for e in test.examples]
    return scale, test, grids


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 3, 5, 7])
def test_predicted_vote_accuracy_matches_observed_on_held_out_questions(n):
    """Calibrate on 600 questions of the realistic 'hurts' world (8 samples each), vote over the first n of 7
    fresh samples per question on 1000 other questions."""
    scale, test, grids = _world_run()
    correct = 0
    for example, chains in zip(test.examples, grids, strict=True):
        keys = [c.prediction.markovscale.trajectory[0]["answer_key"] for c in chains[:n]]
        winner = chains[voting.plurality_winner(keys)].prediction
        correct += test.metric(example, winner)
    observed = correct / len(grids)
    # Observed within the prediction's interval for 1000 questions: the calibration's uncertainty (bootstrap and
    # chain posterior draws) with the binomial sampling of 1000 independent questions on top.
    prediction = scale.plan().prediction(n, 0)
    lo, hi = prediction.predictive_interval(len(grids))
    assert lo <= observed <= hi, (n, prediction.accuracy, observed, (lo, hi))


@pytest.mark.slow
def test_the_truth_of_the_world_agrees_with_the_formula():
    """Exact vote accuracy of the realised test world (its questions' true accuracies and distractor weights)
    against what the samples showed, within the binomial interval: checks the world and the formula together."""
    _, test, grids = _world_run()
    for n in (1, 3, 5, 7):
        truth = np.mean([_exact_vote(n, q.p0, q.distractor_weights) for q in test.questions])
        correct = 0
        for example, chains in zip(test.examples, grids, strict=True):
            keys = [c.prediction.markovscale.trajectory[0]["answer_key"] for c in chains[:n]]
            correct += test.metric(example, chains[voting.plurality_winner(keys)].prediction)
        lo, hi = binomial_interval(correct, len(grids))
        assert lo <= truth <= hi, (n, truth, correct / len(grids))
