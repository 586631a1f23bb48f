"""The torch heads: scikit-learn-contract classifiers trained on cached features.

Every head takes ``X = [spectrum | context | spatial]`` rows (the first ``n_spectral`` columns
are the pixel's spectrum, the next ``n_context`` its context features from the context store, the
rest its cached backbone features), or some of these parts, and is a scikit-learn classifier
(``fit``/``predict``/``predict_proba``/``get_params``, ``classes_``, ``n_features_in_``).
Normalisation (and PCA) statistics are fitted inside ``fit``, i.e. on the train pixels only.

* :class:`FiLMClassifier` — the paper's spectral FiLM fusion: an encoder turns the (normalised,
  optionally PCA-reduced) spectrum, with the pixel's context features when it is given some,
  into per-channel ``gamma`` and ``beta``; the projected spatial features ``h`` become
  ``(1 + gamma) * h + beta``; an MLP classifies.
* :class:`MLPHead` — an MLP on whatever columns it is given (the ``concat``, ``spatial`` and
  ``spectral`` heads are MLPs on both parts, the spatial part, the spectrum).

Both train with AdamW on a class-balanced cross-entropy, optional mixup, and early stopping on a
stratified validation part of the train labels when every class has enough of them; seeded.
:func:`pipeline.heads.build.make_head` builds these and every other registered kind.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import (
    Interval,
)
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

__all__ = ["FiLMClassifier", "MLPHead"]


def _at_least(low: int) -> Interval:
    return Interval(Integral, low, None, closed="left")


_TRAIN_CONSTRAINTS: dict[str, list[Any]] = {
    "n_spectral": [_at_least(0), None],
    "spectral_pca": [_at_least(1), None],
    "hidden": [_at_least(1)],
    "dropout": [Interval(Real, 0, 1, closed="left")],
    "learning_rate": [Interval(Real, 0, None, closed="neither")],
    "weight_decay": [Interval(Real, 0, None, closed="left")],
    "max_epochs": [_at_least(1)],
    "batch_size": [_at_least(1)],
    "mixup_alpha": [Interval(Real, 0, None, closed="left")],
    "class_balanced": ["boolean"],
    "validation_fraction": [Interval(Real, 0, 1, closed="left")],
    "min_val_per_class": [_at_least(1)],
    "patience": [_at_least(1)],
    "converged_loss": [Interval(Real, 0, None, closed="neither"), None],
    "n_members": [Interval(Integral, 1, 64, closed="both")],
    "random_state": [Interval(Integral, 0, 2**32 - 1, closed="both")],
    "device": [str],
}


class _TorchHead(ClassifierMixin, BaseEstimator):
    """Shared training loop, preprocessing and prediction of the torch heads."""

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = _TRAIN_CONSTRAINTS

    def _split_sizes(self, n_features: int) -> tuple[int, int]:
        n_spec = self.n_spectral if self.n_spectral is not None else max(1, n_features // 2)
        if not 0 <= n_spec + self._n_context <= n_features:
            raise ValueError(
                f"n_spectral={n_spec} and n_context={self._n_context} do not fit X with "
                f"{n_features} features"
            )
        return n_spec, n_features - n_spec

    @property
    def _n_context(self) -> int:
        """Context columns after the spectrum that join it in the spectral branch (FiLM);
        0 for heads that read all columns alike."""
        return int(getattr(self, "n_context", 0) or 0)

    def _keep_params(self, arguments: dict[str, Any]) -> None:
        """Store the constructor's arguments unchanged, as the scikit-learn contract asks."""
        for name, value in arguments.items():
            if name not in ("self", "__class__"):
                setattr(self, name, value)

    def _build(self, n_spec: int, n_spat: int, n_classes: int) -> nn.Module:
        raise NotImplementedError

    def _device(self) -> torch.device:
        from pipeline.utils.devices import resolve_device

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return resolve_device(self.device, option="device")

    def _prepare_stats(self, X: np.ndarray, n_spec: int) -> None:
        mean, std = X.mean(axis=0), X.std(axis=0)
        self.mean_ = mean.astype(np.float32)
        self.scale_ = np.where(std > 1e-8, std, 1.0).astype(np.float32)
        self.components_ = None
        k = getattr(self, "spectral_pca", None)
        if k and n_spec > k:
            z = (X[:, :n_spec] - self.mean_[:n_spec]) / self.scale_[:n_spec]
            # torch, not numpy: numpy's BLAS threads would keep spinning beside torch's own
            # and slow every later torch op (2x on a 2-core machine)
            z = torch.from_numpy(np.ascontiguousarray(z - z.mean(axis=0), dtype=np.float64))
            vt = torch.linalg.svd(z, full_matrices=False).Vh.numpy()
            self.components_ = vt[: min(k, vt.shape[0])].T.astype(np.float32)  # (n_spec, k)

    def _inputs(self, X: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(spectral branch, spatial branch)``: the standardised (PCA-reduced) spectrum with
        any context columns after it, and the remaining columns."""
        z = (np.asarray(X, dtype=np.float32) - self.mean_) / self.scale_
        n_spec, n_ctx = self.n_spec_, self._n_context
        spec = torch.from_numpy(np.ascontiguousarray(z[:, :n_spec]))
        spat = torch.from_numpy(np.ascontiguousarray(z[:, n_spec + n_ctx :]))
        if self.components_ is not None:
            spec = spec @ torch.from_numpy(self.components_)  # in torch too (see above)
        if n_ctx:
            ctx = torch.from_numpy(np.ascontiguousarray(z[:, n_spec : n_spec + n_ctx]))
            spec = torch.cat([spec, ctx], dim=1)
        return spec, spat

    def fit(self, X: Any, y: Any) -> _TorchHead:
        """Fit on ``X`` (``[spectrum | spatial]`` rows) and class labels ``y``."""
        self._validate_params()  # hidden=-3 is a ValueError naming `hidden`, not a torch crash
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        n_spec, _ = self._split_sizes(X.shape[1])
        self.n_spec_ = n_spec
        self._prepare_stats(X, n_spec)
        dev = self._device()
        spec, spat = (t.to(dev) for t in self._inputs(X))
        members, epochs, best = [], [], None
        with torch.random.fork_rng(devices=[]):
            for m in range(self.n_members):
                seed = (self.random_state + m) % 2**32
                torch.manual_seed(seed)
                net = self._build(spec.shape[1], spat.shape[1], len(self.classes_)).to(dev)
                n_epochs, best = _train(self, net, spec, spat, codes, seed)
                members.append(net)
                epochs.append(n_epochs)
        self.module_ = members[0] if len(members) == 1 else _Averaged(members)
        self.n_epochs_, self.best_val_ = max(epochs), best if len(members) == 1 else None
        self.module_.eval()
        return self

    def _module(self, n_spec: int, n_spat: int, n_classes: int) -> nn.Module:
        """The (untrained) module a fitted head of these sizes holds: one net, or
        ``n_members`` of them averaged."""
        if self.n_members == 1:
            return self._build(n_spec, n_spat, n_classes)
        return _Averaged([self._build(n_spec, n_spat, n_classes) for _ in range(self.n_members)])

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, ``(n, n_classes)`` in the order of ``classes_``."""
        check_is_fitted(self, "module_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        dev = next(self.module_.parameters()).device
        spec, spat = (t.to(dev) for t in self._inputs(X))
        out = []
        with torch.inference_mode():
            for i in range(0, max(len(X), 1), 65536):
                logits = self.module_(spec[i : i + 65536], spat[i : i + 65536])
                out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        return np.concatenate(out)[: len(X)]

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row."""
        proba = self.predict_proba(X)  # checks fitted first
        return self.classes_[np.argmax(proba, axis=1)]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything fitted, as tensors (for safetensors)."""
        state = {f"module.{k}": v.detach().cpu() for k, v in self.module_.state_dict().items()}
        state["prep.mean"] = torch.from_numpy(self.mean_)
        state["prep.scale"] = torch.from_numpy(self.scale_)
        if self.components_ is not None:
            state["prep.components"] = torch.from_numpy(self.components_)
        return state

    def fitted_config(self) -> dict[str, Any]:
        """The fitted sizes needed to rebuild the module before loading its weights."""
        return {
            "n_features_in": int(self.n_features_in_),
            "n_spec": int(self.n_spec_),
            "classes": self.classes_.tolist(),
            "n_epochs": int(self.n_epochs_),
        }

    @classmethod
    def from_state(
        cls, params: dict[str, Any], fitted: dict[str, Any], state: dict[str, torch.Tensor]
    ) -> _TorchHead:
        """Rebuild a fitted head from :meth:`get_params`, :meth:`fitted_config` and tensors."""
        head = cls(**params)
        head.n_features_in_ = fitted["n_features_in"]
        head.n_spec_ = fitted["n_spec"]
        head.classes_ = np.asarray(fitted["classes"])
        head.n_epochs_ = fitted["n_epochs"]
        head.best_val_ = None
        head.mean_ = state["prep.mean"].numpy()
        head.scale_ = state["prep.scale"].numpy()
        comp = state.get("prep.components")
        head.components_ = comp.numpy() if comp is not None else None
        n_spec = head.components_.shape[1] if head.components_ is not None else head.n_spec_
        n_spat = head.n_features_in_ - head.n_spec_ - head._n_context
        head.module_ = head._module(n_spec + head._n_context, n_spat, len(head.classes_)).to(
            head._device()
        )
        head.module_.load_state_dict(
            {k[len("module.") :]: v for k, v in state.items() if k.startswith("module.")}
        )  # copies onto the module's device
        head.module_.eval()
        return head


def _split_validation(
    head: _TorchHead, codes: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation rows: a stratified part is held out when every class has enough."""
    counts = np.bincount(codes, minlength=int(codes.max()) + 1)
    train_idx, val_idx = np.arange(len(codes)), np.array([], dtype=int)
    frac = head.validation_fraction
    if frac and counts.min() >= head.min_val_per_class / frac:
        val = [
            rng.choice(np.flatnonzero(codes == k), round(c * frac), replace=False)
            for k, c in enumerate(counts)
        ]
        val_idx = np.concatenate(val)
        train_idx = np.setdiff1d(train_idx, val_idx)
    return train_idx, val_idx


def _loss_function(
    head: _TorchHead, codes: np.ndarray, train_idx: np.ndarray, dev: torch.device
) -> nn.Module:
    """Cross-entropy, weighted inversely to the class counts of the fitted rows if asked."""
    if not head.class_balanced:
        return nn.CrossEntropyLoss()
    n_classes = int(codes.max()) + 1
    fit_counts = np.bincount(codes[train_idx], minlength=n_classes).astype(np.float64)
    weights = np.where(fit_counts > 0, len(train_idx) / (n_classes * np.maximum(fit_counts, 1)), 0)
    return nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=dev))


def _batches(
    head: _TorchHead,
    tensors: tuple[torch.Tensor, ...],
    train_idx: np.ndarray,
    rng: np.random.Generator,
) -> Callable[[], Iterator[tuple[torch.Tensor, ...]]]:
    """Each epoch's shuffled batches of the train rows. A few labels fit in one batch: then
    no shuffling or gathering each epoch (6 % of an epoch at 30 pixels, where an epoch is
    ~1.3 ms of fixed per-op overhead on a CPU)."""
    dev = tensors[0].device
    if len(train_idx) <= head.batch_size:
        ti = torch.from_numpy(train_idx).to(dev)
        whole = tuple(t[ti] for t in tensors)
        return lambda: iter([whole])

    def batches() -> Iterator[tuple[torch.Tensor, ...]]:
        order = train_idx[rng.permutation(len(train_idx))]
        for b0 in range(0, len(order), head.batch_size):
            idx = torch.from_numpy(order[b0 : b0 + head.batch_size]).to(dev)
            yield tuple(t[idx] for t in tensors)

    return batches


def _epoch(
    head: _TorchHead,
    module: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: nn.Module,
    batches: Iterator[tuple[torch.Tensor, ...]],
    rng: np.random.Generator,
    n_rows: int,
) -> float:
    """One pass over the batches (with mixup when asked); the mean training loss."""
    epoch_loss = 0.0
    for xs, xf, yt in batches:
        if head.mixup_alpha and len(yt) > 1:
            lam = float(rng.beta(head.mixup_alpha, head.mixup_alpha))
            perm = torch.from_numpy(rng.permutation(len(yt))).to(yt.device)
            xs = lam * xs + (1 - lam) * xs[perm]
            xf = lam * xf + (1 - lam) * xf[perm]
            logits = module(xs, xf)
            loss = lam * loss_fn(logits, yt) + (1 - lam) * loss_fn(logits, yt[perm])
        else:
            loss = loss_fn(module(xs, xf), yt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        epoch_loss += loss.item() * len(yt) / n_rows
    return epoch_loss


def _train(
    head: _TorchHead,
    module: nn.Module,
    spec: torch.Tensor,
    spat: torch.Tensor,
    codes: np.ndarray,
    seed: int,
) -> tuple[int, float | None]:
    """AdamW, class-balanced CE, optional mixup, early stopping when a validation part fits;
    ``seed`` draws the validation part, the batches and mixup."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = _split_validation(head, codes, rng)
    dev = spec.device
    loss_fn = _loss_function(head, codes, train_idx, dev)
    target = torch.from_numpy(codes.astype(np.int64)).to(dev)
    opt = torch.optim.AdamW(
        module.parameters(),
        lr=head.learning_rate,
        weight_decay=head.weight_decay,
        fused=dev.type in ("cpu", "cuda"),
    )  # one kernel per step
    batches = _batches(head, (spec, spat, target), train_idx, rng)
    vi = torch.from_numpy(val_idx).to(dev)
    best, best_state, since, epochs = math.inf, None, 0, 0
    module.train()
    for epoch in range(head.max_epochs):
        epoch_loss = _epoch(head, module, opt, loss_fn, batches(), rng, len(train_idx))
        epochs = epoch + 1
        if len(val_idx):  # early stopping on the held-out part, keeping its best state
            module.eval()
            with torch.inference_mode():
                score = float(loss_fn(module(spec[vi], spat[vi]), target[vi]))
            module.train()
        elif head.converged_loss is not None and epoch_loss < head.converged_loss:
            break  # too few labels to hold some out: stop once training converged
        else:
            score = epoch_loss
        if score < best - _TOL:
            best, since = score, 0
            if len(val_idx):
                best_state = copy.deepcopy(module.state_dict())
        else:
            since += 1
            if since >= head.patience:
                break
    if best_state is not None:
        module.load_state_dict(best_state)
    return epochs, (best if best_state is not None else None)


_TOL = 1e-4  # the least decrease of the (validation or training) loss that counts as progress


_TRAIN_DOC = """
    Training args:
        hidden: width of the hidden layers.
        dropout: dropout before each hidden and the output layer.
        learning_rate, weight_decay: AdamW.
        max_epochs, batch_size: epochs (upper bound with early stopping) and mini-batch size.
        mixup_alpha: Beta(alpha, alpha) mixup of inputs and targets; 0 turns it off.
        class_balanced: weight the loss by inverse class frequency.
        validation_fraction: part of each class held out for early stopping, used only when
            every class then has at least ``min_val_per_class`` validation pixels.
        patience: epochs without improvement before stopping: of the validation loss, or,
            when there is no validation part, of the training loss by more than 1e-4 (as
            scikit-learn's ``MLPClassifier`` stops), so tiny label sets stop once learned.
        converged_loss: without a validation part, also stop as soon as an epoch's training
            loss is below this (``None``: only ``patience``). 1e-3 trained 1.9-3.6x fewer epochs
            at 5 labels per class; training on to the plateau gained up to 1.1 points (README).
        n_members: train this many nets, from seeds ``random_state``, ``random_state + 1``, …
            (each with its own validation part), and average their class probabilities (a
            deep ensemble); 1 is one net. On Indian Pines at 5 labels per class, 5 members
            of ``film_ctx`` gave 77.3 % OA against 76.6 % (docs/results.md).
        random_state: seed of initialisation, shuffling, mixup and the validation part.
        device: ``auto`` (CUDA when present, else CPU) or a torch device.
"""


class FiLMClassifier(_TorchHead):
    """Spectral FiLM fusion of cached spatial features (Hu, Banerjee & Prasad, GeoDiffNet-F).

    Args:
        n_spectral: the first ``n_spectral`` columns of ``X`` are the spectrum, the rest spatial
            features (``None``: half of the columns, for generic use).
        n_context: the ``n_context`` columns after the spectrum are context features
            (:mod:`pipeline.features.context`): they join the (reduced) spectrum in the branch
            that makes ``gamma`` and ``beta``, so the modulation sees the pixel's neighbourhood too.
        spectral_pca: reduce the normalised spectrum to this many principal components
            (fitted on the train pixels) first; ``None`` keeps every band. With a few labels
            per class an encoder on 200 raw bands overfits: 30 components gave 0.1-3.9 points
            OA more on Indian Pines and SalinasA at 5 and 10 labels per class (README).
        width: channels of the projected spatial features that ``gamma``/``beta`` modulate.
        spectral_skip: also hand the spectral encoder's hidden features to the classifier, so
            the spectrum is not only a modulator (the paper's head modulates only). With weak
            spatial features this helps: with ``spectral_pca=30`` it was at least as good as
            ``concat`` in all eight settings measured.
        spatial_dropout: the probability that a training pixel's spatial features are dropped
            whole (set to the train pixels' mean) in a step, so the spectral branch (with
            ``spectral_skip``) also learns to classify alone and the spatial features can only
            add to it (modality dropout); never at prediction. 0, the default, is the paper's
            head.
    """

    __doc__ = (__doc__ or "") + _TRAIN_DOC
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **_TRAIN_CONSTRAINTS,
        "n_context": [_at_least(0)],
        "width": [_at_least(1)],
        "spectral_skip": ["boolean"],
        "spatial_dropout": [Interval(Real, 0, 1, closed="left")],
    }

    def __init__(
        self,
        n_spectral: int | None = None,
        *,
        n_context: int = 0,
        spectral_pca: int | None = 30,
        width: int = 128,
        spectral_skip: bool = False,
        spatial_dropout: float = 0.0,
        hidden: int = 128,
        dropout: float = 0.1,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 300,
        batch_size: int = 256,
        mixup_alpha: float = 0.0,
        class_balanced: bool = True,
        validation_fraction: float = 0.2,
        min_val_per_class: int = 2,
        patience: int = 40,
        converged_loss: float | None = 1e-3,
        n_members: int = 1,
        random_state: int = 0,
        device: str = "auto",
    ) -> None:
        self._keep_params(locals())

    def _build(self, n_spec: int, n_spat: int, n_classes: int) -> nn.Module:
        return _FiLMNet(
            n_spec,
            n_spat,
            n_classes,
            self.width,
            self.hidden,
            self.dropout,
            self.spectral_skip,
            self.spatial_dropout,
        )


class MLPHead(_TorchHead):
    """An MLP on all columns of ``X`` (``concat``/``spatial``/``spectral`` heads).

    Args:
        n_spectral: kept for a uniform interface; the MLP reads every column (``None``).
        spectral_pca: with ``n_spectral``, reduce that many leading columns by PCA first.
    """

    __doc__ = (__doc__ or "") + _TRAIN_DOC

    def __init__(
        self,
        n_spectral: int | None = 0,
        *,
        spectral_pca: int | None = None,
        hidden: int = 256,
        dropout: float = 0.1,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 300,
        batch_size: int = 256,
        mixup_alpha: float = 0.0,
        class_balanced: bool = True,
        validation_fraction: float = 0.2,
        min_val_per_class: int = 2,
        patience: int = 40,
        converged_loss: float | None = 1e-3,
        n_members: int = 1,
        random_state: int = 0,
        device: str = "auto",
    ) -> None:
        self._keep_params(locals())

    def _build(self, n_spec: int, n_spat: int, n_classes: int) -> nn.Module:
        return _MLPNet(n_spec + n_spat, n_classes, self.hidden, self.dropout)


class _FiLMNet(nn.Module):
    def __init__(
        self,
        n_spec: int,
        n_spat: int,
        n_classes: int,
        width: int,
        hidden: int,
        dropout: float,
        skip: bool = False,
        spatial_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.spatial_dropout = spatial_dropout
        self.embed = nn.Sequential(nn.Linear(n_spec, hidden), nn.GELU())
        self.film = nn.Linear(hidden, 2 * width)
        nn.init.zeros_(self.film.weight)  # start as the identity modulation
        nn.init.zeros_(self.film.bias)
        self.project = nn.Sequential(nn.Linear(n_spat, width), nn.LayerNorm(width))
        self.skip = skip
        self.classify = nn.Sequential(
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(width + (hidden if skip else 0), hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, spec: torch.Tensor, spat: torch.Tensor) -> torch.Tensor:
        if self.training and self.spatial_dropout > 0:  # no draw at 0: the paper's head as it was
            keep = torch.rand(len(spat), 1, device=spat.device) >= self.spatial_dropout
            spat = spat * keep.to(spat.dtype)  # standardised: 0 is the train pixels' mean
        e = self.embed(spec)
        gamma, beta = self.film(e).chunk(2, dim=1)
        h = (1 + gamma) * self.project(spat) + beta
        return self.classify(torch.cat([h, e], dim=1) if self.skip else h)


class _Averaged(nn.Module):
    """Nets trained from different seeds, as one module: the log of their mean class
    probabilities (so a softmax of its output is that mean)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, spec: torch.Tensor, spat: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(spec, spat).float(), dim=1) for m in self.members])
        return torch.log(probs.mean(dim=0).clamp_min(1e-30))


class _MLPNet(nn.Module):
    def __init__(self, n_in: int, n_classes: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_in, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, spec: torch.Tensor, spat: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([spec, spat], dim=1))
