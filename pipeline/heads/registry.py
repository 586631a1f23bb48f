"""The registry of head kinds: one place that says, for every kind, how it is built, what it
reads, how its input is preprocessed and how ``help`` describes it.

Torch-free, so the command line starts fast; a head's factory (in :mod:`pipeline.heads.build`
or :mod:`pipeline.heads.semisupervised`) is imported only when a head is built. Every list of head
names (``HEADS``, ``help``, the "unknown head" message) derives from :data:`REGISTRY`;
:func:`register` adds a kind.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError

__all__ = [
    "FEATURE_MODES",
    "HEADS",
    "REGISTRY",
    "HeadSpec",
    "check_kind",
    "head_help",
    "register",
]

FEATURE_MODES = ("spectral", "spatial", "both")


@dataclass(frozen=True)
class HeadSpec:
    """A registered head kind.

    Attributes:
        name: the kind (``kind:`` of a ``heads:`` entry, ``head``).
        factory: ``"module:function"``; the function takes ``n_spectral=``, ``n_context=``,
            ``random_state=`` and the head's parameters and returns the estimator.
        reads: the feature mode it always reads, or ``None`` for a classic head, which takes
            ``use: spectral|spatial|both`` (default ``both``).
        preprocess: wrap it in ``StandardScaler`` (and ``PCA`` for a ``pca:`` parameter),
            fitted on the train pixels; off for heads that normalise themselves.
        scale_free: with ``preprocess``, skip the scaler unless ``pca`` asks for it (trees
            split on thresholds: scaling changes nothing).
        help: one line describing it.
        unlabeled: ``"all"`` for a head fitted on every pixel of the scene (``y = -1`` for
            the unlabelled ones), ``None`` for one fitted on its train pixels.
    """

    name: str
    factory: str
    reads: str | None = None
    preprocess: bool = True
    scale_free: bool = False
    help: str = ""
    unlabeled: str | None = None

    def build(self, **kwargs: Any) -> Any:
        """The estimator, from the factory."""
        module, _, function = self.factory.partition(":")
        return getattr(importlib.import_module(module), function)(**kwargs)


#: Every head kind, by name.
REGISTRY: dict[str, HeadSpec] = {}


def register(spec: HeadSpec) -> HeadSpec:
    """Add (or replace) a head kind."""
    if spec.reads is not None and spec.reads not in FEATURE_MODES:
        raise ConfigError(f"head kind `{spec.name}`: `reads` must be one of {FEATURE_MODES}")
    REGISTRY[spec.name] = spec
    return spec


_HEADS = "pipeline.heads.build"
for _spec in (
    HeadSpec(
        "film",
        f"{_HEADS}:film",
        "both",
        preprocess=False,
        help="the paper's FiLM: the spectrum (and context) modulate the diffusion features",
    ),
    HeadSpec(
        "concat",
        f"{_HEADS}:mlp",
        "both",
        preprocess=False,
        help="an MLP on the spectrum and the diffusion features",
    ),
    HeadSpec(
        "spatial",
        f"{_HEADS}:mlp",
        "spatial",
        preprocess=False,
        help="an MLP on the diffusion features",
    ),
    HeadSpec(
        "spectral", f"{_HEADS}:mlp", "spectral", preprocess=False, help="an MLP on the spectrum"
    ),
    HeadSpec("svm", f"{_HEADS}:svm", help="RBF SVM (scikit-learn)"),
    HeadSpec("rf", f"{_HEADS}:rf", scale_free=True, help="random forest (scikit-learn)"),
    HeadSpec("logreg", f"{_HEADS}:logreg", help="logistic regression (scikit-learn)"),
    HeadSpec(
        "xgboost", f"{_HEADS}:xgboost", scale_free=True, help="gradient-boosted trees (XGBoost)"
    ),
    HeadSpec(
        "propagate",
        f"{_HEADS}:propagate",
        preprocess=False,
        unlabeled="all",
        help="label spreading over every pixel of the scene",
    ),
):
    register(_spec)


class _Heads(Mapping[str, "str | None"]):
    """Each registered kind -> the feature mode it always reads (``None``: ``use``); a live
    view of :data:`REGISTRY`."""

    def __getitem__(self, name: str) -> str | None:
        return REGISTRY[name].reads

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


#: Which part of ``[spectrum | spatial]`` each registered head reads; classic heads take ``use``.
HEADS: Mapping[str, str | None] = _Heads()


def check_kind(kind: str) -> str:
    """``kind`` if it names a head (a :data:`REGISTRY` key or an import path)."""
    if kind not in REGISTRY and "." not in kind:
        raise ConfigError(
            f"unknown head `{kind}`: choose one of {', '.join(REGISTRY)} or give a scikit-learn "
            "classifier's import path (sklearn.ensemble.ExtraTreesClassifier)"
        )
    return kind


def head_help() -> str:
    """The ``head`` help: every registered kind, and the other ways to name a head."""
    return (
        " | ".join(REGISTRY)
        + " | an import path such as sklearn.ensemble.ExtraTreesClassifier | a name under "
        "`heads:` in `--params` whose `kind` is one of those."
    )
