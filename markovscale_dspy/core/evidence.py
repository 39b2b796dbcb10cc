"""Per-question evidence: which of the answers seen so far is the correct one, and Bayes-optimal stopping on it.

Belief layer (numpy only, no DSPy). This is the filter behind ``policy="belief"``. It extends the two-state filter of
:mod:`markovscale_dspy.core.belief` in three ways:

* **Answer identity.** The hidden state is ``(question type k, J)`` where ``J`` says which of the distinct answers
  seen so far is correct (``J = 0``: none of them). The current answer is correct iff ``J`` is its slot. An answer
  that *returns* after a change is therefore evidence: a fix returns to the correct answer for sure, while a wrong
  answer revisits a particular earlier wrong one only at the calibrated rate ``p_return``.
* **Confidence.** When the LM reports token log-probabilities, every answer carries a confidence, binned; each bin has
  a calibrated probability under a correct and under a wrong answer (per type). The round-0 belief starts from the
  first answer's confidence and every later answer's confidence updates it. Without confidence nothing changes.

Emissions, for a round whose previous answer was in slot ``cur`` (``m`` distinct answers seen, ``s`` =
``p_same_wrong``, ``e`` = ``p_change_correct``; a wrong answer that changes lands on each particular earlier wrong
answer with probability ``r`` = ``p_return`` and on a new answer otherwise), given the hypothesis ``J``:

========================  =========================================================================================
hypothesis                next answer
========================  =========================================================================================
``J = cur`` (correct)     same ``(1-p_cw)(1-e)``; reworded to a new answer ``(1-p_cw) e`` (the correct answer moves
                          to it); broken: ``p_cw``, then a return to each of the ``m-1`` other answers ``r``, else new
``J = 0`` (none correct)  same ``(1-p_wc) s``; fixed: a *new* answer ``p_wc``; wrong again ``(1-p_wc)(1-s)``: a return
                          to each of the ``m-1`` others ``r``, else new
``J = a`` (another seen)  same ``(1-p_wc) s``; fixed: a *return to a* ``p_wc``; wrong again ``(1-p_wc)(1-s)``: a
                          return to each of the ``m-2`` others (not ``a``) ``r``, else new
========================  =========================================================================================

Stopping is an exact expectimax over the remaining rounds'
observations whose terminal value is the accuracy of the answer the module will return: the current one for
``select="last"``, the best-supported one for ``select="best"``. Deep lookaheads coarsen their observations to keep
the tree small (first dropping confidence, then identities); planning with coarser future observations is planning
for a policy that sees less, so the value is a lower bound and never an overstatement.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from markovscale_dspy.core.belief import ChainParameters
from markovscale_dspy.core.theory import TIE_TOLERANCE

__all__ = [
    "AnswerBelief",
    "Evidence",
    "Observation",
    "answer_slots",
    "observations_of",
]

#: Expectimax looks at most this many rounds ahead.
MAX_LOOKAHEAD = 12
#: Observation paths per lookahead level before the lookahead coarsens its observations (the same for every
#: sample, so the point estimate and the posterior draws plan with the same tree).
NODE_BUDGET = 1 << 13
#: Decisions remembered per model (a batch of questions revisits the same beliefs often).
MEMO_SIZE = 1 << 14

_FULL, _IDENTITY, _TWO_STATE = 0, 1, 2


@dataclass(frozen=True)
class Observation:
    """What a refinement round showed: ``kind`` is ``"same"``, ``"return"`` (to slot ``slot``) or ``"new"``;
    ``bin`` is the confidence bin of its answer (``None``: no confidence)."""

    kind: str
    slot: int = 0
    bin: int | None = None


def answer_slots(keys: Sequence[Hashable]) -> list[int]:
    """Slot (1-based, in order of first appearance) of every round's answer."""
    slots: dict[Hashable, int] = {}
    return [slots.setdefault(key, len(slots) + 1) for key in keys]


def observations_of(
    keys: Sequence[Hashable], failed: Sequence[bool], bins: Sequence[int | None] | None = None
) -> list[Observation | None]:
    """Per refinement round: what it showed (``None`` if it failed and kept the previous answer)."""
    bins = list(bins) if bins is not None else [None] * len(keys)
    slots = answer_slots(keys)
    out: list[Observation | None] = []
    seen = {slots[0]}
    for t in range(1, len(keys)):
        if failed[t]:
            out.append(None)
            continue
        if slots[t] == slots[t - 1]:
            out.append(Observation("same", slots[t], bins[t]))
        elif slots[t] in seen:
            out.append(Observation("return", slots[t], bins[t]))
        else:
            out.append(Observation("new", slots[t], bins[t]))
        seen.add(slots[t])
    return out


@dataclass(frozen=True)
class AnswerBelief:
    """Belief after some rounds: ``joint[s, k, j]`` = P(type k, slot j holds the correct answer) under sample s.

    ``current`` is the slot of the current answer, ``seen`` the number of distinct answers so far (slots
    ``1..seen``; slot 0 = none of them is correct).
    """

    joint: np.ndarray
    current: int
    seen: int

    def correct(self) -> np.ndarray:
        """P(the current answer is correct), per sample."""
        return self.joint[:, :, self.current].sum(axis=1)

    def slots(self) -> np.ndarray:
        """``(S, seen + 1)``: P(slot j holds the correct answer), per sample."""
        return self.joint.sum(axis=1)

    def best(self) -> np.ndarray:
        """P(the best-supported answer seen is correct), per sample."""
        return self.slots()[:, 1:].max(axis=1)


@dataclass(frozen=True, eq=False)
class Evidence(ChainParameters):
    """Question types with their chains, answer-identity and confidence emissions, stacked over parameter samples.

    Every parameter array has shape ``(S, K)``: ``S`` parameter sets evaluated side by side (one, the posterior
    means, for the belief policy), ``K`` question types. ``confidence`` has shape ``(S, K, 2, B)``
    (``[..., 0, b]`` = P(bin b | wrong), ``[..., 1, b]`` = P(bin b | correct)) or is ``None``.
    """

    p_return: np.ndarray
    confidence: np.ndarray | None = None
    _sub: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def samples(self) -> int:
        return self.p0.shape[0]

    @property
    def bins(self) -> int:
        return 0 if self.confidence is None else self.confidence.shape[-1]

    def subset(self, which: slice) -> Evidence:
        """The same model restricted to some samples (``slice(0, 1)``: the point estimate)."""
        key = (which.start, which.stop, which.step)
        if key not in self._sub:
            conf = None if self.confidence is None else self.confidence[which]
            self._sub[key] = Evidence(
                *(getattr(self, f)[which] for f in _PARAMS),
                confidence=conf,
            )
        return self._sub[key]

    def without_confidence(self) -> Evidence:
        """The same model for answers that carry no confidence (and will not: planning ignores it too)."""
        if self.confidence is None:
            return self
        if "plain" not in self._sub:
            self._sub["plain"] = Evidence(*(getattr(self, f) for f in _PARAMS))
        return self._sub["plain"]

    def _p(self, name: str) -> np.ndarray:
        return getattr(self, name)[None, :, :, None]  # (1, S, K, 1): broadcast over nodes and slots

    # Filtering -----------------------------------------------------------------------------------------------

    def start(self, bin: int | None = None) -> AnswerBelief:
        """Belief after round 0 (``bin``: the confidence bin of its answer)."""
        joint = np.stack([self.weights * (1 - self.p0), self.weights * self.p0], axis=-1)
        child = joint[None]
        child = self._emit(child, np.array([1]), bin)
        return AnswerBelief(_normalise(child)[0][0], 1, 1)

    def update(self, belief: AnswerBelief, observation: Observation | None) -> AnswerBelief:
        """Belief after one more round (``None``: the round failed and kept the previous answer)."""
        if observation is None:
            return belief
        joint = np.concatenate([belief.joint, np.zeros((*belief.joint.shape[:2], 1))], axis=-1)[None]
        cur, m = np.array([belief.current]), np.array([belief.seen])
        if observation.kind == "same":
            child, cur2, m2 = self._same(joint, cur), cur, m
        elif observation.kind == "return":
            a = int(observation.slot)
            child, cur2, m2 = self._return(joint, cur, m, a), np.array([a]), m
        else:
            child, cur2, m2 = self._new(joint, cur, m), m + 1, m + 1
        child = self._emit(child, cur2, observation.bin)
        norm, prob = _normalise(child)
        if not prob[0].any():  # an observation the model calls impossible: keep the belief without it
            return belief
        # A sample that calls it impossible keeps its previous belief (renormalised), so the others still decide.
        dead = prob[0] <= 0
        if dead.any():
            norm[0, dead] = joint[0, dead]
        joint = norm[0] if observation.kind == "new" else norm[0][..., :-1]
        return AnswerBelief(joint, int(cur2[0]), int(m2[0]))

    def filter(
        self, keys: Sequence[Hashable], failed: Sequence[bool], bins: Sequence[int | None] | None = None
    ) -> AnswerBelief:
        """Belief after the rounds so far (``keys``: every round's answer identity, round 0 first)."""
        bins = list(bins) if bins is not None else [None] * len(keys)
        belief = self.start(bins[0] if bins else None)
        for observation in observations_of(keys, failed, bins):
            belief = self.update(belief, observation)
        return belief

    def posteriors(
        self, keys: Sequence[Hashable], failed: Sequence[bool], bins: Sequence[int | None] | None = None
    ) -> list[float]:
        """P(round t's answer is correct | every round), for every round (point estimate)."""
        belief = self.subset(slice(0, 1)).filter(keys, failed, bins)
        slots = belief.slots()[0]
        return [float(slots[s]) for s in answer_slots(keys)]

    def probability(self, belief: AnswerBelief, observation: Observation) -> float:
        """P(the next round shows ``observation``) given ``belief`` (point estimate)."""
        point = self.subset(slice(0, 1))
        joint = np.concatenate([belief.joint[:1], np.zeros((1, belief.joint.shape[1], 1))], axis=-1)[None]
        cur, m = np.array([belief.current]), np.array([belief.seen])
        if observation.kind == "same":
            child, cur2 = point._same(joint, cur), cur
        elif observation.kind == "return":
            if not 1 <= observation.slot <= belief.seen or observation.slot == belief.current:
                return 0.0
            child, cur2 = point._return(joint, cur, m, int(observation.slot)), np.array([observation.slot])
        else:
            child, cur2 = point._new(joint, cur, m), m + 1
        return float(point._emit(child, cur2, observation.bin).sum())

    def expected_gain(self, belief: AnswerBelief) -> float:
        """Expected change of P(current answer correct) over one more round (point estimate)."""
        correct = belief.joint[0, :, belief.current]
        wrong = belief.joint[0].sum(axis=-1) - correct
        return float((self.p_wc[0] * wrong - self.p_cw[0] * correct).sum())

    # Emissions -------------------------------------------------------------------------------------------------

    def _emit(self, child: np.ndarray, cur: np.ndarray, bin: int | None) -> np.ndarray:
        if bin is None or self.confidence is None:
            return child
        f = self.confidence[:, :, :, min(int(bin), self.bins - 1)]  # (S, K, 2)
        j = np.arange(child.shape[-1])
        correct = (j[None, :] == cur[:, None])[:, None, None, :]  # (N, 1, 1, J)
        return child * np.where(correct, f[None, :, :, 1:2], f[None, :, :, 0:1])

    def _same(self, joint: np.ndarray, cur: np.ndarray) -> np.ndarray:
        j = np.arange(joint.shape[-1])
        is_cur = (j[None, :] == cur[:, None])[:, None, None, :]
        keep_correct = (1 - self._p("p_cw")) * (1 - self._p("p_change_correct"))
        keep_wrong = (1 - self._p("p_wc")) * self._p("p_same_wrong")
        return joint * np.where(is_cur, keep_correct, keep_wrong)

    def _return(self, joint: np.ndarray, cur: np.ndarray, m: np.ndarray, a: int) -> np.ndarray:
        j = np.arange(joint.shape[-1])[None, :]
        is_cur = j == cur[:, None]
        is_none = j == 0
        is_a = j == a
        other = (j >= 1) & (j <= m[:, None]) & ~is_cur & ~is_a
        p_cw, p_wc, s = self._p("p_cw"), self._p("p_wc"), self._p("p_same_wrong")
        each_cur, _ = self._returns(m - 1)  # hypotheses "the current answer" or "none": m - 1 earlier answers
        each_other, _ = self._returns(m - 2)  # hypothesis "another earlier answer": it is not a wrong candidate
        w = (
            is_cur[:, None, None, :] * p_cw * each_cur
            + is_none[:, None, None, :] * (1 - p_wc) * (1 - s) * each_cur
            + is_a[:, None, None, :] * p_wc
            + other[:, None, None, :] * (1 - p_wc) * (1 - s) * each_other
        )
        return joint * w

    def _returns(self, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For ``candidates`` earlier wrong answers per node: P(a random wrong change lands on one particular
        one) and P(it is a new answer), shaped ``(N, S, K, 1)``."""
        n = np.maximum(candidates, 0).astype(float)[:, None, None, None]
        each = np.minimum(self._p("p_return"), 1.0 / np.maximum(n, 1.0))
        return each, 1.0 - n * each

    def _new(self, joint: np.ndarray, cur: np.ndarray, m: np.ndarray) -> np.ndarray:
        j = np.arange(joint.shape[-1])[None, :]
        is_cur = j == cur[:, None]
        is_none = j == 0
        other = (j >= 1) & (j <= m[:, None]) & ~is_cur
        p_cw, p_wc = self._p("p_cw"), self._p("p_wc")
        s, e = self._p("p_same_wrong"), self._p("p_change_correct")
        _, new_cur = self._returns(m - 1)
        _, new_other = self._returns(m - 2)
        stay = (
            is_cur[:, None, None, :] * p_cw * new_cur
            + is_none[:, None, None, :] * (1 - p_wc) * (1 - s) * new_cur
            + other[:, None, None, :] * (1 - p_wc) * (1 - s) * new_other
        )
        child = joint * stay
        rows = np.arange(joint.shape[0])
        moved = joint[rows, :, :, cur] * (1 - p_cw[0, :, :, 0]) * e[0, :, :, 0] + joint[:, :, :, 0] * p_wc[0, :, :, 0]
        child[rows, :, :, m + 1] += moved
        return child

    # Planning --------------------------------------------------------------------------------------------------

    def advantage(self, belief: AnswerBelief, rounds_left: int, round_cost: float, select: str = "last") -> np.ndarray:
        """Per sample: value of running one more round and then stopping optimally, minus stopping now.

        Exact expectimax over the remaining rounds' observations (coarsened deep in the tree, see the module
        docstring); the terminal value is the accuracy of the answer ``select`` returns.
        """
        if rounds_left <= 0:
            return np.full(self.samples, -np.inf)
        key = (belief.joint.tobytes(), belief.joint.shape, belief.current, belief.seen, rounds_left, round_cost, select)
        memo = self._sub.setdefault("memo", {})
        if key not in memo:
            if len(memo) >= MEMO_SIZE:
                memo.clear()
            stop = _terminal(belief.joint[None], np.array([belief.current]), np.array([belief.seen]), select)[0]
            depth = min(int(rounds_left), MAX_LOOKAHEAD)
            memo[key] = self._continuation(belief, depth, round_cost, select, NODE_BUDGET) - stop
        return memo[key]

    def _schedule(self, belief: AnswerBelief, depth: int, budget: int) -> list[int]:
        """Observation detail per lookahead level: full (identity x confidence), identity, or same/changed."""
        modes, nodes, mode = [], 1, _FULL if self.confidence is not None else _IDENTITY
        for d in range(depth):
            seen = belief.seen + d
            while True:
                branching = {_FULL: (seen + 1) * max(self.bins, 1), _IDENTITY: seen + 1, _TWO_STATE: 2}[mode]
                if nodes * branching <= budget or mode == _TWO_STATE:
                    break
                mode += 1
            if nodes * branching > budget and d > 0:
                break  # even same/changed would not fit: look no further
            modes.append(mode)
            nodes *= branching
        return modes

    def _continuation(
        self, belief: AnswerBelief, depth: int, round_cost: float, select: str, budget: int
    ) -> np.ndarray:
        modes = self._schedule(belief, depth, budget)
        pointer_levels = sum(m != _TWO_STATE for m in modes)
        width = belief.seen + pointer_levels + 1
        joint = np.zeros((*belief.joint.shape[:2], width))
        joint[..., : belief.joint.shape[-1]] = belief.joint
        level = {"joint": joint[None], "cur": np.array([belief.current]), "m": np.array([belief.seen]), "two": False}
        levels, children = [level], []
        for mode in modes:
            level, (prob, parent) = self._expand(levels[-1], mode)
            levels.append(level)
            children.append((prob, parent))
        value = _level_terminal(levels[-1], select)
        for d in range(len(modes) - 1, -1, -1):
            prob, parent = children[d]
            cont = np.zeros((len(levels[d]["joint"]), self.samples))
            np.add.at(cont, parent, prob * value)
            cont -= round_cost
            value = cont if d == 0 else np.maximum(_level_terminal(levels[d], select), cont)
        return value[0]

    def _expand(self, level: dict, mode: int) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
        joint, cur, m = level["joint"], level["cur"], level["m"]
        if mode == _TWO_STATE:
            two = joint if level["two"] else _to_two_state(joint, cur)
            same, changed = self._two_state_children(two)
            children = [(same, 0), (changed, 0)]
            parts = [(c, np.arange(len(two)), cur, m) for c, _ in children]
            return _collect(parts, two=True)
        parts = [(self._same(joint, cur), np.arange(len(joint)), cur, m)]
        for a in range(1, joint.shape[-1]):
            ok = (a <= m) & (a != cur)
            if ok.any():
                idx = np.flatnonzero(ok)
                parts.append((self._return(joint[idx], cur[idx], m[idx], a), idx, np.full(len(idx), a), m[idx]))
        ok = m + 1 < joint.shape[-1]
        if ok.any():
            idx = np.flatnonzero(ok)
            parts.append((self._new(joint[idx], cur[idx], m[idx]), idx, m[idx] + 1, m[idx] + 1))
        if mode == _FULL:
            parts = [(self._emit(child, c2, b), idx, c2, m2) for child, idx, c2, m2 in parts for b in range(self.bins)]
        return _collect(parts, two=False)

    def _two_state_children(self, two: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p_cw, p_wc = self._p("p_cw")[..., 0], self._p("p_wc")[..., 0]
        s, e = self._p("p_same_wrong")[..., 0], self._p("p_change_correct")[..., 0]
        wrong, correct = two[..., 0], two[..., 1]
        same = np.stack([wrong * (1 - p_wc) * s, correct * (1 - p_cw) * (1 - e)], axis=-1)
        changed = np.stack(
            [wrong * (1 - p_wc) * (1 - s) + correct * p_cw, wrong * p_wc + correct * (1 - p_cw) * e], axis=-1
        )
        return same, changed

    def decide(
        self, belief: AnswerBelief, rounds_left: int, round_cost: float, select: str = "last"
    ) -> tuple[bool, dict[str, float]]:
        """Whether to run another round (strictly better than stopping; ties stop), and the advantage behind it."""
        advantage = float(self.advantage(belief, rounds_left, round_cost, select)[0])
        return advantage > TIE_TOLERANCE, {"advantage": advantage}


_PARAMS = ("weights", "p0", "p_cw", "p_wc", "p_same_wrong", "p_change_correct", "p_return")


def _normalise(child: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalise each (node, sample) belief; also return the normalisers (the observation's probability)."""
    prob = child.sum(axis=(-1, -2))
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(prob[..., None, None] > 0, child / prob[..., None, None], 0.0)
    return norm, prob


def _collect(parts: list, two: bool) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    joints, probs, parents, curs, ms = [], [], [], [], []
    for child, idx, cur, m in parts:
        norm, prob = _normalise(child)
        live = prob.max(axis=1) > 0
        joints.append(norm[live])
        probs.append(prob[live])
        parents.append(np.asarray(idx)[live])
        curs.append(np.asarray(cur)[live])
        ms.append(np.asarray(m)[live])
    level = {"joint": np.concatenate(joints), "cur": np.concatenate(curs), "m": np.concatenate(ms), "two": two}
    return level, (np.concatenate(probs), np.concatenate(parents))


def _to_two_state(joint: np.ndarray, cur: np.ndarray) -> np.ndarray:
    rows = np.arange(len(joint))
    correct = joint[rows, :, :, cur]
    return np.stack([joint.sum(axis=-1) - correct, correct], axis=-1)


def _terminal(joint: np.ndarray, cur: np.ndarray, m: np.ndarray, select: str) -> np.ndarray:
    """``(N, S)`` accuracy of the returned answer at each node."""
    slots = joint.sum(axis=2)  # (N, S, J)
    if select == "best":
        j = np.arange(slots.shape[-1])
        seen = (j[None, :] >= 1) & (j[None, :] <= m[:, None])
        return np.where(seen[:, None, :], slots, -np.inf).max(axis=-1)
    return slots[np.arange(len(slots)), :, cur]


def _level_terminal(level: dict, select: str) -> np.ndarray:
    if level["two"]:
        return level["joint"][..., 1].sum(axis=2)  # a lower bound for select="best"
    return _terminal(level["joint"], level["cur"], level["m"], select)
