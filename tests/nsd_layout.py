"""A minimal NSD layout written by hand (independent of the synthetic generator), for reader tests."""
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import scipy.io

SHAPE = (3, 4, 5)  # NIfTI (X, Y, Z)


def write_minimal_nsd(root: Path, n_sessions: int = 2, seed: int = 0) -> dict:
    """Subject 1 sees 4 images (ids 0..3; 0 and 1 shared) 3 times each over n_sessions sessions.

    Returns the planted truth: {"xyz": (n_vox, 3), "betas": [(T, n_vox) psc per session], "stim": [(T,) ids]}.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "nsddata_stimuli/stimuli/nsd").mkdir(parents=True)
    with h5py.File(root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5", "w") as f:
        f["imgBrick"] = rng.integers(0, 255, size=(6, 32, 32, 3), dtype=np.uint8)
    (root / "nsddata/experiments/nsd").mkdir(parents=True)
    n_trials = 12
    master = np.tile(np.arange(1, 5), 3)  # 1-based into the subject's list
    rng.shuffle(master)
    subjectim = np.array([[1, 2, 4, 5], [1, 2, 3, 6]], dtype=float)  # 1-based 73k ids: subject 1 sees 0,1,3,4
    scipy.io.savemat(root / "nsddata/experiments/nsd/nsd_expdesign.mat",
                     {"masterordering": master[None].astype(float), "subjectim": subjectim,
                      "sharedix": np.array([[1, 2]], dtype=float)})
    roi_dir = root / "nsddata/ppdata/subj01/func1pt8mm/roi"
    roi_dir.mkdir(parents=True)
    general = -np.ones(SHAPE, dtype=np.int16)
    general[1:, 1:3, 2:] = 1
    general[0, 0, 0] = 0
    nib.save(nib.Nifti1Image(general, np.eye(4)), roi_dir / "nsdgeneral.nii.gz")
    faces = np.zeros(SHAPE, dtype=np.int16)
    faces[2, 1:3, 2:] = 2  # FFA-1
    nib.save(nib.Nifti1Image(faces, np.eye(4)), roi_dir / "floc-faces.nii.gz")
    xyz = np.argwhere(general > 0)
    betas_dir = root / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    betas_dir.mkdir(parents=True)
    ncsnr = np.zeros(SHAPE, dtype=np.float32)
    ncsnr[tuple(xyz.T)] = rng.uniform(0.2, 2, len(xyz))
    nib.save(nib.Nifti1Image(ncsnr, np.eye(4)), betas_dir / "ncsnr.nii.gz")
    per_session = n_trials // n_sessions
    truth = {"xyz": xyz, "betas": [], "stim": [], "ncsnr": ncsnr[tuple(xyz.T)]}
    subject_ids = (subjectim[0] - 1).astype(int)
    for s in range(n_sessions):
        psc = np.round(rng.normal(size=(per_session, len(xyz))) * 300) / 300
        volume = np.zeros((per_session,) + SHAPE[::-1], dtype=np.int16)  # (T, Z, Y, X)
        volume[:, xyz[:, 2], xyz[:, 1], xyz[:, 0]] = np.round(psc * 300).astype(np.int16)
        with h5py.File(betas_dir / f"betas_session{s + 1:02d}.hdf5", "w") as f:
            f["betas"] = volume
        truth["betas"].append(psc)
        truth["stim"].append(subject_ids[master[s * per_session:(s + 1) * per_session] - 1])
    return truth


# --- the same data in NSD's other spaces and formats ---------------------------------------------
# A test "surface" is the volume cut in two at x = X // 2: lh holds x < X // 2, rh the rest, and a
# hemisphere's vertices are its voxels in C order. So voxel (x, y, z) is vertex
# ((x - h * (X // 2)) * Y + y) * Z + z of hemisphere h = (x >= X // 2), and the sorted surface
# positions list the voxels in the same order as the sorted volume positions.


def volume_to_surface(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z[, T]) -> (lh, rh), each (n_vertices[, T])."""
    half = volume.shape[0] // 2
    tail = volume.shape[3:]
    return volume[:half].reshape((-1,) + tail), volume[half:].reshape((-1,) + tail)


def voxel_to_vertex(xyz: np.ndarray, shape) -> np.ndarray:
    """NIfTI positions (n, 3) -> surface positions (n, 2) [hemisphere, vertex] under the cut above."""
    X, Y, Z = shape
    hemi = (xyz[:, 0] >= X // 2).astype(np.int64)
    return np.stack([hemi, ((xyz[:, 0] - hemi * (X // 2)) * Y + xyz[:, 1]) * Z + xyz[:, 2]], axis=1)


def _mgh(path: Path, data: np.ndarray) -> None:
    """A per-vertex (V,) or per-vertex-per-trial (V, T) array as FreeSurfer MGH/MGZ (V, 1, 1[, T])."""
    shaped = data.reshape((data.shape[0], 1, 1) + data.shape[1:])
    nib.save(nib.MGHImage(shaped, np.eye(4)), path)


def write_space(src: Path, subject: int, space: str, beta_format: str | None = None, dst: Path | None = None) -> Path:
    """Write a subject's func1pt8mm HDF5 data (ROIs, ncsnr, betas) under ``dst`` (default ``src``) in another
    NSD space and format, with NSD's file names and axis orders:

    func1pt8mm/func1mm hdf5 (T, Z, Y, X) int16 or nifti (X, Y, Z, T) int16; nativesurface {lh,rh} hdf5 (T, V)
    int16 and {lh,rh}.<roi>.mgz in freesurfer/subjXX/label; fsaverage {lh,rh} .mgh (V, 1, 1, T) float32 in
    % signal change and {lh,rh}.<roi>.mgz + .ctab in freesurfer/fsaverage/label. A different ``dst``
    gets links to src's stimuli and design. Returns dst.
    """
    src, dst = Path(src), Path(dst or src)
    subj = f"subj{subject:02d}"
    if dst != src:
        for part in ("nsddata_stimuli", "nsddata/experiments"):
            if not (dst / part).exists():
                (dst / part).parent.mkdir(parents=True, exist_ok=True)
                (dst / part).symlink_to((src / part).resolve())
    roi_src = src / "nsddata/ppdata" / subj / "func1pt8mm/roi"
    betas_src = src / "nsddata_betas/ppdata" / subj / "func1pt8mm/betas_fithrf_GLMdenoise_RR"
    ctab_src = src / "nsddata/freesurfer" / subj / "label"
    betas_dst = dst / "nsddata_betas/ppdata" / subj / space / "betas_fithrf_GLMdenoise_RR"
    betas_dst.mkdir(parents=True, exist_ok=True)
    surface = space in ("nativesurface", "fsaverage")
    label_dst = dst / "nsddata/freesurfer" / ("fsaverage" if space == "fsaverage" else subj) / "label"
    roi_dst = label_dst if surface else dst / "nsddata/ppdata" / subj / space / "roi"
    roi_dst.mkdir(parents=True, exist_ok=True)
    label_dst.mkdir(parents=True, exist_ok=True)
    for ctab in sorted(ctab_src.glob("*.ctab")) if ctab_src.is_dir() else []:
        if not (label_dst / ctab.name).exists():
            (label_dst / ctab.name).write_bytes(ctab.read_bytes())
    for roi in sorted(roi_src.glob("*.nii.gz")):
        name = roi.name[:-len(".nii.gz")]
        img = nib.load(roi)
        if not surface:
            if roi_dst != roi_src:
                nib.save(img, roi_dst / roi.name)
            continue
        for hemi, values in zip(("lh", "rh"), volume_to_surface(np.asarray(img.dataobj).astype(np.int32))):
            _mgh(roi_dst / f"{hemi}.{name}.mgz", values)
    ncsnr = nib.load(betas_src / "ncsnr.nii.gz")
    if surface:
        for hemi, values in zip(("lh", "rh"), volume_to_surface(np.asarray(ncsnr.dataobj, dtype=np.float32))):
            _mgh(betas_dst / f"{hemi}.ncsnr.mgh", values)
    elif betas_dst != betas_src:
        nib.save(ncsnr, betas_dst / "ncsnr.nii.gz")
    for path in sorted(betas_src.glob("betas_session*.hdf5")):
        stem = path.name[:-len(".hdf5")]
        with h5py.File(path, "r") as f:
            stored = f["betas"][:]  # (T, Z, Y, X) int16
        volume = stored.transpose(3, 2, 1, 0)  # (X, Y, Z, T)
        if space == "fsaverage":
            for hemi, values in zip(("lh", "rh"), volume_to_surface(volume)):
                _mgh(betas_dst / f"{hemi}.{stem}.mgh", (values / 300.0).astype(np.float32))
        elif space == "nativesurface":
            for hemi, values in zip(("lh", "rh"), volume_to_surface(volume)):
                with h5py.File(betas_dst / f"{hemi}.{stem}.hdf5", "w") as f:
                    f["betas"] = np.ascontiguousarray(values.T)  # (T, V)
        elif beta_format == "nifti":
            nib.save(nib.Nifti1Image(np.asfortranarray(volume), ncsnr.affine), betas_dst / f"{stem}.nii.gz")
        elif betas_dst != betas_src:
            with h5py.File(betas_dst / path.name, "w") as f:
                f["betas"] = stored
    return dst
