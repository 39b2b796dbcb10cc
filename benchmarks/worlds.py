"""The project's benchmark worlds: named presets and the parameter oracle (references, not library features).

Every preset is a ``SimulatedWorld.mixture`` of components; the tests and the benchmark harness share them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from markovscale_dspy import Decision, RoundContext, theory
from markovscale_dspy.testing import SimQuestion, SimulatedWorld

__all__ = ["PLANNER_PRESETS", "PRESETS", "ParameterOracle", "preset_world", "random_kinds", "random_world"]

#: Named worlds: (weight, per-question parameters) components. ``p_same_wrong`` is how often a wrong answer that
#: stays wrong is repeated verbatim.
PRESETS: dict[str, list[tuple[float, dict[str, Any]]]] = {
    # Refinement helps every question alike.
    "helps": [(1.0, {"p0": 0.4, "p_cw": 0.1, "p_wc": 0.3, "p_same_wrong": 0.5, "kind": "helps"})],
    # Refinement hurts every question alike.
    "hurts": [(1.0, {"p0": 0.7, "p_cw": 0.3, "p_wc": 0.1, "p_same_wrong": 0.5, "kind": "hurts"})],
    # Questions differ: some get fixed, some never move, some get broken.
    "heterogeneous": [
        (0.4, {"p0": 0.3, "p_cw": 0.05, "p_wc": 0.5, "p_same_wrong": 0.2, "kind": "fixable"}),
        (0.3, {"p0": 0.8, "p_cw": 0.0, "p_wc": 0.0, "p_same_wrong": 1.0, "kind": "stable"}),
        (0.3, {"p0": 0.6, "p_cw": 0.4, "p_wc": 0.05, "p_same_wrong": 0.8, "kind": "fragile"}),
    ],
    # p_cw + p_wc > 1: accuracy overshoots at round 1 and oscillates around the bound.
    "oscillating": [(1.0, {"p0": 0.3, "p_cw": 0.6, "p_wc": 0.8, "p_same_wrong": 0.5, "kind": "oscillating"})],
}


#: Worlds for the planner (MarkovScale): questions differ in difficulty (``p0`` drawn per question around the
#: component's mean) and wrong answers come from a few weighted distractors, so wrong votes can agree.
PLANNER_PRESETS: dict[str, list[tuple[float, dict[str, Any]]]] = {
    # Refinement hurts; votes help, less than with no structure (hard questions and agreeing wrong answers).
    "realistic-hurts": [
        (
            1.0,
            {
                "p0": 0.7,
                "p_cw": 0.3,
                "p_wc": 0.1,
                "p_same_wrong": 0.5,
                "kind": "hurts",
                "p0_concentration": 4,
                "n_distractors": 3,
                "distractor_concentration": 1.0,
            },
        ),
    ],
    # Refinement helps; votes barely do: a dominant distractor per question and many hard questions.
    "realistic-helps": [
        (
            1.0,
            {
                "p0": 0.4,
                "p_cw": 0.1,
                "p_wc": 0.3,
                "p_same_wrong": 0.5,
                "kind": "helps",
                "p0_concentration": 2,
                "n_distractors": 2,
                "distractor_concentration": 0.3,
            },
        ),
    ],
    # Both help: refinement converges fast to 75%, and a vote over refined chains goes beyond.
    "realistic-both": [
        (
            1.0,
            {
                "p0": 0.5,
                "p_cw": 0.15,
                "p_wc": 0.45,
                "p_same_wrong": 0.5,
                "kind": "both",
                "p0_concentration": 4,
                "n_distractors": 4,
                "distractor_concentration": 1.0,
            },
        ),
    ],
    # Both help, but refinement works only on the easier questions (it breaks the planner's assumption that
    # refinement rates do not depend on the question): a check of what the hybrid prediction misses.
    "realistic-mixed": [
        (
            0.5,
            {
                "p0": 0.7,
                "p_cw": 0.1,
                "p_wc": 0.6,
                "p_same_wrong": 0.5,
                "kind": "easy",
                "p0_concentration": 6,
                "n_distractors": 4,
                "distractor_concentration": 1.0,
            },
        ),
        (
            0.5,
            {
                "p0": 0.3,
                "p_cw": 0.1,
                "p_wc": 0.15,
                "p_same_wrong": 0.7,
                "kind": "hard",
                "p0_concentration": 6,
                "n_distractors": 4,
                "distractor_concentration": 0.5,
            },
        ),
    ],
}


def preset_world(name: str, n: int, *, seed: int = 0, **kwargs: Any) -> SimulatedWorld:
    """A named world from :data:`PRESETS` (``helps``, ``hurts``, ``heterogeneous``, ``oscillating``) or
    :data:`PLANNER_PRESETS` (``realistic-hurts``, ``realistic-helps``, ``realistic-both``, ``realistic-mixed``)."""
    components = PRESETS.get(name) or PLANNER_PRESETS.get(name)
    if components is None:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join([*PRESETS, *PLANNER_PRESETS])}")
    return SimulatedWorld.mixture(n, components, seed=seed, **kwargs)


# Worlds drawn at random: nothing about them is tuned, so a policy that does well here generalises ------------------


def random_kinds(seed: int) -> list[dict[str, float]]:
    """The kinds of questions of a world drawn at random (2-4 kinds).

    Each kind has a weight (Dirichlet(2)), a mean chain -- ``p0 ~ U(0.05, 0.95)``, ``p_cw ~ U(0, 0.5)``,
    ``p_wc ~ U(0, 0.6)`` -- a mean answer stickiness ``p_same_wrong ~ U(0, 1)``, and a concentration ``U(5, 60)``
    that says how much its questions differ from one another (see :func:`random_world`).
    """
    rng = np.random.default_rng([seed, 7717])
    count = int(rng.integers(2, 5))
    weights = rng.dirichlet(np.full(count, 2.0))
    return [
        {
            "weight": float(weights[k]),
            "p0": float(rng.uniform(0.05, 0.95)),
            "p_cw": float(rng.uniform(0.0, 0.5)),
            "p_wc": float(rng.uniform(0.0, 0.6)),
            "p_same_wrong": float(rng.uniform(0.0, 1.0)),
            "concentration": float(rng.uniform(5.0, 60.0)),
        }
        for k in range(count)
    ]


def random_world(
    kinds: list[dict[str, float]], n: int, *, seed: int, confidence_auroc: float | None = None
) -> SimulatedWorld:
    """``n`` questions of the given kinds: each question draws a kind by weight, then its *own* chain and stickiness
    from Beta laws centred on the kind's means (``Beta(mean * c, (1 - mean) * c)``, ``c`` the concentration), so no
    two questions share parameters and no model with finitely many types fits the world exactly."""
    rng = np.random.default_rng([seed, 4242])
    names = random.Random(f"random-world|{seed}")
    weights = np.array([k["weight"] for k in kinds])
    questions = []
    for i, index in enumerate(rng.choice(len(kinds), size=n, p=weights / weights.sum())):
        kind = kinds[index]

        def draw(mean: float, kind: dict[str, float] = kind) -> float:
            if mean <= 0.0:
                return 0.0
            mean = min(max(mean, 1e-3), 1 - 1e-3)
            return float(rng.beta(mean * kind["concentration"], (1 - mean) * kind["concentration"]))

        questions.append(
            SimQuestion(
                id=i,
                question=f"Simulated question #{i}: what is the hidden number?",
                answer=str(names.randint(10, 999)),
                p0=draw(kind["p0"]),
                p_cw=draw(kind["p_cw"]),
                p_wc=draw(kind["p_wc"]),
                p_same_wrong=draw(kind["p_same_wrong"]),
                kind=f"kind{index}",
            )
        )
    return SimulatedWorld(questions, seed=seed, confidence_auroc=confidence_auroc)


@dataclass(frozen=True)
class ParameterOracle:
    """Policy that knows each simulated question's true chain and runs its ``optimal_rounds``.

    The paper's rule with perfect per-question parameters: the best a per-question *number of rounds* can do
    without seeing labels. A benchmark reference, not a usable policy. Policies that watch how the answers move
    (``belief``) can beat it on questions whose chains are alike but whose answers behave differently.
    """

    world: SimulatedWorld
    requires_model: bool = False

    def decide(self, context: RoundContext) -> Decision:
        q = self.world.truth(context.inputs.get(self.world.question_field, ""))
        planned = theory.optimal_rounds(q.p0, q.p_cw, q.p_wc, context.round_cost, context.max_rounds)
        if context.rounds_done < planned:
            return Decision(True, "oracle", {"planned_rounds": planned})
        return Decision(False, "oracle", {"planned_rounds": planned})
