"""NSD subject loading and the Lightning datamodule.

``load_subject`` reads one subject's betas session by session (reduced to the selected
voxels, then released), z-scores each session, averages the repeats of each image and
returns a ``SubjectResponses``. ``NSDDataModule`` splits it (train = the subject's own
images, test = the shared images it saw, val carved from train with a seed) and serves
either images (through the encoder's transform) or precomputed features.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.errors import DataError
from datamodules.nsd_files import (NSDPaths, StimulusBrick, betas_shape, read_expdesign, read_labels,
                                   read_ncsnr, read_session_betas)
from datamodules.preprocessing import RepeatAverager, invalid_voxels, split_train_val, zscore_trials

log = logging.getLogger(__name__)

DEFAULT_ROI_FILES = ("prf-visualrois", "floc-faces", "floc-bodies", "floc-places", "floc-words")


@dataclass
class SubjectResponses:
    """One subject's repeat-averaged responses at the selected voxels.

    stim_ids (n_images,) 0-based 73k ids; responses (n_images, n_voxels) float32;
    n_repeats (n_images,); voxel_xyz (n_voxels, 3) NIfTI indices; ncsnr (n_voxels,);
    rois: ROI name -> bool (n_voxels,); shared_ids: 0-based ids of NSD's shared images.
    """

    subject: int
    stim_ids: np.ndarray
    responses: np.ndarray
    n_repeats: np.ndarray
    voxel_xyz: np.ndarray
    ncsnr: np.ndarray
    rois: dict[str, np.ndarray]
    shared_ids: np.ndarray
    sessions: list[int]
    n_dropped: int = 0
    info: dict = field(default_factory=dict)


def select_voxels(paths: NSDPaths, roi_mask: str) -> np.ndarray:
    """NIfTI indices (n_voxels, 3) of voxels with a label >= 1 in the ROI file ``roi_mask``, C order."""
    volume, _ = read_labels(paths, roi_mask)
    xyz = np.argwhere(volume > 0)
    if len(xyz) == 0:
        raise DataError(f"{paths.roi(roi_mask)}: ROI mask selects no voxels")
    return xyz


def roi_masks(paths: NSDPaths, roi_files: Sequence[str], xyz: np.ndarray) -> dict[str, np.ndarray]:
    """Named ROI masks over the selected voxels: {label name: bool (n_voxels,)} for every non-empty label."""
    masks: dict[str, np.ndarray] = {}
    for name in roi_files:
        volume, table = read_labels(paths, name)
        if np.any(np.max(xyz, 0) >= np.array(volume.shape[:3])):
            raise DataError(f"{paths.roi(name)}: volume {volume.shape} does not contain the selected voxels")
        values = volume[xyz[:, 0], xyz[:, 1], xyz[:, 2]]
        for k, label in table.items():
            mask = values == k
            if mask.any():
                masks[label] = mask
    return masks


def load_subject(root: str | Path, subject: int, sessions: Sequence[int] | None = None,
                 roi_mask: str = "nsdgeneral", roi_files: Sequence[str] = DEFAULT_ROI_FILES,
                 zscore: bool = True) -> SubjectResponses:
    """Read, z-score (per session) and repeat-average one subject's betas at the ROI-mask voxels."""
    paths = NSDPaths(Path(root), int(subject))
    design = read_expdesign(paths.expdesign)
    available = paths.sessions()
    chosen = list(available) if sessions is None else [int(s) for s in sessions]
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise DataError(f"{paths.betas(missing[0])}: session {missing[0]} not found "
                        f"({paths.subj} has sessions {available})")
    if not chosen:
        raise DataError(f"{paths.betas_dir}: no sessions selected for {paths.subj}")
    xyz = select_voxels(paths, roi_mask)
    n_trials = betas_shape(paths.betas(chosen[0]))[0]
    averager = RepeatAverager(len(xyz))
    bad = np.zeros(len(xyz), dtype=bool)
    for session in chosen:
        path = paths.betas(session)
        if betas_shape(path)[0] != n_trials:
            raise DataError(f"{path}: {betas_shape(path)[0]} trials, but {paths.betas(chosen[0]).name} "
                            f"has {n_trials}; every session must have the same number of trials")
        stim = design.trial_stimuli(paths.subject, session, n_trials)
        betas = read_session_betas(path, xyz)
        bad |= invalid_voxels(betas)
        averager.add(stim, zscore_trials(betas) if zscore else np.nan_to_num(betas))
        del betas
    stim_ids, responses, counts = averager.result()
    if bad.all():
        raise DataError(f"{paths.betas_dir}: every voxel in '{roi_mask}' is NaN or constant")
    if bad.any():
        log.warning("%s: dropped %d of %d voxels in '%s' with NaN or constant betas",
                    paths.subj, int(bad.sum()), len(bad), roi_mask)
    keep = ~bad
    xyz = xyz[keep]
    return SubjectResponses(
        subject=paths.subject, stim_ids=stim_ids, responses=np.ascontiguousarray(responses[:, keep]),
        n_repeats=counts, voxel_xyz=xyz, ncsnr=read_ncsnr(paths, xyz), rois=roi_masks(paths, roi_files, xyz),
        shared_ids=design.sharedix, sessions=chosen, n_dropped=int(bad.sum()),
        info={"trials_per_session": n_trials, "roi_mask": roi_mask, "zscore": zscore})


class StimulusDataset(Dataset):
    """Images by 0-based id through ``transform``: item -> {"x", "id"} (+ "y" with responses (n, n_voxels))."""

    def __init__(self, brick: StimulusBrick, ids: np.ndarray, transform: Callable[[np.ndarray], torch.Tensor],
                 responses: np.ndarray | None = None):
        self.brick, self.ids, self.responses, self.transform = brick, ids, responses, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        item = {"x": self.transform(self.brick.image(self.ids[i])), "id": int(self.ids[i])}
        if self.responses is not None:
            item["y"] = torch.from_numpy(self.responses[i])
        return item


class FeatureDataset(Dataset):
    """Precomputed features (n, n_features) with responses (n, n_voxels): item -> {"x", "y", "id"}."""

    def __init__(self, features: torch.Tensor, ids: np.ndarray, responses: np.ndarray):
        if len(features) != len(ids):
            raise ValueError(f"features have {len(features)} rows for {len(ids)} images")
        self.features, self.ids, self.responses = features, ids, torch.from_numpy(responses)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.features[i], "y": self.responses[i], "id": int(self.ids[i])}


SPLITS = ("train", "val", "test")


class NSDDataModule(L.LightningDataModule):
    """NSD-format data for one subject.

    After ``setup()``: ``split_ids[split]`` (0-based 73k ids), ``targets(split)`` (n, n_voxels),
    ``rois`` (name -> bool (n_voxels,)), ``noise_ceiling(split)``. Serve images with
    ``set_transform(fn)`` or features with ``set_features({split: (n, n_features)})``.
    shuffle_train_targets permutes each voxel's train and val responses across images, independently
    per voxel (a leakage control: test accuracy must then be at chance, voxel by voxel).
    """

    def __init__(self, root: str, subject: int = 1, sessions: Sequence[int] | None = None,
                 roi_mask: str = "nsdgeneral", roi_files: Sequence[str] = DEFAULT_ROI_FILES,
                 zscore: bool = True, val_fraction: float = 0.1, seed: int = 0, batch_size: int = 128,
                 num_workers: int = 0, shuffle_train_targets: bool = False, name: str = "nsd"):
        super().__init__()
        self.root, self.subject, self.sessions = Path(root), int(subject), sessions
        self.roi_mask, self.roi_files, self.zscore = roi_mask, list(roi_files), zscore
        self.val_fraction, self.seed = val_fraction, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_train_targets, self.name = shuffle_train_targets, name
        self.data: SubjectResponses | None = None
        self.split_ids: dict[str, np.ndarray] = {}
        self._responses: dict[str, np.ndarray] = {}
        self._repeats: dict[str, np.ndarray] = {}
        self.transform: Callable | None = None
        self.features: dict[str, torch.Tensor] | None = None
        self._brick: StimulusBrick | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        paths = NSDPaths(self.root, self.subject)
        self._brick = StimulusBrick(paths.stimuli)
        data = load_subject(self.root, self.subject, self.sessions, self.roi_mask, self.roi_files, self.zscore)
        if data.stim_ids.max() >= len(self._brick):
            raise DataError(f"{paths.stimuli}: imgBrick has {len(self._brick)} images, but the design "
                            f"shows stimulus id {int(data.stim_ids.max())}")
        is_test = np.isin(data.stim_ids, data.shared_ids)
        if not is_test.any():
            raise DataError(f"{paths.expdesign}: {paths.subj} saw none of the shared images (sharedix) "
                            f"in sessions {data.sessions}: no test set")
        train_ids, val_ids = split_train_val(data.stim_ids[~is_test], self.val_fraction, self.seed)
        self.split_ids = {"train": train_ids, "val": val_ids, "test": data.stim_ids[is_test]}
        row = {int(i): k for k, i in enumerate(data.stim_ids)}
        rng = np.random.default_rng(self.seed + 1)
        for split, ids in self.split_ids.items():
            rows = np.array([row[int(i)] for i in ids])
            responses = data.responses[rows]
            if self.shuffle_train_targets and split != "test":
                responses = np.take_along_axis(responses, rng.permuted(
                    np.broadcast_to(np.arange(len(rows))[:, None], responses.shape), axis=0), axis=0)
            self._responses[split] = np.ascontiguousarray(responses)
            self._repeats[split] = data.n_repeats[rows]
        self.data = data

    @property
    def n_voxels(self) -> int:
        return self.data.responses.shape[1]

    @property
    def rois(self) -> dict[str, np.ndarray]:
        return self.data.rois

    def targets(self, split: str) -> np.ndarray:
        """Responses (n_images, n_voxels) float32 of a split, in split_ids order."""
        return self._responses[split]

    def n_repeats(self, split: str) -> np.ndarray:
        """Number of trials averaged into each image's response, (n_images,)."""
        return self._repeats[split]

    def ncsnr(self) -> np.ndarray:
        return self.data.ncsnr

    def set_transform(self, transform: Callable[[np.ndarray], torch.Tensor]) -> None:
        """The encoder's preprocessing: uint8 (H, W, 3) -> float (3, S, S)."""
        self.transform = transform

    def set_features(self, features: dict[str, torch.Tensor]) -> None:
        """Serve precomputed features {split: (n_images, n_features)} instead of images."""
        for split in SPLITS:
            if split in features and len(features[split]) != len(self.split_ids[split]):
                raise ValueError(f"{split}: {len(features[split])} feature rows for {len(self.split_ids[split])} images")
        self.features = features

    def image_dataset(self, split: str) -> StimulusDataset:
        """A split's images (through the encoder's transform) with their responses."""
        return StimulusDataset(self._brick, self.split_ids[split], self._require_transform(), self._responses[split])

    def _require_transform(self) -> Callable:
        if self.transform is None:
            raise RuntimeError("set_transform() first: the datamodule takes its transform from the encoder")
        return self.transform

    def image_loader(self, split: str) -> DataLoader:
        """Images of a split in split_ids order (for feature extraction)."""
        return self.images_loader(self.split_ids[split])

    def images_loader(self, ids: np.ndarray) -> DataLoader:
        """Images of any 0-based ids, in that order, without responses (for feature extraction)."""
        return DataLoader(StimulusDataset(self._brick, np.asarray(ids), self._require_transform()),
                          batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def stimulus_source(self) -> dict:
        """Identity of the image file, for feature-cache keys: path, size and modification time."""
        stat = self._brick.path.stat()
        return {"file": str(self._brick.path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if self.features is not None and split in self.features:
            dataset = FeatureDataset(self.features[split], self.split_ids[split], self._responses[split])
            workers = 0
        else:
            dataset, workers = self.image_dataset(split), self.num_workers
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=workers,
                          generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def describe(self) -> dict:
        """What the run records about its data: split ids, voxels, sessions, options."""
        d = self.data
        return {"dataset": self.name, "root": str(self.root), "subject": self.subject, "sessions": d.sessions,
                "roi_mask": self.roi_mask, "zscore": self.zscore, "val_fraction": self.val_fraction,
                "seed": self.seed, "shuffle_train_targets": self.shuffle_train_targets,
                "n_voxels": self.n_voxels, "n_dropped_voxels": d.n_dropped,
                "n_images": {s: int(len(i)) for s, i in self.split_ids.items()}, **d.info}
