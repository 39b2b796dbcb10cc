"""Stopping policies inside MarkovRefine: fixed, closed_form (the paper's rule), belief (per question), custom ones,
and the confidence gate (refine only when P(refinement helps | data) is high enough)."""

import math

import dspy
import numpy as np
import pytest
from helpers import (
    DEGRADING,
    IMPROVING,
    answer_all,
    ask,
    calibrate_one_type,
    calibrated_model,
    model_from_rates,
    refine,
    world,
)

from benchmarks.harness import run_simulation
from benchmarks.worlds import preset_world
from markovscale_dspy import Decision, NotCalibratedError, theory
from markovscale_dspy.evaluate.compare import frontier_at
from markovscale_dspy.testing import SimulatedWorld

# Fixed and closed form -------------------------------------------------------------------------------------------


def test_uncalibrated_closed_form_answers_in_one_call_and_says_so():
    w = world()
    with dspy.context(lm=w.lm()), pytest.warns(UserWarning, match="not calibrated.*MarkovCalibrator"):
        pred = ask(refine(), w)
    assert w.calls == 1 and pred.stop_reason == "uncalibrated"


def test_fixed_policy_runs_max_rounds():
    w = world()
    with dspy.context(lm=w.lm()):
        pred = ask(refine(policy="fixed", max_rounds=3), w)
    assert (pred.rounds, pred.stop_reason, w.calls) == (3, "max_rounds", 4)


def test_fixed_policy_with_zero_rounds_is_one_call():
    w = world()
    with dspy.context(lm=w.lm()):
        pred = ask(refine(policy="fixed", max_rounds=0), w)
    assert (pred.rounds, w.calls) == (0, 1)


def test_closed_form_on_degrading_model_makes_one_call():
    w = world(**DEGRADING)
    module = refine(model=model_from_rates(**DEGRADING), max_rounds=4)
    with dspy.context(lm=w.lm()):
        pred = ask(module, w)
    assert (pred.rounds, pred.stop_reason, w.calls) == (0, "degrading", 1)


def test_closed_form_runs_the_optimal_rounds():
    w = world()
    module = refine(model=model_from_rates(**IMPROVING), max_rounds=8, round_cost=0.01)
    with dspy.context(lm=w.lm()):
        pred = ask(module, w)
    assert pred.rounds == module.model.optimal_rounds(0.01, 8) == 6 and pred.stop_reason == "optimal_rounds"


def test_closed_form_reports_cost_when_gain_too_small():
    module = refine(model=model_from_rates(**IMPROVING), round_cost=0.5)
    w = world()
    with dspy.context(lm=w.lm()):
        assert ask(module, w).stop_reason == "cost"


def test_custom_policy_object_plugs_in():
    class OneRound:
        requires_model = False

        def decide(self, context):
            return Decision(context.rounds_done < 1, "one_round")

    w = world()
    with dspy.context(lm=w.lm()):
        pred = ask(refine(policy=OneRound(), max_rounds=5), w)
    assert (pred.rounds, pred.stop_reason) == (1, "one_round")


def test_model_can_be_shared_between_modules():
    fitted = model_from_rates(**IMPROVING)
    a, b = refine(round_cost=0.0, max_rounds=3), refine(round_cost=0.06, max_rounds=3)  # gains .14 .084 .05
    a.model = b.model = fitted
    assert (a.planned_rounds(), b.planned_rounds()) == (3, 2)


@pytest.mark.slow
def test_degrading_world_costs_exactly_one_call_per_question():
    program = calibrate_one_type(DEGRADING, seed=1, max_rounds=4)
    assert program.model.regime() == "degrading"
    test = SimulatedWorld.homogeneous(400, seed=2, **DEGRADING)
    with dspy.context(lm=test.lm()):
        rounds = [program(**ex.inputs()).rounds for ex in test.examples]
    assert test.calls == 400 and set(rounds) == {0}


@pytest.mark.slow
def test_improving_world_runs_optimal_rounds_and_reaches_predicted_accuracy():
    """3,000 test questions: accuracy within 3 binomial SE of the closed form at the planned rounds."""
    program = calibrate_one_type(IMPROVING, seed=3, max_rounds=6, round_cost=0.02)
    planned = program.model.optimal_rounds(0.02, 6)
    test = SimulatedWorld.homogeneous(3000, seed=4, **IMPROVING)
    evaluate = dspy.Evaluate(devset=test.examples, metric=test.metric, num_threads=8)
    with dspy.context(lm=test.lm()):
        result = evaluate(program)
    rounds = {pred.rounds for _, pred, _ in result.results}
    accuracy = np.mean([score for _, _, score in result.results])
    predicted = theory.accuracy_at(planned, **IMPROVING)
    se = math.sqrt(predicted * (1 - predicted) / len(test.examples))
    print(f"planned {planned} rounds; accuracy {accuracy:.4f} vs predicted {predicted:.4f} (se {se:.4f})")
    assert rounds == {planned} and planned >= 3
    assert abs(accuracy - predicted) <= 3 * se


# The confidence gate ---------------------------------------------------------------------------------------------


MODEST = {"p0": 0.5, "p_cw": 0.15, "p_wc": 0.3}  # refinement helps, by a margin small data cannot be sure of


def test_too_little_calibration_does_not_refine():
    model = calibrated_model(SimulatedWorld.homogeneous(10, seed=2, **MODEST))
    module = refine(model=model, policy="belief", max_rounds=4)
    w = world(5, seed=6)
    with dspy.context(lm=w.lm()):
        pred = module(**w.examples[0].inputs())
    assert model.prob_improves() < 0.9 and pred.rounds == 0 and pred.stop_reason == "uncertain"
    assert w.calls == 1 and pred.stop_info["prob_improves"] == model.prob_improves()


@pytest.mark.slow
def test_enough_calibration_does_refine():
    model = calibrated_model(SimulatedWorld.homogeneous(400, seed=2, **MODEST))
    module = refine(model=model, policy="belief", max_rounds=4)
    w = SimulatedWorld.homogeneous(50, seed=6, **MODEST)
    with dspy.context(lm=w.lm()):
        rounds = [module(**e.inputs()).rounds for e in w.examples]
    assert model.prob_improves() >= 0.9 and sum(rounds) > 0


def test_closed_form_keeps_the_papers_rule_without_a_gate():
    model = calibrated_model(SimulatedWorld.homogeneous(10, seed=2, **MODEST))
    module = refine(model=model, max_rounds=4)
    w = world(5)
    with dspy.context(lm=w.lm()):
        assert module(**w.examples[0].inputs()).rounds == model.optimal_rounds(0.0, 4)


def test_explicit_gate_applies_to_closed_form_too():
    model = calibrated_model(SimulatedWorld.homogeneous(10, seed=2, **MODEST))
    module = refine(model=model, max_rounds=4, min_prob_improves=0.99)
    w = world(5)
    with dspy.context(lm=w.lm()):
        assert module(**w.examples[0].inputs()).rounds == 0


# Belief ----------------------------------------------------------------------------------------------------------


def test_belief_policy_needs_emission_rates():
    module = refine(
        model=model_from_rates(**IMPROVING), policy="belief", min_prob_improves=0.0
    )  # fitted without answers
    w = world()
    with dspy.context(lm=w.lm()), pytest.raises(NotCalibratedError, match="answer-change rates"):
        module(**w.examples[0].inputs())


def test_belief_is_exposed_per_round_and_on_the_prediction(hetero_model):
    module = refine(model=hetero_model, policy="belief", max_rounds=5)
    w = preset_world("heterogeneous", 20, seed=11)
    preds = answer_all(module, w)
    evidence = hetero_model.evidence()
    for pred in preds:
        beliefs = [entry["belief"] for entry in pred.trajectory]
        assert pred.belief == beliefs[-1] and all(0 <= b <= 1 for b in beliefs)
        # What the module shows is the filter over every round's answer identity (the filter itself is checked
        # against Monte Carlo and, without returning answers, against brute force in test_evidence.py).
        keys = [
            tuple(e["answer_key"]) if isinstance(e["answer_key"], list) else e["answer_key"] for e in pred.trajectory
        ]
        failed = [e["error"] is not None for e in pred.trajectory]
        expected = [float(evidence.filter(keys[: t + 1], failed[: t + 1]).correct().sum()) for t in range(len(keys))]
        assert beliefs == pytest.approx(expected, abs=1e-9)


@pytest.mark.slow
def test_belief_policy_on_a_degrading_task_costs_one_call():
    model = calibrated_model(preset_world("hurts", 300, seed=30))
    module = refine(model=model, policy="belief", max_rounds=4)
    w = preset_world("hurts", 100, seed=31)
    with dspy.context(lm=w.lm()):
        reasons = {module(**e.inputs()).stop_reason for e in w.examples}
    assert w.calls == 100 and reasons == {"degrading"}


@pytest.mark.slow
def test_belief_policy_stops_a_stable_answer_early():
    model = calibrated_model(preset_world("heterogeneous", 400, seed=32), rounds=5)
    module = refine(model=model, policy="belief", max_rounds=5)
    w = preset_world("heterogeneous", 200, seed=33)
    preds = answer_all(module, w)
    stable = [p.rounds for e, p in zip(w.examples, preds, strict=True) if w.truth(e).kind == "stable"]
    assert np.mean(stable) < 2 and any(p.stop_reason == "stable_answer" for p in preds)


@pytest.mark.slow
def test_belief_policy_dominates_the_fixed_frontier_on_a_heterogeneous_world():
    result = run_simulation("heterogeneous", n_train=600, n_test=1000, max_rounds=6, round_cost=0.0, seed=0)
    fixed = result.fixed()
    belief, closed = result.by_name("belief"), result.by_name("closed_form")
    oracle = result.by_name("parameter oracle")
    best_fixed = max(r.accuracy for r in fixed)
    frontier = frontier_at(fixed, belief.mean_calls)
    print(f"\n{result.model}")
    for r in result.results:
        per_call = r.accuracy / r.mean_calls
        print(f"  {r.name:24s} accuracy {r.accuracy:.3f}  calls/q {r.mean_calls:.2f}  acc/call {per_call:.3f}")
    print(f"  belief vs fixed frontier at {belief.mean_calls:.2f} calls: {belief.accuracy:.3f} vs {frontier:.3f}")
    print(
        f"  gap to the parameter oracle: {oracle.accuracy - belief.accuracy:+.3f} "
        f"(oracle uses {oracle.mean_calls:.2f} calls/q)"
    )
    assert belief.accuracy >= best_fixed - 0.01
    assert belief.accuracy >= frontier + 0.02
    assert belief.accuracy / belief.mean_calls > closed.accuracy / closed.mean_calls
