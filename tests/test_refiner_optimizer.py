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
    CalibrationError,
    ConfigurationError,
    DataError,
    MarkovCalibrator,
    MarkovRefine,
    RefinerOptimizer,
    TransitionModel,
    theory,
)
from markovscale_dspy.calibrate.refiner_optimizer import _rung_sizes
from markovscale_dspy.core.racing import (
    RefinerCounts,
    bootstrap_weights,
    chain_counts,
    gate,
    prob_at_least,
    prob_better,
    value_draws,
)
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


@pytest.mark.slow
def test_value_draws_centre_on_the_chain_at_the_planned_rounds():
    """Many examples: the bootstrap's draws centre on the chain's accuracy at the planned rounds, at the estimates."""
    rng = np.random.default_rng(0)
    n = 5_000
    round0 = rng.random(n) < 0.6
    chains = []
    for start in round0:
        chain = [bool(start)]
        for _ in range(3):
            chain.append(rng.random() >= 0.05 if chain[-1] else rng.random() < 0.3)
        chains.append(chain)
    table = chain_counts(chains)
    value = value_draws(bootstrap_weights(n, draws=2_000, rng=rng), round0, table, max_rounds=4, round_cost=0.01)
    totals = RefinerCounts(*(int(x) for x in table.sum(axis=0)))
    p_cw, p_wc = totals.means()
    p0 = (1 + round0.sum()) / (2 + n)
    assert value.rounds == theory.optimal_rounds(p0, p_cw, p_wc, 0.01, 4) == 4
    expected = theory.accuracy_at(4, p0, p_cw, p_wc) - 0.04
    assert abs(value.mean - expected) < 4 * value.draws.std() / math.sqrt(len(value.draws)) + 1e-3


def test_refiners_planning_no_rounds_tie_and_a_tie_eliminates_neither():
    rng = np.random.default_rng(1)
    round0 = rng.random(100) < 0.6
    degrading = chain_counts([[bool(r), False, False] for r in round0])
    w = bootstrap_weights(100, rng=rng)
    a = value_draws(w, round0, degrading, max_rounds=3)
    b = value_draws(w, round0, degrading, max_rounds=3)
    assert a.rounds == b.rounds == 0 and np.array_equal(a.draws, b.draws)
    assert prob_better(a.draws, b.draws) == 0.0  # a tie is not better (the gate)...
    assert prob_at_least(a.draws, b.draws) == 1.0  # ...and not worse (elimination)


def test_draws_are_paired_through_the_examples():
    """Two refiners that differ on one example in a hundred: with shared weights their difference varies far less
    than with independent ones (what the examples share cancels out)."""
    rng = np.random.default_rng(2)
    round0 = np.array([True] * 50 + [False] * 50)
    chains = [[bool(r), bool(r), True] for r in round0]
    other = [list(c) for c in chains]
    other[99] = [False, False, False]
    w = bootstrap_weights(100, rng=rng)
    a = value_draws(w, round0, chain_counts(chains), max_rounds=2)
    b = value_draws(w, round0, chain_counts(other), max_rounds=2)
    assert a.rounds == b.rounds == 2
    unpaired = value_draws(bootstrap_weights(100, rng=rng), round0, chain_counts(other), max_rounds=2)
    assert np.std(a.draws - b.draws) < 0.5 * np.std(a.draws - unpaired.draws)
    assert prob_at_least(a.draws, b.draws) == 1.0


@pytest.mark.slow
def test_the_gate_keeps_false_picks_below_one_minus_min_prob_better_with_uneven_questions():
    """Seven identical refiners on shared round-0 answers, questions that differ in difficulty and in how refinement
    treats them (so a chain's rounds are not independent trials): the leader (the luckiest) passes the gate at most
    10% of the time; exact binomial tail over 300 repeated races."""
    rng = np.random.default_rng(3)
    n, rounds, challengers, repeats = 60, 3, 6, 300
    picks = 0
    for _ in range(repeats):
        p0 = rng.beta(1.5, 1.0, n)
        p_cw, p_wc = rng.beta(1.0, 6.0, n), rng.beta(1.5, 3.0, n)
        round0 = rng.random(n) < p0
        w = bootstrap_weights(n, draws=2_000, rng=rng)
        values = []
        for _ in range(challengers + 1):
            chains = []
            for i in range(n):
                chain = [bool(round0[i])]
                for _ in range(rounds):
                    chain.append(rng.random() >= p_cw[i] if chain[-1] else rng.random() < p_wc[i])
                chains.append(chain)
            values.append(value_draws(w, round0, chain_counts(chains), max_rounds=rounds))
        leader = max(range(1, challengers + 1), key=lambda i: values[i].mean)
        picks += prob_better(values[leader].draws, values[0].draws) >= gate(0.9, challengers)
    # Under "at most 10%", seeing this many picks or more has probability below 0.001.
    assert stats.binom.sf(picks - 1, repeats, 0.1) > 0.001, picks


def test_rung_sizes_halve_the_challengers_down_to_one():
    assert _rung_sizes(200, 7, 2, None) == [25, 50, 100, 200]
    assert _rung_sizes(200, 2, 2, None) == [200]
    assert _rung_sizes(30, 9, 3, None) == [20, 30]  # no rung below 20 examples
    assert _rung_sizes(200, 7, 2, 60) == [60, 100, 200]
    assert _rung_sizes(80, 2, 2, None, at_least=2) == [40, 80]  # proposals need a rung to be judged on


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


@pytest.mark.slow
def test_keeps_the_default_when_no_candidate_is_better():
    """The world ignores the instructions: every candidate has the default's chain, so none may be picked."""
    w = SimulatedWorld.homogeneous(300, p0=0.6, p_cw=0.1, p_wc=0.3, seed=6)
    module, report, _ = optimize(w, n_train=200, candidates=CANDIDATES, valset=w.examples[200:])
    assert report.chosen == 0 and report.chosen_source == "default"
    # Held out, the gate's decision is checked against the best challenger on the same round-0 answers.
    held = report.held_out
    assert held["after"]["accuracy"] == held["before"]["accuracy"] and held["difference"]["diff"] == 0
    challenger = report.held_out["best challenger"]
    assert report.held_out["best challenger source"] == report.candidates[report.runner_up]["source"]
    assert challenger["difference"]["diff"] == pytest.approx(
        challenger["accuracy"] - report.held_out["before"]["accuracy"]
    )
    assert (
        module.refiner.signature.instructions
        == MarkovRefine(dspy.Predict("question -> answer")).refiner.signature.instructions
    )
    assert report.before is report.after


def deployed_value(world, instructions, rounds):
    """Accuracy the module gets under the truth when it refines every question ``rounds`` times (its plan)."""
    return float(np.mean([theory.accuracy_at(rounds, *world.chain_for(q, instructions)) for q in world.questions]))


@pytest.mark.slow
def test_never_picks_a_refiner_the_truth_says_is_worse_on_random_worlds():
    """Eight worlds drawn at random -- two kinds of question, difficulty spread within each, random effects of every
    phrase -- : at the rounds each module plans, the pick is never worse than the default under the truth by more
    than 1 point, and every pick passed the gate."""
    rng = random.Random(7)
    picked = 0
    for k in range(8):
        effects = {
            phrase: {"p_cw": rng.uniform(0.2, 2.0), "p_wc": rng.uniform(0.6, 1.4)}
            for phrase in ("be bold", "slow down", "double-check", "from scratch", "be brief")
        }
        kinds = [
            (
                w,
                {
                    "p0": rng.uniform(0.2, 0.8),
                    "p_cw": rng.uniform(0.05, 0.3),
                    "p_wc": rng.uniform(0.05, 0.4),
                    "p0_concentration": 4.0,
                },
            )
            for w in (0.6, 0.4)
        ]
        w = SimulatedWorld.mixture(150, kinds, seed=k, refiner_effects=effects)
        _, report, student = optimize(w, n_train=150, candidates=CANDIDATES, rounds=2)
        task = student.signature
        truth = [
            deployed_value(w, refinement_signature(task, c["instructions"]).instructions, c["planned_rounds"])
            for c in report.candidates
        ]
        assert truth[report.chosen] >= truth[0] - 0.01, (k, report.chosen, truth)
        if report.chosen:
            picked += 1
            assert report.candidates[report.chosen]["prob_beats_default"] >= report.gate
    assert picked >= 1  # the worlds give the race something to find


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
    reflect = w.lm(name="reflect")
    _, report, _ = optimize(w, n_train=80, rounds=2, reflection_lm=reflect, proposals=2)
    proposed = [c for c in report.candidates if c["source"] == "proposed"]
    assert proposed and report.calls["proposals"] >= 1
    # Written from the first rung's transitions (with the questions and answers), judged on the other examples.
    prompt = str(reflect.history[0]["messages"])
    assert "Simulated question #" in prompt and ("broke a correct answer" in prompt or "fixed it" in prompt)
    assert report.chosen_source == "proposed" and proposed[0]["examples"] == 80 - report.rungs[0]
    assert report.calls["total"] == w.calls


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
        (["calibrate", "--optimize-refiner", "--proposals", "2"], "--proposals needs --reflection-model"),
        (["calibrate", "--proposals", "2"], "--proposals apply to --optimize-refiner"),
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


@pytest.mark.slow
def test_a_refiner_whose_rounds_fail_leaves_the_race_and_is_never_chosen():
    effects = {"be brief": {"garbage": 1.0, "p_cw": 0.0}, "double-check": {"p_cw": 0.3}}
    w = SimulatedWorld.homogeneous(120, p0=0.6, p_cw=0.2, p_wc=0.3, seed=13, refiner_effects=effects)
    _, report, _ = optimize(w, n_train=120, candidates=CANDIDATES, verify_first=False)
    brief = next(c for c in report.candidates if c["instructions"] == "Be brief.")
    assert brief["refinements_failed"] and brief["eliminated_at"] == 0 and brief["transitions"]["n_cc"] == 0
    assert "Double-check" in report.candidates[report.chosen]["instructions"]


def test_when_no_refinement_succeeds_the_error_says_so():
    w = SimulatedWorld.homogeneous(40, p0=0.6, p_cw=0.2, p_wc=0.3, seed=14)
    student = MarkovRefine(dspy.Predict("question -> answer"), max_rounds=2, refiner_lm=w.lm(faults={"server": 1.0}))
    optimizer = RefinerOptimizer(w.metric, num_threads=2, store_traces=False)
    with dspy.context(lm=w.lm()), pytest.raises(CalibrationError, match="no refinement round of the race succeeded"):
        optimizer.compile(student, trainset=w.examples)


def test_a_bad_valset_is_refused_before_any_call():
    w = SimulatedWorld.homogeneous(20, p0=0.6, p_cw=0.2, p_wc=0.3, seed=15)
    optimizer = RefinerOptimizer(w.metric, store_traces=False)
    unlabelled = [dspy.Example(question="q").with_inputs("question")]
    with dspy.context(lm=w.lm()), pytest.raises(DataError, match="valset"):
        optimizer.compile(MarkovRefine(dspy.Predict("question -> answer")), trainset=w.examples, valset=unlabelled)
    assert w.calls == 0


@pytest.mark.slow
def test_a_chain_of_thought_program_gets_a_reasoning_refiner_with_the_winning_instructions():
    effects = {"verify first": {"p_cw": 0.1}}
    w = SimulatedWorld.homogeneous(100, p0=0.6, p_cw=0.3, p_wc=0.3, seed=16, refiner_effects=effects)
    optimizer = RefinerOptimizer(w.metric, rounds=2, num_threads=2, store_traces=False)
    with dspy.context(lm=w.lm()):
        module = optimizer.compile(
            MarkovRefine(dspy.ChainOfThought("question -> answer"), max_rounds=2), trainset=w.examples
        )
    assert optimizer.report.chosen_source == "verify_first"
    assert isinstance(module.refiner, dspy.ChainOfThought)
    assert module.refiner.predict.signature.instructions.startswith(VERIFY_FIRST)
    assert "reasoning" in module.refiner.predict.signature.output_fields


def test_held_out_rounds_are_the_rounds_the_module_would_run_after_its_confidence_gate():
    from markovscale_dspy.calibrate.refiner_report import deployed_rounds

    module = MarkovRefine(dspy.Predict("question -> answer"), max_rounds=3, min_prob_improves=0.99)
    module.model = TransitionModel.fit([[False, True, True], [True, True, False], [False, False, True]] * 3)
    planned = module.planned_rounds()
    assert planned >= 1 and module.model.prob_improves() < 0.99
    assert deployed_rounds(module) == 0
    module.min_prob_improves = None
    assert deployed_rounds(module) == planned


# The user's mistakes -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_refiner_lm_with_a_rejected_key_stops_the_race_at_once():
    from helpers import StatusServer

    from markovscale_dspy import build_lm

    w = SimulatedWorld.homogeneous(100, p0=0.6, p_cw=0.2, p_wc=0.3, seed=17)
    with StatusServer(401) as server:
        refiner = build_lm("openai/refiner", api_base=server.api_base, api_key="wrong", num_retries=2, cache=False)
        student = MarkovRefine(dspy.Predict("question -> answer"), max_rounds=2, refiner_lm=refiner)
        optimizer = RefinerOptimizer(w.metric, candidates=CANDIDATES, num_threads=2, store_traces=False)
        with dspy.context(lm=w.lm()), pytest.raises(ConfigurationError) as raised:
            optimizer.compile(student, trainset=w.examples)
    message = str(raised.value)
    assert "API key" in message and server.api_base not in message
    assert server.hits <= 6, server.hits  # the calls in flight when the first 401 came back, not 7 x 25 chains


def test_a_program_that_always_raises_stops_before_any_refinement():
    class Broken(dspy.Module):
        def __init__(self):
            super().__init__()
            self.predict = dspy.Predict("question -> answer")

        def forward(self, question):
            raise KeyError("the user's bug")

    w = SimulatedWorld.homogeneous(40, p0=0.6, p_cw=0.2, p_wc=0.3, seed=18)
    optimizer = RefinerOptimizer(w.metric, num_threads=1, store_traces=False, max_errors=5)
    with dspy.context(lm=w.lm()), pytest.raises(CalibrationError, match="KeyError"):
        optimizer.compile(MarkovRefine(Broken()), trainset=w.examples)
    assert w.calls == 0


def test_a_metric_with_the_wrong_signature_is_refused_at_construction():
    with pytest.raises(ConfigurationError, match="metric"):
        RefinerOptimizer(lambda prediction: True)
