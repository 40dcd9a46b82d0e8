"""NSD in every beta space and format, ROI selection by name, single trials, shared test sets, bad input."""
import json
import subprocess
import sys

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io

from datamodules import nsd_files
from datamodules.errors import DataError
from datamodules.nsd import NSDDataModule, common_shared_images, load_subject, permute_rows
from datamodules.nsd_files import NSDPaths, read_labels, read_session
from datamodules.preprocessing import RepeatAverager, drop_columns
from tests.conftest import REPO
from tests.nsd_layout import SHAPE, voxel_to_vertex, write_minimal_nsd, write_space
from tests.test_nsd import expected_responses

SPACES = [("func1pt8mm", "nifti"), ("func1mm", "hdf5"), ("func1mm", "nifti"), ("nativesurface", None),
          ("fsaverage", None)]


@pytest.fixture
def nsd(tmp_path):
    truth = write_minimal_nsd(tmp_path)
    return tmp_path, truth


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_paths_follow_nsd_names(tmp_path):
    vol = NSDPaths(tmp_path, 1, "func1mm", "nifti")
    assert vol.betas(3).relative_to(tmp_path).as_posix() == \
        "nsddata_betas/ppdata/subj01/func1mm/betas_fithrf_GLMdenoise_RR/betas_session03.nii.gz"
    assert vol.roi("floc-faces").relative_to(tmp_path).as_posix() == "nsddata/ppdata/subj01/func1mm/roi/floc-faces.nii.gz"
    surf = NSDPaths(tmp_path, 2, "nativesurface")
    assert [p.name for p in surf.betas_files(12)] == ["lh.betas_session12.hdf5", "rh.betas_session12.hdf5"]
    assert surf.roi("nsdgeneral", "rh").relative_to(tmp_path).as_posix() == "nsddata/freesurfer/subj02/label/rh.nsdgeneral.mgz"
    fsavg = NSDPaths(tmp_path, 2, "fsaverage")
    assert fsavg.betas(1, "rh").name == "rh.betas_session01.mgh" and fsavg.ncsnr_files()[1].name == "rh.ncsnr.mgh"
    assert fsavg.ctab("floc-faces").relative_to(tmp_path).as_posix() == "nsddata/freesurfer/fsaverage/label/floc-faces.mgz.ctab"
    with pytest.raises(ValueError, match="data.space must be one of"):
        NSDPaths(tmp_path, 1, "MNI")
    with pytest.raises(ValueError, match="beta_format='nifti' does not exist for space fsaverage"):
        NSDPaths(tmp_path, 1, "fsaverage", "nifti")


@pytest.mark.parametrize("space,fmt", SPACES)
def test_every_space_reads_the_same_responses(nsd, space, fmt):
    root, truth = nsd
    write_space(root, 1, space, fmt)
    data = load_subject(root, 1, roi_files=["floc-faces"], space=space, beta_format=fmt)
    ids, means, counts = expected_responses(truth)
    np.testing.assert_array_equal(data.stim_ids, ids)
    np.testing.assert_array_equal(data.n_repeats, counts)
    np.testing.assert_allclose(data.responses, means, atol=1e-5)
    surface = space in ("nativesurface", "fsaverage")
    xyz = voxel_to_vertex(truth["xyz"], SHAPE) if surface else truth["xyz"]
    np.testing.assert_array_equal(data.voxel_xyz, xyz)  # the cut keeps the volume's voxel order
    np.testing.assert_allclose(data.ncsnr, truth["ncsnr"])
    np.testing.assert_array_equal(data.rois["FFA-1"], truth["xyz"][:, 0] == 2)
    assert data.info["space"] == space and data.info["beta_format"] == NSDPaths(root, 1, space, fmt).beta_format


@pytest.mark.parametrize("space,fmt", [("func1pt8mm", "hdf5")] + SPACES)
def test_blockwise_reading_matches_nibabel_and_h5py(nsd, space, fmt):
    """Reading a slab/column/trial block at a time (budget of 1 byte) gives what the libraries read whole."""
    root, truth = nsd
    write_space(root, 1, space, fmt)
    paths = NSDPaths(root, 1, space, fmt)
    labels = read_labels(paths, "nsdgeneral")
    locs = labels.layout.locations(labels.mask())
    small = read_session(paths, 2, locs, labels.layout, budget=1)
    whole = read_session(paths, 2, locs, labels.layout, budget=2**30)
    np.testing.assert_array_equal(small, whole)
    if paths.surface:
        parts = []
        for h, file in enumerate(paths.betas_files(2)):
            verts = locs[locs[:, 0] == h, 1]
            if fmt is None and space == "fsaverage":
                parts.append(nib.load(file).get_fdata()[verts, 0, 0, :].T)  # already % signal change
            else:
                with h5py.File(file) as f:
                    parts.append(f["betas"][:][:, verts] / 300)
        reference = np.concatenate(parts, axis=1)
    elif fmt == "nifti":
        reference = nib.load(paths.betas(2)).get_fdata()[tuple(locs.T)].T / 300
    else:
        with h5py.File(paths.betas(2)) as f:
            reference = f["betas"][:][:, locs[:, 2], locs[:, 1], locs[:, 0]] / 300
    np.testing.assert_allclose(small, reference, atol=1e-6)
    np.testing.assert_allclose(small, truth["betas"][1], atol=1e-5)


# --- ROI selection by name ------------------------------------------------------------------------


@pytest.mark.parametrize("rois", [["FFA-1"], ["floc-faces"]])
def test_rois_by_label_or_file_name_select_voxels(nsd, rois):
    root, truth = nsd
    data = load_subject(root, 1, roi_files=["floc-faces"], rois=rois)
    inside = truth["xyz"][:, 0] == 2
    np.testing.assert_array_equal(data.voxel_xyz, truth["xyz"][inside])
    np.testing.assert_allclose(data.responses, expected_responses(truth)[1][:, inside], atol=1e-5)
    assert data.rois[rois[0]].all() and data.info["rois"] == rois


def test_unknown_roi_lists_the_known_ones(nsd):
    root, _ = nsd
    with pytest.raises(DataError) as err:
        load_subject(root, 1, roi_files=["floc-faces"], rois=["FFA-1", "FFA-9"])
    message = one_line(err)
    assert "no ROI named 'FFA-9'" in message and "FFA-1, FFA-2" in message and "OFA" in message


def test_roi_outside_the_mask_is_an_error(nsd):
    root, _ = nsd
    with pytest.raises(DataError, match=r"ROI 'OFA' has no voxels inside 'nsdgeneral'"):
        load_subject(root, 1, roi_files=["floc-faces"], rois=["OFA"])


def test_roi_empty_after_nan_removal(nsd):
    """fsaverage betas are float: NaN vertices (as NSD has outside the brain) are dropped; an ROI left empty is an error."""
    root, truth = nsd
    write_space(root, 1, "fsaverage")
    ffa = voxel_to_vertex(truth["xyz"][truth["xyz"][:, 0] == 2], SHAPE)
    path = NSDPaths(root, 1, "fsaverage").betas(2, "rh")
    img = nib.load(path)
    data = np.array(img.dataobj, dtype=np.float32)  # a copy: the file is rewritten below
    data[ffa[:, 1], 0, 0, 1] = np.nan
    nib.save(nib.MGHImage(data, img.affine), path)
    kept = load_subject(root, 1, roi_files=["floc-faces"], space="fsaverage")  # without the selection: dropped
    assert kept.n_dropped == len(ffa) and "FFA-1" not in kept.rois
    with pytest.raises(DataError) as err:  # FFA-1 alone selected: the session file is dead there, and named
        load_subject(root, 1, roi_files=["floc-faces"], space="fsaverage", rois=["FFA-1"])
    assert (f"rh.betas_session02.mgh: all {len(ffa)} selected vertices ('nsdgeneral' ∩ ['FFA-1']) are NaN or "
            "constant") in one_line(err)
    with pytest.raises(DataError) as err:  # with another ROI selected too, FFA-1 ends up empty
        load_subject(root, 1, roi_files=["floc-faces"], space="fsaverage", rois=["FFA-1", "nsdgeneral"])
    expected = f"ROI 'FFA-1' is empty after dropping its {len(ffa)} NaN or constant voxels (in rh.betas_session02.mgh, "
    assert expected in one_line(err)


# --- single trials --------------------------------------------------------------------------------


def test_single_trials_keep_every_trial_with_its_repeat_structure(nsd):
    root, truth = nsd
    data = load_subject(root, 1, roi_files=[], average_repeats=False)
    z = [(psc - psc.mean(0)) / psc.std(0) for psc in truth["betas"]]
    n_trials = len(truth["stim"][0])
    assert len(data.stim_ids) == sum(len(s) for s in truth["stim"]) and (data.n_repeats == 1).all()
    assert np.all(np.diff(data.stim_ids) >= 0)
    for row in range(len(data.stim_ids)):
        session, trial = data.trial_session[row], data.trial_index[row]
        assert truth["stim"][session - 1][trial] == data.stim_ids[row]
        np.testing.assert_allclose(data.responses[row], z[session - 1][trial], atol=1e-5)
        earlier = [(s, t) for s in range(1, 3) for t in range(n_trials)
                   if truth["stim"][s - 1][t] == data.stim_ids[row] and (s, t) < (session, trial)]
        assert data.repeat_index[row] == len(earlier)
    averaged = load_subject(root, 1, roi_files=[])
    means = np.stack([data.responses[data.stim_ids == i].mean(0) for i in averaged.stim_ids])
    np.testing.assert_allclose(means, averaged.responses, atol=1e-5)


def test_single_trial_splits_keep_an_image_in_one_split(nsd):
    root, _ = nsd
    dm = NSDDataModule(str(root), roi_files=[], average_repeats=False, val_fraction=0.5, seed=1)
    dm.setup()
    ids = {s: set(dm.split_ids[s]) for s in ("train", "val", "test")}
    assert ids["test"] == {0, 1} and ids["train"] | ids["val"] == {3, 4}
    assert not ids["train"] & ids["val"] and not (ids["train"] | ids["val"]) & ids["test"]
    for split in ("train", "val", "test"):
        assert len(dm.split_ids[split]) == 3 * len(ids[split]) == len(dm.targets(split))  # every trial
        np.testing.assert_array_equal(dm.n_repeats(split), 1)
        info = dm.trial_info(split)
        rows = np.flatnonzero(dm.data.stim_ids == dm.split_ids[split][0])
        assert sorted(info["repeat"][dm.split_ids[split] == dm.split_ids[split][0]]) == [0, 1, 2] and len(rows) == 3
    np.testing.assert_array_equal(dm.targets("test"), dm.data.responses[len(dm.split_ids["train"]) + len(dm.split_ids["val"]):][:6])
    assert dm.describe()["n_rows"]["test"] == 6 and dm.describe()["n_images"]["test"] == 2


# --- test sets --------------------------------------------------------------------------------------


def rewrite_design(root):
    """4 images (1-based 73k ids 1, 2, 4, 5 for subject 1; 1, 2 shared), two 6-trial sessions; session 1
    shows image 1 three times and image 2 once."""
    master = np.array([1, 2, 1, 3, 1, 4, 2, 2, 3, 3, 4, 4], dtype=float)
    subjectim = np.array([[1, 2, 4, 5], [1, 2, 3, 6]], dtype=float)
    scipy.io.savemat(root / "nsddata/experiments/nsd/nsd_expdesign.mat",
                     {"masterordering": master[None], "subjectim": subjectim, "sharedix": np.array([[1, 2]], float)})


def brute_force_common(master, subjectim, shared, sessions, n_trials, at_least):
    keep = []
    for image in shared:
        seen = [sum(subjectim[s][m - 1] == image for m in master[:sessions[s] * n_trials]) for s in range(len(sessions))]
        keep.append(min(seen) >= at_least)
    return np.array(shared)[keep] - 1


@pytest.mark.parametrize("test_set,sessions,expected", [("shared907", [2, 1], [0, 1]), ("shared515", [2, 1], [0]),
                                                        ("shared515", None, [0, 1])])
def test_shared_test_sets_count_every_subject(nsd, test_set, sessions, expected):
    root, _ = nsd
    rewrite_design(root)
    master = [1, 2, 1, 3, 1, 4, 2, 2, 3, 3, 4, 4]
    subjectim = [[1, 2, 4, 5], [1, 2, 3, 6]]
    brute = brute_force_common(master, subjectim, [1, 2], sessions or [2, 2], 6, 1 if test_set == "shared907" else 3)
    np.testing.assert_array_equal(brute, expected)
    np.testing.assert_array_equal(common_shared_images(root, 1, test_set, 6, sessions), expected)
    dm = NSDDataModule(str(root), roi_files=[], test_set=test_set, sessions_per_subject=sessions, val_fraction=0.5)
    dm.setup()
    plain = NSDDataModule(str(root), roi_files=[], val_fraction=0.5)
    plain.setup()
    np.testing.assert_array_equal(dm.split_ids["test"], expected)
    np.testing.assert_array_equal(dm.split_ids["train"], plain.split_ids["train"])  # train: own images either way
    assert dm.describe()["test_set"] == test_set


def test_shared_test_set_needs_a_session_count_per_subject(nsd):
    root, _ = nsd
    with pytest.raises(DataError, match=r"subjectim has 2 subjects, but data.sessions_per_subject gives 3"):
        common_shared_images(root, 1, "shared515", 6, [2, 2, 2])


# --- bad input: one line naming the file, key or shape ----------------------------------------------


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("space,fmt,hemi,pattern", [
    ("func1pt8mm", "hdf5", None, r"betas_session02\.hdf5: cannot read as HDF5 \(.*truncated"),
    ("func1pt8mm", "nifti", None, r"betas_session02\.nii\.gz: cannot read (as NIfTI|the betas)"),
    ("nativesurface", None, "rh", r"rh\.betas_session02\.hdf5: cannot read as HDF5"),
    ("fsaverage", None, "rh", r"rh\.betas_session02\.mgh: file is truncated \(\d+ bytes, shape \(40, 1, 1, 6\)"),
])
def test_truncated_betas_are_named(nsd, space, fmt, hemi, pattern):
    root, _ = nsd
    write_space(root, 1, space, fmt)
    truncate(NSDPaths(root, 1, space, fmt).betas(2, hemi))
    with pytest.raises(DataError) as err:
        load_subject(root, 1, roi_files=[], space=space, beta_format=fmt)
    assert __import__("re").search(pattern, one_line(err)), str(err.value)


@pytest.mark.parametrize("space", ["func1pt8mm", "fsaverage"])
def test_corrupt_roi_file_is_named(nsd, space):
    root, _ = nsd
    write_space(root, 1, space)
    path = NSDPaths(root, 1, space).roi("floc-faces", "lh")
    path.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match=rf"{path.name}: cannot read as (NIfTI|MGH/MGZ)"):
        load_subject(root, 1, roi_files=["floc-faces"], space=space)


def test_corrupt_ncsnr_is_named(nsd):
    root, _ = nsd
    write_space(root, 1, "fsaverage")
    path = NSDPaths(root, 1, "fsaverage").ncsnr_files()[1]
    truncate(path)
    with pytest.raises(DataError, match=r"rh\.ncsnr\.mgh: cannot read"):
        load_subject(root, 1, roi_files=[], space="fsaverage")


def test_betas_with_a_trial_count_the_design_does_not_have(nsd):
    root, _ = nsd
    for s in (1, 2):
        path = NSDPaths(root, 1).betas(s)
        with h5py.File(path, "r+") as f:
            data = f["betas"][:5]
            del f["betas"]
            f["betas"] = data
    with pytest.raises(DataError) as err:
        load_subject(root, 1, roi_files=[])
    assert one_line(err).startswith(f"{NSDPaths(root, 1).betas(1)}: betas shape (5, 5, 4, 3) has 5 trials per "
                                    f"session, but the design (nsd_expdesign.mat, masterordering: 12 trials)")


def test_hemispheres_with_different_trial_counts(nsd):
    root, _ = nsd
    write_space(root, 1, "nativesurface")
    path = NSDPaths(root, 1, "nativesurface").betas(1, "rh")
    with h5py.File(path, "r+") as f:
        data = f["betas"][:4]
        del f["betas"]
        f["betas"] = data
    with pytest.raises(DataError, match=r"rh\.betas_session01\.hdf5: betas shape \(4, 40\) has 4 trials, but "
                                        r"lh\.betas_session01\.hdf5 has 6"):
        load_subject(root, 1, roi_files=[], space="nativesurface")


def test_roi_and_betas_of_different_shapes(nsd):
    root, _ = nsd
    write_space(root, 1, "func1mm")
    roi = NSDPaths(root, 1, "func1mm").roi("nsdgeneral")
    vol = np.array(nib.load(roi).dataobj)
    nib.save(nib.Nifti1Image(np.pad(vol, ((0, 1), (0, 0), (0, 0))), np.eye(4)), roi)
    with pytest.raises(DataError) as err:
        load_subject(root, 1, roi_files=[], space="func1mm")
    assert "volume (X, Y, Z) = (3, 4, 5), but" in one_line(err) and "nsdgeneral.nii.gz has (4, 4, 5)" in str(err.value)


def test_surface_roi_and_betas_with_different_vertex_counts(nsd):
    root, _ = nsd
    write_space(root, 1, "fsaverage")
    path = NSDPaths(root, 1, "fsaverage").betas(1, "lh")
    img = nib.load(path)
    nib.save(nib.MGHImage(np.array(img.dataobj, dtype=np.float32)[:-2], img.affine), path)
    with pytest.raises(DataError, match=r"lh\.betas_session01\.mgh: betas \(18, 1, 1, 6\) have 18 vertices, but .*"
                                        r"lh\.nsdgeneral\.mgz .* has 20 in this hemisphere"):
        load_subject(root, 1, roi_files=[], space="fsaverage")


def test_stimulus_ids_beyond_the_image_file(nsd):
    root, _ = nsd
    path = root / "nsddata/experiments/nsd/nsd_expdesign.mat"
    mat = scipy.io.loadmat(path)
    mat["subjectim"][0, 3] = 70  # 1-based id 70, the file holds 6 images
    scipy.io.savemat(path, {k: mat[k] for k in ("masterordering", "subjectim", "sharedix")})
    dm = NSDDataModule(str(root), roi_files=[])
    with pytest.raises(DataError) as err:
        dm.setup()
    assert "nsd_stimuli.hdf5: imgBrick has 6 images (ids 0..5), but the design (nsd_expdesign.mat) shows " \
           "stimulus id 69" in one_line(err)
    with pytest.raises(DataError, match=r"nsd_stimuli\.hdf5: stimulus id 6 out of range"):
        nsd_files.StimulusBrick(root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5").image(6)


def test_stimulus_ids_below_one_in_the_design(nsd):
    root, _ = nsd
    path = root / "nsddata/experiments/nsd/nsd_expdesign.mat"
    mat = scipy.io.loadmat(path)
    mat["sharedix"][0, 0] = 0
    scipy.io.savemat(path, {k: mat[k] for k in ("masterordering", "subjectim", "sharedix")})
    with pytest.raises(DataError, match=r"nsd_expdesign\.mat: 'sharedix' holds stimulus id 0; 73k ids are 1-based"):
        load_subject(root, 1, roi_files=[])


# --- memory-saving helpers against plain numpy ------------------------------------------------------


def test_drop_columns_permute_rows_and_fixed_averager_match_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(37, 11)).astype(np.float32)
    keep = rng.random(11) > 0.4
    expected = a[:, keep].copy()
    np.testing.assert_array_equal(drop_columns(a.copy(), keep, block_bytes=40), expected)
    np.testing.assert_array_equal(drop_columns(a[::2], keep), a[::2][:, keep])  # a view: plain copy
    order = rng.permutation(37)
    b = a.copy()
    permute_rows(b, order)
    np.testing.assert_array_equal(b, a[order])
    ids = rng.integers(0, 9, size=30)
    values = rng.normal(size=(30, 4)).astype(np.float32)
    fixed, growing = RepeatAverager(4, ids=np.arange(12)), RepeatAverager(4)
    for part in (slice(0, 13), slice(13, 30)):
        fixed.add(ids[part], values[part])
        growing.add(ids[part], values[part])
    for x, y in zip(fixed.result(), growing.result()):
        np.testing.assert_allclose(x, y, rtol=1e-6)


# --- end to end in fsaverage ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsaverage_root(synthetic_root, tmp_path_factory):
    return write_space(synthetic_root, 1, "fsaverage", dst=tmp_path_factory.mktemp("fsaverage_nsd"))


def test_fsaverage_serves_the_volume_data(synthetic_root, fsaverage_root):
    vol = NSDDataModule(str(synthetic_root), roi_files=["floc-faces"])
    surf = NSDDataModule(str(fsaverage_root), roi_files=["floc-faces"], space="fsaverage")
    vol.setup(), surf.setup()
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(vol.split_ids[split], surf.split_ids[split])
        np.testing.assert_allclose(vol.targets(split), surf.targets(split), atol=1e-4)
    shape = nib.load(synthetic_root / "nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz").shape
    np.testing.assert_array_equal(surf.data.voxel_xyz, voxel_to_vertex(vol.data.voxel_xyz, shape))
    np.testing.assert_array_equal(vol.rois["FFA-1"], surf.rois["FFA-1"])


def test_train_in_fsaverage_end_to_end(make_cfg, fsaverage_root, tmp_path):
    from train import train
    cfg = make_cfg(["experiment=demo", "trainer.max_epochs=8", "trainer.enable_progress_bar=false", "logger=none",
                    "data=nsd", f"data.root={fsaverage_root}", "data.space=fsaverage", "backbone=tiny",
                    "data.rois=[FFA-1,FFA-2,PPA,V1v]"])
    result = train(cfg, tmp_path / "run")
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    voxels = np.load(result.run_dir / "voxel_metrics.npz")
    n_vox = metrics["test"]["n_voxels"]
    assert voxels["voxel_xyz"].shape == (n_vox, 2) and set(np.unique(voxels["voxel_xyz"][:, 0])) <= {0, 1}
    assert set(metrics["test"]["rois"]) >= {"FFA-1", "PPA", "V1v"}
    assert sum(metrics["test"]["rois"][r]["n_voxels"] for r in ("FFA-1", "FFA-2", "PPA", "V1v")) == n_vox
    assert metrics["test"]["r_mean"] > 0.2
    info = json.loads((result.run_dir / "run.json").read_text())["data"]
    assert info["space"] == "fsaverage" and info["beta_format"] == "mgh" and info["rois"] == ["FFA-1", "FFA-2", "PPA", "V1v"]


def test_cli_unknown_roi_is_one_line_and_exit_2(fsaverage_root, tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "data=nsd", f"data.root={fsaverage_root}", "data.space=fsaverage",
                           "data.rois=[FFA-1,FFA-9]", "backbone=tiny", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: data.rois: no ROI named 'FFA-9'"), proc.stderr
    assert "FFA-1" in lines[0] and not (tmp_path / "run" / "metrics.json").exists()
