"""The simulated world (markovscale_dspy.testing): its answers follow the hidden chain it claims, it replays
deterministically, mixtures are stratified, and injected faults happen at their rates.

The other test files trust the world's truth; these tests check it against binomial bounds on its raw answers.
"""

import math
import random

import dspy
import pytest

from markovscale_dspy import ConfigurationError
from markovscale_dspy.testing import FAULT_KINDS, SimulatedWorld

N = 4000


def within_three_se(count, n, p):
    return abs(count - n * p) <= 3 * math.sqrt(n * p * (1 - p)) + 1e-9


def test_round_zero_is_correct_with_probability_p0():
    w = SimulatedWorld.homogeneous(N, p0=0.3, p_cw=0.1, p_wc=0.2, seed=1)
    rng = random.Random(0)
    correct = sum(w.respond({"question": q.question}, rng) == q.answer for q in w.questions)
    assert within_three_se(correct, N, 0.3)


def test_refinements_move_by_the_hidden_chain():
    params = {"p0": 0.5, "p_cw": 0.2, "p_wc": 0.35, "p_same_wrong": 0.6, "p_change_correct": 0.25}
    w = SimulatedWorld.homogeneous(N, seed=2, **params)
    rng = random.Random(1)
    broken = reworded = fixed = same_wrong = stayed_wrong = 0
    for q in w.questions:
        after_correct = w.respond({"question": q.question, "previous_answer": q.answer}, rng)
        broken += after_correct not in (q.answer, f"{q.answer}.0")
        reworded += after_correct == f"{q.answer}.0"
        wrong = str(int(q.answer) + 3)
        after_wrong = w.respond({"question": q.question, "previous_answer": wrong}, rng)
        fixed += after_wrong == q.answer
        if after_wrong != q.answer:
            stayed_wrong += 1
            same_wrong += after_wrong == wrong
    assert within_three_se(broken, N, params["p_cw"])
    assert within_three_se(reworded, N, (1 - params["p_cw"]) * params["p_change_correct"])
    assert within_three_se(fixed, N, params["p_wc"])
    assert within_three_se(same_wrong, stayed_wrong, params["p_same_wrong"])


def test_fresh_world_replays_the_same_answers_and_another_seed_does_not():
    def answers(w):
        with dspy.context(lm=w.lm()):
            program = dspy.Predict("question -> answer")
            return [program(**e.inputs()).answer for e in w.examples]

    w = SimulatedWorld.homogeneous(30, p0=0.5, p_cw=0.1, p_wc=0.3, seed=3)
    first = answers(w)
    assert answers(w.fresh()) == first and w.calls == 30
    other = SimulatedWorld.homogeneous(30, p0=0.5, p_cw=0.1, p_wc=0.3, seed=4)
    assert answers(other) != first


def test_mixture_gives_each_component_its_share_of_the_questions():
    a = {"p0": 0.9, "p_cw": 0.0, "p_wc": 0.0, "kind": "a"}
    b = {"p0": 0.1, "p_cw": 0.5, "p_wc": 0.5, "kind": "b"}
    w = SimulatedWorld.mixture(10, [(0.65, a), (0.35, b)], seed=5)
    assert w.summary()["kinds"] == {"a": 7, "b": 3}  # 6.5 / 3.5: the tie of remainders goes to the first
    assert all((q.p0, q.p_cw) == ((0.9, 0.0) if q.kind == "a" else (0.1, 0.5)) for q in w.questions)
    assert w.truth(w.examples[4]) is w.questions[4]


def test_faults_happen_at_their_rates():
    w = SimulatedWorld.homogeneous(600, p0=0.5, p_cw=0.1, p_wc=0.3, seed=6)
    lm = w.lm(faults={"timeout": 0.2, "garbage": 0.1})
    program = dspy.Predict("question -> answer")
    failures = 0
    with dspy.context(lm=lm):
        for example in w.examples:
            try:
                program(**example.inputs())
            except Exception:
                failures += 1
    engine = w.last_fault_engine
    calls, counts = engine.calls, engine.fault_counts  # per LM call (an adapter may retry a garbled answer)
    assert within_three_se(counts["timeout"], calls, 0.2) and within_three_se(counts["garbage"], calls, 0.1)
    assert all(counts[kind] == 0 for kind in FAULT_KINDS if kind not in ("timeout", "garbage"))
    assert 0 < failures <= counts["timeout"] + counts["garbage"]
    assert w.calls == 0  # an LM with faults has its own engine; the world's fault-free one was never called


@pytest.mark.parametrize(
    "faults,message",
    [
        ({"meteor": 0.1}, r"unknown fault kind\(s\) \['meteor'\]"),
        ({"timeout": 1.5}, "fault rate for 'timeout' must be in \\[0, 1\\], got 1.5"),
        (dict.fromkeys(FAULT_KINDS, 0.2), "fault rates add up to more than 1"),
    ],
)
def test_bad_fault_rates_are_named(faults, message):
    w = SimulatedWorld.homogeneous(3, p0=0.5, p_cw=0.1, p_wc=0.3)
    with pytest.raises(ConfigurationError, match=message):
        w.lm(faults=faults)


def test_a_question_of_another_world_is_refused():
    w = SimulatedWorld.homogeneous(3, p0=0.5, p_cw=0.1, p_wc=0.3)
    with pytest.raises(ConfigurationError, match="not a question of this world"):
        w.truth("Simulated question #99: what is the hidden number?")
