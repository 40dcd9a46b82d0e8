"""A dataset's own space: the reference geometry in which a run's per-voxel maps are written and read back.

A datamodule class gives it for a finished run from what the run recorded, without reading any responses
(``<DataModule>.brain_space(config, description)``; analyses ask ``RunDir.brain_space()``):

    space = run.brain_space()
    files = space.encode("test_r", values, voxel_xyz)      # {file name: bytes} in the dataset's own format
    values = space.decode(folder, "test_r", voxel_xyz)      # the map read back at the run's voxels

* ``VolumeSpace`` (NSD func1pt8mm / func1mm, the synthetic NSD layout): ``<name>.nii.gz``, the subject's grid
  (X, Y, Z) with the affine and header of its ROI file, float32, NaN outside the run's voxels; voxel_xyz (n, 3)
  NIfTI (x, y, z) indices. ``anatomy``: the subject's T1 / mean EPI in the same space, when present.
* ``SurfaceSpace`` (NSD nativesurface / fsaverage): ``lh.<name>.mgh`` and ``rh.<name>.mgh``, every vertex of the
  hemisphere (n_vertices, 1, 1) float32 with the ROI files' affine and header, NaN elsewhere; voxel_xyz (n, 2)
  [hemisphere (0 lh, 1 rh), vertex]. ``meshes``: FreeSurfer's inflated surface and sulcal depth, when present.
* ``CiftiSpace`` (NOD, video): ``<name>.dscalar.nii``, one map (a ScalarAxis row) over the brain models of the
  run's input CIFTI-2 file (all its grayordinates, NaN outside the run's); voxel_xyz[:, 0] = index into the
  file's cortical grayordinates.

Maps are float32: a value reads back exactly as its float32 cast. Only nibabel is used; a map's bytes are
handed to the caller, which writes them (``encoders.run_dir`` writes atomically).
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.cifti2 import cifti2_axes

HEMISPHERES = ("left", "right")
CORTEX = {"CIFTI_STRUCTURE_CORTEX_LEFT": "left", "CIFTI_STRUCTURE_CORTEX_RIGHT": "right"}


def _values(values, voxel_xyz: np.ndarray, ndim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    xyz = np.asarray(voxel_xyz, dtype=np.int64)
    if xyz.ndim != 2 or (ndim is not None and xyz.shape[1] != ndim):
        raise ValueError(f"voxel_xyz has shape {xyz.shape}, expected (n_voxels, {ndim or 'k'})")
    if len(values) != len(xyz):
        raise ValueError(f"a map of {len(values)} values for {len(xyz)} voxels")
    return values.astype(np.float32), xyz


def _load(path: Path) -> nib.filebasedimages.FileBasedImage:
    """A nibabel image (header only; data read lazily), or ValueError naming the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises several types for corrupt files
        raise ValueError(f"{path}: cannot read ({type(err).__name__}: {' '.join(str(err).split())})") from None


@dataclass(frozen=True, eq=False)
class VolumeSpace:
    """A subject's volume grid: shape (X, Y, Z), the affine and header of the file that defines it (``source``)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    header: nib.Nifti1Header
    source: str
    anatomy: dict[str, Path] = field(default_factory=dict)   # {"T1": path, "mean EPI": path}, files that exist

    kind = "volume"

    @classmethod
    def from_file(cls, path: Path, anatomy: dict[str, Path] | None = None) -> "VolumeSpace":
        """The grid of a NIfTI file (e.g. an ROI file); ``anatomy``: candidate background volumes, kept if present."""
        img = _load(path)
        shape = tuple(int(n) for n in img.shape[:3])
        if len(img.shape) < 3 or (len(img.shape) == 4 and img.shape[3] != 1) or len(img.shape) > 4:
            raise ValueError(f"{path}: shape {img.shape}, expected a 3-D volume (X, Y, Z)")
        header = nib.Nifti1Header.from_header(img.header)
        return cls(shape, np.asarray(img.affine, dtype=np.float64), header, str(path),
                   {k: Path(p) for k, p in (anatomy or {}).items() if Path(p).is_file()})

    def file_names(self, name: str) -> list[str]:
        return [f"{name}.nii.gz"]

    def image(self, values, voxel_xyz: np.ndarray, name: str = "") -> nib.Nifti1Image:
        """values (n_voxels,) at voxel_xyz (n_voxels, 3) -> a float32 NIfTI on this grid, NaN elsewhere."""
        values, xyz = _values(values, voxel_xyz, 3)
        if len(xyz) and (xyz.min() < 0 or np.any(xyz.max(0) >= self.shape)):
            raise ValueError(f"voxel_xyz reaches {xyz.max(0).tolist()}, outside the grid {list(self.shape)} of {self.source}")
        grid = np.full(self.shape, np.nan, dtype=np.float32)
        grid[xyz[:, 0], xyz[:, 1], xyz[:, 2]] = values
        header = self.header.copy()
        header.set_data_dtype(np.float32)
        header.set_slope_inter(np.nan, np.nan)
        header["cal_min"], header["cal_max"] = 0, 0
        header["descrip"] = name[:79].encode()
        header.set_intent("none")
        return nib.Nifti1Image(grid, self.affine, header)

    def encode(self, name: str, values, voxel_xyz: np.ndarray) -> dict[str, bytes]:
        return {f"{name}.nii.gz": gzip.compress(self.image(values, voxel_xyz, name).to_bytes(), compresslevel=6)}

    def decode(self, folder: Path, name: str, voxel_xyz: np.ndarray) -> np.ndarray:
        """The map ``<folder>/<name>.nii.gz`` at voxel_xyz -> (n_voxels,) float32."""
        xyz = np.asarray(voxel_xyz, dtype=np.int64)
        data = np.asarray(_load(Path(folder) / f"{name}.nii.gz").dataobj, dtype=np.float32)
        return data[xyz[:, 0], xyz[:, 1], xyz[:, 2]]

    def same_grid(self, other) -> bool:
        return isinstance(other, VolumeSpace) and other.shape == self.shape and np.allclose(other.affine, self.affine)

    def describe(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "source": self.source,
                "anatomy": {k: str(p) for k, p in self.anatomy.items()}}


def _hemisphere_grids(values: np.ndarray, hemi: np.ndarray, vertex: np.ndarray, n_vertices: tuple[int, int],
                      source: str) -> dict[str, np.ndarray]:
    out = {}
    for h, name in enumerate(HEMISPHERES):
        mine = hemi == h
        if mine.any() and (vertex[mine].min() < 0 or vertex[mine].max() >= n_vertices[h]):
            raise ValueError(f"vertex {int(vertex[mine].max())} of the {name} hemisphere is outside its "
                             f"{n_vertices[h]} vertices ({source})")
        grid = np.full(n_vertices[h], np.nan, dtype=np.float32)
        grid[vertex[mine]] = values[mine]
        out[name] = grid
    return out


@dataclass(frozen=True, eq=False)
class SurfaceSpace:
    """Two FreeSurfer hemispheres: vertex counts (lh, rh) and the MGH affine/header of the files defining them."""

    n_vertices: tuple[int, int]
    affine: np.ndarray
    header: nib.freesurfer.mghformat.MGHHeader
    source: str
    surface: str = ""                                        # "fsaverage" | "nativesurface"
    meshes: dict[str, dict[str, Path]] = field(default_factory=dict)   # {"left": {"inflated": p, "sulc": p}, ...}

    kind = "surface"
    PREFIX = {"left": "lh", "right": "rh"}

    @classmethod
    def from_files(cls, paths: list[Path], surface: str = "", meshes: dict[str, dict[str, Path]] | None = None
                   ) -> "SurfaceSpace":
        """The vertex counts of [lh, rh] per-vertex MGH/MGZ files (e.g. ROI files); ``meshes``: candidate
        surface files per hemisphere, kept if every hemisphere has its ``inflated`` file."""
        imgs = [_load(p) for p in paths]
        counts = []
        for path, img in zip(paths, imgs):
            if int(np.prod(img.shape[1:])) != 1:
                raise ValueError(f"{path}: shape {img.shape}, expected (vertices, 1, 1) with one value per vertex")
            counts.append(int(img.shape[0]))
        kept = {h: {k: Path(p) for k, p in files.items() if Path(p).is_file()} for h, files in (meshes or {}).items()}
        if not all("inflated" in kept.get(h, {}) for h in HEMISPHERES):
            kept = {}
        header = imgs[0].header.copy()
        return cls(tuple(counts), np.asarray(imgs[0].affine, dtype=np.float64), header,
                   f"{paths[0]} (+ {Path(paths[1]).name})", surface, kept)

    def file_names(self, name: str) -> list[str]:
        return [f"{self.PREFIX[h]}.{name}.mgh" for h in HEMISPHERES]

    def hemispheres(self, values, voxel_xyz: np.ndarray) -> dict[str, np.ndarray]:
        """values (n_voxels,) at [hemisphere, vertex] positions (n_voxels, 2) -> {"left": (n_lh,), "right": (n_rh,)}."""
        values, xyz = _values(values, voxel_xyz, 2)
        if len(xyz) and not np.isin(xyz[:, 0], (0, 1)).all():
            raise ValueError("voxel_xyz[:, 0] must be the hemisphere, 0 (lh) or 1 (rh)")
        return _hemisphere_grids(values, xyz[:, 0], xyz[:, 1], self.n_vertices, self.source)

    def encode(self, name: str, values, voxel_xyz: np.ndarray) -> dict[str, bytes]:
        out = {}
        for (h, grid), file_name in zip(self.hemispheres(values, voxel_xyz).items(), self.file_names(name)):
            header = self.header.copy()
            header.set_data_dtype(np.float32)
            out[file_name] = nib.MGHImage(grid.reshape(-1, 1, 1), self.affine, header).to_bytes()
        return out

    def decode(self, folder: Path, name: str, voxel_xyz: np.ndarray) -> np.ndarray:
        """The maps ``<folder>/{lh,rh}.<name>.mgh`` at [hemisphere, vertex] positions -> (n_voxels,) float32."""
        xyz = np.asarray(voxel_xyz, dtype=np.int64)
        grids = [np.asarray(_load(Path(folder) / f).dataobj, dtype=np.float32).reshape(-1) for f in self.file_names(name)]
        out = np.empty(len(xyz), dtype=np.float32)
        for h in (0, 1):
            mine = xyz[:, 0] == h
            out[mine] = grids[h][xyz[mine, 1]]
        return out

    def same_grid(self, other) -> bool:
        return isinstance(other, SurfaceSpace) and other.n_vertices == self.n_vertices

    def describe(self) -> dict:
        return {"kind": self.kind, "surface": self.surface, "n_vertices": list(self.n_vertices), "source": self.source,
                "meshes": {h: {k: str(p) for k, p in m.items()} for h, m in self.meshes.items()}}


@dataclass(frozen=True, eq=False)
class CiftiSpace:
    """The grayordinates of a CIFTI-2 file: its brain models (``axis``) and, per cortical grayordinate index
    (what a run's voxel_xyz[:, 0] holds), its column in that axis (``columns``)."""

    axis: cifti2_axes.BrainModelAxis
    columns: np.ndarray
    source: str
    meshes: dict[str, dict[str, Path]] = field(default_factory=dict)

    kind = "cifti"

    @classmethod
    def from_file(cls, path: Path, n_cortex: int) -> "CiftiSpace":
        """The brain models of a CIFTI-2 file whose columns are grayordinates; its first ``n_cortex`` surface
        grayordinates (CORTEX_LEFT then CORTEX_RIGHT) are the cortical ones a run's voxels index."""
        img = _load(path)
        if not isinstance(img, nib.Cifti2Image):
            raise ValueError(f"{path}: not a CIFTI-2 file (nibabel reads it as {type(img).__name__})")
        axis = img.header.get_axis(img.ndim - 1)
        if not isinstance(axis, cifti2_axes.BrainModelAxis):
            raise ValueError(f"{path}: its columns are a {type(axis).__name__}, expected grayordinates (BrainModelAxis)")
        cortical = np.flatnonzero(np.isin(axis.name, list(CORTEX)))
        if len(cortical) != n_cortex:
            raise ValueError(f"{path}: {len(cortical)} cortical grayordinates, but the run recorded n_cortex={n_cortex}")
        return cls(axis, cortical, str(path))

    def file_names(self, name: str) -> list[str]:
        return [f"{name}.dscalar.nii"]

    def _columns(self, voxel_xyz: np.ndarray) -> np.ndarray:
        g = np.asarray(voxel_xyz, dtype=np.int64)[:, 0]
        if len(g) and (g.min() < 0 or g.max() >= len(self.columns)):
            raise ValueError(f"grayordinate index {int(g.max())} outside the {len(self.columns)} cortical "
                             f"grayordinates of {self.source}")
        return self.columns[g]

    def row(self, values, voxel_xyz: np.ndarray) -> np.ndarray:
        """values at the run's grayordinates -> (n_grayordinates,) float32 over every brain model, NaN elsewhere."""
        values, _ = _values(values, voxel_xyz)
        out = np.full(len(self.axis), np.nan, dtype=np.float32)
        out[self._columns(voxel_xyz)] = values
        return out

    def encode(self, name: str, values, voxel_xyz: np.ndarray) -> dict[str, bytes]:
        img = nib.Cifti2Image(self.row(values, voxel_xyz)[None, :],
                              header=(cifti2_axes.ScalarAxis([name]), self.axis))
        img.update_headers()
        return {f"{name}.dscalar.nii": img.to_bytes()}

    def decode(self, folder: Path, name: str, voxel_xyz: np.ndarray) -> np.ndarray:
        """The map ``<folder>/<name>.dscalar.nii`` at the run's grayordinates -> (n_voxels,) float32."""
        path = Path(folder) / f"{name}.dscalar.nii"
        img = _load(path)
        if img.header.get_axis(1) != self.axis:
            raise ValueError(f"{path}: its brain models differ from those of {self.source}")
        return np.asarray(img.dataobj, dtype=np.float32)[0, self._columns(voxel_xyz)]

    def hemispheres(self, values, voxel_xyz: np.ndarray) -> dict[str, np.ndarray]:
        """The cortical part as full hemisphere vertex arrays {"left": (n_vertices_L,), "right": ...}, NaN where
        the file has no grayordinate (e.g. the medial wall) or the run no voxel."""
        row = self.row(values, voxel_xyz)
        out = {}
        for structure, part, sub in self.axis.iter_structures():
            hemi = CORTEX.get(structure)
            if hemi is None:
                continue
            grid = np.full(int(sub.nvertices[structure]), np.nan, dtype=np.float32)
            grid[sub.vertex] = row[part]
            out[hemi] = grid
        return out

    @property
    def n_vertices(self) -> dict[str, int]:
        return {CORTEX[s]: int(n) for s, n in self.axis.nvertices.items() if s in CORTEX}

    def same_grid(self, other) -> bool:
        return isinstance(other, CiftiSpace) and other.axis == self.axis and np.array_equal(other.columns, self.columns)

    def describe(self) -> dict:
        return {"kind": self.kind, "n_grayordinates": len(self.axis), "n_cortex": len(self.columns),
                "n_vertices": self.n_vertices, "source": self.source}
