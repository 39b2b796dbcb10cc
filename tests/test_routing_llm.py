"""Scale-out for real: two embedded llama.cpp servers (one thread each, separate processes) behind one LiteLLM
Router group, driving MarkovCalibrator and MarkovRefine over HTTP -- including one server killed mid-calibration.

Marked ``llm`` (run under ``flock /tmp/llm.lock``). SmolLM2-135M is near the floor in quality: these tests assert
traffic, completeness and resumption, never accuracy.
"""

import dspy
import pytest
from helpers import calibrate_and_kill

from markovscale_dspy import MarkovCalibrator, MarkovRefine
from markovscale_dspy.calibrate.traces import TraceStore
from markovscale_dspy.integrations.datasets import load_task
from markovscale_dspy.integrations.lms import build_lm
from markovscale_dspy.integrations.local import LocalModel

pytestmark = pytest.mark.llm

GROUP = "smollm2-pool"


@pytest.fixture(scope="module")
def task():
    return load_task("winogrande")


def router_config(*servers, **settings):
    return {
        "model_list": [
            {"model_name": GROUP, "litellm_params": {"model": "openai/smollm2", "api_base": s.api_base}}
            for s in servers
        ],
        # The Router owns retries: a request to a dead server is retried on the other, which then takes all
        # traffic while the dead one cools down.
        "router_settings": {"num_retries": 3, "allowed_fails": 0, "cooldown_time": 600, "retry_after": 0, **settings},
    }


def generated(server):
    return server.metrics().get("tokens_predicted_total", 0.0)


def calibrator_for(task, trace_dir, threads=4):
    return MarkovCalibrator(task.metric, rounds=2, num_threads=threads, trace_dir=trace_dir, question_types=1)


def test_a_calibration_spreads_over_both_servers_and_refine_runs_through_the_router(task, tmp_path):
    train, test = task.split(12, 4, seed=21)
    with (
        LocalModel(n_threads=1, n_parallel=2, out_of_process=True) as a,
        LocalModel(n_threads=1, n_parallel=2, out_of_process=True) as b,
    ):
        lm = build_lm(GROUP, router_config=router_config(a, b), temperature=0.7, max_tokens=256, cache=False)
        calibrator = calibrator_for(task, tmp_path / "t")
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
            refine = calibrator.compile(MarkovRefine(task.program(), max_rounds=2), trainset=train)
            predictions = [refine(**example.inputs()) for example in test]
        per_server = [generated(a), generated(b)]
    report = calibrator.report
    print(f"\ncalls per deployment {dict(lm.engine.deployment_calls)}; tokens generated per server {per_server}")
    assert all(tokens > 0 for tokens in per_server)  # both servers did work, by their own count
    assert len(lm.engine.deployment_calls) == 2 and min(lm.engine.deployment_calls.values()) >= 3
    assert sorted(c["index"] for c in report.chains) == list(range(12)) and report.failures["chains_failed"] == 0
    assert report.usage["calls"] == 12 * 3 and report.calibrated_for["program"] == [f"router/{GROUP} [openai/smollm2]"]
    assert all(p.answer in {"A", "B", "C", "D", "E"} for p in predictions)  # the schema held (grammar)


def test_one_server_killed_mid_calibration_loses_and_duplicates_no_chain_and_resumes(task, tmp_path):
    n = 16
    train, _ = task.split(n, 0, seed=22)
    store = TraceStore(tmp_path / "t")
    a = LocalModel(n_threads=1, n_parallel=2, out_of_process=True).start()
    b = LocalModel(n_threads=1, n_parallel=2, out_of_process=True).start()
    try:
        config = router_config(a, b)
        lm = build_lm(GROUP, router_config=config, temperature=0.7, max_tokens=256, cache=False)
        calibrator = calibrator_for(task, tmp_path / "t")

        def kill_one():  # SIGKILL one server under the running calibration; what each had served until then
            served = dict(lm.engine.deployment_calls)
            b.kill()
            return served

        before_kill, outcome = calibrate_and_kill(
            calibrator,
            MarkovRefine(task.program(), max_rounds=2),
            train,
            lm,
            store,
            chains=3,
            kill=kill_one,
            wait=120,
            join=300,
        )
        assert "program" in outcome, outcome
        report = calibrator.report
        print(
            f"\nkilled one server after {sum(before_kill.values())} calls ({before_kill}); finished with "
            f"{dict(lm.engine.deployment_calls)}; failures {report.failures['round_errors']}"
        )
        assert len(before_kill) == 2  # both servers had served calls before the kill
        indices = [c["index"] for c in report.chains]
        assert sorted(indices) == list(range(n))  # no chain lost, none duplicated
        assert report.failures["chains_failed"] == 0
        lm_errors = {k: v for k, v in report.failures["round_errors"].items() if k.startswith("LM")}
        assert not lm_errors  # the Router retried every request the dead server dropped
        assert report.usage["calls"] == n * 3 == sum(lm.engine.deployment_calls.values())
        assert len(store) == n

        # Resume: a second run finds every chain in the store and calls the LM not once.
        again = calibrator_for(task, tmp_path / "t")
        lm2 = build_lm(GROUP, router_config=config, temperature=0.7, max_tokens=256, cache=False)
        with dspy.context(lm=lm2, adapter=dspy.JSONAdapter()):
            again.compile(MarkovRefine(task.program(), max_rounds=2), trainset=train)
        assert again.report.chains_reused == n and again.report.usage["calls"] == 0
        assert again.report.transitions_by_round == report.transitions_by_round
    finally:
        a.kill()
        b.kill()
