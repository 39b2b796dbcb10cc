"""The examples that run offline do run."""

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_simulated_example_runs(capsys):
    runpy.run_path(str(EXAMPLES / "simulated.py"), run_name="__main__")
    assert "regime: improving" in capsys.readouterr().out


@pytest.mark.llm
def test_embedded_model_example_runs(capsys):
    runpy.run_path(str(EXAMPLES / "embedded_local.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "TransitionModel(" in out and out.count("stopped:") == 4


@pytest.mark.parametrize("name", ["vllm.py", "ollama.py", "hosted.py", "router_vllm.py", "draft_and_refine.py"])
def test_network_examples_compile(name):
    compile((EXAMPLES / name).read_text(), name, "exec")


def test_router_example_config_is_valid(monkeypatch):
    from markovscale_dspy.integrations.lms import build_lm
    from markovscale_dspy.integrations.routing import load_router_config

    monkeypatch.setenv("OPENAI_API_KEY", "sk-example")
    config = load_router_config(EXAMPLES / "router.yaml")
    assert config.groups() == ["qwen", "hosted"] and config.fallback_groups("qwen") == ["hosted"]
    lm = build_lm("qwen", router_config=config)
    assert lm.engine.model_names == ["hosted_vllm/Qwen/Qwen2.5-7B-Instruct", "openai/gpt-4o-mini"]
    assert lm.supports_response_schema  # replicas are self-hosted; gpt-4o-mini takes JSON schemas
