"""Stage two: fit a head on the train pixels of a scene + feature cache, save it, evaluate it.

The backbone never runs here: spatial features come from the cache (only the chunks holding the
requested pixels are read), spectra from the scene store.

A saved head is a folder::

    HEAD/
      head.json           what it is and what it was trained on (format, head name, parameters,
                          feature selection, scene and cache fingerprints, classes, timings)
      config.json         torch heads: constructor parameters + fitted sizes
      model.safetensors   torch heads: weights and normalisation statistics
      model.skops         other heads: the scikit-learn pipeline in skops' safe format

Loading refuses a head of another format, and running it refuses a scene or cache other than
the one it was trained on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import FeatureCache
from pipeline.checks import check_seed
from pipeline.errors import ConfigError, SceneNotFoundError, StoreError
from pipeline.heads import (
    FEATURE_MODES,
    HEADS,
    FiLMClassifier,
    MLPHead,
    check_kind,
    fit_estimator,
    make_head,
)
from pipeline.outputs import HEAD, check_outputs
from pipeline.scene import Scene, open_scene
from pipeline.store import atomic_output, jsonable, package_versions

__all__ = [
    "HEAD_FORMAT",
    "FeatureSelection",
    "TrainedHead",
    "assemble",
    "fit_head",
    "load_head",
    "train_head",
]

HEAD_FORMAT = "hsicache-head/1"
_TORCH_HEADS = {"FiLMClassifier": FiLMClassifier, "MLPHead": MLPHead}


@dataclass(frozen=True)
class FeatureSelection:
    """Which features a head reads: the spectrum and/or cached (timestep, site) arrays.

    Attributes:
        mode: ``spectral``, ``spatial`` or ``both``.
        timesteps, sites: the cached arrays (empty for ``spectral``).
    """

    mode: str
    timesteps: tuple[int, ...] = ()
    sites: tuple[str, ...] = ()

    @property
    def spectral(self) -> bool:
        return self.mode in ("spectral", "both")

    @property
    def spatial(self) -> bool:
        return self.mode in ("spatial", "both")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "timesteps": list(self.timesteps), "sites": list(self.sites)}

    @classmethod
    def resolve(
        cls,
        mode: str,
        cache: FeatureCache | None,
        timesteps: list[int] | None = None,
        sites: list[str] | None = None,
    ) -> FeatureSelection:
        """Check ``mode`` and fill in the cache's timesteps/sites when none are given."""
        if mode not in FEATURE_MODES:
            raise ConfigError(f"`--use` must be one of {', '.join(FEATURE_MODES)}, not {mode}")
        if mode == "spectral":
            return cls(mode)
        if cache is None:
            raise ConfigError(f"`--use {mode}` needs a feature cache (`--features FEATURES.zarr`)")
        ts = tuple(int(t) for t in (timesteps or cache.timesteps))
        ss = tuple(sites or cache.sites)
        for t in ts:
            for s in ss:
                cache.array(t, s)  # unknown ones are a clear error here
        return cls(mode, ts, ss)


def assemble(
    scene: Scene,
    cache: FeatureCache | None,
    rows: np.ndarray,
    cols: np.ndarray,
    selection: FeatureSelection,
) -> tuple[np.ndarray, int]:
    """``X = [spectrum | spatial]`` rows for the pixels ``(rows, cols)`` and the spectral width."""
    parts = []
    n_spec = 0
    if selection.spectral:
        parts.append(scene.cube[rows, cols].astype(np.float32))
        n_spec = parts[0].shape[1]
    if selection.spatial:
        assert cache is not None
        parts.append(cache.gather(rows, cols, timesteps=selection.timesteps,
                                  sites=selection.sites))  # fmt: skip
    return np.concatenate(parts, axis=1), n_spec


@dataclass
class TrainedHead:
    """A fitted head with what it was trained on.

    Attributes:
        estimator: the fitted scikit-learn-contract classifier (predicts class indices).
        meta: the ``head.json`` content.
    """

    estimator: Any
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def selection(self) -> FeatureSelection:
        sel = self.meta["selection"]
        return FeatureSelection(sel["mode"], tuple(sel["timesteps"]), tuple(sel["sites"]))

    def check_inputs(self, scene: Scene, cache: FeatureCache | None, *, same_split: bool) -> None:
        """Refuse a scene image or cache other than the ones the head was trained on."""
        if scene.image_fingerprint != self.meta["image_fingerprint"]:
            raise StoreError(
                f"head `{self.meta['name']}` was trained on scene image "
                f"{self.meta['image_fingerprint'][:12]}, not {scene.image_fingerprint[:12]}"
            )
        if same_split and scene.fingerprint != self.meta["scene_fingerprint"]:
            raise StoreError(
                f"head `{self.meta['name']}` was trained on another split of this scene "
                f"({self.meta['scene_fingerprint'][:12]}, not {scene.fingerprint[:12]}): its "
                "train pixels may be in this test set"
            )
        want = self.meta.get("cache_identity_sha256")
        if want is None:
            return
        if cache is None:
            raise ConfigError(
                f"head `{self.meta['name']}` reads cached features: give `--features FEATURES.zarr`"
            )
        got = cache.digest
        if got != want:
            raise StoreError(
                f"head `{self.meta['name']}` was trained on feature cache {want[:12]}, but "
                f"`{cache.path}` is {got[:12]} (other backbone, sites, timesteps or scene)"
            )

    def save(self, path: str | Path) -> Path:
        """Write the head folder atomically (replacing only a head folder hsicache wrote)."""
        with atomic_output(path, HEAD, option="--out") as tmp:
            tmp.mkdir(parents=True)
            est = self.estimator
            if type(est).__name__ in _TORCH_HEADS:
                from safetensors.torch import save_file

                config = {"class": type(est).__name__, "params": est.get_params(),
                          "fitted": est.fitted_config()}  # fmt: skip
                (tmp / "config.json").write_text(json.dumps(jsonable(config), indent=2))
                save_file({k: v.contiguous() for k, v in est.state_tensors().items()},
                          str(tmp / "model.safetensors"))  # fmt: skip
                kind = "torch"
            else:
                import skops.io as sio

                sio.dump(est, tmp / "model.skops")
                kind = "skops"
            meta = {**self.meta, "format": HEAD_FORMAT, "storage": kind}
            (tmp / "head.json").write_text(json.dumps(jsonable(meta), indent=2))
        self.meta = meta
        return Path(path)


_TRUSTED_PREFIXES = ("sklearn.", "xgboost.", "numpy.", "scipy.", "pipeline.heads.")


def load_head(path: str | Path) -> TrainedHead:
    """Read a head folder written by :meth:`TrainedHead.save`.

    Raises:
        SceneNotFoundError: no head there.
        StoreError: another format, or a skops file holding types outside the allowed
            libraries (and the import path the head was trained with).
    """
    p = Path(path)
    if not (p / "head.json").is_file():
        raise SceneNotFoundError(f"head `{p}` does not exist: run `hsicache train`")
    meta = json.loads((p / "head.json").read_text())
    if meta.get("format") != HEAD_FORMAT:
        raise StoreError(f"`{p}` is not a hsicache head of format {HEAD_FORMAT}")
    if meta["storage"] == "torch":
        from safetensors.torch import load_file

        config = json.loads((p / "config.json").read_text())
        cls = _TORCH_HEADS[config["class"]]
        est = cls.from_state(config["params"], config["fitted"],
                             load_file(str(p / "model.safetensors")))  # fmt: skip
    else:
        import skops.io as sio

        file = p / "model.skops"
        untrusted = sio.get_untrusted_types(file=file)
        kind = meta.get("kind", meta["name"])
        allowed = {kind} if "." in kind else set()
        bad = [t for t in untrusted if not (t.startswith(_TRUSTED_PREFIXES) or t in allowed)]
        if bad:
            raise StoreError(f"head `{p}` holds types it may not load: {', '.join(bad)}")
        est = sio.load(file, trusted=untrusted)
    return TrainedHead(estimator=est, meta=meta)


def _feature_mode(name: str, params: dict[str, Any]) -> str:
    fixed = HEADS.get(name)
    mode = params.pop("use", None)
    if fixed is not None:
        if mode not in (None, fixed):
            raise ConfigError(f"head `{name}` always reads `{fixed}` features, not `{mode}`")
        return fixed
    return mode or "both"


def split_recipe(name: str, params: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """A head entry's ``(kind, feature mode, constructor kwargs)``: ``kind`` defaults to ``name``
    and ``use`` (classic heads) is the feature mode."""
    kwargs = dict(params)
    kind = check_kind(str(kwargs.pop("kind", name)))
    return kind, _feature_mode(kind, kwargs), kwargs


def fit_head(
    name: str,
    params: dict[str, Any],
    scene: Scene,
    cache: FeatureCache | None,
    *,
    train_mask: np.ndarray,
    seed: int,
    timesteps: list[int] | None = None,
    sites: list[str] | None = None,
) -> TrainedHead:
    """Fit head ``name`` with ``params`` on the pixels of ``train_mask``.

    ``params`` may name the head's ``kind`` (a :data:`~pipeline.heads.HEADS` key or an import
    path; default: ``name`` itself), so several configurations of one kind can coexist
    (``film_skip: {kind: film, spectral_skip: true}``), and for classic heads ``use``.
    """
    check_seed("--seed", seed)
    kind, mode, kwargs = split_recipe(name, params)
    selection = FeatureSelection.resolve(mode, cache, timesteps, sites)
    rows, cols = np.nonzero(train_mask)
    if rows.size == 0:
        raise ConfigError("the scene has no train pixels")
    started = time.perf_counter()
    X, n_spec = assemble(scene, cache, rows, cols, selection)
    y = scene.labels[rows, cols]
    est = make_head(kind, n_spectral=n_spec, random_state=seed, **kwargs)
    fit_estimator(est, X, y, name)
    meta = {
        "name": name,
        "kind": kind,
        "params": dict(params),
        "seed": seed,
        "selection": selection.to_dict(),
        "n_spectral": n_spec,
        "n_features": int(X.shape[1]),
        "scene_fingerprint": scene.fingerprint,
        "image_fingerprint": scene.image_fingerprint,
        "cache_identity_sha256": cache.digest if selection.spatial else None,
        "cache_path": str(cache.path) if cache is not None and selection.spatial else None,
        "class_ids": scene.class_ids.tolist(),
        "class_names": list(scene.class_names),
        "n_train": int(rows.size),
        "train_seconds": time.perf_counter() - started,
        "package_versions": package_versions(),
    }
    return TrainedHead(estimator=est, meta=meta)


def open_inputs(
    scene: str | Path, cache: str | Path | None, *, lazy: bool = False
) -> tuple[Scene, FeatureCache | None]:
    """The scene and (when given) its feature cache, checked to belong together."""
    sc = open_scene(scene, lazy=lazy)
    fc = FeatureCache.open(cache, expect_fingerprint=sc.image_fingerprint) if cache else None
    return sc, fc


def train_head(
    *,
    scene: str | Path,
    cache: str | Path | None,
    head: str,
    out: str | Path,
    params: dict[str, Any] | None = None,
    timesteps: list[int] | None = None,
    sites: list[str] | None = None,
    seed: int = 0,
) -> TrainedHead:
    """Fit one head on the scene's train pixels and save it to ``out``."""
    check_outputs({"--out": (out, HEAD)}, {"--scene": scene, "--features": cache})
    sc, fc = open_inputs(scene, cache)
    trained = fit_head(head, params or {}, sc, fc, train_mask=sc.train, seed=seed,
                       timesteps=timesteps, sites=sites)  # fmt: skip
    trained.save(out)
    return trained
