"""Draft with a cheap model, refine with a strong one -- and let the numbers say whether it pays. Not run in CI.

    OPENAI_API_KEY=... python examples/draft_and_refine.py

Transition rates belong to the (drafter, refiner) pair: a strong refiner may fix a cheap draft often (high p_wc) or
break little (low p_cw). The calibration measures them, records both model names, and measures what each round
costs in dollars (LiteLLM's cost map), so ``value_per_correct`` turns money into the stopping rule. Running later
with other LMs than the calibration's warns.

Which configuration buys the most accuracy per dollar is what ``markovscale compare-configs`` answers:
    markovscale compare-configs --task arc_challenge --train 100 --test 100 --value-per-correct 0.01 \
        --config mini=openai/gpt-4o-mini --config mini+4o=openai/gpt-4o-mini+openai/gpt-4o \
        --config 4o=openai/gpt-4o
"""

import dspy

from markovscale_dspy import MarkovCalibrator, MarkovRefine
from markovscale_dspy.integrations.datasets import load_task
from markovscale_dspy.integrations.lms import build_lm

drafter = build_lm("openai/gpt-4o-mini", temperature=0.7)
refiner = build_lm("openai/gpt-4o", temperature=0.7)
task = load_task("arc_challenge")
train, test = task.split(200, 100, seed=0)

with dspy.context(lm=drafter, adapter=dspy.JSONAdapter()):  # round 0 runs on the drafter
    calibrator = MarkovCalibrator(task.metric, num_threads=16)
    refine = calibrator.compile(
        MarkovRefine(task.program(reasoning=True), max_rounds=3, refiner_lm=refiner, value_per_correct=0.01),
        trainset=train,
    )
    print(refine.model)
    print(
        "fitted for:", refine.markov.calibrated_for
    )  # {"program": ["openai/gpt-4o-mini"], "refiner": "openai/gpt-4o"}
    print("spend:", refine.markov.spend)  # calls, tokens and dollars of round 0 and of one refinement round
    print("stopping cost:", refine.stopping_cost(), "-> rounds:", refine.planned_rounds())
    refine.save("draft-mini-refine-4o.json")
    print(dspy.Evaluate(devset=test, metric=task.metric, num_threads=16)(refine))
