"""Shared builders for the offline tests."""

import dspy

from markovscale_dspy import MarkovRefine, TransitionModel
from markovscale_dspy.testing import SimulatedWorld

IMPROVING = {"p0": 0.4, "p_cw": 0.1, "p_wc": 0.3}
DEGRADING = {"p0": 0.7, "p_cw": 0.3, "p_wc": 0.1}


def world(n=50, seed=0, **params):
    return SimulatedWorld.homogeneous(n, seed=seed, **(params or IMPROVING))


def model_from_rates(p0, p_cw, p_wc, n=10_000):
    """A TransitionModel whose estimates sit (almost exactly) at the given rates: large pseudo-counts."""
    cw, wc, c0 = round(p_cw * n), round(p_wc * n), round(p0 * n)
    return TransitionModel(n0_correct=c0, n0_total=n, n_cc=n - cw, n_cw=cw, n_wc=wc, n_ww=n - wc)


def refine(**kwargs):
    return MarkovRefine(dspy.Predict("question -> answer"), **kwargs)
