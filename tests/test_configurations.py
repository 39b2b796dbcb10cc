"""compare_configurations, directly: dollars from the prices the test set, the recommendation as the argmax of the
stated criterion, states that load, and a configuration that is no better but costs more is not recommended."""

import dspy
import pytest

from markovscale_dspy import MarkovRefine
from markovscale_dspy.evaluate.configurations import Configuration, compare_configurations
from markovscale_dspy.testing import SimulatedWorld

CHEAP = (1e-7, 4e-7)
PRICEY = (1e-4, 4e-4)  # 1000x: at value_per_correct=0.01 a question costs about half a correct answer


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    world = SimulatedWorld.homogeneous(120, p0=0.45, p_cw=0.1, p_wc=0.3, seed=3)
    cheap = world.lm(name="cheap", price=CHEAP)
    pricey = world.lm(name="pricey", price=PRICEY)
    out = tmp_path_factory.mktemp("configs")
    result = compare_configurations(
        lambda: dspy.Predict("question -> answer"),
        [Configuration("cheap", cheap), Configuration("cheap+pricey", cheap, pricey), Configuration("pricey", pricey)],
        world.examples[:80],
        world.metric,
        testset=world.examples[80:],
        max_rounds=2,
        value_per_correct=0.01,
        out_dir=out,
        num_threads=1,
        store_traces=False,
    )
    return result, world


def test_dollars_are_the_tokens_at_the_prices_of_the_lms_that_answered(comparison):
    result, _ = comparison
    only = result.by_name("pricey").held_out
    expected = (only.prompt_tokens * PRICEY[0] + only.completion_tokens * PRICEY[1]) / only.n
    assert only.mean_cost == pytest.approx(expected, rel=1e-9)
    cheap = result.by_name("cheap").held_out
    assert cheap.mean_cost == pytest.approx(
        (cheap.prompt_tokens * CHEAP[0] + cheap.completion_tokens * CHEAP[1]) / cheap.n, rel=1e-9
    )


def test_the_recommendation_maximises_the_stated_criterion(comparison):
    result, _ = comparison
    value = {r.name: r.held_out.accuracy - r.held_out.mean_cost / 0.01 for r in result.results}
    assert result.recommended == max(value, key=value.get)
    assert "0.01" in result.criterion


def test_the_same_chain_at_a_thousand_times_the_price_is_not_recommended(comparison):
    result, _ = comparison
    assert result.recommended != "pricey"
    assert result.by_name("pricey").dollars > 100 * result.by_name("cheap").dollars


def test_each_configuration_saves_a_state_that_loads_with_its_lm_names(comparison):
    result, _ = comparison
    for r in result.results:
        module = MarkovRefine(dspy.Predict("question -> answer"), max_rounds=2).load(r.state_path)
        assert module.model == r.report.transition_model()
        assert module.markov.calibrated_for["refiner"].endswith("pricey" if "pricey" in r.name else "cheap")


def test_bad_configurations_are_named():
    from markovscale_dspy import ConfigurationError

    with pytest.raises(ConfigurationError, match="at least one"):
        compare_configurations(lambda: dspy.Predict("q -> a"), [], [], lambda e, p: True)
    with pytest.raises(ConfigurationError, match="distinct"):
        compare_configurations(lambda: dspy.Predict("q -> a"), [Configuration("a", None)] * 2, [], lambda e, p: True)
