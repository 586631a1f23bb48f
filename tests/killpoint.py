"""Run ``hsicache ARGS...`` in this process and SIGKILL it at one named point of an extraction.

Usage: ``python tests/killpoint.py POINT N -- hsicache-args...``: the process kills itself the
N-th time it reaches POINT. Nothing in hsicache knows about this; the points are reached by
wrapping the real functions and store writes from outside (used by ``tests/test_faults.py``).

Points:
    locked            the writer lock was just taken, nothing else written
    created           the store and its arrays were just created, no chunk computed
    forward           before the N-th forward pass (a chunk half computed)
    between-arrays    between the arrays of one chunk (some of its data written)
    before-done-flag  a chunk's data is written but it is not marked done
    after-done-flag   right after the N-th chunk was marked done
    before-complete   every chunk is done, the store is not yet marked complete
"""

from __future__ import annotations

import os
import signal
import sys

POINTS = ("locked", "created", "forward", "between-arrays", "before-done-flag",
          "after-done-flag", "before-complete")  # fmt: skip


def main() -> None:
    point, nth = sys.argv[1], int(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1 :]
    if point not in POINTS:
        raise SystemExit(f"unknown point {point}; one of {', '.join(POINTS)}")
    seen = [0]

    def reached() -> None:
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    import pipeline.features.extract as extract
    import pipeline.io.storage as storage
    from pipeline.backbone.loading import Backbone

    def after(fn, hook):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            hook(*a, **k)
            return out

        return wrapped

    if point == "locked":
        storage.StoreLock.__enter__ = after(storage.StoreLock.__enter__, lambda *a: reached())
    elif point == "created":
        extract.create_or_resume = after(extract.create_or_resume, lambda *a, **k: reached())
    elif point == "forward":
        original = Backbone.features

        def features(self, *a, **k):
            reached()
            return original(self, *a, **k)

        Backbone.features = features
    else:
        _hook_store_writes(point, reached)
    from stages.cli import main as cli

    sys.argv = ["hsicache", *args]
    cli()


def _hook_store_writes(point: str, reached) -> None:
    """Call ``reached`` around the zarr store writes that mark ``point``."""
    from zarr.storage import LocalStore

    put = LocalStore.set

    async def set_(self, key, value, *a, **k):
        feature_chunk = key.startswith("t") and "/c/" in key
        if point == "between-arrays" and feature_chunk:
            reached()  # the 2nd feature chunk object of a run: one array of chunk 1 written
        if point == "before-done-flag" and key.startswith("progress/done/c/"):
            reached()
        if point == "before-complete" and key == "zarr.json":
            reached()  # the 1st write is the creation, the 2nd marks the store complete
        result = await put(self, key, value, *a, **k)
        if point == "after-done-flag" and key.startswith("progress/done/c/"):
            reached()
        return result

    LocalStore.set = set_


if __name__ == "__main__":
    main()
