"""Paired verdicts: methods read off the same chains, compared question by question."""

import math

import dspy
import pytest
from scipy import stats

from markovscale_dspy import ConfigurationError, MarkovCalibrator, MarkovRefine
from markovscale_dspy.core.statistics import paired_difference
from markovscale_dspy.evaluate.compare import fixed_curve, replayed
from markovscale_dspy.evaluate.evaluation import MethodResult, evaluate
from markovscale_dspy.reporting.text import paired_words
from markovscale_dspy.testing import SimulatedWorld

KINDS = [
    (0.4, {"p0": 0.3, "p_cw": 0.05, "p_wc": 0.5, "p_same_wrong": 0.2}),
    (0.3, {"p0": 0.8, "p_cw": 0.0, "p_wc": 0.0, "p_same_wrong": 1.0}),
    (0.3, {"p0": 0.6, "p_cw": 0.4, "p_wc": 0.05, "p_same_wrong": 0.8}),
]


def program():
    return dspy.Predict("question -> answer")


@pytest.fixture(scope="module")
def model():
    w = SimulatedWorld.mixture(300, KINDS, seed=40)
    with dspy.context(lm=w.lm()):
        return (
            MarkovCalibrator(w.metric, num_threads=1)
            .compile(MarkovRefine(program(), max_rounds=4), trainset=w.examples)
            .model
        )


def test_mcnemar_p_value_and_difference_match_a_direct_count():
    a = [True, True, False, True, False, False, True, True, False, True] * 7
    b = [True, False, False, False, True, False, True, False, False, True] * 7
    d = paired_difference(a, b)
    a_only = sum(x and not y for x, y in zip(a, b, strict=True))
    b_only = sum(y and not x for x, y in zip(a, b, strict=True))
    k, n = min(a_only, b_only), a_only + b_only
    exact = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    assert (d.a_only, d.b_only) == (a_only, b_only) and d.diff == pytest.approx((sum(a) - sum(b)) / len(a))
    assert d.p_value == pytest.approx(exact)
    assert d.lo < d.diff < d.hi


def test_pairing_is_tighter_than_independent_samples_when_methods_agree():
    a = [True] * 45 + [False] * 55
    b = [True] * 40 + [False] * 60  # b is a subset of a: 5 discordant questions
    d = paired_difference(a, b)
    independent_half = stats.norm.ppf(0.975) * math.sqrt(0.45 * 0.55 / 100 + 0.4 * 0.6 / 100)
    assert d.hi - d.lo < independent_half  # the paired interval is less than half the independent one's width


@pytest.mark.parametrize(("policy", "select"), [("closed_form", "last"), ("belief", "last"), ("belief", "best")])
def test_a_policy_read_off_a_recorded_chain_is_what_it_answers_live(model, policy, select):
    w = SimulatedWorld.mixture(120, KINDS, seed=41)
    module = MarkovRefine(program(), max_rounds=4, policy=policy, select=select, min_prob_improves=0.0)
    module.model = model
    live_world, recorded_world = w.fresh(), w.fresh()
    with dspy.context(lm=live_world.lm()):
        live = [module(**e.inputs()) for e in w.examples]
    with dspy.context(lm=recorded_world.lm()):
        chains = [MarkovRefine(program(), max_rounds=4, policy="fixed")(**e.inputs()) for e in w.examples]
    replays = [module.replay(c, **e.inputs()) for c, e in zip(chains, w.examples, strict=True)]
    assert [p.answer for p in replays] == [p.answer for p in live]
    assert [p.markovscale.rounds for p in replays] == [p.markovscale.rounds for p in live]
    assert sum(p.markovscale.calls for p in replays) == live_world.calls  # the same calls, paid once
    assert any(p.markovscale.rounds not in (0, 4) for p in live) or policy == "closed_form"


def test_replay_refuses_a_chain_shorter_than_the_policy_would_go(model):
    w = SimulatedWorld.mixture(5, KINDS, seed=42)
    module = MarkovRefine(program(), max_rounds=4, policy="fixed")
    with dspy.context(lm=w.lm()):
        short = MarkovRefine(program(), max_rounds=1, policy="fixed")(**w.examples[0].inputs())
    with pytest.raises(ConfigurationError, match="recorded chain has only 1"):
        module.replay(short, **w.examples[0].inputs())


def test_policies_read_off_one_run_are_aligned_with_fixed_n(model):
    w = SimulatedWorld.mixture(200, KINDS, seed=43)
    with dspy.context(lm=w.lm()):
        run = evaluate(
            MarkovRefine(program(), max_rounds=4, policy="fixed"),
            w.examples,
            w.metric,
            name="fixed-4",
            num_threads=1,
            keep_predictions=True,
        )
    curve = fixed_curve(run, w.examples, w.metric, 4)
    belief = MarkovRefine(program(), max_rounds=4, policy="belief")
    belief.model = model
    result = replayed(belief, run, w.examples, w.metric, "belief")
    assert curve[-1].labels == run.labels and curve[-1].calls == run.calls
    assert len(result.labels) == len(curve[0].labels) == 200
    assert curve[0].calls <= result.calls <= curve[-1].calls


def labels_result(name, labels):
    return MethodResult(name, len(labels), sum(labels), 0, 0, 0, 0.0, 0, 0, labels=list(labels))


def test_wording_follows_the_paired_statistics():
    base = labels_result("none", [False] * 100)
    better = labels_result("refine", [True] * 20 + [False] * 80)
    same = labels_result("refine", [True] * 3 + [False] * 97)
    assert "better than none" in paired_words(better, base)
    assert "no difference detectable" in paired_words(same, base)
    assert "worse than refine" in paired_words(base, better)


@pytest.mark.llm
def test_demo_verdict_rests_on_paired_differences(tmp_path, capsys):
    from markovscale_dspy.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--train", "12", "--test", "8", "--rounds", "1", "--threads", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Held-out check (paired, same questions)" in printed and "McNemar p" in printed
    report = (out / "report.md").read_text()
    assert "same questions" in report and "McNemar p" in report
