"""Readers for the Natural Object Dataset (NOD; OpenNeuro ds004496, Gong et al. 2023) files as it ships them.

Layout under ``root`` (XX = subject 01.., SS = ImageNet session 01.., R = run 1..10)::

    sub-XX/ses-imagenetSS/func/sub-XX_ses-imagenetSS_task-imagenet_run-RR_events.tsv   (RR = 1 or 01)
    sub-XX/ses-coco/func/sub-XX_ses-coco_task-coco_run-RR_events.tsv
    derivatives/ciftify/sub-XX/results/<run>/<run>_beta.dscalar.nii    <run> = ses-imagenetSS_task-imagenet_run-R
                                                                       or ses-coco_task-coco_run-R
    derivatives/ciftify/sub-XX/results/ses-floc_task-floc/floc-{faces,bodies,places,words}.dlabel.nii
    stimuli/imagenet/<synset>/<synset>_<n>.JPEG      (or the user's ImageNet folder: data.imagenet_dir)
    stimuli/coco/<name>.jpg                          (or the user's COCO folder: data.coco_dir)
    stimuli/coco_images.csv                          columns num,img: the 120 COCO images (data.coco_images_csv);
                                                     if absent, the same order from the COCO events' stim_file

Betas: CIFTI-2 dscalar, one map (row) per trial, grayordinates (BrainModelAxis) as columns; only the
cortical surface grayordinates (CORTEX_LEFT + CORTEX_RIGHT, 59412 in fsLR 32k) are used, so files with
all 91282 grayordinates and files with only the 59412 cortical ones are both accepted. ImageNet maps
are in the events file's row order (``stim_file`` names the image, relative to ``stimuli/``); COCO maps
are in the order of ``coco_images.csv`` (NOD's GLM writes the COCO conditions sorted by image index;
that support file lists the 120 images sorted by file name). Without it, ``coco_order_from_events``
derives the same order: the file names in the COCO events' ``stim_file`` column, sorted.
Every failure is a DataError whose message names the file, key or shape at fault.

Sources: the paths, the map orders and ``stim_file`` relative to ``stimuli/`` follow NOD's own code
(github.com/GongZhengxin/NOD-fmri: GLM.py, nod_utils.py) and CLIP-MSM's NOD loader. Not checked against
the released files: where ``coco_images.csv`` lives (NOD's code keeps it in a support folder; the default
here is ``stimuli/``, configurable) and the label names inside the fLoc dlabel files (read from their own
label tables, whatever they are).
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
from PIL import Image

from datamodules.errors import DataError

N_CORTEX = 59412  # cortical grayordinates of fsLR 32k (of 91282)
CORTEX = ("CIFTI_STRUCTURE_CORTEX_LEFT", "CIFTI_STRUCTURE_CORTEX_RIGHT")
RUN_PATTERN = re.compile(r"ses-(imagenet\d+|coco)_task-(imagenet|coco)_run-(\d+)")
FLOC_DIR = "ses-floc_task-floc"


def one_line(err: BaseException) -> str:
    """An exception as '<Type>: <message>' on one line (library messages may span several)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def require(path: Path) -> Path:
    """Return path if it exists, else raise DataError naming it."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    return path


@dataclass(frozen=True)
class Run:
    """One fMRI run: session 'imagenet01' / 'coco', task 'imagenet' / 'coco', run number (1-based)."""

    session: str
    task: str
    run: int

    @property
    def name(self) -> str:
        return f"ses-{self.session}_task-{self.task}_run-{self.run}"

    @property
    def is_coco(self) -> bool:
        return self.task == "coco"


@dataclass(frozen=True)
class NODPaths:
    """Where one subject's files live under a NOD root."""

    root: Path
    subject: int

    @property
    def sub(self) -> str:
        return f"sub-{self.subject:02d}"

    @property
    def results_dir(self) -> Path:
        return self.root / "derivatives/ciftify" / self.sub / "results"

    def betas(self, run: Run) -> Path:
        return self.results_dir / run.name / f"{run.name}_beta.dscalar.nii"

    def events(self, run: Run) -> Path:
        """The run's BIDS events file (run number with or without zero padding); the padded name if neither exists."""
        func = self.root / self.sub / f"ses-{run.session}" / "func"
        names = [f"{self.sub}_ses-{run.session}_task-{run.task}_run-{r}_events.tsv"
                 for r in (f"{run.run:02d}", str(run.run))]
        return next((func / n for n in names if (func / n).exists()), func / names[0])

    def roi(self, name: str) -> Path:
        return self.results_dir / FLOC_DIR / f"{name}.dlabel.nii"

    def runs(self) -> list[Run]:
        """Runs with a results folder, ImageNet first (by session, run), then COCO (by run)."""
        if not self.results_dir.is_dir():
            raise DataError(f"{self.results_dir}: ciftify results folder not found for {self.sub}")
        found = []
        for p in self.results_dir.iterdir():
            m = RUN_PATTERN.fullmatch(p.name)
            if m and p.is_dir() and m.group(1).startswith(m.group(2)):
                found.append(Run(m.group(1), m.group(2), int(m.group(3))))
        if not found:
            raise DataError(f"{self.results_dir}: no ses-*_task-{{imagenet,coco}}_run-* folders for {self.sub}")
        return sorted(found, key=lambda r: (r.is_coco, r.session, r.run))


# --------------------------------------------------------------------------- tables
def read_tsv(path: Path, required: tuple[str, ...], delimiter: str = "\t") -> list[dict[str, str]]:
    """Rows of a TSV/CSV file with a header line, as dicts; DataError if a required column is missing."""
    try:
        with open(require(path), newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
            columns = [c.strip() for c in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read as a table ({one_line(err)})") from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{path}: column '{missing[0]}' missing (found {columns})")
    return rows


def read_coco_images(path: Path) -> list[str]:
    """coco_images.csv (columns num, img) -> image file names in ``num`` order: the COCO beta map order."""
    rows = read_tsv(path, ("num", "img"), delimiter=",")
    try:
        rows = sorted(rows, key=lambda r: int(r["num"]))
    except ValueError:
        raise DataError(f"{path}: column 'num' must hold integers") from None
    if not rows:
        raise DataError(f"{path}: no images listed")
    return [r["img"] for r in rows]


def coco_order_from_events(events: list[Path]) -> list[str]:
    """The COCO beta-map order without coco_images.csv: the file names in the COCO runs' events ``stim_file``
    column (e.g. 'coco/<name>.jpg' -> '<name>.jpg'), sorted, as NOD's support file lists them. Every COCO
    run must show the same images, each once; DataError naming the events file otherwise."""
    order, first = None, None
    for path in events:
        rows = read_tsv(path, ("onset", "trial_type", "stim_file"))
        names = [PurePosixPath(r["stim_file"].replace("\\", "/")).name for r in rows]
        if not names or not all(names):
            raise DataError(f"{path}: empty stim_file, cannot order the COCO beta maps without coco_images.csv")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise DataError(f"{path}: stim_file '{dup}' shown twice in one COCO run")
        names = sorted(names)
        if order is None:
            order, first = names, path
        elif names != order:
            other = sorted(set(names) ^ set(order))
            raise DataError(f"{path}: its COCO images differ from those of {first.name} (e.g. '{other[0]}' "
                            f"is in one only)" if other else f"{path}: differs from {first.name}")
    if order is None:
        raise DataError("no COCO events file to order the COCO beta maps by")
    return order


# --------------------------------------------------------------------------- CIFTI-2
def load_cifti(path: Path) -> nib.Cifti2Image:
    """Open a CIFTI-2 file (header only; data is read lazily)."""
    require(path)
    try:
        img = nib.load(path)
    except Exception as err:  # nibabel raises several types for corrupt or truncated files
        raise DataError(f"{path}: cannot read as CIFTI-2 ({one_line(err)})") from None
    if not isinstance(img, nib.Cifti2Image):
        raise DataError(f"{path}: not a CIFTI-2 file (nibabel reads it as {type(img).__name__})")
    return img


@dataclass(frozen=True)
class Cortex:
    """The cortical grayordinates of a CIFTI file: columns (n_cortex,) into its matrix, and their identity."""

    columns: np.ndarray
    structure: np.ndarray
    vertex: np.ndarray
    path: Path

    def check_same(self, other: "Cortex") -> None:
        """DataError unless ``other`` has the same cortical vertices in the same order."""
        if not (np.array_equal(self.structure, other.structure) and np.array_equal(self.vertex, other.vertex)):
            raise DataError(f"{other.path}: its cortical grayordinates differ from those of {self.path.name}; "
                            f"every file must be in the same fsLR space")


def cortex_of(img: nib.Cifti2Image, path: Path, n_cortex: int) -> Cortex:
    """Locate the CORTEX_LEFT + CORTEX_RIGHT columns; DataError unless there are exactly n_cortex."""
    try:
        axis = img.header.get_axis(1)
    except Exception as err:
        raise DataError(f"{path}: cannot read the CIFTI-2 column axis ({one_line(err)})") from None
    if not isinstance(axis, nib.cifti2.BrainModelAxis):
        raise DataError(f"{path}: columns are a {type(axis).__name__}, expected grayordinates (BrainModelAxis)")
    cortical = np.isin(axis.name, CORTEX)
    count = int(cortical.sum())
    if count != n_cortex:
        raise DataError(f"{path}: {count} cortical grayordinates (of {len(axis)} columns), expected "
                        f"data.n_cortex = {n_cortex} (fsLR 32k: {N_CORTEX} of 91282)")
    columns = np.flatnonzero(cortical)
    return Cortex(columns, np.asarray(axis.name)[columns], np.asarray(axis.vertex)[columns], path)


def read_cortex(path: Path, n_cortex: int) -> Cortex:
    """The cortical grayordinates of a CIFTI-2 file, from its header alone."""
    return cortex_of(load_cifti(path), path, n_cortex)


def read_matrix(img: nib.Cifti2Image, path: Path) -> np.ndarray:
    """The whole data matrix (n_rows, n_columns) float32; DataError for a truncated or unreadable file."""
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # a truncated file fails here, with one of several types
        raise DataError(f"{path}: cannot read the data matrix, expected shape {img.shape} "
                        f"(truncated or corrupt? {one_line(err)})") from None
    if data.ndim != 2:
        raise DataError(f"{path}: data has shape {data.shape}, expected (maps, grayordinates)")
    return data


def read_betas(path: Path, n_cortex: int, columns: np.ndarray | None = None) -> tuple[np.ndarray, Cortex]:
    """Betas of one run at the cortical grayordinates: (n_maps, n_cortex) float32, or only ``columns``
    (indices into the n_cortex cortical grayordinates) -> (n_maps, len(columns))."""
    img = load_cifti(path)
    cortex = cortex_of(img, path, n_cortex)
    data = read_matrix(img, path)
    cols = cortex.columns if columns is None else cortex.columns[columns]
    return np.ascontiguousarray(data[:, cols]), cortex


def read_dlabel(path: Path, n_cortex: int) -> tuple[dict[str, np.ndarray], Cortex]:
    """A dlabel file -> ({label name: bool (n_cortex,)} for every label k >= 1 present, cortex)."""
    img = load_cifti(path)
    cortex = cortex_of(img, path, n_cortex)
    try:
        labels = img.header.get_axis(0)
    except Exception as err:
        raise DataError(f"{path}: cannot read the CIFTI-2 label axis ({one_line(err)})") from None
    if not isinstance(labels, nib.cifti2.LabelAxis):
        raise DataError(f"{path}: rows are a {type(labels).__name__}, expected a label table (dlabel, LabelAxis)")
    data = read_matrix(img, path)[:, cortex.columns]
    if not np.isfinite(data).all():
        raise DataError(f"{path}: label values must be finite integers")
    values = np.rint(data).astype(np.int64)
    masks: dict[str, np.ndarray] = {}
    for index, (row, table) in enumerate(zip(values, labels.label)):
        unlisted = np.setdiff1d(np.unique(row[row > 0]), [int(k) for k in table])
        if len(unlisted):  # its grayordinates would silently belong to no named ROI
            k = int(unlisted[0])
            raise DataError(f"{path}: map {index} holds label {k} ({int((row == k).sum())} grayordinates), which "
                            f"its label table does not list (it lists {sorted(int(k) for k in table)})")
        for key, (name, _) in table.items():
            if key > 0 and (row == key).any():
                masks[name] = masks.get(name, np.zeros(n_cortex, bool)) | (row == key)
    return masks, cortex


# --------------------------------------------------------------------------- images
def resolve_imagenet(stim_file: str, imagenet_dir: Path) -> Path | None:
    """The file of an events ``stim_file`` ('imagenet/<synset>/<name>', '<synset>/<name>' or '<name>')
    under ``imagenet_dir``: tried as given, then as <synset>/<name>, then as <name>; None if absent."""
    parts = list(Path(stim_file.replace("\\", "/")).parts)
    for prefix in ("stimuli", "imagenet"):
        if len(parts) > 1 and parts[0] == prefix:
            parts = parts[1:]
    name = parts[-1]
    for candidate in (Path(*parts), Path(name.split("_")[0]) / name, Path(name)):
        if (imagenet_dir / candidate).is_file():
            return imagenet_dir / candidate
    return None


class ImageFiles:
    """Images read from files by 0-based id (the subject's stimulus list).

    names (n,): relative names ('imagenet/<synset>/<file>', 'coco/<file>'), the ids' meaning;
    paths (n,): the files. ``image(i)`` -> uint8 (H, W, 3); ``path``: the common folder.
    """

    def __init__(self, names: list[str], paths: list[Path]):
        if len(names) != len(paths):
            raise ValueError("names and paths differ in length")
        self.names, self.paths = list(names), [Path(p) for p in paths]
        parents = {str(p.resolve().parent) for p in self.paths}
        self.path = Path(os.path.commonpath(sorted(parents))) if parents else Path(".")

    def __len__(self) -> int:
        return len(self.names)

    def image(self, stim_id: int) -> np.ndarray:
        path = self.paths[int(stim_id)]
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot read as an image ({one_line(err)})") from None

    def source(self) -> dict:
        """Identity of the stimulus list, for feature-cache keys: names (in id order), sizes, mtimes."""
        digest = hashlib.blake2b(digest_size=16)
        for name, path in zip(self.names, self.paths):
            st = path.stat()
            digest.update(f"{name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return {"folder": str(self.path), "n_images": len(self.names), "files_sha": digest.hexdigest()}

