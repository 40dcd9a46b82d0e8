"""What every brainprobe datamodule serves once its responses are loaded (NSD, NOD, video).

A subclass fills, in ``setup()``: ``split_ids`` {split: (n_rows,) int ids}, ``_responses``
{split: (n_rows, n_voxels) float32}, ``_repeats`` {split: (n_rows,)} and ``data`` (an object with
``rois`` {name: bool (n_voxels,)} and ``ncsnr`` (n_voxels,)). It serves images through
``image_dataset(split)``, or precomputed features after ``set_features``: those as ``TensorBatches``,
batches drawn by index from tensors held on the training device (``feature_batches``).
"""
from __future__ import annotations

from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from datamodules.tensor_batches import TensorBatches, choose_placement, split_nbytes

SPLITS = ("train", "val", "test")
# How precomputed features are served: "auto" = on the training device when they fit (else "stream");
# "device"; "stream" (host memory, pinned chunks copied ahead); "per_item" (a DataLoader over
# FeatureDataset, one item at a time: the reference the others are tested against).
FEATURE_BATCHES = ("auto", "device", "stream", "per_item")


class FeatureDataset(Dataset):
    """Precomputed features (n, n_features) with responses (n, n_voxels): item -> {"x", "y", "id"}."""

    def __init__(self, features: torch.Tensor, ids: np.ndarray, responses: np.ndarray):
        if len(features) != len(ids):
            raise ValueError(f"features have {len(features)} rows for {len(ids)} samples")
        self.features, self.ids, self.responses = features, ids, torch.from_numpy(responses)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.features[i], "y": self.responses[i], "id": int(self.ids[i])}


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_loader_options(seed, batch_size, num_workers) -> None:
    """ValueError naming the config key (``data.batch_size`` ...) for loader settings no loader can use; in
    ``__init__``, so a typo stops before any data is read."""
    if not _is_int(seed):
        raise ValueError(f"data.seed must be an int, got {seed!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"data.batch_size must be a positive int, got {batch_size!r}")
    if not _is_int(num_workers) or num_workers < 0:
        raise ValueError(f"data.num_workers must be an int >= 0 (0: load in the main process), got {num_workers!r}")


class ResponseDataModule(L.LightningDataModule):
    """Targets, noise ceiling, ROIs and loaders over the splits a subclass's ``setup()`` made.

    seed: the training loader's shuffling; batch_size, num_workers: the loaders'. feature_batches:
    how precomputed features are served (``FEATURE_BATCHES``); every choice gives the same batches.
    """

    def __init__(self, seed: int = 0, batch_size: int = 128, num_workers: int = 0, feature_batches: str = "auto"):
        super().__init__()
        check_loader_options(seed, batch_size, num_workers)
        if feature_batches not in FEATURE_BATCHES:
            raise ValueError(f"data.feature_batches must be one of {FEATURE_BATCHES}, got {feature_batches!r}")
        self.seed, self.batch_size, self.num_workers = seed, batch_size, num_workers
        self.feature_batches = feature_batches
        self.data = None
        self.split_ids: dict[str, np.ndarray] = {}
        self._responses: dict[str, np.ndarray] = {}
        self._repeats: dict[str, np.ndarray] = {}
        self.transform: Callable | None = None
        self.features: dict[str, torch.Tensor] | None = None

    @property
    def n_voxels(self) -> int:
        return self._responses["train"].shape[1]

    @property
    def rois(self) -> dict[str, np.ndarray]:
        return self.data.rois

    def targets(self, split: str) -> np.ndarray:
        """Responses (n_rows, n_voxels) float32 of a split, in split_ids order."""
        return self._responses[split]

    def n_repeats(self, split: str) -> np.ndarray:
        """Number of trials/runs averaged into each row's response, (n_rows,)."""
        return self._repeats[split]

    def ncsnr(self) -> np.ndarray:
        return self.data.ncsnr

    def set_transform(self, transform: Callable[[np.ndarray], torch.Tensor]) -> None:
        """The encoder's preprocessing: uint8 (H, W, 3) -> float (3, S, S)."""
        self.transform = transform

    def set_features(self, features: dict[str, torch.Tensor]) -> None:
        """Serve precomputed features {split: (n_rows, n_features)} instead of images."""
        for split in SPLITS:
            if split in features and len(features[split]) != len(self.split_ids[split]):
                raise ValueError(f"{split}: {len(features[split])} feature rows for {len(self.split_ids[split])} rows")
        self.features = features

    def image_dataset(self, split: str) -> Dataset:
        """A split's images with their responses; datamodules that serve images override this."""
        raise RuntimeError(f"{type(self).__name__} serves precomputed features only: set_features() first")

    def _loader(self, split: str, shuffle: bool) -> DataLoader | TensorBatches:
        if self.features is not None and split in self.features:
            if self.feature_batches != "per_item":
                return self._tensor_batches(split, shuffle)
            dataset = FeatureDataset(self.features[split], self.split_ids[split], self._responses[split])
            workers = 0
        else:
            dataset, workers = self.image_dataset(split), self.num_workers
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=workers,
                          generator=generator)

    def _tensor_batches(self, split: str, shuffle: bool) -> TensorBatches:
        """A split's features and responses as batches drawn by index on the trainer's device.

        The sampler is the one a DataLoader would get here: RandomSampler(generator seeded by ``seed``) or
        SequentialSampler; under DDP the DistributedSampler Lightning would put in its place (this rank's
        share, seed ``seed``, padded to equal shares). The split is placed when its loader is asked for
        (once per fit for the training split: every epoch reuses it).
        """
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        n = len(self.split_ids[split])
        ddp = trainer.distributed_sampler_kwargs if trainer is not None else None
        sampler: Sampler[int]
        if ddp and ddp.get("num_replicas", 1) > 1:
            sampler = DistributedSampler(range(n), shuffle=shuffle, seed=self.seed, drop_last=False, **ddp)
        elif shuffle:
            sampler = RandomSampler(range(n), generator=torch.Generator().manual_seed(self.seed))
        else:
            sampler = SequentialSampler(range(n))
        tensors = (self.features[split], torch.from_numpy(self._responses[split]), self.split_ids[split])
        placement = self.feature_batches
        if placement == "auto":
            placement = choose_placement(split_nbytes(*tensors[:2]), device)
        return TensorBatches(*tensors, sampler, self.batch_size, device, placement)

    def train_dataloader(self) -> DataLoader | TensorBatches:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | TensorBatches:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | TensorBatches:
        return self._loader("test", shuffle=False)
