"""A mixture of chains: latent question types, each with its own chain, fitted to calibration chains by EM.

Estimation layer (numpy only). Real question sets are heterogeneous -- some questions get fixed, some never move,
some get broken -- and one population chain averages them away. Each type ``k`` has a weight and its own ``p0``,
``p_cw``, ``p_wc``, ``p_same_wrong``, ``p_change_correct``, ``p_return`` and, when answers carry a confidence, its
own confidence histogram for correct and for wrong answers. A calibration chain is fully labelled, so given its type
its likelihood factorises over its counts; EM alternates type responsibilities and weighted, Beta-smoothed counts.
The number of types is chosen by cross-validated held-out likelihood.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import logsumexp

from markovscale_dspy._exceptions import DataError, StateError
from markovscale_dspy.core.belief import ChainParameters, HiddenChains

__all__ = ["STATISTICS", "ChainMixture", "chain_statistics", "confidence_columns", "fit_mixture", "select_mixture"]

#: Per-chain sufficient statistics (the first columns of :func:`chain_statistics`): round-0 outcome, the four
#: transitions, answer changes within C->C and W->W, and, for every change to a wrong answer, which of the earlier
#: wrong answers it could have returned to it did return to (one hit at most) and which it did not (misses).
STATISTICS = (
    "c0",
    "w0",
    "cc",
    "cw",
    "wc",
    "ww",
    "cc_changed",
    "cc_same",
    "ww_same",
    "ww_changed",
    "return_hit",
    "return_miss",
)
#: Beta-distributed parameters and their (successes, failures) columns.
RATES = dict(
    p0=("c0", "w0"),
    p_cw=("cw", "cc"),
    p_wc=("wc", "ww"),
    p_change_correct=("cc_changed", "cc_same"),
    p_same_wrong=("ww_same", "ww_changed"),
    p_return=("return_hit", "return_miss"),
)
_FIELDS = tuple(f.name for f in dataclasses.fields(ChainParameters))

#: Pseudo-answers per confidence bin with which each type's confidence histogram is shrunk towards the histogram of
#: all types together: a small type keeps the population's confidence law until its own answers say otherwise.
CONFIDENCE_SHRINKAGE = 4.0


def confidence_prior(hist: np.ndarray) -> np.ndarray:
    """Dirichlet pseudo-counts for ``(K, 2, B)`` per-type histograms: the pooled law, ``CONFIDENCE_SHRINKAGE * B``
    answers' worth per state (plus one per bin, so no bin is ever impossible)."""
    bins = hist.shape[-1]
    pooled = hist.sum(axis=0, keepdims=True) + 1.0
    pooled = pooled / pooled.sum(axis=2, keepdims=True)
    return CONFIDENCE_SHRINKAGE * bins * pooled


def confidence_columns(bins: int) -> tuple[str, ...]:
    """Names of the confidence columns for ``bins`` bins: wrong answers per bin, then correct answers per bin."""
    return tuple(f"conf_w{b}" for b in range(bins)) + tuple(f"conf_c{b}" for b in range(bins))


def chain_statistics(
    labels: Sequence[Sequence[bool]],
    answers: Sequence[Sequence[Hashable]],
    bins: Sequence[Sequence[int | None]] | None = None,
    n_bins: int = 0,
) -> np.ndarray:
    """``(n_chains, len(STATISTICS) + 2 * n_bins)`` counts; ``bins`` are every round's confidence bin."""
    rows = []
    bins = bins if bins is not None else [[None] * len(chain) for chain in labels]
    for chain, keys, conf in zip(labels, answers, bins, strict=True):
        row = dict.fromkeys(STATISTICS, 0)
        hist = np.zeros((2, n_bins))
        row["c0" if chain[0] else "w0"] += 1
        correct_keys = {keys[0]} if chain[0] else set()
        seen = [keys[0]]
        for t in range(1, len(chain)):
            prev, cur, same = chain[t - 1], chain[t], keys[t] == keys[t - 1]
            row[("c" if prev else "w") + ("c" if cur else "w")] += 1
            if prev and cur:
                row["cc_same" if same else "cc_changed"] += 1
            elif not prev and not cur:
                row["ww_same" if same else "ww_changed"] += 1
            if not cur and not same:
                candidates = {k for k in seen if k != keys[t - 1] and k not in correct_keys}
                hit = int(keys[t] in candidates)
                row["return_hit"] += hit
                row["return_miss"] += len(candidates) - hit
            if cur:
                correct_keys.add(keys[t])
            seen.append(keys[t])
        for x, b in zip(chain, conf, strict=True):
            if b is not None and n_bins:
                hist[int(x), min(int(b), n_bins - 1)] += 1
        rows.append([row[c] for c in STATISTICS] + hist.ravel().tolist())
    return np.asarray(rows, dtype=float).reshape(-1, len(STATISTICS) + 2 * n_bins)


def _bins_of(stats: np.ndarray) -> int:
    return (stats.shape[1] - len(STATISTICS)) // 2


def _log_table(params: dict[str, np.ndarray], bins: int) -> np.ndarray:
    """``(K, columns)`` log-probabilities matching the columns of :func:`chain_statistics`."""
    cols = []
    for name in STATISTICS:
        for param, (yes, no) in RATES.items():
            p = np.clip(params[param], 1e-12, 1 - 1e-12)
            if name == yes:
                cols.append(np.log(p))
            elif name == no:
                cols.append(np.log1p(-p))
    table = np.stack(cols, axis=1)
    if bins:
        conf = np.log(np.clip(params["confidence"], 1e-12, 1.0))  # (K, 2, B)
        table = np.concatenate([table, conf[:, 0, :], conf[:, 1, :]], axis=1)
    return table


def _m_step(
    resp: np.ndarray, stats: np.ndarray, prior: tuple[float, float], n: float
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``resp`` already carries each row's multiplicity; ``n`` is the number of chains."""
    a, b = prior
    totals = resp.T @ stats  # (K, columns)
    col = {c: totals[:, i] for i, c in enumerate(STATISTICS)}
    params = {name: (col[yes] + a) / (col[yes] + col[no] + a + b) for name, (yes, no) in RATES.items()}
    bins = _bins_of(stats)
    if bins:
        hist = totals[:, len(STATISTICS) :].reshape(-1, 2, bins)
        params["confidence"] = (hist + confidence_prior(hist)) / (
            hist.sum(axis=2, keepdims=True) + CONFIDENCE_SHRINKAGE * bins
        )
    weights = (resp.sum(0) + 1.0) / (n + resp.shape[1])  # Dirichlet(2) smoothing: no empty type
    return weights, params


def _loglik(stats: np.ndarray, weights: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """Per-chain, per-type joint log-likelihood (for responsibilities)."""
    return np.log(weights)[None, :] + stats @ _log_table(params, _bins_of(stats)).T


@dataclass(frozen=True)
class ChainMixture:
    """Fitted question types: weights and per-type chain parameters (tuples, so the value compares and saves).

    Attributes:
        weights: Share of questions of each type.
        p0, p_cw, p_wc, p_same_wrong, p_change_correct: Per-type parameters.
        loglik: Training log-likelihood per chain.
        heldout: ``(K, mean held-out log-likelihood per chain)`` for every K tried (empty if K was given).
        p_return: Per type, P(a wrong answer that changes lands on a particular earlier wrong answer); empty for
            mixtures saved before answer identities were tracked.
        confidence: Per type, ``((P(bin | wrong) ...), (P(bin | correct) ...))``; empty without confidence.
    """

    weights: tuple[float, ...]
    p0: tuple[float, ...]
    p_cw: tuple[float, ...]
    p_wc: tuple[float, ...]
    p_same_wrong: tuple[float, ...]
    p_change_correct: tuple[float, ...]
    loglik: float = float("nan")
    heldout: tuple[tuple[int, float], ...] = ()
    p_return: tuple[float, ...] = ()
    confidence: tuple = ()

    @property
    def components(self) -> int:
        return len(self.weights)

    def hidden_chains(self) -> HiddenChains:
        """The types as the two-state same/changed filter sees them (point estimates, no identities)."""
        return HiddenChains(*(np.array(getattr(self, f)) for f in _FIELDS))

    def to_dict(self) -> dict[str, Any]:
        data = {f: list(getattr(self, f)) for f in _FIELDS}
        data.update(loglik=self.loglik, heldout=[list(x) for x in self.heldout])
        if self.p_return:
            data["p_return"] = list(self.p_return)
        if self.confidence:
            data["confidence"] = [[list(row) for row in k] for k in self.confidence]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> ChainMixture:
        try:
            fields = {k: tuple(float(x) for x in data[k]) for k in _FIELDS}
            extra: dict[str, Any] = {}
            if data.get("p_return"):
                extra["p_return"] = tuple(float(x) for x in data["p_return"])
            if data.get("confidence"):
                extra["confidence"] = tuple(
                    tuple(tuple(float(x) for x in row) for row in k) for k in data["confidence"]
                )
            mixture = cls(
                **fields,
                loglik=float(data.get("loglik", float("nan"))),
                heldout=tuple((int(k), float(v)) for k, v in data.get("heldout", [])),
                **extra,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateError(f"mixture of chains is malformed: {exc}") from None
        sizes = {len(v) for v in fields.values()} | {len(extra[k]) for k in extra}
        values = [x for v in fields.values() for x in v] + list(mixture.p_return)
        values += [x for k in mixture.confidence for row in k for x in row]
        if len(sizes) != 1 or not all(0.0 <= x <= 1.0 for x in values) or abs(sum(mixture.weights) - 1) > 1e-6:
            raise StateError(
                "mixture of chains is malformed: parameters must be probabilities of equal count and "
                "weights must sum to 1"
            )
        return mixture


def _mixture_from(weights: np.ndarray, params: dict[str, np.ndarray], ll: float) -> ChainMixture:
    order = np.lexsort((params["p_cw"], -params["p0"]))  # deterministic: by p0 (desc), then p_cw
    conf = params.get("confidence")
    return ChainMixture(
        tuple(float(x) for x in weights[order]),
        *(tuple(float(x) for x in params[f][order]) for f in _FIELDS[1:]),
        loglik=ll,
        p_return=tuple(float(x) for x in params["p_return"][order]),
        confidence=() if conf is None else tuple(tuple(tuple(float(x) for x in row) for row in conf[k]) for k in order),
    )


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
    return _mixture_from(weights, params, ll)


def _params_of(mixture: ChainMixture) -> dict[str, np.ndarray]:
    params = {f: np.array(getattr(mixture, f)) for f in _FIELDS[1:]}
    params["p_return"] = np.array(mixture.p_return) if mixture.p_return else np.full(mixture.components, 0.5)
    if mixture.confidence:
        params["confidence"] = np.array(mixture.confidence)
    return params


def _heldout(stats: np.ndarray, components: int, folds: int, prior: tuple[float, float], seed: int) -> np.ndarray:
    """Held-out log-likelihood of every chain under a mixture fitted without its fold."""
    order = np.random.default_rng(seed).permutation(len(stats))
    scores = np.empty(len(stats))
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        mixture = fit_mixture(stats[train], components, prior=prior, seed=seed)
        scores[fold] = logsumexp(_loglik(stats[fold], np.array(mixture.weights), _params_of(mixture)), axis=1)
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
