"""MarkovRefine with a model served by Ollama. Not run in CI (no Ollama binary is available here).

    ollama pull llama3.2 && ollama serve
    python examples/ollama.py

Ollama's native API lives at http://localhost:11434 (no /v1) for LiteLLM's ollama_chat/ prefix.
"""

import dspy

from markovscale_dspy import MarkovCalibrator, MarkovRefine
from markovscale_dspy.integrations.datasets import load_task
from markovscale_dspy.integrations.lms import build_lm

lm = build_lm("ollama_chat/llama3.2", api_base="http://localhost:11434", temperature=0.7)
task = load_task("gsm8k")
train, test = task.split(150, 50, seed=0)

with dspy.context(lm=lm):
    refine = MarkovCalibrator(task.metric, rounds=3, num_threads=4).compile(
        MarkovRefine(task.program(reasoning=True), max_rounds=3), trainset=train
    )
    print(refine.model)
    for example in test[:5]:
        pred = refine(**example.inputs())
        print(pred.answer, "gold", example.answer, pred.rounds, pred.stop_reason)
