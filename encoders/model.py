"""EncodingModel: frozen backbone + per-voxel head as a LightningModule.

Batches are dicts {"x": images (n, 3, S, S) or precomputed features (n, n_features),
"y": responses (n, n_voxels)}. With precomputed features the backbone is not run at all;
it is kept (frozen) so the checkpoint describes the whole encoder.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from encoders.metrics import VoxelScores

# The frozen backbone is in eval mode on purpose; Lightning warns about every such module.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class EncodingModel(L.LightningModule):
    """Predicts voxel responses from images (or their features).

    backbone: a frozen module mapping images (n, 3, S, S) -> (n, n_features), or None when
    only features are ever fed. head: (n, n_features) -> (n, n_voxels).
    optimizer / scheduler: factories completed with the head's parameters / the optimizer
    (defaults: AdamW(lr=1e-3, weight_decay=1e-2), no schedule). The scheduler steps per epoch.
    Features are standardised with train-set statistics stored as buffers (``set_feature_stats``).
    """

    def __init__(self, head: nn.Module, n_features: int, n_voxels: int, backbone: nn.Module | None = None,
                 optimizer: OptimizerFactory | None = None, scheduler: SchedulerFactory | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.n_features, self.n_voxels = n_features, n_voxels
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.val_scores = VoxelScores(n_voxels)
        self.test_scores = VoxelScores(n_voxels)
        self.test_result: dict[str, torch.Tensor] | None = None

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """mean, std: (n_features,) from the training features; std floors at 1e-6·max."""
        std = std.clamp(min=max(float(std.max()) * 1e-6, 1e-12))
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) images or (n, n_features) features -> (n, n_features) standardised, float32."""
        if x.ndim == 4:
            if self.backbone is None:
                raise ValueError("EncodingModel got images but has no backbone")
            x = self.backbone(x)
        return (x.float() - self.feature_mean) / self.feature_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: images or features -> predicted responses (n, n_voxels), float32."""
        return self.head(self.features(x)).float()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = nn.functional.mse_loss(self(batch["x"]), batch["y"].float())
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=batch["y"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pred = self(batch["x"])
        y = batch["y"].float()
        self.log("val/loss", nn.functional.mse_loss(pred, y), on_epoch=True, batch_size=y.shape[0], sync_dist=True)
        self.val_scores.update(pred, y)

    def on_validation_epoch_end(self) -> None:
        scores = self.val_scores.compute()
        self.log("val/r_mean", torch.nanmean(scores["r"]).float())
        self.val_scores.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.test_scores.update(self(batch["x"]), batch["y"].float())

    def on_test_epoch_end(self) -> None:
        scores = self.test_scores.compute()
        self.test_result = {k: v.cpu() for k, v in scores.items()}
        self.log("test/r_mean", torch.nanmean(scores["r"]).float())
        self.log("test/r2_mean", torch.nanmean(scores["r2"]).float())
        self.test_scores.reset()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the frozen backbone out of checkpoints: the run records how to rebuild it."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("backbone.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Fill the backbone's entries from the live (frozen) backbone so strict loading works."""
        if self.backbone is not None:
            state = checkpoint.setdefault("state_dict", {})
            for key, value in self.backbone.state_dict().items():
                state.setdefault(f"backbone.{key}", value)

    def configure_optimizers(self):
        params = [p for p in self.head.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}}
