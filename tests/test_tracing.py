"""Tracing as DSPy users do it: MLflow autolog (a sqlite store) and OpenTelemetry with OpenInference's instrumentor
(an in-memory exporter), each in both import orders, in a process of its own (tests/tracing_session.py)."""

import contextvars
import json
import os
import subprocess
import sys
from pathlib import Path

import dspy
import pytest

from markovscale_dspy import MarkovRefine
from markovscale_dspy.refine.loop import describe
from markovscale_dspy.tracing import carry_context

SESSION = Path(__file__).with_name("tracing_session.py")
ENDPOINT = "10.1.2.3"


def test_no_predict_subclass_of_ours_for_instrumentors_to_trip_on():
    # OpenInference's DSPyInstrumentor wraps every direct dspy.Predict subclass by its name in dspy.
    MarkovRefine(dspy.Predict("question -> answer"))
    ours = [c for c in dspy.Predict.__subclasses__() if c.__module__.startswith("markovscale_dspy")]
    assert ours == []


def test_error_text_keeps_what_went_wrong_and_drops_where():
    error = ConnectionError(f"cannot reach http://{ENDPOINT}:8000/v1/chat (or localhost:8080, 127.0.0.1) in 3.5 s")
    assert describe(error) == "ConnectionError: cannot reach <endpoint> (or <endpoint>, <endpoint>) in 3.5 s"


def test_worker_threads_see_the_callers_context_and_their_own_dspy_settings():
    from dspy.utils.parallelizer import ParallelExecutor

    active = contextvars.ContextVar("active_span", default=None)
    active.set("caller's span")
    adapter = dspy.JSONAdapter()

    def job(i):
        tracker = dspy.settings.usage_tracker
        return active.get(), dspy.settings.adapter is adapter, tracker is not None and tracker is not callers_tracker

    with dspy.context(adapter=adapter), dspy.track_usage() as callers_tracker:
        plain = ParallelExecutor(num_threads=2, disable_progress_bar=True).execute(job, range(4))
        carried = ParallelExecutor(num_threads=2, disable_progress_bar=True).execute(carry_context(job), range(4))
        alone = ParallelExecutor(num_threads=1, disable_progress_bar=True).execute(carry_context(job), range(2))
    # What DSPy does alone: its settings reach the workers (each with its own usage tracker), the span does not.
    assert plain == [(None, True, True)] * 4
    assert carried == [("caller's span", True, True)] * 4
    assert [a for a, _, _ in alone] == ["caller's span"] * 2  # one thread: the caller's own context, untouched


def run_session(tracer, order, tmp_path):
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": str(SESSION.parent.parent)}
    done = subprocess.run(
        [sys.executable, str(SESSION), tracer, order, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[0][len("RESULT ") :])


def one_trace(spans):
    traces = {s["trace"] for s in spans}
    assert len(traces) == 1, sorted({s["name"] for s in spans if s["parent"] is None})
    roots = [s for s in spans if s["parent"] is None]
    assert len(roots) == 1
    return roots[0]


def ours(attributes):
    return {k.removeprefix("markovscale."): v for k, v in attributes.items() if k.startswith("markovscale.")}


def children(spans, parent, prefix):
    return sorted((s for s in spans if s["parent"] == parent["id"] and s["name"].startswith(prefix)), key=_order)


def _order(s):
    return int(s["name"].split()[1].rstrip(":"))


@pytest.mark.slow
@pytest.mark.parametrize("tracer", ["mlflow", "otel"])
@pytest.mark.parametrize("order", ["tracer-first", "package-first"])
def test_one_trace_per_call_with_round_attributes(tracer, order, tmp_path):
    pytest.importorskip("mlflow" if tracer == "mlflow" else "openinference.instrumentation.dspy")
    out = run_session(tracer, order, tmp_path)

    # A calibration is one trace: a span per chain, a span per round inside it.
    calibration = out["calibration"]
    root = one_trace(calibration["spans"])
    assert root["name"] == "MarkovCalibrator.compile"
    chains = children(calibration["spans"], root, "chain ")
    assert [_order(c) for c in chains] == list(range(calibration["examples"]))
    for chain in chains:
        assert [_order(r) for r in children(calibration["spans"], chain, "round ")] == [0, 1, 2, 3]

    # A MarkovRefine call: the module's span says how it went, each round's span what the round did.
    refine, account = out["refine"], out["refine"]["account"]
    root = one_trace(refine["spans"])
    assert root["name"].startswith("MarkovRefine.")
    said = ours(root["attributes"])
    assert said["policy"] == "closed_form" and said["stop_reason"] == account["stop_reason"]
    assert (said["rounds"], said["selected_round"], said["calls"]) == (
        account["rounds"],
        account["selected_round"],
        account["calls"],
    )
    rounds = children(refine["spans"], root, "round ")
    assert [ours(r["attributes"])["round"] for r in rounds] == list(range(account["rounds"] + 1))
    assert [ours(r["attributes"])["answer_changed"] for r in rounds[1:]] == account["changed"]
    assert all(ours(r["attributes"])["decision"] == "closed_form" for r in rounds[1:])

    # MarkovScale in threads and with asyncio, and a batch under a budget: one trace each.
    root = one_trace(out["scale"]["spans"])
    assert ours(root["attributes"])["samples"] == out["scale"]["samples"] == 4
    assert len(children(out["scale"]["spans"], root, "chain ")) == 4
    root = one_trace(out["scale_async"]["spans"])
    assert ours(root["attributes"])["samples"] == out["scale_async"]["samples"]
    root = one_trace(out["budget"]["spans"])
    assert root["name"] == "MarkovRefine.answer_with_budget"
    assert ours(root["attributes"])["spent"] == out["budget"]["spent"]

    # A refiner whose server is down: the failure is recorded, its address is not, in the outputs and in any span
    # (DSPy's own LM, adapter and predictor spans record the LM's exception, with its endpoint replaced).
    assert out["down"]["error"].startswith("ConnectionError: cannot reach <endpoint>")
    assert [s["name"] for s in out["down"]["spans"] if ENDPOINT in s["text"]] == []
    assert any("cannot reach <endpoint>" in s["text"] for s in out["down"]["spans"])  # what failed is still there

    # The async calibration: one trace too (autolog patches compile only; acompile does what its patch does).
    root = one_trace(out["acompile"]["spans"])
    assert root["name"] == "MarkovCalibrator.compile"
    assert len(children(out["acompile"]["spans"], root, "chain ")) == out["acompile"]["examples"]

    if tracer == "mlflow":
        check_calibration_run(out)


def check_calibration_run(out):
    """Each calibration is an MLflow run (autolog's log_compiles) with its estimates, verdict and report."""
    calibration = out["calibration"]
    logged = [r for r in out["runs"] if "markovscale.rounds" in r["params"]]
    # compile x2 (MarkovRefine, MarkovScale), acompile, and in the user's own run two calibrations: the first in it,
    # the second in a nested run of its own
    assert sorted(r["params"]["markovscale.rounds"] for r in logged) == ["1", "1", "2", "3", "3"]
    user_run = next(r for r in out["runs"] if r["name"] == "two calibrations")
    nested = [r for r in logged if r["parent"] is not None]
    assert user_run["params"]["markovscale.rounds"] == "1" and [r["params"]["markovscale.rounds"] for r in nested] == [
        "2"
    ]
    runs = [
        r
        for r in logged
        if r["params"]["markovscale.rounds"] == "3" and r["params"].get("markovscale.parallel_samples") == "None"
    ]
    assert len(runs) == 1
    run = runs[0]
    assert run["params"]["markovscale.trainset_size"] == str(calibration["examples"])
    assert run["params"]["markovscale.rounds"] == "3" and run["params"]["markovscale.program_lm"] == "simulated/world"
    metrics = {k.removeprefix("markovscale."): v for k, v in run["metrics"].items()}
    for name, mean in calibration["estimates"].items():
        assert metrics[name] == pytest.approx(mean) and metrics[f"{name}_lo"] < mean < metrics[f"{name}_hi"]
    assert metrics["prob_improves"] == pytest.approx(calibration["prob_improves"])
    assert metrics["bound"] == pytest.approx(calibration["bound"])
    assert metrics["calls"] == calibration["calls"] and metrics["chains_used"] == calibration["examples"]
    observed = run["history"]["markovscale.observed_accuracy"]
    assert observed == [[t, pytest.approx(a)] for t, a in enumerate(calibration["observed"])]
    assert [t for t, _ in run["history"]["markovscale.predicted_accuracy"]] == [0, 1, 2, 3]
    assert sorted(run["artifacts"]) == [
        "markovscale/calibration.png",
        "markovscale/calibration_report.json",
        "markovscale/calibration_report.md",
    ]


EXCEPT_BLOCK = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from markovscale_dspy.tracing import span

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
with trace.get_tracer("user").start_as_current_span("the user's call"):
    try:
        raise KeyError("handled by the user")
    except KeyError:
        with span("round 0: program", lambda: {"round": 0}):
            pass
ours = next(s for s in exporter.get_finished_spans() if s.name == "round 0: program")
print(ours.status.status_code.name, len(ours.events), ours.attributes["markovscale.round"])
"""


@pytest.mark.slow  # its own process: a global tracer provider would stay in this one
def test_a_round_that_ends_normally_inside_a_callers_except_block_is_not_an_error():
    """A user retrying in an ``except`` block: our span must not take the handled exception for its own."""
    pytest.importorskip("opentelemetry.sdk")
    done = subprocess.run([sys.executable, "-c", EXCEPT_BLOCK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["UNSET", "0", "0"]
