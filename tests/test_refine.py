"""MarkovRefine as a DSPy module: construction, the refinement chain and its failures, answer selection, async and
threads, save/load and the state file (driven by the simulated world)."""

import asyncio
import copy
import json
import logging

import dspy
import pytest
from helpers import (
    IMPROVING,
    answer_all,
    ask,
    calibrate_one_type,
    model_from_rates,
    refine,
    world,
)

from benchmarks.worlds import preset_world
from markovscale_dspy import (
    ConfigurationError,
    MarkovCalibrator,
    MarkovRefine,
    NotCalibratedError,
    RoundZeroError,
    StateError,
    TransitionModel,
)
from markovscale_dspy.integrations.lms import build_lm
from markovscale_dspy.testing import FAULT_KINDS, SimulatedWorld

# Construction ------------------------------------------------------------------------------------------------------


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


# The chain ---------------------------------------------------------------------------------------------------------


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


def attribute_snapshot(module):
    """Every attribute of a module (but its call history) by value: sub-modules and the state by their dumped state."""
    return {
        name: value.dump_state() if hasattr(value, "dump_state") else copy.deepcopy(value)
        for name, value in module.__dict__.items()
        if name != "history"
    }


def test_forward_does_not_mutate_the_module():
    w = world()
    module = refine(model=model_from_rates(**IMPROVING), max_rounds=3)
    before = copy.deepcopy({k: v for k, v in module.__dict__.items() if k != "history"})
    state = module.dump_state()
    snapshot = attribute_snapshot(module)
    with dspy.context(lm=w.lm(), disable_history=True):
        ask(module, w)
    assert module.dump_state() == state
    assert attribute_snapshot(module) == snapshot  # every attribute's value, not just the attribute names
    assert module.model == before["markov"].model and module.max_rounds == 3


# Failed rounds -----------------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_fault_in_a_refinement_round_keeps_the_previous_answer(kind):
    w = world(3)
    module = refine(policy="fixed", max_rounds=2)
    module.refiner.lm = w.lm(faults={kind: 1.0})
    with dspy.context(lm=w.lm()):
        pred = module(**w.examples[0].inputs())
    assert pred.failed_rounds == 2 and pred.answer == pred.trajectory[0]["outputs"]["answer"]
    # A prompt over the context window is no transient failure: a calibration stops at it (see test_failures.py).
    assert pred.trajectory[1]["error_kind"] in ({"fatal"} if kind == "context_window" else {"lm", "parse", "empty"})


def test_round_zero_fault_is_a_clear_exception():
    w = world(3)
    with dspy.context(lm=w.lm(faults={"timeout": 1.0})), pytest.raises(RoundZeroError, match="round 0 .* failed"):
        refine(policy="fixed")(**w.examples[0].inputs())


# Answer selection --------------------------------------------------------------------------------------------------


def test_select_best_returns_the_round_with_the_highest_smoothed_posterior(hetero_model):
    module = refine(model=hetero_model, policy="fixed", max_rounds=4, select="best")
    w = preset_world("heterogeneous", 40, seed=12)
    preds = answer_all(module, w)
    evidence = hetero_model.evidence()
    for pred in preds:
        # P(round t's answer is correct | every round's answer identity) from the evidence filter (checked against
        # Monte Carlo and brute force in test_evidence.py), recomputed from the recorded rounds.
        keys = [
            tuple(e["answer_key"]) if isinstance(e["answer_key"], list) else e["answer_key"] for e in pred.trajectory
        ]
        posteriors = evidence.posteriors(keys, [e["error"] is not None for e in pred.trajectory])
        assert pred.posteriors == pytest.approx(posteriors, abs=1e-9)
        chosen = pred.selected_round
        assert posteriors[chosen] >= max(posteriors) - 1e-12  # a round with the highest posterior ...
        assert all(p < posteriors[chosen] for p in posteriors[chosen + 1 :])  # ... the latest of any tied ones
        assert pred.answer == pred.trajectory[chosen]["outputs"]["answer"]


def test_select_best_needs_a_calibrated_model():
    w = world()
    with dspy.context(lm=w.lm()), pytest.raises(NotCalibratedError, match="select='best'"):
        refine(policy="fixed", select="best")(**w.examples[0].inputs())


# Async and threads -------------------------------------------------------------------------------------------------


def run_sync_and_async(module, n=20):
    sync_world, async_world = world(n), world(n)
    with dspy.context(lm=sync_world.lm()):
        sync = [ask(module, sync_world, i).answer for i in range(n)]

    async def main():
        with dspy.context(lm=async_world.lm()):
            return [(await module.acall(**ex.inputs())).answer for ex in async_world.examples]

    return sync, asyncio.run(main())


def test_acall_gives_the_same_answers_as_call():
    module = refine(model=model_from_rates(**IMPROVING), max_rounds=3)
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


@pytest.mark.slow
def test_evaluate_with_8_threads_and_acall_match_sequential_calls():
    program = calibrate_one_type(IMPROVING, seed=5, max_rounds=4)
    sequential = answers(program, 6, "sequential")
    assert answers(program, 6, "evaluate") == sequential
    assert answers(program, 6, "async") == sequential


def answers_and_model(threads, mode="threads"):
    w = SimulatedWorld.homogeneous(500, seed=60, **IMPROVING)
    calibrator = MarkovCalibrator(w.metric, rounds=3, num_threads=threads, store_traces=False, question_types=1)
    with dspy.context(lm=w.lm()):
        program = calibrator.compile(refine(max_rounds=3), trainset=w.examples)
    test = SimulatedWorld.homogeneous(500, seed=61, **IMPROVING)
    with dspy.context(lm=test.lm()):
        if mode == "async":

            async def run():
                return await asyncio.gather(*(program.acall(**e.inputs()) for e in test.examples))

            predictions = asyncio.run(run())
        else:
            predictions = program.batch(test.examples, num_threads=threads, disable_progress_bar=True)
    return program.model, [(p.answer, p.rounds) for p in predictions]


@pytest.mark.slow
def test_sixteen_threads_give_the_sequential_results():
    assert answers_and_model(16) == answers_and_model(1)


@pytest.mark.slow
def test_asyncio_gives_the_sequential_results():
    assert answers_and_model(1, mode="async") == answers_and_model(1)


# Save / load -------------------------------------------------------------------------------------------------------


def test_save_load_restores_the_model_exactly(tmp_path):
    module = refine(model=TransitionModel.fit([[False, True], [True, True], [False, False]] * 9, prior=(0.5, 2.0)))
    module.save(tmp_path / "state.json")
    fresh = refine()
    fresh.load(tmp_path / "state.json")
    assert fresh.model == module.model and fresh.model.prior == (0.5, 2.0)


def test_saved_state_is_plain_json(tmp_path):
    import json

    module = refine(model=model_from_rates(**IMPROVING))
    module.save(tmp_path / "state.json")
    assert json.loads((tmp_path / "state.json").read_text())["markov"]["format"] == "markovscale.state/2"


def test_loading_a_state_from_another_program_fails_clearly(tmp_path):
    module = refine(model=model_from_rates(**IMPROVING))
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


@pytest.mark.slow
def test_save_then_load_in_a_fresh_module_gives_identical_predictions(tmp_path):
    program = calibrate_one_type(IMPROVING, seed=7, max_rounds=4)
    program.save(tmp_path / "refine.json")
    fresh = refine(max_rounds=4)
    fresh.load(tmp_path / "refine.json")
    assert fresh.model == program.model
    assert answers(fresh, 8, "sequential") == answers(program, 8, "sequential")


# Bad and unsafe state files ----------------------------------------------------------------------------------------


def saved(tmp_path, name="s.json"):
    module = refine(model=model_from_rates(**IMPROVING))
    module.save(tmp_path / name)
    return tmp_path / name


def test_corrupt_state_file_is_a_state_error_and_leaves_the_module_alone(tmp_path):
    path = saved(tmp_path)
    path.write_text(path.read_text()[:50])
    module = refine(model=model_from_rates(0.5, 0.1, 0.1))
    before = module.model
    with pytest.raises(StateError, match="is not valid JSON .* the file is corrupt"):
        module.load(path)
    assert module.model is before


def test_edited_state_is_detected(tmp_path):
    path = saved(tmp_path)
    state = json.loads(path.read_text())
    state["markov"]["model"]["estimates"]["p_wc"] = 0.99
    path.write_text(json.dumps(state))
    with pytest.raises(StateError, match="disagrees with its counts"):
        refine().load(path)


def test_state_from_an_incompatible_version_is_named(tmp_path):
    path = saved(tmp_path)
    state = json.loads(path.read_text())
    state["markov"]["format"] = "markovscale.state/99"
    path.write_text(json.dumps(state))
    with pytest.raises(StateError, match="format 'markovscale.state/99'"):
        refine().load(path)


def test_state_of_a_plain_dspy_program_is_named(tmp_path):
    dspy.Predict("question -> answer").save(tmp_path / "p.json")
    with pytest.raises(StateError, match="holds no MarkovRefine state"):
        refine().load(tmp_path / "p.json")


def test_missing_state_file_is_named(tmp_path):
    with pytest.raises(StateError, match="no state file at"):
        refine().load(tmp_path / "nope.json")


def test_pickle_is_refused_both_ways(tmp_path):
    with pytest.raises(StateError, match="JSON only"):
        refine().save(tmp_path / "s.pkl")
    with pytest.raises(StateError, match="never pickles"):
        refine().load(tmp_path / "s.pkl")


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path):
    saved(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_api_key_and_endpoint_never_reach_state_or_report(tmp_path, caplog):
    secret_key, secret_host = "sk-FAKE-9f8e7d", "secret-gpu-box.internal"
    program = dspy.Predict("question -> answer")
    program.lm = build_lm("hosted_vllm/qwen", api_base=f"http://{secret_host}:8000/v1", api_key=secret_key)
    module = MarkovRefine(program)
    module.model = model_from_rates(**IMPROVING)
    with caplog.at_level(logging.DEBUG):
        module.save(tmp_path / "state.json")
        text = (tmp_path / "state.json").read_text()
        from markovscale_dspy.calibrate.traces import chain_key

        key = chain_key(module, 3, world(1).examples[0])
    assert secret_key not in text and secret_host not in text and "qwen" in text
    assert secret_key not in caplog.text and secret_host not in caplog.text and secret_key not in key
