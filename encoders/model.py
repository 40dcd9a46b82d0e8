"""EncodingModel: frozen backbone + per-voxel head as a LightningModule.

Batches are dicts {"x": images (n, 3, S, S) or precomputed features (n, n_features),
"y": responses (n, n_voxels)}. With precomputed features the backbone is not run at all;
it is kept (frozen) so the checkpoint describes the whole encoder.

Precision: under a mixed-precision trainer (``precision=bf16-mixed`` / ``16-mixed``) only the backbone
runs under autocast; standardisation, the head, the loss and the metrics run in float32 (float64 sums).

DDP: validation and test scores are summed over all ranks (torchmetrics), and the samples a
``DistributedSampler`` repeats to even out the ranks are left out, so every score is over the whole
split, each sample once. Resuming: the training order depends only on (seed, epoch), so a run resumed
from ``last.ckpt`` sees the same batches as one that never stopped.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torch.utils.data import DistributedSampler, RandomSampler

from encoders.feature_transform import FeatureTransform
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
    ``transform`` (encoders.feature_transform) turns backbone outputs into the head's input: the
    standardisation with train-set statistics (``set_feature_stats``), after a video run's frame stage.
    seed: the training order and the global RNG (dropout) of epoch e are drawn from (seed, e), so a
    resumed run repeats exactly what an uninterrupted one does. voxel_batch: voxels per chunk when the
    metrics accumulate their sums (bounds the float64 temporaries at 100k+ voxels).
    """

    def __init__(self, head: nn.Module, n_features: int, n_voxels: int, backbone: nn.Module | None = None,
                 optimizer: OptimizerFactory | None = None, scheduler: SchedulerFactory | None = None,
                 seed: int = 0, voxel_batch: int = 16384):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.n_features, self.n_voxels = n_features, n_voxels
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.transform = FeatureTransform(n_features)
        self.seed = int(seed)
        self.val_scores = VoxelScores(n_voxels, voxel_batch=voxel_batch)
        self.test_scores = VoxelScores(n_voxels, voxel_batch=voxel_batch)
        self.test_result: dict[str, torch.Tensor] | None = None
        self._seen = {"val": 0, "test": 0}  # samples this rank has scored in the current epoch
        self._train_loss_sum, self._train_rows = torch.zeros((), dtype=torch.float64), 0  # this epoch's, this rank

    @property
    def feature_mean(self) -> torch.Tensor:
        return self.transform.mean

    @property
    def feature_std(self) -> torch.Tensor:
        return self.transform.std

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """mean, std: (n_features,) from the training features; std floors at 1e-6·max."""
        self.transform.set_standardisation(mean, std)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) images or (n, n_features) features -> (n, n_features) standardised, float32.

        Images go through the backbone and the whole image-side transform (``transform.from_backbone``);
        features are the per-sample features the standardisation was fitted on. The backbone runs under
        whatever autocast is active; the transform never does.
        """
        if x.ndim == 4:
            if self.backbone is None:
                raise ValueError("EncodingModel got images but has no backbone")
            raw = self.backbone(x)
            with autocast_off(raw.device):
                return self.transform.from_backbone(raw)
        with autocast_off(x.device):
            return self.transform.standardise(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: images or features -> predicted responses (n, n_voxels), float32 (the head never autocasts)."""
        features = self.features(x)
        with autocast_off(features.device):
            return self.head(features.float()).float()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pred = self(batch["x"])
        with autocast_off(pred.device):
            loss = nn.functional.mse_loss(pred, batch["y"].float())
        # Summed on the device and logged once per epoch (on_train_epoch_end): a self.log per step costs
        # ~0.7 ms of host time on a 2-core CPU, about what a GPU takes for the whole step.
        n = batch["y"].shape[0]
        self._train_loss_sum = self._train_loss_sum + loss.detach().double() * n
        self._train_rows += n
        return loss

    def on_train_epoch_end(self) -> None:
        """train/loss: the epoch's mean squared error over every rank's rows (each batch weighted by its size)."""
        if not self._train_rows:
            return
        total = torch.stack([self._train_loss_sum.reshape(()),
                             torch.tensor(float(self._train_rows), dtype=torch.float64, device=self.device)])
        total = self.trainer.strategy.reduce(total, reduce_op="sum")  # a no-op on one process
        self.log("train/loss", (total[0] / total[1]).float(), on_epoch=True)

    def on_fit_start(self) -> None:
        """Under ``Trainer(deterministic=True)`` torch also fills every new tensor with NaN (a check for reads of
        uninitialised memory): an extra write of each gradient and optimizer temporary, ~3 % of a linear-head
        step on a CPU. Training turns that check off (the deterministic algorithms stay; no result depends
        on the fill) and restores it afterwards."""
        self._fill_memory = torch.utils.deterministic.fill_uninitialized_memory
        torch.utils.deterministic.fill_uninitialized_memory = False

    def on_fit_end(self) -> None:
        torch.utils.deterministic.fill_uninitialized_memory = getattr(self, "_fill_memory", True)

    def on_train_epoch_start(self) -> None:
        """Draw this epoch's training order and global RNG from (seed, epoch) (see the class docstring)."""
        epoch_seed = self.seed * 100_003 + self.current_epoch
        torch.manual_seed(epoch_seed + 7_919 * self.global_rank)
        self._train_loss_sum, self._train_rows = torch.zeros((), dtype=torch.float64, device=self.device), 0
        # A DataLoader, or the datamodule's TensorBatches (batches drawn by index on the device): both
        # take their order from a torch sampler (under DDP a DistributedSampler, whose epoch Lightning sets).
        sampler = getattr(self.trainer.train_dataloader, "sampler", None)
        if isinstance(sampler, RandomSampler):
            # A fresh generator of its own: the loader's base-seed draws no longer shift the permutation.
            sampler.generator = torch.Generator().manual_seed(epoch_seed)

    def _whole_split_rows(self, stage: str, n: int) -> torch.Tensor | slice:
        """Rows of this rank's next batch of n samples that are not DistributedSampler padding.

        A DistributedSampler appends repeats of the first indices until every rank has as many; rank r's
        k-th sample is at position r + k·world of that list, and positions past the dataset are repeats.
        """
        seen = self._seen[stage]
        self._seen[stage] += n
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        sampler = getattr(loaders, "sampler", None)
        if not isinstance(sampler, DistributedSampler) or sampler.num_replicas == 1:
            return slice(None)
        positions = sampler.rank + sampler.num_replicas * (seen + torch.arange(n))
        return positions < len(sampler.dataset)

    def on_validation_epoch_start(self) -> None:
        self._seen["val"] = 0

    def on_test_epoch_start(self) -> None:
        self._seen["test"] = 0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        keep = self._whole_split_rows("val", batch["y"].shape[0])
        pred, y = self(batch["x"])[keep], batch["y"].float()[keep]
        with autocast_off(pred.device):  # a last batch can be all padding: it then weighs 0
            loss = nn.functional.mse_loss(pred, y) if len(y) else pred.new_zeros(())
        self.log("val/loss", loss, on_epoch=True, batch_size=len(y), sync_dist=True)
        self.val_scores.update(pred, y)

    def on_validation_epoch_end(self) -> None:
        scores = self.val_scores.compute()  # summed over every rank's samples
        self.log("val/r_mean", torch.nanmean(scores["r"]).float(), sync_dist=True)
        self.val_scores.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        keep = self._whole_split_rows("test", batch["y"].shape[0])
        self.test_scores.update(self(batch["x"])[keep], batch["y"].float()[keep])

    def on_test_epoch_end(self) -> None:
        """test_result: {"r", "r2"} (n_voxels,) float64 over the whole test split, on every rank."""
        scores = self.test_scores.compute()
        self.test_result = {k: v.cpu() for k, v in scores.items()}
        self.log("test/r_mean", torch.nanmean(scores["r"]).float(), sync_dist=True)
        self.log("test/r2_mean", torch.nanmean(scores["r2"]).float(), sync_dist=True)
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


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that disables autocast on ``device`` (a no-op where autocast does not exist or is off)."""
    try:
        if not torch.is_autocast_enabled(device.type):
            return contextlib.nullcontext()
    except RuntimeError:
        return contextlib.nullcontext()
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()
