"""A mixture of chains: latent question types, each with its own chain, fitted to calibration chains by EM.

Estimation layer (numpy only). Real question sets are heterogeneous -- some questions get fixed, some never move,
some get broken -- and one population chain averages them away. Each type ``k`` has a weight and its own ``p0``,
``p_cw``, ``p_wc``, ``p_same_wrong`` and ``p_change_correct``. A calibration chain is fully labelled, so given its
type its likelihood factorises over its counts; EM alternates type responsibilities and weighted, Beta-smoothed
counts. The number of types is chosen by cross-validated held-out likelihood.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import logsumexp

from markovscale_dspy._exceptions import DataError, StateError
from markovscale_dspy.core.belief import HiddenChains

__all__ = ["STATISTICS", "ChainMixture", "chain_statistics", "fit_mixture", "select_mixture"]

#: Per-chain sufficient statistics (the columns of :func:`chain_statistics`).
STATISTICS = ("c0", "w0", "cc", "cw", "wc", "ww", "cc_changed", "cc_same", "ww_same", "ww_changed")
_FIELDS = ("p0", "p_cw", "p_wc", "p_change_correct", "p_same_wrong")


def chain_statistics(labels: Sequence[Sequence[bool]], answers: Sequence[Sequence[Hashable]]) -> np.ndarray:
    """``(n_chains, 10)`` counts: round-0 outcome, the four transitions, and answer changes within C->C / W->W."""
    rows = []
    for chain, keys in zip(labels, answers, strict=True):
        row = dict.fromkeys(STATISTICS, 0)
        row["c0" if chain[0] else "w0"] += 1
        for t in range(1, len(chain)):
            prev, cur, same = chain[t - 1], chain[t], keys[t] == keys[t - 1]
            row[("c" if prev else "w") + ("c" if cur else "w")] += 1
            if prev and cur:
                row["cc_same" if same else "cc_changed"] += 1
            elif not prev and not cur:
                row["ww_same" if same else "ww_changed"] += 1
        rows.append([row[c] for c in STATISTICS])
    return np.asarray(rows, dtype=float).reshape(-1, len(STATISTICS))


def _log_params(params: np.ndarray) -> np.ndarray:
    """``(K, 10)`` log-probabilities matching ``STATISTICS``, from ``(K, 5)`` parameters in ``_FIELDS`` order."""
    p0, p_cw, p_wc, e, s = np.clip(params, 1e-12, 1 - 1e-12).T
    return np.log(np.stack([p0, 1 - p0, 1 - p_cw, p_cw, p_wc, 1 - p_wc, e, 1 - e, s, 1 - s], axis=1))


def _m_step(resp: np.ndarray, stats: np.ndarray, prior: tuple[float, float], n: float) -> tuple[np.ndarray, np.ndarray]:
    """``resp`` already carries each row's multiplicity; ``n`` is the number of chains."""
    a, b = prior
    totals = resp.T @ stats  # (K, 10)
    col = {c: totals[:, i] for i, c in enumerate(STATISTICS)}

    def rate(k: np.ndarray, n: np.ndarray) -> np.ndarray:
        return (k + a) / (n + a + b)

    params = np.stack(
        [
            rate(col["c0"], col["c0"] + col["w0"]),
            rate(col["cw"], col["cw"] + col["cc"]),
            rate(col["wc"], col["wc"] + col["ww"]),
            rate(col["cc_changed"], col["cc_changed"] + col["cc_same"]),
            rate(col["ww_same"], col["ww_same"] + col["ww_changed"]),
        ],
        axis=1,
    )
    weights = (resp.sum(0) + 1.0) / (n + resp.shape[1])  # Dirichlet(2) smoothing: no empty type
    return weights, params


def _loglik(stats: np.ndarray, weights: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Per-chain log-likelihood under the mixture, and the per-type joint terms (for responsibilities)."""
    return np.log(weights)[None, :] + stats @ _log_params(params).T


@dataclass(frozen=True)
class ChainMixture:
    """Fitted question types: weights and per-type chain parameters (tuples, so the value compares and saves).

    Attributes:
        weights: Share of questions of each type.
        p0, p_cw, p_wc, p_same_wrong, p_change_correct: Per-type parameters.
        loglik: Training log-likelihood per chain.
        heldout: ``(K, mean held-out log-likelihood per chain)`` for every K tried (empty if K was given).
    """

    weights: tuple[float, ...]
    p0: tuple[float, ...]
    p_cw: tuple[float, ...]
    p_wc: tuple[float, ...]
    p_same_wrong: tuple[float, ...]
    p_change_correct: tuple[float, ...]
    loglik: float = float("nan")
    heldout: tuple[tuple[int, float], ...] = ()

    @property
    def components(self) -> int:
        return len(self.weights)

    def hidden_chains(self) -> HiddenChains:
        return HiddenChains(
            *(np.array(getattr(self, f)) for f in ("weights", "p0", "p_cw", "p_wc", "p_same_wrong", "p_change_correct"))
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": list(self.weights),
            "p0": list(self.p0),
            "p_cw": list(self.p_cw),
            "p_wc": list(self.p_wc),
            "p_same_wrong": list(self.p_same_wrong),
            "p_change_correct": list(self.p_change_correct),
            "loglik": self.loglik,
            "heldout": [list(x) for x in self.heldout],
        }

    @classmethod
    def from_dict(cls, data: Any) -> ChainMixture:
        try:
            fields = {
                k: tuple(float(x) for x in data[k])
                for k in ("weights", "p0", "p_cw", "p_wc", "p_same_wrong", "p_change_correct")
            }
            mixture = cls(
                **fields,
                loglik=float(data.get("loglik", float("nan"))),
                heldout=tuple((int(k), float(v)) for k, v in data.get("heldout", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"mixture of chains is malformed: {exc}") from None
        sizes = {len(v) for v in fields.values()}
        values = [x for v in fields.values() for x in v]
        if len(sizes) != 1 or not all(0.0 <= x <= 1.0 for x in values) or abs(sum(mixture.weights) - 1) > 1e-6:
            raise StateError(
                "mixture of chains is malformed: parameters must be probabilities of equal count and "
                "weights must sum to 1"
            )
        return mixture


def fit_mixture(
    stats: np.ndarray,
    components: int,
    *,
    prior: tuple[float, float] = (1.0, 1.0),
    seed: int = 0,
    restarts: int = 4,
    max_iter: int = 300,
    tol: float = 1e-8,
) -> ChainMixture:
    """EM for ``components`` types; the best of ``restarts`` seeded random starts.

    Chains with identical statistics are fitted once, weighted by how often they occur (a few hundred distinct
    rows stand for any number of chains), so fitting 10,000 chains costs about as much as fitting 500.
    """
    stats = np.asarray(stats, dtype=float)
    if len(stats) == 0:
        raise DataError("cannot fit a mixture of chains to zero chains")
    rows, counts = np.unique(stats, axis=0, return_counts=True)
    counts = counts.astype(float)
    n = counts.sum()
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts if components > 1 else 1):
        resp = rng.dirichlet(np.ones(components), size=len(rows))
        previous = -np.inf
        for _ in range(max_iter):
            weights, params = _m_step(resp * counts[:, None], rows, prior, n)
            joint = _loglik(rows, weights, params)
            total = logsumexp(joint, axis=1)
            resp = np.exp(joint - total[:, None])
            ll = float(counts @ total / n)
            if ll - previous < tol:
                break
            previous = ll
        if best is None or ll > best[0]:
            best = (ll, weights, params)
    ll, weights, params = best
    order = np.lexsort((params[:, 1], -params[:, 0]))  # deterministic: by p0 (desc), then p_cw
    weights, params = weights[order], params[order]
    return ChainMixture(tuple(weights), *(tuple(params[:, i]) for i in (0, 1, 2, 4, 3)), loglik=ll)


def _heldout(stats: np.ndarray, components: int, folds: int, prior: tuple[float, float], seed: int) -> np.ndarray:
    """Held-out log-likelihood of every chain under a mixture fitted without its fold."""
    order = np.random.default_rng(seed).permutation(len(stats))
    scores = np.empty(len(stats))
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        mixture = fit_mixture(stats[train], components, prior=prior, seed=seed)
        params = np.array([getattr(mixture, f) for f in ("p0", "p_cw", "p_wc", "p_change_correct", "p_same_wrong")]).T
        scores[fold] = logsumexp(_loglik(stats[fold], np.array(mixture.weights), params), axis=1)
    return scores


def select_mixture(
    stats: np.ndarray,
    *,
    max_components: int = 4,
    folds: int = 5,
    prior: tuple[float, float] = (1.0, 1.0),
    seed: int = 0,
) -> ChainMixture:
    """Choose the number of types by ``folds``-fold held-out likelihood, then refit on all chains.

    Types are added one at a time while each addition raises the held-out log-likelihood by more than one standard
    error (paired over chains): more types must earn their keep.
    """
    stats = np.asarray(stats, dtype=float)
    if len(stats) < 2 * folds:
        raise DataError(f"choosing question types needs at least {2 * folds} chains, got {len(stats)}")
    chosen, current = 1, _heldout(stats, 1, folds, prior, seed)
    means = [(1, float(current.mean()))]
    for k in range(2, max_components + 1):
        candidate = _heldout(stats, k, folds, prior, seed)
        means.append((k, float(candidate.mean())))
        gain = candidate - current
        if gain.mean() <= gain.std(ddof=1) / np.sqrt(len(gain)):
            break
        chosen, current = k, candidate
    mixture = fit_mixture(stats, chosen, prior=prior, seed=seed)
    return ChainMixture(**{**mixture.__dict__, "heldout": tuple(means)})
