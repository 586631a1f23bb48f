"""Interrupt a run from outside, as a crash would, without a hook in hsicache's signatures.

``extract_until(n, **kw)`` runs :func:`extract_features` and stops it (an exception, as a crash
would) right after its ``n``-th chunk is marked done; ``pretrain_until(n, out, **kw)`` stops a
pretraining right after the checkpoint of its ``n``-th step of this call. Both wrap the real
functions for the duration of the call only (``tests/killpoint.py`` does the same with SIGKILL
in a subprocess).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


class Interrupted(Exception):
    """The run was stopped where the test asked."""


@contextlib.contextmanager
def _after(owner: Any, name: str, stop: Callable[..., bool]) -> Iterator[None]:
    original = getattr(owner, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if stop(*args, **kwargs):
            raise Interrupted
        return out

    setattr(owner, name, wrapped)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _count_to(n: int) -> Callable[..., bool]:
    seen = [0]

    def stop(*_args: Any, **_kwargs: Any) -> bool:
        seen[0] += 1
        return seen[0] >= n

    return stop


def extract_until(n_chunks: int, **kwargs: Any) -> None:
    """Run an extraction and stop it once ``n_chunks`` chunks are marked done (if it has
    that many left; else it finishes)."""
    from pipeline.features import extract

    with (
        contextlib.suppress(Interrupted),
        _after(extract._ChunkRunner, "chunk_done", _count_to(n_chunks)),
    ):
        extract.extract_features(**kwargs)


def pretrain_until(n_steps: int, out: Any, **kwargs: Any) -> bool:
    """Run a pretraining and stop it right after the step ``n_steps`` steps into this call is
    checkpointed; whether it was stopped."""
    from pipeline.backbone import pretraining

    first: list[int] = []  # the first step this call reaches

    def stop(_run: Any, step: int) -> bool:
        first[:] = first or [step]
        return step - first[0] + 1 >= n_steps

    try:
        with _after(pretraining._Run, "step_done", stop):
            pretraining.pretrain(out, **kwargs)
    except Interrupted:
        return True
    return False
