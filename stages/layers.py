"""``hsicache layers``: list a backbone's feature sites (name, channels, resolution)."""

from __future__ import annotations

import json

import typer

from stages._errors import run_app, user_errors
from stages._options import BACKBONE_HELP, DEBUG_OPTION

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def layers(
    backbone: str = typer.Option(..., "--backbone", help=BACKBONE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """List the feature sites of a backbone in forward order."""
    from pipeline.backbone.loading import load_backbone

    with user_errors(debug):
        bb = load_backbone(backbone)
    rows = [{"name": s.name, "channels": s.channels, "resolution": s.resolution} for s in bb.sites]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    typer.echo(f"{'site':<16}{'channels':>9}{'resolution':>12}")
    for r in rows:
        typer.echo(f"{r['name']:<16}{r['channels']:>9}{r['resolution']:>12}")


if __name__ == "__main__":
    run_app(app)
