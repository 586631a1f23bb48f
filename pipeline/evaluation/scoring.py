"""Evaluate a trained head on the test pixels, over several seeds, and predict full-scene maps.

Prediction streams the cache chunk by chunk (spectra are read from the scene store block by
block too), writing into memory-mapped ``.npy`` outputs: peak memory depends on the chunk size,
not the scene size.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.errors import ConfigError, HsicacheWarning, StoreError
from pipeline.evaluation.metrics import (
    classification_metrics,
    plot_confusion,
    summarise_seeds,
    write_confusion_csv,
)
from pipeline.features.cache import FeatureCache, read_features
from pipeline.heads.build import check_params, fit_estimator
from pipeline.heads.training import (
    FeatureSelection,
    Inputs,
    TrainedHead,
    assemble,
    build_head,
    fit_rows,
    load_head,
    open_inputs,
    split_recipe,
    unwrap,
)
from pipeline.io.cluster import as_they_finish, connected
from pipeline.io.outputs import (
    CONFIDENCE_NPY,
    CONFUSION_CSV,
    GEOTIFF,
    METRICS,
    NPY,
    check_outputs,
    mark_npy,
)
from pipeline.io.store import all_or_nothing, atomic_output, jsonable
from pipeline.scene.core import Scene, read_region, scene_array
from pipeline.scene.splits import make_split
from pipeline.utils.checks import check_seeds

__all__ = [
    "check_recipe",
    "evaluate",
    "evaluate_seeds",
    "predict_map",
    "protocol_card",
    "refit_over_seeds",
    "resplit",
    "split_note",
    "warn_split",
    "write_evaluation",
]


def _test_predictions(
    trained: TrainedHead, inputs: Inputs, test: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(test)
    if rows.size == 0:
        raise ConfigError("the scene has no test pixels to evaluate on")
    X, _ = assemble(inputs, rows, cols, trained.selection)
    actual = inputs.scene.labels[rows, cols]
    return actual, np.asarray(trained.estimator.predict(X), dtype=np.int64)


def evaluate(
    *,
    scene: str | Path,
    cache: str | Path | None,
    head: str | Path,
    context: str | Path | None = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Metrics of a saved head on the scene's test pixels, with the actual/predicted indices.

    ``context`` is the context store, for a head that reads context families.
    """
    inputs = open_inputs(scene, cache, context)
    trained = load_head(head)
    trained.check_inputs(inputs, same_split=True)
    actual, predicted = _test_predictions(trained, inputs, inputs.scene.test)
    metrics = classification_metrics(actual, predicted, inputs.scene.class_names)
    metrics["head"] = trained.meta["name"]
    split_seed = inputs.scene.split_record.get("seed")
    metrics["protocol"] = protocol_card(inputs.scene, [] if split_seed is None else [split_seed])
    metrics["protocol"]["head_seed"] = int(trained.meta["seed"])
    return metrics, actual, predicted


def resplit(scene: Scene, seed: int, per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The scene's own split protocol drawn again with ``seed`` (``official``: unchanged), or
    with ``per_class`` train pixels per class instead of the scene's count (an ``official`` or
    ``fraction`` split is then drawn ``per-class``; ``blocks`` stays blocks)."""
    split, protocol = scene.split_record, scene.split_protocol
    if per_class is not None and protocol != "blocks":
        protocol = "per-class"
    if protocol == "official":
        return scene.train, scene.test
    return make_split(
        protocol,
        scene.labels,
        scene.class_ids,
        seed=seed,
        per_class=per_class if per_class is not None else split.get("per_class"),
        fraction=split.get("fraction"),
        small_classes=split.get("small_classes", "error"),
        block_size=split.get("block_size") or 16,
        buffer=split.get("buffer", split.get("margin")) or 0,
    )


MODEL_SELECTION = (
    "hyper-parameters fixed beforehand (params.yaml), or, for a head with `select:`, chosen "
    "among its candidates by cross-validation on the train pixels of each split; torch heads "
    "stop early on a validation part of the train pixels when every class has enough of them, "
    "else once the training loss converges; the test pixels never choose or stop anything"
)


#: What seeds vary on a fixed split, for heads refitted on it (:func:`split_note`).
HEAD_SEEDS = "the heads' own seeds (initialisation, validation part)"


def protocol_card(
    scene: Scene, seeds: Sequence[int], per_class: int | None = None, varies: str = HEAD_SEEDS
) -> dict[str, Any]:
    """How a figure was obtained: the scene (its source and image fingerprint), the split,
    labels per class, seeds, the blocks split's buffer, and how models were selected (never on
    the test pixels); for splits re-drawn with ``per_class`` train pixels per class
    (:func:`resplit`) that count, and a ``split_note`` when the seeds do not re-draw the
    scene's own split (:func:`split_note`)."""
    split = scene.split_record
    card = {
        "scene": scene.attrs.get("source"),
        "image_fingerprint": scene.image_fingerprint,
        "split": scene.split_protocol,
        "per_class": split.get("per_class"),
        "fraction": split.get("fraction"),
        "block_size": split.get("block_size"),
        "buffer": split.get("buffer", split.get("margin")),
        "seeds": [int(s) for s in seeds],
        "n_labeled": int((scene.labels >= 0).sum()),
        "model_selection": MODEL_SELECTION,
    }
    note = split_note(scene, seeds, per_class, varies)
    if per_class is not None:
        card["per_class"] = per_class
        if card["split"] != "blocks":
            card["split"] = "per-class"
    if note:
        card["split_note"] = note
    return card


def split_note(
    scene: Scene, seeds: Sequence[int], per_class: int | None = None, varies: str = HEAD_SEEDS
) -> str | None:
    """What seeds do not do on an ``official`` split, for the protocol card and a warning; None
    when each seed draws the scene's own protocol again.

    An official split is fixed, so the seeds vary only ``varies``; with a count of train pixels
    per class it is replaced by random per-class draws from every labelled pixel, which are not
    spatially disjoint as the official split may be.
    """
    if scene.split_protocol != "official":
        return None
    if per_class is not None:
        return (
            "the scene's official split is not used: each seed draws its train pixels per class "
            "at random from every labelled pixel (its train and test pixels together), so train "
            "and test pixels lie side by side"
        )
    if len(set(seeds)) > 1:
        return (
            f"the scene's split is official and fixed: the seeds vary only {varies}, not the split"
        )
    return None


def warn_split(
    scene: Scene, seeds: Sequence[int], per_class: int | None = None, varies: str = HEAD_SEEDS
) -> None:
    """Warn once, before a command's fits, when its seeds do not re-draw the scene's split
    (:func:`split_note`); bad seeds are refused first, alone."""
    check_seeds("seeds", seeds)
    note = split_note(scene, seeds, per_class, varies)
    if note:
        warnings.warn(note, HsicacheWarning, stacklevel=2)


def check_recipe(
    inputs: Inputs,
    name: str,
    params: dict[str, Any],
    selection: FeatureSelection | None = None,
) -> FeatureSelection:
    """What the recipe ``params`` of head ``name`` reads (``selection``, default: what it
    names), checked against the stores with the head's arguments, before any pixel is read:
    a command that fits several heads refuses a bad one before fitting the others."""
    recipe = split_recipe(name, params)
    selection = selection or recipe.selection(inputs, name)
    check_params(build_head(recipe, inputs, selection, 0), name)
    return selection


def refit_over_seeds(
    inputs: Inputs,
    name: str,
    params: dict[str, Any],
    seeds: Sequence[int],
    *,
    selection: FeatureSelection | None = None,
    progress: Callable[[int, int], None] | None = None,
    per_class: int | None = None,
) -> dict[str, Any]:
    """Fit the recipe ``params`` of head ``name`` on the scene's split re-drawn with each seed
    (with ``per_class`` train pixels per class when given: :func:`resplit`) and score it on
    that seed's test pixels; mean ± std over the seeds.

    The features of every labeled pixel, and of the unlabelled pixels a semi-supervised head
    is fitted with (:func:`~pipeline.heads.training.fit_rows`), are read once and shared by all
    seeds; ``selection``
    fixes what the head reads (default: what its recipe names, all cached arrays).
    """
    check_seeds("seeds", seeds)
    sc = inputs.scene
    recipe = split_recipe(name, params)
    selection = check_recipe(inputs, name, params, selection)
    card = protocol_card(sc, seeds, per_class)
    plans = [(seed, *resplit(sc, seed, per_class)) for seed in seeds]
    fits = [fit_rows(sc, train, recipe.unlabeled(), seed) for seed, train, _ in plans]
    need = sc.labels >= 0
    for r, c, _ in fits:
        need[r, c] = True
    rows, cols = np.nonzero(need)
    X, _ = assemble(inputs, rows, cols, selection)
    position = np.full(sc.shape, -1, dtype=np.int64)
    position[rows, cols] = np.arange(rows.size)
    runs = []
    for k, ((seed, train, test), (r, c, y)) in enumerate(zip(plans, fits, strict=True)):
        est = build_head(recipe, inputs, selection, seed)
        at = position[r, c]
        whole = at.size == len(X) and bool((at == np.arange(at.size)).all())
        est, _ = unwrap(fit_estimator(est, X if whole else X[at], y, name))  # no copy of X
        truth = sc.labels[test]  # row-major, as position[test]
        run = classification_metrics(
            truth, np.asarray(est.predict(X[position[test]]), dtype=np.int64), sc.class_names
        )
        runs.append(
            {
                "seed": seed,
                **{key: run[key] for key in ("oa", "aa", "kappa", "miou")},
                "n_train": int(train.sum()),
                "n_test": run["n_test"],
            }
        )
        if progress:
            progress(k + 1, len(seeds))
    return {
        "head": name,
        **summarise_seeds(runs),
        "seeds": runs,
        "selection": selection.to_dict(),
        "protocol": card,
    }


def evaluate_seeds(
    *,
    scene: str | Path,
    cache: str | Path | None,
    head: str | Path,
    seeds: list[int],
    progress: Callable[[int, int], None] | None = None,
    context: str | Path | None = None,
) -> dict[str, Any]:
    """Refit the saved head's recipe on the split re-drawn with each seed; mean ± std.

    The head's name, parameters and feature selection are reused (a ``select`` is made again
    on each seed's train pixels, its context candidates included); each seed draws the scene's
    split protocol again (an ``official`` split stays fixed and only the head's seed changes)
    and seeds the head. The features of every labeled pixel are read once and shared by all
    seeds; the backbone never runs.
    """
    check_seeds("seeds", seeds)
    inputs = open_inputs(scene, cache, context)
    saved = load_head(head)
    saved.check_inputs(inputs, same_split=False)
    selection = saved.refit_selection
    if selection.context and inputs.context is None:  # a choice of no family, made once
        raise ConfigError(
            f"head `{saved.meta['name']}` chooses among context families on each split: give "
            "`context=CONTEXT.zarr`"
        )
    name, params = saved.meta["name"], saved.meta["params"]
    warn_split(inputs.scene, seeds)
    return refit_over_seeds(inputs, name, params, seeds, selection=selection, progress=progress)


METRICS_FORMAT = "hsicache-metrics/1"


def check_evaluation_outputs(
    *,
    metrics: str | Path,
    plot: str | Path | None = None,
    png: str | Path | None = None,
    inputs: dict[str, str | Path | None],
    seeds: Sequence[int] | None = None,
) -> None:
    """Refuse before any work an evaluation output that would replace what hsicache did not
    write or one of ``inputs`` (see :func:`pipeline.io.outputs.check_outputs`)."""
    from pipeline.io.outputs import PNG

    check_outputs(
        {"metrics": (metrics, METRICS), "plot": (plot, CONFUSION_CSV), "png": (png, PNG)},
        inputs,
    )
    if seeds and (plot is not None or png is not None):
        raise ConfigError(
            "`plot` and `png` show one split's confusion; `seeds` refits over several: "
            "drop them, or evaluate without `seeds`"
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
    file replaces only a file of its kind that hsicache wrote (:mod:`pipeline.io.outputs`).
    """
    from pipeline.scene.plots import save_png

    class_names = class_names or list(metrics.get("per_class", {}))
    with all_or_nothing():  # several outputs: all of them or none
        with atomic_output(out, METRICS, option="metrics") as tmp:
            tmp.write_text(json.dumps(jsonable({"format": METRICS_FORMAT, **metrics}), indent=2))
        if plot is not None and actual is not None and predicted is not None and class_names:
            with atomic_output(plot, CONFUSION_CSV, option="plot") as tmp:
                write_confusion_csv(tmp, actual, predicted, class_names)
        if png is not None and "confusion_matrix" in metrics and class_names:
            title = (
                f"{metrics.get('head', '')}: OA {metrics['oa']:.3f}, AA {metrics['aa']:.3f}, "
                f"kappa {metrics['kappa']:.3f}"
            )
            fig = plot_confusion(np.asarray(metrics["confusion_matrix"]), class_names, title)
            save_png(fig, png, option="png")


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
    context: str | Path | None = None,
) -> dict[str, Any]:
    """Predict every pixel, streaming block by block; the map holds the scene's class ids.

    Args:
        scene, cache, head: inputs (the head must have been trained on this scene image/cache).
        out: ``.npy`` map of original class ids (``int32``; -1 where the scene has no data).
        png: a colour map with a legend of class names.
        geotiff: a GeoTIFF of the map with the scene's CRS/transform (the scene must have them).
        confidence: ``.npy`` of the winning class probability (``float32``).
        block: block side (default: the chunk side of the first store read, else 256).
        progress: ``progress(done_blocks, total_blocks)``.
        client: a ``distributed.Client`` (or a callable opening one, see
            :func:`pipeline.io.cluster.connected`): predict the blocks on its workers (the head
            is sent to each worker once; they read the stores themselves, so the stores must be
            reachable from them); only the class ids come back.
        context: the context store, for a head that reads context families.

    Returns:
        A summary: shape, blocks, class pixel counts, outputs written.
    """
    outputs = {"out": out, "png": png, "geotiff": geotiff, "confidence": confidence}
    inputs, trained = _map_inputs(scene, cache, head, context, outputs)
    sources = _block_sources(inputs.context, inputs.cache, trained.selection)
    h, w = inputs.scene.shape
    block, grid = _block_grid(inputs, sources, block)
    job = _MapJob(
        trained.estimator,
        trained.selection,
        np.asarray(inputs.scene.class_ids),
        confidence is not None,
        _thread_counts(),
    )

    def pictures(result: np.ndarray) -> None:
        if png is not None:
            _write_png(result, inputs.scene, png, title=f"{trained.meta['name']} map")
        if geotiff is not None:
            _write_geotiff(result, inputs.scene, geotiff)

    with connected(client) as dask, all_or_nothing():
        if dask is None:
            blocks: Any = ((b, job.block(inputs.scene.cube, sources, b)) for b in grid)
        else:
            blocks = _predict_on_cluster(dask, job, grid, (scene, cache, context))
        no_data = inputs.scene.no_data
        _write_maps(blocks, (h, w), out, confidence, len(grid), progress, pictures, no_data)
    result = np.load(out, mmap_mode="r")
    names = inputs.scene.class_names
    counts = {n: int((result == c).sum()) for c, n in zip(job.class_ids, names, strict=True)}
    return {"shape": [h, w], "blocks": len(grid), "block": block, "class_pixels": counts}


def _map_inputs(
    scene: Any, cache: Any, head: Any, context: Any, outputs: dict[str, Any]
) -> tuple[Inputs, TrainedHead]:
    """The opened stores and the loaded head of :func:`predict_map`, every output path and
    option checked first (nothing is written when one is refused)."""
    from pipeline.io.outputs import PNG

    kinds = {"out": NPY, "png": PNG, "geotiff": GEOTIFF, "confidence": CONFIDENCE_NPY}
    check_outputs(
        {key: (path, kinds[key]) for key, path in outputs.items()},
        {"scene": scene, "cache": cache, "head": head, "context": context},
    )
    inputs = open_inputs(scene, cache, context, lazy=True)
    trained = load_head(head)
    trained.check_inputs(inputs, same_split=False)
    _check_map_options(trained, inputs.scene, scene, outputs["geotiff"], outputs["confidence"])
    return inputs, trained


def _block_grid(
    inputs: Inputs, sources: list[Any], block: int | None
) -> tuple[int, list[tuple[int, int, int, int]]]:
    """The block side (given, else the feature cache's chunk, whose blocks are the costly
    reads, else the context store's, else 256) and every block's ``(y0, x0, y1, x1)``."""
    h, w = inputs.scene.shape
    by_cache = [a for a, where in sources if where is inputs.cache]
    block = block or ((by_cache or [a for a, _ in sources])[0].chunks[0] if sources else 256)
    grid = [
        (y, x, min(y + block, h), min(x + block, w))
        for y in range(0, h, block)
        for x in range(0, w, block)
    ]
    return block, grid


def _check_map_options(
    trained: TrainedHead, sc: Scene, scene: Any, geotiff: Any, confidence: Any
) -> None:
    if geotiff is not None and not sc.crs:
        raise ConfigError(
            f"scene `{scene}` has no CRS/transform, so no GeoTIFF can be written; drop `geotiff`"
        )
    if confidence is not None and not hasattr(trained.estimator, "predict_proba"):
        raise ConfigError(
            f"head `{trained.meta['name']}` gives no class probabilities, so no `confidence` "
            "map; drop it (an svm head predicts labels only)"
        )


def _block_sources(
    context: Any, cache: FeatureCache | None, sel: FeatureSelection
) -> list[tuple[Any, Any]]:
    """``(zarr array, its store)`` of every column group after the spectrum, in ``X`` order."""
    sources: list[tuple[Any, Any]] = []
    if sel.context and context is not None:
        sources += [(a, context) for a in context.selection(sel.context)]
    if sel.spatial and cache is not None:
        sources += [(a, cache) for a in cache.selection(sel.timesteps, sel.sites)]
    return sources


def _write_maps(
    blocks: Any,
    shape: tuple[int, int],
    out: str | Path,
    confidence: str | Path | None,
    total: int,
    progress: Callable[[int, int], None] | None,
    then: Callable[[np.ndarray], None] | None = None,
    no_data: np.ndarray | None = None,
) -> None:
    """Stream ``(bounds, (class ids, confidence))`` blocks into the ``.npy`` outputs, each
    published atomically once every block is in; ``then(map)`` runs on the finished map
    before that (the outputs drawn from it). The scene's pixels without data (``no_data``)
    get class -1 and confidence NaN."""
    conf_out = (
        atomic_output(confidence, CONFIDENCE_NPY, option="confidence")
        if confidence
        else nullcontext()
    )
    with atomic_output(out, NPY, option="out") as tmp_map, conf_out as tmp_conf:
        labels = _disk_backed_npy(tmp_map, np.int32, shape)
        conf = _disk_backed_npy(tmp_conf, np.float32, shape) if tmp_conf is not None else None
        for k, ((y0, x0, y1, x1), (pred, best)) in enumerate(blocks):
            empty = no_data[y0:y1, x0:x1] if no_data is not None else False
            labels[y0:y1, x0:x1] = np.where(empty, -1, pred)
            if conf is not None:
                conf[y0:y1, x0:x1] = np.where(empty, np.nan, best)
            if progress:
                progress(k + 1, total)
        labels.flush()
        if conf is not None:
            conf.flush()
        del labels, conf
        mark_npy(tmp_map)
        if tmp_conf is not None:
            mark_npy(tmp_conf)
        if then is not None:
            then(np.load(tmp_map, mmap_mode="r"))


def _disk_backed_npy(path: Path, dtype: Any, shape: tuple[int, int]) -> np.ndarray:
    """A writable memory map of a new ``.npy`` file whose blocks are reserved on disk first: a
    sparse file on a full disk would kill the process with SIGBUS at the first page written,
    where reserving raises an ordinary ``OSError`` (no space left) before any work."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it
                raise
        except AttributeError:  # no posix_fallocate on this platform (macOS, Windows)
            pass
    return arr


@dataclass(frozen=True)
class _MapJob:
    """What predicting one block needs besides the stores: small enough for a dask task."""

    estimator: Any
    selection: FeatureSelection
    class_ids: np.ndarray
    want_conf: bool
    threads: tuple[int, int | None] = (1, None)

    def block(
        self, cube: Any, sources: list[tuple[Any, Any]], bounds: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Class ids (and the winning probability) of the block ``(y0, x0, y1, x1)``."""
        y0, x0, y1, x1 = bounds
        region = (slice(y0, y1), slice(x0, x1))
        parts = []
        if self.selection.spectral:
            store = getattr(cube, "store_path", "the scene store")
            parts.append(read_region(cube, store, "cube", region).astype(np.float32))
            if not np.isfinite(parts[-1]).all():  # prepare writes none: a chunk gone
                raise StoreError(
                    f"scene store `{store}`: `cube` [{y0}:{y1}, {x0}:{x1}] holds missing or "
                    "non-finite values (a deleted or damaged chunk?): re-run `hsicache prepare`"
                )
        parts += [read_features(a, y0, y1, x0, x1, where) for a, where in sources]
        X = np.concatenate(parts, axis=-1).reshape((y1 - y0) * (x1 - x0), -1)
        return self._predict(X, y1 - y0, x1 - x0)

    def _predict(self, X: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray | None]:
        best = None
        if self.want_conf:
            proba = self.estimator.predict_proba(X)
            winner = np.argmax(proba, axis=1)
            best = proba[np.arange(len(winner)), winner].reshape(h, w).astype(np.float32)
            pred = np.asarray(self.estimator.classes_, dtype=np.int64)[winner]
        else:
            pred = np.asarray(self.estimator.predict(X), dtype=np.int64)
        return self.class_ids[pred].reshape(h, w).astype(np.int32), best


def _thread_counts() -> tuple[int, int | None]:
    """This process's BLAS threads (and torch's, when torch is loaded): a dask worker predicts
    with the same counts, since BLAS and torch kernels sum in an order that depends on them
    and the maps must not depend on where a block was computed."""
    import sys

    from threadpoolctl import threadpool_info

    blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    torch = sys.modules.get("torch")
    return max(blas, default=1), (torch.get_num_threads() if torch is not None else None)


@contextmanager
def _same_threads(blas: int, torch_threads: int | None) -> Iterator[None]:
    """Run with ``blas`` BLAS threads and ``torch_threads`` torch threads (a worker's own counts
    are often 1), restoring the BLAS count afterwards."""
    from threadpoolctl import threadpool_limits

    if torch_threads is not None:
        import torch

        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
    with threadpool_limits(limits=blas, user_api="blas"):
        yield


def _predict_on_cluster(
    client: Any, job: _MapJob, grid: list[tuple[int, int, int, int]], stores: tuple[Any, ...]
) -> Any:
    """``(bounds, block result)`` pairs as the workers finish them (one task per block)."""
    scene, cache, context = (str(s) if s else None for s in stores)
    model = client.scatter(job, broadcast=True)
    return as_they_finish(
        client, _predict_task, grid, scene, cache, context, model, name="hsicache-block"
    )


def _predict_task(
    bounds: tuple[int, int, int, int],
    scene: str,
    cache: str | None,
    context: str | None,
    job: _MapJob,
) -> tuple[np.ndarray, np.ndarray | None]:
    """A dask task: one map block, reading the stores with this worker's open handles."""
    from pipeline.features.context import ContextStore
    from pipeline.io.cluster import worker_state

    cube = worker_state("cube", scene, lambda: scene_array(scene, "cube"))
    fc = worker_state("features", cache, lambda: FeatureCache.open(cache)) if cache else None
    cs = worker_state("context", context, lambda: ContextStore.open(context)) if context else None
    with _same_threads(*job.threads):  # the submitting process's counts: the same sums
        return job.block(cube, _block_sources(cs, fc, job.selection), bounds)


def _write_png(result: np.ndarray, sc: Scene, path: str | Path, *, title: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from pipeline.scene.plots import class_colors, image_inches, save_png

    colors = class_colors(len(sc.class_ids))
    index = np.zeros(result.shape, dtype=np.int32)
    for i, cid in enumerate(sc.class_ids):
        index[np.asarray(result) == cid] = i
    empty = np.asarray(result) == -1  # no data: left blank
    image_w, image_h = image_inches(*result.shape)
    rows = len(sc.class_ids) + int(empty.any())  # the legend's, on the right
    fig, ax = plt.subplots(figsize=(image_w + 3, max(image_h + 1, 0.6 + 0.17 * rows)))
    ax.imshow(
        np.ma.masked_where(empty, index),
        cmap=ListedColormap(colors),
        vmin=0,
        vmax=len(colors) - 1,
        interpolation="nearest",
    )
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    handles = [Patch(color=c, label=n) for c, n in zip(colors, sc.class_names, strict=True)]
    if empty.any():
        handles.append(Patch(facecolor="white", edgecolor="0.6", label="no data"))
    ax.legend(
        handles=handles,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        fontsize=7,
        frameon=False,
    )
    fig.tight_layout()
    save_png(fig, path, option="png")


def _write_geotiff(result: np.ndarray, sc: Scene, path: str | Path) -> None:
    """The map as a one-band int32 GeoTIFF of class ids (-1, its no-data value, where the scene
    has no data) on the scene's CRS and transform. Its band tags name each class and give its
    colour in the PNG map (:func:`_class_tags`); GDAL keeps a colour table only for an 8- or
    16-bit unsigned band, which cannot hold -1, so the file has none."""
    import rasterio
    from affine import Affine
    from rasterio.crs import CRS

    h, w = result.shape
    transform = Affine(*sc.transform[:6]) if sc.transform else Affine.identity()
    profile = {
        "driver": "GTiff",
        "height": h,
        "width": w,
        "count": 1,
        "dtype": "int32",
        "crs": CRS.from_wkt(sc.crs),
        "transform": transform,
        "nodata": -1,
        "compress": "deflate",
    }
    with (
        atomic_output(path, GEOTIFF, option="geotiff") as tmp,
        rasterio.open(tmp, "w", **profile) as dst,
    ):
        dst.write(np.asarray(result), 1)
        dst.update_tags(TIFFTAG_SOFTWARE=f"hsicache {__version__}")
        dst.update_tags(1, **_class_tags(sc))


def _class_tags(sc: Scene) -> dict[str, str]:
    """Band tags for GIS software: ``CLASS_NAMES`` and ``CLASS_COLORS``, JSON objects from each
    class id to its name and to its ``#rrggbb`` colour in the PNG map."""
    from matplotlib.colors import to_hex

    from pipeline.scene.plots import class_colors

    ids = [str(int(c)) for c in sc.class_ids]
    colors = [to_hex(c) for c in class_colors(len(ids))]
    return {
        "CLASS_NAMES": json.dumps(dict(zip(ids, sc.class_names, strict=True))),
        "CLASS_COLORS": json.dumps(dict(zip(ids, colors, strict=True))),
    }
