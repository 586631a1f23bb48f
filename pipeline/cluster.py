"""dask.distributed for hsicache: a client for ``--workers N`` or ``--scheduler ADDRESS``, and
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
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pipeline.errors import ConfigError

__all__ = ["connected", "dask_client", "parse_resources", "worker_loads", "worker_state"]

T = TypeVar("T")
_STATE: dict[tuple[str, Any], Any] = {}
_LOADS: dict[str, int] = {}


@contextlib.contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None) -> Iterator[Any]:
    """A ``distributed.Client``: a fresh ``LocalCluster`` of ``workers`` processes (one task at
    a time each), or the cluster at ``scheduler``; ``None`` when neither is given.

    It is not made dask's default scheduler: only the tasks hsicache submits run on the
    cluster, small reads (a scene's label maps) stay in this process.

    Raises:
        ConfigError: both or a bad value given, or the scheduler cannot be reached.
    """
    if workers is not None and scheduler:
        raise ConfigError("give `--workers` (a local cluster) or `--scheduler` (yours), not both")
    if workers is None and not scheduler:
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="15s", set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConfigError(f"cannot reach the dask scheduler at `{scheduler}`: {exc}") from None
        with client:
            yield client
        return
    if workers is None or workers < 1:
        raise ConfigError(f"`--workers` must be at least 1, got {workers}")
    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                     dashboard_address=":0", silence_logs=logging.ERROR) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):  # fmt: skip
        yield client


@contextlib.contextmanager
def connected(client: Any) -> Iterator[Any]:
    """``client`` itself, or the client opened by calling it (a callable returning a context
    manager, such as ``lambda: dask_client(workers=2)``), closed afterwards."""
    if callable(client):
        with client() as opened:
            yield opened
    else:
        yield client


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
            raise ConfigError(f"`--resources` takes NAME=AMOUNT pairs such as GPU=1, got `{text}`")
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
