"""MarkovRefine over two vLLM replicas behind LiteLLM's Router, with a hosted model as fallback. Not run in CI.

    vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000     # on gpu-1 and on gpu-2 (see examples/router.yaml)
    OPENAI_API_KEY=... python examples/router_vllm.py

The Router balances calls over the replicas, retries a failed call on the other one (it owns retries: the DSPy LM
is built with num_retries=0, so they never multiply), cools a failing replica down, and falls back to the hosted
group when both are down. The calibration records the LM it was fitted for as ``router/qwen [<models>]`` -- names
only: endpoints and keys stay in the config. A LiteLLM *proxy* needs none of this: it is an OpenAI-compatible
server, so ``build_lm("openai/qwen", api_base="http://proxy:4000")``.

The same from the command line:
    markovscale calibrate --router-config examples/router.yaml --model qwen --task arc_challenge --train 200 \
        --value-per-correct 0.01 --out qwen-arc.json
"""

from pathlib import Path

import dspy

from markovscale_dspy import MarkovCalibrator, MarkovRefine
from markovscale_dspy.integrations.datasets import load_task
from markovscale_dspy.integrations.lms import build_lm

CONFIG = Path(__file__).with_name("router.yaml")

lm = build_lm("qwen", router_config=CONFIG, temperature=0.7, max_tokens=1024)
task = load_task("arc_challenge")
train, test = task.split(200, 100, seed=0)

with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
    # 16 concurrent chains: the Router spreads them over both replicas.
    calibrator = MarkovCalibrator(task.metric, num_threads=16)
    # A correct answer is worth $0.01: a refinement round must buy its measured dollars / 0.01 of accuracy.
    refine = calibrator.compile(
        MarkovRefine(task.program(reasoning=True), max_rounds=4, value_per_correct=0.01), trainset=train
    )
    print(refine.model, "P(helps) =", refine.model.prob_improves())
    print("dollars per refinement round:", refine.markov.dollars_per_round(), "-> stops at", refine.planned_rounds())
    print("calls per replica:", dict(lm.engine.deployment_calls))
    refine.save("qwen-arc-challenge.json")
    print(dspy.Evaluate(devset=test, metric=task.metric, num_threads=16)(refine))
