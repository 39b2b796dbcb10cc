"""Offline, instant: calibrate on a simulated world whose true chain is known, and compare with the truth.

python examples/simulated.py
"""

import dspy

from markovscale_dspy import MarkovCalibrator, MarkovRefine
from markovscale_dspy.testing import SimulatedWorld

world = SimulatedWorld.homogeneous(300, p0=0.4, p_cw=0.1, p_wc=0.3, seed=0)
with dspy.context(lm=world.lm()):
    calibrator = MarkovCalibrator(world.metric, rounds=4, num_threads=4)
    refine = calibrator.compile(
        MarkovRefine(dspy.Predict("question -> answer"), round_cost=0.01), trainset=world.examples
    )

for name in ("p0", "p_cw", "p_wc"):
    lo, hi = refine.model.interval(name)
    print(f"{name}: truth {world.summary()[name]:.3f}, estimate {getattr(refine.model, name):.3f} [{lo:.3f}, {hi:.3f}]")
print("regime:", refine.model.regime(), "| rounds at cost 0.01:", refine.planned_rounds())
