"""Whole-scene array statistics in bounded memory.

A scene's cube can be most of a machine's memory; a float64 copy of it (what ``np.std`` makes)
is twice as much again. These helpers read the rows in blocks and give the same bits as the
whole-array numpy calls they replace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

#: Rows per block: 65,536 rows of 224 float64 bands is 117 MB.
BLOCK_ROWS = 65536


def column_moments(
    x: np.ndarray,
    keep: np.ndarray | None = None,
    *,
    cast_first: bool = True,
    block: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The float64 mean and standard deviation of each column of ``x`` ``(N, B)`` over the rows
    ``keep`` (a boolean ``(N,)``; ``None``: all), read ``block`` rows (default
    :data:`BLOCK_ROWS`) at a time.

    Bit for bit ``rows.mean(axis=0)`` and ``rows.std(axis=0)`` of ``rows =
    x[keep].astype(np.float64)`` (``cast_first``), or ``rows.mean(axis=0, dtype=np.float64)``
    and ``rows.std(axis=0, dtype=np.float64)`` of ``rows = x[keep]`` (not ``cast_first``). How
    numpy adds depends on the layout: rows laid out one after another (a C-order cube, or any
    ``x[keep]``) are added row after row, and so are the blocks here, the running sum carried
    from block to block (both forms give the same bits); columns laid out one after another (a
    band-sequential cube: GeoTIFF, ENVI BSQ) are each summed pairwise (in buffers of a few
    thousand values when numpy casts as it adds), so each column is taken whole, one at a time.
    """
    n = int(x.shape[0] if keep is None else np.count_nonzero(keep))
    if n == 0:
        nan = np.full(x.shape[1], np.nan)
        return nan, nan.copy()
    if keep is None and x.ndim == 2 and abs(x.strides[0]) < abs(x.strides[1]):
        return _by_column(x, cast_first)
    block = block or BLOCK_ROWS
    mean = _running_sum(_blocks(x, keep, block, lambda rows: rows)) / n
    squares = _running_sum(_blocks(x, keep, block, lambda rows: _squared(rows - mean)))
    return mean, np.sqrt(squares / n)


def pixels_where_all(cube: np.ndarray, test: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``(H, W)``: the pixels of ``cube`` ``(H, W, B)`` whose every band passes ``test``,
    computed about :data:`BLOCK_ROWS` pixels at a time (no full-size boolean array beside the
    cube)."""
    rows = max(1, BLOCK_ROWS // max(1, cube.shape[1]))
    out = np.empty(cube.shape[:2], dtype=bool)
    for y in range(0, cube.shape[0], rows):
        out[y : y + rows] = test(cube[y : y + rows]).all(axis=-1)
    return out


def _by_column(x: np.ndarray, cast_first: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each column's float64 mean and std, one column in memory at a time."""
    mean, std = np.empty(x.shape[1]), np.empty(x.shape[1])
    for j in range(x.shape[1]):
        column = x[:, j].astype(np.float64) if cast_first else x[:, j]
        mean[j] = column.mean(dtype=np.float64)
        std[j] = column.std(dtype=np.float64)
    return mean, std


def _squared(d: np.ndarray) -> np.ndarray:
    np.multiply(d, d, out=d)
    return d


def _blocks(
    x: np.ndarray,
    keep: np.ndarray | None,
    block: int,
    f: Callable[[np.ndarray], np.ndarray],
) -> Iterator[np.ndarray]:
    """``f`` of each block of float64 rows of ``x`` (only the rows ``keep`` marks)."""
    for start in range(0, x.shape[0], block):
        rows = x[start : start + block]
        if keep is not None:
            rows = rows[keep[start : start + block]]
        if len(rows):
            yield f(rows.astype(np.float64))


def _running_sum(blocks: Iterator[np.ndarray]) -> np.ndarray:
    """The sum over the first axis of the blocks stacked, added in row order (as numpy does)."""
    total = None
    for rows in blocks:
        if total is not None:  # the running sum becomes the block's first row
            rows = np.concatenate([total[None], rows])
        total = np.add.reduce(rows, axis=0)
    assert total is not None
    return total
