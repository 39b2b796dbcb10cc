"""Router-backed LMs, offline: config parsing and its errors, calls through litellm.Router (LiteLLM's mock_response
deployments and a loopback HTTP server), DSPy's cache/usage/history, dollars, and secrets kept out of files and logs."""

import asyncio
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dspy
import pytest
from helpers import StatusServer, needs_olmo_eval

from markovscale_dspy import ConfigurationError, MarkovCalibrator, MarkovRefine
from markovscale_dspy.calibrate.traces import chain_key
from markovscale_dspy.integrations.lms import build_lm
from markovscale_dspy.integrations.routing import load_router_config
from markovscale_dspy.reporting.text import calibration_markdown
from markovscale_dspy.usage import measure_usage

SECRET = "sk-test-SECRET"
ANSWER = '{"answer": "42"}'


def deployment(group="pool", base="http://127.0.0.1:9/v1", model="openai/smollm2", answer=ANSWER, **info):
    entry = {
        "model_name": group,
        "litellm_params": {"model": model, "api_base": base, "api_key": SECRET, "mock_response": answer},
    }
    if info:
        entry["model_info"] = info
    return entry


def config(*deployments, **settings):
    return {
        "model_list": list(deployments) or [deployment(), deployment(base="http://127.0.0.1:10/v1")],
        "router_settings": settings,
    }


PRICED = {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}


# Parsing and its errors ----------------------------------------------------------------------------------------------


def test_a_group_of_deployments_is_parsed():
    parsed = load_router_config(config(deployment(), deployment(base="http://127.0.0.1:10/v1"), deployment("other")))
    assert parsed.groups() == ["pool", "other"] and len(parsed.deployments_of("pool")) == 2
    assert parsed.settings["num_retries"] == 2  # the Router owns retries; this package's default
    assert SECRET not in repr(parsed)


def test_yaml_and_json_files_are_read(tmp_path):
    yaml_path = tmp_path / "router.yaml"
    yaml_path.write_text(
        "model_list:\n"
        "  - model_name: pool\n"
        "    litellm_params: {model: openai/smollm2, api_base: 'http://127.0.0.1:9/v1', rpm: 60}\n"
        "    model_info: {input_cost_per_token: 0.000001, output_cost_per_token: 0.000002}\n"
        "router_settings:\n  routing_strategy: least-busy\n  num_retries: 1\n  allowed_fails: 1\n"
        "  cooldown_time: 5\n"
        "litellm_settings:\n  request_timeout: 30\n"
    )
    parsed = load_router_config(yaml_path)
    assert parsed.settings == {
        "num_retries": 1,
        "routing_strategy": "least-busy",
        "allowed_fails": 1,
        "cooldown_time": 5,
        "timeout": 30,
    }
    json_path = tmp_path / "router.json"
    json_path.write_text(json.dumps(config()))
    assert load_router_config(json_path).groups() == ["pool"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"router_settings": {}}, "has no model_list"),
        ({"model_list": []}, "has no model_list"),
        ({"model_list": [{"litellm_params": {"model": "openai/x"}}]}, r"model_list\[0\] has no model_name"),
        ({"model_list": [{"model_name": "pool", "litellm_params": {}}]}, r"model_list\[0\] \('pool'\) needs"),
        (config(num_retrys=2), "no setting 'num_retrys' .*did you mean 'num_retries'"),
        (config(routing_strategy="round-robin"), "routing_strategy 'round-robin' is not one of"),
        (config(fallbacks=[{"pool": ["backup"]}]), "fallbacks names 'backup', which is not a model_name group"),
        (config(fallbacks=[{"pool": "pool"}]), "must be a list of groups"),
        (config(num_retries=-1), "num_retries must be a non-negative integer"),
        (config(deployment(input_cost_per_token=-1)), "input_cost_per_token must be a number >= 0"),
        (["not", "a", "mapping"], "must be a mapping with a model_list"),
    ],
)
def test_bad_configs_are_named(data, message):
    with pytest.raises(ConfigurationError, match=message):
        load_router_config(data) if not isinstance(data, list) else load_router_config_from_list(data)


def load_router_config_from_list(data):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "list.json"
    path.write_text(json.dumps(data))
    return load_router_config(path)


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text("model_list:\n  - model_name: pool\n    litellm_params: {model: openai/x\n")
    with pytest.raises(ConfigurationError, match=r"router.yaml is not valid YAML: .* at line \d+, column \d+"):
        load_router_config(path)


def test_bad_json_and_missing_files_are_named(tmp_path):
    path = tmp_path / "router.json"
    path.write_text('{"model_list": [}')
    with pytest.raises(ConfigurationError, match=r"router.json is not valid JSON: .* line 1"):
        load_router_config(path)
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_router_config(tmp_path / "nope.yaml")


def test_an_unknown_group_lists_the_groups():
    with pytest.raises(ConfigurationError, match=r"model 'pol' is not a group .* \['pool'\].* Did you mean 'pool'"):
        build_lm("pol", router_config=config())


def test_endpoints_and_keys_belong_to_the_config():
    with pytest.raises(ConfigurationError, match="drop api_base, api_key and route"):
        build_lm("pool", router_config=config(), api_base="http://x/v1")


# Calls through the Router --------------------------------------------------------------------------------------------


def test_calls_go_through_the_router_with_dspy_cache_usage_and_history():
    lm = build_lm("pool", router_config=config(deployment(**PRICED)), temperature=0.7)
    assert lm.model == "router/pool" and lm.num_retries == 0  # one retry owner: the Router
    program = dspy.Predict("question -> answer")
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()), measure_usage() as usage:
        assert program(question="six times seven?").answer == "42"
        program(question="six times seven?")  # DSPy's cache: no second call
        program(question="six times seven?", config={"rollout_id": 1})  # a fresh sample
    assert usage.calls == 2 and usage.prompt_tokens == 20 and usage.completion_tokens == 40
    assert usage.cost == pytest.approx(2 * (10 * 1e-6 + 20 * 2e-6))  # the config's model_info prices
    assert sum(lm.engine.deployment_calls.values()) == 2
    entry = lm.history[-1]
    assert entry["model"] == "router/pool" and entry["kwargs"]["response_format"] is not None  # schema requested
    assert entry["response"].provider_data["markovscale"]["cost"] == pytest.approx(5e-5)


def test_self_hosted_deployments_are_declared_schema_capable():
    lm = build_lm("pool", router_config=config())
    assert lm.supports_response_schema and "response_format" in lm.supported_params
    assert not build_lm("pool", router_config=config(), structured=False).supports_response_schema


def test_a_group_spreads_calls_over_its_deployments():
    lm = build_lm("pool", router_config=config(), cache=False)
    for i in range(24):
        lm(f"hello {i}")
    assert sorted(lm.engine.deployment_calls) == ["pool#0 openai/smollm2", "pool#1 openai/smollm2"]


def test_async_calls_go_through_the_router():
    lm = build_lm("pool", router_config=config(), cache=False)
    program = dspy.Predict("question -> answer")

    async def run():
        with measure_usage() as usage:
            answers = await asyncio.gather(*[program.acall(question=f"q{i}", lm=lm) for i in range(4)])
        return answers, usage

    with dspy.context(adapter=dspy.JSONAdapter()):
        answers, usage = asyncio.run(run())
    assert [a.answer for a in answers] == ["42"] * 4 and usage.calls == 4


def test_a_dead_group_falls_back_to_another():
    dead = deployment(base="http://127.0.0.1:9/v1", answer=None)
    dead["litellm_params"].pop("mock_response")
    cfg = config(dead, deployment("backup", answer='{"answer": "7"}'), num_retries=0, fallbacks=[{"pool": ["backup"]}])
    lm = build_lm("pool", router_config=cfg, cache=False)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        assert dspy.Predict("question -> answer")(question="q").answer == "7"
    assert lm.engine.model_names == ["openai/smollm2"] and "backup#1" in next(iter(lm.engine.deployment_calls))


class _Failing(BaseHTTPRequestHandler):
    hits = 0

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).hits += 1
        body = json.dumps({"error": {"message": f"boom at {self.server.server_address}", "type": "server_error"}})
        self.send_response(500)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def failing_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    _Failing.hits = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.mark.slow  # a Router over a failing deployment
def test_retries_do_not_multiply(failing_server):
    """The Router retries (num_retries=1: two attempts); DSPy does not retry on top (it would make 2 x 4)."""
    cfg = config(deployment(base=failing_server, answer=None), num_retries=1, retry_after=0)
    cfg["model_list"][0]["litellm_params"].pop("mock_response")
    lm = build_lm("pool", router_config=cfg, cache=False)
    with pytest.raises(dspy.LMError) as caught:
        lm("hello")
    assert _Failing.hits == 2
    assert SECRET not in str(caught.value) and failing_server not in str(caught.value)


# Identity, records and secrets ---------------------------------------------------------------------------------------


def test_the_fingerprint_names_models_and_hashes_endpoints():
    lm = build_lm("pool", router_config=config())
    other = build_lm("pool", router_config=config(deployment(), deployment(base="http://127.0.0.1:11/v1")))
    fingerprint = lm.engine.fingerprint
    assert fingerprint.startswith("router:") and fingerprint != other.engine.fingerprint
    assert fingerprint == build_lm("pool", router_config=config()).engine.fingerprint
    state = json.dumps(lm.dump_state())
    assert SECRET not in state and "127.0.0.1" not in state
    with dspy.context(lm=lm):
        chain_key(
            MarkovRefine(dspy.Predict("question -> answer")), 1, dspy.Example(question="q").with_inputs("question")
        )


def test_no_secret_reaches_a_state_a_report_or_a_log(tmp_path, caplog):
    dead = deployment(base="http://127.0.0.1:9/v1", answer=None)
    dead["litellm_params"].pop("mock_response")
    cfg = config(
        deployment(**PRICED),
        deployment("refiner", answer='{"answer": "43"}'),
        dead,
        num_retries=0,
    )
    cfg["model_list"][2]["model_name"] = "flaky"
    path = tmp_path / "router.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    train = [dspy.Example(question=f"q{i}", answer="42").with_inputs("question") for i in range(4)]
    metric = lambda example, pred, trace=None: example.answer == pred.answer  # noqa: E731
    with caplog.at_level(logging.DEBUG):
        refine = MarkovRefine(
            dspy.Predict("question -> answer"),
            max_rounds=1,
            refiner_lm=build_lm("refiner", router_config=path, cache=False),
        )
        calibrator = MarkovCalibrator(metric, num_threads=2, trace_dir=tmp_path / "traces")
        with dspy.context(lm=build_lm("pool", router_config=path, cache=False), adapter=dspy.JSONAdapter()):
            calibrated = calibrator.compile(refine, trainset=train)
            with pytest.raises(dspy.LMError) as caught:  # a failing deployment's error is scrubbed too
                build_lm("flaky", router_config=path, cache=False)("hello")
        calibrated.save(tmp_path / "state.json")
        (tmp_path / "report.md").write_text(calibration_markdown(calibrator.report))
        (tmp_path / "report.json").write_text(json.dumps(calibrator.report.to_dict()))
    state = json.loads((tmp_path / "state.json").read_text())["markov"]
    assert state["calibrated_for"] == {
        "program": ["router/pool [openai/smollm2]"],
        "refiner": "router/refiner [openai/smollm2]",
    }
    assert state["spend"]["round0"]["cost"] == pytest.approx(5e-5)
    assert state["spend"]["refinement"]["cost"] == 0.0  # self-hosted without prices: free
    files = "".join((tmp_path / name).read_text() for name in ("state.json", "report.md", "report.json"))
    for text in (files, caplog.text, str(caught.value)):
        assert SECRET not in text
    assert "127.0.0.1:9" not in files and "127.0.0.1:9" not in str(caught.value)


# The command line ----------------------------------------------------------------------------------------------------


@pytest.fixture
def router_yaml(tmp_path):
    import yaml

    cfg = config(
        deployment("cheap", model="openai/cheap-model", answer='{"answer": "A"}', **PRICED),
        deployment("strong", base="http://127.0.0.1:10/v1", model="openai/strong-model", answer='{"answer": "B"}'),
        num_retries=0,
    )
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@needs_olmo_eval
def test_cli_calibrates_through_a_router_group_with_another_refiner(router_yaml, tmp_path, capsys, caplog):
    from markovscale_dspy.cli import main

    state = tmp_path / "state.json"
    with caplog.at_level(logging.DEBUG):
        code = main(
            [
                "calibrate",
                "--router-config",
                str(router_yaml),
                "--model",
                "cheap",
                "--refiner-model",
                "strong",
                "--task",
                "winogrande",
                "--train",
                "4",
                "--rounds",
                "1",
                "--out",
                str(state),
                "--fresh",
                "--value-per-correct",
                "0.05",
            ]
        )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "A refinement round cost $0 on average" in out  # the strong group is self-hosted, without prices
    markov = json.loads(state.read_text())["markov"]
    assert markov["calibrated_for"]["refiner"] == "router/strong [openai/strong-model]"
    written = "".join(p.read_text() for p in tmp_path.iterdir() if p.suffix in (".json", ".md"))
    for text in (out, written, caplog.text):
        assert SECRET not in text


@needs_olmo_eval
def test_cli_compare_configs_writes_states_and_a_recommendation(router_yaml, tmp_path, capsys):
    from markovscale_dspy.cli import main

    out_dir = tmp_path / "out"
    code = main(
        [
            "compare-configs",
            "--router-config",
            str(router_yaml),
            "--config",
            "cheap",
            "--config",
            "mixed=cheap+strong",
            "--task",
            "winogrande",
            "--train",
            "4",
            "--test",
            "2",
            "--rounds",
            "1",
            "--out",
            str(out_dir),
            "--value-per-correct",
            "0.01",
            "--fresh",
            "--min-prob-improves",
            "0",
        ]
    )
    assert code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "cheap.json",
        "compare.json",
        "compare.md",
        "compare.png",
        "mixed.json",
    ]
    report = json.loads((out_dir / "compare.json").read_text())
    assert report["recommended"] in ("cheap", "mixed") and len(report["results"]) == 2
    assert "## Calibrated chains" in (out_dir / "compare.md").read_text()
    assert SECRET not in (out_dir / "compare.md").read_text() + (out_dir / "compare.json").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--router-config", "R"], "--router-config needs --model naming the model_name group"),
        (["--router-config", "R", "--model", "openai/gpt-4o"], "model 'openai/gpt-4o' is not a group"),
        (["--router-config", "R", "--model", "cheap", "--api-base", "http://x/v1"], "drop --api-base"),
    ],
)
def test_cli_router_mistakes_are_named(router_yaml, capsys, argv, message):
    from markovscale_dspy.cli import main

    argv = [str(router_yaml) if a == "R" else a for a in argv]
    assert main(["calibrate", *argv, "--train", "2", "--rounds", "1"]) == 2
    assert message in capsys.readouterr().err


def test_a_pinned_router_lm_saves_without_secrets_and_loads_unpinned_with_a_warning(tmp_path):
    lm = build_lm("pool", router_config=config())
    module = MarkovRefine(dspy.Predict("question -> answer"))
    module.program.set_lm(lm)
    module.refiner.set_lm(lm)
    module.save(tmp_path / "state.json")
    text = (tmp_path / "state.json").read_text()
    assert SECRET not in text and "127.0.0.1" not in text and "router/pool" in text
    fresh = MarkovRefine(dspy.Predict("question -> answer"))
    with pytest.warns(UserWarning, match="router group, which a file cannot restore"):
        fresh.load(tmp_path / "state.json")
    assert fresh.program.lm is None and fresh.refiner.lm is None


def test_a_self_hosted_deployment_without_a_key_gets_a_placeholder():
    """OpenAI-compatible local servers take any key, but LiteLLM's OpenAI client refuses to send none."""
    with StatusServer(200) as server:
        cfg = {
            "model_list": [
                {"model_name": "local", "litellm_params": {"model": "openai/x", "api_base": server.api_base}}
            ]
        }
        lm = build_lm("local", router_config=cfg, cache=False)
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
            assert dspy.Predict("question -> answer")(question="A or B?").answer == "A"
        assert server.hits == 1


def test_routers_built_one_after_another_each_reach_their_own_servers():
    """Regression: LiteLLM caches clients per deployment id process-wide, and registers deployments' model_info
    globally; a second Router with the same group names must neither reuse the first's ids nor stop counting its
    deployments as self-hosted (it then sent no key)."""
    build_lm("openai/seq-model", api_base="http://127.0.0.1:9/v1")  # a single-server LM registers the name first
    for _ in range(2):
        with StatusServer(200) as server:
            deployments = [
                {"model_name": "seq", "litellm_params": {"model": "openai/seq-model", "api_base": server.api_base}}
            ]
            lm = build_lm("seq", router_config={"model_list": deployments * 2}, cache=False)
            for i in range(3):
                lm(f"hello {i}")
            assert server.hits == 3 and lm.supports_response_schema


def test_streaming_goes_through_the_router():
    lm = build_lm("pool", router_config=config(), cache=False)
    program = dspy.streamify(dspy.Predict("question -> answer"))

    async def run():
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
            return [chunk async for chunk in program(question="q")]

    chunks = asyncio.run(run())
    assert isinstance(chunks[-1], dspy.Prediction) and chunks[-1].answer == "42" and len(chunks) > 2
