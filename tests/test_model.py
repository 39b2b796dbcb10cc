"""TransitionModel: counting, posteriors, serialisation and input checks."""

import json

import numpy as np
import pytest
from helpers import model_from_rates, refine

from markovscale_dspy import DataError, StateError, TransitionModel

CHAINS = [[False, True, True], [True, True, False], [False, False, True]]


def test_fit_counts_round_zero():
    model = TransitionModel.fit(CHAINS)
    assert (model.n0_correct, model.n0_total) == (1, 3)


def test_fit_counts_transitions():
    model = TransitionModel.fit(CHAINS)
    assert (model.n_cc, model.n_cw, model.n_wc, model.n_ww) == (2, 1, 2, 1)


def test_chains_may_differ_in_length():
    model = TransitionModel.fit([[True], [False, True, True, True]])
    assert (model.n0_total, model.n_transitions) == (2, 3)


def test_point_estimates_are_posterior_means():
    model = TransitionModel.fit(CHAINS, prior=(1.0, 1.0))
    assert (model.p0, model.p_cw, model.p_wc) == pytest.approx((2 / 5, 2 / 5, 3 / 5))


def test_interval_contains_the_estimate():
    model = TransitionModel.fit(CHAINS * 20)
    lo, hi = model.interval("p_wc", level=0.95)
    assert lo < model.p_wc < hi


def test_interval_narrows_with_data():
    small, large = TransitionModel.fit(CHAINS), TransitionModel.fit(CHAINS * 50)
    width = lambda m: np.subtract(*m.interval("p_cw")[::-1])  # noqa: E731
    assert width(large) < width(small) / 4


def test_interval_rejects_unknown_parameter():
    with pytest.raises(ValueError, match="unknown parameter 'p_xx'"):
        TransitionModel.fit(CHAINS).interval("p_xx")


def test_interval_rejects_bad_level():
    with pytest.raises(ValueError, match="level must be strictly between 0 and 1, got 95"):
        TransitionModel.fit(CHAINS).interval("p0", level=95)


def test_prob_improves_high_when_refinement_clearly_helps():
    chains = [[False, True, True]] * 60 + [[True, True, True]] * 40
    assert TransitionModel.fit(chains).prob_improves() > 0.99


def test_prob_improves_low_when_refinement_clearly_hurts():
    chains = [[True, False, False]] * 60 + [[False, False, False]] * 40
    assert TransitionModel.fit(chains).prob_improves() < 0.01


def test_prob_improves_matches_brute_monte_carlo():
    model = TransitionModel.fit(CHAINS * 3)
    rng = np.random.default_rng(99)
    p0, p_cw, p_wc = (model.posterior(n).rvs(400_000, random_state=rng) for n in ("p0", "p_cw", "p_wc"))
    want = np.mean(p0 < p_wc / (p_cw + p_wc))
    assert model.prob_improves() == pytest.approx(want, abs=4 * np.sqrt(want * (1 - want) / 200_000))


@pytest.mark.parametrize(
    "model",
    [TransitionModel.fit(CHAINS * 10), model_from_rates(0.4, 0.1, 0.3), model_from_rates(0.8, 0.1, 0.3)],
    ids=["fitted", "improving", "degrading"],
)
def test_convenience_methods_delegate_to_theory(model):
    p0, p_cw, p_wc = model.p0, model.p_cw, model.p_wc
    # Oracles written out here rather than read from theory: the closed form, a scan of the objective, the bound.
    stationary = p_wc / (p_cw + p_wc)
    accuracy = [stationary + (p0 - stationary) * (1 - p_cw - p_wc) ** t for t in range(7)]
    objective = [a - 0.01 * t for t, a in enumerate(accuracy)]
    best = next(t for t, v in enumerate(objective) if v >= max(objective) - 1e-12)
    assert model.accuracy_at(3) == pytest.approx(accuracy[3], abs=1e-12)
    assert model.optimal_rounds(0.01, 6) == best
    assert model.regime() == ("improving" if p0 < stationary else "degrading" if p0 > stationary else "neutral")
    assert model.stationary_accuracy() == pytest.approx(stationary, abs=1e-12)


def test_model_is_immutable():
    model = TransitionModel.fit(CHAINS)
    with pytest.raises(AttributeError):
        model.n_cc = 5


def test_dict_round_trip_through_json_is_exact():
    model = TransitionModel.fit(CHAINS * 7, prior=(0.5, 0.5))
    restored = TransitionModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert restored == model and restored.p_wc == model.p_wc


def test_from_dict_detects_edited_estimates():
    data = TransitionModel.fit(CHAINS).to_dict()
    data["estimates"]["p_cw"] = 0.01
    with pytest.raises(StateError, match="p_cw=0.01 disagrees with its counts"):
        TransitionModel.from_dict(data)


def test_from_dict_rejects_foreign_dict():
    with pytest.raises(StateError, match="not a transition model"):
        TransitionModel.from_dict({"p0": 0.5})


def test_from_dict_rejects_negative_counts():
    data = TransitionModel.fit(CHAINS).to_dict()
    data["counts"]["n_cc"] = -1
    del data["estimates"]
    with pytest.raises(StateError, match="n_cc must be a non-negative integer, got -1"):
        TransitionModel.from_dict(data)


def test_empty_labels_are_rejected():
    with pytest.raises(DataError, match="labels is empty"):
        TransitionModel.fit([])


def test_empty_chain_is_rejected():
    with pytest.raises(DataError, match=r"labels\[1\] is an empty chain"):
        TransitionModel.fit([[True], []])


def test_non_bool_label_is_named():
    with pytest.raises(DataError, match=r"labels\[0\]\[1\] must be a bool .* got 1 \(int\)"):
        TransitionModel.fit([[True, 1]])


def test_string_labels_are_rejected():
    with pytest.raises(DataError, match="must be a sequence of bools"):
        TransitionModel.fit(["TF"])


def test_numpy_bool_chains_are_accepted():
    model = TransitionModel.fit(np.array([[True, False], [False, False]]))
    assert model.n_cw == 1


@pytest.mark.parametrize("prior", [(0, 1), (1, -1), (1,), "ab", (float("inf"), 1)])
def test_bad_prior_is_rejected(prior):
    with pytest.raises(ValueError, match="prior must be a pair"):
        TransitionModel.fit(CHAINS, prior=prior)


def test_repr_shows_estimates_and_regime():
    assert "regime=" in repr(TransitionModel.fit(CHAINS)) and "p_cw=0.400" in repr(TransitionModel.fit(CHAINS))


def test_emission_counts_survive_save_and_load(tmp_path):
    module = refine(
        model=TransitionModel.fit([[False, False, True], [True, True, True]], answers=[[1, 1, 2], [5, 6, 6]])
    )
    module.save(tmp_path / "s.json")
    fresh = refine()
    fresh.load(tmp_path / "s.json")
    assert (fresh.model.n_ww_same, fresh.model.n_cc_changed) == (1, 1) and fresh.model == module.model
