"""Readers for the Natural Scenes Dataset files exactly as NSD ships them, in every beta space.

Layout under ``root`` (the NSD bucket layout; XX = subject, NN = session, <space> one of SPACES):
  nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5           imgBrick (73000, 425, 425, 3) uint8
  nsddata/experiments/nsd/nsd_expdesign.mat              masterordering, subjectim, sharedix (1-based)
  nsddata_betas/ppdata/subjXX/<space>/betas_fithrf_GLMdenoise_RR/
      volumes (func1pt8mm, func1mm):
        betas_sessionNN.hdf5     'betas' (trials, Z, Y, X) int16 = % signal change × 300 (axes reversed vs NIfTI)
        betas_sessionNN.nii.gz   (X, Y, Z, trials) int16 × 300
        ncsnr.nii.gz             (X, Y, Z) float
      nativesurface:
        {lh,rh}.betas_sessionNN.hdf5   'betas' (trials, vertices) int16 × 300
        {lh,rh}.ncsnr.mgh              (vertices, 1, 1) float
      fsaverage:
        {lh,rh}.betas_sessionNN.mgh    (163842, 1, 1, trials) float32, already % signal change
        {lh,rh}.ncsnr.mgh              (163842, 1, 1) float
  ROI label files (-1 outside cortex/brain, 0 unlabelled, k >= 1 label k):
      volumes        nsddata/ppdata/subjXX/<space>/roi/<name>.nii.gz            (X, Y, Z)
      nativesurface  nsddata/freesurfer/subjXX/label/{lh,rh}.<name>.mgz         (vertices, 1, 1)
      fsaverage      nsddata/freesurfer/fsaverage/label/{lh,rh}.<name>.mgz      (163842, 1, 1)
  label tables "k name": nsddata/freesurfer/{subjXX,fsaverage}/label/<name>.mgz.ctab

Betas stored as integers are % signal change × 300 and are divided by 300 (NSD's convention);
betas stored as floats (fsaverage .mgh) are used as they are.

Positions ("locations") are (n, 3) NIfTI (x, y, z) indices for volumes and (n, 2) [hemisphere
(0 = lh, 1 = rh), vertex] for surfaces. A surface's label grid is the lh values followed by the rh
values, (n_lh + n_rh,). Every failure is a DataError whose message names the file, key or shape.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import scipy.io

from datamodules.errors import DataError

BETA_SCALE = 300.0
BETAS_DIR = "betas_fithrf_GLMdenoise_RR"
VOLUME_SPACES = ("func1pt8mm", "func1mm")
SURFACE_SPACES = ("nativesurface", "fsaverage")
SPACES = VOLUME_SPACES + SURFACE_SPACES
HEMISPHERES = ("lh", "rh")
# The file formats NSD ships per space; the first is the default.
BETA_FORMATS = {"func1pt8mm": ("hdf5", "nifti"), "func1mm": ("hdf5", "nifti"),
                "nativesurface": ("hdf5",), "fsaverage": ("mgh",)}
SUFFIX = {"hdf5": ".hdf5", "nifti": ".nii.gz", "mgh": ".mgh"}
READ_BUDGET = 64 * 2**20  # bytes of file data read at once (per slab / block of trials)
# What readers of corrupt files raise (h5py: OSError; nibabel: ImageFileError (a ValueError), EOFError, zlib.error).
READ_ERRORS = (OSError, ValueError, EOFError, RuntimeError, zlib.error, nib.filebasedimages.ImageFileError)

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
    """Where one subject's files live under an NSD root, for one beta space and file format.

    space: one of SPACES; beta_format: one of BETA_FORMATS[space] (None = the space's first).
    Raises ValueError for an unknown space or a format the space does not ship.
    """

    root: Path
    subject: int
    space: str = "func1pt8mm"
    beta_format: str | None = None

    def __post_init__(self):
        if self.space not in SPACES:
            raise ValueError(f"data.space must be one of {list(SPACES)}, got {self.space!r}")
        formats = BETA_FORMATS[self.space]
        fmt = formats[0] if self.beta_format is None else self.beta_format
        if fmt not in formats:
            raise ValueError(f"data.beta_format={fmt!r} does not exist for space {self.space}: "
                             f"NSD ships {list(formats)} there")
        object.__setattr__(self, "beta_format", fmt)
        object.__setattr__(self, "root", Path(self.root))

    @property
    def surface(self) -> bool:
        return self.space in SURFACE_SPACES

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
        return self.root / "nsddata_betas/ppdata" / self.subj / self.space / BETAS_DIR

    def betas(self, session: int, hemi: str | None = None) -> Path:
        """The betas file of a 1-based session (surfaces: of one hemisphere, default lh)."""
        name = f"betas_session{session:02d}{SUFFIX[self.beta_format]}"
        return self.betas_dir / (f"{hemi or 'lh'}.{name}" if self.surface else name)

    def betas_files(self, session: int) -> list[Path]:
        """Every file holding a session's betas: [volume] or [lh, rh]."""
        return [self.betas(session, h) for h in HEMISPHERES] if self.surface else [self.betas(session)]

    @property
    def ncsnr(self) -> Path:
        """The ncsnr file (surfaces: lh; see ncsnr_files)."""
        return self.ncsnr_files()[0]

    def ncsnr_files(self) -> list[Path]:
        if self.surface:
            return [self.betas_dir / f"{h}.ncsnr.mgh" for h in HEMISPHERES]
        return [self.betas_dir / "ncsnr.nii.gz"]

    @property
    def label_dir(self) -> Path:
        """FreeSurfer label folder of this space (surface ROIs and .ctab tables)."""
        who = "fsaverage" if self.space == "fsaverage" else self.subj
        return self.root / "nsddata/freesurfer" / who / "label"

    def roi(self, name: str, hemi: str | None = None) -> Path:
        """An ROI file (surfaces: of one hemisphere, default lh)."""
        if self.surface:
            return self.label_dir / f"{hemi or 'lh'}.{name}.mgz"
        return self.root / "nsddata/ppdata" / self.subj / self.space / "roi" / f"{name}.nii.gz"

    def roi_files(self, name: str) -> list[Path]:
        return [self.roi(name, h) for h in HEMISPHERES] if self.surface else [self.roi(name)]

    def ctab(self, name: str) -> Path:
        return self.label_dir / f"{name}.mgz.ctab"

    def anatomy(self) -> dict[str, Path]:
        """Volumes: the subject's T1 and mean EPI resampled to this space (NSD data manual, "Functional data
        (general)": ``nsddata/ppdata/subjXX/<space>/T1_to_<space>.nii.gz`` and ``mean.nii.gz``), whether or
        not they exist; surfaces: {}."""
        if self.surface:
            return {}
        folder = self.root / "nsddata/ppdata" / self.subj / self.space
        return {"T1": folder / f"T1_to_{self.space}.nii.gz", "mean EPI": folder / "mean.nii.gz"}

    def meshes(self) -> dict[str, dict[str, Path]]:
        """Surfaces: FreeSurfer's inflated surface and sulcal depth of each hemisphere
        (``nsddata/freesurfer/{subjXX,fsaverage}/surf/{lh,rh}.{inflated,sulc}``), whether or not they exist."""
        if not self.surface:
            return {}
        surf = self.label_dir.parent / "surf"
        return {side: {"inflated": surf / f"{h}.inflated", "sulc": surf / f"{h}.sulc"}
                for side, h in (("left", "lh"), ("right", "rh"))}

    def sessions(self) -> list[int]:
        """Session numbers with a betas file on disk (surfaces: an lh file), sorted."""
        if not self.betas_dir.is_dir():
            raise DataError(f"{self.betas_dir}: betas folder not found for {self.subj}")
        prefix = r"lh\." if self.surface else ""
        pattern = re.compile(prefix + r"betas_session(\d+)" + re.escape(SUFFIX[self.beta_format]))
        found = sorted(int(m.group(1)) for p in self.betas_dir.iterdir() if (m := pattern.fullmatch(p.name)))
        if not found:
            example = self.betas(1).name.replace("01", "NN")
            raise DataError(f"{self.betas_dir}: no {example} files for {self.subj}")
        return found


def require(path: Path) -> Path:
    """Return path if it exists, else raise DataError naming it."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    return path


# --------------------------------------------------------------------------- layouts and locations
@dataclass(frozen=True)
class Layout:
    """The grid voxels or vertices live on: a volume (X, Y, Z) or two hemispheres (n_lh, n_rh).

    ``source`` names the file(s) that defined it, for error messages.
    """

    shape: tuple[int, ...]
    surface: bool
    source: str

    def locations(self, mask: np.ndarray) -> np.ndarray:
        """Positions where a grid-shaped bool mask is set: (n, 3) (x, y, z) or (n, 2) [hemi, vertex], sorted."""
        if not self.surface:
            return np.argwhere(mask)
        idx = np.flatnonzero(mask)
        hemi = (idx >= self.shape[0]).astype(np.int64)
        return np.stack([hemi, idx - hemi * self.shape[0]], axis=1)

    def values(self, grid: np.ndarray, locs: np.ndarray) -> np.ndarray:
        """A grid's values at positions locs -> (n,)."""
        if not self.surface:
            return grid[locs[:, 0], locs[:, 1], locs[:, 2]]
        return grid[locs[:, 0] * self.shape[0] + locs[:, 1]]

    def check(self, other: "Layout") -> None:
        """DataError unless other has the same shape (files of one space must agree)."""
        if other.shape != self.shape:
            what = "hemisphere vertex counts (lh, rh)" if self.surface else "volume (X, Y, Z)"
            raise DataError(f"{other.source}: {what} = {other.shape}, but {self.source} has {self.shape}; "
                            f"every file of one space must have the same shape")


def _load_image(path: Path, what: str):
    """nibabel image of an existing file, or DataError naming it."""
    require(path)
    try:
        return nib.load(path)
    except READ_ERRORS as err:
        raise DataError(f"{path}: cannot read as {what} ({err})") from None


def _read_array(path: Path, what: str, dtype=None) -> np.ndarray:
    """Whole data array of a small NIfTI/MGH file (ROI, ncsnr)."""
    img = _load_image(path, what)
    try:
        return np.asarray(img.dataobj, dtype=dtype)
    except READ_ERRORS as err:
        raise DataError(f"{path}: cannot read the data of this {what} file ({err})") from None


def _surface_vector(path: Path, dtype=None) -> np.ndarray:
    """A per-vertex MGH/MGZ file (vertices, 1, 1[, 1]) -> (vertices,)."""
    data = _read_array(path, "MGH/MGZ", dtype)
    if data.ndim < 1 or int(np.prod(data.shape[1:])) != 1:
        raise DataError(f"{path}: shape {data.shape}, expected (vertices, 1, 1) with one value per vertex")
    return data.reshape(-1)


def read_grid(paths: NSDPaths, files: list[Path], dtype=None) -> tuple[np.ndarray, Layout]:
    """A per-position file of this space (ROI or ncsnr) -> (grid, layout).

    Volumes: one NIfTI -> (X, Y, Z). Surfaces: [lh, rh] MGH/MGZ -> (n_lh + n_rh,).
    """
    if not paths.surface:
        grid = _read_array(files[0], "NIfTI", dtype)
        if grid.ndim == 4 and grid.shape[3] == 1:
            grid = grid[..., 0]
        if grid.ndim != 3:
            raise DataError(f"{files[0]}: shape {grid.shape}, expected a 3-D volume (X, Y, Z)")
        return grid, Layout(tuple(int(n) for n in grid.shape), False, str(files[0]))
    parts = [_surface_vector(f, dtype) for f in files]
    return np.concatenate(parts), Layout(tuple(len(p) for p in parts), True, f"{files[0]} (+ {files[1].name})")


# --------------------------------------------------------------------------- design
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

    def check_session_length(self, n_trials: int, betas_file: Path, shape: tuple) -> None:
        """DataError unless the design's trials split into whole sessions of n_trials."""
        if n_trials < 1 or self.masterordering.size % n_trials:
            raise DataError(f"{betas_file}: betas shape {shape} has {n_trials} trials per session, but the "
                            f"design ({self.path.name}, masterordering: {self.masterordering.size} trials) is not a "
                            f"whole number of {n_trials}-trial sessions")

    def trial_stimuli(self, subject: int, session: int, n_trials: int) -> np.ndarray:
        """0-based 73k ids shown in the n_trials trials of a 1-based session, (n_trials,)."""
        start = (session - 1) * n_trials
        if start + n_trials > self.masterordering.size:
            raise DataError(f"{self.path}: masterordering has {self.masterordering.size} trials, but session "
                            f"{session} with {n_trials} trials per session needs {start + n_trials}")
        if not 1 <= subject <= self.subjectim.shape[0]:
            raise DataError(f"{self.path}: subjectim has {self.subjectim.shape[0]} subjects, no subject {subject}")
        return self.subjectim[subject - 1, self.masterordering[start:start + n_trials]]

    def presentation_counts(self, subject: int, n_sessions: int, n_trials: int, ids: np.ndarray) -> np.ndarray:
        """How often each of ``ids`` (0-based 73k) is shown to a subject in its first n_sessions sessions."""
        n = min(n_sessions * n_trials, self.masterordering.size)
        shown = self.subjectim[subject - 1, self.masterordering[:n]]
        values, counts = np.unique(shown, return_counts=True)
        lookup = dict(zip(values.tolist(), counts.tolist()))
        return np.array([lookup.get(int(i), 0) for i in ids], dtype=np.int64)


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
        if arrays[key].size == 0:
            raise DataError(f"{path}: key '{key}' is empty")
    master = arrays["masterordering"].astype(np.int64).ravel() - 1
    subjectim = np.atleast_2d(arrays["subjectim"]).astype(np.int64) - 1
    shared = arrays["sharedix"].astype(np.int64).ravel() - 1
    if master.min() < 0 or master.max() >= subjectim.shape[1]:
        raise DataError(f"{path}: masterordering values must lie in 1..{subjectim.shape[1]} (subjectim columns), "
                        f"found {master.min() + 1}..{master.max() + 1}")
    for key, ids in (("subjectim", subjectim), ("sharedix", shared)):
        if ids.min() < 0:
            raise DataError(f"{path}: '{key}' holds stimulus id {ids.min() + 1}; 73k ids are 1-based (>= 1)")
    return ExpDesign(master, subjectim, shared, path)


# --------------------------------------------------------------------------- ROIs and ncsnr
@dataclass(frozen=True)
class Labels:
    """One ROI file over a space: grid (volume (X, Y, Z) or surface (n_lh + n_rh,)) int32, table {k: name}."""

    name: str
    grid: np.ndarray
    table: dict[int, str]
    layout: Layout

    def mask(self, label: str | None = None) -> np.ndarray:
        """Grid-shaped bool: positions with this label name (None: with any label >= 1)."""
        if label is None:
            return self.grid > 0
        return np.isin(self.grid, [k for k, v in self.table.items() if v == label])


def read_labels(paths: NSDPaths, name: str) -> Labels:
    """An ROI file of the space with its label table (from .ctab, else NSD's defaults, else 'name-k')."""
    grid, layout = read_grid(paths, paths.roi_files(name))
    if not np.all(np.isfinite(grid)):
        raise DataError(f"{layout.source}: ROI labels must be finite integers")
    grid = np.rint(grid).astype(np.int32)
    ctab = paths.ctab(name)
    table = read_ctab(ctab) if ctab.exists() else DEFAULT_LABELS.get(name)
    if table is None:
        return Labels(name, grid, {int(k): f"{name}-{int(k)}" for k in np.unique(grid) if k > 0}, layout)
    unlisted = np.setdiff1d(np.unique(grid[grid > 0]), list(table))
    if len(unlisted):  # its positions would silently belong to no named ROI
        k = int(unlisted[0])
        where = str(ctab) if ctab.exists() else f"NSD's table for '{name}' (there is no {ctab})"
        raise DataError(f"{layout.source}: holds label {k} ({int((grid == k).sum())} positions), which its label "
                        f"table {where} does not list (it lists {sorted(table)})")
    return Labels(name, grid, table, layout)


CTAB_LINE = re.compile(r"\s*(-?\d+)\s+(\S+)(\s.*)?")


def read_ctab(path: Path) -> dict[int, str]:
    """FreeSurfer colour table -> {k: name}, k >= 1 only.

    Every line must be blank, a ``#`` comment, or ``<int> <name> [R G B A ...]``; anything else (e.g.
    ``2,FFA-1``), or a label number listed twice, is a DataError naming the file and line.
    """
    try:
        text = require(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the label table ({err})") from None
    table: dict[int, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = CTAB_LINE.fullmatch(line)
        if m is None:
            raise DataError(f"{path}: line {number} {line.strip()!r} is not '<label number> <name> ...' "
                            f"(nor blank or a # comment)")
        k = int(m.group(1))
        if k in table:
            raise DataError(f"{path}: line {number} lists label {k} again ({table[k]!r} before, now {m.group(2)!r})")
        if k > 0:
            table[k] = m.group(2)
    return table


def read_ncsnr(paths: NSDPaths, locs: np.ndarray, layout: Layout | None = None) -> np.ndarray:
    """ncsnr at positions locs (see module doc) -> (n,) float32; checked against layout when given."""
    grid, own = read_grid(paths, paths.ncsnr_files(), np.float32)
    if layout is not None:
        layout.check(own)
    return own.values(grid, locs)


# --------------------------------------------------------------------------- betas
class open_betas:
    """Context manager: (h5py.File, dataset 'betas'), DataError for missing/corrupt/keyless files."""

    def __init__(self, path: Path):
        self.path = require(path)

    def __enter__(self):
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as err:
            raise DataError(f"{self.path}: cannot read as HDF5 ({err})") from None
        if not isinstance(self.file.get("betas"), h5py.Dataset):
            found = sorted(self.file)
            self.file.close()
            raise DataError(f"{self.path}: dataset 'betas' missing (found {found})")
        return self.file, self.file["betas"]

    def __exit__(self, *exc):
        self.file.close()


def betas_shape(path: Path) -> tuple[int, ...]:
    """Shape of the betas in a session file, as stored: hdf5 'betas', or the NIfTI/MGH image shape."""
    if path.name.endswith(".hdf5"):
        with open_betas(path) as (_, ds):
            return tuple(ds.shape)
    img = _load_image(path, "MGH" if path.suffix == ".mgh" else "NIfTI")
    return tuple(int(n) for n in img.shape)


def _trial_axis(path: Path, shape: tuple, paths: NSDPaths) -> int:
    """Number of trials in a betas file of this space, after checking its number of axes."""
    if paths.surface and paths.beta_format == "hdf5":
        expected, axis = "(trials, vertices)", 0
    elif paths.surface:
        expected, axis = "(vertices, 1, 1, trials)", 3
    elif paths.beta_format == "hdf5":
        expected, axis = "(trials, Z, Y, X)", 0
    else:
        expected, axis = "(X, Y, Z, trials)", 3
    if len(shape) != expected.count(",") + 1:
        raise DataError(f"{path}: betas shape {shape}, expected {expected}")
    return int(shape[axis])


def session_trials(paths: NSDPaths, session: int) -> tuple[int, Path, tuple]:
    """(n_trials, file, shape) of a session from file headers only; both hemispheres must agree."""
    found = []
    for path in paths.betas_files(session):
        shape = betas_shape(path)
        found.append((_trial_axis(path, shape, paths), path, shape))
    if len({n for n, _, _ in found}) > 1:
        (n0, p0, s0), (n1, p1, s1) = found
        raise DataError(f"{p1}: betas shape {s1} has {n1} trials, but {p0.name} has {n0}; "
                        f"both hemispheres must have the same trials")
    return found[0]


def read_session(paths: NSDPaths, session: int, locs: np.ndarray, layout: Layout,
                 budget: int = READ_BUDGET) -> np.ndarray:
    """One session's betas at positions locs, in % signal change: float32 (n_trials, n).

    Never holds the whole session: reads at most ``budget`` bytes of the file at a time and keeps
    only the selected positions. Checks every file's shape against layout.
    """
    if not paths.surface:
        path = paths.betas(session)
        reader = _read_volume_hdf5 if paths.beta_format == "hdf5" else _read_volume_nifti
        return reader(path, locs, layout, budget)
    parts = []
    for h, hemi in enumerate(HEMISPHERES):
        path = paths.betas(session, hemi)
        verts = locs[locs[:, 0] == h, 1]
        reader = _read_surface_hdf5 if paths.beta_format == "hdf5" else _read_surface_mgh
        parts.append(reader(path, verts, layout.shape[h], layout, budget))
    return np.concatenate(parts, axis=1)


def _scale(out: np.ndarray, stored_dtype) -> np.ndarray:
    if np.issubdtype(np.dtype(stored_dtype), np.integer):
        out /= BETA_SCALE
    return out


def _read_volume_hdf5(path: Path, xyz: np.ndarray, layout: Layout, budget: int) -> np.ndarray:
    """'betas' (T, Z, Y, X) at NIfTI positions xyz, read in Z-slabs of the selection's bounding box."""
    with open_betas(path) as (_, ds):
        if ds.ndim != 4:
            raise DataError(f"{path}: 'betas' has shape {ds.shape}, expected (trials, Z, Y, X)")
        layout.check(Layout(tuple(int(n) for n in ds.shape[1:][::-1]), False, f"{path} 'betas' {ds.shape}"))
        n_trials = ds.shape[0]
        out = np.empty((n_trials, len(xyz)), dtype=np.float32)
        if len(xyz):
            x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
            x0, x1, y0, y1 = x.min(), x.max() + 1, y.min(), y.max() + 1
            plane = n_trials * (y1 - y0) * (x1 - x0) * ds.dtype.itemsize
            step = max(1, budget // max(plane, 1))
            try:
                for z0 in range(z.min(), z.max() + 1, step):
                    sel = np.flatnonzero((z >= z0) & (z < z0 + step))
                    if len(sel):
                        slab = ds[:, z0:z0 + step, y0:y1, x0:x1]
                        out[:, sel] = slab[:, z[sel] - z0, y[sel] - y0, x[sel] - x0]
            except READ_ERRORS as err:
                raise DataError(f"{path}: cannot read 'betas' ({err})") from None
        return _scale(out, ds.dtype)


def _read_volume_nifti(path: Path, xyz: np.ndarray, layout: Layout, budget: int) -> np.ndarray:
    """(X, Y, Z, T) NIfTI at positions xyz, streamed in blocks of whole trial volumes (one pass over the file)."""
    require(path)
    try:
        img = nib.load(path, keep_file_open=True)
    except READ_ERRORS as err:
        raise DataError(f"{path}: cannot read as NIfTI ({err})") from None
    if len(img.shape) != 4:
        raise DataError(f"{path}: betas shape {img.shape}, expected (X, Y, Z, trials)")
    layout.check(Layout(tuple(int(n) for n in img.shape[:3]), False, f"{path} {img.shape}"))
    n_trials, dtype = int(img.shape[3]), img.get_data_dtype()
    out = np.empty((n_trials, len(xyz)), dtype=np.float32)
    block = max(1, budget // (int(np.prod(img.shape[:3])) * dtype.itemsize))
    x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    try:
        for t0 in range(0, n_trials, block):
            chunk = np.asarray(img.dataobj[..., t0:t0 + block])
            out[t0:t0 + chunk.shape[3]] = chunk[x, y, z].T
    except READ_ERRORS as err:
        raise DataError(f"{path}: cannot read the betas (truncated or corrupt NIfTI? {err})") from None
    finally:
        del img  # closes the file kept open for the single pass
    return _scale(out, dtype)


def _read_surface_hdf5(path: Path, verts: np.ndarray, n_vertices: int, layout: Layout, budget: int) -> np.ndarray:
    """'betas' (T, V) at vertices verts, read in column windows that hold selected vertices."""
    with open_betas(path) as (_, ds):
        if ds.ndim != 2:
            raise DataError(f"{path}: 'betas' has shape {ds.shape}, expected (trials, vertices)")
        if ds.shape[1] != n_vertices:
            raise DataError(f"{path}: 'betas' {ds.shape} has {ds.shape[1]} vertices, but {layout.source} "
                            f"has {n_vertices} in this hemisphere")
        n_trials = ds.shape[0]
        out = np.empty((n_trials, len(verts)), dtype=np.float32)
        width = max(1, budget // (n_trials * ds.dtype.itemsize))
        starts = range(int(verts.min()), int(verts.max()) + 1, width) if len(verts) else ()
        try:
            for v0 in starts:
                sel = np.flatnonzero((verts >= v0) & (verts < v0 + width))
                if len(sel):
                    v1 = int(verts[sel].max()) + 1
                    out[:, sel] = ds[:, v0:v1][:, verts[sel] - v0]
        except READ_ERRORS as err:
            raise DataError(f"{path}: cannot read 'betas' ({err})") from None
        return _scale(out, ds.dtype)


def _read_surface_mgh(path: Path, verts: np.ndarray, n_vertices: int, layout: Layout, budget: int) -> np.ndarray:
    """(V, 1, 1, T) MGH at vertices verts, read in blocks of whole trial maps."""
    img = _load_image(path, "MGH")
    shape = tuple(int(n) for n in img.shape)
    if len(shape) != 4 or shape[1:3] != (1, 1):
        raise DataError(f"{path}: betas shape {shape}, expected (vertices, 1, 1, trials)")
    if shape[0] != n_vertices:
        raise DataError(f"{path}: betas {shape} have {shape[0]} vertices, but {layout.source} "
                        f"has {n_vertices} in this hemisphere")
    dtype = img.get_data_dtype()
    needed = img.dataobj.offset + int(np.prod(shape)) * dtype.itemsize
    if path.stat().st_size < needed:
        raise DataError(f"{path}: file is truncated ({path.stat().st_size} bytes, shape {shape} needs {needed})")
    n_trials = shape[3]
    out = np.empty((n_trials, len(verts)), dtype=np.float32)
    block = max(1, budget // (n_vertices * dtype.itemsize))
    try:
        for t0 in range(0, n_trials, block):
            chunk = np.asarray(img.dataobj[:, 0, 0, t0:t0 + block])
            out[t0:t0 + chunk.shape[1]] = chunk[verts].T
    except READ_ERRORS as err:
        raise DataError(f"{path}: cannot read the betas ({err})") from None
    return _scale(out, dtype)


def read_session_betas(path: Path, xyz: np.ndarray, budget: int = READ_BUDGET) -> np.ndarray:
    """Betas of one func1pt8mm/func1mm HDF5 session file at NIfTI positions xyz (n, 3), in % signal change.

    float32 (n_trials, n). The volume must contain the positions (the full check needs a Layout:
    use read_session).
    """
    with open_betas(path) as (_, ds):
        shape = tuple(int(n) for n in ds.shape[1:][::-1]) if ds.ndim == 4 else ()
    if shape and np.any(xyz.max(0) >= np.array(shape)):
        raise DataError(f"{path}: 'betas' volume (X, Y, Z) = {shape} does not contain the requested voxels "
                        f"(max index {tuple(xyz.max(0))})")
    return _read_volume_hdf5(path, xyz, Layout(shape, False, str(path)), budget)


# --------------------------------------------------------------------------- stimuli
class StimulusBrick:
    """Lazy reader of imgBrick: images are read one at a time by 0-based 73k id.

    The HDF5 file is opened on first use in each process (safe with DataLoader workers).
    ``image(i)`` -> uint8 (H, W, 3). Any dtype other than uint8 is refused (DataError): a float
    brick in 0..255 would otherwise be scaled differently by the backbone's transform.
    """

    def __init__(self, path: Path):
        self.path = require(path)
        self._file: h5py.File | None = None
        try:
            with h5py.File(self.path, "r") as f:
                if not isinstance(f.get("imgBrick"), h5py.Dataset):
                    raise DataError(f"{self.path}: dataset 'imgBrick' missing (found {sorted(f)})")
                self.shape, dtype = f["imgBrick"].shape, f["imgBrick"].dtype
        except OSError as err:
            raise DataError(f"{self.path}: cannot read as HDF5 ({err})") from None
        if len(self.shape) != 4 or self.shape[-1] != 3:
            raise DataError(f"{self.path}: 'imgBrick' has shape {self.shape}, expected (n, H, W, 3)")
        if dtype != np.uint8:  # NSD ships 8-bit RGB; any other type would be scaled differently by the transform
            raise DataError(f"{self.path}: 'imgBrick' has dtype {dtype}, expected uint8 (8-bit RGB, as NSD ships "
                            f"it); convert the images to uint8 0..255 first")

    def __len__(self) -> int:
        return self.shape[0]

    def image(self, stim_id: int) -> np.ndarray:
        if not 0 <= int(stim_id) < self.shape[0]:
            raise DataError(f"{self.path}: stimulus id {int(stim_id)} out of range, 'imgBrick' {self.shape} "
                            f"holds ids 0..{self.shape[0] - 1}")
        try:
            if self._file is None:
                self._file = h5py.File(self.path, "r")
            return self._file["imgBrick"][int(stim_id)]
        except READ_ERRORS as err:
            raise DataError(f"{self.path}: cannot read image {int(stim_id)} of 'imgBrick' ({err})") from None

    def __getstate__(self):
        return {**self.__dict__, "_file": None}
