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
