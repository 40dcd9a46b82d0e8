"""Readers for the Natural Scenes Dataset files exactly as NSD ships them.

Layout under ``root`` (the NSD bucket layout; XX = subject, NN = session):
  nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5              imgBrick (73000, 425, 425, 3) uint8
  nsddata/experiments/nsd/nsd_expdesign.mat                 masterordering, subjectim, sharedix (1-based)
  nsddata/ppdata/subjXX/func1pt8mm/roi/<name>.nii.gz        (X, Y, Z) int: -1 outside, 0 unlabelled, k >= 1
  nsddata/freesurfer/subjXX/label/<name>.mgz.ctab           "k name" label tables
  nsddata_betas/ppdata/subjXX/func1pt8mm/betas_fithrf_GLMdenoise_RR/
      betas_sessionNN.hdf5   betas (trials, Z, Y, X) int16 = % signal change × 300 (axes reversed vs NIfTI)
      ncsnr.nii.gz           (X, Y, Z) float
Every failure is a DataError whose message names the file or key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import scipy.io

from datamodules.errors import DataError

BETA_SCALE = 300.0
BETAS_DIR = "betas_fithrf_GLMdenoise_RR"

# NSD's label tables, used where a .ctab file is not present.
DEFAULT_LABELS: dict[str, dict[int, str]] = {
    "nsdgeneral": {1: "nsdgeneral"},
    "prf-visualrois": {1: "V1v", 2: "V1d", 3: "V2v", 4: "V2d", 5: "V3v", 6: "V3d", 7: "hV4"},
    "floc-faces": {1: "OFA", 2: "FFA-1", 3: "FFA-2", 4: "mTL-faces", 5: "aTL-faces"},
    "floc-bodies": {1: "EBA", 2: "FBA-1", 3: "FBA-2", 4: "mTL-bodies"},
    "floc-places": {1: "OPA", 2: "PPA", 3: "RSC"},
    "floc-words": {1: "OWFA", 2: "VWFA-1", 3: "VWFA-2", 4: "mfs-words", 5: "mTL-words"},
    "streams": {1: "early", 2: "midventral", 3: "midlateral", 4: "midparietal", 5: "ventral",
                6: "lateral", 7: "parietal"},
}


@dataclass(frozen=True)
class NSDPaths:
    """Where one subject's files live under an NSD root."""

    root: Path
    subject: int

    @property
    def subj(self) -> str:
        return f"subj{self.subject:02d}"

    @property
    def stimuli(self) -> Path:
        return self.root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"

    @property
    def expdesign(self) -> Path:
        return self.root / "nsddata/experiments/nsd/nsd_expdesign.mat"

    @property
    def betas_dir(self) -> Path:
        return self.root / "nsddata_betas/ppdata" / self.subj / "func1pt8mm" / BETAS_DIR

    def betas(self, session: int) -> Path:
        return self.betas_dir / f"betas_session{session:02d}.hdf5"

    @property
    def ncsnr(self) -> Path:
        return self.betas_dir / "ncsnr.nii.gz"

    def roi(self, name: str) -> Path:
        return self.root / "nsddata/ppdata" / self.subj / "func1pt8mm/roi" / f"{name}.nii.gz"

    def ctab(self, name: str) -> Path:
        return self.root / "nsddata/freesurfer" / self.subj / "label" / f"{name}.mgz.ctab"

    def sessions(self) -> list[int]:
        """Session numbers with a betas file on disk, sorted."""
        if not self.betas_dir.is_dir():
            raise DataError(f"{self.betas_dir}: betas folder not found for {self.subj}")
        found = sorted(int(m.group(1)) for p in self.betas_dir.iterdir()
                       if (m := re.fullmatch(r"betas_session(\d+)\.hdf5", p.name)))
        if not found:
            raise DataError(f"{self.betas_dir}: no betas_sessionNN.hdf5 files for {self.subj}")
        return found


def require(path: Path) -> Path:
    """Return path if it exists, else raise DataError naming it."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    return path


@dataclass(frozen=True)
class ExpDesign:
    """nsd_expdesign.mat, converted to 0-based arrays.

    masterordering (n_trials,): 0-based index into a subject's image list, trial order.
    subjectim (n_subjects, n_images_per_subject): 0-based 73k stimulus ids.
    sharedix (n_shared,): 0-based 73k ids of the shared images.
    """

    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray
    path: Path

    def trial_stimuli(self, subject: int, session: int, n_trials: int) -> np.ndarray:
        """0-based 73k ids shown in the n_trials trials of a 1-based session, (n_trials,)."""
        start = (session - 1) * n_trials
        if start + n_trials > self.masterordering.size:
            raise DataError(f"{self.path}: masterordering has {self.masterordering.size} trials, but session "
                            f"{session} with {n_trials} trials per session needs {start + n_trials}")
        if not 1 <= subject <= self.subjectim.shape[0]:
            raise DataError(f"{self.path}: subjectim has {self.subjectim.shape[0]} subjects, no subject {subject}")
        return self.subjectim[subject - 1, self.masterordering[start:start + n_trials]]


def read_expdesign(path: Path) -> ExpDesign:
    """Read and check nsd_expdesign.mat (1-based in the file, 0-based here)."""
    try:
        mat = scipy.io.loadmat(require(path))
    except DataError:
        raise
    except Exception as err:  # scipy raises several types for corrupt files
        raise DataError(f"{path}: cannot read as a .mat file ({err})") from None
    arrays = {}
    for key in ("masterordering", "subjectim", "sharedix"):
        if key not in mat:
            raise DataError(f"{path}: key '{key}' missing (found {sorted(k for k in mat if not k.startswith('__'))})")
        arrays[key] = np.asarray(mat[key])
    master = arrays["masterordering"].astype(np.int64).ravel() - 1
    subjectim = np.atleast_2d(arrays["subjectim"]).astype(np.int64) - 1
    shared = arrays["sharedix"].astype(np.int64).ravel() - 1
    if master.min() < 0 or master.max() >= subjectim.shape[1]:
        raise DataError(f"{path}: masterordering values must lie in 1..{subjectim.shape[1]} (subjectim columns)")
    return ExpDesign(master, subjectim, shared, path)


def read_labels(paths: NSDPaths, name: str) -> tuple[np.ndarray, dict[int, str]]:
    """An ROI volume (X, Y, Z) int and its label table {k: name} (from .ctab, else NSD's defaults)."""
    path = require(paths.roi(name))
    try:
        volume = np.asarray(nib.load(path).dataobj)
    except Exception as err:  # nibabel raises several types for corrupt files
        raise DataError(f"{path}: cannot read as NIfTI ({err})") from None
    volume = np.rint(volume).astype(np.int32)
    table = read_ctab(paths.ctab(name)) if paths.ctab(name).exists() else DEFAULT_LABELS.get(name)
    if table is None:
        table = {int(k): f"{name}-{int(k)}" for k in np.unique(volume) if k > 0}
    return volume, table


def read_ctab(path: Path) -> dict[int, str]:
    """FreeSurfer colour table -> {k: name}, k >= 1 only."""
    table = {}
    for line in require(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].lstrip("-").isdigit() and int(parts[0]) > 0:
            table[int(parts[0])] = parts[1]
    return table


def read_ncsnr(paths: NSDPaths, xyz: np.ndarray) -> np.ndarray:
    """ncsnr at voxels xyz (n_voxels, 3) in NIfTI index order -> (n_voxels,) float32."""
    path = require(paths.ncsnr)
    try:
        volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises several types for corrupt files
        raise DataError(f"{path}: cannot read as NIfTI ({err})") from None
    return volume[xyz[:, 0], xyz[:, 1], xyz[:, 2]]


def betas_shape(path: Path) -> tuple[int, ...]:
    """Shape of the 'betas' dataset of a session file: (n_trials, Z, Y, X)."""
    with open_betas(path) as (_, ds):
        return ds.shape


class open_betas:
    """Context manager: (h5py.File, dataset 'betas'), DataError for missing/corrupt/keyless files."""

    def __init__(self, path: Path):
        self.path = require(path)

    def __enter__(self):
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as err:
            raise DataError(f"{self.path}: cannot read as HDF5 ({err})") from None
        if "betas" not in self.file:
            found = sorted(self.file)
            self.file.close()
            raise DataError(f"{self.path}: dataset 'betas' missing (found {found})")
        return self.file, self.file["betas"]

    def __exit__(self, *exc):
        self.file.close()


def read_session_betas(path: Path, xyz: np.ndarray, block: int = 50) -> np.ndarray:
    """Betas of one session at voxels xyz (NIfTI (x, y, z) indices), in % signal change.

    Reads ``block`` trials at a time, so memory stays at one block of the volume plus the
    result. Returns float32 (n_trials, n_voxels). The hdf5 axes are (trial, Z, Y, X).
    """
    with open_betas(path) as (_, ds):
        if ds.ndim != 4:
            raise DataError(f"{path}: 'betas' has shape {ds.shape}, expected (trials, Z, Y, X)")
        spatial = ds.shape[1:][::-1]
        if np.any(xyz.max(0) >= np.array(spatial)):
            raise DataError(f"{path}: 'betas' volume (X, Y, Z) = {spatial} does not contain the ROI voxels "
                            f"(max index {tuple(xyz.max(0))}); ROI and betas must be in the same space")
        is_int = np.issubdtype(ds.dtype, np.integer)
        out = np.empty((ds.shape[0], len(xyz)), dtype=np.float32)
        x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
        try:
            for start in range(0, ds.shape[0], block):
                chunk = ds[start:start + block]
                out[start:start + len(chunk)] = chunk[:, z, y, x]
        except OSError as err:
            raise DataError(f"{path}: cannot read 'betas' ({err})") from None
    if is_int:
        out /= BETA_SCALE
    return out


class StimulusBrick:
    """Lazy reader of imgBrick: images are read one at a time by 0-based 73k id.

    The HDF5 file is opened on first use in each process (safe with DataLoader workers).
    ``image(i)`` -> uint8 (H, W, 3).
    """

    def __init__(self, path: Path):
        self.path = require(path)
        self._file: h5py.File | None = None
        with h5py.File(self.path, "r") as f:
            if "imgBrick" not in f:
                raise DataError(f"{self.path}: dataset 'imgBrick' missing (found {sorted(f)})")
            self.shape = f["imgBrick"].shape
        if len(self.shape) != 4 or self.shape[-1] != 3:
            raise DataError(f"{self.path}: 'imgBrick' has shape {self.shape}, expected (n, H, W, 3)")

    def __len__(self) -> int:
        return self.shape[0]

    def image(self, stim_id: int) -> np.ndarray:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file["imgBrick"][int(stim_id)]

    def __getstate__(self):
        return {**self.__dict__, "_file": None}
