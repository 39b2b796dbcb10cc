"""TransitionModel: the learned state of MarkovRefine, estimated from labelled refinement chains.

Estimation layer: numpy and scipy only, no DSPy. A model is an immutable value built from counts; the point
estimates are posterior means under a Beta prior and every derived quantity delegates to :mod:`theory`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import stats

from markovscale_dspy._exceptions import ConfigurationError, DataError, NotCalibratedError, StateError
from markovscale_dspy.core import theory
from markovscale_dspy.core.belief import HiddenChains
from markovscale_dspy.core.confidence import ConfidenceFit, bin_index, select_confidence
from markovscale_dspy.core.evidence import Evidence
from markovscale_dspy.core.mixture import STATISTICS, ChainMixture, chain_statistics
from markovscale_dspy.core.validation import check_int, check_prior
from markovscale_dspy.core.voting import VoteModel

__all__ = ["EMISSIONS", "PARAMETERS", "TransitionModel"]

#: The chain parameters a model estimates, in the order they are reported.
PARAMETERS = ("p0", "p_cw", "p_wc")
#: Emission parameters, estimated when calibration chains carry answer identities.
EMISSIONS = ("p_same_wrong", "p_change_correct")

_FORMAT = "markovscale.transition_model/3"
#: Formats :meth:`TransitionModel.from_dict` reads (version 1 had no answer returns and no confidence, version 2 no
#: round-0 failures).
_READS = ("markovscale.transition_model/1", "markovscale.transition_model/2", _FORMAT)


def _check_chains(labels: Any) -> list[list[bool]]:
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (Sequence, np.ndarray)):
        raise DataError(f"labels must be a sequence of chains (sequences of bools), got {type(labels).__name__}")
    if len(labels) == 0:
        raise DataError("labels is empty: fitting needs at least one chain of per-round correctness labels")
    chains = []
    for i, chain in enumerate(labels):
        if isinstance(chain, (str, bytes)) or not isinstance(chain, (Sequence, np.ndarray)):
            raise DataError(f"labels[{i}] must be a sequence of bools (round 0, 1, ...), got {chain!r}")
        if len(chain) == 0:
            raise DataError(f"labels[{i}] is an empty chain: every chain needs at least its round-0 label")
        for j, x in enumerate(chain):
            if not isinstance(x, (bool, np.bool_)):
                raise DataError(
                    f"labels[{i}][{j}] must be a bool (correct or not), got {x!r} ({type(x).__name__}); "
                    "convert metric scores to bools first"
                )
        chains.append([bool(x) for x in chain])
    return chains


@dataclass(frozen=True)
class TransitionModel:
    """Fitted two-state chain: single-pass accuracy ``p0`` and per-round transition rates ``p_cw``, ``p_wc``.

    Build it with :meth:`fit` (or get it from ``MarkovCalibrator``). Each parameter has a Beta posterior
    ``Beta(alpha + successes, beta + failures)``; the point estimates are the posterior means, which stay defined
    (and conservative) when a state was never visited.

    Attributes:
        n0_correct: Chains whose round 0 was correct.
        n0_total: Chains observed (each contributes one round-0 label).
        n_cc: Observed correct -> correct transitions.
        n_cw: Observed correct -> wrong transitions.
        n_wc: Observed wrong -> correct transitions.
        n_ww: Observed wrong -> wrong transitions.
        prior: ``(alpha, beta)`` of the Beta prior shared by all parameters.
        n_cc_changed: Of the correct -> correct transitions, how many changed the answer (``None``: not observed).
        n_ww_same: Of the wrong -> wrong transitions, how many kept the same answer (``None``: not observed).
        mixture: Latent question types fitted by EM (``None``: one population chain describes the questions).
        votes: How plurality voting over independent samples behaves (``None``: calibrated without parallel
            samples); see :class:`~markovscale_dspy.core.voting.VoteModel`.
        n_return_hit: Over every change to a wrong answer, the earlier wrong answers of the chain it landed on
            (``None``: not observed; models saved before answer identities were tracked).
        n_return_miss: The earlier wrong answers it could have landed on and did not.
        confidence: The answer-confidence emission (``None``: no confidence, or none that carried information).
        n0_failed: Chains whose round 0 gave no answer (the program raised, or its output did not parse). They are
            not in ``n0_total``: ``p0`` and the rates describe the questions that were answered, and
            :meth:`expected_accuracy` scores the failed ones as wrong, as ``dspy.Evaluate`` does.

    Example:
        >>> from markovscale_dspy import TransitionModel
        >>> model = TransitionModel.fit([[False, True, True], [True, True, False], [False, False, True]])
        >>> model.n_wc, model.n_cw
        (2, 1)
        >>> model.regime()
        'improving'
    """

    n0_correct: int
    n0_total: int
    n_cc: int
    n_cw: int
    n_wc: int
    n_ww: int
    prior: tuple[float, float] = (1.0, 1.0)
    n_cc_changed: int | None = None
    n_ww_same: int | None = None
    mixture: ChainMixture | None = None
    votes: VoteModel | None = None
    n_return_hit: int | None = None
    n_return_miss: int | None = None
    confidence: ConfidenceFit | None = None
    n0_failed: int = 0
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("n0_correct", "n0_total", "n_cc", "n_cw", "n_wc", "n_ww", "n0_failed"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), 0))
        if self.n0_correct > self.n0_total:
            raise ConfigurationError(f"n0_correct ({self.n0_correct}) cannot exceed n0_total ({self.n0_total})")
        object.__setattr__(self, "prior", check_prior(self.prior))
        for name, total in (("n_cc_changed", "n_cc"), ("n_ww_same", "n_ww")):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, check_int(name, value, 0))
                if value > getattr(self, total):
                    raise ConfigurationError(f"{name} ({value}) cannot exceed {total} ({getattr(self, total)})")
        if (self.n_cc_changed is None) != (self.n_ww_same is None):
            raise ConfigurationError("n_cc_changed and n_ww_same are estimated together: give both or neither")
        if (self.n_return_hit is None) != (self.n_return_miss is None):
            raise ConfigurationError("n_return_hit and n_return_miss are estimated together: give both or neither")
        for name in ("n_return_hit", "n_return_miss"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_int(name, getattr(self, name), 0))
        if self.confidence is not None and not isinstance(self.confidence, ConfidenceFit):
            raise ConfigurationError(
                f"confidence must be a ConfidenceFit or None, got {type(self.confidence).__name__}"
            )
        if self.mixture is not None and not isinstance(self.mixture, ChainMixture):
            raise ConfigurationError(f"mixture must be a ChainMixture or None, got {type(self.mixture).__name__}")
        if self.votes is not None and not isinstance(self.votes, VoteModel):
            raise ConfigurationError(f"votes must be a VoteModel or None, got {type(self.votes).__name__}")

    # Construction ------------------------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        labels: Sequence[Sequence[bool]],
        prior: tuple[float, float] = (1.0, 1.0),
        answers: Sequence[Sequence[Hashable]] | None = None,
        confidences: Sequence[Sequence[float | None]] | None = None,
    ) -> TransitionModel:
        """Count round-0 outcomes and transitions in labelled chains and return the fitted model.

        Args:
            labels: One chain per calibration run, each a sequence of bools: whether round 0, 1, ..., R was
                correct. Chains may differ in length (a chain of length 1 only informs ``p0``).
            prior: ``(alpha, beta)`` of the Beta prior; ``(1, 1)`` is uniform.
            answers: Optionally, the answer identity of every round (same shape as ``labels``); then the emission
                rates ``p_same_wrong`` and ``p_change_correct`` and the return rate are estimated too.
            confidences: Optionally, every round's answer confidence (``None`` where a round had none); its
                distribution given correctness is fitted if it carries information
                (:func:`~markovscale_dspy.core.confidence.select_confidence`).

        Raises:
            DataError: ``labels`` is empty, a chain is empty, a label is not a bool, or ``answers`` does not have
                the shape of ``labels``.
        """
        chains = _check_chains(labels)
        prior = check_prior(prior)
        if answers is not None:
            if len(answers) != len(chains) or any(len(a) != len(c) for a, c in zip(answers, chains, strict=False)):
                raise DataError("answers must have one answer per label: same number of chains, same lengths")
        # The same per-chain counts the mixture of question types is fitted to, summed over chains.
        if confidences is not None and (
            len(confidences) != len(chains) or any(len(c) != len(x) for c, x in zip(confidences, chains, strict=False))
        ):
            raise DataError("confidences must have one value (or None) per label: same number of chains, same lengths")
        keys = answers if answers is not None else [[0] * len(chain) for chain in chains]
        totals = dict(zip(STATISTICS, (int(x) for x in chain_statistics(chains, keys).sum(axis=0)), strict=True))
        emissions = {}
        if answers is not None:
            emissions = {
                "n_cc_changed": totals["cc_changed"],
                "n_ww_same": totals["ww_same"],
                "n_return_hit": totals["return_hit"],
                "n_return_miss": totals["return_miss"],
            }
        if confidences is not None:
            emissions["confidence"] = select_confidence(chains, confidences)
        return cls(
            n0_correct=totals["c0"],
            n0_total=len(chains),
            prior=prior,
            n_cc=totals["cc"],
            n_cw=totals["cw"],
            n_wc=totals["wc"],
            n_ww=totals["ww"],
            **emissions,
        )

    # Posteriors --------------------------------------------------------------------------------------------------

    def _successes_failures(self, name: str) -> tuple[int, int]:
        if name == "p0":
            return self.n0_correct, self.n0_total - self.n0_correct
        if name == "p_cw":
            return self.n_cw, self.n_cc
        if name == "p_wc":
            return self.n_wc, self.n_ww
        if name in EMISSIONS:
            if not self.has_emissions:
                raise ConfigurationError(
                    f"{name} was not estimated: this model was fitted without answer identities (recalibrate with "
                    "MarkovCalibrator, which records them)"
                )
            if name == "p_same_wrong":
                return self.n_ww_same, self.n_ww - self.n_ww_same
            return self.n_cc_changed, self.n_cc - self.n_cc_changed
        raise ConfigurationError(f"unknown parameter {name!r}; expected one of {', '.join(PARAMETERS + EMISSIONS)}")

    def posterior(self, name: str) -> Any:
        """The Beta posterior of ``name`` (``"p0"``, ``"p_cw"`` or ``"p_wc"``) as a frozen ``scipy.stats`` law."""
        k, f = self._successes_failures(name)
        return stats.beta(self.prior[0] + k, self.prior[1] + f)

    def _mean(self, name: str) -> float:
        k, f = self._successes_failures(name)
        return (self.prior[0] + k) / (self.prior[0] + self.prior[1] + k + f)

    @property
    def p0(self) -> float:
        """Posterior mean of the single-pass accuracy."""
        return self._mean("p0")

    @property
    def p_cw(self) -> float:
        """Posterior mean of P(correct -> wrong) per refinement round."""
        return self._mean("p_cw")

    @property
    def p_wc(self) -> float:
        """Posterior mean of P(wrong -> correct) per refinement round."""
        return self._mean("p_wc")

    @property
    def has_emissions(self) -> bool:
        """Whether the answer-change rates were estimated (needed by the belief policy)."""
        return self.n_cc_changed is not None

    @property
    def p_same_wrong(self) -> float | None:
        """Posterior mean of P(answer unchanged | wrong -> wrong), or ``None`` if not estimated."""
        return self._mean("p_same_wrong") if self.has_emissions else None

    @property
    def p_change_correct(self) -> float | None:
        """Posterior mean of P(answer changes | correct -> correct), or ``None`` if not estimated."""
        return self._mean("p_change_correct") if self.has_emissions else None

    @property
    def p_return(self) -> float | None:
        """Posterior mean of P(a wrong answer that changes lands on a particular earlier wrong answer), or ``None``."""
        if self.n_return_hit is None:
            return None
        a, b = self.prior
        return (a + self.n_return_hit) / (a + b + self.n_return_hit + self.n_return_miss)

    def with_mixture(self, mixture: ChainMixture | None) -> TransitionModel:
        """The same model with question types attached (or removed)."""
        return replace(self, mixture=mixture)

    def with_round0_failures(self, failed: int) -> TransitionModel:
        """This model, knowing that round 0 gave no answer on ``failed`` more chains (see :attr:`answer_rate`)."""
        return replace(self, n0_failed=failed)

    @property
    def answer_rate(self) -> float:
        """Fraction of calibration questions whose round 0 gave an answer (1 when none failed)."""
        total = self.n0_total + self.n0_failed
        return self.n0_total / total if total else 1.0

    def expected_accuracy(self, t: int | np.ndarray) -> float | np.ndarray:
        """Accuracy after ``t`` rounds over *all* questions, as ``dspy.Evaluate`` scores them: a question whose round
        0 gave no answer is wrong (MarkovRefine raises RoundZeroError there), the others follow the chain. Equals
        :meth:`accuracy_at` when no round 0 failed.

        Example:
            >>> model = TransitionModel(n0_correct=5, n0_total=10, n_cc=0, n_cw=0, n_wc=0, n_ww=0, n0_failed=10)
            >>> round(model.accuracy_at(0), 3), round(model.expected_accuracy(0), 3)
            (0.5, 0.25)
        """
        return self.answer_rate * self.accuracy_at(t)

    def with_votes(self, votes: VoteModel | None) -> TransitionModel:
        """The same model with a vote model attached (or removed)."""
        return replace(self, votes=votes)

    def without_confidence(self) -> TransitionModel:
        """The same model without its confidence part (and types refitted without it are the caller's job)."""
        mixture = self.mixture
        if mixture is not None and mixture.confidence:
            mixture = replace(mixture, confidence=())
        return replace(self, confidence=None, mixture=mixture)

    def confidence_bins(self, confidences: Sequence[float | None]) -> list[int | None]:
        """The confidence bin of every value (all ``None`` when the model has no confidence part)."""
        if self.confidence is None:
            return [None] * len(confidences)
        return [bin_index(c, self.confidence.edges) for c in confidences]

    def evidence(self) -> Evidence:
        """The belief policy's model: question types (or the population chain), answer identities and confidence."""
        if not self.has_emissions:
            raise NotCalibratedError(
                "the belief filter needs answer-change rates (p_same_wrong, p_change_correct): calibrate with "
                "MarkovCalibrator, which records them"
            )
        if "evidence" not in self._cache:
            self._cache["evidence"] = self._build_evidence()
        return self._cache["evidence"]

    def _build_evidence(self) -> Evidence:
        if self.mixture is None:
            params = {name: np.array([[self._mean(name)]]) for name in PARAMETERS + EMISSIONS}
            return_rate = self.p_return if self.p_return is not None else 0.5  # saved before returns were tracked
            conf = None if self.confidence is None else self.confidence.probabilities()[None, None]
            return Evidence(
                np.ones((1, 1)),
                *(params[name] for name in ("p0", "p_cw", "p_wc", "p_same_wrong", "p_change_correct")),
                p_return=np.array([[return_rate]]),
                confidence=conf,
            )
        mix = self.mixture
        fields = ("weights", "p0", "p_cw", "p_wc", "p_same_wrong", "p_change_correct")
        return_rate = mix.p_return if mix.p_return else (0.5,) * mix.components  # saved before returns were tracked
        conf = np.array(mix.confidence)[None] if (mix.confidence and self.confidence is not None) else None
        return Evidence(
            *(np.array(getattr(mix, name))[None] for name in fields),
            p_return=np.array(return_rate)[None],
            confidence=conf,
        )

    def hidden_chains(self) -> HiddenChains:
        """The two-state same/changed chain(s) of :mod:`~markovscale_dspy.core.belief`: the question types if
        fitted, else the population chain (point estimates; the belief policy uses :meth:`evidence`)."""
        if not self.has_emissions:
            raise NotCalibratedError(
                "the belief filter needs answer-change rates (p_same_wrong, p_change_correct): calibrate with "
                "MarkovCalibrator, which records them"
            )
        if "hidden_chains" not in self._cache:
            self._cache["hidden_chains"] = (
                self.mixture.hidden_chains()
                if self.mixture is not None
                else HiddenChains.single(self.p0, self.p_cw, self.p_wc, self.p_same_wrong, self.p_change_correct)
            )
        return self._cache["hidden_chains"]

    @property
    def n_transitions(self) -> int:
        """Observed transitions (refinement rounds with a label on both sides)."""
        return self.n_cc + self.n_cw + self.n_wc + self.n_ww

    def standard_error(self, name: str) -> float:
        """Posterior standard deviation of ``name``."""
        return float(self.posterior(name).std())

    def interval(self, name: str, level: float = 0.95) -> tuple[float, float]:
        """Equal-tailed credible interval of ``name`` at ``level`` (e.g. 0.95)."""
        level = float(level)
        if not 0.0 < level < 1.0:
            raise ConfigurationError(f"level must be strictly between 0 and 1, got {level!r}")
        lo, hi = self.posterior(name).interval(level)
        return float(lo), float(hi)

    def prob_improves(self, n_samples: int = 200_000, seed: int = 0) -> float:
        """Posterior probability that refinement helps: ``P(p0 < p_wc / (p_cw + p_wc) | data)``.

        Monte Carlo over the three independent posteriors with a fixed seed, so the value is reproducible
        (standard error below 0.0012 at the default sample size).
        """
        key = ("prob_improves", n_samples, seed)
        if key not in self._cache:
            rng = np.random.default_rng(seed)
            p0, p_cw, p_wc = (self.posterior(name).rvs(size=n_samples, random_state=rng) for name in PARAMETERS)
            # p0 < p_wc / (p_cw + p_wc)  <=>  p_wc (1 - p0) > p_cw p0 (no division by a near-zero sum)
            self._cache[key] = float(np.mean(p_wc * (1.0 - p0) > p_cw * p0))
        return self._cache[key]

    # Theory on the point estimates -------------------------------------------------------------------------------

    def accuracy_at(self, t: int | np.ndarray) -> float | np.ndarray:
        """Predicted accuracy after ``t`` refinement rounds (see :func:`theory.accuracy_at`)."""
        return theory.accuracy_at(t, self.p0, self.p_cw, self.p_wc)

    def stationary_accuracy(self) -> float:
        """The bound refinement converges to (see :func:`theory.stationary_accuracy`)."""
        return theory.stationary_accuracy(self.p_cw, self.p_wc)

    def convergence_rate(self) -> float:
        """Per-round shrink factor of the distance to the bound (see :func:`theory.convergence_rate`)."""
        return theory.convergence_rate(self.p_cw, self.p_wc)

    def regime(self) -> str:
        """``"improving"``, ``"neutral"`` or ``"degrading"`` at the point estimates."""
        return theory.regime(self.p0, self.p_cw, self.p_wc)

    def optimal_rounds(self, round_cost: float = 0.0, max_rounds: int = 8) -> int:
        """Best number of refinement rounds for ``round_cost`` (see :func:`theory.optimal_rounds`)."""
        return theory.optimal_rounds(self.p0, self.p_cw, self.p_wc, round_cost=round_cost, max_rounds=max_rounds)

    def rounds_to_target(self, target: float, max_rounds: int | None = None) -> int | None:
        """Fewest rounds reaching ``target`` accuracy (see :func:`theory.rounds_to_target`)."""
        return theory.rounds_to_target(self.p0, self.p_cw, self.p_wc, target, max_rounds=max_rounds)

    # Serialisation -----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` restores an equal model. Estimates are included for readers."""
        return {
            "format": _FORMAT,
            "counts": {
                "n0_correct": self.n0_correct,
                "n0_total": self.n0_total,
                "n_cc": self.n_cc,
                "n_cw": self.n_cw,
                "n_wc": self.n_wc,
                "n_ww": self.n_ww,
                **({"n_cc_changed": self.n_cc_changed, "n_ww_same": self.n_ww_same} if self.has_emissions else {}),
                **(
                    {"n_return_hit": self.n_return_hit, "n_return_miss": self.n_return_miss}
                    if self.n_return_hit is not None
                    else {}
                ),
                **({"n0_failed": self.n0_failed} if self.n0_failed else {}),
            },
            "prior": list(self.prior),
            "estimates": {name: self._mean(name) for name in self._estimated()},
            **({"mixture": self.mixture.to_dict()} if self.mixture is not None else {}),
            **({"votes": self.votes.to_dict()} if self.votes is not None else {}),
            **({"confidence": self.confidence.to_dict()} if self.confidence is not None else {}),
        }

    def _estimated(self) -> tuple[str, ...]:
        return PARAMETERS + EMISSIONS if self.has_emissions else PARAMETERS

    @classmethod
    def from_dict(cls, data: Any) -> TransitionModel:
        """Rebuild a model from :meth:`to_dict` output, checking that it is well formed and self-consistent.

        Raises:
            StateError: the dict is not a transition model, has bad counts, or its estimates disagree with its
                counts (a hand-edited or corrupted file).
        """
        if not isinstance(data, dict) or data.get("format") not in _READS:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise StateError(f"not a transition model (expected format {_FORMAT!r}, found {found!r})")
        mixture = ChainMixture.from_dict(data["mixture"]) if data.get("mixture") is not None else None
        # States written before vote models or confidence existed have neither entry: they load as before.
        votes = VoteModel.from_dict(data["votes"]) if data.get("votes") is not None else None
        confidence = ConfidenceFit.from_dict(data["confidence"]) if data.get("confidence") is not None else None
        try:
            model = cls(
                **data["counts"], prior=tuple(data["prior"]), mixture=mixture, votes=votes, confidence=confidence
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"transition model has invalid counts or prior: {exc}") from None
        for name, value in (data.get("estimates") or {}).items():
            known = name in model._estimated()
            if not known or not isinstance(value, (int, float)) or abs(model._mean(name) - value) > 1e-9:
                raise StateError(
                    f"transition model estimate {name}={value!r} disagrees with its counts "
                    f"(which give {model._mean(name) if known else 'nothing'}); the state was edited "
                    "or corrupted: recalibrate, or restore the original file"
                )
        return model

    def __repr__(self) -> str:
        types = f", types={self.mixture.components}" if self.mixture is not None else ""
        votes = (
            f", votes=(mean {self.votes.mean_accuracy:.3f}, sd {self.votes.accuracy_sd:.3f}, "
            f"wrong agreement {self.votes.agreement:.3f})"
            if self.votes is not None
            else ""
        )
        failed = f", round0_failed={self.n0_failed}" if self.n0_failed else ""
        conf = ""
        if self.confidence is not None:
            score = "?" if self.confidence.auroc is None else f"{self.confidence.auroc:.2f}"
            conf = f", confidence_bins={self.confidence.bins}, confidence_auroc={score}"
        return (
            f"TransitionModel(p0={self.p0:.3f}, p_cw={self.p_cw:.3f}, p_wc={self.p_wc:.3f}, "
            f"chains={self.n0_total}, transitions={self.n_transitions}{failed}{types}{votes}{conf}, "
            f"regime={self.regime()!r})"
        )
