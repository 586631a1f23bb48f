"""Label encoding and train/test split protocols.

Labels are kept as an index map: ``-1`` for unlabeled pixels and ``0 .. K-1`` for the classes,
with ``class_ids[k]`` the id the user's file gave class ``k`` (SalinasA uses 1, 10, 11, ...).

Protocols:

* ``official`` — train and test masks given by the user (e.g. the Augsburg or DFC 2013 files).
* ``per-class`` — ``n`` labeled pixels per class drawn at random (seeded); every other labeled
  pixel is test.
* ``fraction`` — a fraction of each class's labeled pixels (at least one) is train.
* ``blocks`` — spatially disjoint: the scene is cut into square blocks, whole blocks go to train or
  to test, train pixels are drawn from train blocks only, and test pixels closer than ``buffer``
  to a train block are dropped, so overlapping patches cannot leak test pixels into training.
"""

from __future__ import annotations

import numbers
from typing import Literal

import numpy as np
from scipy import ndimage

from pipeline.errors import LabelError, ShapeMismatchError, SplitError
from pipeline.utils.checks import check_seed, counted

__all__ = ["SPLIT_PROTOCOLS", "check_split_options", "encode_labels", "make_split"]

SPLIT_PROTOCOLS = ("official", "per-class", "fraction", "blocks")
SmallClassPolicy = Literal["error", "take-all"]
_MAX_ID = np.iinfo(np.int64).max


def encode_labels(
    label_map: np.ndarray, *, source: str = "label map"
) -> tuple[np.ndarray, np.ndarray]:
    """Map arbitrary non-negative integer ids (0 = unlabeled) to contiguous class indices.

    Args:
        label_map: ``(height, width)`` integer-valued map.
        source: how to name the map in errors (a file path, usually).

    Returns:
        ``(index_map, class_ids)``: ``index_map`` is int32 with ``-1`` for unlabeled pixels,
        ``class_ids`` the sorted original ids of the classes.

    Raises:
        LabelError: non-finite, non-integer or negative values, or no labeled pixel at all.
    """
    values = np.asarray(label_map)
    if values.dtype == bool:
        values = values.astype(np.int64)
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values)
        if bad.any():
            raise LabelError(
                f"{source} holds {int(bad.sum())} NaN/inf values; labels must be integers"
            )
        frac = values != np.round(values)
        if frac.any():
            example = float(values[frac][0])
            raise LabelError(
                f"{source} holds {int(frac.sum())} non-integer values (e.g. {example}); "
                "labels must be whole numbers with 0 = unlabeled"
            )
    elif values.dtype.kind not in "iu":
        raise LabelError(f"{source} has dtype {values.dtype}; labels must be integers")
    if values.size and values.dtype.kind in "uf" and values.max() > _MAX_ID:
        raise LabelError(
            f"{source} holds label ids up to {values.max()}, beyond the largest id hsicache "
            f"keeps ({_MAX_ID}); renumber the classes"
        )
    ints = values.astype(np.int64)
    if (ints < 0).any():
        raise LabelError(
            f"{source} holds {counted(int((ints < 0).sum()), 'negative value')} "
            f"(min {int(ints.min())}); labels must be >= 0 with 0 = unlabeled"
        )
    class_ids = np.unique(ints[ints > 0])
    if class_ids.size == 0:
        raise LabelError(f"{source} has no labeled pixel (every value is 0)")
    index_map = np.full(ints.shape, -1, dtype=np.int32)
    labeled = ints > 0
    index_map[labeled] = np.searchsorted(class_ids, ints[labeled]).astype(np.int32)
    return index_map, class_ids


def check_split_options(
    protocol: str | None,
    per_class: int | None,
    fraction: float | None,
    small_classes: str,
    block_size: int,
    buffer: int,
    seed: int,
) -> None:
    """The split options that need no labels (``prepare`` checks them before reading any).

    Raises:
        SplitError: an unknown protocol or small-class policy, a count, fraction, block size,
            buffer or seed out of range.
    """
    if protocol is not None and protocol not in SPLIT_PROTOCOLS:
        raise SplitError(f"unknown `split={protocol}`: choose one of {', '.join(SPLIT_PROTOCOLS)}")
    if per_class is not None and not (isinstance(per_class, numbers.Integral) and per_class >= 1):
        raise SplitError(f"`per_class` must be at least 1, got {per_class}")
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise SplitError(f"`fraction` must be in (0, 1), got {fraction}")
    if small_classes not in ("error", "take-all"):
        raise SplitError(f"`small_classes` must be one of error, take-all; got {small_classes!r}")
    if block_size < 1:
        raise SplitError(f"`block_size` must be at least 1, got {block_size}")
    if buffer < 0:
        raise SplitError(f"`buffer` must be >= 0, got {buffer}")
    check_seed("seed", seed)


def make_split(
    protocol: str,
    labels: np.ndarray,
    class_ids: np.ndarray,
    *,
    seed: int = 0,
    per_class: int | None = None,
    fraction: float | None = None,
    small_classes: SmallClassPolicy = "error",
    block_size: int = 16,
    buffer: int = 0,
    train_mask: np.ndarray | None = None,
    test_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split the labeled pixels into disjoint train and test masks.

    Args:
        protocol: one of :data:`SPLIT_PROTOCOLS`.
        labels: index map from :func:`encode_labels` (``-1`` = unlabeled).
        class_ids: original class ids, for messages.
        seed: random seed; the same seed gives the same split.
        per_class: labeled pixels per class (``per-class``, and ``blocks`` when given).
        fraction: fraction of each class (``fraction``, and ``blocks`` without ``per_class``).
        small_classes: what to do when a class has fewer than ``per_class`` pixels: ``"error"``,
            or ``"take-all"`` (all of that class goes to train, none to test).
        block_size: block side in pixels (``blocks``).
        buffer: test pixels within this many pixels of a train block are dropped (``blocks``).
        train_mask, test_mask: the given masks (``official``); any non-zero value is "in".

    Returns:
        ``(train, test)`` boolean masks of the label map's shape.

    Raises:
        SplitError: the split cannot be made (too few pixels, overlapping masks, empty train).
    """
    check_split_options(protocol, per_class, fraction, small_classes, block_size, buffer, seed)
    rng = np.random.default_rng(seed)
    labeled = labels >= 0
    if protocol == "official":
        train, test = _official(labels, train_mask, test_mask)
    elif protocol == "per-class":
        need = _need_per_class(labels, class_ids, per_class, None, small_classes)
        train = _draw(labels, labeled, need, rng)
        test = labeled & ~train
    elif protocol == "fraction":
        if fraction is None:
            raise SplitError(
                "`split=fraction` needs `fraction=F`, the share of each class to train on"
            )
        need = _need_per_class(labels, class_ids, None, fraction, small_classes)
        train = _draw(labels, labeled, need, rng)
        test = labeled & ~train
    else:
        train, test = _blocks(
            labels, class_ids, rng, per_class, fraction, small_classes, block_size, buffer
        )
    if not train.any():
        raise SplitError("the train set is empty: no labeled pixel falls in the train mask")
    return train, test


def _official(
    labels: np.ndarray, train_mask: np.ndarray | None, test_mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    if train_mask is None or test_mask is None:
        raise SplitError("the `official` split needs both `train_mask` and `test_mask`")
    for name, mask in (("train mask", train_mask), ("test mask", test_mask)):
        if mask.shape != labels.shape:
            raise ShapeMismatchError(
                f"{name} has shape {mask.shape} but the label map has {labels.shape}"
            )
    train = np.asarray(train_mask) != 0
    test = np.asarray(test_mask) != 0
    overlap = train & test
    if overlap.any():
        ys, xs = np.nonzero(overlap)
        raise SplitError(
            f"train and test masks overlap in {int(overlap.sum())} pixels "
            f"(first at row {ys[0]}, column {xs[0]}); they must be disjoint"
        )
    unlabeled_train = train & (labels < 0)
    if unlabeled_train.any():
        raise SplitError(
            f"{int(unlabeled_train.sum())} train-mask pixels have no label in the label map"
        )
    return train, test & (labels >= 0)


def _need_per_class(
    labels: np.ndarray,
    class_ids: np.ndarray,
    per_class: int | None,
    fraction: float | None,
    small_classes: SmallClassPolicy,
) -> np.ndarray:
    """How many train pixels each class needs."""
    counts = np.bincount(labels[labels >= 0], minlength=len(class_ids))
    if per_class is not None:
        need = np.full(len(class_ids), per_class)
        short = np.flatnonzero(counts < need)
        if short.size and small_classes != "take-all":
            k = short[0]
            raise SplitError(
                f"class {class_ids[k]} has only {counts[k]} labeled pixels, fewer than "
                f"`per_class={per_class}`; lower `per_class` or pass `small_classes=take-all`"
            )
        return np.minimum(need, counts)
    if fraction is None:
        raise SplitError("give `per_class=N` or `fraction=F` for this split")
    return np.maximum(1, np.round(counts * fraction).astype(int))


def _draw(
    labels: np.ndarray, pool: np.ndarray, need: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Draw ``need[k]`` pixels of each class ``k`` from ``pool``, class by class."""
    flat = labels.ravel()
    pool_flat = pool.ravel()
    train = np.zeros(flat.shape, dtype=bool)
    for k, n in enumerate(need):
        idx = np.flatnonzero((flat == k) & pool_flat)
        if n >= idx.size:
            train[idx] = True
        else:
            train[rng.choice(idx, size=int(n), replace=False)] = True
    return train.reshape(labels.shape)


def _blocks(
    labels: np.ndarray,
    class_ids: np.ndarray,
    rng: np.random.Generator,
    per_class: int | None,
    fraction: float | None,
    small_classes: SmallClassPolicy,
    block_size: int,
    buffer: int,
) -> tuple[np.ndarray, np.ndarray]:
    need = _need_per_class(labels, class_ids, per_class, fraction, small_classes)
    h, w = labels.shape
    by, bx = np.arange(h) // block_size, np.arange(w) // block_size
    block_of = by[:, None] * (bx[-1] + 1) + bx[None, :]
    n_blocks = int(block_of.max()) + 1
    k_classes = len(class_ids)
    labeled = labels >= 0
    # per-block class counts, (n_blocks, K)
    counts = np.zeros((n_blocks, k_classes), dtype=np.int64)
    np.add.at(counts, (block_of[labeled], labels[labeled]), 1)
    have = np.zeros(k_classes, dtype=np.int64)
    train_blocks = np.zeros(n_blocks, dtype=bool)
    for b in rng.permutation(n_blocks):
        if np.any((have < need) & (counts[b] > 0)):
            train_blocks[b] = True
            have += counts[b]
        if np.all(have >= need):
            break
    in_train_block = train_blocks[block_of]
    train = _draw(labels, labeled & in_train_block, need, rng)
    near_train = in_train_block
    if buffer > 0:
        # square structuring element: chessboard distance, as a square patch reaches
        near_train = ndimage.binary_dilation(
            in_train_block, structure=np.ones((3, 3), dtype=bool), iterations=buffer
        )
    test = labeled & ~near_train
    return train, test
