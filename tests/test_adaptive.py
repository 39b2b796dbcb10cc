"""MarkovScale decides per question, as answers arrive: a vote stops once the calibrated vote model says one more
chain is not worth its calls. Checked through DSPy on simulated worlds: replay equals the live run, at no call cost
the answer is exactly the full vote's, the account says why it stopped, and on random worlds it is never worse than
a fixed vote at the same calls."""

import math
import random
import warnings

import dspy
import pytest

from markovscale_dspy import ConfigurationError, MarkovCalibrator, MarkovScale
from markovscale_dspy.core.voting import plurality_winner
from markovscale_dspy.testing import SimulatedWorld


def predict():
    return dspy.Predict("question -> answer")


def calibrated(params, *, max_calls=8, call_cost=0.0, n=120, seed=0, strategies=("single", "vote")):
    """A MarkovScale calibrated on ``n`` questions of a one-kind world, and a held-out world of the same kind."""
    world = SimulatedWorld.mixture(n + 120, [(1.0, params)], seed=seed)
    calibrator = MarkovCalibrator(world.metric, rounds=1, parallel_samples=8, num_threads=1, question_types=1)
    student = MarkovScale(predict(), max_calls=max_calls, call_cost=call_cost, strategies=strategies, concurrency=1)
    with dspy.context(lm=world.lm()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scale = calibrator.compile(student, trainset=world.examples[:n])
    return scale, world, world.examples[n:]


VOTES_HELP = {"p0": 0.65, "p_cw": 0.3, "p_wc": 0.1, "p0_concentration": 3, "n_distractors": 3}


@pytest.fixture(scope="module")
def votes_help():
    return calibrated(VOTES_HELP)


def record(scale, world, examples):
    """Every chain the module may use on each question (a fixed run of its strategy), on a fresh copy of the world."""
    strategy = scale.strategy()
    with dspy.context(lm=world.fresh().lm()):
        return [scale.run_strategy(strategy.samples, strategy.rounds, **e.inputs()) for e in examples]


def test_replay_equals_the_live_run_at_concurrency_one(votes_help):
    scale, world, test = votes_help
    assert scale.plan().kind == "vote" and scale.plan().chosen.strategy.samples == 8
    recorded = record(scale, world, test[:40])
    for example, fixed_run in zip(test[:40], recorded, strict=True):
        with dspy.context(lm=world.fresh().lm()):
            live = scale(**example.inputs())  # concurrency=1
        replayed = scale.replay(fixed_run, **example.inputs())
        assert (replayed.answer, replayed.markovscale.calls, replayed.markovscale.stop_reason) == (
            live.answer,
            live.markovscale.calls,
            live.markovscale.stop_reason,
        )


def test_at_no_call_cost_the_answer_is_exactly_the_full_votes_with_fewer_calls(votes_help):
    scale, world, test = votes_help
    recorded = record(scale, world, test)
    replayed = [scale.replay(r, **e.inputs()) for r, e in zip(recorded, test, strict=True)]
    assert [p.answer for p in replayed] == [r.answer for r in recorded]
    calls = [p.markovscale.calls for p in replayed]
    mean = sum(calls) / len(calls)
    se = math.sqrt(sum((c - mean) ** 2 for c in calls) / (len(calls) - 1) / len(calls))
    assert max(calls) <= 8 and mean < 8 - 4 * se  # fewer than the full vote's 8, beyond 4 standard errors
    reasons = {p.markovscale.stop_reason for p in replayed}
    assert reasons <= {"settled", "max_calls"} and "settled" in reasons


def test_the_account_says_why_each_question_stopped(votes_help):
    scale, world, test = votes_help
    with dspy.context(lm=world.fresh().lm()):
        pred = scale(**test[0].inputs())
    account = pred.markovscale
    assert account.stop_info["budget"] == 8 and account.samples == account.calls <= 8
    assert account.stop_reason in ("settled", "max_calls")
    assert 0 < account.stop_info["posterior"] <= 1
    assert sum(n for _, n in account.votes) == account.samples - account.failed_samples


def test_a_call_cost_stops_earlier_and_says_so(votes_help):
    scale, world, test = votes_help
    cheap = scale.deepcopy()
    cheap.call_cost = 0.02
    recorded = record(scale, world, test)
    free = [scale.replay(r, **e.inputs()).markovscale for r, e in zip(recorded, test, strict=True)]
    costly = [cheap.replay(r, **e.inputs()).markovscale for r, e in zip(recorded, test, strict=True)]
    assert sum(a.calls for a in costly) < sum(a.calls for a in free)
    assert any(a.stop_reason == "not_worth_a_call" for a in costly)


def test_concurrency_launches_only_chains_the_rule_needs(votes_help):
    """With four chains in flight the run makes the calls the sequential rule makes (no chain it would not need),
    in fewer waves."""
    scale, world, test = votes_help
    wide = scale.deepcopy()
    wide.concurrency = 4
    for example in test[:30]:
        with dspy.context(lm=world.fresh().lm()):
            pred = wide(**example.inputs())
        account = pred.markovscale
        replay_of_own_chains = scale.replay(pred, **example.inputs())  # the sequential rule on the same chains
        assert account.calls == replay_of_own_chains.markovscale.calls
        assert account.stop_reason == replay_of_own_chains.markovscale.stop_reason


def test_replay_refuses_what_it_cannot_read(votes_help):
    scale, world, test = votes_help
    with pytest.raises(ConfigurationError, match="needs a MarkovScale prediction"):
        scale.replay(dspy.Prediction(answer="1"), **test[0].inputs())
    short = scale.deepcopy()
    short.adaptive = False
    short.max_calls = 3
    short.strategies = ("vote",)
    with dspy.context(lm=world.fresh().lm()):
        three = short(**test[0].inputs())
    with pytest.raises(ConfigurationError, match="recorded run holds 3"):
        fixed = scale.deepcopy()
        fixed.adaptive = False
        fixed.replay(three, **test[0].inputs())


# Random worlds: never worse than a fixed vote at the same calls --------------------------------------------------


def random_world_params(rng):
    mean = rng.uniform(0.5, 0.8)
    return {
        "p0": mean,
        "p_cw": 0.3,
        "p_wc": 0.1,
        "p0_concentration": rng.uniform(3.0, 8.0),
        "n_distractors": rng.randint(2, 4),
        "distractor_concentration": rng.uniform(0.3, 1.0),
    }


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_on_random_worlds_adaptive_is_never_a_point_below_fixed_voting_at_its_calls(seed):
    """Calibrated through DSPy on 200 questions, run on 400 held-out ones read off the same recorded chains: the
    adaptive vote's accuracy against a fixed vote at the same mean calls (linear between the two neighbouring
    sizes), one point allowed, plus three standard errors of the paired difference."""
    rng = random.Random(seed)
    scale, _, _ = calibrated(random_world_params(rng), call_cost=0.005, n=200, seed=100 + seed)
    held = SimulatedWorld.mixture(400, [(1.0, random_world_params(random.Random(seed)))], seed=200 + seed)
    if scale.plan().kind != "vote":
        pytest.skip(f"the planner chose {scale.plan().kind} on this world")
    budget = scale.strategy().samples
    recorded = record(scale, held, held.examples)
    adaptive = [scale.replay(r, **e.inputs()) for r, e in zip(recorded, held.examples, strict=True)]
    correct = [held.metric(e, p) for e, p in zip(held.examples, adaptive, strict=True)]
    mean_calls = sum(p.markovscale.calls for p in adaptive) / len(adaptive)

    def fixed_correct(n):
        out = []
        for example, run in zip(held.examples, recorded, strict=True):
            keys = [c.trajectory[-1]["answer_key"] if c is not None else None for c in run.markovscale.chains[:n]]
            chain = run.markovscale.chains[plurality_winner(keys)]
            out.append(held.metric(example, dspy.Prediction(**chain.trajectory[-1]["outputs"])))
        return out

    lo, hi = math.floor(mean_calls), min(math.ceil(mean_calls), budget)
    weight = mean_calls - lo
    base = [(1 - weight) * a + weight * b for a, b in zip(fixed_correct(max(lo, 1)), fixed_correct(hi), strict=True)]
    diffs = [a - b for a, b in zip(correct, base, strict=True)]
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    assert mean > -0.01 - 3 * se, (mean, se, mean_calls)


# Against a latency-bound server in its own process ----------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_waves_keep_the_sequential_rules_calls_and_speculation_cancels_at_the_server():
    import asyncio

    from benchmarks.concurrency import calibrated_model, module, question
    from benchmarks.latency_server import LatencyServerProcess

    model = calibrated_model()
    with LatencyServerProcess(delay=0.3) as server:
        lm = dspy.LM("openai/latency", api_base=server.api_base, api_key="local", cache=False, num_retries=0)
        sequential, wide = module(model, 0.0, 1), module(model, 0.0, 4)
        with dspy.context(lm=lm):
            server.reset()
            preds = [wide(**question(i)) for i in range(6)]
            stats = server.stats()
            assert stats["completed"] == sum(p.markovscale.calls for p in preds) and stats["ended_early"] == 0
            for i, pred in enumerate(preds):
                replay = sequential.replay(pred, **question(i))  # the one-at-a-time rule on the same chains
                assert (replay.answer, replay.markovscale.calls) == (pred.answer, pred.markovscale.calls)

            speculative = module(model, 0.0, 4)
            speculative.speculate = True
            server.reset()
            runs = [asyncio.run(speculative.acall(**question(i))) for i in range(6)]
            stats = server.stats()
            launched = sum(p.markovscale.calls + p.markovscale.cancelled for p in runs)
            # Every paid call was answered by the server; a cancelled chain ended early at the server, never reached
            # it, or (a race under load: the server had just sent its answer) was answered but not read -- a provider
            # bills that one too, so the server's count lies between the paid calls and all launched ones.
            paid = sum(p.markovscale.calls for p in runs)
            assert paid <= stats["completed"] <= launched
            assert stats["completed"] + stats["ended_early"] <= launched
            for i, pred in enumerate(runs):
                voting = sum(u["calls"] for u in pred.markovscale.usage)
                assert sequential.replay(pred, **question(i)).markovscale.calls == voting
            with pytest.warns(UserWarning, match="speculates only in aforward"):
                speculative(**question(0))
