"""A hard dollar cap: checked before every LM call, never exceeded, and what finished is kept."""

import math

import dspy
import pytest

from markovscale_dspy import ConfigurationError, MarkovCalibrator, MarkovRefine, MarkovScale, register_price
from markovscale_dspy.reporting.text import format_calibration
from markovscale_dspy.spending import DollarCap, SpendingStopped, dollar_cap, metered, worst_case_price
from markovscale_dspy.testing import SimulatedWorld

PRICE = (2e-6, 8e-6)  # dollars per prompt token, per completion token
MAX_TOKENS = 64


def priced_world(n=120, seed=0, name="capped"):
    w = SimulatedWorld.homogeneous(n, seed=seed, p0=0.4, p_cw=0.1, p_wc=0.3)
    register_price(f"simulated/{name}", *PRICE)
    return w, w.lm(name=name, price=PRICE, max_tokens=MAX_TOKENS)


def calibrate(w, lm, **kwargs):
    calibrator = MarkovCalibrator(w.metric, rounds=2, num_threads=4, **kwargs)
    with dspy.context(lm=lm):
        program = calibrator.compile(
            MarkovRefine(dspy.Predict("question -> answer"), max_rounds=2), trainset=w.examples
        )
    return calibrator, program


def test_the_cap_is_never_exceeded_and_the_finished_chains_are_fitted_stored_and_reused():
    w, lm = priced_world()
    cap = 0.04
    with pytest.warns(UserWarning, match=r"stopped at max_dollars=0.04: \d+ of 120 chains finished"):
        calibrator, program = calibrate(w, lm, max_dollars=cap)
    report = calibrator.report
    spent = report.usage["cost"]
    assert 0 < spent <= cap  # the measured dollars: never above the cap
    assert report.dollar_cap["spent"] == pytest.approx(spent) and report.dollar_cap["refused_calls"] > 0
    assert report.dollar_cap["left"] == pytest.approx(cap - spent)
    text = format_calibration(report)
    assert f"dollar cap $0.04: ${spent:.4g} spent" in text and "calls refused before they were made" in text
    # What stopped it is a call's worst case not fitting beside the worst cases of the calls in flight (4 threads):
    # less than four worst-case calls were left (the prompts here are under 2,000 bytes).
    one_call = worst_case_price(lm, [{"role": "user", "content": "x" * 2000}], None, {})
    assert cap - spent < 4 * one_call
    finished = report.chains_used
    assert 0 < finished < 120 and program.model.n0_total == finished
    # The stored chains are not paid again: a re-run with a larger cap pays only for the rest.
    calls_before = w.calls
    with dspy.context(lm=lm):
        again = MarkovCalibrator(w.metric, rounds=2, num_threads=4, max_dollars=10.0)
        again.compile(MarkovRefine(dspy.Predict("question -> answer"), max_rounds=2), trainset=w.examples)
    assert again.report.chains_reused >= finished - 4  # chains cut mid-way (at most one per thread) are recomputed
    assert w.calls - calls_before == again.report.usage["calls"] <= (120 - again.report.chains_reused) * 3


@pytest.mark.parametrize("bad", [-1, math.nan, "5", math.inf, True])
def test_a_bad_budget_names_the_argument(bad):
    with pytest.raises(ConfigurationError, match="max_dollars"):
        MarkovCalibrator(lambda e, p, trace=None: True, max_dollars=bad)
    with pytest.raises(ConfigurationError, match="max_dollars"):
        DollarCap(bad)


def test_a_cap_that_cannot_be_checked_is_refused_before_any_call():
    w = SimulatedWorld.homogeneous(20, seed=1, p0=0.4, p_cw=0.1, p_wc=0.3)
    with pytest.raises(ConfigurationError, match=r"price is unknown.*register_price"):
        calibrate(w, w.lm(name="unpriced", max_tokens=MAX_TOKENS), max_dollars=1.0)
    register_price("simulated/unbounded", *PRICE)
    with pytest.raises(ConfigurationError, match="max_tokens"):
        calibrate(w, w.lm(name="unbounded"), max_dollars=1.0)
    assert w.calls == 0


def test_the_worst_case_bounds_what_a_call_costs():
    w, lm = priced_world(20, seed=2, name="bound")
    messages = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "What is 2 + 2?"}]
    bound = worst_case_price(lm, messages, None, {})
    text_bytes = len(b"Answer.What is 2 + 2?")
    assert bound == pytest.approx(PRICE[0] * (text_bytes + 16 * 3) + PRICE[1] * MAX_TOKENS)
    cap = DollarCap(bound * 1.5)
    assert cap.reserve(bound) and not cap.reserve(bound) and cap.exhausted
    with pytest.raises(SpendingStopped):
        worst_case_price(w.lm(name="nobody-priced-this", max_tokens=8), messages, None, {})


def test_the_cli_checks_the_cap_before_anything_loads(capsys):
    from markovscale_dspy.cli import main

    assert main(["calibrate", "--task", "winogrande", "--max-dollars", "-2"]) == 2
    assert "--max-dollars must be a number >= 0 (dollars), got -2.0" in capsys.readouterr().err


def spent_by(accounts):
    return sum((e.get("usage") or {}).get("cost") or 0.0 for a in accounts if a is not None for e in a.trajectory)


def test_a_vote_stops_at_the_cap_and_votes_with_the_chains_that_finished():
    w, lm = priced_world(40, seed=3, name="vote")
    with dspy.context(lm=lm):
        scale = MarkovCalibrator(w.metric, num_threads=2, parallel_samples=4).compile(
            MarkovScale(dspy.Predict("question -> answer"), max_calls=4, concurrency=1), trainset=w.examples
        )
        scale.max_dollars = 0.0019  # at this price: the worst case of a call is ~$0.0014, what one costs ~$0.0003
        pred = scale.run_strategy(4, 0, **w.examples[0].inputs())
    account = pred.markovscale
    assert account.stop_reason == "max_dollars"
    assert 0 < spent_by(account.chains) <= 0.0019
    assert account.stop_info["dollar_cap"]["spent"] == pytest.approx(spent_by(account.chains))
    refused = [e for e in account.errors if e is not None]
    assert refused and all(e.startswith("SpendingStopped") for e in refused)
    assert sum(n for _, n in account.votes) == 4 - len(refused)  # the chains that finished voted


def test_a_batch_under_a_dollar_cap_keeps_what_it_answered():
    w, lm = priced_world(60, seed=4, name="batch")
    with dspy.context(lm=lm):
        refine = MarkovCalibrator(w.metric, rounds=3, num_threads=2).compile(
            MarkovRefine(dspy.Predict("question -> answer"), max_rounds=3, policy="belief"), trainset=w.examples
        )
        result = refine.answer_with_budget(w.examples[:20], budget=60, max_dollars=0.01, num_threads=1)
    answered = [p for p in result.predictions if p is not None]
    assert 0 < spent_by([p.markovscale for p in answered]) <= 0.01
    reasons = {p.markovscale.stop_reason for p in answered}
    assert result.errors or "max_dollars" in reasons  # the cap, not the round budget, ended the batch
    assert result.spent < 60


class FanOut(dspy.Module):
    """A program that makes its calls in threads of its own (dspy.Parallel)."""

    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question):
        calls = [(self.predict, {"question": f"{question} (part {i})"}) for i in range(8)]
        return dspy.Parallel(num_threads=4, disable_progress_bar=True)(calls)[0]


def test_calls_a_program_makes_in_its_own_threads_are_checked_and_charged():
    w, lm = priced_world(4, seed=5, name="fanout")
    one = worst_case_price(lm, [{"role": "user", "content": "x" * 2000}], None, {})
    cap = DollarCap(2.5 * one)  # room for the worst case of two calls at a time
    before = w.calls
    with dspy.context(lm=lm), dollar_cap(cap), pytest.raises(SpendingStopped):
        with metered():
            FanOut()(question=w.examples[0].question)
    made = w.calls - before
    assert 0 < made < 8 and cap.refused > 0  # unchecked, all 8 were made (and charged nothing)
    # The calls ran in dspy.Parallel's threads, whose usage DSPy does not report back: each stays charged at its
    # worst case (at least its max_tokens of completion; what one costs here is about half that), never at zero.
    assert made * PRICE[1] * MAX_TOKENS <= cap.spent <= cap.max_dollars


def test_a_call_sent_but_never_measured_stays_charged_at_its_worst_case():
    from markovscale_dspy.spending import Held
    from markovscale_dspy.usage import Usage

    cap = DollarCap(1.0)
    held = Held((cap,))
    assert held.reserve(0.2) is None and held.reserve(0.3) is None
    held.settle(Usage(calls=1, cost=0.05))  # one call measured; the other was cancelled after it was sent
    assert cap.spent == pytest.approx(0.05 + 0.3) and cap.left == pytest.approx(1.0 - 0.35)


def test_the_worst_case_counts_every_completion_and_the_tools_sent():
    _, lm = priced_world(4, seed=6, name="many")
    messages = [{"role": "user", "content": "Hi"}]
    one = worst_case_price(lm, messages, None, {})
    assert worst_case_price(lm, messages, None, {"n": 4}) == pytest.approx(one + 3 * PRICE[1] * MAX_TOKENS)
    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    import json

    extra = len(json.dumps(tools).encode())
    assert worst_case_price(lm, messages, None, {"tools": tools}) == pytest.approx(one + PRICE[0] * extra)
    image = [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "data:" + "A" * 10**6}}]
    assert worst_case_price(lm, [{"role": "user", "content": image}], None, {}) == pytest.approx(one)


def test_an_enclosing_cap_still_applies_inside_a_looser_one():
    w, lm = priced_world(4, seed=7, name="nested")
    outer = DollarCap(0.9 * PRICE[1] * MAX_TOKENS)  # less than any call's worst case
    inner = DollarCap(1.0)
    before = w.calls
    with dspy.context(lm=lm), dollar_cap(outer), dollar_cap(inner), metered():
        with pytest.raises(SpendingStopped, match=f"max_dollars={outer.max_dollars:g} reached"):
            dspy.Predict("question -> answer")(question=w.examples[0].question)
    assert (outer.refused, inner.refused, w.calls - before) == (1, 0, 0)
    assert inner.left == pytest.approx(1.0)  # the refused call holds nothing in the cap it fitted in


async def test_a_speculating_vote_stops_at_the_cap_too():
    w, lm = priced_world(40, seed=8, name="speculate")
    with dspy.context(lm=lm):
        scale = MarkovCalibrator(w.metric, num_threads=2, parallel_samples=4).compile(
            MarkovScale(dspy.Predict("question -> answer"), max_calls=8, concurrency=4, speculate=True),
            trainset=w.examples,
        )
        scale.max_dollars = 0.0025  # one or two calls' worst case: the vote cannot run its course
        before = w.calls
        pred = await scale.acall(**w.examples[1].inputs())
    account = pred.markovscale
    assert account.plan in ("vote", "refine_vote") and scale.speculate  # the speculative path ran
    assert account.stop_reason == "max_dollars"
    assert account.stop_info["dollar_cap"]["spent"] <= 0.0025
    assert w.calls - before <= account.samples + len(account.unused)  # nothing answered beyond what is accounted
