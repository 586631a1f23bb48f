"""Thin Typer commands, one module per DVC stage; ``hsicache`` gathers them (``stages.cli``)."""
