"""``suggest``: the next pixels to label, and a simulation of the labelling loop.

A head's recipe is fitted on the scene's train pixels (with its unlabelled pixels when it is a
semi-supervised head) and scores every candidate pixel — every pixel that is not a train pixel,
or a seeded sample of ``pool`` of them — by **uncertainty**: ``1 - margin``, the margin being the
gap between its two most probable classes. Of the most uncertain candidates (``10 n``, at least
500), ``n`` are chosen for **diversity** by k-centre greedy selection in the head's standardised,
PCA-reduced feature space (each pick is the candidate farthest from every labelled and already
picked pixel), **spread over the predicted classes** (at most ``ceil(n / classes)`` per predicted
class while other classes still have candidates).

:func:`simulate` runs the loop against the scene's ground truth: each round adds the suggested
pixels with their true labels and refits, next to random picks with the same budget, over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.utils.checks import check_int, check_seed, check_seeds

__all__ = [
    "choose",
    "pixel_coordinates",
    "run_simulation",
    "run_suggest",
    "simulate",
    "suggest_pixels",
]

_PCA = 16  # dimensions of the diversity space
#: What the simulation's seeds vary on a fixed split (see scoring.split_note).
_SIMULATION_SEEDS = "the halves of the test pixels (one the loop may label, one that scores it)"


def _fit(
    inputs: Any, name: str, params: dict[str, Any], selection: Any, train: np.ndarray, seed: int
) -> tuple[Any, np.ndarray]:
    """The recipe fitted on the ``train`` pixels (and its unlabelled pixels, for a
    semi-supervised head), with the labelled pixels' features."""
    from pipeline.heads.build import fit_estimator
    from pipeline.heads.training import assemble, build_head, fit_rows, split_recipe, unwrap

    recipe = split_recipe(name, params)
    est = build_head(recipe, inputs, selection, seed)
    rows, cols, y = fit_rows(inputs.scene, train, recipe.unlabeled(), seed)
    X, _ = assemble(inputs, rows, cols, selection)
    est, _ = unwrap(fit_estimator(est, X, y, name))
    return est, X[y >= 0]


def _features(inputs: Any, flat: np.ndarray, selection: Any) -> np.ndarray:
    from pipeline.heads.training import assemble

    rows, cols = np.unravel_index(flat, inputs.scene.shape)
    return assemble(inputs, rows, cols, selection)[0]


def choose(
    proba: np.ndarray,
    features: np.ndarray,
    labelled: np.ndarray,
    n: int,
    *,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` candidate rows to label (module docstring) and every candidate's uncertainty.

    Args:
        proba: ``(N, C)`` class probabilities of the candidates.
        features: ``(N, D)`` their features; ``labelled``: ``(M, D)`` the labelled pixels'.
        n: how many to choose (at most ``N``).
    """
    top2 = np.sort(proba, axis=1)[:, -2:] if proba.shape[1] > 1 else np.c_[proba * 0, proba]
    uncertainty = 1.0 - (top2[:, 1] - top2[:, 0])
    shortlist = np.argsort(-uncertainty, kind="stable")[: max(10 * n, 500)]
    space = _diversity_space(features[shortlist], labelled, seed)
    Z, L = space[: shortlist.size], space[shortlist.size :]
    nearest = _min_distance(Z, L) if len(L) else np.full(shortlist.size, np.finfo(float).max)
    predicted = proba[shortlist].argmax(axis=1)
    cap = math.ceil(n / max(1, np.unique(predicted).size))
    taken = np.zeros(proba.shape[1], dtype=np.int64)
    picks: list[int] = []
    while len(picks) < n:
        open_ = (taken[predicted] < cap) & np.isfinite(nearest)
        if not open_.any():
            open_ = np.isfinite(nearest)  # every class has its share: take the farthest
        j = int(np.argmax(np.where(open_, nearest + 1e-9 * uncertainty[shortlist], -np.inf)))
        picks.append(j)
        taken[predicted[j]] += 1
        nearest = np.minimum(nearest, _min_distance(Z, Z[j : j + 1]))
        nearest[j] = -np.inf  # never twice
    return shortlist[np.asarray(picks, dtype=np.int64)], uncertainty


def _diversity_space(candidates: np.ndarray, labelled: np.ndarray, seed: int) -> np.ndarray:
    """Candidates then labelled rows, standardised and reduced to :data:`_PCA` components."""
    from sklearn.decomposition import PCA

    both = np.concatenate([candidates, labelled]).astype(np.float64)
    std = both.std(axis=0)
    both = (both - both.mean(axis=0)) / np.where(std > 1e-8, std, 1.0)
    k = min(_PCA, both.shape[1], both.shape[0])
    return PCA(n_components=k, random_state=seed).fit_transform(both).astype(np.float32)


def _min_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each row of ``a``'s distance to its nearest row of ``b``."""
    out = np.empty(len(a), dtype=np.float64)
    from scipy.spatial.distance import cdist

    for s in range(0, len(a), 4096):
        out[s : s + 4096] = cdist(a[s : s + 4096], b, "sqeuclidean").min(axis=1)
    return out


def _candidates(train: np.ndarray, allowed: np.ndarray, pool: int | None, seed: int) -> np.ndarray:
    """Flat indices of the pixels that may be suggested: ``allowed`` and not train; a seeded
    sample of ``pool`` of them when there are more."""
    flat = np.flatnonzero(allowed.ravel() & ~train.ravel())
    if pool is not None and flat.size > pool:
        flat = np.sort(np.random.default_rng(seed).choice(flat, pool, replace=False))
    return flat


def suggest_pixels(
    inputs: Any,
    name: str,
    params: dict[str, Any],
    *,
    n: int,
    seed: int = 0,
    pool: int | None = 50_000,
) -> dict[str, np.ndarray]:
    """The ``n`` next pixels to label for head ``name`` on the scene's train pixels.

    Returns:
        ``rows``, ``cols`` (chosen pixels, most useful first), ``predicted`` (class indices),
        ``score`` (uncertainty, 1 - margin).
    """
    from pipeline.heads.training import split_recipe

    check_int("n", n, low=1)
    check_seed("seed", seed)
    sc = inputs.scene
    recipe = split_recipe(name, params)
    selection = recipe.selection(inputs, name)
    candidates = _candidates(sc.train, sc.has_data, pool, seed)
    if n > candidates.size:
        raise ConfigError(f"`n` {n} is more than the {candidates.size} pixels to choose from")
    _check_probabilities(inputs, recipe, selection, name)
    est, Xl = _fit(inputs, name, params, selection, sc.train, seed)
    Xc = _features(inputs, candidates, selection)
    proba = np.asarray(est.predict_proba(Xc))
    picks, uncertainty = choose(proba, Xc, Xl, n, seed=seed)
    rows, cols = np.unravel_index(candidates[picks], sc.shape)
    return {
        "rows": rows,
        "cols": cols,
        "predicted": np.asarray(est.classes_)[proba[picks].argmax(axis=1)],
        "score": uncertainty[picks],
    }


def _check_probabilities(inputs: Any, recipe: Any, selection: Any, name: str) -> None:
    """Before any fit: the head must give class probabilities (uncertainty needs them)."""
    from pipeline.heads.build import require_probabilities
    from pipeline.heads.training import build_head

    require_probabilities(build_head(recipe, inputs, selection, 0), name, "`suggest`")


def pixel_coordinates(scene: Any, rows: np.ndarray, cols: np.ndarray) -> tuple[Any, Any]:
    """``(x, y)`` of pixel centres in the scene's CRS (its affine transform), or the pixel
    centres' column and row when it has none."""
    x, y = cols + 0.5, rows + 0.5
    if scene.transform is None:
        return x, y
    a, b, c, d, e, f = scene.transform[:6]
    return a * x + b * y + c, d * x + e * y + f


def simulate(
    inputs: Any,
    name: str,
    params: dict[str, Any],
    *,
    n: int,
    rounds: int,
    seeds: Sequence[int],
    per_class: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The labelling loop against the ground truth: from the split drawn with each seed (and
    ``per_class``), ``rounds`` rounds each adding ``n`` pixels — suggested, or random — with
    their true labels; OA on the pixels still unlabelled and in the split's test set.

    Returns:
        ``{"labels": [train pixels after each round], "suggested"/"random": {"oa_mean": [...],
        "oa_std": [...], "per_seed": [[...]]}, "protocol": ...}``; round 0 is the start.
    """
    from pipeline.evaluation.scoring import protocol_card, resplit, warn_split
    from pipeline.heads.training import split_recipe

    check_int("n", n, low=1)
    check_int("simulate", rounds, low=1)
    check_seeds("seeds", seeds)
    sc = inputs.scene
    recipe = split_recipe(name, params)
    selection = recipe.selection(inputs, name)
    _check_probabilities(inputs, recipe, selection, name)
    total, done = len(seeds) * 2 * (rounds + 1), [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    curves: dict[str, list[list[float]]] = {"suggested": [], "random": []}
    start_sizes = []
    for seed in seeds:
        start, test = resplit(sc, seed, per_class)
        oracle, held_out = _halves(test, seed)
        if n * rounds > int(oracle.sum()):
            raise ConfigError(
                f"`n` x `simulate` ({n * rounds}) is more than the {int(oracle.sum())} "
                "pixels the loop can label (half the test pixels; the other half scores it)"
            )
        start_sizes.append(int(start.sum()))
        scoring = (_features(inputs, np.flatnonzero(held_out), selection), sc.labels[held_out])
        for strategy, runs in curves.items():
            loop = _Loop(inputs, name, params, selection, oracle, scoring, seed)
            runs.append(loop.run(strategy, start.copy(), n, rounds, tick))
    warn_split(sc, seeds, per_class, varies=_SIMULATION_SEEDS)  # after the checks on each split
    return _loop_summary(curves, start_sizes, n, rounds) | {
        "protocol": protocol_card(sc, seeds, per_class, varies=_SIMULATION_SEEDS)
        | {
            "per_class_start": per_class,
            "scoring": "OA on a fixed, seeded half of each split's test pixels that is never "
            "labelled; the other half is what the loop may label",
        }
    }


@dataclass
class _Loop:
    """One seed's labelling loop: refit, score on the held-out half, label ``n`` more."""

    inputs: Any
    name: str
    params: dict[str, Any]
    selection: Any
    oracle: np.ndarray
    scoring: tuple[np.ndarray, np.ndarray]
    seed: int

    def run(
        self, strategy: str, train: np.ndarray, n: int, rounds: int, tick: Callable[[], None]
    ) -> list[float]:
        """OA after each round (round 0: the start), picking by ``strategy``."""
        oa, rng, (X_eval, truth) = [], np.random.default_rng(self.seed), self.scoring
        for r in range(rounds + 1):
            est, Xl = _fit(self.inputs, self.name, self.params, self.selection, train, self.seed)
            oa.append(float((np.asarray(est.predict(X_eval)) == truth).mean()))
            if r < rounds:
                pool = _candidates(train, self.oracle, 20_000, self.seed + r)
                if strategy == "suggested":
                    Xc = _features(self.inputs, pool, self.selection)
                    proba = np.asarray(est.predict_proba(Xc))
                    picks = choose(proba, Xc, Xl, n, seed=self.seed)[0]
                else:
                    picks = rng.choice(pool.size, n, replace=False)
                train.ravel()[pool[picks]] = True
            tick()
        return oa


def _loop_summary(
    curves: dict[str, list[list[float]]], start_sizes: list[int], n: int, rounds: int
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "labels": [int(np.mean(start_sizes)) + r * n for r in range(rounds + 1)],
        "per_round": n,
        "rounds": rounds,
    }
    for strategy, runs in curves.items():
        arr = np.asarray(runs)
        out[strategy] = {
            "oa_mean": arr.mean(0).tolist(),
            "oa_std": arr.std(0).tolist(),
            "per_seed": arr.tolist(),
        }
    out["gain_at_end"] = out["suggested"]["oa_mean"][-1] - out["random"]["oa_mean"][-1]
    return out


def _halves(test: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The test pixels split at random (seeded) into the pixels the loop may label and the
    pixels that score it."""
    flat = np.flatnonzero(test.ravel())
    rng = np.random.default_rng(seed + 10_007)
    chosen = rng.permutation(flat)[: flat.size // 2]
    oracle = np.zeros(test.size, dtype=bool)
    oracle[chosen] = True
    oracle = oracle.reshape(test.shape)
    return oracle, test & ~oracle


def run_suggest(
    *,
    scene: Any,
    cache: Any,
    context: Any,
    head: str,
    recipes: Any,
    n: int,
    out: Any,
    png: Any = None,
    geojson: Any = None,
    seed: int = 0,
    pool: int | None = 50_000,
) -> dict[str, Any]:
    """Check the outputs, :func:`suggest_pixels`, and write the CSV (and PNG, GeoJSON)."""
    from pipeline.evaluation.compare import head_recipe
    from pipeline.heads.training import open_inputs
    from pipeline.io.outputs import GEOJSON, PNG, SUGGEST_CSV, check_outputs

    check_int("n", n, low=1)
    if pool is not None:
        check_int("pool", pool, low=1)
    check_outputs(
        {"out": (out, SUGGEST_CSV), "png": (png, PNG), "geojson": (geojson, GEOJSON)},
        {"scene": scene, "cache": cache, "context": context, "recipes": recipes},
    )
    params = head_recipe(head, recipes)
    inputs = open_inputs(scene, cache, context)
    sc = inputs.scene
    if geojson is not None and not sc.crs:
        raise ConfigError(
            f"scene `{scene}` has no CRS/transform, so its pixels have no place on the Earth for "
            "GeoJSON (WGS84 only); drop `geojson`: the CSV has each pick's row and column"
        )
    picked = suggest_pixels(inputs, head, params, n=n, seed=seed, pool=pool)
    x, y = pixel_coordinates(sc, picked["rows"], picked["cols"])
    names = [sc.class_names[int(i)] for i in picked["predicted"]]
    table = [
        {
            "row": int(r),
            "col": int(c),
            "x": float(xx),
            "y": float(yy),
            "predicted_class": nm,
            "score": float(sv),
        }
        for r, c, xx, yy, nm, sv in zip(
            picked["rows"], picked["cols"], x, y, names, picked["score"], strict=True
        )
    ]
    _write_suggestions(table, sc, out, png, geojson)
    return {"suggestions": table, "head": head, "n": n}


def _write_suggestions(
    table: list[dict[str, Any]], sc: Any, out: Any, png: Any, geojson: Any
) -> None:
    import csv
    import json

    from pipeline.io.outputs import GEOJSON, SUGGEST_CSV
    from pipeline.io.store import all_or_nothing, atomic_output
    from pipeline.scene.plots import save_png

    with all_or_nothing():  # several outputs: all of them or none
        fields = ["row", "col", "x", "y", "predicted_class", "score"]
        with atomic_output(out, SUGGEST_CSV, option="out") as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(table)
        if geojson is not None:
            lon_lat = _wgs84(sc, [t["x"] for t in table], [t["y"] for t in table])
            keys = ("row", "col", "x", "y", "predicted_class", "score")
            body = {
                "type": "FeatureCollection",
                "hsicache": "suggest/1",
                "coordinates": "WGS84 longitude, latitude",
                "features": [
                    {
                        "type": "Feature",
                        "geometry": {"type": "Point", "coordinates": list(xy)},
                        "properties": {k: t[k] for k in keys},
                    }
                    for t, xy in zip(table, lon_lat, strict=True)
                ],
            }
            with atomic_output(geojson, GEOJSON, option="geojson") as tmp:
                tmp.write_text(json.dumps(body))
        if png is not None:
            save_png(_plot_suggestions(table, sc), png, option="png")


def _wgs84(sc: Any, xs: list[float], ys: list[float]) -> list[tuple[float, float]]:
    """Points in the scene's CRS as WGS84 longitude, latitude (GeoJSON's only CRS)."""
    from rasterio.crs import CRS
    from rasterio.warp import transform

    lon, lat = transform(CRS.from_wkt(sc.crs), CRS.from_epsg(4326), xs, ys)
    return list(zip(lon, lat, strict=True))


def _plot_suggestions(table: list[dict[str, Any]], sc: Any) -> Any:
    """The suggested pixels on the rendering and on the scene's label map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from pipeline.scene.plots import class_colors

    rows = [t["row"] for t in table]
    cols = [t["col"] for t in table]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    axes[0].imshow(np.clip(np.asarray(sc.rgb), 0, 1))
    labels = np.ma.masked_less(np.asarray(sc.labels), 0)
    colors = class_colors(len(sc.class_ids))
    axes[1].imshow(
        labels, cmap=ListedColormap(colors), vmin=0, vmax=len(colors) - 1, interpolation="nearest"
    )
    for ax, title in zip(axes, ("rendering", "labels"), strict=True):
        ax.scatter(cols, rows, s=18, facecolors="none", edgecolors="red", linewidths=1.2)
        ax.set_title(f"{title}: {len(table)} pixels to label next", fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def run_simulation(
    *,
    scene: Any,
    cache: Any,
    context: Any,
    head: str,
    recipes: Any,
    n: int,
    rounds: int,
    seeds: Sequence[int],
    per_class: int | None,
    out: Any,
    png: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Check the outputs, :func:`simulate`, and write its JSON (and the PNG of both curves)."""
    import json

    from pipeline.evaluation.compare import head_recipe
    from pipeline.evaluation.scoring import METRICS_FORMAT
    from pipeline.heads.training import open_inputs
    from pipeline.io.outputs import PNG, SIMULATION_METRICS, check_outputs
    from pipeline.io.store import all_or_nothing, atomic_output, jsonable
    from pipeline.scene.plots import save_png

    check_int("n", n, low=1)
    check_int("simulate", rounds, low=1)
    if per_class is not None:
        check_int("per_class", per_class, low=1)
    check_outputs(
        {"out": (out, SIMULATION_METRICS), "png": (png, PNG)},
        {"scene": scene, "cache": cache, "context": context, "recipes": recipes},
    )
    params = head_recipe(head, recipes)
    result = simulate(
        open_inputs(scene, cache, context),
        head,
        params,
        n=n,
        rounds=rounds,
        seeds=seeds,
        per_class=per_class,
        progress=progress,
    )
    result["head"] = head
    with all_or_nothing():  # several outputs: all of them or none
        if out is not None:
            with atomic_output(out, SIMULATION_METRICS, option="out") as tmp:
                body = {"format": METRICS_FORMAT, "kind": "suggest-simulation", **result}
                tmp.write_text(json.dumps(jsonable(body), indent=2))
        if png is not None:
            save_png(_plot_simulation(result), png, option="png")
    return result


def _plot_simulation(result: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(result["labels"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy in ("suggested", "random"):
        m = np.asarray(result[strategy]["oa_mean"]) * 100
        s = np.asarray(result[strategy]["oa_std"]) * 100
        ax.plot(x, m, marker="o", label=strategy)
        ax.fill_between(x, m - s, m + s, alpha=0.2)
    ax.set_xlabel("labelled pixels")
    ax.set_ylabel("OA (%) on held-out test pixels")
    ax.set_title(
        f"{result['head']}: suggested against random picks "
        f"({len(result['suggested']['per_seed'])} seeds)"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
