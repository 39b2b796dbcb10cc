"""The core issue's statistical acceptance checks, against simulated worlds whose truth is known.

Tolerances come from standard errors: estimates within 3 posterior SE of the truth, accuracies within 3 binomial SE.
"""

import asyncio
import math

import dspy
import numpy as np
import pytest
from helpers import DEGRADING, IMPROVING, refine

from markovscale_dspy import MarkovCalibrator, theory
from markovscale_dspy.testing import SimulatedWorld

PARAMS = ("p0", "p_cw", "p_wc")


def calibrate(params, seed, n=300, rounds=4, num_threads=1, **refine_kwargs):
    w = SimulatedWorld.homogeneous(n, seed=seed, **params)
    # One population chain is the model under test here (question types are tested in test_beyond.py).
    calibrator = MarkovCalibrator(w.metric, rounds=rounds, num_threads=num_threads, question_types=1)
    with dspy.context(lm=w.lm()):
        return calibrator.compile(refine(**refine_kwargs), trainset=w.examples)


def test_calibration_recovers_parameters_within_three_standard_errors():
    model = calibrate(IMPROVING, seed=0).model
    for name in PARAMS:
        estimate, se = getattr(model, name), model.standard_error(name)
        print(f"{name}: truth {IMPROVING[name]:.3f} estimate {estimate:.3f} se {se:.4f}")
        assert abs(estimate - IMPROVING[name]) <= 3 * se


@pytest.mark.slow
def test_95_percent_intervals_cover_the_truth_in_90_percent_of_50_repetitions():
    covered = dict.fromkeys(PARAMS, 0)
    for seed in range(50):
        model = calibrate(IMPROVING, seed=100 + seed).model
        for name in PARAMS:
            lo, hi = model.interval(name, 0.95)
            covered[name] += lo <= IMPROVING[name] <= hi
    print("coverage out of 50:", covered)
    assert all(count >= 45 for count in covered.values())


def test_degrading_world_costs_exactly_one_call_per_question():
    program = calibrate(DEGRADING, seed=1, max_rounds=4)
    assert program.model.regime() == "degrading"
    test = SimulatedWorld.homogeneous(400, seed=2, **DEGRADING)
    with dspy.context(lm=test.lm()):
        rounds = [program(**ex.inputs()).rounds for ex in test.examples]
    assert test.calls == 400 and set(rounds) == {0}


def test_improving_world_runs_optimal_rounds_and_reaches_predicted_accuracy():
    program = calibrate(IMPROVING, seed=3, max_rounds=6, round_cost=0.02)
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


def answers(program, seed, mode):
    w = SimulatedWorld.homogeneous(200, seed=seed, **IMPROVING)
    with dspy.context(lm=w.lm()):
        if mode == "sequential":
            return [program(**ex.inputs()).answer for ex in w.examples]
        if mode == "evaluate":
            result = dspy.Evaluate(devset=w.examples, metric=w.metric, num_threads=8)(program)
            return [pred.answer for _, pred, _ in result.results]

        async def run():
            return [p.answer for p in await asyncio.gather(*(program.acall(**ex.inputs()) for ex in w.examples))]

        return asyncio.run(run())


def test_evaluate_with_8_threads_and_acall_match_sequential_calls():
    program = calibrate(IMPROVING, seed=5, max_rounds=4)
    sequential = answers(program, 6, "sequential")
    assert answers(program, 6, "evaluate") == sequential
    assert answers(program, 6, "async") == sequential


def test_save_then_load_in_a_fresh_module_gives_identical_predictions(tmp_path):
    program = calibrate(IMPROVING, seed=7, max_rounds=4)
    program.save(tmp_path / "refine.json")
    fresh = refine(max_rounds=4)
    fresh.load(tmp_path / "refine.json")
    assert fresh.model == program.model
    assert answers(fresh, 8, "sequential") == answers(program, 8, "sequential")
