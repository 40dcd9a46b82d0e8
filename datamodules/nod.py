"""NOD (Natural Object Dataset) subject loading and its Lightning datamodule.

``load_nod_subject`` reads one subject's ciftify single-trial betas run by run (the cortical
grayordinates only, reduced to the selected ones), z-scores each run, averages the repeats of each
image (the 10 COCO runs) and computes the noise-ceiling SNR from the COCO repeats. Stimulus ids are
indices into the subject's stimulus list: every image its events name, sorted by relative name
('coco/<file>', 'imagenet/<synset>/<file>'); ``describe()`` records the list. File layout: see
:mod:`datamodules.nod_files`.

``NODDataModule`` serves it as every image datamodule does (``image_stimuli.ImageDataModule``: images or
features, loaders, targets, noise ceiling). Splits: ``imagenet_coco`` (default) trains on the ImageNet images (val carved
out, seeded) and tests on the repeat-averaged COCO images; ``random`` holds out ``test_fraction`` of all
images (0.15 as in CLIP-MSM), seeded, and carves val from the rest.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.brain_space import CiftiSpace
from datamodules.errors import DataError
from datamodules.fmri_runs import ncsnr_from_repeats
from datamodules.image_stimuli import ImageDataModule, permute_within_columns
from datamodules.nod_files import (N_CORTEX, RUN_PATTERN, Cortex, ImageFiles, NODPaths, Run, coco_order_from_events, read_betas,
                                   read_coco_images, read_cortex, read_dlabel, read_tsv, resolve_imagenet)
from datamodules.nsd import SubjectResponses
from datamodules.preprocessing import (InvalidVoxels, RepeatAverager, check_fraction, check_subject_and_sessions,
                                       describe_blocks, drop_columns, invalid_voxels, split_train_val, zscore_trials)

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
    """Relative names and files of a run's beta maps, in map order, and the events file's trial count.

    coco_csv: where the COCO order came from (coco_images.csv, or the events file it was derived from)."""
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


def image_folders(root: str | Path, imagenet_dir: str | Path | None = None,
                  coco_dir: str | Path | None = None) -> tuple[Path, Path]:
    """The ImageNet and COCO image folders: as given, else ``<root>/stimuli/imagenet`` and ``<root>/stimuli/coco``."""
    root = Path(root)
    return (Path(imagenet_dir) if imagenet_dir else root / "stimuli/imagenet",
            Path(coco_dir) if coco_dir else root / "stimuli/coco")


def coco_order(paths: NODPaths, coco_runs: list[Run], coco_csv: Path, explicit: bool) -> tuple[list[str] | None, Path]:
    """The COCO beta-map order and where it came from: coco_images.csv, or, when the default one is absent,
    the sorted stim_file names of the COCO events (said in one warning line). A data.coco_images_csv that was
    set explicitly must exist."""
    if not coco_runs:
        return None, coco_csv
    if explicit or coco_csv.exists():
        return read_coco_images(coco_csv), coco_csv
    events = [paths.events(r) for r in coco_runs]
    names = coco_order_from_events(events)
    log.warning("%s not found: COCO beta maps taken in the sorted order of the %d COCO images named by the stim_file "
                "column of %d COCO events files (NOD's coco_images.csv lists them so)", coco_csv, len(names), len(events))
    return names, events[0]


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
    imagenet_dir, coco_dir = image_folders(root, imagenet_dir, coco_dir)
    coco_csv = Path(coco_images_csv) if coco_images_csv else root / "stimuli/coco_images.csv"
    runs = paths.runs()
    if sessions is not None:
        wanted = {f"imagenet{int(s):02d}" for s in sessions}
        have = sorted({r.session for r in runs if not r.is_coco})
        missing = sorted(wanted - set(have))
        if missing:
            raise DataError(f"{paths.results_dir}: session {missing[0]} not found ({paths.sub} has {have})")
        runs = [r for r in runs if r.is_coco or r.session in wanted]
    coco_names, coco_csv = coco_order(paths, [r for r in runs if r.is_coco], coco_csv, bool(coco_images_csv))

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
    invalid = InvalidVoxels(len(selected))
    coco_trials = []
    for run in runs:
        path, (names, _, n_events) = paths.betas(run), per_run[run]
        betas, cortex = read_betas(path, n_cortex, selected)
        if len(betas) != n_events:
            raise DataError(f"{path}: {len(betas)} beta maps (trials), but {paths.events(run)} lists {n_events} trials")
        if len(betas) != len(names):
            raise DataError(f"{path}: {len(betas)} beta maps, but {coco_csv} lists {len(names)} COCO images"
                            + ("" if coco_csv.suffix == ".csv" else " (sorted stim_file names: no coco_images.csv)"))
        reference.check_same(cortex)
        ids = np.array([stim_id[n] for n in names])
        with warnings.catch_warnings():  # all-NaN grayordinates: counted below, not warned about per run
            warnings.simplefilter("ignore", RuntimeWarning)
            run_invalid = invalid_voxels(betas)
        if run_invalid.all():
            raise DataError(f"{path}: all {len(run_invalid)} selected grayordinates are NaN or constant over the "
                            f"run's {len(betas)} maps")
        invalid.add(run_invalid, path.name)
        values = zscore_trials(betas) if zscore else np.nan_to_num(betas)
        averager.add(ids, values)
        if run.is_coco:
            coco_trials.append(values)
        del betas
    stim_ids, responses, counts = averager.result()
    bad = invalid.mask
    if bad.all():
        raise DataError(f"{paths.results_dir}: every selected grayordinate is NaN or constant in one of the runs "
                        f"{describe_blocks(invalid.blocks_of())}")
    for name in roi_mask or ():
        if not (rois[name][selected] & ~bad).any():
            raise DataError(f"data.roi_mask: ROI '{name}' ({origin[name]}) is empty after removing its "
                            f"grayordinates with NaN or constant betas in "
                            f"{describe_blocks(invalid.blocks_of(rois[name][selected]))}")
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


class NODDataModule(ImageDataModule):
    """NOD data for one subject (``split_ids`` index the subject's stimulus list, ``images``).

    After ``setup()``: ``split_ids``, ``targets(split)``, ``n_repeats(split)``, ``rois``, ``ncsnr()``,
    ``data`` (SubjectResponses), ``images`` (ImageFiles).
    """

    def __init__(self, root: str, subject: int = 1, sessions: Sequence[int] | None = None,
                 split: str = "imagenet_coco", test_fraction: float = 0.15, roi_mask: Sequence[str] | None = None,
                 roi_files: Sequence[str] = DEFAULT_ROI_FILES, n_cortex: int = N_CORTEX, zscore: bool = True,
                 val_fraction: float = 0.1, seed: int = 0, batch_size: int = 128, num_workers: int = 0,
                 shuffle_train_targets: bool = False, imagenet_dir: str | None = None, coco_dir: str | None = None,
                 coco_images_csv: str | None = None, name: str = "nod", feature_batches: str = "auto"):
        if split not in SPLIT_MODES:
            raise ValueError(f"data.split must be one of {SPLIT_MODES}, got {split!r}")
        check_fraction(test_fraction, "data.test_fraction", "the share of the images tested on with data.split=random")
        check_fraction(val_fraction, "data.val_fraction", "the share of the training images held out for validation")
        check_subject_and_sessions(subject, sessions)
        super().__init__(seed, batch_size, num_workers, feature_batches)
        self.root, self.subject, self.sessions = Path(root), int(subject), sessions
        self.roi_files, self.zscore, self.val_fraction = list(roi_files), zscore, val_fraction
        self.shuffle_train_targets, self.name = shuffle_train_targets, name
        self.data: SubjectResponses | None = None
        self.roi_mask = ([roi_mask] if isinstance(roi_mask, str) else list(roi_mask)) if roi_mask else None
        self.split, self.test_fraction, self.n_cortex = split, test_fraction, int(n_cortex)
        self.imagenet_dir, self.coco_dir, self.coco_images_csv = imagenet_dir, coco_dir, coco_images_csv

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        data, self.images = load_nod_subject(
            self.root, self.subject, self.sessions, self.roi_mask, self.roi_files, self.n_cortex, self.zscore,
            self.imagenet_dir, self.coco_dir, self.coco_images_csv)
        self.split_ids = self.make_splits(data)
        row = {int(i): k for k, i in enumerate(data.stim_ids)}
        rng = np.random.default_rng(self.seed + 1)
        for split, ids in self.split_ids.items():
            rows = np.array([row[int(i)] for i in ids])
            responses = data.responses[rows]
            if self.shuffle_train_targets and split != "test":
                responses = permute_within_columns(responses, rng)
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
        return self.images.source()

    def describe(self) -> dict:
        """What the run records about its data: split rule, voxels, runs, options and the stimulus list."""
        d = self.data
        return {"dataset": self.name, "root": str(self.root), "subject": self.subject, "sessions": d.sessions,
                "split": self.split, "test_fraction": self.test_fraction if self.split == "random" else None,
                "zscore": self.zscore, "val_fraction": self.val_fraction, "seed": self.seed,
                "shuffle_train_targets": self.shuffle_train_targets, "n_voxels": self.n_voxels,
                "n_dropped_voxels": d.n_dropped, "n_images": {s: int(len(i)) for s, i in self.split_ids.items()},
                **d.info, "stimulus_names": list(self.images.names)}

    @classmethod
    def brain_space(cls, config: dict, description: dict) -> CiftiSpace:
        """The grayordinates of a run's voxels (no betas read): the brain models of the first beta file the run
        read (run.json ``data.runs``), its cortical grayordinates indexed by the run's voxel_xyz[:, 0]."""
        root, subject = config.get("root", description.get("root")), config.get("subject", description.get("subject"))
        if root is None or subject is None:
            raise DataError("the run's data config has no root / subject to find its space from")
        paths = NODPaths(Path(root), int(subject))
        runs = [m for name in description.get("runs") or [] if (m := RUN_PATTERN.fullmatch(str(name)))]
        run = Run(runs[0].group(1), runs[0].group(2), int(runs[0].group(3))) if runs else paths.runs()[0]
        n_cortex = int(config.get("n_cortex", description.get("n_cortex", N_CORTEX)))
        try:
            return CiftiSpace.from_file(paths.betas(run), n_cortex)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"{err} (the file that defines the run's grayordinates)") from None

    @classmethod
    def open_stimuli(cls, config: dict, description: dict) -> ImageFiles:
        """The subject's stimulus list (run.json ``data.stimulus_names``, in id order) read from the image
        folders of config.yaml's ``data`` section; DataError naming the first missing file."""
        names = description.get("stimulus_names")
        if not names:
            raise DataError("the run's run.json has no data.stimulus_names (the NOD stimulus list)")
        imagenet_dir, coco_dir = image_folders(config["root"], config.get("imagenet_dir"), config.get("coco_dir"))
        folders = {"imagenet": imagenet_dir, "coco": coco_dir}
        paths = []
        for name in names:
            kind, _, rel = str(name).partition("/")
            if kind not in folders or not rel:
                raise DataError(f"stimulus name {name!r}: expected 'imagenet/<file>' or 'coco/<file>'")
            path = folders[kind] / rel
            if not path.is_file():
                raise DataError(f"{path}: image of stimulus {name!r} not found")
            paths.append(path)
        return ImageFiles(list(names), paths)
