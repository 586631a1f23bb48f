"""``curve``: accuracy against labels per class, head by head.

For every count of train pixels per class and every seed, the scene's split protocol is drawn
again with that count (:func:`pipeline.evaluation.scoring.resplit`), each head's recipe is refitted
on it reusing the feature cache and the context store, and scored on that draw's test pixels. The
result is a list of rows ``{head, per_class, oa_mean, oa_std, aa_mean, kappa_mean}``, a CSV for a
DVC plot (a ``per_class`` column, then one OA column per head: x = labels per class, one line per
head) and a PNG with a ±std band per head.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.utils.checks import check_int, check_seeds

__all__ = ["CURVE_KEYS", "label_curve", "plot_curve", "run_curve"]

#: The fields of every row of ``curve --json``.
CURVE_KEYS = ("head", "per_class", "oa_mean", "oa_std", "aa_mean", "kappa_mean")


def label_curve(
    inputs: Any,
    heads: dict[str, dict[str, Any]],
    counts: Sequence[int],
    seeds: Sequence[int],
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Every head's OA/AA/kappa (mean ± std over ``seeds``) at every count in ``counts``.

    Returns:
        ``{"rows": [...CURVE_KEYS, per_seed_oa], "protocol": the card of the last fit}``.
    """
    from pipeline.evaluation.scoring import check_recipe, refit_over_seeds, warn_split

    if not heads:
        raise ConfigError("`heads` names no head: give e.g. `heads=svm,propagate`")
    if not counts:
        raise ConfigError("`per_class` needs at least one count")
    for n in counts:
        check_int("per_class", n, low=1)
    counts = sorted(set(int(n) for n in counts))
    for n in counts:  # a count a class cannot give fails now, before any fit
        _check_count(inputs.scene, seeds, n)
    for name, params in heads.items():  # and so does a bad recipe
        check_recipe(inputs, name, params)
    warn_split(inputs.scene, seeds, counts[0])
    total, done, rows, protocol = len(heads) * len(counts) * len(seeds), [0], [], {}

    def step(k: int, n: int) -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    for name, params in heads.items():
        for n in counts:
            run = refit_over_seeds(inputs, name, params, seeds, progress=step, per_class=int(n))
            protocol = run["protocol"]
            summary = {
                f"{m}_{s}": run[m][s] for m in ("oa", "aa", "kappa") for s in ("mean", "std")
            }
            per_seed = [r["oa"] for r in run["seeds"]]
            rows.append({"head": name, "per_class": int(n), **summary, "per_seed_oa": per_seed})
    protocol = {**protocol, "per_class": [int(n) for n in counts]}
    return {"rows": rows, "protocol": protocol}


def _check_count(scene: Any, seeds: Sequence[int], n: int) -> None:
    """``n`` train pixels per class can be drawn with every seed, or a ConfigError naming
    ``per_class`` (the scene's own small-class policy, from ``prepare``, applies)."""
    from pipeline.errors import SplitError
    from pipeline.evaluation.scoring import resplit

    try:
        for seed in seeds:
            resplit(scene, seed, n)
    except SplitError as err:
        short = str(err).split(";")[0]
        raise ConfigError(
            f"{short}: lower `per_class`, or make the scene again with `hsicache prepare "
            "--small-classes take-all` (a small class then gives all its pixels)"
        ) from None


def plot_curve(result: dict[str, Any]) -> Any:
    """OA against labels per class, a line and a ±std band per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for head in dict.fromkeys(r["head"] for r in result["rows"]):
        mine = [r for r in result["rows"] if r["head"] == head]
        x = np.array([r["per_class"] for r in mine])
        m = np.array([r["oa_mean"] for r in mine]) * 100
        s = np.array([r["oa_std"] for r in mine]) * 100
        ax.plot(x, m, marker="o", label=head)
        ax.fill_between(x, m - s, m + s, alpha=0.2)
    ax.set_xlabel("labels per class")
    ax.set_ylabel("OA (%)")
    seeds = result["protocol"].get("seeds", [])
    ax.set_title(f"accuracy against labels ({len(seeds)} seeds, mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run_curve(
    *,
    scene: str | Path,
    cache: str | Path | None,
    context: str | Path | None,
    heads: list[str],
    recipes: str | Path | None,
    counts: Sequence[int],
    seeds: Sequence[int],
    out: str | Path | None = None,
    csv_path: str | Path | None = None,
    png: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Check the outputs, :func:`label_curve` the named heads (entries of ``recipes``, or bare
    kinds) and write the JSON (a DVC metrics file), the CSV (a DVC plot) and the PNG."""
    from pipeline.evaluation.compare import head_recipe
    from pipeline.heads.training import open_inputs
    from pipeline.io.outputs import CURVE_CSV, CURVE_METRICS, PNG, check_outputs

    if not heads:
        raise ConfigError("`heads` names no head: give e.g. `heads=svm,propagate`")
    check_seeds("seeds", seeds)
    check_outputs(
        {"out": (out, CURVE_METRICS), "csv_path": (csv_path, CURVE_CSV), "png": (png, PNG)},
        {"scene": scene, "cache": cache, "context": context, "recipes": recipes},
    )
    table = {name: head_recipe(name, recipes) for name in heads}
    result = label_curve(open_inputs(scene, cache, context), table, counts, seeds, progress)
    _write(result, out, csv_path, png)
    return result


def _write(result: dict[str, Any], out: Any, csv_path: Any, png: Any) -> None:
    import json

    from pipeline.evaluation.scoring import METRICS_FORMAT
    from pipeline.io.outputs import CURVE_CSV, CURVE_METRICS
    from pipeline.io.store import all_or_nothing, atomic_output, jsonable
    from pipeline.scene.plots import save_png

    with all_or_nothing():  # several outputs: all of them or none
        if out is not None:
            body = {"format": METRICS_FORMAT, "kind": "curve", **result}
            with atomic_output(out, CURVE_METRICS, option="out") as tmp:
                tmp.write_text(json.dumps(jsonable(body), indent=2))
        if csv_path is not None:
            heads = list(dict.fromkeys(r["head"] for r in result["rows"]))
            counts = list(dict.fromkeys(r["per_class"] for r in result["rows"]))
            oa = {(r["head"], r["per_class"]): f"{r['oa_mean']:.6f}" for r in result["rows"]}
            with atomic_output(csv_path, CURVE_CSV, option="csv") as tmp, tmp.open("w") as f:
                writer = csv.writer(f)
                writer.writerow(["per_class", *heads])
                for n in counts:
                    writer.writerow([n, *(oa[(h, n)] for h in heads)])
        if png is not None:
            save_png(plot_curve(result), png, option="png")
