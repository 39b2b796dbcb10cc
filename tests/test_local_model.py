"""Integration: the real embedded model behind llama.cpp's HTTP server, driven through LiteLLM.

Marked ``llm``; one server for most of the module. SmolLM2-135M is near the floor in quality, so these tests assert
behaviour (calls, parsing, stopping, fallbacks, saved files, resumed calibrations, secrets), never accuracy.
"""

import json
import logging
import urllib.request

import dspy
import pytest
from helpers import calibrate_and_kill

from markovscale_dspy import CalibrationError, MarkovCalibrator, MarkovRefine
from markovscale_dspy.calibrate.traces import TraceStore
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


@pytest.fixture(scope="module")
def winogrande():
    return load_task("winogrande")


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


# A server killed mid-calibration, bounded concurrency, secrets -----------------------------------------------------


def calibrator_for(task, trace_dir, threads=2):
    return MarkovCalibrator(task.metric, rounds=2, num_threads=threads, trace_dir=trace_dir, question_types=1)


def test_server_killed_mid_calibration_then_resumed(winogrande, tmp_path):
    task = winogrande
    train, _ = task.split(16, 0, seed=3)
    store = TraceStore(tmp_path / "t")
    first = LocalModel(n_parallel=2, out_of_process=True).start()
    port = first.port
    calibrator = calibrator_for(task, tmp_path / "t")
    lm = first.lm(temperature=0.7, cache=False, num_retries=0)
    # SIGKILL the server under the running calibration; only a CalibrationError is an acceptable failure.
    _, outcome = calibrate_and_kill(
        calibrator,
        MarkovRefine(task.program(), max_rounds=2),
        train,
        lm,
        store,
        chains=4,
        kill=first.kill,
        wait=90,
        join=180,
    )
    assert "program" in outcome or isinstance(outcome.get("error"), CalibrationError), outcome
    finished = len(store)
    failures = calibrator.report.failures
    print(
        f"\nkilled after {finished} stored chains; {failures['chains_failed']} chains failed at round 0, "
        f"{failures['rounds_failed']} refinement rounds failed"
    )
    assert finished >= 4 and failures["chains_failed"] + failures["rounds_failed"] > 0

    with LocalModel(n_parallel=2, port=port) as second:  # same endpoint: the stored chains apply
        again = calibrator_for(task, tmp_path / "t")
        with dspy.context(lm=second.lm(temperature=0.7, cache=False, num_retries=0), adapter=dspy.JSONAdapter()):
            again.compile(MarkovRefine(task.program(), max_rounds=2), trainset=train)
    report = again.report
    assert report.chains_reused == finished and report.failures["chains_failed"] == 0
    assert report.usage["calls"] == (16 - finished) * 3  # the LM is called only for the unfinished chains


def test_bounded_concurrency_loses_and_duplicates_no_chain(winogrande, tmp_path):
    task = winogrande
    train, _ = task.split(24, 0, seed=4)
    with LocalModel(n_parallel=2) as server:
        calibrator = calibrator_for(task, tmp_path / "t", threads=4)
        with dspy.context(lm=server.lm(temperature=0.7, cache=False, num_retries=0), adapter=dspy.JSONAdapter()):
            calibrator.compile(MarkovRefine(task.program(), max_rounds=2), trainset=train)
    report = calibrator.report
    assert sorted(c["index"] for c in report.chains) == list(range(24))
    assert report.failures["chains_failed"] == 0 and report.usage["calls"] == 24 * 3
    assert len(TraceStore(tmp_path / "t")) == 24


def test_cli_never_shows_the_api_key(tmp_path, capsys, caplog, monkeypatch):
    secret = "sk-FAKE-0a1b2c3d4e5f"
    monkeypatch.setenv("MY_SERVER_KEY", secret)
    state = tmp_path / "state.json"
    with LocalModel() as server, caplog.at_level(logging.DEBUG):
        code = main(
            [
                "-v",
                "calibrate",
                "--model",
                "hosted_vllm/smollm2",
                "--api-base",
                server.api_base,
                "--api-key-env",
                "MY_SERVER_KEY",
                "--train",
                "4",
                "--rounds",
                "1",
                "--out",
                str(state),
                "--task",
                "winogrande",
            ]
        )
        api_base = server.api_base
    out = capsys.readouterr()
    files = "".join(p.read_text() for p in tmp_path.iterdir() if p.suffix in (".json", ".md"))
    assert state.with_suffix(".report.md").exists() and state.with_suffix(".report.json").exists()
    assert code == 0
    for text in (out.out, out.err, caplog.text, files):
        assert secret not in text
    assert api_base not in files and json.loads(state.read_text())["markov"]["model"] is not None
