"""MarkovRefine.answer_with_budget: a batch shares a budget of refinement rounds, each round going to the question
where it is expected to gain most."""

import dspy
import numpy as np
import pytest
from helpers import brute_force_belief_and_gain, refine, world

from benchmarks.worlds import preset_world
from markovscale_dspy.core.policies import evidence_for


def recorded_gain(model, rounds):
    evidence, bins = evidence_for(model, [e.get("confidence") for e in rounds], len(rounds) - 1)
    point = evidence.subset(slice(0, 1))
    keys = [tuple(e["answer_key"]) if isinstance(e["answer_key"], list) else e["answer_key"] for e in rounds]
    belief = point.filter(keys, [e["error"] is not None for e in rounds], bins)
    return point.expected_gain(belief)


@pytest.mark.parametrize("threads", [1, 4])
def test_budget_is_never_exceeded_and_goes_to_the_highest_gains(hetero_model, threads):
    module = refine(model=hetero_model, max_rounds=5)
    w = preset_world("heterogeneous", 60, seed=13)
    with dspy.context(lm=w.lm()):
        result = module.answer_with_budget(w.examples, budget=50, num_threads=threads)
    assert result.spent <= 50 and sum(p.rounds for p in result.predictions) == result.spent
    assert w.calls == 60 + result.spent
    for entry in result.log:
        assert entry["best_unchosen_gain"] is None or entry["gain"] >= entry["best_unchosen_gain"] - 1e-12
    # Oracle: replay the allocation step by step from the predictions' trajectories. Before each step, every question's
    # expected gain of one more round is recomputed from its recorded rounds with the belief filter over answer
    # identities and confidence (itself checked against Monte Carlo and brute force in test_evidence.py), not read
    # from the log; the questions chosen at a step must have gains at least as high as every question left out.
    trajectories = [p.markovscale.trajectory for p in result.predictions]
    done = [0] * len(w.examples)
    by_step = {}
    for entry in result.log:
        by_step.setdefault(entry["step"], []).append(entry)
    for step in sorted(by_step):
        gains = {
            i: recorded_gain(hetero_model, trajectories[i][: done[i] + 1])
            for i in range(len(done))
            if done[i] < module.max_rounds
        }
        chosen = [entry["index"] for entry in by_step[step]]
        for entry in by_step[step]:
            assert entry["round"] == done[entry["index"]] + 1
            assert entry["gain"] == pytest.approx(gains[entry["index"]], abs=1e-12)
        left_out = [gain for i, gain in gains.items() if i not in chosen]
        assert not left_out or min(gains[i] for i in chosen) >= max(left_out) - 1e-12
        for i in chosen:
            done[i] += 1
    assert done == [p.rounds for p in result.predictions]
    if result.spent < 50:  # stopped early: no question had a round left that was expected to gain anything
        assert all(
            recorded_gain(hetero_model, trajectories[i][: done[i] + 1]) <= 1e-9
            for i in range(len(done))
            if done[i] < module.max_rounds
        )


def test_budget_prefers_questions_whose_answers_keep_changing(hetero_model):
    module = refine(model=hetero_model, max_rounds=5)
    w = preset_world("heterogeneous", 90, seed=14)
    with dspy.context(lm=w.lm()):
        result = module.answer_with_budget(w.examples, budget=60, num_threads=1)
    rounds_by_kind = {}
    for example, pred in zip(w.examples, result.predictions, strict=True):
        rounds_by_kind.setdefault(w.truth(example).kind, []).append(pred.rounds)
    mean = {kind: np.mean(r) for kind, r in rounds_by_kind.items()}
    assert mean["fixable"] > mean["stable"], mean


def test_zero_budget_answers_in_one_call_each(hetero_model):
    module = refine(model=hetero_model, max_rounds=5)
    w = world(10)
    with dspy.context(lm=w.lm()):
        result = module.answer_with_budget(w.examples, budget=0)
    assert result.spent == 0 and w.calls == 10 and {p.stop_reason for p in result.predictions} <= {"budget", "cost"}
    # Oracle: before any refinement every question has the same belief, p0 of the fitted types, so the same expected
    # gain of a first round; the budget (0) stopped them if that gain beats the round cost (0), else the cost did.
    first_gain = brute_force_belief_and_gain(hetero_model.hidden_chains(), [])[1]
    expected = "budget" if first_gain > 1e-9 else "cost"
    assert [p.stop_reason for p in result.predictions] == [expected] * 10
