"""``probe``: which cached arrays and context families are worth reading on *this* scene.

Every cached (timestep, site) array and every context family is scored alone by a linear probe
(standardised columns, class-balanced logistic regression), then the best of them in pairs. The
score that ranks them is stratified k-fold cross-validation **on the train pixels alone**, over
the scene's split protocol re-drawn for each seed; the test pixels' accuracy of the same probe
fitted on all train pixels (on a seeded sample of 20,000 test pixels per seed at most) is
reported in its own column and never ranks anything. The best
selection that ``train`` can express (context families, and cached arrays forming a
timesteps x sites product) of each kind — context families, cached arrays — is recommended as
flags.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, HsicacheWarning
from pipeline.utils.checks import check_int, check_seeds

__all__ = [
    "PROBE_KEYS",
    "Candidate",
    "as_entry",
    "as_flags",
    "candidates",
    "probe",
    "recommend",
    "run_probe",
]

#: The fields of every row ``probe --json`` prints.
PROBE_KEYS = ("selection", "cv_mean", "cv_std", "test_oa_mean", "test_oa_std", "columns")


@dataclass(frozen=True)
class Candidate:
    """Features a probe reads: context families and/or cached ``(timestep, site)`` arrays, or
    the spectrum (a reference row)."""

    context: tuple[str, ...] = ()
    arrays: tuple[tuple[int, str], ...] = ()
    spectrum: bool = False

    @property
    def name(self) -> str:
        return "+".join(self.parts())

    def parts(self) -> list[str]:
        """The single candidates this one joins."""
        return (
            (["spectrum"] if self.spectrum else [])
            + list(self.context)
            + [f"t{t}:{s}" for t, s in self.arrays]
        )

    def __add__(self, other: Candidate) -> Candidate:
        return Candidate(
            self.context + other.context,
            self.arrays + other.arrays,
            self.spectrum or other.spectrum,
        )

    def flags(self) -> dict[str, list[Any]] | None:
        """``train``'s ``context``/``timesteps``/``sites`` for this selection, or ``None``
        when its arrays are not a timesteps x sites product (or it reads the spectrum alone)."""
        ts = sorted({t for t, _ in self.arrays})
        ss = list(dict.fromkeys(s for _, s in self.arrays))
        if self.arrays and len(ts) * len(ss) != len(set(self.arrays)):
            return None
        if not self.context and not self.arrays:
            return None
        return {"context": list(self.context), "timesteps": ts, "sites": ss}


def candidates(inputs: Any) -> list[Candidate]:
    """The spectrum, every context family of the context store and every cached array."""
    out = [Candidate(spectrum=True)]
    if inputs.context is not None:
        out += [Candidate(context=(f,)) for f in inputs.context.families]
    if inputs.cache is not None:
        out += [
            Candidate(arrays=((int(t), s),))
            for t in inputs.cache.timesteps
            for s in inputs.cache.sites
        ]
    return out


def _columns(inputs: Any, single: Candidate, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The labelled pixels' features of one single candidate."""
    if single.spectrum:
        return inputs.scene.cube[rows, cols].astype(np.float32)
    if single.context:
        return inputs.context.gather(rows, cols, single.context)
    ((t, s),) = single.arrays
    return inputs.cache.gather(rows, cols, timesteps=[t], sites=[s])


def _probe_model(seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    lr = LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed)
    return make_pipeline(StandardScaler(), lr)


def _score(
    X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int, folds: int
) -> tuple[float, float]:
    """(cross-validated accuracy on the train rows, accuracy on the test rows) of the probe."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    ytr = y[train]
    k = min(folds, int(np.unique(ytr, return_counts=True)[1].min()) if ytr.size else 0)
    if k < 2:
        raise ConfigError(
            "`per_class` must give every class at least 2 train pixels for cross-validation"
        )
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    cv_acc = float(cross_val_score(_probe_model(seed), X[train], ytr, cv=cv).mean())
    fitted = _probe_model(seed).fit(X[train], ytr)
    return cv_acc, float((fitted.predict(X[test]) == y[test]).mean())


#: Test pixels per seed the test column is measured on (a seeded sample above it): the probe's
#: memory is the train pixels plus this, whatever the number of labelled pixels.
_TEST_SAMPLE = 20_000


def _sample(mask: np.ndarray, most: int, seed: int) -> np.ndarray:
    """``mask`` with at most ``most`` of its pixels, a seeded sample."""
    flat = np.flatnonzero(mask.ravel())
    if flat.size <= most:
        return mask
    keep = np.zeros(mask.size, dtype=bool)
    keep[np.random.default_rng(seed).choice(flat, most, replace=False)] = True
    return keep.reshape(mask.shape)


def probe(
    inputs: Any,
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    per_class: int | None = None,
    folds: int = 5,
    pairs_of: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Rank the candidates (:func:`candidates`) by cross-validation on the train pixels.

    Args:
        inputs: the scene with its feature cache and/or context store
            (:func:`pipeline.heads.training.open_inputs`).
        seeds: split seeds (the scene's protocol re-drawn for each).
        per_class: train pixels per class (default: the scene's split).
        folds: cross-validation folds (fewer when a class has fewer train pixels).
        pairs_of: the best this many single candidates (the spectrum excepted) are also
            scored in every pair.

    Returns:
        ``rows`` (best first; :data:`PROBE_KEYS`), ``recommended`` (:func:`recommend`) and
        ``protocol``.
    """
    from pipeline.evaluation.scoring import protocol_card

    _check_probe(inputs, seeds, per_class, folds, pairs_of)
    card = protocol_card(inputs.scene, seeds, per_class, varies=_PROBE_SEEDS)
    clustered = _clustered_note(inputs.scene, per_class)
    if clustered:
        card["cv_note"] = clustered
    for note in filter(None, (card.get("split_note"), clustered)):
        warnings.warn(note, HsicacheWarning, stacklevel=2)
    rows, cols, y, splits = _draws(inputs.scene, seeds, per_class)
    singles = candidates(inputs)
    blocks = {c.name: _columns(inputs, c, rows, cols) for c in singles}
    total = len(singles) + pairs_of * (pairs_of - 1) // 2
    done = [0]

    def scored(cand: Candidate) -> dict[str, Any]:
        row = _scored(cand, blocks, y, splits, folds)
        done[0] += 1
        if progress:
            progress(done[0], total)
        return row

    rows_out = [scored(c) for c in singles]
    best = sorted(
        (r for r in rows_out if not r["candidate"].spectrum), key=lambda r: -r["cv_mean"]
    )[:pairs_of]
    rows_out += [
        scored(a["candidate"] + b["candidate"]) for a, b in itertools.combinations(best, 2)
    ]
    rows_out.sort(key=lambda r: (-r["cv_mean"], r["columns"]))
    card["ranking"] = (
        f"{folds}-fold stratified cross-validation of a linear probe on the train pixels alone; "
        "test_oa is reported beside it and never ranks"
    )
    return {"rows": rows_out, "recommended": recommend(rows_out), "protocol": card}


#: What probe's seeds vary on a fixed split (:func:`~pipeline.evaluation.scoring.split_note`).
_PROBE_SEEDS = "the cross-validation folds and the sample of test pixels"


def _clustered_note(sc: Any, per_class: int | None) -> str | None:
    """A warning for a split whose train pixels lie together (``official`` fields, ``blocks``):
    cross-validation among them rates what neighbouring pixels share (wide context, diffusion
    features) higher than the test pixels, which lie elsewhere, will."""
    protocol = sc.split_protocol
    if protocol == "blocks" or (protocol == "official" and per_class is None):
        return (
            f"on a {protocol} split the train pixels lie together, and cross-validation among "
            "them favours what neighbouring pixels share (wide context windows, diffusion "
            "features), which may not carry over to test pixels that lie elsewhere"
        )
    return None


def _check_probe(
    inputs: Any, seeds: Sequence[int], per_class: int | None, folds: int, pairs_of: int
) -> None:
    check_seeds("seeds", seeds)
    check_int("folds", folds, low=2)
    check_int("pairs_of", pairs_of, low=0)
    if per_class is not None:
        check_int("per_class", per_class, low=2)
    if inputs.context is None and inputs.cache is None:
        raise ConfigError("nothing to probe: give a feature cache and/or a context store")


def _draws(
    sc: Any, seeds: Sequence[int], per_class: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, np.ndarray, np.ndarray]]]:
    """The pixels any split draw uses (rows, columns, labels) and, per seed, the positions of
    its train pixels and of its sampled test pixels among them."""
    from pipeline.evaluation.scoring import resplit

    draws = []
    for seed in seeds:
        train, test = resplit(sc, seed, per_class)
        draws.append((seed, train, _sample(test, _TEST_SAMPLE, seed)))
    read = np.zeros(sc.shape, dtype=bool)  # only these pixels' features are read
    for _, train, test in draws:
        read |= train | test
    rows, cols = np.nonzero(read)
    position = np.full(sc.shape, -1, dtype=np.int64)
    position[rows, cols] = np.arange(rows.size)
    splits = [(seed, position[train], position[test]) for seed, train, test in draws]
    return rows, cols, sc.labels[rows, cols], splits


def _scored(
    cand: Candidate,
    blocks: dict[str, np.ndarray],
    y: np.ndarray,
    splits: list[tuple[int, np.ndarray, np.ndarray]],
    folds: int,
) -> dict[str, Any]:
    """One candidate's row: cross-validated and test accuracy over the split draws."""
    X = np.concatenate([blocks[p] for p in cand.parts()], axis=1)
    runs = np.array([_score(X, y, tr, te, seed, folds) for seed, tr, te in splits])
    return {
        "selection": cand.name,
        "cv_mean": float(runs[:, 0].mean()),
        "cv_std": float(runs[:, 0].std()),
        "test_oa_mean": float(runs[:, 1].mean()),
        "test_oa_std": float(runs[:, 1].std()),
        "columns": int(X.shape[1]),
        "candidate": cand,
    }


def recommend(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best-ranked context selection and the best-ranked cached-array selection that
    ``train`` can read as they are (each alone or a pair; a pair of arrays only when it is a
    timesteps x sites product), joined into one set of flags."""
    best: dict[str, Any] = {}
    for r in rows:
        cand = r["candidate"]
        flags = cand.flags()
        if flags is None or (cand.context and cand.arrays):
            continue
        kind = "context" if cand.context else "arrays"
        best.setdefault(kind, (r, flags))
    if not best:
        return None
    ctx = best.get("context", (None, {"context": []}))
    arr = best.get("arrays", (None, {"timesteps": [], "sites": []}))
    flags = {
        "context": ctx[1]["context"],
        "timesteps": arr[1]["timesteps"],
        "sites": arr[1]["sites"],
    }
    chosen = [r for r, _ in best.values()]
    return {
        "selection": " + ".join(r["selection"] for r in chosen),
        **flags,
        "cv_mean": {r["selection"]: r["cv_mean"] for r in chosen},
        "flags": as_flags(flags),
        "entry": as_entry(flags),
    }


def as_entry(flags: dict[str, list[Any]]) -> str:
    """The same selection as YAML keys of a ``heads:`` entry, one per line (``context: [a,
    b]``, ``timesteps: [0]``, ``sites: [s]``), which ``compare``, ``curve`` and ``train
    --params`` read."""
    return "\n".join(
        f"{k}: [{', '.join(str(v) for v in vals)}]" for k, vals in flags.items() if vals
    )


def as_flags(flags: dict[str, list[Any]]) -> str:
    """``--context a,b --timesteps 0 --sites s`` for a selection."""
    out = []
    if flags["context"]:
        out.append("--context " + ",".join(flags["context"]))
    if flags["timesteps"]:
        out.append("--timesteps " + ",".join(str(t) for t in flags["timesteps"]))
        out.append("--sites " + ",".join(flags["sites"]))
    return " ".join(out)


def run_probe(
    *,
    scene: Any,
    cache: Any = None,
    context: Any = None,
    out: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """Open the stores, check ``out`` (a JSON file) before any work, :func:`probe`, write it.

    ``options`` are :func:`probe`'s keyword arguments.
    """
    import json

    from pipeline.evaluation.scoring import METRICS_FORMAT
    from pipeline.heads.training import open_inputs
    from pipeline.io.outputs import PROBE_METRICS, check_outputs
    from pipeline.io.store import atomic_output, jsonable

    check_outputs(
        {"out": (out, PROBE_METRICS)},
        {"scene": scene, "cache": cache, "context": context},
    )
    result = probe(open_inputs(scene, cache, context), **options)
    result["rows"] = [{k: v for k, v in r.items() if k != "candidate"} for r in result["rows"]]
    if out is not None:
        body = {"format": METRICS_FORMAT, "kind": "probe", **result}
        with atomic_output(out, PROBE_METRICS, option="out") as tmp:
            tmp.write_text(json.dumps(jsonable(body), indent=2))
    return result
