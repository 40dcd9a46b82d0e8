"""Per-voxel heads: features (n, n_features) -> predicted responses (n, n_voxels).

Sizes are known only at run time, so configs give these as ``_partial_`` and the code
completes them with ``n_features`` and ``n_voxels``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


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

    def __init__(self, n_features: int, n_voxels: int, hidden: Sequence[int] = (512,),
                 dropout: float = 0.1, activation: str = "gelu"):
        super().__init__()
        acts = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
        if activation not in acts:
            raise ValueError(f"MLPHead: activation must be one of {sorted(acts)}, got {activation!r}")
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), acts[activation](), nn.Dropout(dropout)]
            width = int(h)
        self.hidden = nn.Sequential(*layers)
        self.readout = nn.Linear(width, n_voxels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.readout(self.hidden(features))
