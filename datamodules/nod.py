"""NOD (Natural Object Dataset) subject loading and its Lightning datamodule.

``load_nod_subject`` reads one subject's ciftify single-trial betas run by run (the cortical
grayordinates only, reduced to the selected ones), z-scores each run, averages the repeats of each
image (the 10 COCO runs) and computes the noise-ceiling SNR from the COCO repeats. Stimulus ids are
indices into the subject's stimulus list: every image its events name, sorted by relative name
('coco/<file>', 'imagenet/<synset>/<file>'); ``describe()`` records the list. File layout: see
:mod:`datamodules.nod_files`.

``NODDataModule`` serves it through NSDDataModule's machinery (images or features, loaders,
targets, noise ceiling). Splits: ``imagenet_coco`` (default) trains on the ImageNet images (val carved
out, seeded) and tests on the repeat-averaged COCO images; ``random`` holds out ``test_fraction`` of all
images (0.15 as in CLIP-MSM), seeded, and carves val from the rest.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.errors import DataError
from datamodules.nod_files import (N_CORTEX, Cortex, ImageFiles, NODPaths, Run, read_betas, read_coco_images,
                                   read_cortex, read_dlabel, read_tsv, resolve_imagenet)
from datamodules.nsd import NSDDataModule, SubjectResponses
from datamodules.fmri_runs import ncsnr_from_repeats
from datamodules.preprocessing import (RepeatAverager, drop_columns, invalid_voxels,
                                       split_train_val, zscore_trials)

log = logging.getLogger(__name__)

DEFAULT_ROI_FILES = ("floc-faces", "floc-bodies", "floc-places", "floc-words")
SPLIT_MODES = ("imagenet_coco", "random")


def read_rois(paths: NODPaths, roi_files: Sequence[str], n_cortex: int,
              reference: Cortex) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """({name: bool (n_cortex,)}, {name: its dlabel file}) for every label of the dlabel files, and each
    file's union of labels under the file's own name (e.g. 'floc-faces')."""
    rois: dict[str, np.ndarray] = {}
    origin: dict[str, Path] = {}
    for name in roi_files:
        path = paths.roi(name)
        masks, cortex = read_dlabel(path, n_cortex)
        reference.check_same(cortex)
        rois[name] = np.logical_or.reduce(list(masks.values())) if masks else np.zeros(n_cortex, bool)
        origin[name] = path
        for label, mask in masks.items():
            rois[label] = rois[label] | mask if label in rois else mask
            origin.setdefault(label, path)
    return rois, origin


def select_grayordinates(rois: dict[str, np.ndarray], roi_mask: Sequence[str] | None, n_cortex: int,
                         roi_files: Sequence[str]) -> np.ndarray:
    """Indices (n,) into the cortical grayordinates: all of them, or the union of the named ROIs."""
    if not roi_mask:
        return np.arange(n_cortex)
    unknown = [n for n in roi_mask if n not in rois]
    if unknown:
        raise DataError(f"data.roi_mask: no ROI named '{unknown[0]}' in {list(roi_files)}; "
                        f"available: {sorted(rois)}")
    keep = np.logical_or.reduce([rois[n] for n in roi_mask])
    if not keep.any():
        raise DataError(f"data.roi_mask: ROIs {list(roi_mask)} hold no grayordinates")
    return np.flatnonzero(keep)


def run_stimuli(paths: NODPaths, run: Run, imagenet_dir: Path, coco_dir: Path, coco_csv: Path,
                coco_names: list[str] | None) -> tuple[list[str], list[Path], int]:
    """Relative names and files of a run's beta maps, in map order, and the events file's trial count."""
    events = paths.events(run)
    if run.is_coco:
        rows = read_tsv(events, ("onset", "trial_type"))
        names, files = [], []
        for img in coco_names:
            file = coco_dir / img
            if not file.is_file():
                raise DataError(f"{coco_csv}: image '{img}' (a trial of {events.name}) not found: {file}")
            names.append(f"coco/{img}")
            files.append(file)
        return names, files, len(rows)
    rows = read_tsv(events, ("onset", "trial_type", "stim_file"))
    names, files = [], []
    for i, row in enumerate(rows):
        file = resolve_imagenet(row["stim_file"], imagenet_dir)
        if file is None:
            raise DataError(f"{events}: row {i + 1} stim_file '{row['stim_file']}': image not found "
                            f"under {imagenet_dir}")
        names.append(f"imagenet/{file.relative_to(imagenet_dir).as_posix()}")
        files.append(file)
    return names, files, len(rows)


def load_nod_subject(root: str | Path, subject: int, sessions: Sequence[int] | None = None,
                     roi_mask: Sequence[str] | None = None, roi_files: Sequence[str] = DEFAULT_ROI_FILES,
                     n_cortex: int = N_CORTEX, zscore: bool = True, imagenet_dir: str | Path | None = None,
                     coco_dir: str | Path | None = None, coco_images_csv: str | Path | None = None
                     ) -> tuple[SubjectResponses, ImageFiles]:
    """Read, z-score (per run) and repeat-average one subject's NOD betas.

    Returns (responses, images): responses.stim_ids index ``images`` (the subject's stimulus list);
    voxel_xyz (n_voxels, 1) are indices into the n_cortex cortical grayordinates (= fsLR 91282 indices);
    shared_ids are the COCO images; ncsnr comes from the COCO repeats (NaN with fewer than 2 COCO runs).
    """
    root = Path(root)
    roi_mask = [roi_mask] if isinstance(roi_mask, str) else roi_mask
    paths = NODPaths(root, int(subject))
    imagenet_dir = Path(imagenet_dir) if imagenet_dir else root / "stimuli/imagenet"
    coco_dir = Path(coco_dir) if coco_dir else root / "stimuli/coco"
    coco_csv = Path(coco_images_csv) if coco_images_csv else root / "stimuli/coco_images.csv"
    runs = paths.runs()
    if sessions is not None:
        wanted = {f"imagenet{int(s):02d}" for s in sessions}
        have = sorted({r.session for r in runs if not r.is_coco})
        missing = sorted(wanted - set(have))
        if missing:
            raise DataError(f"{paths.results_dir}: session {missing[0]} not found ({paths.sub} has {have})")
        runs = [r for r in runs if r.is_coco or r.session in wanted]
    coco_names = read_coco_images(coco_csv) if any(r.is_coco for r in runs) else None

    # Stimuli first (cheap): every image named, so ids can be assigned before any betas are read.
    per_run = {run: run_stimuli(paths, run, imagenet_dir, coco_dir, coco_csv, coco_names) for run in runs}
    files_by_name = {n: f for names, files, _ in per_run.values() for n, f in zip(names, files)}
    stim_names = sorted(files_by_name)
    stim_id = {n: i for i, n in enumerate(stim_names)}
    images = ImageFiles(stim_names, [files_by_name[n] for n in stim_names])

    reference = read_cortex(paths.betas(runs[0]), n_cortex)
    rois, origin = read_rois(paths, roi_files, n_cortex, reference)
    selected = select_grayordinates(rois, roi_mask, n_cortex, roi_files)

    averager = RepeatAverager(len(selected), ids=np.arange(len(stim_names)))  # float32 sums, allocated once
    bad = np.zeros(len(selected), dtype=bool)
    coco_trials = []
    for run in runs:
        path, (names, _, n_events) = paths.betas(run), per_run[run]
        betas, cortex = read_betas(path, n_cortex, selected)
        if len(betas) != n_events:
            raise DataError(f"{path}: {len(betas)} beta maps (trials), but {paths.events(run)} lists {n_events} trials")
        if len(betas) != len(names):
            raise DataError(f"{path}: {len(betas)} beta maps, but {coco_csv} lists {len(names)} COCO images")
        reference.check_same(cortex)
        ids = np.array([stim_id[n] for n in names])
        with warnings.catch_warnings():  # all-NaN grayordinates: counted below, not warned about per run
            warnings.simplefilter("ignore", RuntimeWarning)
            bad |= invalid_voxels(betas)
        values = zscore_trials(betas) if zscore else np.nan_to_num(betas)
        averager.add(ids, values)
        if run.is_coco:
            coco_trials.append(values)
        del betas
    stim_ids, responses, counts = averager.result()
    if bad.all():
        raise DataError(f"{paths.results_dir}: every selected grayordinate is NaN or constant in some run")
    for name in roi_mask or ():
        if not (rois[name][selected] & ~bad).any():
            raise DataError(f"data.roi_mask: ROI '{name}' ({origin[name]}) is empty after removing "
                            f"{int(bad.sum())} grayordinates with NaN or constant betas")
    if bad.any():
        log.warning("%s: dropped %d of %d grayordinates with NaN or constant betas",
                    paths.sub, int(bad.sum()), len(bad))
    keep = ~bad
    grayordinates = selected[keep]
    if len(coco_trials) >= 2:
        ncsnr = ncsnr_from_repeats(np.stack(coco_trials)[:, :, keep]).astype(np.float32)
    else:
        log.warning("%s: %d COCO run(s): no repeats, so no noise ceiling (ncsnr = NaN)", paths.sub, len(coco_trials))
        ncsnr = np.full(len(grayordinates), np.nan, dtype=np.float32)
    shared = np.array(sorted(stim_id[n] for n in stim_names if n.startswith("coco/")), dtype=np.int64)
    sessions_read = sorted({r.session for r in runs}, key=lambda s: (s == "coco", s))
    report = {name: mask[grayordinates] for name, mask in rois.items() if mask[grayordinates].any()}
    return SubjectResponses(
        subject=paths.subject, stim_ids=stim_ids, responses=drop_columns(responses, keep),
        n_repeats=counts, voxel_xyz=grayordinates[:, None].astype(np.int64), ncsnr=ncsnr, rois=report,
        shared_ids=shared, sessions=sessions_read, n_dropped=int(bad.sum()),
        info={"runs": [r.name for r in runs], "n_cortex": n_cortex, "roi_mask": list(roi_mask or []),
              "zscore": zscore, "voxel_ids": "indices into the cortical grayordinates (fsLR 91282 order)"},
    ), images


class NODDataModule(NSDDataModule):
    """NOD data for one subject, served like NSDDataModule (``split_ids`` index the stimulus list)."""

    def __init__(self, root: str, subject: int = 1, sessions: Sequence[int] | None = None,
                 split: str = "imagenet_coco", test_fraction: float = 0.15, roi_mask: Sequence[str] | None = None,
                 roi_files: Sequence[str] = DEFAULT_ROI_FILES, n_cortex: int = N_CORTEX, zscore: bool = True,
                 val_fraction: float = 0.1, seed: int = 0, batch_size: int = 128, num_workers: int = 0,
                 shuffle_train_targets: bool = False, imagenet_dir: str | None = None, coco_dir: str | None = None,
                 coco_images_csv: str | None = None, name: str = "nod", feature_batches: str = "auto"):
        if split not in SPLIT_MODES:
            raise ValueError(f"data.split must be one of {SPLIT_MODES}, got {split!r}")
        if not 0 < test_fraction < 1:
            raise ValueError(f"data.test_fraction must lie in (0, 1), got {test_fraction}")
        super().__init__(root=root, subject=subject, sessions=sessions, roi_files=roi_files, zscore=zscore,
                         val_fraction=val_fraction, seed=seed, batch_size=batch_size, num_workers=num_workers,
                         shuffle_train_targets=shuffle_train_targets, name=name, feature_batches=feature_batches)
        self.roi_mask = ([roi_mask] if isinstance(roi_mask, str) else list(roi_mask)) if roi_mask else None
        self.split, self.test_fraction, self.n_cortex = split, test_fraction, int(n_cortex)
        self.imagenet_dir, self.coco_dir, self.coco_images_csv = imagenet_dir, coco_dir, coco_images_csv

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        data, self._brick = load_nod_subject(
            self.root, self.subject, self.sessions, self.roi_mask, self.roi_files, self.n_cortex, self.zscore,
            self.imagenet_dir, self.coco_dir, self.coco_images_csv)
        self.split_ids = self.make_splits(data)
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

    def make_splits(self, data: SubjectResponses) -> dict[str, np.ndarray]:
        """{train, val, test}: sorted, disjoint stimulus ids."""
        if self.split == "imagenet_coco":
            is_test = np.isin(data.stim_ids, data.shared_ids)
            if not is_test.any():
                raise DataError(f"{NODPaths(self.root, self.subject).results_dir}: no ses-coco_task-coco_run-* "
                                f"betas, so no test set for data.split=imagenet_coco (use data.split=random)")
            if is_test.all():
                raise DataError(f"{NODPaths(self.root, self.subject).results_dir}: no ImageNet betas to train on")
            rest, test = data.stim_ids[~is_test], data.stim_ids[is_test]
        else:
            rest, test = split_train_val(data.stim_ids, self.test_fraction, self.seed)
        train, val = split_train_val(rest, self.val_fraction, self.seed)
        return {"train": train, "val": val, "test": np.sort(test)}

    def stimulus_source(self) -> dict:
        """Identity of the image files, for feature-cache keys: names in id order, sizes and mtimes."""
        return self._brick.source()

    def describe(self) -> dict:
        """What the run records about its data: split rule, voxels, runs, options and the stimulus list."""
        d = self.data
        return {"dataset": self.name, "root": str(self.root), "subject": self.subject, "sessions": d.sessions,
                "split": self.split, "test_fraction": self.test_fraction if self.split == "random" else None,
                "zscore": self.zscore, "val_fraction": self.val_fraction, "seed": self.seed,
                "shuffle_train_targets": self.shuffle_train_targets, "n_voxels": self.n_voxels,
                "n_dropped_voxels": d.n_dropped, "n_images": {s: int(len(i)) for s, i in self.split_ids.items()},
                **d.info, "stimulus_names": list(self._brick.names)}
