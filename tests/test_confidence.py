"""Issue 12: answer confidence from token log-probabilities, as an observation of the belief policy."""

import math
import random
from types import SimpleNamespace

import dspy
import numpy as np
import pytest
from helpers import IMPROVING, refine

from benchmarks.harness import world_study
from benchmarks.worlds import preset_world
from markovscale_dspy import MarkovCalibrator, MarkovRefine, TransitionModel
from markovscale_dspy.core.confidence import auroc, select_confidence
from markovscale_dspy.refine.logprobs import answer_confidence
from markovscale_dspy.testing import SimulatedWorld, simulated_confidence


def logprobs(*pairs):
    return {"content": [{"token": token, "logprob": lp, "top_logprobs": []} for token, lp in pairs]}


# The definition --------------------------------------------------------------------------------------------------


def test_chat_adapter_confidence_counts_only_the_answer_tokens():
    lp = logprobs(
        ("[[ ## reasoning ## ]]\n", 0.0),
        ("It is", -1.5),  # reasoning tokens never count
        (" 42.", -2.0),
        ("\n\n[[ ## answer ## ]]\n", 0.0),
        ("4", -0.1),
        ("2", -0.2),
        ("\n\n[[ ## completed ## ]]", 0.0),
    )
    assert answer_confidence({"answer": "42", "logprobs": lp}, ["answer"]) == pytest.approx(math.exp(-0.3))


def test_json_adapter_confidence_reads_the_value_inside_its_quotes():
    # the letter shares a token with its closing quote, as tokenizers often do: that token is the letter's
    lp = logprobs(('{"reasoning": "x", "answer": "', 0.0), ('B"', -0.4), ("}", 0.0))
    assert answer_confidence({"logprobs": lp}, ["answer"]) == pytest.approx(math.exp(-0.4))
    number = logprobs(('{"answer": ', 0.0), ("4", -0.5), ("2", -0.5), ("}", 0.0))
    assert answer_confidence({"logprobs": number}, ["answer"]) == pytest.approx(math.exp(-1.0))


def test_xml_and_litellm_shapes_and_several_fields():
    xml = logprobs(("<answer>", 0.0), ("C", -0.7), ("</answer>", 0.0))
    assert answer_confidence({"logprobs": xml}, ["answer"]) == pytest.approx(math.exp(-0.7))
    objects = SimpleNamespace(
        content=[SimpleNamespace(token=t, logprob=lp) for t, lp in [('{"answer": "', 0.0), ("D", -0.2), ('"}', 0.0)]]
    )
    assert answer_confidence(SimpleNamespace(logprobs=objects), ["answer"]) == pytest.approx(math.exp(-0.2))
    two = logprobs(('{"city": "', 0.0), ("Paris", -0.1), ('", "country": "', 0.0), ("France", -0.3), ('"}', 0.0))
    assert answer_confidence({"logprobs": two}, ["city", "country"]) == pytest.approx(math.exp(-0.4))


@pytest.mark.parametrize(
    "prediction",
    [
        {"answer": "42"},  # no logprobs: the LM gave none
        {"logprobs": None},
        {"logprobs": {"content": []}},
        {"logprobs": logprobs(('{"other": "', 0.0), ("x", -0.1), ('"}', 0.0))},  # the answer field is not there
        {"logprobs": {"content": [{"token": "x"}]}},  # malformed
    ],
)
def test_no_confidence_when_the_tokens_say_nothing_about_the_answer(prediction):
    assert answer_confidence(prediction, ["answer"]) is None


# The simulated world's confidence --------------------------------------------------------------------------------


def _auroc_se(a, n_pos, n_neg):
    """Hanley & McNeil standard error of an AUROC."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return math.sqrt((a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg))


@pytest.mark.parametrize("target", [0.5, 0.65, 0.8, 0.95])
def test_simulated_confidence_has_the_requested_auroc(target):
    rng = random.Random(f"auroc|{target}")
    labels = [i % 2 == 0 for i in range(4000)]
    scores = [simulated_confidence(x, target, rng) for x in labels]
    measured = auroc(scores, labels)
    assert abs(measured - target) <= 3 * _auroc_se(target, 2000, 2000)


@pytest.mark.parametrize("adapter", [dspy.ChatAdapter, dspy.JSONAdapter])
@pytest.mark.parametrize("module", [dspy.Predict, dspy.ChainOfThought])
def test_every_round_carries_its_confidence_through_dspy(adapter, module):
    """The world's engine returns logprobs like a server; DSPy puts them on the prediction; each round's answer
    gets a confidence -- with either adapter, with or without reasoning."""
    world = SimulatedWorld.homogeneous(40, seed=3, confidence_auroc=0.8, **IMPROVING)
    program = MarkovRefine(module("question -> answer"), policy="fixed", max_rounds=2)
    with dspy.context(lm=world.lm(logprobs=True), adapter=adapter()):
        preds = [program(**e.inputs()) for e in world.examples]
    values = [entry["confidence"] for p in preds for entry in p.trajectory]
    assert len(values) == 40 * 3 and all(0.0 < v < 1.0 for v in values)


def test_confidence_never_changes_an_answer_and_needs_logprobs():
    world = SimulatedWorld.homogeneous(30, seed=4, confidence_auroc=0.8, **IMPROVING)
    program = MarkovRefine(dspy.Predict("question -> answer"), policy="fixed", max_rounds=3)

    def run(**lm_kwargs):
        w = world.fresh()
        with dspy.context(lm=w.lm(**lm_kwargs)):
            return [program(**e.inputs()).trajectory for e in w.examples]

    with_lp, without = run(logprobs=True), run()
    assert [[e["answer_key"] for e in t] for t in with_lp] == [[e["answer_key"] for e in t] for t in without]
    assert all("confidence" in e for t in with_lp for e in t)
    assert not any("confidence" in e for t in without for e in t)


def test_the_trajectory_confidence_separates_right_from_wrong_as_the_world_says():
    world = SimulatedWorld.homogeneous(250, seed=5, confidence_auroc=0.8, **IMPROVING)
    program = MarkovRefine(dspy.Predict("question -> answer"), policy="fixed", max_rounds=2)
    scores, labels = [], []
    with dspy.context(lm=world.lm(logprobs=True)):
        for example in world.examples:
            for entry in program(**example.inputs()).trajectory:
                scores.append(entry["confidence"])
                labels.append(world.metric(example, dspy.Prediction(**entry["outputs"])))
    measured = auroc(scores, labels)
    print(f"AUROC of the recorded confidence: {measured:.3f} on {len(labels)} answers")
    assert abs(measured - 0.8) <= 3 * _auroc_se(0.8, sum(labels), len(labels) - sum(labels))


def test_confidence_option_asks_for_logprobs_and_keeps_outputs_clean():
    world = SimulatedWorld.homogeneous(10, seed=6, confidence_auroc=0.8, **IMPROVING)
    asked = MarkovRefine(dspy.Predict("question -> answer"), policy="fixed", max_rounds=2, confidence=True)
    ignored = MarkovRefine(dspy.Predict("question -> answer"), policy="fixed", max_rounds=2, confidence=False)
    custom = MarkovRefine(
        dspy.Predict("question -> answer"), policy="fixed", max_rounds=1, confidence=lambda prediction: 0.25
    )
    with dspy.context(lm=world.lm()):  # an LM that does not ask for logprobs itself
        pred = asked(**world.examples[0].inputs())
        assert all(0 < e["confidence"] < 1 for e in pred.trajectory)
        assert "logprobs" not in pred and all("logprobs" not in e["outputs"] for e in pred.trajectory)
        assert all(e.get("confidence") == 0.25 for e in custom(**world.examples[1].inputs()).trajectory)
    with dspy.context(lm=world.lm(logprobs=True)):
        assert not any("confidence" in e for e in ignored(**world.examples[2].inputs()).trajectory)
    with pytest.raises(Exception, match="confidence must be"):
        MarkovRefine(dspy.Predict("question -> answer"), confidence="yes")


# Calibration -----------------------------------------------------------------------------------------------------


def calibrate(world, logprobs=True, rounds=3, **kwargs):
    calibrator = MarkovCalibrator(world.metric, rounds=rounds, num_threads=1, store_traces=False, **kwargs)
    with dspy.context(lm=world.fresh().lm(logprobs=logprobs)):
        return calibrator.compile(refine(max_rounds=rounds), trainset=world.examples).model


@pytest.fixture(scope="module")
def informative_model():
    return calibrate(SimulatedWorld.homogeneous(200, seed=7, confidence_auroc=0.8, **IMPROVING))


def test_calibration_fits_the_confidence_per_state(informative_model):
    fit = informative_model.confidence
    ratios = fit.likelihood_ratios()
    print(f"{informative_model!r}\nlikelihood ratios by bin: {np.round(ratios, 2)}")
    assert fit.bins >= 2 and ratios[0] < 1 < ratios[-1]
    assert abs(fit.auroc - 0.8) <= 3 * _auroc_se(0.8, 300, 500)  # about 800 answers, 40% of them correct
    assert fit.heldout_gain[0] > 2 * fit.heldout_gain[1]


def test_confidence_model_survives_save_and_load(informative_model, tmp_path):
    module = refine(model=informative_model, policy="belief")
    module.save(tmp_path / "s.json")
    fresh = refine(policy="belief")
    fresh.load(tmp_path / "s.json")
    assert fresh.model == informative_model and fresh.model.confidence == informative_model.confidence


def test_states_saved_before_confidence_still_load():
    old = {  # what markovscale_dspy 0.2 wrote: format 1, no answer returns, no confidence
        "format": "markovscale.transition_model/1",
        "counts": {
            "n0_correct": 40,
            "n0_total": 100,
            "n_cc": 90,
            "n_cw": 10,
            "n_wc": 60,
            "n_ww": 140,
            "n_cc_changed": 0,
            "n_ww_same": 70,
        },
        "prior": [1.0, 1.0],
        "mixture": {
            "weights": [0.5, 0.5],
            "p0": [0.6, 0.2],
            "p_cw": [0.1, 0.1],
            "p_wc": [0.1, 0.5],
            "p_same_wrong": [0.9, 0.3],
            "p_change_correct": [0.0, 0.0],
            "loglik": -3.0,
            "heldout": [[1, -3.1], [2, -3.0]],
        },
    }
    model = TransitionModel.from_dict(old)
    assert model.confidence is None and model.n_return_hit is None and model.p_return is None
    world = SimulatedWorld.homogeneous(5, seed=8, **IMPROVING)
    module = refine(model=model, policy="belief")
    with dspy.context(lm=world.lm()):
        assert module(**world.examples[0].inputs()).stop_reason


def test_without_logprobs_the_world_gives_no_confidence_and_the_fit_is_unchanged():
    world = SimulatedWorld.homogeneous(150, seed=9, **IMPROVING)  # a provider without logprobs
    asked, plain = calibrate(world, logprobs=True), calibrate(world, logprobs=False)
    assert asked.confidence is None and asked == plain


def _decisions(model, world, logprobs, n=80, **kwargs):
    module = refine(model=model, policy="belief", max_rounds=3, **kwargs)
    w = world.fresh()
    with dspy.context(lm=w.lm(logprobs=logprobs)):
        preds = [module(**e.inputs()) for e in w.examples[:n]]
    return [(p.rounds, p.stop_reason, p.selected_round, [e["answer_key"] for e in p.trajectory]) for p in preds]


def test_answers_without_logprobs_get_exactly_the_decisions_of_a_model_without_confidence(informative_model):
    world = SimulatedWorld.homogeneous(80, seed=10, confidence_auroc=0.8, **IMPROVING)
    blind = informative_model.without_confidence()
    assert _decisions(informative_model, world, logprobs=False) == _decisions(blind, world, logprobs=False)
    assert _decisions(informative_model, world, False, select="best") == _decisions(blind, world, False, select="best")


def test_uninformative_confidence_is_dropped_by_the_fit():
    rng = np.random.default_rng(11)
    labels = [[bool(rng.random() < 0.5) for _ in range(4)] for _ in range(400)]
    noise = [[float(rng.random()) for _ in chain] for chain in labels]
    assert select_confidence(labels, noise) is None


@pytest.mark.slow
def test_at_auroc_one_half_belief_equals_the_policy_without_confidence():
    """Same questions, same answers; one world's answers carry a confidence with AUROC 0.5. The fit finds nothing in
    it, so the calibrated model and every decision are those of the world without confidence."""
    kwargs = {"p0": 0.45, "p_cw": 0.15, "p_wc": 0.35, "p_same_wrong": 0.6}
    noisy = SimulatedWorld.homogeneous(400, seed=12, confidence_auroc=0.5, **kwargs)
    silent = SimulatedWorld.homogeneous(400, seed=12, **kwargs)
    with_conf, without = calibrate(noisy, rounds=3), calibrate(silent, logprobs=False, rounds=3)
    print(f"AUROC 0.5: {with_conf!r}\nno logprobs: {without!r}")
    assert with_conf.confidence is None and with_conf == without
    test_noisy = SimulatedWorld.homogeneous(200, seed=13, confidence_auroc=0.5, **kwargs)
    test_silent = SimulatedWorld.homogeneous(200, seed=13, **kwargs)
    a = _decisions(with_conf, test_noisy, logprobs=True, n=200)
    b = _decisions(without, test_silent, logprobs=False, n=200)
    rounds = sum(x[0] for x in a)
    print(f"identical decisions on {len(a)} questions ({rounds} refinement rounds)")
    assert a == b and rounds > 0


# Done when: the gain on a heterogeneous world, as a function of how informative confidence is ------------------


@pytest.mark.slow
def test_confidence_with_auroc_08_closes_the_gap_to_the_parameter_oracle():
    """The heterogeneous preset (fixable, stable, fragile questions), 400 calibration / 1500 test questions, 4 rounds.

    With confidence of AUROC 0.8 and ``select="best"``, belief reaches the best fixed-N accuracy at <= 50% of its
    calls and closes at least half of the same/changed-only gap to the parameter oracle (same select, round cost
    0.01). ``select="last"`` is printed beside it.
    """
    train = preset_world("heterogeneous", 400, seed=20, confidence_auroc=0.8)
    test = preset_world("heterogeneous", 1500, seed=21, confidence_auroc=0.8)
    rows = {}
    for select in ("best", "last"):
        for logprobs in (True, False):
            rows[select, logprobs] = world_study(
                train,
                test,
                costs=(0.0, 0.01, 0.02, 0.05, 0.1),
                select=select,
                logprobs=logprobs,
                oracle=select == "best",
            )
    oracle = rows["best", True].oracle
    best_fixed = rows["best", True].best_fixed()
    print(f"\nbest fixed-N: {best_fixed.name} {best_fixed.accuracy:.3f} at {best_fixed.mean_calls:.2f} calls")
    print(f"model with confidence: {rows['best', True].model!r}")
    for (select, logprobs), study in rows.items():
        for cost, r in study.policy.items():
            o = oracle[cost]
            print(
                f"  select={select:4s} confidence={logprobs!s:5s} cost {cost:<4g}: {r.accuracy:.3f} at "
                f"{r.mean_calls:.2f} calls (oracle {o.accuracy:.3f} at {o.mean_calls:.2f})"
            )
    for select in ("best", "last"):
        conf, plain, o = rows[select, True].policy[0.01], rows[select, False].policy[0.01], oracle[0.01]
        closure = (conf.accuracy - plain.accuracy) / (o.accuracy - plain.accuracy)
        print(f"  select={select}: confidence closes {closure:.0%} of the same/changed-only gap at cost 0.01")
    study = rows["best", True]
    reaching = [r for r in study.policy.values() if r.accuracy >= best_fixed.accuracy]
    cheapest = min(reaching, key=lambda r: r.mean_calls)
    share = cheapest.mean_calls / best_fixed.mean_calls
    print(f"  cheapest setting at the best fixed-N accuracy: {cheapest.name}, {share:.0%} of its calls")
    conf, plain, o = study.policy[0.01], rows["best", False].policy[0.01], oracle[0.01]
    assert cheapest.mean_calls <= 0.5 * best_fixed.mean_calls
    assert conf.accuracy - plain.accuracy >= 0.5 * (o.accuracy - plain.accuracy)
