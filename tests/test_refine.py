"""MarkovRefine as a DSPy module, driven by the simulated world."""

import asyncio
import copy

import dspy
import pytest
from helpers import DEGRADING, IMPROVING, model_from_rates, refine, world

from markovscale_dspy import (
    ConfigurationError,
    Decision,
    MarkovRefine,
    NotCalibratedError,
    RoundZeroError,
    StateError,
    TransitionModel,
)
from markovscale_dspy.testing import SimulatedWorld


def ask(module, w, i=0):
    return module(**w.examples[i].inputs())


# Construction --------------------------------------------------------------------------------------------------


def test_refiner_sees_previous_answer_and_produces_answer():
    sig = refine().refiner.signature
    assert list(sig.input_fields) == ["question", "previous_answer"] and list(sig.output_fields) == ["answer"]


def test_refiner_of_chain_of_thought_reasons_too():
    module = MarkovRefine(dspy.ChainOfThought("question -> answer"))
    assert list(module.refiner.predict.signature.output_fields) == ["reasoning", "answer"]


def test_previous_field_keeps_the_output_type():
    module = MarkovRefine(dspy.Predict("question -> answer: int"))
    assert module.refiner.signature.input_fields["previous_answer"].annotation is int


def test_refiner_is_an_optimizable_predictor():
    names = [name for name, _ in refine().named_predictors()]
    assert names == ["program", "refiner"]


def test_multi_predictor_program_needs_a_signature():
    class Two(dspy.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = dspy.Predict("question -> draft"), dspy.Predict("draft -> answer")

    with pytest.raises(ConfigurationError, match="it has 2 predictors. Pass signature="):
        MarkovRefine(Two())


def test_explicit_signature_is_used():
    class Two(dspy.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = dspy.Predict("question -> draft"), dspy.Predict("draft -> answer")

    assert MarkovRefine(Two(), signature="question -> answer").answer_fields == ["answer"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_rounds": -1}, "max_rounds must be an integer in \\[0, 999\\], got -1"),
        ({"max_rounds": 2.5}, "max_rounds must be an integer"),
        ({"round_cost": -0.01}, "round_cost must be a number in \\[0, 1\\)"),
        ({"temperature": 0}, "temperature must be a number > 0 \\(refinement rounds must be fresh samples\\), got 0"),
        ({"policy": "greedy"}, "unknown policy 'greedy'; expected one of"),
        ({"policy": 42}, "policy must be a name"),
        ({"answer_key": "answer"}, "answer_key must be callable"),
        ({"rollout_seed": -3}, "rollout_seed must be a non-negative integer"),
    ],
)
def test_invalid_constructor_arguments_are_named(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        refine(**kwargs)


def test_program_must_be_a_module():
    with pytest.raises(ConfigurationError, match="program must be a dspy.Module"):
        MarkovRefine(lambda question: question)


def test_model_setter_rejects_other_types():
    with pytest.raises(ConfigurationError, match="model must be a TransitionModel or None, got dict"):
        refine().model = {"p0": 0.5}


# Policies --------------------------------------------------------------------------------------------------------


def test_uncalibrated_closed_form_answers_in_one_call_and_says_so():
    w = world()
    with dspy.context(lm=w.lm()), pytest.warns(UserWarning, match="not calibrated.*MarkovCalibrator"):
        pred = ask(refine(), w)
    assert w.calls == 1 and pred.stop_reason == "uncalibrated"


def test_not_calibrated_error_is_a_value_error():
    assert issubclass(NotCalibratedError, ValueError)


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
    module = refine(max_rounds=4)
    module.model = model_from_rates(**DEGRADING)
    with dspy.context(lm=w.lm()):
        pred = ask(module, w)
    assert (pred.rounds, pred.stop_reason, w.calls) == (0, "degrading", 1)


def test_closed_form_runs_the_optimal_rounds():
    w = world()
    module = refine(max_rounds=8, round_cost=0.01)
    module.model = model_from_rates(**IMPROVING)
    with dspy.context(lm=w.lm()):
        pred = ask(module, w)
    assert pred.rounds == module.model.optimal_rounds(0.01, 8) == 6 and pred.stop_reason == "optimal_rounds"


def test_closed_form_reports_cost_when_gain_too_small():
    module = refine(round_cost=0.5)
    module.model = model_from_rates(**IMPROVING)
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


# The chain -----------------------------------------------------------------------------------------------------


def test_prediction_carries_answer_rounds_reason_and_trajectory():
    w = world()
    with dspy.context(lm=w.lm()):
        pred = ask(refine(policy="fixed", max_rounds=2), w)
    assert pred.answer == pred.trajectory[-1]["outputs"]["answer"]
    assert [e["round"] for e in pred.trajectory] == [0, 1, 2]


def test_every_refinement_round_has_its_own_rollout_id():
    w = SimulatedWorld.homogeneous(5, p0=0.0, p_cw=0.0, p_wc=0.0, seed=0)  # sticky: identical prompts each round
    lm = w.lm(cache=True)
    with dspy.context(lm=lm):
        ask(refine(policy="fixed", max_rounds=3), w)
    rollout_ids = [entry["kwargs"].get("rollout_id") for entry in lm.history]
    assert w.calls == 4 and rollout_ids[1:] == [1, 2, 3]


def test_refinement_rounds_sample_at_the_module_temperature():
    w = world()
    lm = w.lm(temperature=0.1)
    with dspy.context(lm=lm):
        ask(refine(policy="fixed", max_rounds=2, temperature=0.9), w)
    # round 0 runs the program as configured (no override); refinements carry the module's temperature
    assert [entry["kwargs"].get("temperature") for entry in lm.history] == [None, 0.9, 0.9]


def test_rollout_seed_changes_the_rollout_namespace():
    w = world()
    lm = w.lm()
    with dspy.context(lm=lm):
        ask(refine(policy="fixed", max_rounds=1, rollout_seed=7), w)
    assert lm.history[-1]["kwargs"]["rollout_id"] == 7001


def test_pinned_program_lm_is_used_for_every_round():
    w = world()
    program = dspy.Predict("question -> answer")
    program.lm = w.lm()
    other = world(seed=1)
    with dspy.context(lm=other.lm()):
        ask(MarkovRefine(program, policy="fixed", max_rounds=2), w)
    assert (w.calls, other.calls) == (3, 0)


def test_refinement_failure_keeps_the_previous_answer():
    w = world()
    module = refine(policy="fixed", max_rounds=2)
    module.refiner.lm = w.lm(faults={"timeout": 1.0})
    with dspy.context(lm=w.lm()):
        pred = ask(module, w)
    assert pred.answer == pred.trajectory[0]["outputs"]["answer"]
    assert pred.failed_rounds == 2 and pred.trajectory[1]["error"].startswith("LMTimeoutError")


def test_unparseable_refinement_is_recorded_not_raised():
    w = world()
    module = refine(policy="fixed", max_rounds=1)
    module.refiner.lm = w.lm(faults={"garbage": 1.0})
    with dspy.context(lm=w.lm()):
        pred = ask(module, w)
    assert "AdapterParseError" in pred.trajectory[1]["error"] and pred.rounds == 1


def test_round_zero_failure_raises_with_the_cause():
    w = world()
    with dspy.context(lm=w.lm(faults={"rate_limit": 1.0})), pytest.raises(RoundZeroError) as info:
        ask(refine(policy="fixed"), w)
    assert isinstance(info.value.__cause__, dspy.LMError)


def test_missing_input_is_named():
    w = world()
    with dspy.context(lm=w.lm()), pytest.raises(ConfigurationError, match=r"missing input field\(s\) \['question'\]"):
        refine(policy="fixed")(query="hi")


def test_refiner_calls_are_traced_for_optimizers():
    w = world()
    with dspy.context(lm=w.lm(), trace=[]):
        ask(refine(policy="fixed", max_rounds=2), w)
        names = [",".join(p.signature.input_fields) for p, _, _ in dspy.settings.trace]
        assert all(isinstance(p, dspy.Predict) for p, _, _ in dspy.settings.trace)
    assert names == ["question", "question,previous_answer", "question,previous_answer"]


def test_forward_does_not_mutate_the_module():
    w = world()
    module = refine(max_rounds=3)
    module.model = model_from_rates(**IMPROVING)
    before = copy.deepcopy({k: v for k, v in module.__dict__.items() if k != "history"})
    state = module.dump_state()
    with dspy.context(lm=w.lm(), disable_history=True):
        ask(module, w)
    assert module.dump_state() == state
    assert {k: v for k, v in module.__dict__.items() if k != "history"}.keys() == before.keys()
    assert module.model == before["markov"].model and module.max_rounds == 3


# Async -----------------------------------------------------------------------------------------------------------


def run_sync_and_async(module, n=20):
    sync_world, async_world = world(n), world(n)
    with dspy.context(lm=sync_world.lm()):
        sync = [ask(module, sync_world, i).answer for i in range(n)]

    async def main():
        with dspy.context(lm=async_world.lm()):
            return [(await module.acall(**ex.inputs())).answer for ex in async_world.examples]

    return sync, asyncio.run(main())


def test_acall_gives_the_same_answers_as_call():
    module = refine(max_rounds=3)
    module.model = model_from_rates(**IMPROVING)
    sync, async_ = run_sync_and_async(module)
    assert sync == async_


def test_acall_wraps_a_sync_only_program():
    class SyncOnly(dspy.Module):
        def __init__(self):
            super().__init__()
            self.predict = dspy.Predict("question -> answer")

        def forward(self, question):
            return self.predict(question=question)

    sync, async_ = run_sync_and_async(MarkovRefine(SyncOnly(), policy="fixed", max_rounds=2), n=5)
    assert sync == async_


# Save / load -----------------------------------------------------------------------------------------------------


def test_save_load_restores_the_model_exactly(tmp_path):
    module = refine()
    module.model = TransitionModel.fit([[False, True], [True, True], [False, False]] * 9, prior=(0.5, 2.0))
    module.save(tmp_path / "state.json")
    fresh = refine()
    fresh.load(tmp_path / "state.json")
    assert fresh.model == module.model and fresh.model.prior == (0.5, 2.0)


def test_saved_state_is_plain_json(tmp_path):
    import json

    module = refine()
    module.model = model_from_rates(**IMPROVING)
    module.save(tmp_path / "state.json")
    assert json.loads((tmp_path / "state.json").read_text())["markov"]["format"] == "markovscale.state/2"


def test_loading_a_state_from_another_program_fails_clearly(tmp_path):
    module = refine()
    module.model = model_from_rates(**IMPROVING)
    module.save(tmp_path / "state.json")
    other = MarkovRefine(dspy.Predict("question, context -> answer"))
    with pytest.raises(StateError, match="belongs to another program"):
        other.load(tmp_path / "state.json")
    assert other.model is None


def test_uncalibrated_state_round_trips_as_none(tmp_path):
    refine().save(tmp_path / "state.json")
    fresh = refine()
    fresh.model = model_from_rates(**IMPROVING)
    fresh.load(tmp_path / "state.json")
    assert fresh.model is None
