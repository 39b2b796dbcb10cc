"""A user's session under a real tracer, run in its own process (the import order is what is being tested):
``python tests/tracing_session.py {mlflow,otel} {tracer-first,package-first} DIR`` prints what the tracer
recorded, as JSON, for tests/test_tracing.py to check.

The session: calibrate a MarkovRefine and a MarkovScale on a simulated world, call each (MarkovScale in threads and
with asyncio), answer a batch under a budget, and run a refinement whose refiner's server is down (its error names
the server's address).
"""

import asyncio
import json
import sys
import warnings
from pathlib import Path

warnings.simplefilter("ignore")
TRACER, ORDER, DIR = sys.argv[1], sys.argv[2], Path(sys.argv[3])
ENDPOINT = "10.1.2.3:8000"


def start_tracer():
    if TRACER == "mlflow":
        mlflow.dspy.autolog(log_compiles=True, log_traces_from_compile=True)
    else:
        DSPyInstrumentor().instrument()


if TRACER == "mlflow":
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{DIR}/mlflow.db")
    mlflow.set_experiment("tracing")
else:
    from openinference.instrumentation.dspy import DSPyInstrumentor
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

if ORDER == "tracer-first":
    start_tracer()
import dspy  # noqa: E402

from markovscale_dspy import MarkovCalibrator, MarkovRefine, MarkovScale  # noqa: E402
from markovscale_dspy.testing import SimulatedWorld  # noqa: E402

if ORDER == "package-first":
    start_tracer()


class DownLM(dspy.BaseLM):
    """A refiner whose server cannot be reached."""

    def forward(self, prompt=None, messages=None, **kwargs):
        raise ConnectionError(f"cannot reach http://{ENDPOINT}/v1/chat/completions")


def spans_so_far():
    """Every span recorded since the last call: name, id, parent id, trace id, attributes (JSON-able)."""
    if TRACER == "mlflow":
        mlflow.flush_trace_async_logging()
        seen = spans_so_far.seen
        out = []
        for t in mlflow.search_traces(return_type="list", max_results=1000):
            if t.info.trace_id in seen:
                continue
            seen.add(t.info.trace_id)
            for s in t.data.spans:
                attributes = {k: v for k, v in s.attributes.items()}
                out.append(
                    {
                        "name": s.name,
                        "id": s.span_id,
                        "parent": s.parent_id,
                        "trace": t.info.trace_id,
                        "attributes": attributes,
                        "text": json.dumps(s.to_dict(), default=str),
                    }
                )
        return out
    finished = exporter.get_finished_spans()
    exporter.clear()
    return [
        {
            "name": s.name,
            "id": format(s.context.span_id, "x"),
            "parent": format(s.parent.span_id, "x") if s.parent else None,
            "trace": format(s.context.trace_id, "x"),
            "attributes": dict(s.attributes),
            "text": s.to_json(),
        }
        for s in finished
    ]


spans_so_far.seen = set()
world = SimulatedWorld.homogeneous(40, seed=0, p0=0.4, p_cw=0.1, p_wc=0.3)
question = world.examples[0].inputs()
out = {}
with dspy.context(lm=world.lm()):
    calibrator = MarkovCalibrator(world.metric, num_threads=2, store_traces=False)
    refine = calibrator.compile(MarkovRefine(dspy.Predict("question -> answer"), max_rounds=3), trainset=world.examples)
    report = calibrator.report
    out["calibration"] = {
        "spans": spans_so_far(),
        "examples": report.examples,
        "estimates": {name: e["mean"] for name, e in report.estimates.items()},
        "prob_improves": report.prob_improves,
        "bound": report.stationary_accuracy,
        "observed": [row["accuracy"] for row in report.observed_accuracy],
        "calls": report.usage["calls"],
    }
    prediction = refine(**question)
    account = prediction.markovscale
    out["refine"] = {
        "spans": spans_so_far(),
        "account": {
            "rounds": account.rounds,
            "stop_reason": account.stop_reason,
            "selected_round": account.selected_round,
            "calls": sum((e.get("usage") or {}).get("calls", 0) for e in account.trajectory),
            "changed": [
                account.trajectory[t]["answer_key"] != account.trajectory[t - 1]["answer_key"]
                for t in range(1, len(account.trajectory))
            ],
        },
    }
    scale = MarkovCalibrator(world.metric, num_threads=2, parallel_samples=4, store_traces=False).compile(
        MarkovScale(dspy.Predict("question -> answer"), max_calls=4, concurrency=4), trainset=world.examples
    )
    spans_so_far()
    voted = scale.run_strategy(4, 0, **question)
    out["scale"] = {"spans": spans_so_far(), "samples": voted.markovscale.samples, "plan": voted.markovscale.plan}
    voted = asyncio.run(scale.acall(**question))
    out["scale_async"] = {"spans": spans_so_far(), "samples": voted.markovscale.samples}
    batch = refine.answer_with_budget(world.examples[:5], budget=4, num_threads=2)
    out["budget"] = {"spans": spans_so_far(), "spent": batch.spent}
    down = MarkovRefine(dspy.Predict("question -> answer"), max_rounds=1, policy="fixed", refiner_lm=DownLM("down"))
    failed = down(**question)
    out["down"] = {"spans": spans_so_far(), "error": failed.markovscale.trajectory[1]["error"]}

    # The async calibration: MLflow's autolog patches compile only, acompile must behave the same.
    acalibrator = MarkovCalibrator(world.metric, store_traces=False)
    asyncio.run(
        acalibrator.acompile(
            MarkovRefine(dspy.Predict("question -> answer"), max_rounds=1), trainset=world.examples[:12]
        )
    )
    out["acompile"] = {"spans": spans_so_far(), "examples": 12}
    if TRACER == "mlflow":
        # Two calibrations in one run of the user's: the second gets a nested run (params cannot change).
        with mlflow.start_run(run_name="two calibrations"):
            for rounds in (1, 2):
                MarkovCalibrator(world.metric, store_traces=False).compile(
                    MarkovRefine(dspy.Predict("question -> answer"), max_rounds=rounds), trainset=world.examples[:12]
                )
        spans_so_far()

if TRACER == "mlflow":
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(output_format="list")
    out["runs"] = [
        {
            "params": dict(r.data.params),
            "metrics": dict(r.data.metrics),
            "history": {
                name: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, name)]
                for name in ("markovscale.observed_accuracy", "markovscale.predicted_accuracy")
            },
            "artifacts": [a.path for a in client.list_artifacts(r.info.run_id, "markovscale")],
            "name": r.info.run_name,
            "parent": r.data.tags.get("mlflow.parentRunId"),
        }
        for r in runs
    ]
print("RESULT " + json.dumps(out, default=str))
