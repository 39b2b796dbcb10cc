"""RefinerOptimizer: racing refinement instructions on shared round-0 answers, checked against simulated worlds whose
refinement chain depends on the refiner's instructions (so the best candidate is known), and the race's maths
(posterior worth, the gate) checked against the truth and against exact binomial tails.
"""

import math
import random

import dspy
import numpy as np
import pytest
from scipy import stats

from markovscale_dspy import (
    VERIFY_FIRST,
    ConfigurationError,
    MarkovCalibrator,
    MarkovRefine,
    RefinerOptimizer,
    theory,
)
from markovscale_dspy.calibrate.refiner_optimizer import _rung_sizes
from markovscale_dspy.core.racing import RefinerCounts, gate, prob_best, prob_better, shared_p0_draws, value_draws
from markovscale_dspy.refine.signatures import refinement_signature
from markovscale_dspy.testing import SimulatedWorld

# Six user candidates; the phrases the world reacts to are inside them. "Double-check" is the best by the truth.
EFFECTS = {
    "be bold": {"p_cw": 2.0, "p_wc": 1.2},
    "slow down": {"p_wc": 1.3},
    "double-check": {"p_cw": 0.3, "p_wc": 1.1},
    "from scratch": {"p_cw": 1.5},
    "be brief": {"p_wc": 0.7},
}
CANDIDATES = [
    "Be bold: rewrite the answer if anything could be better.",
    "Slow down and reason step by step before answering.",
    "Double-check each step of the previous attempt; keep it if it holds.",
    "Solve the task from scratch, ignoring the previous attempt.",
    "Be brief.",
    "Answer again.",
]


def true_value(world, instructions, rounds, round_cost=0.0):
    """Expected accuracy of the closed-form plan under the truth, for a refiner with these instructions."""
    q = world.questions[0]
    p0, p_cw, p_wc = world.chain_for(q, instructions)
    t = theory.optimal_rounds(p0, p_cw, p_wc, round_cost, rounds)
    return theory.accuracy_at(t, p0, p_cw, p_wc) - round_cost * t


def optimize(world, *, n_train, valset=None, **kwargs):
    kwargs.setdefault("rounds", 3)
    kwargs.setdefault("num_threads", 2)
    kwargs.setdefault("store_traces", False)
    optimizer = RefinerOptimizer(world.metric, **kwargs)
    student = MarkovRefine(dspy.Predict("question -> answer"), max_rounds=kwargs["rounds"])
    with dspy.context(lm=world.lm()):
        module = optimizer.compile(student, trainset=world.examples[:n_train], valset=valset)
    return module, optimizer.report, student


# The maths of the race ----------------------------------------------------------------------------------------------


def test_value_draws_centre_on_the_chain_at_the_planned_rounds():
    rng = np.random.default_rng(0)
    counts = RefinerCounts(n_cc=40_000, n_cw=2_000, n_wc=9_000, n_ww=21_000)  # p_cw ~ 0.048, p_wc ~ 0.30
    p0 = shared_p0_draws(30_000, 50_000, draws=20_000, rng=rng)
    value = value_draws(p0, counts, max_rounds=4, round_cost=0.01, rng=rng)
    p_cw, p_wc = counts.means()
    assert value.rounds == theory.optimal_rounds(0.6, p_cw, p_wc, 0.01, 4)
    expected = theory.accuracy_at(value.rounds, 0.6, p_cw, p_wc) - 0.01 * value.rounds
    assert abs(value.mean - expected) < 4 * value.draws.std() / math.sqrt(len(value.draws)) + 1e-4


def test_a_refiner_planning_no_rounds_is_worth_round_zero_and_never_better_than_its_twin():
    rng = np.random.default_rng(1)
    p0 = shared_p0_draws(60, 100, rng=rng)
    degrading = RefinerCounts(n_cc=50, n_cw=50, n_wc=5, n_ww=95)
    a = value_draws(p0, degrading, max_rounds=3, rng=rng)
    b = value_draws(p0, degrading, max_rounds=3, rng=rng)
    assert a.rounds == 0 and np.array_equal(a.draws, p0)
    assert prob_better(a.draws, b.draws) == 0.0  # a tie is not better
    assert prob_best([a.draws, b.draws]).sum() == pytest.approx(1.0)


def test_the_gate_keeps_false_picks_below_one_minus_min_prob_better():
    """Seven identical refiners on shared round-0 answers: the leader (the luckiest) must pass the gate at most
    10% of the time; exact binomial tail over 300 repeated races."""
    rng = np.random.default_rng(2)
    p0_true, p_cw, p_wc, n, rounds, challengers = 0.6, 0.2, 0.3, 60, 3, 6
    picks = 0
    repeats = 300
    for _ in range(repeats):
        round0 = rng.random(n) < p0_true
        p0 = shared_p0_draws(int(round0.sum()), n, draws=4_000, rng=rng)
        values = []
        for _ in range(challengers + 1):
            counts = RefinerCounts()
            for start in round0:
                chain = [bool(start)]
                for _ in range(rounds):
                    chain.append(rng.random() >= p_cw if chain[-1] else rng.random() < p_wc)
                counts = counts + RefinerCounts.of_chain(chain)
            values.append(value_draws(p0, counts, max_rounds=rounds, rng=rng))
        leader = max(range(1, challengers + 1), key=lambda i: values[i].mean)
        picks += prob_better(values[leader].draws, values[0].draws) >= gate(0.9, challengers)
    # Under "at most 10%", seeing this many picks or more has probability below 0.001.
    assert stats.binom.sf(picks - 1, repeats, 0.1) > 0.001, picks


def test_rung_sizes_halve_the_challengers_down_to_one():
    assert _rung_sizes(200, 7, 2, None) == [25, 50, 100, 200]
    assert _rung_sizes(200, 2, 2, None) == [200]
    assert _rung_sizes(30, 9, 3, None) == [20, 30]  # no rung below 20 examples
    assert _rung_sizes(200, 7, 2, 60) == [60, 100, 200]


# The simulated world the optimizer is checked against ---------------------------------------------------------------


def test_world_maps_instruction_text_to_chain_parameters():
    w = SimulatedWorld.homogeneous(4, p0=0.5, p_cw=0.2, p_wc=0.3, refiner_effects=EFFECTS)
    q = w.questions[0]
    assert w.chain_for(q, "Double-Check each step") == pytest.approx((0.5, 0.06, 0.33))
    assert w.chain_for(q, "Be bold, be brief") == pytest.approx((0.5, 0.4, 0.3 * 1.2 * 0.7))
    assert w.chain_for(q, "anything else") == (0.5, 0.2, 0.3)
    assert w.engine.fingerprint != SimulatedWorld.homogeneous(4, p0=0.5, p_cw=0.2, p_wc=0.3).engine.fingerprint
    assert w.fresh().refiner_effects == w.refiner_effects


@pytest.mark.parametrize(
    "effects, named",
    [
        ("verify", "refiner_effects must be a dict"),
        ({"": {"p_cw": 1}}, "phrases"),
        ({"x": {"p0": 1}}, "'x'"),
        ({"x": {"p_cw": -1}}, "factor >= 0"),
    ],
)
def test_world_rejects_bad_refiner_effects(effects, named):
    with pytest.raises(ConfigurationError, match=named):
        SimulatedWorld.homogeneous(2, p0=0.5, p_cw=0.2, p_wc=0.3, refiner_effects=effects)


def test_continue_chain_refines_the_given_round_zero_and_pays_only_for_refinements():
    w = SimulatedWorld.homogeneous(3, p0=0.5, p_cw=0.2, p_wc=0.3, seed=4)
    module = MarkovRefine(dspy.Predict("question -> answer"), max_rounds=3)
    with dspy.context(lm=w.lm()):
        pred = module.continue_chain(dspy.Prediction(answer="17"), 3, **w.examples[0].inputs())
    trajectory = pred.markovscale.trajectory
    assert trajectory[0]["outputs"] == {"answer": "17"} and len(trajectory) == 4
    assert w.calls == 3 and pred.markovscale.calls == 3
    with pytest.raises(ConfigurationError, match="first must be"):
        module.continue_chain({"answer": "17"}, 1, **w.examples[0].inputs())


# The optimizer ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_finds_the_best_of_seven_candidates_with_fewer_calls_than_evaluating_all():
    w = SimulatedWorld.homogeneous(600, p0=0.6, p_cw=0.2, p_wc=0.3, seed=5, refiner_effects=EFFECTS)
    module, report, student = optimize(w, n_train=240, candidates=CANDIDATES, verify_first=False)
    task = student.signature
    truth = [true_value(w, refinement_signature(task, c["instructions"]).instructions, 3) for c in report.candidates]
    assert len(report.candidates) == 7
    assert report.chosen == int(np.argmax(truth)) and "Double-check" in report.candidates[report.chosen]["instructions"]
    # Calls are measured (the world counts them): the race paid for fewer than every candidate on every example.
    assert report.calls["total"] == w.calls
    assert report.calls["total"] < 0.7 * report.calls["every_candidate_everywhere"]
    assert report.candidates[report.chosen]["prob_beats_default"] >= report.gate == pytest.approx(gate(0.9, 6))
    # The returned module refines with the winner, and its calibration is the winner's chain.
    assert "Double-check" in module.refiner.signature.instructions
    assert module.model.p_cw < 0.12 and module.model.n0_total == 240
    assert student.model is None  # the student is untouched
    # Held out (360 questions): its accuracy matches what its calibration predicts, within the interval.
    calls = w.calls
    with dspy.context(lm=w.lm()):
        labels = [w.metric(e, module(**e.inputs())) for e in w.examples[240:]]
    rounds = module.planned_rounds()
    assert w.calls - calls == len(labels) * (1 + rounds)
    lo, hi = stats.binomtest(sum(labels), len(labels)).proportion_ci(0.95)
    assert lo <= module.model.expected_accuracy(rounds) <= hi


def test_keeps_the_default_when_no_candidate_is_better():
    """The world ignores the instructions: every candidate has the default's chain, so none may be picked."""
    w = SimulatedWorld.homogeneous(200, p0=0.6, p_cw=0.1, p_wc=0.3, seed=6)
    module, report, _ = optimize(w, n_train=200, candidates=CANDIDATES)
    assert report.chosen == 0 and report.chosen_source == "default"
    assert (
        module.refiner.signature.instructions
        == MarkovRefine(dspy.Predict("question -> answer")).refiner.signature.instructions
    )
    assert report.before is report.after


@pytest.mark.slow
def test_never_picks_a_refiner_the_truth_says_is_worse_on_random_worlds():
    """Eight worlds drawn at random (chains and the effect of every phrase): the pick is never worse than the
    default under the truth by more than 1 point, and every pick passed the gate."""
    rng = random.Random(7)
    for k in range(8):
        effects = {
            phrase: {"p_cw": rng.uniform(0.2, 2.0), "p_wc": rng.uniform(0.6, 1.4)}
            for phrase in ("be bold", "slow down", "double-check", "from scratch", "be brief")
        }
        w = SimulatedWorld.homogeneous(
            120,
            p0=rng.uniform(0.3, 0.8),
            p_cw=rng.uniform(0.05, 0.3),
            p_wc=rng.uniform(0.1, 0.4),
            seed=k,
            refiner_effects=effects,
        )
        _, report, student = optimize(w, n_train=120, candidates=CANDIDATES, rounds=2)
        task = student.signature
        truth = [
            true_value(w, refinement_signature(task, c["instructions"]).instructions, 2) for c in report.candidates
        ]
        assert truth[report.chosen] >= truth[0] - 0.01, (k, report.chosen, truth)
        if report.chosen:
            assert report.candidates[report.chosen]["prob_beats_default"] >= report.gate


@pytest.mark.slow
def test_resumes_from_the_trace_store_without_calls(tmp_path):
    w = SimulatedWorld.homogeneous(120, p0=0.6, p_cw=0.2, p_wc=0.3, seed=8, refiner_effects=EFFECTS)
    _, first, _ = optimize(w, n_train=120, candidates=CANDIDATES, store_traces=True, trace_dir=tmp_path)
    calls = w.calls
    again = w.fresh()
    _, second, _ = optimize(again, n_train=120, candidates=CANDIDATES, store_traces=True, trace_dir=tmp_path)
    assert again.calls == 0 and second.calls["total"] == 0 and calls == first.calls["total"]
    assert second.chosen == first.chosen
    assert [c["transitions"] for c in second.candidates] == [c["transitions"] for c in first.candidates]


def test_a_reflection_lm_proposes_candidates_through_gepa_and_they_race():
    """The reflection LM is GEPA's InstructionProposer on a simulated LM; the world rewards what it writes."""
    w = SimulatedWorld.homogeneous(
        80, p0=0.6, p_cw=0.2, p_wc=0.3, seed=9, refiner_effects={"simulated reasoning": {"p_cw": 0.2}}
    )
    _, report, _ = optimize(w, n_train=80, rounds=2, reflection_lm=w.lm(name="reflect"), proposals=2)
    proposed = [c for c in report.candidates if c["source"] == "proposed"]
    assert proposed and report.calls["proposals"] >= 1
    assert report.chosen_source == "proposed" and proposed[0]["examples"] == 80
    assert report.calls["total"] == w.calls


def test_the_report_and_valset_compare_before_and_after_on_the_same_round_zero():
    w = SimulatedWorld.homogeneous(
        300, p0=0.6, p_cw=0.25, p_wc=0.3, seed=10, refiner_effects={"verify first": {"p_cw": 0.1}}
    )
    _, report, _ = optimize(w, n_train=150, valset=w.examples[150:])
    assert report.chosen_source == "verify_first" and report.candidates[1]["instructions"] == VERIFY_FIRST
    held = report.held_out
    assert held["examples"] == 150 and held["before"]["rounds"] == 0 and held["after"]["rounds"] == 3
    # Same round 0 on both sides: the only questions that differ are those the refinements changed.
    assert held["difference"]["diff"] == pytest.approx(held["after"]["accuracy"] - held["before"]["accuracy"])
    assert held["difference"]["lo"] > 0
    row = report.candidates[report.chosen]
    assert row["regime"] == "improving" and row["bound"] == pytest.approx(
        row["p_wc"]["mean"] / (row["p_wc"]["mean"] + row["p_cw"]["mean"])
    )
    assert report.before.regime == "degrading" and report.after.regime == "improving"
    assert report.to_dict()["after"]["regime"] == "improving"


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"candidates": "Check it."}, "candidates must be a list"),
        ({"candidates": ["ok", ""]}, r"candidates\[1\]"),
        ({"proposals": 2}, "needs a reflection_lm"),
        ({"min_prob_better": 0.3}, "min_prob_better"),
        ({"eta": 1}, "eta"),
        ({"reflection_lm": "gpt-4o"}, "reflection_lm must be a dspy LM"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, named):
    with pytest.raises(ConfigurationError, match=named):
        RefinerOptimizer(lambda e, p, trace=None: True, **kwargs)


def test_a_student_that_is_not_a_markov_refine_is_refused():
    with pytest.raises(ConfigurationError, match="MarkovRefine"):
        RefinerOptimizer(lambda e, p, trace=None: True).compile(dspy.Predict("question -> answer"), trainset=[])


def test_the_default_candidate_keeps_a_calibration_equal_to_markov_calibrator_on_the_same_chains(tmp_path):
    """With the default kept, the returned module's model counts the same kinds of transitions a calibration does."""
    w = SimulatedWorld.homogeneous(60, p0=0.5, p_cw=0.1, p_wc=0.3, seed=11)
    module, report, _ = optimize(w, n_train=60, verify_first=False, rounds=2)
    assert report.chosen == 0 and len(report.candidates) == 1
    assert module.model.n0_total == 60 and module.model.n_transitions == 120
    plain = MarkovCalibrator(w.metric, rounds=2, num_threads=1, store_traces=False)
    with dspy.context(lm=w.fresh().lm()):
        calibrated = plain.compile(MarkovRefine(dspy.Predict("question -> answer"), max_rounds=2), trainset=w.examples)
    assert calibrated.model.n_transitions == module.model.n_transitions


# What the user reads -------------------------------------------------------------------------------------------------


def test_the_race_is_rendered_as_words_a_table_and_a_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from markovscale_dspy.reporting.plots import refiner_figure
    from markovscale_dspy.reporting.text import refiner_markdown, refiner_words

    effects = {"verify first": {"p_cw": 0.1}}
    w = SimulatedWorld.homogeneous(160, p0=0.6, p_cw=0.35, p_wc=0.3, seed=12, refiner_effects=effects)
    _, report, _ = optimize(w, n_train=100, valset=w.examples[100:], candidates=CANDIDATES[:2])
    words = refiner_words(report)
    assert "Chose the verify_first refiner" in words and f"{report.calls['total']} LM calls" in words
    assert "Chain before: degrading" in words and "after: improving" in words and "Held out (60 questions" in words
    markdown = refiner_markdown(report, figure="race.png")
    assert markdown.count("\n| ") == 1 + len(report.candidates) and "**chosen** verify_first" in markdown
    path = refiner_figure(report, tmp_path / "race.png")
    assert path.exists() and path.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["calibrate", "--candidates", "c.txt"], "--candidates apply to --optimize-refiner"),
        (["calibrate", "--optimize-refiner", "--max-dollars", "1"], "does not take --max-dollars"),
        (["calibrate", "--optimize-refiner", "--candidates", "/no/such/file.txt"], "--candidates /no/such/file.txt"),
        (["calibrate", "--optimize-refiner", "--proposals", "0"], "--proposals must be"),
    ],
)
def test_cli_race_options_are_checked_before_anything_runs(argv, message, capsys, monkeypatch):
    import markovscale_dspy.cli as cli

    monkeypatch.setattr(cli, "load_task", lambda name: pytest.fail("load_task ran"))
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_reads_candidates_one_per_line(tmp_path):
    from markovscale_dspy.cli import _read_candidates

    path = tmp_path / "c.txt"
    path.write_text("# mine\nKeep it unless wrong.\n\n  Redo it.  \n")
    assert _read_candidates(str(path)) == ["Keep it unless wrong.", "Redo it."]
    path.write_text("# only a comment\n")
    with pytest.raises(ConfigurationError, match="holds no instructions"):
        _read_candidates(str(path))
