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


@pytest.mark.parametrize("name", ["vllm.py", "ollama.py", "hosted.py"])
def test_network_examples_compile(name):
    compile((EXAMPLES / name).read_text(), name, "exec")
