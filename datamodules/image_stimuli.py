"""What the datamodules whose samples are images share (NSD, NOD, the synthetic dataset).

A *stimulus source* is anything with ``image(id) -> uint8 (H, W, 3)`` and ``len()``: NSD's ``StimulusBrick``
(imgBrick by 73k id), NOD's ``ImageFiles`` (the subject's stimulus list). ``ImageDataModule`` keeps one in
``images`` after ``setup()`` and serves a split's images through the encoder's transform, or any ids
for feature extraction (through the encoder's per-image transform, or only decoded to uint8 for
preprocessing on the device; ``collate_images`` keeps images of different sizes apart). Each subclass
also opens its stimuli *without* loading betas, from what a run recorded (``open_stimuli(config,
description)``: config.yaml's ``data`` section and run.json's ``data``), which is how an analysis of a
finished run gets its images.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from datamodules.serving import ResponseDataModule


class StimulusDataset(Dataset):
    """Images by 0-based id through ``transform``: item -> {"x", "id"} (+ "y" with responses (n, n_voxels))."""

    def __init__(self, images, ids: np.ndarray, transform: Callable[[np.ndarray], torch.Tensor],
                 responses: np.ndarray | None = None):
        self.images, self.ids, self.responses, self.transform = images, ids, responses, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        item = {"x": self.transform(self.images.image(self.ids[i])), "id": int(self.ids[i])}
        if self.responses is not None:
            item["y"] = torch.from_numpy(self.responses[i])
        return item


def collate_images(items: list[dict]) -> dict:
    """A batch of items {"x", "id"[, "y"]}: as torch's default_collate when every "x" has one shape; when the
    shapes differ (decoded images of several sizes, e.g. JPEGs, for preprocessing on the device) "x" is the
    list of the images, in order, and the rest is collated as usual."""
    if len({tuple(item["x"].shape) for item in items}) <= 1:
        return default_collate(items)
    batch = default_collate([{k: v for k, v in item.items() if k != "x"} for item in items])
    batch["x"] = [item["x"] for item in items]
    return batch


def permute_within_columns(responses: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each column (voxel) of responses (n_rows, n_voxels) permuted across rows, independently per column:
    the ``shuffle_train_targets`` leakage control."""
    order = rng.permuted(np.broadcast_to(np.arange(len(responses))[:, None], responses.shape), axis=0)
    return np.take_along_axis(responses, order, axis=0)


class ImageDataModule(ResponseDataModule):
    """A datamodule whose samples are images of a stimulus source (``images``, set by ``setup()``).

    Subclasses fill the splits (see ResponseDataModule) and ``images``, and implement
    ``stimulus_source()`` (identity of the images, for feature-cache keys) and the classmethod
    ``open_stimuli(config, description)``.
    """

    def __init__(self, seed: int = 0, batch_size: int = 128, num_workers: int = 0, feature_batches: str = "auto"):
        super().__init__(seed, batch_size, num_workers, feature_batches)
        self.images = None

    @classmethod
    def open_stimuli(cls, config: dict, description: dict):
        """The stimulus source of a run's data (id -> uint8 image), from config.yaml's ``data`` section and
        run.json's ``data`` (the datamodule's ``describe()``), without reading any responses."""
        raise NotImplementedError(f"{cls.__name__} does not say how to open its stimuli")

    def trial_info(self, split: str) -> dict[str, np.ndarray] | None:
        """Per-row trial information of a split, or None when the rows are repeat averages."""
        return None

    def image_dataset(self, split: str) -> StimulusDataset:
        """A split's images (through the encoder's transform) with their responses."""
        return StimulusDataset(self.images, self.split_ids[split], self._require_transform(), self._responses[split])

    def _require_transform(self) -> Callable:
        if self.transform is None:
            raise RuntimeError("set_transform() first: the datamodule takes its transform from the encoder")
        return self.transform

    def image_loader(self, split: str) -> DataLoader:
        """Images of a split in split_ids order (for feature extraction)."""
        return self.images_loader(self.split_ids[split])

    def images_loader(self, ids: np.ndarray) -> DataLoader:
        """Images of any 0-based ids, in that order, without responses (for feature extraction). With a
        decode-only transform (uint8 (H, W, 3)), images of different sizes come as a list (``collate_images``)."""
        return DataLoader(StimulusDataset(self.images, np.asarray(ids), self._require_transform()),
                          batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate_images)
