"""Question types: a mixture of chains fitted by EM, the number of types chosen by held-out likelihood."""

import numpy as np
import pytest
from helpers import IMPROVING, calibrated_model

from markovscale_dspy import TransitionModel
from markovscale_dspy.core.mixture import chain_statistics, fit_mixture, select_mixture
from markovscale_dspy.testing import SimulatedWorld


def two_type_chains(n, seed):
    rng = np.random.default_rng(seed)
    labels, answers = [], []
    for i in range(n):
        stable = i % 2 == 0
        p0, p_cw, p_wc = (0.8, 0.0, 0.0) if stable else (0.2, 0.1, 0.6)
        x = rng.random() < p0
        chain, keys, key = [x], [0], 0
        for _ in range(4):
            nxt = (rng.random() >= p_cw) if x else (rng.random() < p_wc)
            if nxt != x or (not x and not stable and rng.random() < 0.7):
                key += 1  # a change of correctness always changes the answer; unstable wrong answers wander
            x = nxt
            chain.append(bool(x))
            keys.append(key)
        labels.append(chain)
        answers.append(keys)
    return chain_statistics(labels, answers)


def test_em_recovers_two_question_types():
    mixture = fit_mixture(two_type_chains(2000, seed=0), 2)
    assert mixture.weights == pytest.approx((0.5, 0.5), abs=0.05)
    assert mixture.p0 == pytest.approx((0.8, 0.2), abs=0.05) and mixture.p_wc[1] == pytest.approx(0.6, abs=0.05)


def test_held_out_likelihood_finds_two_types():
    assert select_mixture(two_type_chains(600, seed=1)).components == 2


@pytest.mark.slow
def test_held_out_likelihood_keeps_one_type_for_a_homogeneous_world():
    model = calibrated_model(SimulatedWorld.homogeneous(300, seed=4, **IMPROVING))
    assert model.mixture is None


def test_mixture_round_trips_through_json(tmp_path):
    model = TransitionModel.fit([[True]]).with_mixture(fit_mixture(two_type_chains(200, seed=2), 2))
    assert TransitionModel.from_dict(model.to_dict()) == model
