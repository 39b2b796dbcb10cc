"""Issue 5 against the real llama.cpp server: a server killed mid-calibration, bounded-concurrency load, secrets."""

import json
import logging
import threading
import time

import dspy
import pytest

from markovscale_dspy import CalibrationError, MarkovCalibrator, MarkovRefine
from markovscale_dspy.calibrate.traces import TraceStore
from markovscale_dspy.cli import main
from markovscale_dspy.integrations.datasets import load_task
from markovscale_dspy.integrations.local import LocalModel

pytestmark = pytest.mark.llm


@pytest.fixture(scope="module")
def task():
    return load_task("winogrande")


def calibrator_for(task, trace_dir, threads=2):
    return MarkovCalibrator(task.metric, rounds=2, num_threads=threads, trace_dir=trace_dir, question_types=1)


def test_server_killed_mid_calibration_then_resumed(task, tmp_path):
    train, _ = task.split(16, 0, seed=3)
    store = TraceStore(tmp_path / "t")
    first = LocalModel(n_parallel=2, out_of_process=True).start()
    port = first.port
    calibrator = calibrator_for(task, tmp_path / "t")
    outcome = {}

    def run():
        lm = first.lm(temperature=0.7, cache=False, num_retries=0)
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
            try:
                outcome["program"] = calibrator.compile(MarkovRefine(task.program(), max_rounds=2), trainset=train)
            except Exception as exc:  # only a CalibrationError is acceptable; checked below
                outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 90
    while len(store) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    first.kill()  # SIGKILL the server under the running calibration
    worker.join(timeout=180)
    assert not worker.is_alive()
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


def test_bounded_concurrency_loses_and_duplicates_no_chain(task, tmp_path):
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
