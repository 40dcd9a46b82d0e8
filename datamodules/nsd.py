"""NSD subject loading and the Lightning datamodule.

``load_subject`` reads one subject's betas in any NSD space (func1pt8mm, func1mm, nativesurface,
fsaverage) session by session, each reduced to the selected voxels (or vertices) while it is read and
then released; z-scores each session (optional) and either averages the repeats of each image or
keeps every trial as its own row. ``NSDDataModule`` splits it (train = the subject's own images, test
= its shared images or the images every subject saw, val carved from train with a seed, all trials
of an image in one split) and serves either images (through the encoder's transform) or
precomputed features.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datamodules.brain_space import SurfaceSpace, VolumeSpace
from datamodules.errors import DataError
from datamodules.fmri_runs import ncsnr_from_trial_sums
from datamodules.image_stimuli import ImageDataModule, permute_within_columns
from datamodules.nsd_files import (ExpDesign, Labels, Layout, NSDPaths, StimulusBrick, read_expdesign, read_grid,
                                   read_labels, read_session, session_trials)
from datamodules.preprocessing import (InvalidVoxels, RepeatAverager, check_fraction, check_subject_and_sessions,
                                       describe_blocks, drop_columns, invalid_voxels, split_train_val, zscore_trials)
from datamodules.serving import SPLITS  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

DEFAULT_ROI_FILES = ("prf-visualrois", "floc-faces", "floc-bodies", "floc-places", "floc-words")
TEST_SETS = ("subject", "shared907", "shared515")
# Shared images every subject saw at least this often: NSD's 907 (>= 1) and 515 (all 3 times).
SHARED_MIN_PRESENTATIONS = {"shared907": 1, "shared515": 3}
# Scan sessions each NSD subject completed (NSD data manual, "Technical notes"); 907/515 are counted over these.
NSD_SESSIONS = (40, 40, 32, 30, 40, 32, 40, 30)


@dataclass
class SubjectResponses:
    """One subject's responses at the selected voxels (volumes) or vertices (surfaces).

    stim_ids (n_rows,) 0-based 73k ids; responses (n_rows, n_voxels) float32; n_repeats (n_rows,)
    trials averaged into each row (1 for single trials); voxel_xyz (n_voxels, 3) NIfTI (x, y, z)
    indices, or (n_voxels, 2) [hemisphere (0 = lh, 1 = rh), vertex] on surfaces; ncsnr (n_voxels,);
    rois: ROI name -> bool (n_voxels,); shared_ids: 0-based ids of NSD's shared images.
    Repeat-averaged: one row per image, ids sorted. Single trials: one row per trial, ordered by
    (id, session, trial), with trial_session (1-based), trial_index (0-based within the session) and
    repeat_index (0-based presentation of the image among the loaded trials) per row.
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
    trial_session: np.ndarray | None = None
    trial_index: np.ndarray | None = None
    repeat_index: np.ndarray | None = None

    def take_rows(self, order: np.ndarray) -> None:
        """Reorder every per-row array to ``order`` (responses in place: no second copy)."""
        permute_rows(self.responses, order)
        for name in ("stim_ids", "n_repeats", "trial_session", "trial_index", "repeat_index"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[order])


def permute_rows(a: np.ndarray, order: np.ndarray) -> None:
    """a[:] = a[order] in place, one row of scratch (cycle by cycle); order must be a permutation."""
    done = np.zeros(len(order), dtype=bool)
    for start in range(len(order)):
        if done[start] or order[start] == start:
            done[start] = True
            continue
        saved, i = a[start].copy(), start
        while True:
            done[i] = True
            j = int(order[i])
            if j == start:
                a[i] = saved
                break
            a[i] = a[j]
            i = j


def choose_sessions(paths: NSDPaths, sessions: Sequence[int] | None) -> list[int]:
    """The sessions to read: all on disk (None) or the requested ones, which must exist."""
    available = paths.sessions()
    chosen = list(available) if sessions is None else [int(s) for s in sessions]
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise DataError(f"{paths.betas(missing[0])}: session {missing[0]} not found "
                        f"({paths.subj} has sessions {available})")
    if not chosen:
        raise DataError(f"{paths.betas_dir}: no sessions selected for {paths.subj}")
    return chosen


def select_voxels(paths: NSDPaths, roi_mask: str) -> np.ndarray:
    """Positions (n, 3) or (n, 2) with a label >= 1 in the ROI file ``roi_mask``, sorted."""
    labels = read_labels(paths, roi_mask)
    locs = labels.layout.locations(labels.mask())
    if len(locs) == 0:
        raise DataError(f"{labels.layout.source}: ROI mask '{roi_mask}' selects no voxels")
    return locs


def named_rois(names: Sequence[str], files: dict[str, Labels]) -> dict[str, np.ndarray]:
    """Grid masks of ROIs named by label (e.g. 'FFA-1', a label in any of ``files``' tables) or by
    ROI file (e.g. 'floc-faces': every label of that file). Unknown names: DataError listing the known ones."""
    out = {}
    for name in names:
        if name in files:
            out[name] = files[name].mask()
            continue
        having = [labels for labels in files.values() if name in labels.table.values()]
        if not having:
            known = sorted({v for labels in files.values() for v in labels.table.values()} | set(files))
            raise DataError(f"data.rois: no ROI named '{name}' in the label tables of the ROI files {list(files)}; "
                            f"available: {', '.join(known)} (or add its ROI file to data.roi_files)")
        mask = np.zeros_like(having[0].grid, dtype=bool)
        for labels in having:
            mask |= labels.mask(name)
        out[name] = mask
    return out


def roi_masks(files: Sequence[Labels], locs: np.ndarray) -> dict[str, np.ndarray]:
    """Named ROI masks over positions locs: {label name: bool (n,)} for every non-empty label of ``files``."""
    masks: dict[str, np.ndarray] = {}
    for labels in files:
        values = labels.layout.values(labels.grid, locs)
        for k, label in labels.table.items():
            mask = values == k
            if mask.any():
                masks[label] = masks[label] | mask if label in masks else mask
    return masks


def session_responses(paths: NSDPaths, design: ExpDesign, sessions: Sequence[int], locs: np.ndarray, layout: Layout,
                      zscore: bool = True, n_trials: int | None = None
                      ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Each session's trials at positions ``locs``, preprocessed as every NSD run's data are: yields
    (session, stimulus ids (n_trials,) in presentation order, betas (n_trials, n) float32 z-scored per
    voxel within the session when ``zscore`` (else NaN -> 0), invalid (n,) bool: NaN or constant before
    z-scoring). One session in memory at a time. n_trials: every session must have this many."""
    for session in sessions:
        n, path, _ = session_trials(paths, session)
        if n_trials is not None and n != n_trials:
            raise DataError(f"{path}: {n} trials, but the first session has {n_trials}; "
                            f"every session must have the same number of trials")
        stims = design.trial_stimuli(paths.subject, session, n)
        betas = read_session(paths, session, locs, layout)
        bad = invalid_voxels(betas)
        if zscore:
            zscore_trials(betas, inplace=True)
        else:
            np.nan_to_num(betas, copy=False)
        yield session, stims, betas, bad


def record_invalid(paths: NSDPaths, session: int, locs: np.ndarray, session_invalid: np.ndarray, where: str,
                   invalid: InvalidVoxels) -> None:
    """Add a session's NaN/constant positions (bool (n,) over locs) to ``invalid``, each under the file it
    came from (surfaces: the hemisphere's file). DataError naming a file whose selected positions are all
    NaN or constant over the session: the file is broken, not a few voxels."""
    for h, path in enumerate(paths.betas_files(session)):
        mine = locs[:, 0] == h if paths.surface else np.ones(len(locs), dtype=bool)
        if mine.any() and session_invalid[mine].all():
            raise DataError(f"{path}: all {int(mine.sum())} selected {'vertices' if paths.surface else 'voxels'} "
                            f"({where}) are NaN or constant over the session's trials")
        invalid.add(session_invalid & mine, path.name)


def load_subject(root: str | Path, subject: int, sessions: Sequence[int] | None = None,
                 roi_mask: str = "nsdgeneral", roi_files: Sequence[str] = DEFAULT_ROI_FILES,
                 zscore: bool = True, *, space: str = "func1pt8mm", beta_format: str | None = None,
                 rois: Sequence[str] | None = None, average_repeats: bool = True) -> SubjectResponses:
    """Read one subject's betas at the selected voxels, session by session.

    Voxels: label >= 1 in ``roi_mask``, restricted to the ROIs named in ``rois`` when given (label
    names from the tables of ``roi_files`` or ``roi_mask``, or ROI file names). Every file's shape,
    the design and the trial counts are checked before any betas are read. Memory: the result plus
    one session at the selected voxels plus one read block (``nsd_files.READ_BUDGET``).
    """
    paths = NSDPaths(Path(root), int(subject), space, beta_format)
    rois = [rois] if isinstance(rois, str) else rois
    design = read_expdesign(paths.expdesign)
    chosen = choose_sessions(paths, sessions)
    mask_labels = read_labels(paths, roi_mask)
    layout = mask_labels.layout
    files = {roi_mask: mask_labels}
    for name in roi_files:
        if name not in files:
            files[name] = read_labels(paths, name)
            layout.check(files[name].layout)
    selected = mask_labels.mask()
    if not selected.any():
        raise DataError(f"{layout.source}: ROI mask '{roi_mask}' selects no voxels")
    requested = named_rois(rois, files) if rois else {}
    if requested:
        union = np.zeros_like(selected)
        for name, mask in requested.items():
            if not (mask & selected).any():
                raise DataError(f"data.rois: ROI '{name}' has no voxels inside '{roi_mask}' ({layout.source})")
            union |= mask & selected
        selected = union
    locs = layout.locations(selected)
    requested = {name: layout.values(mask, locs) for name, mask in requested.items()}
    ncsnr_grid, ncsnr_layout = read_grid(paths, paths.ncsnr_files(), np.float32)
    layout.check(ncsnr_layout)
    ncsnr = ncsnr_layout.values(ncsnr_grid, locs)
    del ncsnr_grid
    report = roi_masks([files[name] for name in roi_files], locs)
    del files, selected, mask_labels

    n_trials, first, shape = session_trials(paths, chosen[0])
    design.check_session_length(n_trials, first, shape)
    stims = {}
    for session in chosen:  # every session's length is checked before any betas are read
        n, path, _ = session_trials(paths, session)
        if n != n_trials:
            raise DataError(f"{path}: {n} trials, but {first.name} has {n_trials}; "
                            f"every session must have the same number of trials")
        stims[session] = design.trial_stimuli(paths.subject, session, n_trials)
    all_stim = np.concatenate([stims[s] for s in chosen])

    where = f"'{roi_mask}'" + (f" ∩ {list(rois)}" if rois else "")
    # The shipped ncsnr is estimated from all of the subject's sessions: for a subset it is recomputed from
    # the selected trials (NSD's formula, ``ncsnr_from_trial_sums``), from per-voxel sums taken as they are read.
    recompute_ncsnr = sessions is not None and set(chosen) != set(paths.sessions())
    sum_x = np.zeros(len(locs)) if recompute_ncsnr else None
    sum_xx = np.zeros(len(locs)) if recompute_ncsnr else None
    invalid = InvalidVoxels(len(locs))
    if average_repeats:
        averager = RepeatAverager(len(locs), ids=all_stim)
    else:  # rows sorted by (id, session, trial): the trials of an image are adjacent
        order = np.argsort(all_stim, kind="stable")
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        responses = np.empty((len(all_stim), len(locs)), dtype=np.float32)
    for k, (session, _, betas, session_invalid) in enumerate(session_responses(paths, design, chosen, locs, layout,
                                                                               zscore, n_trials)):
        record_invalid(paths, session, locs, session_invalid, where, invalid)
        if recompute_ncsnr:
            sum_x += betas.sum(axis=0, dtype=np.float64)
            sum_xx += np.einsum("ij,ij->j", betas, betas, dtype=np.float64)
        if average_repeats:
            averager.add(stims[session], betas)
        else:
            responses[position[k * n_trials:(k + 1) * n_trials]] = betas
        del betas
        log.debug("%s: session %d read (%d/%d)", paths.subj, session, k + 1, len(chosen))

    trials: dict[str, np.ndarray | None] = {"trial_session": None, "trial_index": None, "repeat_index": None}
    if average_repeats:
        stim_ids, responses, counts = averager.result()
        del averager
    else:
        stim_ids = all_stim[order]
        counts = np.ones(len(stim_ids), dtype=np.int64)
        _, first_row, inverse = np.unique(stim_ids, return_index=True, return_inverse=True)
        trials = {"trial_session": np.repeat(np.asarray(chosen), n_trials)[order],
                  "trial_index": np.tile(np.arange(n_trials), len(chosen))[order],
                  "repeat_index": np.arange(len(stim_ids)) - first_row[inverse]}
    ncsnr_info = {"ncsnr": f"shipped ({paths.ncsnr_files()[0].name}, estimated from all sessions)"}
    if recompute_ncsnr:
        ncsnr, ncsnr_info = selected_sessions_ncsnr(paths, chosen, ncsnr, sum_x, sum_xx, len(all_stim), stim_ids,
                                                    responses, counts if average_repeats else None)
    bad = invalid.mask
    for name, mask in requested.items():
        if not (mask & ~bad).any():
            raise DataError(f"data.rois: ROI '{name}' is empty after dropping its {int(mask.sum())} NaN or constant "
                            f"voxels (in {describe_blocks(invalid.blocks_of(mask))}, {paths.betas_dir})")
    if bad.all():
        raise DataError(f"{paths.betas_dir}: every voxel in {where} is NaN or constant in one of the sessions "
                        f"{describe_blocks(invalid.blocks_of())}")
    if bad.any():
        log.warning("%s: dropped %d of %d voxels in %s with NaN or constant betas",
                    paths.subj, int(bad.sum()), len(bad), where)
    keep = ~bad
    responses = drop_columns(responses, keep)
    rois_out = {name: mask[keep] for name, mask in report.items() if mask[keep].any()}
    for name, mask in requested.items():
        rois_out.setdefault(name, mask[keep])
    return SubjectResponses(
        subject=paths.subject, stim_ids=stim_ids, responses=responses, n_repeats=counts, voxel_xyz=locs[keep],
        ncsnr=ncsnr[keep], rois=rois_out, shared_ids=design.sharedix, sessions=chosen, n_dropped=int(bad.sum()),
        info={"trials_per_session": n_trials, "roi_mask": roi_mask, "zscore": zscore, "space": paths.space,
              "beta_format": paths.beta_format, "rois": list(rois) if rois else None,
              "average_repeats": average_repeats, **ncsnr_info,
              "voxel_xyz": "[hemisphere (0 lh, 1 rh), vertex]" if layout.surface else "NIfTI (x, y, z) indices"},
        **trials)


def selected_sessions_ncsnr(paths: NSDPaths, chosen: Sequence[int], shipped: np.ndarray, sum_x: np.ndarray,
                            sum_xx: np.ndarray, n_trials: int, stim_ids: np.ndarray, responses: np.ndarray,
                            counts: np.ndarray | None) -> tuple[np.ndarray, dict]:
    """ncsnr (n_voxels,) float32 recomputed from the trials of the ``chosen`` sessions, and what the run records
    about it. Repeat-averaged responses (``counts`` given) are the image means; single trials (``counts`` None,
    rows sorted by id) are averaged here. Without any image seen twice in those sessions the shipped ncsnr is
    kept, with one warning line."""
    if counts is None:
        ids, first, counts = np.unique(stim_ids, return_index=True, return_counts=True)
        means = np.add.reduceat(responses, first, axis=0, dtype=np.float64) / counts[:, None]
    else:
        means = responses
    if n_trials - len(counts) < 1:
        log.warning("%s: no image is seen twice in sessions %s, so ncsnr cannot be estimated from them; using "
                    "the shipped ncsnr (estimated from all sessions)", paths.subj, list(chosen))
        return shipped, {"ncsnr": f"shipped ({paths.ncsnr_files()[0].name}): no image repeats in the selected sessions"}
    ncsnr = ncsnr_from_trial_sums(sum_x, sum_xx, n_trials, means, counts).astype(np.float32)
    repeated = int((np.asarray(counts) >= 2).sum())
    log.info("%s: ncsnr recomputed from the %d trials of sessions %s (%d images seen at least twice)",
             paths.subj, n_trials, list(chosen), repeated)
    return ncsnr, {"ncsnr": f"recomputed from sessions {list(chosen)} ({repeated} images seen at least twice)"}


def common_shared_images(root: str | Path, subject: int, test_set: str, n_trials: int,
                         sessions_per_subject: Sequence[int] | None = None) -> np.ndarray:
    """NSD's shared images that every subject of the design saw at least 1 (shared907) or 3 (shared515)
    times, sorted 0-based ids, counted from nsd_expdesign.mat over each subject's completed sessions:
    ``sessions_per_subject`` (None: NSD's 40 40 32 30 40 32 40 30, capped at the design's length)."""
    paths = NSDPaths(Path(root), int(subject))
    design = read_expdesign(paths.expdesign)
    n_subjects = design.subjectim.shape[0]
    in_design = design.masterordering.size // n_trials
    if sessions_per_subject is None:
        counts = [min(NSD_SESSIONS[s] if s < len(NSD_SESSIONS) else in_design, in_design) for s in range(n_subjects)]
    else:
        counts = [int(n) for n in sessions_per_subject]
        if len(counts) != n_subjects:
            raise DataError(f"{design.path}: subjectim has {n_subjects} subjects, but data.sessions_per_subject "
                            f"gives {len(counts)} session counts")
    seen = np.stack([design.presentation_counts(s + 1, counts[s], n_trials, design.sharedix)
                     for s in range(n_subjects)])
    return np.sort(design.sharedix[seen.min(axis=0) >= SHARED_MIN_PRESENTATIONS[test_set]])


class NSDDataModule(ImageDataModule):
    """NSD-format data for one subject, in one beta space.

    After ``setup()``: ``split_ids[split]`` (0-based 73k ids, one per row: with single trials an id
    repeats once per trial), ``targets(split)`` (n, n_voxels), ``n_repeats(split)``, ``trial_info(split)``,
    ``rois`` (name -> bool (n_voxels,)), ``ncsnr()``. ``data`` holds every row, ordered train | val |
    test | shared images outside the test set. Serve images with ``set_transform(fn)`` or features with
    ``set_features({split: (n, n_features)})``.

    space / beta_format: see ``nsd_files``; rois: restrict the voxels to these ROI names; test_set:
    'subject' (the shared images this subject saw), 'shared907' / 'shared515' (the shared images every
    subject saw at least once / three times, see ``common_shared_images``); train is always the
    subject's own (non-shared) images. average_repeats=False keeps single trials as rows (all trials
    of an image in the same split). shuffle_train_targets permutes each voxel's train and val
    responses across rows, independently per voxel (a leakage control: test accuracy must then be at
    chance, voxel by voxel).
    """

    def __init__(self, root: str, subject: int = 1, sessions: Sequence[int] | None = None,
                 roi_mask: str = "nsdgeneral", roi_files: Sequence[str] = DEFAULT_ROI_FILES,
                 zscore: bool = True, val_fraction: float = 0.1, seed: int = 0, batch_size: int = 128,
                 num_workers: int = 0, shuffle_train_targets: bool = False, name: str = "nsd",
                 space: str = "func1pt8mm", beta_format: str | None = None, rois: Sequence[str] | None = None,
                 test_set: str = "subject", average_repeats: bool = True,
                 sessions_per_subject: Sequence[int] | None = None, feature_batches: str = "auto"):
        super().__init__(seed, batch_size, num_workers, feature_batches)
        if test_set not in TEST_SETS:
            raise ValueError(f"data.test_set must be one of {list(TEST_SETS)}, got {test_set!r}")
        check_fraction(val_fraction, "data.val_fraction", "the share of the training images held out for validation")
        check_subject_and_sessions(subject, sessions)
        if isinstance(rois, str):
            rois = [rois]
        NSDPaths(Path(root), int(subject), space, beta_format)  # ValueError for an unknown space / format
        self.root, self.subject, self.sessions = Path(root), int(subject), sessions
        self.roi_mask, self.roi_files, self.zscore = roi_mask, list(roi_files), zscore
        self.val_fraction = val_fraction
        self.shuffle_train_targets, self.name = shuffle_train_targets, name
        self.space, self.beta_format = space, beta_format
        self.roi_selection = list(rois) if rois else None
        self.test_set, self.average_repeats = test_set, bool(average_repeats)
        self.sessions_per_subject = list(sessions_per_subject) if sessions_per_subject else None
        self.data: SubjectResponses | None = None
        self._trials: dict[str, dict[str, np.ndarray]] = {}
        self._split_info: dict = {}

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        paths = NSDPaths(self.root, self.subject, self.space, self.beta_format)
        self.images = StimulusBrick(paths.stimuli)
        data = load_subject(self.root, self.subject, self.sessions, self.roi_mask, self.roi_files, self.zscore,
                            space=self.space, beta_format=self.beta_format, rois=self.roi_selection,
                            average_repeats=self.average_repeats)
        if data.stim_ids.max() >= len(self.images):
            raise DataError(f"{paths.stimuli}: imgBrick has {len(self.images)} images (ids 0..{len(self.images) - 1}), "
                            f"but the design ({paths.expdesign.name}) shows stimulus id {int(data.stim_ids.max())}")
        test_ids = self._test_ids(data, paths)
        own = np.unique(data.stim_ids[~np.isin(data.stim_ids, data.shared_ids)])
        if len(own) < 2:
            raise DataError(f"{paths.expdesign}: {paths.subj} saw {len(own)} non-shared images in sessions "
                            f"{data.sessions}: too few to train and validate on")
        train_ids, val_ids = split_train_val(own, self.val_fraction, self.seed)
        rows = {split: np.flatnonzero(np.isin(data.stim_ids, ids))
                for split, ids in (("train", train_ids), ("val", val_ids), ("test", test_ids))}
        used = np.concatenate([rows[s] for s in SPLITS])
        order = np.concatenate([used, np.setdiff1d(np.arange(len(data.stim_ids)), used)])
        data.take_rows(order)  # splits become contiguous row blocks: views, not copies
        rng = np.random.default_rng(self.seed + 1)
        start = 0
        for split in SPLITS:
            block = slice(start, start + len(rows[split]))
            start = block.stop
            responses = data.responses[block]
            if self.shuffle_train_targets and split != "test":
                responses = permute_within_columns(responses, rng)
            self.split_ids[split] = data.stim_ids[block]
            self._responses[split] = responses
            self._repeats[split] = data.n_repeats[block]
            if data.trial_session is not None:
                self._trials[split] = {"session": data.trial_session[block], "trial": data.trial_index[block],
                                       "repeat": data.repeat_index[block]}
        self._split_info["n_unused_shared_images"] = int(len(np.unique(data.stim_ids[start:])))
        self.data = data

    def _test_ids(self, data: SubjectResponses, paths: NSDPaths) -> np.ndarray:
        """The test images (sorted 0-based ids) this subject has responses for."""
        if self.test_set == "subject":
            pool = data.shared_ids
        else:
            pool = common_shared_images(self.root, self.subject, self.test_set, data.info["trials_per_session"],
                                        self.sessions_per_subject)
        have = np.intersect1d(pool, data.stim_ids)
        if not len(have):
            raise DataError(f"{paths.expdesign}: {paths.subj} saw none of the {len(pool)} test images "
                            f"(data.test_set={self.test_set}) in sessions {data.sessions}: no test set")
        if len(have) < len(pool):
            log.warning("%s: %d of the %d %s test images are not in sessions %s; testing on %d",
                        paths.subj, len(pool) - len(have), len(pool), self.test_set, data.sessions, len(have))
        self._split_info.update(test_pool_size=int(len(pool)))
        return have

    def trial_info(self, split: str) -> dict[str, np.ndarray] | None:
        """Single trials only: per row 'session' (1-based), 'trial' (0-based in the session) and 'repeat'
        (0-based presentation of its image); None when repeats are averaged."""
        return self._trials.get(split)

    def stimulus_source(self) -> dict:
        """Identity of the image file, for feature-cache keys: path, size and modification time."""
        stat = self.images.path.stat()
        return {"file": str(self.images.path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    # -- a finished run's data, from what it recorded (no betas loaded) -----------------------------
    @classmethod
    def open_stimuli(cls, config: dict, description: dict) -> StimulusBrick:
        """The run's imgBrick (images by 0-based 73k id) from config.yaml's ``data.root`` / ``data.subject``."""
        root, subject = config.get("root", description.get("root")), config.get("subject", description.get("subject"))
        if root is None or subject is None:
            raise DataError("the run's data config has no root / subject to read its images from")
        return StimulusBrick(NSDPaths(Path(root), int(subject)).stimuli)

    @classmethod
    def single_trials(cls, config: dict, description: dict, voxel_xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every trial of the run's sessions at the given voxels, preprocessed exactly as the run's data were
        (``session_responses``: the same reader and per-session z-score): (stimulus ids (n_trials,) in
        presentation order, session by session; values (n_trials, len(voxel_xyz)) float32).

        config: config.yaml's ``data`` section; description: run.json's ``data`` (its ``sessions`` are the
        sessions the run read); voxel_xyz: positions as recorded in voxel_metrics.npz.
        """
        root, subject = config.get("root", description.get("root")), config.get("subject", description.get("subject"))
        space = config.get("space", description.get("space", "func1pt8mm"))
        beta_format = config.get("beta_format", description.get("beta_format"))
        paths = NSDPaths(Path(root), int(subject), space, beta_format)
        design = read_expdesign(paths.expdesign)
        layout = read_labels(paths, config.get("roi_mask", description.get("roi_mask", "nsdgeneral"))).layout
        sessions = [int(s) for s in description.get("sessions") or choose_sessions(paths, config.get("sessions"))]
        ids, values = [], []
        for _, stims, betas, _ in session_responses(paths, design, sessions, np.asarray(voxel_xyz, np.int64), layout,
                                                    bool(config.get("zscore", description.get("zscore", True)))):
            ids.append(stims)
            values.append(betas)
        return np.concatenate(ids).astype(np.int64), np.concatenate(values)

    @classmethod
    def brain_space(cls, config: dict, description: dict) -> VolumeSpace | SurfaceSpace:
        """The space of a run's voxels, from config.yaml's ``data`` section and run.json's ``data`` (no betas
        read): volumes -> the grid, affine and header of the run's ``roi_mask`` file (with the subject's T1 /
        mean EPI in that space when present); surfaces -> the vertex counts of its lh/rh files (with the
        inflated surfaces and sulcal depth when present). ``brain_space.py`` writes maps in it."""
        root, subject = config.get("root", description.get("root")), config.get("subject", description.get("subject"))
        if root is None or subject is None:
            raise DataError("the run's data config has no root / subject to find its space from")
        space = config.get("space", description.get("space", "func1pt8mm"))
        paths = NSDPaths(Path(root), int(subject), space, config.get("beta_format", description.get("beta_format")))
        roi_mask = config.get("roi_mask", description.get("roi_mask", "nsdgeneral"))
        try:
            if paths.surface:
                return SurfaceSpace.from_files(paths.roi_files(roi_mask), space, paths.meshes())
            return VolumeSpace.from_file(paths.roi(roi_mask), paths.anatomy())
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"{err} (the file that defines the run's {space} space)") from None

    def describe(self) -> dict:
        """What the run records about its data: split ids, voxels, sessions, options."""
        d = self.data
        return {"dataset": self.name, "root": str(self.root), "subject": self.subject, "sessions": d.sessions,
                "roi_mask": self.roi_mask, "zscore": self.zscore, "val_fraction": self.val_fraction,
                "seed": self.seed, "shuffle_train_targets": self.shuffle_train_targets,
                "n_voxels": self.n_voxels, "n_dropped_voxels": d.n_dropped, "test_set": self.test_set,
                "sessions_per_subject": self.sessions_per_subject,
                "n_images": {s: int(len(np.unique(i))) for s, i in self.split_ids.items()},
                "n_rows": {s: int(len(i)) for s, i in self.split_ids.items()}, **self._split_info, **d.info}
