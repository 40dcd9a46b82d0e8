"""Video fMRI (Wen et al. 2018): one subject's runs, their preprocessing and the Lightning datamodule.

Samples are fMRI volumes (TRs), not images. ``load_video_subject`` reads every run of every segment
(``datamodules.video_files`` layout), keeps ``n_volumes`` volumes of the cortex (``timing``,
``datamodules.video_timing``: by default as the authors' released code, dropping the first 1 or 2
volumes by the run's length and the last 4), removes a polynomial trend (order 4), z-scores each
vertex per run and averages the repeats; the noise ceiling SNR comes from the test repeats (NSD's
formula). ``VideoDataModule`` splits by whole segments: test = the test movies, validation =
``val_segments`` whole training segments (seeded), train = the rest, so no time point is ever
shuffled across the splits. Its ``prepare_features`` decodes the movies (every ``frame_stride``-th
frame), extracts per-frame backbone features, z-scores them with training statistics, optionally
reduces them by PCA (fitted on training segments only), convolves them with the HRF at the frame
rate, takes them per kept volume (``timing``: released = the convolved series at 5 s + k·TR; first
= its mean over each TR) and removes from each segment the same polynomial trend as from the runs
(``detrend_features``: the fMRI's temporal filter applied to the regressors too, so a linear
relation between them survives it). The backbone pass itself (and the feature cache) is handed in
by train.py: datamodules never import encoders.

Sample ids: stimulus position × n_volumes + volume, with positions in ``stimuli`` order
(train segments, then test segments), so ids are unique and say where each sample comes from.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules.brain_space import CiftiSpace
from datamodules.errors import DataError
from datamodules.fmri_runs import (RepeatMoments, detrend_polynomial, invalid_columns, ncsnr_from_noise_variance,
                                   zscore_time)
from datamodules.hrf import hrf_kernel
from datamodules.preprocessing import InvalidVoxels, describe_blocks
from datamodules.serving import ResponseDataModule
from datamodules.video_features import FeatureReducer
from datamodules.video_stimuli import VideoFrames
from datamodules.video_files import VideoPaths, iter_frames, probe_video, read_cortex_series
from datamodules.video_timing import check_timing, volume_features

log = logging.getLogger(__name__)

# extract(frame ids (n,), stimulus source {file, size, mtime_ns}, make_loader(ids) -> DataLoader of {"x", "id"})
#   -> (features (n, n_features), status such as "hit" / "built" / "computed")
FrameExtractor = Callable[[np.ndarray, dict, Callable[[np.ndarray], DataLoader]], tuple[object, str]]

# The frame z-score's robustness (FeatureReducer): std floor (fraction of the layer's median unit std, or
# None) and clip to the training frames' range. conf/data/video.yaml takes it from train.yaml's feature_scaling.
FRAME_SCALING = {"std_floor": 0.1, "clip": True}

HEMISPHERES = {"CIFTI_STRUCTURE_CORTEX_LEFT": "cortex_left", "CIFTI_STRUCTURE_CORTEX_RIGHT": "cortex_right"}


def segment_names(prefix: str, segments: int | Sequence[int]) -> list[str]:
    """``segments``: a count N (prefix1..prefixN) or a list of numbers -> ["seg1", …]."""
    numbers = range(1, int(segments) + 1) if isinstance(segments, (int, np.integer)) else [int(s) for s in segments]
    return [f"{prefix}{k}" for k in numbers]


@dataclass
class VideoResponses:
    """One subject's repeat-averaged, preprocessed responses per stimulus.

    responses {stimulus: (n_volumes, n_vertices) float32}; n_repeats {stimulus: int};
    voxel_xyz (n_vertices, 3) int: (grayordinate index, hemisphere 0 left / 1 right, surface vertex);
    ncsnr (n_vertices,) from the test repeats; rois {name: bool (n_vertices,)}.
    """

    subject: int
    responses: dict[str, np.ndarray]
    n_repeats: dict[str, int]
    voxel_xyz: np.ndarray
    ncsnr: np.ndarray
    rois: dict[str, np.ndarray]
    n_dropped: int = 0
    info: dict = field(default_factory=dict)


def _check_stimulus_files(paths: VideoPaths, stimuli: dict[str, int], n_volumes: int, tr: float,
                          fps: float) -> None:
    """Every run and movie exists; every movie has the configured frame rate and lasts as long as its fMRI."""
    for stimulus, n_rep in stimuli.items():
        for r in range(1, n_rep + 1):
            if not paths.cifti(stimulus, r).is_file():
                raise DataError(f"{paths.cifti(stimulus, r)}: file not found "
                                f"({stimulus} needs {n_rep} repeats in {paths.cifti(stimulus, r).parent})")
        video = paths.video(stimulus)
        info = probe_video(video)
        if abs(info.fps - fps) > 0.01 * fps:
            raise DataError(f"{video}: {info.fps:g} fps, but data.fps={fps:g}")
        if info.n_frames < int(round(n_volumes * tr * fps)):
            raise DataError(f"{video}: {info.n_frames} frames = {info.duration:.2f} s, shorter than its fMRI "
                            f"({n_volumes} volumes x TR {tr:g} s = {n_volumes * tr:g} s)")


def load_video_subject(root: str | Path, subject: int, train: Sequence[str], test: Sequence[str],
                       train_repeats: int = 2, test_repeats: int = 10, n_volumes: int = 240, tr: float = 2.0,
                       fps: float = 30.0, n_cortex: int = 59412, detrend_order: int = 4,
                       stimuli_dir: str = "stimuli", timing: str = "released") -> VideoResponses:
    """Read, trim (``timing``, see datamodules.video_timing), detrend, z-score and repeat-average one
    subject's runs (one run in memory at a time)."""
    check_timing(timing)
    paths = VideoPaths(Path(root), int(subject), stimuli_dir)
    if not paths.subject_dir.is_dir():
        raise DataError(f"{paths.subject_dir}: subject folder not found")
    if test_repeats < 2:
        raise DataError(f"data.test_repeats={test_repeats}: the noise ceiling needs at least 2 test repeats")
    stimuli = {**{s: train_repeats for s in train}, **{s: test_repeats for s in test}}
    _check_stimulus_files(paths, stimuli, n_volumes, tr, fps)
    responses, invalid, noise_var, grayordinates = {}, InvalidVoxels(n_cortex), np.zeros(n_cortex), None
    for stimulus, n_rep in stimuli.items():
        moments = RepeatMoments()
        for r in range(1, n_rep + 1):
            path = paths.cifti(stimulus, r)
            run, grays = read_cortex_series(path, n_cortex, n_volumes, timing)
            if grayordinates is None:
                grayordinates, first = grays, path
            elif grays != grayordinates:
                raise DataError(f"{path}: its cortical grayordinates differ from those of {first}")
            run_invalid = invalid_columns(run)
            if run_invalid.all():
                raise DataError(f"{path}: all {n_cortex} cortical grayordinates are NaN or constant over the "
                                f"{n_volumes} volumes kept")
            invalid.add(run_invalid, path.name)
            moments.add(zscore_time(detrend_polynomial(np.nan_to_num(run), detrend_order)))
        responses[stimulus] = moments.mean()
        if stimulus in test:
            noise_var += moments.noise_variance() / len(test)
    bad = invalid.mask
    if bad.all():
        raise DataError(f"{paths.subject_dir}: every cortical grayordinate is NaN or constant in one of the runs "
                        f"{describe_blocks(invalid.blocks_of())}")
    if bad.any():
        log.warning("subject%d: dropped %d of %d grayordinates that are NaN or constant in some run",
                    subject, int(bad.sum()), n_cortex)
    keep = ~bad
    hemi = np.array([HEMISPHERES.get(str(s), "other") for s in grayordinates.structure])
    xyz = np.stack([np.arange(n_cortex), (hemi == "cortex_right").astype(int), grayordinates.vertex], 1)[keep]
    rois = {name: (hemi[keep] == name) for name in HEMISPHERES.values() if (hemi[keep] == name).any()}
    return VideoResponses(
        subject=int(subject), responses={s: np.ascontiguousarray(r[:, keep]) for s, r in responses.items()},
        n_repeats=stimuli, voxel_xyz=xyz, ncsnr=ncsnr_from_noise_variance(noise_var[keep]), rois=rois,
        n_dropped=int(bad.sum()),
        info={"n_volumes": n_volumes, "timing": timing, "tr": tr, "fps": fps, "n_cortex": n_cortex, "detrend_order": detrend_order,
              "voxel_xyz_columns": ["grayordinate", "hemisphere (0 left, 1 right)", "surface vertex"]})


class FrameDataset(IterableDataset):
    """Frames of one movie at the given indices, decoded in order, through ``transform``: {"x", "id"}."""

    def __init__(self, path: Path, indices: np.ndarray, transform: Callable[[np.ndarray], torch.Tensor]):
        self.path, self.indices, self.transform = path, np.asarray(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        for index, frame in iter_frames(self.path, self.indices):
            yield {"x": self.transform(frame), "id": index}


class VideoDataModule(ResponseDataModule):
    """Wen et al. 2018 video fMRI for one subject; samples are TRs.

    After ``setup()``: ``split_ids``, ``targets(split)`` (n_TR, n_vertices), ``n_repeats(split)``,
    ``ncsnr()``, ``rois``, ``data`` (VideoResponses), ``split_stimuli`` {split: [stimulus names]}.
    ``prepare_features(backbone, extract)`` computes the features per TR and serves them.
    ``time_series``: samples are consecutive TRs, so cross-validation folds must be contiguous.
    """

    time_series = True

    def __init__(self, root: str, subject: int = 1, train_segments: int | Sequence[int] = 18,
                 test_segments: int | Sequence[int] = 5, train_repeats: int = 2, test_repeats: int = 10,
                 n_volumes: int = 240, tr: float = 2.0, fps: float = 30.0, n_cortex: int = 59412,
                 detrend_order: int = 4, detrend_features: bool = True, frame_stride: int = 15,
                 hrf: str | dict = "wen", pca_variance: float | None = None, val_segments: int = 2, seed: int = 0,
                 stimuli_dir: str = "stimuli", batch_size: int = 128, frame_batch_size: int = 64,
                 name: str = "video", timing: str = "released", frame_scaling: Mapping | None = None,
                 feature_batches: str = "auto"):
        super().__init__(seed, batch_size, feature_batches=feature_batches)
        self.root, self.subject, self.stimuli_dir = Path(root), int(subject), stimuli_dir
        self.train_stimuli = segment_names("seg", train_segments)
        self.test_stimuli = segment_names("test", test_segments)
        self.train_repeats, self.test_repeats = int(train_repeats), int(test_repeats)
        self.n_volumes, self.tr, self.fps, self.n_cortex = int(n_volumes), float(tr), float(fps), int(n_cortex)
        self.detrend_order, self.frame_stride = int(detrend_order), int(frame_stride)
        self.hrf = hrf if isinstance(hrf, str) else dict(hrf)
        self.pca_variance, self.detrend_features = pca_variance, bool(detrend_features)
        self.val_segments, self.frame_batch_size = int(val_segments), frame_batch_size
        self.name, self.timing = name, timing
        self.frame_scaling = {**FRAME_SCALING, **dict(frame_scaling or {})}
        self._validate()
        self.paths = VideoPaths(self.root, self.subject, stimuli_dir)
        self.data: VideoResponses | None = None
        self.split_stimuli: dict[str, list[str]] = {}
        self.frame_reducer: FeatureReducer | None = None  # fitted by prepare_features; saved with the run's head

    def _validate(self) -> None:
        if not self.train_stimuli or not self.test_stimuli:
            raise ValueError("data.train_segments and data.test_segments must name at least one segment each")
        if not 1 <= self.val_segments < len(self.train_stimuli):
            raise ValueError(f"data.val_segments={self.val_segments} must lie in [1, {len(self.train_stimuli) - 1}] "
                             f"for {len(self.train_stimuli)} training segments")
        if isinstance(self.frame_batch_size, bool) or not isinstance(self.frame_batch_size, int) \
                or self.frame_batch_size < 1:
            raise ValueError(f"data.frame_batch_size must be a positive int, got {self.frame_batch_size!r}")
        if self.frame_stride < 1 or self.n_volumes < 1 or self.tr <= 0 or self.fps <= 0:
            raise ValueError("data.frame_stride, data.n_volumes, data.tr and data.fps must be positive")
        if self.tr * self.fps / self.frame_stride < 1:
            raise ValueError(f"data.frame_stride={self.frame_stride} leaves less than one frame per TR "
                             f"({self.fps:g} fps, TR {self.tr:g} s)")
        hrf_kernel(self.hrf, self.frame_stride / self.fps)  # an unknown preset fails here, not after extraction
        check_timing(self.timing)
        unknown = sorted(set(self.frame_scaling) - set(FRAME_SCALING))
        if unknown:
            raise ValueError(f"data.frame_scaling: unknown key(s) {unknown} (has {sorted(FRAME_SCALING)})")
        FeatureReducer(None, None, **self.frame_scaling)  # a bad std_floor fails here, not after extraction

    @property
    def stimuli(self) -> list[str]:
        return self.train_stimuli + self.test_stimuli

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        data = load_video_subject(self.root, self.subject, self.train_stimuli, self.test_stimuli, self.train_repeats,
                                  self.test_repeats, self.n_volumes, self.tr, self.fps, self.n_cortex,
                                  self.detrend_order, self.stimuli_dir, self.timing)
        rng = np.random.default_rng(self.seed)
        val = sorted(rng.choice(len(self.train_stimuli), self.val_segments, replace=False).tolist())
        self.split_stimuli = {"train": [s for k, s in enumerate(self.train_stimuli) if k not in val],
                              "val": [self.train_stimuli[k] for k in val], "test": list(self.test_stimuli)}
        position = {s: k for k, s in enumerate(self.stimuli)}
        for split, names in self.split_stimuli.items():
            self.split_ids[split] = np.concatenate(
                [position[s] * self.n_volumes + np.arange(self.n_volumes) for s in names]).astype(np.int64)
            self._responses[split] = np.ascontiguousarray(np.concatenate([data.responses[s] for s in names]))
            self._repeats[split] = np.concatenate([np.full(self.n_volumes, data.n_repeats[s]) for s in names])
        self.data = data

    def stimulus_source(self, stimulus: str) -> dict:
        """Identity of one movie and how it is sampled, for feature-cache keys."""
        path = self.paths.video(stimulus)
        stat = path.stat()
        return {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def frame_indices(self) -> np.ndarray:
        """0-based frames decoded per movie: every frame_stride-th frame of the fMRI's duration."""
        return np.arange(0, int(round(self.n_volumes * self.tr * self.fps)), self.frame_stride, dtype=np.int64)

    def frames_loader(self, stimulus: str, indices: np.ndarray) -> DataLoader:
        """Frames of one movie at ``indices`` (in order) through the encoder's transform."""
        if self.transform is None:
            raise RuntimeError("set_transform() first: the datamodule takes its transform from the encoder")
        return DataLoader(FrameDataset(self.paths.video(stimulus), indices, self.transform),
                          batch_size=self.frame_batch_size, num_workers=0)

    # -- features per TR ---------------------------------------------------------
    def frame_features(self, backbone, extract: FrameExtractor,
                       transform: Callable[[np.ndarray], torch.Tensor] | None = None,
                       ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Per-frame features {stimulus: (n_frames, n_features)} and what ``extract`` said per movie.
        transform: what the frames loader applies to each decoded frame (default: ``backbone.transform``)."""
        self.set_transform(transform if transform is not None else backbone.transform)
        indices = self.frame_indices()
        out, status = {}, {}
        for stimulus in self.stimuli:
            feats, status[stimulus] = extract(indices, self.stimulus_source(stimulus),
                                              lambda ids, s=stimulus: self.frames_loader(s, ids))
            out[stimulus] = np.asarray(feats, dtype=np.float32)
            if out[stimulus].shape[0] != len(indices):
                raise RuntimeError(f"{stimulus}: {out[stimulus].shape[0]} feature rows for {len(indices)} frames")
        return out, status

    def prepare_features(self, backbone, extract: FrameExtractor,
                         transform: Callable[[np.ndarray], torch.Tensor] | None = None,
                         ) -> tuple[dict[str, torch.Tensor], dict]:
        """Features per TR {split: (n_TR, n_features) float32} (also served), and what the run records.

        backbone: has ``transform`` (uint8 (H, W, 3) -> (3, S, S)) and optionally ``feature_slices``
        {layer: slice} for the per-layer PCA. extract(frame ids, stimulus source, make_loader) ->
        (features (n_ids, n_features), status): the backbone pass, e.g. through the feature cache
        (train.py wires it: datamodules never import encoders). transform: what the frames loader applies
        per frame, default ``backbone.transform``; train.py passes a decode-only one (uint8 (H, W, 3)) when
        the preprocessing runs batched on the extraction device. The z-score and the PCA are fitted on
        the train split's frames only (never validation or test). What the robust z-score touched is
        recorded: units floored and constant, and per split the fraction of frame values it clipped.
        """
        frames, status = self.frame_features(backbone, extract, transform)
        reducer = FeatureReducer(getattr(backbone, "feature_slices", None), self.pca_variance, **self.frame_scaling)
        reducer.fit(np.concatenate([frames[s] for s in self.split_stimuli["train"]]))
        self.frame_reducer = reducer  # train.py hands it to the encoder, which saves it with the head
        rate = self.fps / self.frame_stride
        per_tr = {s: volume_features(reducer.transform(frames[s]), rate, self.tr, self.n_volumes, self.hrf,
                                     self.timing) for s in self.stimuli}
        if self.detrend_features:  # the runs' temporal filter, so Y = XW stays Y' = X'W after it
            per_tr = {s: detrend_polynomial(x, self.detrend_order) for s, x in per_tr.items()}
        features = {split: torch.from_numpy(np.concatenate([per_tr[s] for s in names]).astype(np.float32))
                    for split, names in self.split_stimuli.items()}
        self.set_features(features)
        counts = {k: sum(v == k for v in status.values()) for k in sorted(set(status.values()))}
        info = {"frames_per_movie": int(len(self.frame_indices())), "frame_rate": rate, "hrf": self.hrf,
                "timing": self.timing,
                "detrend_order": self.detrend_order if self.detrend_features else None,
                **reducer.describe(), "frame_status": counts,
                "frame_clipped_fraction": {split: float(np.mean([reducer.clipped_fraction(frames[s]) for s in names]))
                                           for split, names in self.split_stimuli.items()}}
        return features, info

    def image_dataset(self, split: str):
        raise RuntimeError("prepare_features() first: video samples are TRs, served as features")

    @classmethod
    def open_stimuli(cls, config: dict, description: dict) -> VideoFrames:
        """A finished run's images by sample id: the movie frame on screen in the middle of each volume
        (``video_stimuli.VideoFrames``), from config.yaml's ``data`` section and run.json's ``data``."""
        return VideoFrames(VideoPaths(Path(config["root"]), int(config["subject"]), config.get("stimuli_dir", "stimuli")),
                           description["stimuli"], int(description["n_volumes"]), float(description["tr"]),
                           float(description["fps"]))

    @classmethod
    def brain_space(cls, config: dict, description: dict) -> CiftiSpace:
        """The grayordinates of a run's vertices (no fMRI read): the brain models of its first stimulus's first
        run (run.json ``data.stimuli``), whose first ``n_cortex`` columns the run's voxel_xyz[:, 0] index."""
        paths = VideoPaths(Path(config["root"]), int(config["subject"]), config.get("stimuli_dir", "stimuli"))
        stimuli = description.get("stimuli") or segment_names("seg", config.get("train_segments", 1))
        n_cortex = int(config.get("n_cortex", description.get("n_cortex", 59412)))
        try:
            return CiftiSpace.from_file(paths.cifti(stimuli[0], 1), n_cortex)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"{err} (the file that defines the run's grayordinates)") from None

    def describe(self) -> dict:
        """What the run records about its data: segments per split, vertices, preprocessing options."""
        d = self.data
        return {"dataset": self.name, "root": str(self.root), "subject": self.subject,
                "segments": self.split_stimuli, "train_repeats": self.train_repeats,
                "test_repeats": self.test_repeats, "frame_stride": self.frame_stride, "hrf": self.hrf,
                "pca_variance": self.pca_variance, "frame_scaling": self.frame_scaling,
                "val_segments": self.val_segments, "seed": self.seed,
                "n_voxels": self.n_voxels, "n_dropped_voxels": d.n_dropped,
                "sample_id": "stimulus position x n_volumes + volume, positions in 'stimuli' order",
                "stimuli": self.stimuli, "n_images": {s: int(len(i)) for s, i in self.split_ids.items()}, **d.info}
