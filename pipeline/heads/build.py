r"""Building and fitting heads: :func:`make_head` turns a registered kind (or a scikit-learn
classifier's import path) into an estimator, the factories :data:`~pipeline.heads.registry.REGISTRY`
names build each kind, and :func:`fit_estimator` fits one with its failures as one-line
:class:`~pipeline.errors.ConfigError`\ s naming the head.
"""

from __future__ import annotations

import copy
import importlib
from numbers import Real
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, is_classifier
from sklearn.utils._param_validation import (
    Interval,
    InvalidParameterError,
    validate_parameter_constraints,
)
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.errors import ConfigError
from pipeline.heads.neural import FiLMClassifier, MLPHead, _at_least, _TorchHead
from pipeline.heads.registry import REGISTRY, check_kind

__all__ = ["check_params", "fit_estimator", "make_head", "require_probabilities"]


def check_params(est: Any, name: str) -> None:
    """Every step's parameters through the estimator's own validation (scikit-learn's
    ``_parameter_constraints``), before any pixel is read: a bad value is a
    :class:`ConfigError` naming the parameter, the value and what is allowed."""
    inner = getattr(est, "estimator", None)  # a self-training wrapper: it and what it wraps
    outer = [est] if inner is not None else []
    est = inner if inner is not None else est
    for step in outer + ([s for _, s in getattr(est, "steps", [])] or [est]):
        if hasattr(step, "_parameter_constraints") or isinstance(step, _EncodedXGB):
            try:
                step._validate_params()
            except InvalidParameterError as exc:
                raise ConfigError(f"bad parameter for head `{name}`: {exc}") from None


def require_probabilities(est: Any, name: str, needed_by: str) -> None:
    """A :class:`ConfigError` unless ``est`` gives class probabilities (``predict_proba``),
    which ``needed_by`` needs; before any pixel is read."""
    if not hasattr(est, "predict_proba"):
        raise ConfigError(
            f"head `{name}` gives no class probabilities, which {needed_by} needs (svm: add "
            "`probability: true` to its entry)"
        )


def fit_estimator(est: Any, X: np.ndarray, y: np.ndarray, name: str, **fit_params: Any) -> Any:
    """``est.fit(X, y, **fit_params)``, with a head's bad parameter value or failure to fit as
    one :class:`ConfigError` naming the head (scikit-learn checks parameters before any work).
    ``y = -1`` marks unlabelled rows (semi-supervised heads)."""
    classes = np.unique(y[y >= 0])
    if classes.size < 2:
        raise ConfigError(
            f"head `{name}`: the train pixels hold only one class ({classes.tolist()}); a "
            "classifier needs at least two"
        )
    try:
        return est.fit(X, y, **fit_params)
    except InvalidParameterError as exc:
        raise ConfigError(f"bad parameter for head `{name}`: {exc}") from None
    except (ValueError, TypeError) as exc:
        if isinstance(_final(getattr(est, "estimator", None) or est), _TorchHead):
            raise  # the torch heads' own code: a failure here is a bug, not a parameter
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"head `{name}` cannot be fitted with its parameters: {reason}") from None


def _final(est: Any) -> Any:
    steps = getattr(est, "steps", None)
    return steps[-1][1] if steps else est


# The factories pipeline.heads.registry.REGISTRY names ("pipeline.heads:film", ...): each takes the
# column counts, the seed and the head's parameters and returns the bare estimator.


def film(*, n_spectral: int, n_context: int, random_state: int, **params: Any) -> Any:
    return FiLMClassifier(
        n_spectral=n_spectral, n_context=n_context, random_state=random_state, **params
    )


def mlp(*, n_spectral: int, n_context: int, random_state: int, **params: Any) -> Any:
    return MLPHead(n_spectral=n_spectral, random_state=random_state, **params)


def svm(*, n_spectral: int, n_context: int, random_state: int, **params: Any) -> Any:
    from sklearn.svm import SVC

    params.setdefault("C", 100.0)
    params.setdefault("gamma", "scale")
    return SVC(class_weight="balanced", random_state=random_state, **params)


def rf(*, n_spectral: int, n_context: int, random_state: int, **params: Any) -> Any:
    from sklearn.ensemble import RandomForestClassifier

    params.setdefault("n_estimators", 300)
    return RandomForestClassifier(random_state=random_state, n_jobs=-1, **params)


def logreg(*, n_spectral: int, n_context: int, random_state: int, **params: Any) -> Any:
    from sklearn.linear_model import LogisticRegression

    params.setdefault("max_iter", 2000)
    return LogisticRegression(class_weight="balanced", **params)


def xgboost(*, n_spectral: int, n_context: int, random_state: int, **params: Any) -> Any:
    from xgboost import XGBClassifier

    # XGBoost's own rounds and step (300 rounds at 0.1 were 3x slower and no better); each
    # tree sees a tenth of the columns: with 5-10 labels per class that gained 3-14 points OA
    # over all columns (5 seeds, Indian Pines and SalinasA)
    params.setdefault("n_estimators", 100)
    params.setdefault("max_depth", 4)
    params.setdefault("learning_rate", 0.3)
    params.setdefault("colsample_bytree", 0.1)
    return _EncodedXGB(XGBClassifier(random_state=random_state, n_jobs=-1, **params))


def propagate(*, n_spectral: int, n_context: int, random_state: int, **params: Any) -> Any:
    from pipeline.heads.semisupervised import PropagationHead

    return PropagationHead(random_state=random_state, **params)


def make_head(
    name: str, *, n_spectral: int, n_context: int = 0, random_state: int = 0, **params: Any
) -> Any:
    """Build the head kind ``name`` (see :data:`REGISTRY`) or a classifier by import path.

    Args:
        name: a :data:`REGISTRY` key, or ``package.module.Class`` of a scikit-learn classifier.
        n_spectral: spectral columns at the front of ``X`` (for ``film``).
        n_context: context columns after them (``film`` feeds them to its spectral branch; every
            other head reads them as columns like any other).
        random_state: seed.
        **params: the head's keyword arguments; heads with ``preprocess`` also take ``pca``
            (components fitted on the train pixels; ``None`` = none). ``use`` is consumed by
            the caller.

    Raises:
        ConfigError: unknown name or parameter.
    """
    params = dict(params)
    spec = REGISTRY.get(name)
    if spec is None and "." not in name:
        check_kind(name)
    pca = params.pop("pca", None) if spec is None or spec.preprocess else None
    try:
        if spec is None:
            est = _by_import_path(name, random_state, params)
        else:
            est = spec.build(
                n_spectral=n_spectral, n_context=n_context, random_state=random_state, **params
            )
    except TypeError as exc:
        raise _bad_parameter(name, params, exc, n_spectral, n_context) from None
    if spec is not None and not spec.preprocess:
        return est
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps: list[Any] = []
    if pca or spec is None or not spec.scale_free:
        steps.append(StandardScaler())
    if pca:
        steps.append(PCA(n_components=int(pca), random_state=random_state))
    return make_pipeline(*steps, est)


def _bad_parameter(
    name: str, params: dict[str, Any], exc: TypeError, n_spectral: int, n_context: int
) -> ConfigError:
    """The ConfigError for a head that refused its parameters: the first unknown one, with the
    nearest name it could have meant, when they can be told; else the head's own words."""
    try:
        bare = (
            REGISTRY[name].build(n_spectral=n_spectral, n_context=n_context, random_state=0)
            if name in REGISTRY
            else _by_import_path(name, 0, {})
        )
        known = sorted(set(bare.get_params(deep=False)) - _SET_BY_HSICACHE)
    except Exception:  # the head's own message is still a good answer
        return ConfigError(f"bad parameter for head `{name}`: {exc}")
    unknown = [k for k in params if k not in known]
    if not unknown:
        return ConfigError(f"bad parameter for head `{name}`: {exc}")
    return _no_such_parameter(name, unknown[0], known)


#: What hsicache passes to a head itself, never from an entry.
_SET_BY_HSICACHE = {"n_spectral", "n_context", "random_state"}

#: An entry's own keys: a misspelt one reaches the head as an unknown parameter.
_RECIPE_KEYS = ("kind", "use", "context", "timesteps", "sites", "self_training", "select", "pca")


def _no_such_parameter(name: str, key: str, known: list[str]) -> ConfigError:
    """``key`` is not a parameter of head ``name``: the nearest of ``known`` or of an entry's
    own keys, else every one of ``known``. The key is quoted, not backticked: it is the
    user's word, not one of the command's options."""
    import difflib

    close = difflib.get_close_matches(key, [*known, *_RECIPE_KEYS], n=1)
    hint = f'did you mean "{close[0]}"?' if close else "it takes " + ", ".join(known)
    return ConfigError(f'head `{name}` has no parameter "{key}": {hint}')


def _by_import_path(path: str, random_state: int, params: dict[str, Any]) -> Any:
    module_name, _, cls_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError):
        raise ConfigError(f"cannot import head `{path}`") from None
    if not (isinstance(cls, type) and issubclass(cls, BaseEstimator) and hasattr(cls, "predict")):
        raise ConfigError(f"`{path}` is not a scikit-learn estimator class")
    est = cls(**params)
    if not is_classifier(est):  # a clusterer or regressor would score its outputs as classes
        raise ConfigError(
            f"`{path}` is not a classifier (scikit-learn's `is_classifier`): a head predicts "
            "class labels; a clusterer's or regressor's outputs are not classes"
        )
    if "random_state" in est.get_params() and "random_state" not in params:
        est.set_params(random_state=random_state)
    return est


_XGB_CONSTRAINTS: dict[str, list[Any]] = {
    "n_estimators": [_at_least(1)],
    "max_depth": [_at_least(0), None],
    "learning_rate": [Interval(Real, 0, None, closed="neither"), None],
    "colsample_bytree": [Interval(Real, 0, 1, closed="right"), None],
    "subsample": [Interval(Real, 0, 1, closed="right"), None],
    "min_child_weight": [Interval(Real, 0, None, closed="left"), None],
    "reg_lambda": [Interval(Real, 0, None, closed="left"), None],
    "reg_alpha": [Interval(Real, 0, None, closed="left"), None],
}


class _EncodedXGB(ClassifierMixin, BaseEstimator):
    """XGBoost with any class labels (it wants 0..K-1), as a scikit-learn classifier."""

    def __init__(self, model: Any = None) -> None:
        self.model = model

    def _validate_params(self) -> None:
        params = self.model.get_params()  # XGBoost checks none of these itself
        validate_parameter_constraints(
            {k: v for k, v in _XGB_CONSTRAINTS.items() if k in params},
            {k: params[k] for k in _XGB_CONSTRAINTS if k in params},
            caller_name=type(self.model).__name__,
        )

    def fit(self, X: Any, y: Any) -> _EncodedXGB:
        self._validate_params()
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        self.model_ = copy.deepcopy(self.model)
        self.model_.fit(X, codes)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False)
        proba = self.model_.predict_proba(X)
        if proba.shape[1] != len(self.classes_):  # one class: xgboost returns one column
            proba = np.ones((len(X), 1))
        return proba

    def predict(self, X: Any) -> np.ndarray:
        proba = self.predict_proba(X)  # checks fitted first
        return self.classes_[np.argmax(proba, axis=1)]
