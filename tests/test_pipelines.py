"""MarkovRefine inside real DSPy pipelines, written the way a DSPy user writes programs (simulated LMs)."""

import asyncio
import json
import warnings

import dspy
import pytest
from dspy.utils import DummyLM

from markovscale_dspy import ConfigurationError, MarkovCalibrator, MarkovRefine
from markovscale_dspy.testing import SimulatedWorld

HURTS = {"p0": 0.7, "p_cw": 0.3, "p_wc": 0.1, "p_same_wrong": 0.5}
HELPS = {"p0": 0.4, "p_cw": 0.1, "p_wc": 0.3, "p_same_wrong": 0.5}


def calibrated(world, program, **kwargs):
    with dspy.context(lm=world.lm()):
        return MarkovCalibrator(world.metric, num_threads=1).compile(
            MarkovRefine(program, **kwargs), trainset=world.examples
        )


class Rounds(dspy.Signature):
    """Answer and say how many rounds you needed."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()
    rounds: str = dspy.OutputField()


def test_react_is_wrapped_calibrated_and_its_trajectory_passes_through():
    w = SimulatedWorld.homogeneous(60, seed=1, **HURTS)
    react = dspy.ReAct("question -> answer", tools=[lambda x: x], max_iters=1)
    program = calibrated(w, react, max_rounds=2, signature="question -> answer")
    with dspy.context(lm=w.lm()):
        pred = program(**w.examples[0].inputs())
    assert pred.markovscale.rounds == 0 and pred.markovscale.stop_reason == "degrading"
    assert isinstance(pred.trajectory, dict)  # ReAct's own trajectory, untouched
    assert isinstance(pred.markovscale.trajectory, list)


def test_an_output_named_rounds_is_the_programs_not_ours():
    w = SimulatedWorld.homogeneous(5, seed=2, **HELPS)
    refine = MarkovRefine(dspy.Predict(Rounds), max_rounds=0, policy="fixed")
    with dspy.context(lm=w.lm()):
        pred = refine(**w.examples[0].inputs())
    assert pred.rounds == pred.markovscale.trajectory[0]["outputs"]["rounds"]
    assert pred.markovscale.stop_reason == "max_rounds" and pred.stop_reason == "max_rounds"


def test_max_rounds_zero_with_closed_form_says_max_rounds():
    w = SimulatedWorld.homogeneous(40, seed=3, **HELPS)
    program = calibrated(w, dspy.Predict("question -> answer"), max_rounds=2)
    zero = MarkovRefine(dspy.Predict("question -> answer"), max_rounds=0)
    zero.model = program.model
    with dspy.context(lm=w.lm()):
        assert zero(**w.examples[0].inputs()).stop_reason == "max_rounds"


class Parent(dspy.Module):
    def __init__(self):
        super().__init__()
        self.refine = MarkovRefine(dspy.Predict("question -> answer"), max_rounds=2)

    def forward(self, question):
        return self.refine(question=question)


def test_parent_save_load_keeps_the_calibrated_child_and_no_secret(tmp_path):
    w = SimulatedWorld.homogeneous(40, seed=4, **HELPS)
    parent = Parent()
    parent.refine = calibrated(w, dspy.Predict("question -> answer"), max_rounds=2)
    parent.refine.refiner.lm = dspy.LM("openai/x", api_base="http://10.0.0.1:1/v1", api_key="sk-SECRET")
    parent.save(tmp_path / "p.json")
    text = (tmp_path / "p.json").read_text()
    assert "sk-SECRET" not in text and "10.0.0.1" not in text
    fresh = Parent()
    fresh.load(tmp_path / "p.json")
    assert fresh.refine.model == parent.refine.model
    assert json.loads(text)["refine.markov"]["model"] is not None


def test_named_predictors_and_set_lm_reach_a_calibrated_child():
    w = SimulatedWorld.homogeneous(40, seed=5, **HELPS)
    parent = Parent()
    parent.refine = calibrated(w, dspy.Predict("question -> answer"), max_rounds=2)
    assert [n for n, _ in parent.named_predictors()] == ["refine.program", "refine.refiner"]
    lm = w.lm()
    parent.set_lm(lm)
    assert all(p.lm is lm for _, p in parent.named_predictors())


def test_bootstrap_before_calibration_with_the_default_policy():
    w = SimulatedWorld.homogeneous(40, seed=6, **HELPS)
    student = MarkovRefine(dspy.Predict("question -> answer"), max_rounds=2)
    with dspy.context(lm=w.lm()), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimized = dspy.BootstrapFewShot(metric=w.metric, max_bootstrapped_demos=2).compile(
            student, trainset=w.examples[:10]
        )
        program = MarkovCalibrator(w.metric, num_threads=1).compile(optimized, trainset=w.examples)
    assert any("not calibrated" in str(c.message) for c in caught)
    assert optimized.program.demos and program.model is not None and program.program.demos == optimized.program.demos


@pytest.mark.parametrize("optimizer", ["bootstrap", "labeled"])
def test_an_optimizer_after_calibration_keeps_the_model_and_tunes_the_refiner(optimizer):
    w = SimulatedWorld.homogeneous(60, seed=7, **HELPS)
    program = calibrated(w, dspy.Predict("question -> answer"), max_rounds=2, policy="fixed")
    with dspy.context(lm=w.lm()):
        if optimizer == "bootstrap":
            tuned = dspy.BootstrapFewShot(metric=w.metric, max_bootstrapped_demos=2).compile(
                program, trainset=w.examples[:20]
            )
            assert tuned.refiner.demos, "the refiner is an ordinary predictor: it gets demos too"
        else:
            tuned = dspy.LabeledFewShot(k=2).compile(program, trainset=w.examples)
    assert tuned.model == program.model


@pytest.mark.parametrize("outer", ["best_of_n", "refine"])
def test_best_of_n_and_refine_around_markov_refine_sample_fresh_rounds(outer):
    w = SimulatedWorld.homogeneous(5, seed=8, **HELPS)
    module = MarkovRefine(dspy.Predict("question -> answer"), max_rounds=2, policy="fixed")
    attempts = []

    def reward(args, pred):
        attempts.append(([e["outputs"]["answer"] for e in pred.markovscale.trajectory], pred.markovscale.calls))
        return 0.0

    wrapper = (
        dspy.BestOfN(module, N=4, reward_fn=reward, threshold=1.0)
        if outer == "best_of_n"
        else dspy.Refine(module, N=4, reward_fn=reward, threshold=1.0)
    )
    lm = w.lm(cache=True)
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    before = w.calls
    with dspy.context(lm=lm):
        wrapper(**w.examples[0].inputs())
    # Every attempt paid for its 3 rounds (no cache replay); Refine's advice calls come on top.
    assert [calls for _, calls in attempts] == [3, 3, 3, 3]
    assert w.calls - before >= 12 and len({tuple(answers) for answers, _ in attempts}) > 1


def test_two_dummy_lms_never_share_chains(tmp_path):
    examples = [dspy.Example(question=f"q{i}", answer="a").with_inputs("question") for i in range(3)]

    def metric(e, p, trace=None):
        return p.answer == e.answer

    def run(answer):
        lm = DummyLM([{"answer": answer}] * 12)
        calibrator = MarkovCalibrator(metric, rounds=1, num_threads=1, trace_dir=tmp_path)
        with dspy.context(lm=lm):
            return calibrator.compile(MarkovRefine(dspy.Predict("question -> answer"), max_rounds=1), trainset=examples)

    first, second = run("a"), run("b")
    assert first.model.p0 > 0.5 > second.model.p0


def test_two_pinned_lms_need_a_refiner_lm_and_fail_loudly_without_one():
    w = SimulatedWorld.homogeneous(5, seed=9, **HELPS)

    class Two(dspy.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = dspy.Predict("question -> draft"), dspy.Predict("question, draft -> answer")
            self.a.lm, self.b.lm = w.lm(), w.lm(model_type="chat")
            self.b.lm.model = "simulated/other"

        def forward(self, question):
            return self.b(question=question, draft=self.a(question=question).draft)

    loud = MarkovRefine(Two(), signature="question -> answer", max_rounds=1, policy="fixed")
    with pytest.raises(ConfigurationError, match="refiner_lm"):
        loud(**w.examples[0].inputs())
    ok = MarkovRefine(Two(), signature="question -> answer", max_rounds=1, policy="fixed", refiner_lm=w.lm())
    assert ok(**w.examples[0].inputs()).markovscale.failed_rounds == 0


def test_a_partial_credit_metric_without_threshold_is_a_clear_error():
    w = SimulatedWorld.homogeneous(20, seed=10, **HELPS)

    def partial(e, p, trace=None):
        return 0.8 if w.metric(e, p) else 0.1

    with dspy.context(lm=w.lm()), pytest.raises(ConfigurationError, match="partial credit.*threshold"):
        MarkovCalibrator(partial, num_threads=1).compile(
            MarkovRefine(dspy.Predict("question -> answer"), max_rounds=2), trainset=w.examples
        )
    with dspy.context(lm=w.lm()):
        program = MarkovCalibrator(partial, num_threads=1, threshold=0.5).compile(
            MarkovRefine(dspy.Predict("question -> answer"), max_rounds=2), trainset=w.examples
        )
    assert 0.2 < program.model.p0 < 0.7  # the world's p0 is 0.4: not every answer "wrong"


def test_streamify_with_listeners_on_the_program_and_the_refiner():
    w = SimulatedWorld.homogeneous(3, seed=11, **HELPS)
    program = dspy.Predict("question -> answer")
    refine = MarkovRefine(program, max_rounds=1, policy="fixed")
    listeners = [
        dspy.streaming.StreamListener(signature_field_name="answer", predict=program, predict_name="program"),
        dspy.streaming.StreamListener(signature_field_name="answer", predict=refine.refiner, predict_name="refiner"),
    ]
    stream = dspy.streamify(refine, stream_listeners=listeners)

    async def collect():
        chunks, final = [], None
        async for item in stream(**w.examples[0].inputs()):
            if isinstance(item, dspy.Prediction):
                final = item
            else:
                chunks.append(item.predict_name)
        return chunks, final

    with dspy.context(lm=w.lm()):
        chunks, final = asyncio.run(collect())
    assert {"program", "refiner"} <= set(chunks) and final.markovscale.rounds == 1


def test_evaluate_with_threads_and_track_usage_totals():
    w = SimulatedWorld.homogeneous(40, seed=12, **HELPS)
    program = calibrated(w, dspy.Predict("question -> answer"), max_rounds=2)
    with dspy.context(lm=w.lm(), track_usage=True):
        result = dspy.Evaluate(devset=w.examples[:12], metric=w.metric, num_threads=4)(program)
        preds = [p for _, p, _ in result.results]
    for pred in preds:
        total = sum(entry["prompt_tokens"] for entry in pred.get_lm_usage().values())
        rounds = sum((e.get("usage") or {}).get("prompt_tokens", 0) for e in pred.markovscale.trajectory)
        assert total == rounds > 0


def test_a_copy_that_dspy_builds_attribute_by_attribute_saves_its_own_refiner(monkeypatch):
    """DSPy falls back to copying a module attribute by attribute when a whole deep copy fails (an LM holding a
    lock or a client); the copy's refiner must then save the copy's demos, not the original's."""
    import copy as copying

    original = MarkovRefine(dspy.Predict("question -> answer"), max_rounds=2)
    real = copying.deepcopy

    def refusing(value, memo=None):
        if value is original or value is original.refiner or getattr(value, "__self__", None) is original.refiner:
            raise TypeError("cannot pickle '_thread.lock' object")  # as for a predictor pinned to such an LM
        return real(value, memo)

    monkeypatch.setattr(copying, "deepcopy", refusing)
    twin = original.deepcopy()
    monkeypatch.setattr(copying, "deepcopy", real)
    twin.refiner.demos = [dspy.Example(question="q", answer="a")]
    assert twin.refiner.dump_state()["demos"] == [{"question": "q", "answer": "a"}]
    assert original.refiner.dump_state()["demos"] == []
