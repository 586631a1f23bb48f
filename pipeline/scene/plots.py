"""Figures for a person to look at. Every function returns a Figure and never calls ``show()``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from pipeline.scene.core import Scene

__all__ = ["class_colors", "plot_scene_preview", "save_png"]


def save_png(fig: Any, path: str | Path, *, option: str, dpi: int = 120) -> None:
    """Write ``fig`` to ``path`` as a PNG marked as hsicache's, atomically, and close it."""
    import matplotlib.pyplot as plt

    from pipeline.io.outputs import PNG, png_metadata
    from pipeline.io.store import atomic_output

    try:
        with atomic_output(path, PNG, option=option) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, metadata=png_metadata())
    finally:
        plt.close(fig)


def class_colors(n: int) -> np.ndarray:
    """``(n, 3)`` distinct RGB colours in [0, 1] (tab20, then hsv for more)."""
    import matplotlib

    if n <= 20:
        return np.asarray(matplotlib.colormaps["tab20"](np.arange(n)))[:, :3]
    return np.asarray(matplotlib.colormaps["hsv"](np.linspace(0, 1, n, endpoint=False)))[:, :3]


def image_inches(h: int, w: int, longest: float = 9.0) -> tuple[float, float]:
    """Width and height in inches for an ``h`` x ``w`` image: 60 pixels per inch, shrunk so
    that its longest side is at most ``longest`` (a wide scene keeps its aspect, not a fixed
    box)."""
    scale = min(1 / 60, longest / max(h, w, 1))
    return w * scale, h * scale


def plot_scene_preview(scene: Scene) -> Figure:
    """The backbone's 3-band rendering with train pixels marked, beside the labels and test set.

    Left: the rendering, train pixels as class-coloured dots with a white edge. Right: the label
    map, test pixels in full colour and everything else dimmed. A scene more than twice as wide
    as tall has the two one above the other, the legend below.
    """
    h, w = scene.shape
    colors = class_colors(scene.n_classes)
    wide = w > 2 * h
    if wide:
        legend_rows = -(-scene.n_classes // 4)
        fig = Figure(figsize=(11, 2 * 11 * h / w + 0.8 + 0.2 * legend_rows), layout="constrained")
        ax_rgb, ax_lab = fig.subplots(2, 1)
    else:
        fig = Figure(figsize=(11, 4.2 * h / max(w, 1) + 0.8), layout="constrained")
        ax_rgb, ax_lab = fig.subplots(1, 2)
    ax_rgb.imshow(scene.rgb, interpolation="nearest")
    ys, xs = np.nonzero(scene.train)
    size = 30 if ys.size < 200 else 8
    ax_rgb.scatter(
        xs, ys, c=colors[scene.labels[ys, xs]], s=size, edgecolors="white", linewidths=0.6
    )
    rendering = scene.attrs.get("rendering", {})
    bands = rendering.get("bands")
    shown_bands = f", bands {','.join(map(str, bands))}" if bands else ""
    ax_rgb.set_title(
        f"rendering ({rendering.get('mode', '?')}{shown_bands}, gamma "
        f"{rendering.get('gamma')}); {ys.size} train px",
        fontsize=9,
    )
    # -1 = no data (black), 0 = unlabeled (dark grey), 1 = train or held out (white),
    # 2.. = test pixel of class k
    shown = np.where(scene.test, scene.labels + 2, np.where(scene.labels >= 0, 1, 0))
    steps = [[0.3, 0.3, 0.3], [1.0, 1.0, 1.0], *colors]
    title = f"{int(scene.test.sum())} test px by class; white = train, grey = unlabeled"
    low = 0
    if scene.no_data is not None:
        shown[scene.no_data] = low = -1
        steps, title = [[0.0, 0.0, 0.0], *steps], title + ", black = no data"
    cmap = ListedColormap(np.vstack(steps))
    ax_lab.imshow(shown, cmap=cmap, vmin=low, vmax=scene.n_classes + 1, interpolation="nearest")
    ax_lab.set_title(title, fontsize=9)
    handles = [
        _patch(colors[k], f"{scene.class_ids[k]} {scene.class_names[k]}")
        for k in range(scene.n_classes)
    ]
    if wide:
        fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=7)
    else:
        ax_lab.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    for ax in (ax_rgb, ax_lab):
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def _patch(color: np.ndarray, label: str) -> object:
    from matplotlib.patches import Patch

    return Patch(facecolor=color, edgecolor="none", label=label)
