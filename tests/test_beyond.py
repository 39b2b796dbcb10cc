"""Issue 4: per-question belief, question types, robust decisions, answer selection and batch budgets."""

import itertools

import dspy
import numpy as np
import pytest
from helpers import IMPROVING, model_from_rates, refine, world

from benchmarks.harness import run_simulation
from benchmarks.worlds import preset_world
from markovscale_dspy import MarkovCalibrator, NotCalibratedError, TransitionModel
from markovscale_dspy.core.mixture import chain_statistics, fit_mixture, select_mixture
from markovscale_dspy.reporting.compare import frontier_at
from markovscale_dspy.testing import SimulatedWorld


def calibrated(w, rounds=4, **kwargs):
    calibrator = MarkovCalibrator(w.metric, rounds=rounds, num_threads=1, **kwargs)
    with dspy.context(lm=w.lm()):
        return calibrator.compile(refine(max_rounds=rounds), trainset=w.examples).model


# Emission rates -------------------------------------------------------------------------------------------------


def test_calibration_estimates_answer_stickiness_within_three_standard_errors():
    model = calibrated(SimulatedWorld.homogeneous(300, seed=2, p_same_wrong=0.7, **IMPROVING), question_types=1)
    se = model.standard_error("p_same_wrong")
    assert abs(model.p_same_wrong - 0.7) <= 3 * se


def test_calibration_estimates_rewording_of_correct_answers():
    w = SimulatedWorld.homogeneous(300, seed=3, p_change_correct=0.3, **IMPROVING)
    calibrator = MarkovCalibrator(w.metric, rounds=4, num_threads=1, question_types=1)
    module = refine(max_rounds=4, answer_key=lambda outputs: str(outputs["answer"]))  # raw text: "42" != "42.0"
    with dspy.context(lm=w.lm()):
        model = calibrator.compile(module, trainset=w.examples).model
    assert abs(model.p_change_correct - 0.3) <= 3 * model.standard_error("p_change_correct")


def test_emission_counts_survive_save_and_load(tmp_path):
    module = refine()
    module.model = TransitionModel.fit([[False, False, True], [True, True, True]], answers=[[1, 1, 2], [5, 6, 6]])
    module.save(tmp_path / "s.json")
    fresh = refine()
    fresh.load(tmp_path / "s.json")
    assert (fresh.model.n_ww_same, fresh.model.n_cc_changed) == (1, 1) and fresh.model == module.model


def test_belief_policy_needs_emission_rates():
    module = refine(policy="belief", min_prob_improves=0.0)
    module.model = model_from_rates(**IMPROVING)  # fitted without answers
    w = world()
    with dspy.context(lm=w.lm()), pytest.raises(NotCalibratedError, match="answer-change rates"):
        module(**w.examples[0].inputs())


# Question types (mixture of chains) ------------------------------------------------------------------------------


def two_type_chains(n, seed):
    rng = np.random.default_rng(seed)
    labels, answers = [], []
    for i in range(n):
        stable = i % 2 == 0
        p0, p_cw, p_wc = (0.8, 0.0, 0.0) if stable else (0.2, 0.1, 0.6)
        x = rng.random() < p0
        chain, keys, key = [x], [0], 0
        for _ in range(4):
            nxt = (rng.random() >= p_cw) if x else (rng.random() < p_wc)
            if nxt != x or (not x and not stable and rng.random() < 0.7):
                key += 1  # a change of correctness always changes the answer; unstable wrong answers wander
            x = nxt
            chain.append(bool(x))
            keys.append(key)
        labels.append(chain)
        answers.append(keys)
    return chain_statistics(labels, answers)


def test_em_recovers_two_question_types():
    mixture = fit_mixture(two_type_chains(2000, seed=0), 2)
    assert mixture.weights == pytest.approx((0.5, 0.5), abs=0.05)
    assert mixture.p0 == pytest.approx((0.8, 0.2), abs=0.05) and mixture.p_wc[1] == pytest.approx(0.6, abs=0.05)


def test_held_out_likelihood_finds_two_types():
    assert select_mixture(two_type_chains(600, seed=1)).components == 2


def test_held_out_likelihood_keeps_one_type_for_a_homogeneous_world():
    model = calibrated(SimulatedWorld.homogeneous(300, seed=4, **IMPROVING))
    assert model.mixture is None


def test_mixture_round_trips_through_json(tmp_path):
    model = TransitionModel.fit([[True]]).with_mixture(fit_mixture(two_type_chains(200, seed=2), 2))
    assert TransitionModel.from_dict(model.to_dict()) == model


# Robust decisions ------------------------------------------------------------------------------------------------


MODEST = {"p0": 0.5, "p_cw": 0.15, "p_wc": 0.3}  # refinement helps, by a margin small data cannot be sure of


def test_too_little_calibration_does_not_refine():
    model = calibrated(SimulatedWorld.homogeneous(10, seed=2, **MODEST))
    module = refine(policy="belief", max_rounds=4)
    module.model = model
    w = world(5, seed=6)
    with dspy.context(lm=w.lm()):
        pred = module(**w.examples[0].inputs())
    assert model.prob_improves() < 0.9 and pred.rounds == 0 and pred.stop_reason == "uncertain"
    assert w.calls == 1 and pred.stop_info["prob_improves"] == model.prob_improves()


def test_enough_calibration_does_refine():
    model = calibrated(SimulatedWorld.homogeneous(400, seed=2, **MODEST))
    module = refine(policy="belief", max_rounds=4)
    module.model = model
    w = SimulatedWorld.homogeneous(50, seed=6, **MODEST)
    with dspy.context(lm=w.lm()):
        rounds = [module(**e.inputs()).rounds for e in w.examples]
    assert model.prob_improves() >= 0.9 and sum(rounds) > 0


def test_closed_form_keeps_the_papers_rule_without_a_gate():
    model = calibrated(SimulatedWorld.homogeneous(10, seed=2, **MODEST))
    module = refine(max_rounds=4)
    module.model = model
    w = world(5)
    with dspy.context(lm=w.lm()):
        assert module(**w.examples[0].inputs()).rounds == model.optimal_rounds(0.0, 4)


def test_explicit_gate_applies_to_closed_form_too():
    model = calibrated(SimulatedWorld.homogeneous(10, seed=2, **MODEST))
    module = refine(max_rounds=4, min_prob_improves=0.99)
    module.model = model
    w = world(5)
    with dspy.context(lm=w.lm()):
        assert module(**w.examples[0].inputs()).rounds == 0


# Belief in the trajectory and answer selection ------------------------------------------------------------------


@pytest.fixture(scope="module")
def hetero_model():
    return calibrated(preset_world("heterogeneous", 400, seed=10), rounds=5)


def test_belief_is_exposed_per_round_and_on_the_prediction(hetero_model):
    module = refine(policy="belief", max_rounds=5)
    module.model = hetero_model
    w = preset_world("heterogeneous", 20, seed=11)
    with dspy.context(lm=w.lm()):
        pred = module(**w.examples[0].inputs())
    beliefs = [entry["belief"] for entry in pred.trajectory]
    assert pred.belief == beliefs[-1] and all(0 <= b <= 1 for b in beliefs)


def test_select_best_returns_the_round_with_the_highest_smoothed_posterior(hetero_model):
    module = refine(policy="fixed", max_rounds=4, select="best")
    module.model = hetero_model
    w = preset_world("heterogeneous", 40, seed=12)
    with dspy.context(lm=w.lm()):
        preds = [module(**e.inputs()) for e in w.examples]
    for pred in preds:
        best = int(np.argmax(np.array(pred.posteriors) + 1e-12 * np.arange(len(pred.posteriors))))
        assert pred.selected_round == best and pred.answer == pred.trajectory[best]["outputs"]["answer"]


def test_select_best_needs_a_calibrated_model():
    w = world()
    with dspy.context(lm=w.lm()), pytest.raises(NotCalibratedError, match="select='best'"):
        refine(policy="fixed", select="best")(**w.examples[0].inputs())


# Batch budgets ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 4])
def test_budget_is_never_exceeded_and_goes_to_the_highest_gains(hetero_model, threads):
    module = refine(max_rounds=5)
    module.model = hetero_model
    w = preset_world("heterogeneous", 60, seed=13)
    with dspy.context(lm=w.lm()):
        result = module.answer_with_budget(w.examples, budget=50, num_threads=threads)
    assert result.spent <= 50 and sum(p.rounds for p in result.predictions) == result.spent
    assert w.calls == 60 + result.spent
    for entry in result.log:
        assert entry["best_unchosen_gain"] is None or entry["gain"] >= entry["best_unchosen_gain"] - 1e-12


def test_budget_prefers_questions_whose_answers_keep_changing(hetero_model):
    module = refine(max_rounds=5)
    module.model = hetero_model
    w = preset_world("heterogeneous", 90, seed=14)
    with dspy.context(lm=w.lm()):
        result = module.answer_with_budget(w.examples, budget=60, num_threads=1)
    rounds_by_kind = {}
    for example, pred in zip(w.examples, result.predictions, strict=True):
        rounds_by_kind.setdefault(w.truth(example).kind, []).append(pred.rounds)
    mean = {kind: np.mean(r) for kind, r in rounds_by_kind.items()}
    print("mean rounds by kind:", mean)
    assert mean["fixable"] > mean["stable"]


def test_zero_budget_answers_in_one_call_each(hetero_model):
    module = refine(max_rounds=5)
    module.model = hetero_model
    w = world(10)
    with dspy.context(lm=w.lm()):
        result = module.answer_with_budget(w.examples, budget=0)
    assert result.spent == 0 and w.calls == 10 and {p.stop_reason for p in result.predictions} <= {"budget", "cost"}


# The acceptance run on a heterogeneous world ---------------------------------------------------------------------


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


@pytest.mark.slow
def test_belief_is_calibrated():
    """Among questions whose belief falls in a bin, the share actually correct matches the bin."""
    model = calibrated(preset_world("heterogeneous", 600, seed=20), rounds=5)
    module = refine(policy="fixed", max_rounds=5)
    module.model = model
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


def test_belief_policy_on_a_degrading_task_costs_one_call():
    model = calibrated(preset_world("hurts", 300, seed=30))
    module = refine(policy="belief", max_rounds=4)
    module.model = model
    w = preset_world("hurts", 100, seed=31)
    with dspy.context(lm=w.lm()):
        reasons = {module(**e.inputs()).stop_reason for e in w.examples}
    assert w.calls == 100 and reasons == {"degrading"}


def test_belief_policy_stops_a_stable_answer_early():
    model = calibrated(preset_world("heterogeneous", 400, seed=32), rounds=5)
    module = refine(policy="belief", max_rounds=5)
    module.model = model
    w = preset_world("heterogeneous", 200, seed=33)
    with dspy.context(lm=w.lm()):
        preds = [module(**e.inputs()) for e in w.examples]
    stable = [p.rounds for e, p in zip(w.examples, preds, strict=True) if w.truth(e).kind == "stable"]
    assert np.mean(stable) < 2 and any(p.stop_reason == "stable_answer" for p in preds)
