"""dask.distributed for hsicache: a client for ``workers=N`` or ``scheduler=ADDRESS``, and
state kept once per worker process (a loaded backbone, an opened store).

Tasks are whole cache chunks (extract) or map blocks (predict). A worker keeps what a task
loaded in :func:`worker_state`, so the backbone is read and moved to the device once per worker,
not once per task. Everything a task receives is small (a job description); data goes through
the stores, which must therefore be reachable from every worker (a shared file system or an
object store URL).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pipeline.errors import ConfigError

__all__ = [
    "as_they_finish",
    "cluster_opener",
    "connected",
    "dask_client",
    "parse_resources",
    "worker_loads",
    "worker_state",
]

T = TypeVar("T")
_STATE: dict[tuple[str, Any], Any] = {}
_LOADS: dict[str, int] = {}


def cluster_opener(
    workers: int | None, scheduler: str | None, on_open: Callable[[Any], None] | None = None
) -> Callable[[], Any] | None:
    """What opens the client of ``workers``/``scheduler`` later, once there is work; ``None``
    for neither. The options are checked now, so a bad one fails before any work.

    Args:
        workers: start a ``LocalCluster`` of this many worker processes (one task at a time).
        scheduler: or connect to the cluster at this address.
        on_open: called with the client when it opens (to show the dashboard address).

    Raises:
        ConfigError: both given, or fewer than one worker.
    """
    if workers is not None and scheduler:
        raise ConfigError("give `workers` (a local cluster) or `scheduler` (yours), not both")
    if workers is not None and workers < 1:
        raise ConfigError(f"`workers` must be at least 1, got {workers}")
    if workers is None and not scheduler:
        return None

    @contextlib.contextmanager
    def opened() -> Iterator[Any]:
        with _client(workers, scheduler) as client:
            if on_open is not None:
                on_open(client)
            yield client

    return opened


def dask_client(workers: int | None = None, scheduler: str | None = None) -> Any:
    """A context manager yielding a ``distributed.Client``: a fresh ``LocalCluster`` of
    ``workers`` processes (one task at a time each), or the cluster at ``scheduler``; ``None``
    when neither is given.

    It is not made dask's default scheduler: only the tasks hsicache submits run on the
    cluster, small reads (a scene's label maps) stay in this process.

    Raises:
        ConfigError: both or a bad value given, or the scheduler cannot be reached.
    """
    opener = cluster_opener(workers, scheduler)
    return opener() if opener is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _client(workers: int | None, scheduler: str | None) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="15s", set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConfigError(f"cannot reach the dask scheduler at `{scheduler}`: {exc}") from None
        with client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        yield client


@contextlib.contextmanager
def connected(client: Any) -> Iterator[Any]:
    """``client`` itself, or the client opened by calling it (a callable returning a context
    manager, such as :func:`cluster_opener`'s), closed afterwards."""
    if callable(client):
        with client() as opened:
            yield opened
    else:
        yield client


def as_they_finish(
    client: Any,
    task: Callable[..., T],
    items: list[Any],
    *args: Any,
    name: str,
    resources: dict[str, float] | None = None,
) -> Iterator[tuple[Any, T]]:
    """Run ``task(item, *args)`` for every item on the cluster; yield ``(item, result)`` in the
    order they finish. A task's error is raised here; leaving early cancels the rest."""
    from distributed import as_completed

    tag = uuid.uuid4().hex[:8]
    futures = {
        client.submit(
            task, item, *args, key=f"{name}-{tag}-{k}", pure=False, resources=resources
        ): item
        for k, item in enumerate(items)
    }
    try:
        with client.as_current():  # as_completed finds its client there
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
    finally:
        client.cancel(list(futures))


def parse_resources(text: str | None) -> dict[str, float] | None:
    """``"GPU=1,MEM=8e9"`` -> ``{"GPU": 1.0, "MEM": 8e9}``, the dask resources per task."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ConfigError(f"`resources` takes NAME=AMOUNT pairs such as GPU=1, got `{text}`")
    return out


def worker_state(kind: str, key: Any, make: Callable[[], T]) -> T:
    """What ``make()`` returns, made once per process for each ``(kind, key)``."""
    if (kind, key) not in _STATE:
        _STATE[(kind, key)] = make()
        _LOADS[kind] = _LOADS.get(kind, 0) + 1
    return _STATE[(kind, key)]  # type: ignore[no-any-return]


def worker_loads() -> dict[str, int]:
    """How often this process made each kind of state (``client.run(worker_loads)``)."""
    return dict(_LOADS)
