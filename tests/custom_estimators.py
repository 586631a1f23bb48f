"""A classifier from outside scikit-learn, named by import path in the tests."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin


class NearestMean(ClassifierMixin, BaseEstimator):
    """Assigns each row to the class with the nearest mean."""

    def __init__(self, shrink: float = 0.0) -> None:
        self.shrink = shrink

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        self.means_ = np.stack([X[y == c].mean(axis=0) for c in self.classes_])
        self.means_ *= 1 - self.shrink
        return self

    def predict(self, X):
        d = ((np.asarray(X)[:, None, :] - self.means_[None]) ** 2).sum(axis=-1)
        return self.classes_[np.argmin(d, axis=1)]


def nearest_mean(*, n_spectral: int, n_context: int, random_state: int, **params):
    """A head factory for the registry test: ``NearestMean`` with its parameters."""
    return NearestMean(**params)
