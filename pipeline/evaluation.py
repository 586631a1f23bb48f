"""Evaluate a trained head on the test pixels, over several seeds, and predict full-scene maps.

Prediction streams the cache chunk by chunk (spectra are read from the scene store block by
block too), writing into memory-mapped ``.npy`` outputs: peak memory depends on the chunk size,
not the scene size.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.cache import FeatureCache, read_features
from pipeline.checks import check_seed
from pipeline.cluster import as_they_finish, connected
from pipeline.errors import ConfigError
from pipeline.heads import fit_estimator, make_head
from pipeline.metrics import (
    classification_metrics,
    plot_confusion,
    summarise_seeds,
    write_confusion_csv,
)
from pipeline.outputs import CONFUSION_CSV, GEOTIFF, METRICS, NPY, check_outputs, mark_npy
from pipeline.scene import Scene, scene_array
from pipeline.splits import make_split
from pipeline.store import atomic_output, jsonable
from pipeline.training import TrainedHead, assemble, load_head, open_inputs, split_recipe

__all__ = ["evaluate", "evaluate_seeds", "predict_map", "resplit", "write_evaluation"]


def _test_predictions(
    trained: TrainedHead, scene: Scene, cache: FeatureCache | None, test: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(test)
    if rows.size == 0:
        raise ConfigError("the scene has no test pixels to evaluate on")
    X, _ = assemble(scene, cache, rows, cols, trained.selection)
    return scene.labels[rows, cols], np.asarray(trained.estimator.predict(X), dtype=np.int64)


def evaluate(
    *, scene: str | Path, cache: str | Path | None, head: str | Path
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Metrics of a saved head on the scene's test pixels, with the actual/predicted indices."""
    sc, fc = open_inputs(scene, cache)
    trained = load_head(head)
    trained.check_inputs(sc, fc, same_split=True)
    actual, predicted = _test_predictions(trained, sc, fc, sc.test)
    metrics = classification_metrics(actual, predicted, sc.class_names)
    metrics["head"] = trained.meta["name"]
    return metrics, actual, predicted


def resplit(scene: Scene, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The scene's own split protocol drawn again with ``seed`` (``official``: unchanged)."""
    split = scene.attrs.get("split") or {}
    protocol = split.get("protocol", "per-class")
    if protocol == "official":
        return scene.train, scene.test
    return make_split(
        protocol,
        scene.labels,
        scene.class_ids,
        seed=seed,
        per_class=split.get("per_class"),
        fraction=split.get("fraction"),
        small_classes=split.get("small_classes", "error"),
        block_size=split.get("block_size") or 16,
        margin=split.get("margin") or 0,
    )


def evaluate_seeds(
    *,
    scene: str | Path,
    cache: str | Path | None,
    head: str | Path,
    seeds: list[int],
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Refit the saved head's recipe on the split re-drawn with each seed; mean ± std.

    The head's name, parameters and feature selection are reused; each seed draws the scene's
    split protocol again (an ``official`` split stays fixed and only the head's seed changes)
    and seeds the head. The features of every labeled pixel are read once and shared by all
    seeds; the backbone never runs.
    """
    if not seeds:
        raise ConfigError("`--seeds` needs at least one seed")
    for seed in seeds:
        check_seed("--seeds", seed)
    sc, fc = open_inputs(scene, cache)
    recipe = load_head(head)
    recipe.check_inputs(sc, fc, same_split=False)
    kind, _, kwargs = split_recipe(recipe.meta["name"], recipe.meta["params"])
    rows, cols = np.nonzero(sc.labels >= 0)
    X, n_spec = assemble(sc, fc, rows, cols, recipe.selection)
    y = sc.labels[rows, cols]
    position = np.full(sc.shape, -1, dtype=np.int64)
    position[rows, cols] = np.arange(rows.size)
    runs = []
    for k, seed in enumerate(seeds):
        train, test = resplit(sc, seed)
        tr, te = position[train], position[test]  # row-major, as fit_head orders pixels
        est = make_head(kind, n_spectral=n_spec, random_state=seed, **kwargs)
        fit_estimator(est, X[tr], y[tr], recipe.meta["name"])
        run = classification_metrics(y[te], np.asarray(est.predict(X[te]), dtype=np.int64),
                                     sc.class_names)  # fmt: skip
        runs.append({"seed": seed, **{key: run[key] for key in ("oa", "aa", "kappa", "miou")},
                     "n_train": int(train.sum()), "n_test": run["n_test"]})  # fmt: skip
        if progress:
            progress(k + 1, len(seeds))
    return {"head": recipe.meta["name"], **summarise_seeds(runs), "seeds": runs}


METRICS_FORMAT = "hsicache-metrics/1"


def check_evaluation_outputs(
    *,
    metrics: str | Path,
    plot: str | Path | None = None,
    png: str | Path | None = None,
    inputs: dict[str, str | Path | None],
) -> None:
    """Refuse before any work an evaluation output that would replace what hsicache did not
    write or one of ``inputs`` (see :func:`pipeline.outputs.check_outputs`)."""
    from pipeline.outputs import PNG

    check_outputs(
        {"--metrics": (metrics, METRICS), "--plot": (plot, CONFUSION_CSV), "--png": (png, PNG)},
        inputs,
    )


def write_evaluation(
    metrics: dict[str, Any],
    out: str | Path,
    *,
    actual: np.ndarray | None = None,
    predicted: np.ndarray | None = None,
    class_names: list[str] | None = None,
    plot: str | Path | None = None,
    png: str | Path | None = None,
) -> None:
    """``metrics.json``, the DVC confusion plot CSV and the confusion-matrix PNG, atomically.

    ``class_names`` defaults to the classes of ``metrics["per_class"]`` (in class order). Each
    file replaces only a file of its kind that hsicache wrote (:mod:`pipeline.outputs`).
    """
    from pipeline.plots import save_png

    class_names = class_names or list(metrics.get("per_class", {}))
    with atomic_output(out, METRICS, option="--metrics") as tmp:
        tmp.write_text(json.dumps(jsonable({"format": METRICS_FORMAT, **metrics}), indent=2))
    if plot is not None and actual is not None and predicted is not None and class_names:
        with atomic_output(plot, CONFUSION_CSV, option="--plot") as tmp:
            write_confusion_csv(tmp, actual, predicted, class_names)
    if png is not None and "confusion_matrix" in metrics and class_names:
        title = (f"{metrics.get('head', '')}: OA {metrics['oa']:.3f}, AA {metrics['aa']:.3f}, "
                 f"kappa {metrics['kappa']:.3f}")  # fmt: skip
        fig = plot_confusion(np.asarray(metrics["confusion_matrix"]), class_names, title)
        save_png(fig, png, option="--png")


def predict_map(
    *,
    scene: str | Path,
    cache: str | Path | None,
    head: str | Path,
    out: str | Path,
    png: str | Path | None = None,
    geotiff: str | Path | None = None,
    confidence: str | Path | None = None,
    block: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    client: Any = None,
) -> dict[str, Any]:
    """Predict every pixel, streaming block by block; the map holds the scene's class ids.

    Args:
        scene, cache, head: inputs (the head must have been trained on this scene image/cache).
        out: ``.npy`` map of original class ids (``int32``).
        png: a colour map with a legend of class names.
        geotiff: a GeoTIFF of the map with the scene's CRS/transform (the scene must have them).
        confidence: ``.npy`` of the winning class probability (``float32``).
        block: block side (default: the cache's chunk side, else 256).
        progress: ``progress(done_blocks, total_blocks)``.
        client: a ``distributed.Client`` (or a callable opening one, see
            :func:`pipeline.cluster.connected`): predict the blocks on its workers (the head is sent
            to each worker once; they read scene and cache themselves, so both stores must be
            reachable from them); only the class ids come back.

    Returns:
        A summary: shape, blocks, class pixel counts, outputs written.
    """
    from pipeline.outputs import PNG

    check_outputs(
        {"--out": (out, NPY), "--png": (png, PNG), "--geotiff": (geotiff, GEOTIFF),
         "--confidence": (confidence, NPY)},
        {"--scene": scene, "--features": cache, "--head": head},
    )  # fmt: skip
    sc, fc = open_inputs(scene, cache, lazy=True)
    trained = load_head(head)
    trained.check_inputs(sc, fc, same_split=False)
    if geotiff is not None and not sc.crs:
        raise ConfigError(f"scene `{scene}` has no CRS/transform, so no GeoTIFF can be written; "
                          "drop --geotiff")  # fmt: skip
    est = trained.estimator
    if confidence is not None and not hasattr(est, "predict_proba"):
        raise ConfigError(
            f"head `{trained.meta['name']}` gives no class probabilities, so no --confidence "
            "map; drop it (an svm head predicts labels only)"
        )
    sel = trained.selection
    h, w = sc.shape
    if block is None:
        block = fc.selection(sel.timesteps, sel.sites)[0].chunks[0] if sel.spatial and fc else 256
    class_ids = np.asarray(sc.class_ids)
    arrays = fc.selection(sel.timesteps, sel.sites) if sel.spatial and fc else []
    grid = [(y, x, min(y + block, h), min(x + block, w))
            for y in range(0, h, block) for x in range(0, w, block)]  # fmt: skip
    want_conf = confidence is not None
    conf_out = atomic_output(confidence, NPY, option="--confidence") if want_conf else nullcontext()
    with atomic_output(out, NPY, option="--out") as tmp_map, conf_out as tmp_conf:
        labels = np.lib.format.open_memmap(tmp_map, mode="w+", dtype=np.int32, shape=(h, w))
        conf = (np.lib.format.open_memmap(tmp_conf, mode="w+", dtype=np.float32, shape=(h, w))
                if tmp_conf is not None else None)  # fmt: skip
        with connected(client) as dask:
            if dask is None:
                blocks: Any = (
                    (b, _predict_block(sc.cube, arrays, est, sel, class_ids, b, want_conf, fc))
                    for b in grid
                )
            else:
                blocks = _predict_on_cluster(dask, scene, cache, est, sel, class_ids, grid,
                                             want_conf)  # fmt: skip
            for k, ((y0, x0, y1, x1), (pred, best)) in enumerate(blocks):
                labels[y0:y1, x0:x1] = pred
                if conf is not None:
                    conf[y0:y1, x0:x1] = best
                if progress:
                    progress(k + 1, len(grid))
        labels.flush()
        del labels, conf
        mark_npy(tmp_map)
        if tmp_conf is not None:
            mark_npy(tmp_conf)
    result = np.load(out, mmap_mode="r")
    if png is not None:
        _write_png(result, sc, png, title=f"{trained.meta['name']} map")
    if geotiff is not None:
        _write_geotiff(result, sc, geotiff)
    counts = {name: int((result == cid).sum()) for cid, name in zip(class_ids, sc.class_names,
                                                                    strict=True)}  # fmt: skip
    return {"shape": [h, w], "blocks": len(grid), "block": block, "class_pixels": counts}


def _predict_block(
    cube: Any,
    arrays: list[Any],
    est: Any,
    sel: Any,
    class_ids: np.ndarray,
    bounds: tuple[int, int, int, int],
    want_conf: bool,
    cache: FeatureCache | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Class ids (and the winning probability) of the block ``(y0, x0, y1, x1)``."""
    y0, x0, y1, x1 = bounds
    parts = [np.asarray(cube[y0:y1, x0:x1], dtype=np.float32)] if sel.spectral else []
    parts += [read_features(a, y0, y1, x0, x1, cache) for a in arrays]
    X = np.concatenate(parts, axis=-1).reshape((y1 - y0) * (x1 - x0), -1)
    best = None
    if want_conf:
        proba = est.predict_proba(X)
        winner = np.argmax(proba, axis=1)
        best = proba[np.arange(len(winner)), winner].reshape(y1 - y0, x1 - x0).astype(np.float32)
        pred = np.asarray(est.classes_, dtype=np.int64)[winner]
    else:
        pred = np.asarray(est.predict(X), dtype=np.int64)
    return class_ids[pred].reshape(y1 - y0, x1 - x0).astype(np.int32), best


def _predict_on_cluster(
    client: Any,
    scene: str | Path,
    cache: str | Path | None,
    est: Any,
    sel: Any,
    class_ids: np.ndarray,
    grid: list[tuple[int, int, int, int]],
    want_conf: bool,
) -> Any:
    """``(bounds, block result)`` pairs as the workers finish them (one task per block)."""
    model = client.scatter(est, broadcast=True)
    return as_they_finish(client, _predict_task, grid, str(scene), str(cache) if cache else None,
                          model, sel, class_ids, want_conf, name="hsicache-block")  # fmt: skip


def _predict_task(
    bounds: tuple[int, int, int, int],
    scene: str,
    cache: str | None,
    est: Any,
    sel: Any,
    class_ids: np.ndarray,
    want_conf: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """A dask task: one map block, reading the stores with this worker's open handles."""
    from pipeline.cluster import worker_state

    cube = worker_state("cube", scene, lambda: scene_array(scene, "cube"))
    arrays, fc = [], None
    if sel.spatial and cache:
        fc = worker_state("features", cache, lambda: FeatureCache.open(cache))
        arrays = fc.selection(sel.timesteps, sel.sites)
    return _predict_block(cube, arrays, est, sel, class_ids, bounds, want_conf, fc)


def _write_png(result: np.ndarray, sc: Scene, path: str | Path, *, title: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from pipeline.plots import class_colors, save_png

    colors = class_colors(len(sc.class_ids))
    index = np.zeros(result.shape, dtype=np.int32)
    for i, cid in enumerate(sc.class_ids):
        index[np.asarray(result) == cid] = i
    h, w = result.shape
    fig, ax = plt.subplots(figsize=(min(12, 3 + w / 60), min(12, 1 + h / 60)))
    ax.imshow(index, cmap=ListedColormap(colors), vmin=0, vmax=len(colors) - 1,
              interpolation="nearest")  # fmt: skip
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color=c, label=n) for c, n in zip(colors, sc.class_names,
                                                                 strict=True)],
              loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)  # fmt: skip
    fig.tight_layout()
    save_png(fig, path, option="--png")


def _write_geotiff(result: np.ndarray, sc: Scene, path: str | Path) -> None:
    import rasterio
    from affine import Affine
    from rasterio.crs import CRS

    h, w = result.shape
    transform = Affine(*sc.transform[:6]) if sc.transform else Affine.identity()
    profile = {"driver": "GTiff", "height": h, "width": w, "count": 1, "dtype": "int32",
               "crs": CRS.from_wkt(sc.crs), "transform": transform, "nodata": -1,
               "compress": "deflate"}  # fmt: skip
    with (
        atomic_output(path, GEOTIFF, option="--geotiff") as tmp,
        rasterio.open(tmp, "w", **profile) as dst,
    ):
        dst.write(np.asarray(result), 1)
        dst.update_tags(TIFFTAG_SOFTWARE=f"hsicache {__version__}")
