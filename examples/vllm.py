"""MarkovRefine against a vLLM (or SGLang, or llama.cpp) OpenAI-compatible server. Not run in CI.

    vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000
    MARKOVSCALE_API_BASE=http://localhost:8000/v1 python examples/vllm.py

The same thing from the command line:
    markovscale calibrate --model hosted_vllm/Qwen/Qwen2.5-7B-Instruct --api-base http://localhost:8000/v1 \
        --task arc_challenge --train 200 --out qwen-arc.json
"""

import os

import dspy

from markovscale_dspy import MarkovCalibrator, MarkovRefine
from markovscale_dspy.integrations.datasets import load_task
from markovscale_dspy.integrations.lms import build_lm

# hosted_vllm/ is LiteLLM's prefix for vLLM's OpenAI server; api_base comes from $MARKOVSCALE_API_BASE if unset.
# build_lm declares the model schema-capable, so DSPy's JSONAdapter asks for grammar-constrained JSON.
lm = build_lm(
    "hosted_vllm/Qwen/Qwen2.5-7B-Instruct",
    api_base=os.environ.get("MARKOVSCALE_API_BASE"),
    temperature=0.7,
    max_tokens=1024,
)
task = load_task("arc_challenge")
train, test = task.split(200, 100, seed=0)

with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
    calibrator = MarkovCalibrator(task.metric, rounds=4, num_threads=16)
    refine = calibrator.compile(
        MarkovRefine(task.program(reasoning=True), max_rounds=4, round_cost=0.005), trainset=train
    )
    print(refine.model, "P(helps) =", refine.model.prob_improves())
    refine.save("qwen-arc-challenge.json")
    print(dspy.Evaluate(devset=test, metric=task.metric, num_threads=16)(refine))
