"""Stage two heads that use the unlabeled pixels of the scene.

Both follow scikit-learn's semi-supervised convention: ``fit(X, y)`` takes labelled and
unlabelled rows together, ``y = -1`` marking the unlabelled ones. The training layer
(:mod:`pipeline.heads.training`) hands them the scene's pixels that are not train pixels — labelled
test pixels included, their labels hidden — so nothing here ever reads a test label.

* :class:`PropagationHead` (``kind: propagate``) — label spreading (Zhou et al., 2004, "Learning
  with local and global consistency") over a k-nearest-neighbour graph of **every** pixel of the
  scene in a standardised, PCA-reduced feature space. Its predictions for a scene pixel are the
  spread label distribution of that pixel's graph node (the transduction); a row that is not a
  node takes its nearest node's. The neighbours are exact up to :data:`EXACT_LIMIT` rows and come
  from an inverted-file index (k-means cells, the nearest cells probed) above it, so a
  1,000 x 1,000 scene fits in minutes and a few GB (``hsicache bench propagate``).
* :func:`self_training` — scikit-learn's :class:`~sklearn.semi_supervised.SelfTrainingClassifier`
  around any head with ``predict_proba`` (FiLM included): each round adds the unlabelled rows
  predicted with probability above ``threshold`` as pseudo-labels and refits.
"""

from __future__ import annotations

import itertools
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import torch
from scipy import sparse
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.errors import ConfigError
from pipeline.utils.devices import usable_cores

__all__ = [
    "EXACT_LIMIT",
    "SELF_TRAINING_KEYS",
    "NeighbourIndex",
    "PropagationHead",
    "check_self_training",
    "self_training",
]

#: Rows up to which neighbours are found exactly (brute force); above it, by an inverted file.
EXACT_LIMIT = 60_000
_CHUNK = 2048  # query rows per distance block at most
_BLOCK = 2048 * 60_000  # distances per block: 0.5 GB of float32, whatever a cell holds
_CELL_SIZE = 1000  # rows per inverted-file cell
_PROBE = 8  # cells searched per query cell


class NeighbourIndex:
    """Nearest neighbours among the rows of ``base`` (squared Euclidean distances).

    Exact (brute force in blocks) up to :data:`EXACT_LIMIT` rows; above it an inverted file:
    k-means cells of about 1,000 rows, each query searched in the :data:`_PROBE` cells whose
    centres are nearest to its own cell's centre.
    """

    def __init__(self, base: np.ndarray, *, random_state: int = 0) -> None:
        self.base = torch.from_numpy(np.ascontiguousarray(base, dtype=np.float32))
        self.sq = (self.base * self.base).sum(1)
        self.centres: torch.Tensor | None = None
        if len(base) > EXACT_LIMIT:
            self._build_cells(random_state)

    def _build_cells(self, random_state: int) -> None:
        from sklearn.cluster import MiniBatchKMeans

        n = len(self.base)
        rng = np.random.default_rng(random_state)
        sample = self.base[np.sort(rng.choice(n, min(n, 100_000), replace=False))].numpy()
        km = MiniBatchKMeans(
            n_clusters=max(2, n // _CELL_SIZE),
            batch_size=4096,
            n_init=1,
            max_iter=20,
            random_state=random_state,
        )
        self.centres = torch.from_numpy(km.fit(sample).cluster_centers_.astype(np.float32))
        self.cell = self._nearest_centre(self.base)
        order = torch.argsort(self.cell, stable=True)
        counts = torch.bincount(self.cell, minlength=len(self.centres))
        self.members = torch.split(order, counts.tolist())
        near = _squared(self.centres, self.centres)
        self.probe = near.topk(min(_PROBE, len(self.centres)), largest=False).indices

    def _nearest_centre(self, rows: torch.Tensor) -> torch.Tensor:
        assert self.centres is not None
        out = torch.empty(len(rows), dtype=torch.int64)
        for s in range(0, len(rows), _CHUNK * 8):
            out[s : s + _CHUNK * 8] = _squared(rows[s : s + _CHUNK * 8], self.centres).argmin(1)
        return out

    def search(
        self, queries: np.ndarray, k: int, *, self_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest base rows of each query (indices, squared distances), nearest
        first; ``self_ids`` (the queries' own base rows) are never their own neighbours."""
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        ids = None if self_ids is None else torch.from_numpy(np.asarray(self_ids, np.int64))
        idx = torch.empty((len(q), k), dtype=torch.int64)
        dist = torch.empty((len(q), k), dtype=torch.float32)
        for rows, cand in self._blocks(q):
            d = _squared(q[rows], self.base[cand], self.sq[cand])
            if ids is not None:
                _exclude(d, ids[rows], cand, len(self.base))
            v, j = d.topk(min(k, len(cand)), dim=1, largest=False)
            if v.shape[1] < k:  # fewer candidates than k: pad with the farthest found
                v = torch.cat([v, v[:, -1:].expand(-1, k - v.shape[1])], 1)
                j = torch.cat([j, j[:, -1:].expand(-1, k - j.shape[1])], 1)
            idx[rows], dist[rows] = cand[j], v.clamp_min(0)
        return idx.numpy(), dist.numpy()

    def _blocks(self, q: torch.Tensor) -> Any:
        """(query rows, candidate base rows) blocks covering every query."""
        everything = torch.arange(len(self.base))
        if self.centres is None:
            step = _rows_per_block(len(everything))
            for s in range(0, len(q), step):
                yield torch.arange(s, min(s + step, len(q))), everything
            return
        cell = self._nearest_centre(q)
        order = torch.argsort(cell, stable=True)
        counts = torch.bincount(cell, minlength=len(self.centres))
        for c, rows in zip(
            range(len(self.centres)), torch.split(order, counts.tolist()), strict=True
        ):
            if len(rows):
                cand = torch.cat([self.members[int(p)] for p in self.probe[c]])
                step = _rows_per_block(len(cand))  # a crowded cell (duplicates) gets fewer
                for s in range(0, len(rows), step):
                    yield rows[s : s + step], cand


def _rows_per_block(candidates: int) -> int:
    """Query rows per block so a block's distances stay within :data:`_BLOCK`."""
    return max(1, min(_CHUNK, _BLOCK // max(1, candidates)))


def _exclude(d: torch.Tensor, own: torch.Tensor, cand: torch.Tensor, n_base: int) -> None:
    """Set each query's distance to its own base row (when among ``cand``) to infinity."""
    where = torch.full((n_base,), -1, dtype=torch.int64)
    where[cand] = torch.arange(len(cand))
    col = where[own]
    hit = col >= 0
    d[torch.nonzero(hit).ravel(), col[hit]] = float("inf")


def _squared(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``a`` and ``b``."""
    b_sq = (b * b).sum(1) if b_sq is None else b_sq
    d = a @ b.T  # then |a|^2 - 2 a.b + |b|^2 in place: the same bits, no block-sized temporaries
    return d.mul_(-2.0).add_((a * a).sum(1, keepdim=True)).add_(b_sq[None])


class PropagationHead(ClassifierMixin, BaseEstimator):
    """Label spreading over a k-nearest-neighbour graph of every row it is fitted on.

    ``fit(X, y)`` takes the scene's pixels, ``y = -1`` for the unlabelled ones. Columns are
    standardised and reduced to ``n_components`` principal components (fitted on all rows: no
    label is involved), each row is joined to its ``n_neighbors`` nearest rows with weight
    ``exp(-d / sigma)`` (``d`` the squared distance, ``sigma`` the median distance to the k-th
    neighbour), the graph is made symmetric and normalised (``S = D^-1/2 W D^-1/2``), and
    ``F <- alpha S F + (1 - alpha) Y`` is iterated from the class-balanced label matrix ``Y``
    until it changes less than ``tol``.

    Parameters:
        n_neighbors: neighbours per row (5: chosen by cross-validation on the train pixels of
            Indian Pines, docs/results.md).
        alpha: how far labels spread (0 < alpha < 1; near 1: far).
        n_components: principal components of the standardised columns (``None``: all columns).
        max_iter, tol: the spreading iterations.
        random_state: the head's seed. The graph does not depend on it (PCA and the
            inverted-file index use fixed seeds): the same pixels give the same graph for every
            split seed, so refits share it.
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "alpha": [Interval(Real, 0, 1, closed="neither")],
        "n_components": [Interval(Integral, 1, None, closed="left"), None],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "random_state": [Interval(Integral, 0, 2**32 - 1, closed="both")],
    }

    def __init__(
        self,
        n_neighbors: int = 5,
        alpha: float = 0.99,
        n_components: int | None = 32,
        max_iter: int = 200,
        tol: float = 1e-5,
        random_state: int = 0,
    ) -> None:
        self.n_neighbors = n_neighbors
        self.alpha = alpha
        self.n_components = n_components
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    def fit(self, X: Any, y: Any) -> PropagationHead:
        self._validate_params()
        X, y = validate_data(self, X, y, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        if self.n_neighbors >= len(X):
            raise ValueError(
                f"n_neighbors={self.n_neighbors} must be below the {len(X)} rows (pixels) to fit on"
            )
        labelled = y >= 0
        self.classes_ = np.unique(y[labelled])
        nodes, index, graph = self._graph(X)
        spread = self._spread(graph, y, labelled)
        self.n_unreached_ = _fill_unreached(spread, nodes, labelled)
        self.nodes_ = nodes
        self.label_distributions_ = spread
        self.transduction_ = self.classes_[spread.argmax(1)]
        self._index = index
        return self

    def _graph(self, X: np.ndarray) -> tuple[np.ndarray, NeighbourIndex, sparse.csr_matrix]:
        """The nodes, their index and the normalised graph of ``X``: they depend on ``X`` and
        the graph parameters only, never on labels, so refits on the same pixels (one per split
        seed in ``compare``, ``curve``, ``evaluate --seeds``) reuse the last one built."""
        import hashlib

        digest = hashlib.blake2b(np.ascontiguousarray(X).view(np.uint8), digest_size=16)
        key = (X.shape, digest.hexdigest(), self.n_neighbors, self.n_components)
        if _LAST_GRAPH.get("key") != key:
            _LAST_GRAPH.clear()  # one graph at a time: a scene's graph can be large
            self._fit_projection(X)
            nodes = self._project(X)
            index = NeighbourIndex(nodes)
            idx, dist = index.search(nodes, self.n_neighbors, self_ids=np.arange(len(nodes)))
            projection = (self.mean_, self.scale_, self.components_)
            _LAST_GRAPH.update(
                key=key,
                projection=projection,
                nodes=nodes,
                index=index,
                graph=_normalised_graph(idx, dist),
            )
        self.mean_, self.scale_, self.components_ = _LAST_GRAPH["projection"]
        return _LAST_GRAPH["nodes"], _LAST_GRAPH["index"], _LAST_GRAPH["graph"]

    def __getstate__(self) -> dict[str, Any]:
        """The fitted state without the neighbour index (rebuilt on demand after loading)."""
        return {k: v for k, v in super().__getstate__().items() if k != "_index"}

    def _fit_projection(self, X: np.ndarray) -> None:
        total = np.zeros(X.shape[1], dtype=np.float64)
        squares = np.zeros(X.shape[1], dtype=np.float64)
        for s in range(0, len(X), 65536):  # in blocks: no float64 copy of the whole of X
            block = X[s : s + 65536].astype(np.float64)
            total += block.sum(axis=0)
            squares += (block * block).sum(axis=0)
        mean = total / len(X)
        std = np.sqrt(np.maximum(squares / len(X) - mean * mean, 0.0))
        self.mean_ = mean.astype(np.float32)
        self.scale_ = np.where(std > 1e-8 * np.maximum(1.0, np.abs(mean)), std, 1.0).astype(
            np.float32
        )
        self.components_ = None
        k = self.n_components
        if k is not None and k < X.shape[1]:
            from sklearn.decomposition import PCA

            rng = np.random.default_rng(0)
            take = np.sort(rng.choice(len(X), min(len(X), 200_000), replace=False))
            full = X.shape[1] <= 2048  # exact, no randomness; else a fixed-seed randomized SVD
            pca = PCA(
                n_components=min(k, len(take)),
                svd_solver="full" if full else "randomized",
                random_state=None if full else 0,
            )
            pca.fit((X[take] - self.mean_) / self.scale_)
            self.components_ = pca.components_.astype(np.float32)

    def _project(self, X: np.ndarray) -> np.ndarray:
        out = np.empty((len(X), self._width()), dtype=np.float32)
        for s in range(0, len(X), 65536):
            z = (X[s : s + 65536] - self.mean_) / self.scale_
            out[s : s + 65536] = z if self.components_ is None else z @ self.components_.T
        return out

    def _width(self) -> int:
        return len(self.mean_) if self.components_ is None else len(self.components_)

    def _spread(self, S: sparse.csr_matrix, y: np.ndarray, labelled: np.ndarray) -> np.ndarray:
        codes = np.searchsorted(self.classes_, y[labelled])
        Y = np.zeros((len(y), len(self.classes_)), dtype=np.float32)
        Y[np.nonzero(labelled)[0], codes] = 1.0
        Y /= Y.sum(axis=0, keepdims=True)  # class-balanced: each class holds the same mass
        alpha = float(self.alpha)
        rest = (1.0 - alpha) * Y
        F, new, diff = Y.copy(), np.empty_like(Y), np.empty_like(Y)
        reached = int(labelled.sum())
        with _RowBlocks(S) as product:
            for _ in range(self.max_iter):  # F <- alpha S F + (1 - alpha) Y, in place
                product(F, out=new)
                new *= alpha
                new += rest
                change = float(np.abs(np.subtract(new, F, out=diff), out=diff).max())
                F, new = new, F
                now = int(np.count_nonzero(F.any(axis=1)))  # labels still spreading to new rows
                if change < self.tol * float(F.max()) and now == reached:
                    break
                reached = now
        total = F.sum(axis=1, keepdims=True)
        return np.where(total > 0, F / np.where(total > 0, total, 1.0), 0.0).astype(np.float32)

    def predict_proba(self, X: Any) -> np.ndarray:
        """The spread label distribution of each row's nearest graph node (its own node for a
        pixel of the scene the head was fitted on)."""
        check_is_fitted(self, "label_distributions_")
        X = validate_data(self, X, reset=False, dtype=np.float32)
        if getattr(self, "_index", None) is None:  # built once per loaded head, not per call
            self._index = NeighbourIndex(self.nodes_)
        nearest, _ = self._index.search(self._project(X), 1)
        return self.label_distributions_[nearest[:, 0]]

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


#: The graph :meth:`PropagationHead._graph` built last, with its key.
_LAST_GRAPH: dict[str, Any] = {}


class _RowBlocks:
    """``S @ F`` with ``S``'s rows cut into one block per core, the blocks multiplied in threads
    (scipy's sparse product releases the GIL): each row is computed as in ``S @ F``, so the
    bits are the same."""

    def __init__(self, S: sparse.csr_matrix, parts: int | None = None) -> None:
        if parts is None:  # one block per core, of at least 20,000 rows (threads cost)
            parts = max(1, min(usable_cores(), 8, S.shape[0] // 20_000))
        self.bounds = np.linspace(0, S.shape[0], parts + 1).astype(int)
        self.blocks = [S[a:b] for a, b in itertools.pairwise(self.bounds)]
        self.pool: Any = None

    def __enter__(self) -> _RowBlocks:
        if len(self.blocks) > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(len(self.blocks))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def __call__(self, F: np.ndarray, *, out: np.ndarray) -> None:
        if self.pool is None:
            out[:] = self.blocks[0] @ F
            return

        def one(i: int) -> None:
            out[self.bounds[i] : self.bounds[i + 1]] = self.blocks[i] @ F

        list(self.pool.map(one, range(len(self.blocks))))


def _fill_unreached(spread: np.ndarray, nodes: np.ndarray, labelled: np.ndarray) -> int:
    """Rows no label reached (a graph component without a train pixel) take the distribution of
    their nearest labelled row, in place; how many there were."""
    lost = np.flatnonzero(spread.sum(axis=1) == 0)
    if lost.size:
        seeds = np.flatnonzero(labelled)
        nearest, _ = NeighbourIndex(nodes[seeds]).search(nodes[lost], 1)
        spread[lost] = spread[seeds[nearest[:, 0]]]
    return int(lost.size)


def _normalised_graph(idx: np.ndarray, dist: np.ndarray) -> sparse.csr_matrix:
    """``D^-1/2 W D^-1/2`` of the symmetric k-nearest-neighbour graph."""
    n, k = idx.shape
    sigma = float(np.median(dist[:, -1])) or 1.0
    W = sparse.csr_matrix(
        (np.exp(-dist / sigma).ravel(), (np.repeat(np.arange(n), k), idx.ravel())), shape=(n, n)
    )
    W = W.maximum(W.T).tocsr()
    inv = 1.0 / np.sqrt(np.asarray(W.sum(axis=1)).ravel() + 1e-12)
    return sparse.diags(inv) @ W @ sparse.diags(inv)


#: The keys of a head entry's ``self_training`` section.
SELF_TRAINING_KEYS = ("threshold", "max_iter", "pool")


def check_self_training(name: str, section: Any) -> dict[str, Any]:
    """A head entry's ``self_training`` section with its defaults, checked: ``threshold`` in
    (0, 1), ``max_iter`` and ``pool`` (unlabelled pixels drawn) at least 1."""
    if not isinstance(section, dict):
        raise ConfigError(
            f"`self_training` of head `{name}` must be a mapping of "
            f"{', '.join(SELF_TRAINING_KEYS)}, got {section!r}"
        )
    unknown = sorted(set(section) - set(SELF_TRAINING_KEYS))
    if unknown:
        raise ConfigError(
            f"`self_training` of head `{name}` has unknown key(s) {', '.join(unknown)}: use "
            f"{', '.join(SELF_TRAINING_KEYS)}"
        )
    out = {"threshold": 0.95, "max_iter": 5, "pool": 20_000, **section}
    t = out["threshold"]
    if isinstance(t, bool) or not isinstance(t, Real) or not 0 < t < 1:
        raise ConfigError(
            f"`self_training.threshold` of head `{name}` must be in (0, 1), got {t!r}"
        )
    for key in ("max_iter", "pool"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
            raise ConfigError(
                f"`self_training.{key}` of head `{name}` must be an integer >= 1, got {v!r}"
            )
    return out


def self_training(estimator: Any, *, threshold: float, max_iter: int) -> Any:
    """``estimator`` in scikit-learn's self-training loop (its ``pool`` is the caller's)."""
    from sklearn.semi_supervised import SelfTrainingClassifier

    return SelfTrainingClassifier(estimator, threshold=threshold, max_iter=max_iter)
