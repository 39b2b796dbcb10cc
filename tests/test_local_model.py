"""Integration: the real embedded model behind llama.cpp's HTTP server, driven through LiteLLM.

Marked ``llm``; one server for the whole module. SmolLM2-135M is near the floor in quality, so these tests assert
behaviour (calls, parsing, stopping, fallbacks, saved files), never accuracy.
"""

import json
import urllib.request

import dspy
import pytest

from markovscale_dspy import MarkovCalibrator, MarkovRefine
from markovscale_dspy.cli import main
from markovscale_dspy.integrations.datasets import load_task
from markovscale_dspy.integrations.local import LocalModel

pytestmark = pytest.mark.llm


@pytest.fixture(scope="module")
def server():
    with LocalModel(n_parallel=2) as running:
        yield running


@pytest.fixture(scope="module")
def task():
    return load_task("arc_easy")


def test_server_answers_health_on_loopback(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=5) as response:
        assert response.status == 200 and server.api_base.startswith("http://127.0.0.1:")


def test_program_parses_through_litellm(server, task):
    lm = server.lm(temperature=0.7, cache=False)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        pred = task.program()(**task.examples[0].inputs())
    assert pred.answer in {"A", "B", "C", "D", "E"}
    assert "json_schema" in str(lm.history[-1]["kwargs"].get("response_format")) or lm.supports_response_schema


def test_calibrator_and_refine_over_http(server, task):
    train, test = task.split(8, 3, seed=1)
    lm = server.lm(temperature=0.7, cache=False, num_retries=1)
    calibrator = MarkovCalibrator(task.metric, rounds=2, num_threads=2)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        refine = calibrator.compile(MarkovRefine(task.program(), max_rounds=2), trainset=train)
        predictions = [refine(**ex.inputs()) for ex in test]
    report = calibrator.report
    assert report.examples == 8 and report.usage["calls"] >= 8 * 3
    assert refine.model.n0_total == report.chains_used
    planned = refine.model.optimal_rounds(0.0, 2)
    assert all(p.rounds == planned for p in predictions)


def test_failed_refinement_keeps_the_previous_answer(server, task):
    refine = MarkovRefine(task.program(), policy="fixed", max_rounds=1)
    refine.refiner.lm = server.lm(temperature=0.7, cache=False, max_tokens=1)  # truncated JSON cannot parse
    with dspy.context(lm=server.lm(temperature=0.7, cache=False), adapter=dspy.JSONAdapter()):
        pred = refine(**task.examples[1].inputs())
    assert pred.trajectory[1]["error"] is not None and pred.answer == pred.trajectory[0]["outputs"]["answer"]


def test_cli_calibrates_any_openai_compatible_server(server, tmp_path, capsys):
    state = tmp_path / "state.json"
    code = main(
        [
            "calibrate",
            "--model",
            "hosted_vllm/smollm2",
            "--api-base",
            server.api_base,
            "--train",
            "6",
            "--rounds",
            "1",
            "--threads",
            "2",
            "--out",
            str(state),
        ]
    )
    assert code == 0 and "Calibration:" in capsys.readouterr().out
    saved = json.loads(state.read_text())
    assert (
        saved["markov"]["model"]["counts"]["n0_total"] >= 1
        and state.with_suffix(".report.md").exists()
        and state.with_suffix(".report.png").exists()
    )
    assert main(["report", str(state), "--cost", "0.01"]) == 0
    assert "P(refinement helps | data)" in capsys.readouterr().out


def test_server_stops_when_the_context_exits():
    with LocalModel() as running:
        port = running.port
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
