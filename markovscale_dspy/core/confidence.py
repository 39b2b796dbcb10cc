"""Answer confidence as an observation: bins, a histogram per hidden state, and whether it carries information.

Estimation layer (numpy only, no DSPy). A round's *confidence* is a number in ``[0, 1]`` derived from the LM's token
log-probabilities (see :mod:`markovscale_dspy.refine.logprobs` for the definition). Its distribution is modelled
separately for correct and for wrong answers as a histogram over a few bins whose edges are quantiles of the
calibration confidences, each bin with a Dirichlet posterior. What the belief filter needs is the likelihood ratio
``P(bin | correct) / P(bin | wrong)``: a ratio of 1 in every bin means the confidence carries no information.

Whether it carries any is decided on the calibration chains themselves: chain-wise cross-validated log-likelihood of
the bins given the labels, against one pooled histogram for both states. Confidence is kept only when it wins by more
than two standard errors (paired over chains); otherwise the model has no confidence part at all, and every decision
is exactly the one made without confidence.

Example:
    >>> from markovscale_dspy.core.confidence import select_confidence
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> labels = [[bool(rng.random() < 0.5) for _ in range(4)] for _ in range(300)]
    >>> informative = [[float(rng.beta(6, 2) if x else rng.beta(2, 6)) for x in chain] for chain in labels]
    >>> select_confidence(labels, informative) is not None
    True
    >>> noise = [[float(rng.random()) for _ in chain] for chain in labels]
    >>> select_confidence(labels, noise) is None
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from markovscale_dspy._exceptions import StateError

__all__ = ["BIN_CHOICES", "ConfidenceFit", "auroc", "bin_index", "quantile_edges", "select_confidence"]

#: Numbers of bins tried; the one with the best held-out likelihood is kept (fewer when data are scarce).
BIN_CHOICES = (2, 4, 8)
#: Labelled answers with a confidence needed per bin.
MIN_PER_BIN = 25
#: Confidence is kept only if its held-out log-likelihood gain exceeds this many standard errors.
MIN_STANDARD_ERRORS = 2.0


def quantile_edges(values: Sequence[float], bins: int) -> tuple[float, ...]:
    """Inner bin edges at the quantiles of ``values`` (duplicates merged, so ties never make empty bins)."""
    values = np.asarray(values, dtype=float)
    if bins < 2 or len(values) == 0:
        return ()
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    # A bin is [edge_{i-1}, edge_i): an edge equal to the largest value would leave the last bin empty.
    return tuple(float(e) for e in edges if e < values.max())


def bin_index(value: float | None, edges: Sequence[float]) -> int | None:
    """The bin of ``value`` (0-based; ``None`` stays ``None``)."""
    if value is None:
        return None
    return int(np.searchsorted(np.asarray(edges, dtype=float), float(value), side="right"))


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for ``labels`` (ties count half); ``None`` with one class only."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)  # average ranks over ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class ConfidenceFit:
    """The confidence emission of one population: bin edges and per-state bin counts.

    Attributes:
        edges: Inner bin edges (``len(edges) + 1`` bins).
        counts: ``(wrong counts per bin, correct counts per bin)`` on the calibration answers.
        heldout_gain: Mean held-out log-likelihood gain per chain over a pooled histogram, and its standard error.
        auroc: AUROC of the raw confidence for correctness on the calibration answers.
    """

    edges: tuple[float, ...]
    counts: tuple[tuple[int, ...], tuple[int, ...]]
    heldout_gain: tuple[float, float] = (float("nan"), float("nan"))
    auroc: float | None = None

    @property
    def bins(self) -> int:
        return len(self.edges) + 1

    def probabilities(self, prior: float = 1.0) -> np.ndarray:
        """``(2, bins)`` posterior-mean bin probabilities, row 0 for wrong answers, row 1 for correct ones."""
        counts = np.asarray(self.counts, dtype=float)
        return (counts + prior) / (counts.sum(axis=1, keepdims=True) + prior * self.bins)

    def likelihood_ratios(self) -> np.ndarray:
        """``P(bin | correct) / P(bin | wrong)`` for every bin."""
        p = self.probabilities()
        return p[1] / p[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "edges": list(self.edges),
            "counts": [list(row) for row in self.counts],
            "heldout_gain": list(self.heldout_gain),
            "auroc": self.auroc,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ConfidenceFit:
        try:
            edges = tuple(float(x) for x in data["edges"])
            counts = tuple(tuple(int(x) for x in row) for row in data["counts"])
            gain = tuple(float(x) for x in data.get("heldout_gain", (float("nan"), float("nan"))))
            fit = cls(edges, counts, gain, None if data.get("auroc") is None else float(data["auroc"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"confidence model is malformed: {exc}") from None
        if (
            len(counts) != 2
            or any(len(row) != len(edges) + 1 for row in counts)
            or any(x < 0 for r in counts for x in r)
        ):
            raise StateError("confidence model is malformed: counts must be two rows of non-negative bin counts")
        if list(edges) != sorted(edges):
            raise StateError("confidence model is malformed: bin edges must be increasing")
        return fit


def _pairs(labels: Sequence[Sequence[bool]], confidences: Sequence[Sequence[float | None]]) -> list[list[tuple]]:
    return [
        [(bool(x), float(c)) for x, c in zip(chain, conf, strict=True) if c is not None]
        for chain, conf in zip(labels, confidences, strict=True)
    ]


def _histograms(chains: list[list[tuple[bool, int]]], bins: int) -> tuple[np.ndarray, np.ndarray]:
    state = np.zeros((2, bins))
    for chain in chains:
        for x, b in chain:
            state[int(x), b] += 1
    return state, state.sum(axis=0)


def _heldout_gains(chains: list[list[tuple[bool, int]]], bins: int, folds: int, seed: int) -> np.ndarray:
    """Per chain: held-out log P(bins | labels) under per-state histograms minus under one pooled histogram."""
    order = np.random.default_rng(seed).permutation(len(chains))
    gains = np.zeros(len(chains))
    for fold in np.array_split(order, folds):
        held = set(fold.tolist())
        state, pooled = _histograms([c for i, c in enumerate(chains) if i not in held], bins)
        p_state = (state + 1) / (state.sum(axis=1, keepdims=True) + bins)
        p_pooled = (pooled + 1) / (pooled.sum() + bins)
        for i in fold:
            gains[i] = sum(np.log(p_state[int(x), b]) - np.log(p_pooled[b]) for x, b in chains[i])
    return gains


def select_confidence(
    labels: Sequence[Sequence[bool]],
    confidences: Sequence[Sequence[float | None]],
    *,
    folds: int = 5,
    seed: int = 0,
) -> ConfidenceFit | None:
    """Fit the confidence emission if it carries information about correctness, else ``None``.

    Args:
        labels: Per chain, the correctness of every round.
        confidences: Per chain, every round's confidence (``None`` where the round had none), aligned with
            ``labels``.

    The number of bins is the one of :data:`BIN_CHOICES` (at most one per :data:`MIN_PER_BIN` answers) with the best
    chain-wise cross-validated gain over a pooled histogram; confidence is kept only if that gain is more than
    :data:`MIN_STANDARD_ERRORS` standard errors above zero.
    """
    pairs = _pairs(labels, confidences)
    values = [c for chain in pairs for _, c in chain]
    states = [x for chain in pairs for x, _ in chain]
    used = [chain for chain in pairs if chain]
    if len(used) < 2 * folds or len(set(states)) < 2:
        return None
    best = None
    for bins in BIN_CHOICES:
        if bins * MIN_PER_BIN > len(values):
            break
        edges = quantile_edges(values, bins)
        if not edges:
            continue
        binned = [[(x, bin_index(c, edges)) for x, c in chain] for chain in used]
        gains = _heldout_gains(binned, len(edges) + 1, folds, seed)
        mean, se = float(gains.mean()), float(gains.std(ddof=1) / np.sqrt(len(gains)))
        if best is None or mean > best[0]:
            best = (mean, se, edges, binned)
    if best is None:
        return None
    mean, se, edges, binned = best
    if not mean > MIN_STANDARD_ERRORS * se:
        return None
    state, _ = _histograms(binned, len(edges) + 1)
    counts = tuple(tuple(int(x) for x in row) for row in state)
    return ConfidenceFit(edges, counts, (mean, se), auroc(values, states))
