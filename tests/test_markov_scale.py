"""MarkovScale: the planner module (calibration, plan, execution, accounting, saving) and, on simulated worlds with
at least 1,000 test questions, whether it picks what pays."""

import json
import math
import warnings
from functools import cache

import dspy
import pytest

from markovscale_dspy import (
    MarkovCalibrator,
    MarkovRefine,
    MarkovScale,
    NotCalibratedError,
    Plan,
    RoundZeroError,
    StateError,
    TransitionModel,
    VoteModel,
)
from markovscale_dspy._exceptions import ConfigurationError
from markovscale_dspy.core.planner import candidates, plan
from markovscale_dspy.evaluate.compare import (
    compare_methods,
    grid_rounds,
    strategy_results,
)
from markovscale_dspy.evaluate.evaluation import evaluate
from markovscale_dspy.testing import SimulatedWorld

HURTS = {"p0": 0.7, "p_cw": 0.3, "p_wc": 0.1, "p0_concentration": 4, "n_distractors": 3}


def predict():
    return dspy.Predict("question -> answer")


@cache
def small():
    """A small world where refinement hurts and votes help, calibrated once for the fast tests."""
    world = SimulatedWorld.mixture(150, [(1.0, HURTS)], seed=3)
    calibrator = MarkovCalibrator(world.metric, parallel_samples=4, num_threads=1, question_types=1)
    with dspy.context(lm=world.lm()):
        scale = calibrator.compile(MarkovScale(predict(), max_calls=3, concurrency=1), trainset=world.examples)
    return world, scale, calibrator


# Construction and planning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_calls": 0}, r"max_calls must be an integer in \[1, 16\], got 0"),
        ({"max_calls": 17}, r"max_calls must be an integer in \[1, 16\], got 17"),
        ({"call_cost": 1.0}, r"call_cost must be a number in \[0, 1\)"),
        ({"min_prob_gain": 1.5}, r"min_prob_gain must be a number in \[0, 1\]"),
        ({"strategies": ("vote", "bogus")}, "strategies must be a non-empty subset"),
        ({"concurrency": 0}, "concurrency must be a positive integer or None"),
        ({"adaptive": "yes"}, "adaptive must be True or False"),
        ({"temperature": 0}, "temperature must be a number > 0"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        MarkovScale(predict(), **kwargs)


def test_candidates_cover_the_budget():
    names = [s.name for s in candidates(4)]
    assert names == [
        "single",
        "refine T=1",
        "refine T=2",
        "refine T=3",
        "vote n=2",
        "refine_vote n=2 T=1",
        "vote n=3",
        "vote n=4",
    ]
    assert all(s.calls <= 4 for s in candidates(4))


def test_plan_needs_a_calibration_and_uncalibrated_modules_answer_in_one_call():
    world = SimulatedWorld.mixture(3, [(1.0, HURTS)], seed=0)
    scale = MarkovScale(predict())
    with pytest.raises(NotCalibratedError, match="parallel_samples"):
        scale.plan()
    with dspy.context(lm=world.lm()), pytest.warns(UserWarning, match="not calibrated"):
        pred = scale(**world.examples[0].inputs())
    assert pred.markovscale.plan == "single" and pred.markovscale.reason == "uncalibrated"
    assert pred.markovscale.calls == 1 and pred.plan == "single"


@pytest.mark.slow  # a statistical run with samples
def test_calibration_fits_a_vote_model_and_the_plan_votes_where_refinement_hurts():
    _, scale, calibrator = small()
    model = scale.model
    assert isinstance(model.votes, VoteModel) and model.regime() == "degrading"
    chosen = scale.plan()
    assert isinstance(chosen, Plan) and chosen.kind == "vote" and chosen.calls == 3 and chosen.reason == "best"
    assert chosen.best_of("refine").accuracy < chosen.prediction(1, 0).accuracy  # refinement is predicted to hurt
    assert "plurality vote over 3 independent samples" in chosen.describe()
    report = calibrator.report
    assert report.plan["chosen"]["kind"] == "vote"
    assert [row["n"] for row in report.votes["curve"]] == [1, 2, 3, 4]
    assert report.usage["calls"] == 150 * (3 + 4)  # chains of round 0 + 2 rounds, and 4 samples, per question


def test_the_plan_is_cached_on_the_immutable_model():
    _, scale, _ = small()
    assert scale.plan() is scale.plan()


def test_confidence_gate_holds_back_a_gain_the_calibration_cannot_support():
    # Twelve chains: refinement looks better at the estimates, but twelve questions cannot tell.
    chain = TransitionModel(n0_correct=5, n0_total=12, n_cc=5, n_cw=2, n_wc=4, n_ww=6)
    gated = plan(chain, max_calls=3, min_prob_gain=0.9)
    free = plan(chain, max_calls=3, min_prob_gain=0.0)
    assert free.kind == "refine" and free.best.prob_gain < 0.9
    assert free.best.prob_gain == pytest.approx(chain.prob_improves(), abs=0.05)  # the same question, asked twice
    assert gated.kind == "single" and gated.reason == "uncertain" and gated.best == free.best
    assert "not sure enough" in gated.describe()


@pytest.mark.slow  # a statistical run over many questions
def test_call_cost_trades_accuracy_for_calls():
    _, scale, _ = small()
    cheap = MarkovScale(predict(), max_calls=3, call_cost=0.2)
    cheap.model = scale.model
    assert cheap.plan().kind == "single"


def test_without_parallel_samples_only_single_and_refine_are_planned():
    world = SimulatedWorld.mixture(60, [(1.0, {"p0": 0.4, "p_cw": 0.1, "p_wc": 0.3})], seed=1)
    calibrator = MarkovCalibrator(world.metric, parallel_samples=0, num_threads=1)
    with dspy.context(lm=world.lm()), pytest.warns(UserWarning, match="without samples"):
        scale = calibrator.compile(MarkovScale(predict(), max_calls=3), trainset=world.examples)
    chosen = scale.plan()
    assert {p.strategy.kind for p in chosen.predictions} == {"single", "refine"}
    assert chosen.kind == "refine" and "parallel_samples" in chosen.describe()


def test_parallel_samples_must_be_zero_or_at_least_two():
    with pytest.raises(ConfigurationError, match="parallel_samples=1 cannot tell"):
        MarkovCalibrator(lambda e, p: True, parallel_samples=1)


def test_a_markov_refine_calibrated_with_samples_carries_votes_and_ignores_them():
    world = SimulatedWorld.mixture(40, [(1.0, HURTS)], seed=2)
    calibrator = MarkovCalibrator(world.metric, parallel_samples=3, num_threads=1)
    with dspy.context(lm=world.lm()):
        refine = calibrator.compile(MarkovRefine(predict(), max_rounds=2), trainset=world.examples)
        pred = refine(**world.examples[0].inputs())
    assert refine.model.votes is not None and pred.markovscale.rounds == 0  # degrading: no refinement


# Running ---------------------------------------------------------------------------------------------------------


def fixed(scale):
    """The same calibrated module running every planned chain (adaptive=False)."""
    copy = scale.deepcopy()
    copy.adaptive = False
    return copy


def test_forward_runs_the_plan_and_accounts_for_every_call():
    world, scale, _ = small()
    fresh = world.fresh()
    with dspy.context(lm=fresh.lm()), dspy.track_usage() as tracker:
        pred = fixed(scale)(**world.examples[0].inputs())
    account = pred.markovscale
    assert account.plan == "vote" and account.samples == 3 and account.rounds == 0 and account.reason == "best"
    assert account.calls == 3 == fresh.calls and sum(n for _, n in account.votes) == 3
    assert account.stop_reason == "fixed"
    assert account.predicted["strategy"] == "vote n=3" and 0 < account.predicted["accuracy"] < 1
    assert pred.plan == "vote" and pred.answer == account.trajectory[-1]["outputs"]["answer"]
    assert sum(len(entries) for entries in tracker.usage_data.values()) == 3


def test_threads_report_their_calls_to_the_callers_tracker():
    world, scale, _ = small()
    threaded = MarkovScale(predict(), max_calls=3, concurrency=3)
    threaded.model = scale.model
    with dspy.context(lm=world.fresh().lm()), dspy.track_usage() as tracker:
        pred = threaded.run_strategy(3, 1, **world.examples[1].inputs())
    assert pred.markovscale.plan == "refine_vote" and pred.markovscale.calls == 6
    assert sum(len(entries) for entries in tracker.usage_data.values()) == 6


def test_evaluate_counts_the_planners_calls():
    world, scale, _ = small()
    fresh = world.fresh()
    with dspy.context(lm=fresh.lm()):
        result = evaluate(scale, world.examples[:10], world.metric, name="scale", num_threads=2)
    assert result.calls == fresh.calls <= 30  # adaptive: at most the plan's three calls a question


async def test_async_forward_matches_the_sync_account():
    world, scale, _ = small()
    fixed_scale = fixed(scale)
    with dspy.context(lm=world.fresh().lm()):
        pred = await fixed_scale.acall(**world.examples[2].inputs())
        hybrid = await fixed_scale.arun_strategy(2, 1, **world.examples[2].inputs())
    assert pred.markovscale.plan == "vote" and pred.markovscale.calls == 3
    assert hybrid.markovscale.plan == "refine_vote" and hybrid.markovscale.calls == 4
    for example in world.examples[:8]:  # adaptive: the same chains, answer and calls as the sync run
        with dspy.context(lm=world.fresh().lm()):
            live = await scale.acall(**example.inputs())
        with dspy.context(lm=world.fresh().lm()):
            sync = scale(**example.inputs())
        assert (live.answer, live.markovscale.calls, live.markovscale.stop_reason) == (
            sync.answer,
            sync.markovscale.calls,
            sync.markovscale.stop_reason,
        )


def test_single_and_refine_start_from_a_fresh_sample():
    world, scale, _ = small()
    with dspy.context(lm=world.fresh().lm()):
        single = scale.run_strategy(1, 0, **world.examples[0].inputs())
        refine = scale.run_strategy(1, 2, **world.examples[0].inputs())
    assert single.markovscale.plan == "single" and single.markovscale.calls == 1
    assert refine.markovscale.plan == "refine" and refine.markovscale.calls == 3
    assert refine.markovscale.chains[0].rounds == 2


def test_every_sample_and_every_chains_refinement_is_a_fresh_draw_even_through_the_cache():
    """With DSPy's cache on, samples and refinements of different chains must not replay each other: 4 chains of
    1 round are 8 distinct requests; the same call again is all cache hits; another seed draws anew."""
    world, scale, _ = small()
    scale = fixed(scale)
    fresh = world.fresh()
    lm = fresh.lm(cache=True)
    with dspy.context(lm=lm):
        first = scale.run_strategy(4, 1, **world.examples[5].inputs())
        assert fresh.calls == 8
        again = scale.run_strategy(4, 1, **world.examples[5].inputs())
        assert fresh.calls == 8 and again.answer == first.answer
        reseeded = MarkovScale(predict(), max_calls=3, rollout_seed=1, adaptive=False)
        reseeded.model = scale.model
        reseeded.run_strategy(4, 1, **world.examples[5].inputs())
        assert fresh.calls == 16
    # the refinements (called with the LM itself; samples go through copies of it): one namespace per chain
    refinements = [entry["kwargs"].get("rollout_id") for entry in lm.history[:4]]
    assert len(set(refinements)) == 4


def test_an_outer_attempt_gets_fresh_samples():
    """Inside dspy.BestOfN each attempt's LM carries its own rollout id; the planner's samples compose with it."""
    world, scale, _ = small()
    fresh = world.fresh()
    with dspy.context(lm=fresh.lm(cache=True)):
        best = dspy.BestOfN(scale, N=2, reward_fn=lambda args, pred: 0.0, threshold=1.0)
        best(**world.examples[6].inputs())
    assert fresh.calls == 6  # two attempts x three samples, none replayed


def test_pinned_lms_are_sampled_too():
    world, scale, _ = small()
    fresh = world.fresh()
    program = predict()
    program.set_lm(fresh.lm(cache=True))
    pinned = MarkovScale(program, max_calls=3, adaptive=False)
    pinned.model = scale.model
    pred = pinned(**world.examples[7].inputs())  # no dspy.settings.lm at all
    assert pred.markovscale.calls == 3 == fresh.calls


def test_failed_samples_do_not_vote_and_all_failing_raises():
    world, scale, _ = small()
    with dspy.context(lm=world.fresh().lm(faults={"timeout": 1.0})):
        with pytest.raises(RoundZeroError, match="every one of the 3 samples failed"):
            scale(**world.examples[0].inputs())
    with dspy.context(lm=world.fresh().lm(faults={"garbage": 0.5})):
        preds = [scale(**e.inputs()) for e in world.examples[:20]]
    failed = sum(p.markovscale.failed_samples for p in preds)
    assert 0 < failed < 60
    for p in preds:
        assert sum(n for _, n in p.markovscale.votes) == p.markovscale.samples - p.markovscale.failed_samples
        assert p.markovscale.samples == 3 or p.markovscale.stop_reason == "settled"


def test_the_plan_field_never_overwrites_a_program_output():
    class WithPlan(dspy.Signature):
        """Answer and plan."""

        question: str = dspy.InputField()
        answer: str = dspy.OutputField()
        plan: str = dspy.OutputField()

    world, scale, _ = small()
    module = MarkovScale(dspy.Predict(WithPlan), max_calls=3, signature=WithPlan)
    module.model = scale.model
    with dspy.context(lm=world.fresh().lm()):
        pred = module(**world.examples[0].inputs())
    assert pred.markovscale.plan == "vote" and pred.plan != "vote"


# Saving ----------------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip_the_chain_and_the_votes(tmp_path):
    _, scale, _ = small()
    path = tmp_path / "scale.json"
    scale.save(path)
    restored = MarkovScale(predict(), max_calls=3).load(path)
    assert restored.model == scale.model and restored.model.votes == scale.model.votes
    assert restored.plan().chosen.strategy == scale.plan().chosen.strategy
    state = json.loads(path.read_text())
    assert state["refine.markov"]["model"]["votes"]["format"] == "markovscale.vote_model/1"


def test_loading_the_wrong_state_is_a_state_error(tmp_path):
    refine = MarkovRefine(predict())
    refine.save(tmp_path / "refine.json")
    with pytest.raises(StateError, match="no MarkovScale state"):
        MarkovScale(predict()).load(tmp_path / "refine.json")
    with pytest.raises(StateError, match="JSON state only"):
        MarkovScale(predict()).load(tmp_path / "x.pkl")


def test_calibration_samples_resume_from_the_trace_store(tmp_path):
    world = SimulatedWorld.mixture(30, [(1.0, HURTS)], seed=4)
    kwargs = {"num_threads": 1, "trace_dir": tmp_path, "question_types": 1}
    first = world.fresh()
    with dspy.context(lm=first.lm()):
        a = MarkovCalibrator(world.metric, parallel_samples=3, **kwargs).compile(
            MarkovScale(predict(), max_calls=3), trainset=world.examples
        )
    assert first.calls == 30 * (3 + 3)
    second = world.fresh()
    with dspy.context(lm=second.lm()):
        b = MarkovCalibrator(world.metric, parallel_samples=3, **kwargs).compile(
            MarkovScale(predict(), max_calls=3), trainset=world.examples
        )
        more = MarkovCalibrator(world.metric, parallel_samples=4, **kwargs).compile(
            MarkovScale(predict(), max_calls=3), trainset=world.examples
        )
    assert b.model == a.model
    assert second.calls == 30  # only the fourth sample of each question was new
    assert more.model.votes.questions[0][0] == 4


# Reporting -------------------------------------------------------------------------------------------------------


def test_strategy_results_measure_every_candidate_with_its_calls():
    world, scale, _ = small()
    assert grid_rounds(8) == [7, 3, 1, 1, 0, 0, 0, 0]
    with dspy.context(lm=world.fresh().lm()):
        results = strategy_results(scale, world.examples[:20], world.metric, num_threads=1)
    assert [r.name for r in results] == [p.name for p in scale.plan().predictions]
    for result, prediction in zip(results, scale.plan().predictions, strict=True):
        assert result.n == 20 and result.mean_calls == prediction.strategy.calls


def test_strategy_figure_marks_the_plan(tmp_path):
    pytest.importorskip("matplotlib")
    from markovscale_dspy.reporting.plots import strategy_figure

    world, scale, _ = small()
    with dspy.context(lm=world.fresh().lm()):
        observed = strategy_results(scale, world.examples[:10], world.metric, num_threads=1)
    path = strategy_figure(scale.plan(), tmp_path / "plan.png", observed=observed)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert strategy_figure(scale.plan().to_dict(), tmp_path / "plan2.png").exists()


def test_compare_methods_adds_the_planner_and_its_strategies():
    w = SimulatedWorld.mixture(55, [(1.0, HURTS)], seed=5)
    with dspy.context(lm=w.lm()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = compare_methods(
            predict, w.examples[:40], w.examples[40:], w.metric, num_threads=1, include_baselines=False, max_calls=3
        )
    assert result.plan is not None and result.model.votes is not None
    assert any(r.name.startswith("MarkovScale (") for r in result.results)
    assert len(result.strategies) == len(result.plan.predictions)


# On simulated worlds with 1,000 test questions -------------------------------------------------------------------


@cache
def _planner_run(preset, max_calls, baselines):
    from benchmarks.harness import run_planner

    with dspy.context(warn_on_type_mismatch=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_planner(preset, n_train=600, n_test=1000, max_calls=max_calls, baselines_at=baselines)


def _by_name(result, prefix):
    return next(r for r in result.results if r.name.startswith(prefix))


@pytest.mark.slow
def test_where_refinement_hurts_the_planner_votes_and_matches_the_best_parallel_baseline():
    """The `hurts` world of BENCHMARKS.md (refinement breaks 30% of correct answers): with three calls, the planner
    votes, and lands within 2 points of the best of self-consistency and dspy.BestOfN at (at most) equal calls; its
    adaptive vote stops early on the questions whose answer is settled."""
    result = _planner_run("hurts", 3, (3,))
    assert result.plan.kind == "vote"
    planner = _by_name(result, "MarkovScale")
    baselines = [_by_name(result, "self-consistency"), _by_name(result, "dspy.BestOfN")]
    assert all(b.mean_calls <= 3 for b in baselines) and planner.mean_calls < 3
    assert planner.accuracy >= max(b.accuracy for b in baselines) - 0.02
    assert planner.accuracy > _by_name(result, "MarkovRefine").accuracy  # which answers in one call here


def _paired_difference_bound(a, b, z=1.96):
    """|a - b| allowed for two methods on the same questions: z standard errors of the paired difference."""
    discordant = sum(x != y for x, y in zip(a.labels, b.labels, strict=True))
    return z * math.sqrt(discordant) / a.n


@pytest.mark.slow
def test_where_refinement_helps_the_planner_refines_and_matches_markov_refine():
    result = _planner_run("realistic-helps", 8, (8,))
    assert result.plan.kind == "refine"
    planner, refine = _by_name(result, "MarkovScale"), _by_name(result, "MarkovRefine")
    assert planner.mean_calls == refine.mean_calls == 8
    assert abs(planner.accuracy - refine.accuracy) <= _paired_difference_bound(planner, refine)
    assert planner.accuracy > _by_name(result, "self-consistency").accuracy


@pytest.mark.slow
def test_where_both_help_the_best_strategy_is_chosen_and_lands_in_its_predicted_interval():
    result = _planner_run("realistic-both", 8, (8,))
    chosen = result.plan.chosen
    pure = max((result.plan.best_of(kind) for kind in ("refine", "vote")), key=lambda p: p.objective)
    assert chosen.strategy.kind == "refine_vote" or chosen.strategy == pure.strategy
    planner = _by_name(result, "MarkovScale")
    lo, hi = chosen.predictive_interval(planner.n)
    assert lo <= planner.accuracy <= hi
    # On the same questions (the strategy grid), the chosen strategy is not significantly worse than the best pure one.
    observed = {r.name: r for r in result.strategies}
    mine, theirs = observed[chosen.name], observed[pure.name]
    assert mine.accuracy - theirs.accuracy >= -_paired_difference_bound(mine, theirs)


@pytest.mark.slow
def test_markovscale_bench_reports_the_plan_with_predicted_and_observed_accuracy(tmp_path, monkeypatch):
    """`markovscale bench` on a simulated task (the LM and the task are swapped in): the planner's row, the plan
    table with observed accuracy per strategy, and the figure."""
    import contextlib

    from markovscale_dspy import cli
    from markovscale_dspy.integrations.datasets import Task

    world = SimulatedWorld.mixture(90, [(1.0, HURTS)], seed=8)

    class Sig(dspy.Signature):
        """Answer the question."""

        question: str = dspy.InputField()
        answer: str = dspy.OutputField()

    task = Task("winogrande", "simulated", Sig, world.examples, world.metric, "SimulatedWorld")
    monkeypatch.setattr(cli, "load_task", lambda name: task)

    @contextlib.contextmanager
    def simulated_lm(args):
        yield world.lm(), "simulated/world"

    monkeypatch.setattr(cli, "_lm_from_args", simulated_lm)
    out = tmp_path / "bench"
    argv = ["bench", "--train", "60", "--test", "30", "--rounds", "2", "--no-baselines", "--threads", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main([*argv, "--adapter", "chat", "--out", str(out)]) == 0
    text = (out / "bench.md").read_text()
    assert "MarkovScale (" in text and "## The plan" in text and "**(chosen)**" in text and "observed 95% CI" in text
    assert (out / "plan.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out / "bench.json").read_text())
    assert data["plan"]["max_calls"] == 3 and len(data["strategies"]) == len(data["plan"]["predictions"])


def test_the_calibration_report_shows_the_vote_model_and_the_plan(tmp_path):
    pytest.importorskip("matplotlib")
    from markovscale_dspy.reporting.plots import strategy_figure
    from markovscale_dspy.reporting.text import calibration_markdown, format_calibration, observed_in_calibration

    *_, calibrator = small()
    report = calibrator.report
    observed = observed_in_calibration(report)
    assert set(observed) >= {"single", "refine T=1", "vote n=2", "vote n=3"}
    png = strategy_figure(report.plan, tmp_path / "plan.png", observed=observed)
    text = calibration_markdown(report, plan_figure=png.name)
    assert "## Voting over independent samples" in text and "## The plan" in text and "plan.png" in text
    assert "Chosen: vote n=3" in format_calibration(report)
