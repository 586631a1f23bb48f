"""Choosing a head's context families and parameters per scene, on its train pixels alone.

A head entry's ``select:`` lists candidates (``context: [[mean7], [mean7, mean15]]``,
``n_neighbors: [5, 10]``); :class:`TrainCVSelect` scores every combination by cross-validation
on the train pixels — each class's train pixels are dealt into ``folds`` seeded folds, one fold
is hidden at a time — and refits the best on all of them. A head fitted on every pixel of the
scene (label spreading) is refitted on the same pixels with the hidden fold's labels removed
and scored on its transduction there; any other head is fitted on the rest of the train pixels.
The score is the accuracy on the hidden pixels, ties broken by the mean probability the head
gives their true class, further ties by the candidates' order. Test pixels are never read.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.validation import check_is_fitted

from pipeline.errors import ConfigError

__all__ = ["TrainCVSelect", "candidate_grid", "check_select"]


def check_select(name: str, select: Any) -> dict[str, Any]:
    """The ``select`` section of head ``name``, checked: every value a non-empty list (of
    family lists for ``context``), ``folds`` an integer of at least 2 (default 5)."""
    if not isinstance(select, Mapping) or not select:
        raise ConfigError(f"`select` of head `{name}` must map parameters to candidate lists")
    out = dict(select)
    folds = out.pop("folds", 5)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"`select.folds` of head `{name}` must be an integer >= 2, not {folds!r}")
    for key, values in out.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"`select.{key}` of head `{name}` must be a non-empty list of candidates, "
                f"got {values!r}"
            )
    for fams in out.get("context", []):
        if not isinstance(fams, list) or not all(isinstance(f, str) for f in fams):
            raise ConfigError(
                f"`select.context` of head `{name}` must list lists of family names, got {fams!r}"
            )
    return {**out, "folds": folds}


def candidate_grid(select: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the candidates, in order (the first key varies slowest)."""
    keys = [k for k in select if k != "folds"]
    return [
        dict(zip(keys, combo, strict=True))
        for combo in itertools.product(*(select[k] for k in keys))
    ]


class TrainCVSelect(ClassifierMixin, BaseEstimator):
    """Pick the best of ``grid`` by cross-validation on the labelled rows, then refit it.

    Args:
        estimator: the unfitted head; each candidate sets its parameters.
        grid: candidates, each a dict of head parameters and optionally ``context`` (the
            families whose columns it reads).
        groups: ``family -> (start, stop)`` columns of the context families in ``X``; the
            other columns (spectrum, cached features) are always read.
        transductive: the head is fitted on every row (``y = -1`` off the labelled ones): hide
            a fold's labels instead of its rows.
        folds: folds per class.
        random_state: seed of the folds.
    """

    def __init__(
        self,
        estimator: Any = None,
        grid: Sequence[dict[str, Any]] = (),
        groups: Mapping[str, tuple[int, int]] | None = None,
        transductive: bool = False,
        folds: int = 5,
        random_state: int = 0,
    ) -> None:
        self.estimator = estimator
        self.grid = grid
        self.groups = groups
        self.transductive = transductive
        self.folds = folds
        self.random_state = random_state

    def _columns(self, n_features: int, families: Sequence[str] | None) -> np.ndarray:
        keep = np.ones(n_features, dtype=bool)
        if families is not None:
            for fam, (start, stop) in (self.groups or {}).items():
                keep[start:stop] = fam in families
        return np.flatnonzero(keep)

    def _candidate(self, params: dict[str, Any], n_features: int) -> tuple[Any, np.ndarray]:
        """The candidate's unfitted head (its values set on the final step of a pipeline) and
        the columns it reads."""
        head = {k: v for k, v in params.items() if k != "context"}
        est = clone(self.estimator)
        steps = getattr(est, "steps", None)
        final = steps[-1][1] if steps else est
        families = params.get("context")
        if families is not None and "n_context" in final.get_params():
            groups = (self.groups or {}).items()
            head["n_context"] = sum(b - a for f, (a, b) in groups if f in families)
        final.set_params(**head)
        return est, self._columns(n_features, families)

    def _fold_of(self, y: np.ndarray) -> np.ndarray:
        """Each labelled row's fold (-1 for unlabelled rows): a class's rows dealt in turn."""
        rng = np.random.default_rng(self.random_state)
        fold = np.full(len(y), -1)
        for c in np.unique(y[y >= 0]):
            rows = np.flatnonzero(y == c)
            fold[rows] = rng.permutation(len(rows)) % self.folds
        return fold

    def _fit_without(self, est: Any, X: np.ndarray, y: np.ndarray, hidden: np.ndarray) -> Any:
        """``est`` fitted with the labels of the ``hidden`` rows withheld."""
        if self.transductive:  # same rows, the hidden labels removed
            y_fit = y.copy()
            y_fit[hidden] = -1
            return clone(est).fit(X, y_fit)
        keep = np.ones(len(y), dtype=bool)
        keep[hidden] = False
        return clone(est).fit(X[keep], y[keep])

    def _score(
        self, est: Any, X: np.ndarray, y: np.ndarray, fold: np.ndarray
    ) -> tuple[float, float]:
        """Accuracy on the hidden folds, and the mean probability given to the true class (0
        for a class the fit never saw)."""
        hits, probs = [], []
        for f in range(self.folds):
            hidden = np.flatnonzero(fold == f)
            if hidden.size == 0 or np.unique(y[(y >= 0) & (fold != f)]).size < 2:
                continue  # nothing hidden, or too few labels left to fit: says nothing
            fitted = self._fit_without(est, X, y, hidden)
            proba = np.asarray(fitted.predict_proba(X[hidden]))
            column = {c: i for i, c in enumerate(fitted.classes_)}
            truth = np.array([column.get(c, -1) for c in y[hidden]])
            hits += list(proba.argmax(1) == truth)
            probs += list(np.where(truth >= 0, proba[np.arange(hidden.size), truth], 0.0))
        if not hits:
            return 0.0, 0.0
        return float(np.mean(hits)), float(np.mean(probs))

    def fit(
        self, X: Any, y: Any, progress: Callable[[int, int], None] | None = None
    ) -> TrainCVSelect:
        """Cross-validate every candidate, then refit the best on every row; ``progress(done,
        total)`` is called after each candidate's folds and after the refit."""
        X, y = np.asarray(X), np.asarray(y)
        if not self.grid:
            raise ConfigError("`select` needs at least one candidate")
        fold = self._fold_of(y)
        results = []
        for k, params in enumerate(self.grid):
            est, cols = self._candidate(params, X.shape[1])
            accuracy, probability = self._score(est, X[:, cols], y, fold)
            if progress:
                progress(k + 1, len(self.grid) + 1)
            results.append(
                {"params": dict(params), "accuracy": accuracy, "probability": probability}
            )
        best = max(
            range(len(results)),
            key=lambda i: (results[i]["accuracy"], results[i]["probability"], -i),
        )
        self.cv_results_ = results
        self.best_params_ = dict(self.grid[best])
        est, self.columns_ = self._candidate(self.best_params_, X.shape[1])
        self.estimator_ = est.fit(X[:, self.columns_], y)
        self.classes_ = self.estimator_.classes_
        self.n_features_in_ = X.shape[1]
        if progress:
            progress(len(self.grid) + 1, len(self.grid) + 1)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "estimator_")
        return self.estimator_.predict_proba(np.asarray(X)[:, self.columns_])

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "estimator_")
        return self.estimator_.predict(np.asarray(X)[:, self.columns_])
