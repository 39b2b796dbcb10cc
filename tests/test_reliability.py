"""Issue 5: faults, bad input, resumable calibration, concurrency and safe state (offline, simulated)."""

import asyncio
import json
import logging

import dspy
import pytest
from helpers import IMPROVING, model_from_rates, refine, world

from markovscale_dspy import (
    CalibrationError,
    ConfigurationError,
    DataError,
    MarkovCalibrator,
    MarkovRefine,
    MarkovScaleError,
    RoundZeroError,
    StateError,
)
from markovscale_dspy.integrations.lms import build_lm
from markovscale_dspy.testing import FAULT_KINDS, SimulatedEngine, SimulatedWorld

ALL_FAULTS = {kind: 0.07 for kind in FAULT_KINDS}  # 49% of calls fail, every kind


# Faults ----------------------------------------------------------------------------------------------------------


def test_a_thousand_faulty_rounds_never_crash_calibration_or_forward():
    w = SimulatedWorld.homogeneous(400, seed=40, **IMPROVING)
    faulty = w.lm(faults=ALL_FAULTS)
    engine = w.last_fault_engine
    calibrator = MarkovCalibrator(w.metric, rounds=4, num_threads=4, question_types=1)
    with dspy.context(lm=faulty):
        program = calibrator.compile(refine(max_rounds=4), trainset=w.examples)
        outcomes = {"ok": 0, "round0": 0}
        for example in w.examples:
            try:
                pred = refine(policy="fixed", max_rounds=4)(**example.inputs())
                outcomes["ok"] += 1
                assert pred.failed_rounds == sum(e["error"] is not None for e in pred.trajectory)
            except RoundZeroError:
                outcomes["round0"] += 1
    faults = sum(engine.fault_counts.values())
    failures = calibrator.report.failures
    print(
        f"\n{faults} injected faults {dict(engine.fault_counts)}; calibration: {failures['chains_failed']} chains "
        f"lost at round 0, {failures['rounds_failed']} refinement rounds kept the previous answer; forward: "
        f"{outcomes}"
    )
    assert faults >= 1000 and program.model.n_transitions > 0
    assert failures["rounds_failed"] > 0 and failures["chains_failed"] > 0 and outcomes["ok"] > 0


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_fault_in_a_refinement_round_keeps_the_previous_answer(kind):
    w = world(3)
    module = refine(policy="fixed", max_rounds=2)
    module.refiner.lm = w.lm(faults={kind: 1.0})
    with dspy.context(lm=w.lm()):
        pred = module(**w.examples[0].inputs())
    assert pred.failed_rounds == 2 and pred.answer == pred.trajectory[0]["outputs"]["answer"]
    assert pred.trajectory[1]["error_kind"] in {"lm", "parse", "empty"}


def test_round_zero_fault_is_a_clear_exception():
    w = world(3)
    with dspy.context(lm=w.lm(faults={"timeout": 1.0})), pytest.raises(RoundZeroError, match="round 0 .* failed"):
        refine(policy="fixed")(**w.examples[0].inputs())


def test_no_successful_refinement_is_a_clear_error_with_the_report_kept():
    w = world(20)
    student = refine()
    student.refiner.lm = w.lm(faults={"server": 1.0})
    calibrator = MarkovCalibrator(w.metric, rounds=2, num_threads=1)
    with dspy.context(lm=w.lm()), pytest.raises(CalibrationError, match="no refinement round succeeded"):
        calibrator.compile(student, trainset=w.examples)
    assert calibrator.report.failures["rounds_failed"] == 40


# Bad input -------------------------------------------------------------------------------------------------------


def test_every_error_shares_one_base_class():
    for error in (ConfigurationError, DataError, StateError, CalibrationError, RoundZeroError):
        assert issubclass(error, MarkovScaleError)


def test_trainset_of_one_example_is_too_small():
    with pytest.raises(DataError, match="trainset has 1 example; calibration needs at least 2"):
        MarkovCalibrator(lambda e, p: True).compile(refine(), trainset=world(1).examples)


def saved(tmp_path, name="s.json"):
    module = refine()
    module.model = model_from_rates(**IMPROVING)
    module.save(tmp_path / name)
    return tmp_path / name


def test_corrupt_state_file_is_a_state_error_and_leaves_the_module_alone(tmp_path):
    path = saved(tmp_path)
    path.write_text(path.read_text()[:50])
    module = refine()
    module.model = model_from_rates(0.5, 0.1, 0.1)
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


# Resumable calibration ---------------------------------------------------------------------------------------------


class InterruptingEngine(SimulatedEngine):
    """Answers like the world, then simulates Ctrl-C after a number of calls."""

    def __init__(self, world, after):
        super().__init__(world)
        self.after = after

    def complete(self, request):
        if self.calls >= self.after:
            raise KeyboardInterrupt
        return super().complete(request)


def calibrate_on(w, lm, trace_dir, resume=True):
    calibrator = MarkovCalibrator(
        w.metric, rounds=3, num_threads=1, trace_dir=trace_dir, resume=resume, question_types=1
    )
    with dspy.context(lm=lm):
        return calibrator.compile(refine(max_rounds=3), trainset=w.examples), calibrator


def test_interrupted_calibration_resumes_without_repeating_finished_chains(tmp_path):
    n, calls_per_chain = 60, 4
    reference, _ = calibrate_on(world(n, seed=50), world(n, seed=50).lm(), tmp_path / "reference")

    w = world(n, seed=50)
    stopper = InterruptingEngine(w, after=n * calls_per_chain // 2 + 1)  # Ctrl-C in the middle of chain 31
    lm = dspy.LM("simulated/world", engine=stopper, temperature=0.7, num_retries=0, cache=False)
    with pytest.raises(KeyboardInterrupt):
        calibrate_on(w, lm, tmp_path / "traces")

    restart = world(n, seed=50)
    resumed, calibrator = calibrate_on(restart, restart.lm(), tmp_path / "traces")
    finished = n // 2
    assert calibrator.report.chains_reused == finished
    assert restart.calls == (n - finished) * calls_per_chain  # zero repeated calls for finished chains
    assert resumed.model == reference.model


def test_fresh_ignores_the_store(tmp_path):
    calibrate_on(world(20), world(20).lm(), tmp_path / "t")
    again = world(20)
    _, calibrator = calibrate_on(again, again.lm(), tmp_path / "t", resume=False)
    assert calibrator.report.chains_reused == 0 and again.calls == 20 * 4


def test_changing_the_program_invalidates_the_store(tmp_path):
    calibrate_on(world(20), world(20).lm(), tmp_path / "t")
    again = world(20)
    calibrator = MarkovCalibrator(again.metric, rounds=3, num_threads=1, trace_dir=tmp_path / "t")
    with dspy.context(lm=again.lm()):
        calibrator.compile(
            MarkovRefine(dspy.Predict("question -> answer"), instructions="Try harder."), trainset=again.examples
        )
    assert calibrator.report.chains_reused == 0


def test_chains_lost_to_lm_errors_are_not_stored(tmp_path):
    w = world(20)
    student = refine()
    student.refiner.lm = w.lm(faults={"rate_limit": 0.5})
    calibrator = MarkovCalibrator(w.metric, rounds=3, num_threads=1, trace_dir=tmp_path / "t")
    with dspy.context(lm=w.lm()):
        calibrator.compile(student, trainset=w.examples)
    clean = sum(1 for c in calibrator.report.chains if not any(c["errors"]))
    from markovscale_dspy.calibrate.traces import TraceStore

    assert len(TraceStore(tmp_path / "t")) == clean < 20


def test_trace_store_holds_json_not_pickles(tmp_path):
    calibrate_on(world(5), world(5).lm(), tmp_path / "t")
    import sqlite3

    rows = sqlite3.connect(tmp_path / "t" / "cache.db").execute("SELECT mode FROM Cache").fetchall()
    assert rows and {mode for (mode,) in rows} <= {1, 2, 3}  # raw / binary / text (JSON), never 4 (pickle)


# Concurrency -----------------------------------------------------------------------------------------------------


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


def test_sixteen_threads_give_the_sequential_results():
    assert answers_and_model(16) == answers_and_model(1)


def test_asyncio_gives_the_sequential_results():
    assert answers_and_model(1, mode="async") == answers_and_model(1)


# Safe state ------------------------------------------------------------------------------------------------------


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
