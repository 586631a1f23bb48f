"""``compare``: heads side by side over re-drawn splits, and what the diffusion features add.

Each named head's recipe (its ``heads:`` entry, or a bare kind) is refitted on the scene's split
protocol drawn again for every seed, reusing the feature cache and the context store, and scored
on that seed's test pixels (:func:`pipeline.evaluation.scoring.refit_over_seeds`). For every head
that reads the cached diffusion features, its twin without them is fitted on the same splits and the
difference is reported, so the table answers, head by head, what those features add on top of
the spectrum and its context:

==================  ==============================================================
head reads          twin without the diffusion features
==================  ==============================================================
``film``            the spectral MLP on the same spectrum and context, with FiLM's
                    spectral PCA and width (FiLM without features to modulate is an MLP
                    on its spectral branch)
``concat``          the spectral MLP with the same settings, on the same columns
classic, ``both``   the same classifier with ``use: spectral``
``spatial`` only    none (nothing would be left to read)
==================  ==============================================================

A twin keeps the head's training settings, ``n_members`` included (an ensemble's twin averages
as many nets), its ``self_training`` loop and its ``select`` choices, and drops what only the
diffusion features concern: ``timesteps``, ``sites``, FiLM's ``width`` and ``spatial_dropout``
(as parameters and as ``select`` candidates).

Differences are paired (:func:`paired_difference`): the two heads were fitted and scored on the
same split of each seed, so the table gives the mean of the per-seed differences, their std and
on how many seeds the head came out above. With ``reference``, every head is also set against
that one head of the table in the same way. The seeds' test sets share most of their pixels, so
the seeds are not independent samples: no p-value is claimed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.utils.checks import check_seeds

__all__ = [
    "COMPARE_KEYS",
    "compare_heads",
    "head_recipe",
    "markdown_table",
    "paired_difference",
    "plot_comparison",
    "run_comparison",
    "twin_without",
]

#: The fields every row of ``compare --json`` has.
COMPARE_KEYS = (
    "head",
    "oa_mean",
    "oa_std",
    "aa_mean",
    "aa_std",
    "kappa_mean",
    "kappa_std",
    "per_seed_oa",
    "reads",
    "without_diffusion_oa_mean",
    "diffusion_gain",
)


def twin_without(name: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe of head ``name`` without the cached diffusion features (module docstring),
    or ``None`` when nothing would be left."""
    from pipeline.heads.training import split_recipe

    recipe = split_recipe(name, params)
    if recipe.mode != "both":
        return None  # spectral heads read no diffusion features; spatial ones nothing else
    if recipe.kind not in ("film", "concat"):
        arrays = ("timesteps", "sites")  # the cached arrays are what the twin goes without
        return {
            **{k: v for k, v in params.items() if k not in arrays},
            "kind": recipe.kind,
            "use": "spectral",
        }
    keep = (
        "hidden",
        "dropout",
        "learning_rate",
        "weight_decay",
        "max_epochs",
        "batch_size",
        "mixup_alpha",
        "class_balanced",
        "validation_fraction",
        "min_val_per_class",
        "patience",
        "converged_loss",
        "spectral_pca",
        "n_members",  # an ensemble's twin is an ensemble of as many nets
        "device",
    )
    twin = {k: v for k, v in recipe.kwargs.items() if k in keep}
    if recipe.kind == "film":  # FiLM's own defaults where its entry leaves them
        twin.setdefault("spectral_pca", 30)
        twin.setdefault("hidden", 128)
    if recipe.self_training is not None:
        twin["self_training"] = dict(recipe.self_training)
    if recipe.select is not None:  # the choices the twin can make too
        chosen = {k: v for k, v in recipe.select.items() if k in (*keep, "context", "folds")}
        if set(chosen) - {"folds"}:
            twin["select"] = chosen
    return {**twin, "kind": "spectral", "context": list(recipe.context)}


def compare_heads(
    *,
    scene: str | Path,
    cache: str | Path | None,
    context: str | Path | None,
    heads: dict[str, dict[str, Any]],
    seeds: Sequence[int],
    reference: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every head's OA/AA/kappa over ``seeds`` and what the diffusion features add.

    Args:
        scene, cache, context: the scene store, its feature cache and its context store
            (either store may be ``None`` when no head reads it).
        heads: ``{name: recipe}`` in table order.
        seeds: split seeds.
        reference: one of ``heads`` that every other head is set against, seed by seed
            (each row's ``vs_reference``: :func:`paired_difference`).
        progress: ``progress(done_fits, total_fits)``.
        warn: called with a line for each head whose context looks further than a blocks
            split's buffer (its test pixels then see the train pixels' neighbourhoods).

    Returns:
        ``{"protocol": protocol card, "rows": [one dict per head with COMPARE_KEYS...]}``.
    """
    from pipeline.evaluation.scoring import check_recipe, refit_over_seeds, warn_split
    from pipeline.heads.training import open_inputs

    if not heads:
        raise ConfigError("`heads` names no head")
    reference = _check_reference(reference, heads)
    inputs = open_inputs(scene, cache, context)
    twins = {name: twin_without(name, params) for name, params in heads.items()}
    for name, params in heads.items():  # every recipe checked before the first fit
        check_recipe(inputs, name, params)
    total = len(seeds) * (len(heads) + sum(t is not None for t in twins.values()))
    done = [0]

    def step(k: int, n: int) -> None:
        if progress and k:
            done[0] += 1
            progress(done[0], total)

    warn_split(inputs.scene, seeds)
    rows, protocol = [], None
    for name, params in heads.items():
        started = time.perf_counter()
        run = refit_over_seeds(inputs, name, params, seeds, progress=step)
        protocol = run["protocol"]
        twin = twins[name]
        base = (
            refit_over_seeds(inputs, f"{name} (no diffusion)", twin, seeds, progress=step)
            if twin is not None
            else None
        )
        rows.append(_row(name, run, base, time.perf_counter() - started))
        if warn is not None:
            _warn_reach(name, run, inputs, warn)
    if reference is not None:
        ref = next(r for r in rows if r["head"] == reference)
        for r in rows:
            r["vs_reference"] = (
                None
                if r is ref
                else {"head": reference, **paired_difference(r["per_seed_oa"], ref["per_seed_oa"])}
            )
    return {"protocol": protocol, "rows": rows, "reference": reference}


def _check_reference(reference: str | None, heads: Collection[str]) -> str | None:
    """``reference`` when it is one of ``heads``, ``None`` when blank; else a ConfigError."""
    if not reference:
        return None
    if reference not in heads:
        raise ConfigError(
            f"`reference` head `{reference}` is not one of `heads` ({', '.join(heads)}): add "
            "it to them, or leave `reference` blank (a params file's `compare.reference` "
            "counts as given)"
        )
    return reference


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """``a - b`` seed by seed, for two heads scored on the same splits.

    Returns:
        ``{"mean", "std", "per_seed", "above", "below"}``: the mean and std (the population
        std, as for the table's other ±) of the per-seed differences, the differences
        themselves, and on how many seeds ``a`` came out above and below ``b``.
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores need as many seeds on each side, got {len(a)}, {len(b)}")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return {
        "mean": float(d.mean()),
        "std": float(d.std()),
        "per_seed": d.tolist(),
        "above": int((d > 0).sum()),
        "below": int((d < 0).sum()),
    }


def _row(name: str, run: dict[str, Any], base: dict[str, Any] | None, seconds: float) -> dict:
    sel = run["selection"]
    reads = (["spectrum"] if sel["mode"] in ("spectral", "both") else []) + list(sel["context"])
    if sel["mode"] in ("spatial", "both"):
        reads.append(
            "diffusion " + ",".join(f"t{t}:{s}" for t in sel["timesteps"] for s in sel["sites"])
        )
    row = {
        "head": name,
        "oa_mean": run["oa"]["mean"],
        "oa_std": run["oa"]["std"],
        "aa_mean": run["aa"]["mean"],
        "aa_std": run["aa"]["std"],
        "kappa_mean": run["kappa"]["mean"],
        "kappa_std": run["kappa"]["std"],
        "per_seed_oa": [r["oa"] for r in run["seeds"]],
        "reads": reads,
        "without_diffusion_oa_mean": base["oa"]["mean"] if base else None,
        "diffusion_gain": run["oa"]["mean"] - base["oa"]["mean"] if base else None,
        "seconds": seconds,
    }
    if base:
        row["without_diffusion_per_seed_oa"] = [r["oa"] for r in base["seeds"]]
        gain = paired_difference(row["per_seed_oa"], row["without_diffusion_per_seed_oa"])
        row["diffusion_gain_std"] = gain["std"]
        row["diffusion_gain_above"] = gain["above"]
    return row


def _warn_reach(name: str, run: dict[str, Any], inputs: Any, warn: Callable[[str], None]) -> None:
    """A blocks split whose buffer is narrower than the windows the head's features cover.

    A feature that looks ``r`` pixels around its pixel spans a window of ``2 r`` (meanW: W);
    unless the buffer is at least that wide, a test pixel's window and a train pixel's window
    share pixels, so train pixels' surroundings leak into the test features.
    """
    card = run["protocol"]
    if card["split"] != "blocks":
        return
    buffer = int(card.get("buffer") or 0)
    span = {f: 2 * inputs.context.reach(f) for f in run["selection"]["context"]}
    if run["selection"]["mode"] in ("spatial", "both") and inputs.cache is not None:
        ident = inputs.cache.attrs["identity"]  # a pixel sees its patch from its owned square
        zoom = int(ident.get("zoom", 1))  # patch and stride are in upsampled pixels
        reach = (int(ident["patch"]) + int(ident["stride"])) // 2 - 1
        span["diffusion features"] = 2 * -(-reach // zoom)
    wide = {f: r for f, r in span.items() if r > buffer or r < 0}
    if wide:
        shown = ", ".join(f"{f} ({'unbounded' if r < 0 else f'{r} px'})" for f, r in wide.items())
        warn(
            f"head `{name}` reads features spanning more than the blocks split's buffer of "
            f"{buffer} px: {shown}; test and train pixels' windows overlap (prepare the scene "
            "with a `buffer` at least that wide)"
        )


def markdown_table(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table with its protocol card."""
    card, reference = result["protocol"], result.get("reference")
    columns = ["head", "reads", "OA", "AA", "kappa", "without diffusion features"]
    columns += ["diffusion adds", *([f"vs {reference}"] if reference else [])]
    lines = [
        "<!-- hsicache compare: written by `hsicache compare`; do not edit -->",
        "",
        f"Scene `{card.get('scene')}` (image {str(card.get('image_fingerprint'))[:12]}). "
        f"Split `{card['split']}`"
        + (f", {card['per_class']} labels per class" if card.get("per_class") else "")
        + (f", buffer {card['buffer']} px" if card["split"] == "blocks" else "")
        + f"; seeds {', '.join(map(str, card['seeds']))}; OA / AA / kappa in %, mean ± std.",
        *([f"Note: {card['split_note']}."] if card.get("split_note") else []),
        f"Model selection: {card['model_selection']}.",
        "Differences are paired: both heads were fitted and scored on the same split of each "
        "seed; mean ± std of the per-seed differences, and on how many seeds the head came out "
        "above. The seeds' test sets share pixels: they are not independent samples.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    n = len(card["seeds"])
    for r in result["rows"]:
        cells = [r["head"], "; ".join(r["reads"]), _pm(r, "oa"), _pm(r, "aa"), _pm(r, "kappa")]
        cells += _gain_cells(r, n)
        if reference:
            vs = r.get("vs_reference")
            cells.append("-" if vs is None else _difference(vs["mean"], vs["std"], vs["above"], n))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _gain_cells(row: dict[str, Any], n: int) -> list[str]:
    """The twin's OA and what the diffusion features add, or dashes for a head without twin."""
    if row["without_diffusion_oa_mean"] is None:
        return ["-", "-"]
    gain = _difference(
        row["diffusion_gain"], row["diffusion_gain_std"], row["diffusion_gain_above"], n
    )
    return [f"{100 * row['without_diffusion_oa_mean']:.1f}", gain]


def _difference(mean: float, std: float, above: int, n: int) -> str:
    """A paired difference in points: ``+0.3 ± 1.5 (11 of 20 above)``; one seed has no ±,
    and a mean that rounds to zero has no sign."""
    shown = f"{100 * mean:+.1f}"
    shown = "0.0" if shown in ("+0.0", "-0.0") else shown
    spread = f" ± {100 * std:.1f}" if n > 1 else ""
    return f"{shown}{spread} ({above} of {n} above)"


def _pm(row: dict[str, Any], key: str) -> str:
    return f"{100 * row[f'{key}_mean']:.1f} ± {100 * row[f'{key}_std']:.1f}"


def plot_comparison(result: dict[str, Any], title: str = "") -> Any:
    """A bar chart of OA per head with ±std error bars, its no-diffusion twin beside it."""
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.2))
    ax.bar(
        x - 0.2,
        [100 * r["oa_mean"] for r in rows],
        0.4,
        yerr=[100 * r["oa_std"] for r in rows],
        capsize=3,
        label="head",
    )
    twins = [(i, r) for i, r in enumerate(rows) if r["without_diffusion_oa_mean"] is not None]
    if twins:
        heights = [100 * r["without_diffusion_oa_mean"] for _, r in twins]
        ax.bar(
            [i + 0.2 for i, _ in twins],
            heights,
            0.4,
            color="lightgray",
            label="same without diffusion features",
        )
    ax.set_xticks(x, [r["head"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("overall accuracy, % (mean ± std over seeds)")
    card = result["protocol"]
    ax.set_title(title or f"{card['split']} split, seeds {card['seeds']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    return fig


def run_comparison(
    *,
    scene: str | Path,
    cache: str | Path | None,
    context: str | Path | None,
    heads: Sequence[str],
    recipes: str | Path | None,
    seeds: Sequence[int],
    reference: str | None = None,
    out: str | Path | None = None,
    markdown: str | Path | None = None,
    png: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``hsicache compare``: check the outputs, compare the heads, write what was asked for.

    Args:
        heads: head names: entries under ``heads:`` of ``recipes`` (a params file), or bare
            kinds.
        reference: one of ``heads`` to set every other head against (blank: none).
        out, markdown, png: the JSON table (a DVC metrics file), the Markdown table, the chart.
        Others: as :func:`compare_heads`.
    """
    from pipeline.io.outputs import COMPARE_METRICS, MARKDOWN, PNG, check_outputs

    if not heads:
        raise ConfigError("`heads` names no head: give e.g. `heads=svm,film`")
    check_seeds("seeds", seeds)
    check_outputs(
        {"out": (out, COMPARE_METRICS), "markdown": (markdown, MARKDOWN), "png": (png, PNG)},
        {"scene": scene, "cache": cache, "context": context, "recipes": recipes},
    )
    table = {name: head_recipe(name, recipes) for name in heads}
    result = compare_heads(
        scene=scene,
        cache=cache,
        context=context,
        heads=table,
        seeds=seeds,
        reference=reference,
        progress=progress,
        warn=warn,
    )
    _write(result, out, markdown, png)
    return result


def head_recipe(name: str, recipes: str | Path | None) -> dict[str, Any]:
    """The ``heads.<name>`` entry of the params file, or ``{}`` for a bare kind."""
    from pipeline.heads.registry import check_kind
    from pipeline.io.params import head_settings, load_section

    entries = load_section(Path(recipes), "heads") if recipes is not None else {}
    if name in entries:
        return head_settings(Path(recipes), name)  # type: ignore[arg-type]
    try:
        check_kind(name)
    except ConfigError:
        import difflib

        from pipeline.heads.registry import REGISTRY

        if recipes is None:
            why = "not a head kind, and no params file was read: give `recipes`"
        else:
            why = f"neither an entry under `heads:` in `{recipes}` nor a head kind"
        close = difflib.get_close_matches(name, [*entries, *REGISTRY], n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise ConfigError(f"unknown head `{name}`: {why}{hint}") from None
    return {}


def _write(
    result: dict[str, Any],
    out: str | Path | None,
    markdown: str | Path | None,
    png: str | Path | None,
) -> None:
    import json

    from pipeline.evaluation.scoring import METRICS_FORMAT
    from pipeline.io.outputs import COMPARE_METRICS, MARKDOWN
    from pipeline.io.store import all_or_nothing, atomic_output, jsonable
    from pipeline.scene.plots import save_png

    with all_or_nothing():  # several outputs: all of them or none
        if out is not None:
            rows = {
                r["head"]: {k: v for k, v in r.items() if k != "seconds"}  # same run, same file
                for r in result["rows"]
            }
            body = {
                "format": METRICS_FORMAT,
                "kind": "compare",
                "protocol": result["protocol"],
                "reference": result.get("reference"),
                "heads": rows,
            }
            with atomic_output(out, COMPARE_METRICS, option="out") as tmp:
                tmp.write_text(json.dumps(jsonable(body), indent=2))
        if markdown is not None:
            with atomic_output(markdown, MARKDOWN, option="markdown") as tmp:
                tmp.write_text(markdown_table(result))
        if png is not None:
            save_png(plot_comparison(result), png, option="png")
