"""The project's benchmark worlds: named presets and the parameter oracle (references, not library features).

Every preset is a ``SimulatedWorld.mixture`` of components; the tests and the benchmark harness share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from markovscale_dspy import Decision, RoundContext, theory
from markovscale_dspy.testing import SimulatedWorld

__all__ = ["PRESETS", "ParameterOracle", "preset_world"]

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


def preset_world(name: str, n: int, *, seed: int = 0, **kwargs: Any) -> SimulatedWorld:
    """A named world from :data:`PRESETS` (``helps``, ``hurts``, ``heterogeneous``, ``oscillating``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return SimulatedWorld.mixture(n, PRESETS[name], seed=seed, **kwargs)


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
