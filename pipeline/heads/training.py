"""Stage two: fit a head on the train pixels of a scene + feature cache, save it, evaluate it.

The backbone never runs here: spatial features come from the cache (only the chunks holding the
requested pixels are read), spectra from the scene store.

A saved head is a folder::

    HEAD/
      head.json           what it is and what it was trained on (format, head name, parameters,
                          feature selection, scene and cache fingerprints, classes, package
                          versions; no timing or date, so one model always gives the same
                          bytes and DVC re-runs nothing after a ``train`` that changed nothing)
      config.json         torch heads: constructor parameters + fitted sizes
      model.safetensors   torch heads: weights and normalisation statistics
      model.skops         other heads: the scikit-learn pipeline in skops' safe format

Loading refuses a head of another format, and running it refuses a scene or cache other than
the one it was trained on.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, HsicacheError, SceneNotFoundError, StoreError
from pipeline.features.cache import FeatureCache, all_finite
from pipeline.features.context import ContextStore
from pipeline.heads.build import check_params, fit_estimator, make_head, require_probabilities
from pipeline.heads.neural import FiLMClassifier, MLPHead
from pipeline.heads.registry import FEATURE_MODES, HEADS, REGISTRY, check_kind
from pipeline.heads.select import TrainCVSelect, candidate_grid, check_select
from pipeline.heads.semisupervised import check_self_training, self_training
from pipeline.io.archive import skops_bytes
from pipeline.io.outputs import HEAD, check_outputs
from pipeline.io.store import atomic_output, jsonable, package_versions
from pipeline.scene.core import Scene, open_scene
from pipeline.utils.checks import check_seed

__all__ = [
    "HEAD_FORMAT",
    "FeatureSelection",
    "Inputs",
    "Recipe",
    "TrainedHead",
    "assemble",
    "build_head",
    "fit_head",
    "fit_rows",
    "load_head",
    "open_inputs",
    "split_recipe",
    "train_head",
    "unwrap",
]

HEAD_FORMAT = "hsicache-head/1"
_TORCH_HEADS = {"FiLMClassifier": FiLMClassifier, "MLPHead": MLPHead}
_KIND = {"cache_identity_sha256": "feature cache", "context_identity_sha256": "context store"}


@dataclass(frozen=True)
class Inputs:
    """What a head reads, opened and checked to belong together.

    Attributes:
        scene: the scene (spectra, labels, split).
        cache: the feature cache of its image (diffusion features), if given.
        context: the context store of its image (:mod:`pipeline.features.context`), if given.
    """

    scene: Scene
    cache: FeatureCache | None = None
    context: ContextStore | None = None


def _repeated(values: Sequence[Any]) -> str:
    """The values listed more than once, comma-separated ("" when none is)."""
    return ", ".join(sorted(str(v) for v, n in Counter(values).items() if n > 1))


def _families(inputs: Inputs, families: tuple[str, ...], head: str | None) -> tuple[str, ...]:
    """``families`` when the context store holds them all, else a ConfigError saying why."""
    if not families:
        return families
    stores = [f for f in families if "/" in f or f.endswith(".zarr")]
    if stores:  # the store given where the families belong
        raise ConfigError(
            f"{head or 'the head'} lists the context store `{stores[0]}` among its context "
            "families: name families there (mean7, emp, ...) and give the store as "
            "`context_store`"
        )
    if inputs.context is None:
        raise ConfigError(
            f"{head or 'the head'} reads context ({', '.join(families)}): give "
            "`context_store=CONTEXT.zarr` (`hsicache context` writes it)"
        )
    inputs.context.selection(families)  # unknown families are a clear error here
    return families


@dataclass(frozen=True)
class FeatureSelection:
    """Which features a head reads: the spectrum, context families and/or cached (timestep,
    site) arrays, assembled in that order as ``X = [spectrum | context | spatial]``.

    Attributes:
        mode: ``spectral``, ``spatial`` or ``both`` (of the spectrum and the cached arrays).
        timesteps, sites: the cached arrays (empty for ``spectral``).
        context: context families (empty: none).
    """

    mode: str
    timesteps: tuple[int, ...] = ()
    sites: tuple[str, ...] = ()
    context: tuple[str, ...] = ()

    @property
    def spectral(self) -> bool:
        return self.mode in ("spectral", "both")

    @property
    def spatial(self) -> bool:
        return self.mode in ("spatial", "both")

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "timesteps": list(self.timesteps),
            "sites": list(self.sites),
            "context": list(self.context),
        }

    @classmethod
    def from_dict(cls, sel: dict[str, Any]) -> FeatureSelection:
        return cls(
            sel["mode"],
            tuple(sel["timesteps"]),
            tuple(sel["sites"]),
            tuple(sel.get("context") or ()),
        )

    @classmethod
    def resolve(
        cls,
        mode: str,
        inputs: Inputs,
        timesteps: list[int] | None = None,
        sites: list[str] | None = None,
        context: Sequence[str] = (),
        head: str | None = None,
        kind: str | None = None,
    ) -> FeatureSelection:
        """Check ``mode`` and the context families, and fill in the cache's timesteps/sites
        when none are given."""
        if mode not in FEATURE_MODES:
            raise ConfigError(f"`use` must be one of {', '.join(FEATURE_MODES)}, not {mode}")
        families = _families(inputs, tuple(context), head)
        if mode == "spectral":
            return cls(mode, context=families)
        cache = inputs.cache
        if cache is None:
            classic = kind is None or HEADS.get(kind) is None  # svm, rf, an import path...
            raise ConfigError(
                f"{head + ' reads' if head else '`use=' + mode + '` needs'} cached diffusion "
                "features: give a feature cache (`cache=FEATURES.zarr`)"
                + (" or `use: spectral`" if classic and mode == "both" else "")
            )
        ts = tuple(int(t) for t in (timesteps or cache.timesteps))
        ss = tuple(sites or cache.sites)
        for key, values in (("timesteps", ts), ("sites", ss)):
            twice = _repeated(values)
            if twice:  # the same array read twice would only duplicate columns
                raise ConfigError(f"`{key}` lists {twice} more than once")
        for t in ts:
            for s in ss:
                cache.array(t, s)  # unknown ones are a clear error here
        return cls(mode, ts, ss, families)


def assemble(
    inputs: Inputs, rows: np.ndarray, cols: np.ndarray, selection: FeatureSelection
) -> tuple[np.ndarray, tuple[int, int]]:
    """``X = [spectrum | context | spatial]`` rows for the pixels ``(rows, cols)``, and the
    widths of the spectrum and the context parts."""
    parts = []
    widths = [0, 0]
    if selection.spectral:
        parts.append(inputs.scene.cube[rows, cols].astype(np.float32))
        widths[0] = parts[-1].shape[1]
        if not all_finite(parts[-1]):  # prepare writes none: a chunk gone reads as its fill
            bad = int((~np.isfinite(parts[-1]).all(axis=1)).sum())
            raise StoreError(
                f"the scene store's `cube` has missing or non-finite spectra at {bad} of these "
                f"{len(rows)} pixels (a deleted or damaged chunk?): re-run `hsicache prepare`"
            )
    if selection.context:
        assert inputs.context is not None
        parts.append(inputs.context.gather(rows, cols, selection.context))
        widths[1] = parts[-1].shape[1]
    if selection.spatial:
        assert inputs.cache is not None
        parts.append(
            inputs.cache.gather(rows, cols, timesteps=selection.timesteps, sites=selection.sites)
        )
    return np.concatenate(parts, axis=1), (widths[0], widths[1])


@dataclass
class TrainedHead:
    """A fitted head with what it was trained on.

    Attributes:
        estimator: the fitted scikit-learn-contract classifier (predicts class indices).
        meta: the ``head.json`` content.
        train_seconds: how long reading the features and fitting took (not saved: a head
            folder holds nothing that differs between two runs giving the same model).
    """

    estimator: Any
    meta: dict[str, Any] = field(default_factory=dict)
    train_seconds: float | None = None

    @property
    def selection(self) -> FeatureSelection:
        return FeatureSelection.from_dict(self.meta["selection"])

    @property
    def refit_selection(self) -> FeatureSelection:
        """What a refit of this head's recipe on another split reads: :attr:`selection`, except
        that a recipe whose ``select`` chooses among context families gets every candidate
        family back. The saved head reads only the families cross-validation chose on its own
        train pixels, which are test pixels of other splits: a refit must choose again."""
        recipe = split_recipe(self.meta["name"], self.meta["params"])
        if recipe.select is None or "context" not in recipe.select:
            return self.selection
        pool = self.meta.get("select_context", recipe.context)  # what the choice was among
        return replace(self.selection, context=tuple(pool))

    def check_inputs(self, inputs: Inputs, *, same_split: bool) -> None:
        """Refuse a scene image, cache or context store other than the ones the head was
        trained on."""
        scene, cache = inputs.scene, inputs.cache
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
        self._check_store("cache_identity_sha256", cache, "cache=FEATURES.zarr")
        self._check_store("context_identity_sha256", inputs.context, "context_store=CONTEXT.zarr")

    def _check_store(self, key: str, store: Any, option: str) -> None:
        """The feature cache or context store given is the one this head was trained on."""
        want = self.meta.get(key)
        if want is None:
            return
        if store is None:
            raise ConfigError(f"head `{self.meta['name']}` reads a {_KIND[key]}: give `{option}`")
        if store.digest != want:
            raise StoreError(
                f"head `{self.meta['name']}` was trained on {_KIND[key]} {want[:12]}, but "
                f"`{store.path}` is {store.digest[:12]} (another scene, or other settings)"
            )

    def save(self, path: str | Path) -> Path:
        """Write the head folder atomically (replacing only a head folder hsicache wrote)."""
        with atomic_output(path, HEAD, option="out") as tmp:
            tmp.mkdir(parents=True)
            est = self.estimator
            if type(est).__name__ in _TORCH_HEADS:
                from safetensors.torch import save_file

                config = {
                    "class": type(est).__name__,
                    "params": est.get_params(),
                    "fitted": est.fitted_config(),
                }
                (tmp / "config.json").write_text(json.dumps(jsonable(config), indent=2))
                save_file(
                    {k: v.contiguous() for k, v in est.state_tensors().items()},
                    str(tmp / "model.safetensors"),
                )
                kind = "torch"
            else:
                (tmp / "model.skops").write_bytes(skops_bytes(est))
                kind = "skops"
            meta = {**self.meta, "format": HEAD_FORMAT, "storage": kind}
            (tmp / "head.json").write_text(json.dumps(jsonable(meta), indent=2))
        self.meta = meta
        return Path(path)


_TRUSTED_PREFIXES = (
    "sklearn.",
    "xgboost.",
    "numpy.",
    "scipy.",
    "pipeline.heads.",
)


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
    try:
        meta = json.loads((p / "head.json").read_text())
        if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT:
            raise StoreError(f"`{p}` is not a hsicache head of format {HEAD_FORMAT}")
        damage = _meta_damage(meta)
        if damage:
            raise StoreError(f"head `{p}` is damaged: `head.json` {damage}: train it again")
        est = _load_estimator(p, meta)
    except (HsicacheError, OSError):
        raise
    except Exception as exc:  # a truncated or edited file: json, safetensors, skops, keys
        raise StoreError(
            f"head `{p}` is damaged ({type(exc).__name__}: {str(exc)[:80]}): train it again"
        ) from None
    return TrainedHead(estimator=est, meta=meta)


#: What ``head.json`` must hold, and of which type, for a head to be used.
_META_TYPES: dict[str, type] = {
    "name": str, "kind": str, "seed": int, "selection": dict, "scene_fingerprint": str,
    "image_fingerprint": str, "storage": str, "n_features": int, "class_ids": list,
}  # fmt: skip


def _meta_damage(meta: dict[str, Any]) -> str | None:
    """What is wrong with a head's ``head.json`` (a hand edit, a truncation), or ``None``."""
    for key, kind in _META_TYPES.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            return f"lacks `{key}` ({kind.__name__})"
    sel = meta["selection"]
    lists = [sel.get("timesteps"), sel.get("sites"), sel.get("context") or []]
    if sel.get("mode") not in ("spectral", "spatial", "both") or not all(
        isinstance(v, list) for v in lists
    ):
        return "has a `selection` hsicache does not write"
    return None


def _load_estimator(p: Path, meta: dict[str, Any]) -> Any:
    """The fitted estimator of the head folder ``p``."""
    if meta["storage"] == "torch":
        from safetensors.torch import load_file

        config = json.loads((p / "config.json").read_text())
        cls = _TORCH_HEADS[config["class"]]
        return cls.from_state(
            config["params"], config["fitted"], load_file(str(p / "model.safetensors"))
        )
    import skops.io as sio

    file = p / "model.skops"
    untrusted = sio.get_untrusted_types(file=file)
    kind = meta.get("kind", meta["name"])
    allowed = {kind} if "." in kind else set()
    bad = [t for t in untrusted if not (t.startswith(_TRUSTED_PREFIXES) or t in allowed)]
    if bad and all(t.startswith("pipeline.") for t in bad):
        raise StoreError(
            f"head `{p}` was saved by an earlier hsicache, whose modules have since moved "
            f"({', '.join(bad)}): train it again"
        )
    if bad:
        raise StoreError(f"head `{p}` holds types it may not load: {', '.join(bad)}")
    return sio.load(file, trusted=untrusted)


def _feature_mode(name: str, params: dict[str, Any]) -> str:
    fixed = HEADS.get(name)
    mode = params.pop("use", None)
    if fixed is not None:
        if mode not in (None, fixed):
            raise ConfigError(f"head `{name}` always reads `{fixed}` features, not `{mode}`")
        return fixed
    return mode or "both"


@dataclass(frozen=True)
class Recipe:
    """A head entry (``heads.<name>`` of ``params.yaml``) taken apart.

    Attributes:
        kind: the head type (a :data:`~pipeline.heads.registry.HEADS` key or an import path).
        mode: the feature mode (``use`` for classic heads; fixed for the torch heads).
        context: context families the head reads.
        timesteps, sites: the cached (timestep, site) arrays it reads (empty: every cached one).
        name: the entry's name (``heads.<name>``), for messages.
        kwargs: the head's constructor arguments.
        self_training: the checked ``self_training`` section (threshold, max_iter, pool), if any.
        select: the checked ``select`` section (candidates chosen by cross-validation on the
            train pixels, :mod:`pipeline.heads.select`), if any; ``context`` then holds every
            family a candidate reads.
    """

    kind: str
    mode: str
    context: tuple[str, ...]
    kwargs: dict[str, Any]
    self_training: dict[str, Any] | None = None
    select: dict[str, Any] | None = None
    timesteps: tuple[int, ...] = ()
    sites: tuple[str, ...] = ()
    name: str = ""

    def selection(
        self,
        inputs: Inputs,
        name: str,
        *,
        timesteps: Sequence[int] | None = None,
        sites: Sequence[str] | None = None,
        context: Sequence[str] | None = None,
    ) -> FeatureSelection:
        """What head ``name`` reads: its recipe's context families and arrays, each replaced by
        the argument when one is given and not empty (the command line's ``--timesteps``,
        ``--sites``, ``--context`` win over the entry)."""
        ts = list(timesteps or self.timesteps) or None
        ss = list(sites or self.sites) or None
        if inputs.cache is not None and self.mode != "spectral":
            self._check_cached(name, inputs.cache, "timesteps", () if timesteps else self.timesteps)
            self._check_cached(name, inputs.cache, "sites", () if sites else self.sites)
        families = tuple(context) if context is not None else self.context
        return FeatureSelection.resolve(
            self.mode, inputs, ts, ss, families, head=f"head `{name}`", kind=self.kind
        )

    @staticmethod
    def _check_cached(name: str, cache: FeatureCache, key: str, values: Sequence[Any]) -> None:
        """An array the entry itself names (not a flag) that the cache lacks: a message that
        says which head's entry."""
        known = getattr(cache, key)
        for value in values:
            if value not in known:
                raise ConfigError(
                    f"head `{name}`: `{key}:` names {value}, which cache `{cache.path}` does "
                    f"not hold ({', '.join(str(k) for k in known)})"
                )

    def unlabeled(self) -> int | str | None:
        """The unlabelled pixels the head is fitted with: ``"all"`` (a kind registered with
        ``unlabeled="all"``, such as ``propagate``: every pixel of the scene with data), a count
        (``self_training.pool``) or ``None`` (none)."""
        spec = REGISTRY.get(self.kind)
        if spec is not None and spec.unlabeled == "all":
            return "all"
        return self.self_training["pool"] if self.self_training else None


def _names(name: str, key: str, value: Any, of: type) -> tuple[Any, ...]:
    """A head entry's list of ``of`` values under ``key`` (a comma-separated string too)."""
    if value is None:
        return ()
    given = value
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
        value = [int(v) if of is int and re.fullmatch(r"-?[0-9]+", v) else v for v in value]
    elif isinstance(value, of) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, of) and not isinstance(v, bool) for v in value
    ):
        what = "family names" if key == "context" else "integers" if of is int else "names"
        raise ConfigError(f"head `{name}`: `{key}: {given!r}` must list {what}")
    twice = _repeated(value)
    if twice:
        raise ConfigError(f"head `{name}`: `{key}:` lists {twice} more than once")
    return tuple(value)


def _kind(name: str, kind: Any, has_entry: bool) -> str:
    """The head kind of entry ``name`` (its ``kind:``, else the name itself), or a ConfigError
    that says where the unknown name came from."""
    try:
        return check_kind(str(kind if kind is not None else name))
    except ConfigError as err:
        if kind is not None:  # a typo in an entry's kind: say which entry
            choices = str(err).split(": ", 1)[-1]
            raise ConfigError(f"head `{name}`: unknown `kind: {kind}`: {choices}") from None
        if not has_entry:  # a configured head's name given without the file that holds it
            raise ConfigError(
                f"{err}; a head configured under `heads:` of a params file is found only in "
                "the file given (`hsicache train --params FILE`) under that exact name"
            ) from None
        raise


def split_recipe(name: str, params: dict[str, Any]) -> Recipe:
    """A head entry's recipe: ``kind`` defaults to ``name``, ``use`` (classic heads) is the
    feature mode, ``context`` the context families, ``timesteps``/``sites`` the cached arrays
    (default: all) and ``self_training`` wraps the head in a self-training loop."""
    kwargs = dict(params)
    kind = _kind(name, kwargs.pop("kind", None), bool(params))
    timesteps = _names(name, "timesteps", kwargs.pop("timesteps", None), int)
    sites = _names(name, "sites", kwargs.pop("sites", None), str)
    loop = kwargs.pop("self_training", None)
    loop = check_self_training(name, loop) if loop is not None else None
    if loop is not None and kind == "propagate":
        raise ConfigError(
            f"head `{name}`: `propagate` already uses every pixel; drop `self_training`"
        )
    context: Sequence[str] = _names(name, "context", kwargs.pop("context", None) or (), str)
    select = kwargs.pop("select", None)
    if select is not None:
        if loop is not None:
            raise ConfigError(f"head `{name}`: `select` and `self_training` do not combine")
        select = check_select(name, select)
        for fams in select.get("context", []):
            context = [*context, *(f for f in fams if f not in context)]
    mode = _feature_mode(kind, kwargs)
    if (timesteps or sites) and mode == "spectral":
        key = "timesteps" if timesteps else "sites"
        why = "`use: spectral`" if HEADS.get(kind) is None else f"a `{kind}` head"
        raise ConfigError(f"head `{name}` reads no cached arrays ({why}): drop `{key}:`")
    return Recipe(kind, mode, tuple(context), kwargs, loop, select, timesteps, sites, name)


def fit_head(
    name: str,
    params: dict[str, Any],
    inputs: Inputs,
    *,
    train_mask: np.ndarray,
    seed: int,
    timesteps: list[int] | None = None,
    sites: list[str] | None = None,
    context: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainedHead:
    """Fit head ``name`` with ``params`` on the pixels of ``train_mask``.

    ``params`` may name the head's ``kind`` (a :data:`~pipeline.heads.registry.HEADS` key or an
    import path; default: ``name`` itself), so several configurations of one kind can coexist
    (``film_skip: {kind: film, spectral_skip: true}``), ``context``, ``timesteps`` and
    ``sites`` (what it reads; the arguments of the same names win) and for classic heads
    ``use``. ``progress(done, total)``: the features read, then each fit (a ``select`` head's
    candidates one by one).
    """
    check_seed("seed", seed)
    recipe = split_recipe(name, params)
    selection = recipe.selection(inputs, name, timesteps=timesteps, sites=sites, context=context)
    est = build_head(recipe, inputs, selection, seed)
    check_params(est, name)  # before any pixel is read
    if not np.any(train_mask):
        raise ConfigError("the scene has no train pixels")
    rows, cols, y = fit_rows(inputs.scene, train_mask, recipe.unlabeled(), seed)
    started = time.perf_counter()
    X, (n_spec, n_ctx) = assemble(inputs, rows, cols, selection)
    est, loop = unwrap(_fit_reporting(est, X, y, name, progress))
    pool = list(selection.context)
    est, selection, chosen = _chosen_head(est, selection)
    n_ctx = _context_width(inputs, selection)
    scene, cache, ctx = inputs.scene, inputs.cache, inputs.context
    meta = {
        "name": name,
        "kind": recipe.kind,
        "params": dict(params),
        "seed": seed,
        "selection": selection.to_dict(),
        "n_spectral": n_spec,
        "n_context": n_ctx,
        "n_features": int(est.n_features_in_),
        "scene_fingerprint": scene.fingerprint,
        "image_fingerprint": scene.image_fingerprint,
        "cache_identity_sha256": cache.digest if cache is not None and selection.spatial else None,
        "cache_path": str(cache.path) if cache is not None and selection.spatial else None,
        "context_identity_sha256": ctx.digest if ctx is not None and selection.context else None,
        "context_path": str(ctx.path) if ctx is not None and selection.context else None,
        "class_ids": scene.class_ids.tolist(),
        "class_names": list(scene.class_names),
        "n_train": int((y >= 0).sum()),
        "n_unlabeled": int((y < 0).sum()),
        "self_training": loop,
        "select": chosen,
        **({"select_context": pool} if chosen and "context" in chosen["chosen"] else {}),
        "package_versions": package_versions(),
    }
    return TrainedHead(estimator=est, meta=meta, train_seconds=time.perf_counter() - started)


def _fit_reporting(
    est: Any, X: np.ndarray, y: np.ndarray, name: str, progress: Callable[[int, int], None] | None
) -> Any:
    """:func:`fit_estimator`, reporting the features as read (one step) and then the fit: a
    ``select`` head candidate by candidate, any other head as one step."""
    if progress is None:
        return fit_estimator(est, X, y, name)
    if not isinstance(est, TrainCVSelect):
        progress(1, 2)
        fitted = fit_estimator(est, X, y, name)
        progress(2, 2)
        return fitted
    progress(1, len(est.grid) + 2)
    return fit_estimator(
        est, X, y, name, progress=lambda done, total: progress(done + 1, total + 1)
    )


def build_head(recipe: Recipe, inputs: Inputs, selection: FeatureSelection, seed: int) -> Any:
    """The unfitted estimator of ``recipe`` for the columns ``selection`` assembles."""
    n_spec = int(inputs.scene.cube.shape[-1]) if selection.spectral else 0
    n_ctx = _context_width(inputs, selection)
    try:
        est = make_head(
            recipe.kind, n_spectral=n_spec, n_context=n_ctx, random_state=seed, **recipe.kwargs
        )
    except ConfigError as exc:  # name the head too when its kind differs from it
        raise ConfigError(_named(str(exc), recipe)) from None
    if recipe.select is not None:
        return _selecting(est, recipe, inputs, selection, n_spec, seed)
    if recipe.self_training is None:
        return est
    require_probabilities(est, recipe.kind, "`self_training`")
    loop = recipe.self_training
    return self_training(est, threshold=loop["threshold"], max_iter=loop["max_iter"])


def _named(message: str, recipe: Recipe) -> str:
    """``message`` about head kind ``recipe.kind`` naming the head itself too, when its name
    differs (``ctx_logreg`` and ``ctx_logreg_st`` are both ``logreg``)."""
    if not recipe.name or recipe.name == recipe.kind:
        return message
    kind = f"head `{recipe.kind}`"
    return message.replace(kind, f"head `{recipe.name}` (kind `{recipe.kind}`)", 1)


def _context_spans(
    inputs: Inputs, selection: FeatureSelection, start: int = 0
) -> dict[str, tuple[int, int]]:
    """``family -> (first, end)`` columns of the context families ``selection`` reads, the
    first starting at ``start``."""
    spans: dict[str, tuple[int, int]] = {}
    if selection.context and inputs.context is not None:
        arrays = inputs.context.selection(selection.context)
        for fam, arr in zip(selection.context, arrays, strict=True):
            spans[fam] = (start, start + int(arr.shape[-1]))
            start += int(arr.shape[-1])
    return spans


def _context_width(inputs: Inputs, selection: FeatureSelection) -> int:
    """Columns of the context families ``selection`` reads."""
    return sum(end - first for first, end in _context_spans(inputs, selection).values())


def _selecting(
    est: Any,
    recipe: Recipe,
    inputs: Inputs,
    selection: FeatureSelection,
    n_spec: int,
    seed: int,
) -> TrainCVSelect:
    """``est`` wrapped to choose among ``recipe.select``'s candidates on the train pixels."""
    require_probabilities(est, recipe.kind, "`select`")
    groups = _context_spans(inputs, selection, n_spec)
    start = max((end for _, end in groups.values()), default=n_spec)
    grid = candidate_grid(recipe.select)
    wrapper = TrainCVSelect(
        est,
        grid,
        groups,
        transductive=recipe.unlabeled() == "all",
        folds=recipe.select["folds"],
        random_state=seed,
    )
    for params in grid:  # every candidate's values checked before any pixel is read
        try:
            candidate = wrapper._candidate(params, start)[0]
        except ValueError as exc:  # scikit-learn's "Invalid parameter ..." for an unknown name
            reason = str(exc).split(" for estimator")[0]
            raise ConfigError(
                _named(f"`select` of head `{recipe.kind}`: {reason}", recipe)
            ) from None
        try:
            check_params(candidate, recipe.kind)
        except ConfigError as exc:
            raise ConfigError(_named(str(exc), recipe)) from None
    return wrapper


def _chosen_head(
    est: Any, selection: FeatureSelection
) -> tuple[Any, FeatureSelection, dict | None]:
    """A fitted :class:`~pipeline.heads.select.TrainCVSelect`'s chosen head, the selection it
    reads (the chosen context families) and the choice with its cross-validation table; any
    other estimator as it is."""
    if not isinstance(est, TrainCVSelect):
        return est, selection, None
    chosen = est.best_params_
    if "context" in chosen:
        selection = replace(selection, context=tuple(chosen["context"]))
    report = {"chosen": chosen, "folds": est.folds, "cv": est.cv_results_}
    return est.estimator_, selection, report


def fit_rows(
    scene: Scene, train_mask: np.ndarray, unlabeled: int | str | None, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels a head is fitted on, ``(rows, cols, y)``, ``y = -1`` for unlabelled ones:
    every pixel of the scene in row-major order for ``"all"``; else the train pixels
    (row-major), then a seeded sample of ``unlabeled`` other pixels (row-major) for a count,
    none for ``None``.

    The unlabelled pixels are drawn from every pixel that is not a train pixel, labelled test
    pixels included (their labels are never read). Pixels without data are never among them,
    for ``"all"`` neither: their filled values would be graph nodes of their own."""
    train_mask = np.asarray(train_mask, dtype=bool)
    has_data = scene.has_data
    if unlabeled == "all":
        rows, cols = np.nonzero(has_data)
        return rows, cols, np.where(train_mask[rows, cols], scene.labels[rows, cols], -1)
    rows, cols = np.nonzero(train_mask)
    y = scene.labels[rows, cols]
    if unlabeled is None:
        return rows, cols, y
    pool = ~train_mask & has_data
    flat = np.flatnonzero(pool.ravel())
    if int(unlabeled) < flat.size:
        rng = np.random.default_rng(seed)
        flat = np.sort(rng.choice(flat, int(unlabeled), replace=False))
    ur, uc = np.unravel_index(flat, train_mask.shape)
    hidden = np.full(flat.size, -1, dtype=y.dtype)
    return np.concatenate([rows, ur]), np.concatenate([cols, uc]), np.concatenate([y, hidden])


def unwrap(est: Any) -> tuple[Any, dict[str, Any] | None]:
    """A fitted self-training wrapper's final head (what is saved and predicts) and what the
    loop did; any other estimator as it is."""
    from sklearn.semi_supervised import SelfTrainingClassifier

    if not isinstance(est, SelfTrainingClassifier):
        return est, None
    final = est.estimator_
    labelled_at = np.asarray(est.labeled_iter_)
    return final, {
        "iterations": int(est.n_iter_),
        "pseudo_labelled": int((labelled_at > 0).sum()),
        "termination": str(est.termination_condition_),
    }


def open_inputs(
    scene: str | Path,
    cache: str | Path | None,
    context: str | Path | None = None,
    *,
    lazy: bool = False,
) -> Inputs:
    """The scene and (when given) its feature cache and context store, checked to belong to
    the same image."""
    sc = open_scene(scene, lazy=lazy)
    fc = FeatureCache.open(cache, expect_fingerprint=sc.image_fingerprint) if cache else None
    cs = ContextStore.open(context, expect_fingerprint=sc.image_fingerprint) if context else None
    return Inputs(sc, fc, cs)


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
    context_store: str | Path | None = None,
    context: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainedHead:
    """Fit one head on the scene's train pixels and save it to ``out``.

    ``context_store`` is the context store to read families from; ``context`` names them
    (default: the ``context`` entry of ``params``); ``progress(done, total)`` as
    :func:`fit_head` reports it.
    """
    read = {"scene": scene, "cache": cache, "context_store": context_store}
    check_outputs({"out": (out, HEAD)}, read)
    inputs = open_inputs(scene, cache, context_store)
    trained = fit_head(
        head,
        params or {},
        inputs,
        train_mask=inputs.scene.train,
        seed=seed,
        timesteps=timesteps,
        sites=sites,
        context=context,
        progress=progress,
    )
    trained.save(out)
    return trained
