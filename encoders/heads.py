"""Per-voxel heads: features (n, n_features) -> predicted responses (n, n_voxels).

Sizes are known only at run time, so configs give these as ``_partial_`` and the code
completes them with ``n_features`` and ``n_voxels``. Their other options are checked before anything
heavy runs: ``Head.check_options(prefix="head.", **options)`` (a ValueError naming the option), and for
heads that cross-validate, ``check_training_set(groups, ...)`` once the training split is known.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from encoders import ridge
from encoders.ridge import DEFAULT_ALPHAS, RidgeCV


class LinearHead(nn.Module):
    """One linear map: an independent linear model (weights + bias) for every voxel.

    forward: (n, n_features) -> (n, n_voxels). ``weight`` is (n_voxels, n_features).
    """

    def __init__(self, n_features: int, n_voxels: int):
        super().__init__()
        self.linear = nn.Linear(n_features, n_voxels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


class MLPHead(nn.Module):
    """Shared hidden layer(s), then a per-voxel linear readout.

    forward: (n, n_features) -> (n, n_voxels). hidden: widths of the shared layers.
    """

    ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}

    def __init__(self, n_features: int, n_voxels: int, hidden: Sequence[int] = (512,),
                 dropout: float = 0.1, activation: str = "gelu"):
        super().__init__()
        self.check_options(hidden, dropout, activation, prefix="MLPHead: ")
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), self.ACTIVATIONS[activation](), nn.Dropout(dropout)]
            width = int(h)
        self.hidden = nn.Sequential(*layers)
        self.readout = nn.Linear(width, n_voxels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.readout(self.hidden(features))

    @classmethod
    def check_options(cls, hidden: Sequence[int] = (512,), dropout: float = 0.1, activation: str = "gelu",
                      prefix: str = "") -> None:
        """ValueError naming ``<prefix><option>``: hidden (a list of positive widths), dropout (in [0, 1)),
        activation (one of ACTIVATIONS)."""
        if not (isinstance(hidden, Sequence) and not isinstance(hidden, str)
                and all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden)):
            raise ValueError(f"{prefix}hidden must be a list of positive layer widths (e.g. [512]; [] = no hidden "
                             f"layer), got {hidden!r}")
        if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1):
            raise ValueError(f"{prefix}dropout must be a number in [0, 1), got {dropout!r}")
        if activation not in cls.ACTIVATIONS:
            raise ValueError(f"{prefix}activation must be one of {sorted(cls.ACTIVATIONS)}, got {activation!r}")


class RidgeHead(nn.Module):
    """Closed-form ridge with a per-voxel alpha (K-fold CV on the training set), as a linear head.

    ``fit(features (n, n_features), targets (n, n_voxels), groups=None (n,))`` solves it; afterwards it
    predicts like LinearHead. groups: the rows' stimulus ids (train.py passes the split's ids): rows that
    share an id (single trials of one image) are never split across CV folds; with every id distinct the
    folds are the plain K-fold. cv: an int or a scikit-learn splitter (``encoders.ridge.RidgeCV``); voxel_batch:
    an int or "auto" (sized from the device's free memory, ``encoders.ridge.auto_voxel_batch``). It has no
    trainable parameters: train.py fits it instead of running epochs.
    Buffers: weight (n_voxels, n_features), bias (n_voxels,), best_alphas (n_voxels,).
    """

    closed_form = True

    def __init__(self, n_features: int, n_voxels: int, alphas: Sequence[float] | None = None, cv=5,
                 score: str = "r2", shuffle_folds: bool = True, seed: int = 0, voxel_batch: int | str = "auto"):
        super().__init__()
        self.estimator = RidgeCV(alphas=DEFAULT_ALPHAS if alphas is None else list(alphas), cv=cv, score=score,
                                 shuffle=shuffle_folds, seed=seed, voxel_batch=voxel_batch)
        self.register_buffer("weight", torch.zeros(n_voxels, n_features))
        self.register_buffer("bias", torch.zeros(n_voxels))
        self.register_buffer("best_alphas", torch.full((n_voxels,), float("nan"), dtype=torch.float64))

    @torch.no_grad()
    def fit(self, features: torch.Tensor, targets: torch.Tensor | np.ndarray, groups=None,
            device: str | torch.device | None = None) -> "RidgeHead":
        """Choose each voxel's alpha by CV on these (training) samples, then fit on all of them. device: where
        the algebra runs (train.py: the trainer's device, a GPU under accelerator=gpu and each DDP rank's own);
        default the buffers' device. The buffers stay where they are."""
        device = torch.device(device) if device is not None else self.weight.device
        est = self.estimator
        est.device = str(device)
        est.fit(features.to(device), torch.as_tensor(np.asarray(targets)).to(device), groups=groups)
        self.weight.copy_(torch.from_numpy(est.coef_))
        self.bias.copy_(torch.from_numpy(est.intercept_))
        self.best_alphas.copy_(torch.from_numpy(est.best_alphas_))
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.T.to(features.dtype) + self.bias.to(features.dtype)

    @classmethod
    def check_options(cls, alphas: Sequence[float] | None = None, cv=5, score: str = "r2", shuffle_folds: bool = True,
                      seed: int = 0, voxel_batch: int | str = "auto", prefix: str = "") -> None:
        """ValueError naming ``<prefix><option>`` for options the ridge cannot use (``encoders.ridge.check_options``:
        alphas, cv, score, voxel_batch); no data needed."""
        ridge.check_options(alphas, cv, score, voxel_batch, prefix)
        if not isinstance(shuffle_folds, bool):
            raise ValueError(f"{prefix}shuffle_folds must be true or false, got {shuffle_folds!r}")

    @classmethod
    def check_training_set(cls, groups: np.ndarray, alphas=None, cv=5, score: str = "r2", shuffle_folds: bool = True,
                           seed: int = 0, voxel_batch: int | str = "auto", prefix: str = "") -> None:
        """ValueError naming ``<prefix>cv`` when its folds cannot split a training set whose rows carry these
        stimulus ids ``groups`` (n_rows,) — e.g. more folds than images (``encoders.ridge.check_folds``).
        Indices only: run it after the split, before any features are computed."""
        ridge.check_folds(cv, len(groups), groups, shuffle_folds, seed, prefix)
