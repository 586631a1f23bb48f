"""``hsicache bench``: benchmarks that print figures (speed targets live here, not in tests)."""

from __future__ import annotations

import json

import typer

from stages._errors import run_app, user_errors
from stages._options import (
    BACKBONE_HELP,
    DEBUG_OPTION,
    DTYPE_HELP,
    SCENE_OPTION,
    STORE_HELP,
    parse_csv,
    parse_csv_ints,
    progress_bar,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.command()
def extract(
    backbone: str = typer.Option("builtin:adm64", "--backbone", help=BACKBONE_HELP),
    scene: str | None = typer.Option(
        None, "--scene", help="Scene store (default: a synthetic 96 x 96 scene)."
    ),
    sites: str | None = typer.Option(
        None, "--sites", help="Comma-separated sites (default: up2.attn2 where it exists)."
    ),
    timesteps: str = typer.Option("0", "--timesteps", help="Comma-separated timesteps."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu) or a device."),
    batch_size: int = typer.Option(16, "--batch-size", help="Patches per forward pass."),
    naive_patches: int = typer.Option(
        4, "--naive-patches", help="Windows the naive baseline is timed on."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object of the figures."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Patches/s, first chunk s, GFLOP/s vs matmul, write MB/s, cache size, speed-up over naive."""
    from pipeline.bench import EXTRACT_KEYS, bench_extract

    with user_errors(debug), progress_bar("bench extract") as progress:
        rep = bench_extract(
            backbone,
            scene=scene,
            sites=parse_csv(sites) or None,
            timesteps=parse_csv_ints(timesteps, "--timesteps") or [0],
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            naive_patches=naive_patches,
            progress=progress,
        )
    if as_json:
        typer.echo(json.dumps({k: rep[k] for k in EXTRACT_KEYS}))
        return
    d = rep["details"]
    typer.echo(f"{d['backbone']} on {d['device']} ({d['dtype']}), sites {','.join(d['sites'])}, "
               f"t={d['timesteps']}, scene {d['scene_shape'][0]}x{d['scene_shape'][1]}, "
               f"{d['patches']} patches")  # fmt: skip
    cap = d["cpu_capability"]
    if cap is not None:
        flags = ", ".join(k for k, v in cap["features"].items() if v) or "none probed"
        typer.echo(f"CPU: torch kernels {cap['kernels']} ({flags}); native bf16: "
                   f"{'yes' if cap['native_bf16'] else 'no'}; dtype {d['dtype']}: "
                   f"{d['dtype_report'].get('reason', 'as asked')}")  # fmt: skip
    typer.echo(f"  patches/s          {rep['patches_per_s']:10.2f}")
    typer.echo(f"  first chunk s      {rep['first_chunk_s']:10.2f}   "
               f"(fp32 {rep['fp32_first_chunk_s']:.2f} s; ratio "
               f"{rep['first_chunk_ratio']:.2f}, target <= 1.2)")  # fmt: skip
    typer.echo(f"  GFLOP/s (forward)  {rep['gflops']:10.1f}   "
               f"({d['gflop_per_patch_truncated']:.2f} GFLOP per patch, truncated)")  # fmt: skip
    typer.echo(f"  matmul GFLOP/s     {rep['matmul_gflops']:10.1f}")
    typer.echo(f"  ratio to matmul    {rep['ratio_to_matmul']:10.2f}   (target >= 0.6)")
    typer.echo(f"  cache write MB/s   {rep['write_mb_per_s']:10.1f}")
    typer.echo(f"  cache / raw fp32   {rep['cache_to_raw']:10.3f}   (target <= 0.5)")
    naive = d["naive"]
    typer.echo(f"  naive speed-up     {rep['naive_speedup']:10.1f}x  "
               f"(naive {naive['s_per_patch']:.2f} s/patch on {naive['patches']})")  # fmt: skip


@app.command()
def heads(
    scene: str = SCENE_OPTION,
    features: str = typer.Option(
        ..., "--features", help="Feature cache from `hsicache extract`." + STORE_HELP
    ),
    names: str | None = typer.Option(
        None,
        "--heads",
        help="Comma-separated heads (default: film,concat,spatial,spectral,svm,xgboost).",
    ),
    repeats: int = typer.Option(
        5,
        "--repeats",
        min=1,
        help="Timed runs per head after its untimed first run; "
        "the median of each step is reported.",
    ),
    estimate: bool = typer.Option(
        False,
        "--estimate-extraction",
        help="Estimate re-extraction from one batch of "
        "patches instead of running stage one (for scenes where that takes long; errs low).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object keyed by head."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Per head: train/evaluate/predict seconds, re-extraction ÷ head time, read amplification.

    Re-extraction is stage one run for real with the cache's backbone and parameters (the
    backbone load included) into a temporary store, once per feature selection.
    """
    from pipeline.bench import DEFAULT_BENCH_HEADS, HEADS_KEYS, bench_heads

    chosen = None
    if names:
        chosen = {n.strip(): dict(DEFAULT_BENCH_HEADS.get(n.strip(), {}))
                  for n in names.split(",") if n.strip()}  # fmt: skip
    with user_errors(debug), progress_bar("bench heads") as progress:
        rep = bench_heads(scene=scene, features=features, heads=chosen, repeats=repeats,
                          run_extraction=not estimate, progress=progress)  # fmt: skip
    if as_json:
        typer.echo(json.dumps({n: {k: r[k] for k in HEADS_KEYS} for n, r in rep.items()}))
        return

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    typer.echo(f"{'head':<10} {'train s':>8} {'eval s':>8} {'predict s':>9} "
               f"{'reuse x':>9} {'read amp':>9}")  # fmt: skip
    for name, r in rep.items():
        typer.echo(f"{name:<10} {r['train_s']:8.2f} {r['evaluate_s']:8.2f} {r['predict_s']:9.2f} "
                   f"{fmt(r['reuse_ratio'], '9.1f'):>9} "
                   f"{fmt(r['read_amplification'], '9.2f'):>9}")  # fmt: skip
    extract_s = next((r["extract_s"] for r in rep.values() if r["extract_s"]), None)
    if extract_s:
        how = "estimated from one batch" if estimate else "stage one run here"
        typer.echo(f"re-extracting the spatial features takes {extract_s:.1f} s "
                   f"(the cache's backbone, {how})")  # fmt: skip


@app.command()
def context(
    size: int = typer.Option(1000, "--size", help="Side of the synthetic scene in pixels."),
    bands: int = typer.Option(224, "--bands", help="Bands of the synthetic scene."),
    scene: str | None = typer.Option(
        None, "--scene", help="Time this scene store instead of a synthetic one." + STORE_HELP
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object of the figures."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Seconds and peak memory of `hsicache context` with its default families."""
    from pipeline.bench import CONTEXT_KEYS, bench_context

    with user_errors(debug):
        rep = bench_context(size=size, bands=bands, scene=scene)
    if as_json:
        typer.echo(json.dumps({k: rep[k] for k in CONTEXT_KEYS}))
        return
    d = rep["details"]
    shown = ", ".join(f"{n} ({c})" for n, c in d["families"].items())
    typer.echo(f"context of a {d['shape'][0]}x{d['shape'][1]} scene: {shown}")
    typer.echo(f"  seconds            {rep['seconds']:10.1f}   (target <= 60 on 2 cores)")
    typer.echo(f"  peak memory GB     {rep['peak_rss_gb']:10.2f}   (target <= 4)")
    typer.echo(f"  megapixels/s       {rep['megapixels_per_s']:10.3f}")


@app.command()
def prepare(
    size: int = typer.Option(1000, "--size", help="Side of the synthetic scene in pixels (>= 24)."),
    bands: int = typer.Option(224, "--bands", help="Bands of the synthetic scene."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object of the figures."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Seconds and peak memory of `hsicache prepare` on a synthetic int16 cube (pca rendering)."""
    from pipeline.bench import PREPARE_KEYS, bench_prepare

    with user_errors(debug):
        rep = bench_prepare(size=size, bands=bands)
    if as_json:
        typer.echo(json.dumps({k: rep[k] for k in PREPARE_KEYS}))
        return
    h, w, b = rep["details"]["shape"]
    typer.echo(f"prepare of a {h}x{w}x{b} int16 cube, {rep['details']['rgb_mode']} rendering")
    typer.echo(f"  seconds            {rep['seconds']:10.1f}")
    ratio = f"{rep['peak_to_cube']:.2f}x the {rep['cube_gb']:.3g} GB float32 cube"
    typer.echo(f"  peak memory GB     {rep['peak_rss_gb']:10.2f}   ({ratio})")


@app.command()
def propagate(
    size: int = typer.Option(1000, "--size", help="Side of the synthetic scene in pixels."),
    bands: int = typer.Option(224, "--bands", help="Bands of the synthetic scene."),
    scene: str | None = typer.Option(
        None, "--scene", help="Time this scene store instead of a synthetic one." + STORE_HELP
    ),
    context_store: str | None = typer.Option(
        None, "--context-store", help="Its context store (default: one made, untimed)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object of the figures."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Seconds and peak memory of the `propagate` head (label spreading over every pixel)."""
    from pipeline.bench import PROPAGATE_KEYS, bench_propagate

    with user_errors(debug):
        rep = bench_propagate(size=size, bands=bands, scene=scene, context=context_store)
    if as_json:
        typer.echo(json.dumps({k: rep[k] for k in PROPAGATE_KEYS}))
        return
    d = rep["details"]
    typer.echo(f"propagate over {d['pixels']:,} pixels x {d['features']} features")
    typer.echo(f"  train seconds      {rep['train_seconds']:10.1f}   (target <= 300 on 2 cores)")
    typer.echo(f"  evaluate seconds   {rep['evaluate_seconds']:10.1f}   ({d['n_test']:,} test px)")
    typer.echo(f"  peak memory GB     {rep['peak_rss_gb']:10.2f}   (target <= 8)")
    typer.echo(f"  test OA            {100 * rep['oa']:10.1f} %")


if __name__ == "__main__":
    run_app(app)
