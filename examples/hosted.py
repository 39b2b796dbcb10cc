"""MarkovRefine with a hosted model (OpenAI here; any LiteLLM provider works). Not run in CI (needs a key).

    export OPENAI_API_KEY=sk-...
    python examples/hosted.py

Costs real money: calibration runs round 0 plus `rounds` refinements on every trainset question.
With 200 questions x 5 calls that is 1,000 calls; start small and watch calibrator.report.usage.
"""

import dspy

from markovscale_dspy import MarkovCalibrator, MarkovRefine
from markovscale_dspy.integrations.datasets import load_task
from markovscale_dspy.integrations.lms import build_lm

lm = build_lm("openai/gpt-4o-mini", temperature=0.7)  # key from $OPENAI_API_KEY; never written to state
task = load_task("gsm8k")
train, test = task.split(200, 100, seed=0)

with dspy.context(lm=lm):
    calibrator = MarkovCalibrator(task.metric, rounds=4, num_threads=16)
    refine = calibrator.compile(MarkovRefine(task.program(reasoning=True), round_cost=0.005), trainset=train)
    print(calibrator.report.regime, calibrator.report.usage)
    refine.save("gpt-4o-mini-gsm8k.json")  # then: markovscale report gpt-4o-mini-gsm8k.json
