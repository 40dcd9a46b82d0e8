"""NSD reader: axis order, z-scoring, repeat averaging, splits, and one-line errors for bad input."""
import logging

import h5py
import numpy as np
import pytest
import scipy.io

from datamodules.errors import DataError
from datamodules.nsd import NSDDataModule, load_subject
from datamodules.preprocessing import RepeatAverager, split_train_val, zscore_trials
from tests.nsd_layout import write_minimal_nsd


@pytest.fixture
def nsd(tmp_path):
    truth = write_minimal_nsd(tmp_path)
    return tmp_path, truth


def expected_responses(truth, zscore=True):
    sums, counts = {}, {}
    for psc, stim in zip(truth["betas"], truth["stim"]):
        if zscore:
            psc = (psc - psc.mean(0)) / psc.std(0)
        for row, i in zip(psc, stim):
            sums[i] = sums.get(i, 0) + row
            counts[i] = counts.get(i, 0) + 1
    ids = sorted(sums)
    return np.array(ids), np.array([sums[i] / counts[i] for i in ids]), np.array([counts[i] for i in ids])


@pytest.mark.parametrize("zscore", [True, False])
def test_load_subject_reads_reversed_axes_zscores_and_averages(nsd, zscore):
    root, truth = nsd
    data = load_subject(root, 1, roi_files=["floc-faces"], zscore=zscore)
    ids, means, counts = expected_responses(truth, zscore)
    np.testing.assert_array_equal(data.stim_ids, ids)
    np.testing.assert_array_equal(data.n_repeats, counts)
    np.testing.assert_allclose(data.responses, means, atol=1e-5)
    np.testing.assert_array_equal(data.voxel_xyz, truth["xyz"])
    np.testing.assert_allclose(data.ncsnr, truth["ncsnr"])
    np.testing.assert_array_equal(data.rois["FFA-1"], truth["xyz"][:, 0] == 2)
    np.testing.assert_array_equal(data.shared_ids, [0, 1])


def test_dead_voxels_are_dropped_with_a_warning(nsd, caplog):
    root, truth = nsd
    path = root / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session02.hdf5"
    x, y, z = truth["xyz"][3]
    with h5py.File(path, "r+") as f:
        f["betas"][:, z, y, x] = 5
    with caplog.at_level(logging.WARNING):
        data = load_subject(root, 1, roi_files=[])
    assert data.n_dropped == 1 and data.responses.shape[1] == len(truth["xyz"]) - 1
    assert "dropped 1 of" in caplog.text
    assert not (data.voxel_xyz == truth["xyz"][3]).all(1).any()


def test_datamodule_splits_are_disjoint_and_test_is_shared(nsd):
    root, _ = nsd
    dm = NSDDataModule(str(root), subject=1, roi_files=["floc-faces"], val_fraction=0.5, seed=3)
    dm.setup()
    ids = dm.split_ids
    np.testing.assert_array_equal(ids["test"], [0, 1])
    assert set(ids["train"]) | set(ids["val"]) == {3, 4}
    assert not set(ids["train"]) & set(ids["val"])
    assert dm.targets("test").shape == (2, dm.n_voxels)
    np.testing.assert_array_equal(dm.n_repeats("test"), [3, 3])


def test_shuffled_targets_leave_test_untouched(nsd):
    root, _ = nsd
    plain = NSDDataModule(str(root), roi_files=[], val_fraction=0.5)
    shuffled = NSDDataModule(str(root), roi_files=[], val_fraction=0.5, shuffle_train_targets=True)
    plain.setup(), shuffled.setup()
    np.testing.assert_array_equal(plain.targets("test"), shuffled.targets("test"))
    a, b = plain.targets("train"), shuffled.targets("train")
    np.testing.assert_array_equal(np.sort(a, axis=0), np.sort(b, axis=0))  # same values per voxel


def test_shuffled_targets_permute_each_voxel_independently(synthetic_root):
    dm = NSDDataModule(str(synthetic_root), roi_files=[], shuffle_train_targets=True)
    dm.setup()
    plain = NSDDataModule(str(synthetic_root), roi_files=[])
    plain.setup()
    a, b = plain.targets("train"), dm.targets("train")
    order = [np.argsort(np.argsort(a[:, j])) for j in range(3)]
    moved = [np.argsort(np.argsort(b[:, j])) for j in range(3)]
    assert not np.array_equal(order[0], moved[0])
    assert not np.array_equal(moved[0] - order[0], moved[1] - order[1])


def test_preprocessing_helpers():
    rng = np.random.default_rng(0)
    betas = rng.normal(3, 2, size=(40, 5)).astype(np.float32)
    z = zscore_trials(betas)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-5)
    avg = RepeatAverager(2)
    avg.add(np.array([5, 2, 5]), np.array([[1.0, 2], [3, 4], [5, 6]]))
    avg.add(np.array([2, 9]), np.array([[1.0, 0], [7, 7]]))
    ids, means, counts = avg.result()
    np.testing.assert_array_equal(ids, [2, 5, 9])
    np.testing.assert_allclose(means, [[2, 2], [3, 4], [7, 7]])
    np.testing.assert_array_equal(counts, [2, 2, 1])
    train, val = split_train_val(np.arange(100), 0.2, seed=1)
    assert len(val) == 20 and not set(train) & set(val)
    assert np.array_equal(val, split_train_val(np.arange(100), 0.2, seed=1)[1])


# --- bad input: one clear line naming the file or key ------------------------------------------


def betas_path(root, session=1):
    return root / f"nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session{session:02d}.hdf5"


def test_missing_file_is_named(nsd):
    root, _ = nsd
    (root / "nsddata/experiments/nsd/nsd_expdesign.mat").unlink()
    with pytest.raises(DataError, match=r"nsd_expdesign\.mat: file not found"):
        load_subject(root, 1)


def test_wrong_dataset_key_is_named(nsd):
    root, _ = nsd
    path = betas_path(root)
    with h5py.File(path, "r+") as f:
        f.move("betas", "data")
    with pytest.raises(DataError, match=r"betas_session01\.hdf5: dataset 'betas' missing"):
        load_subject(root, 1, roi_files=[])


def test_missing_design_key_is_named(nsd):
    root, _ = nsd
    path = root / "nsddata/experiments/nsd/nsd_expdesign.mat"
    mat = scipy.io.loadmat(path)
    scipy.io.savemat(path, {"subjectim": mat["subjectim"], "sharedix": mat["sharedix"]})
    with pytest.raises(DataError, match=r"key 'masterordering' missing"):
        load_subject(root, 1)


def test_betas_longer_than_design_is_a_shape_error(nsd):
    root, _ = nsd
    for s in (1, 2):
        with h5py.File(betas_path(root, s), "r+") as f:
            data = f["betas"][:]
            del f["betas"]
            f["betas"] = np.concatenate([data, data])
    with pytest.raises(DataError, match=r"masterordering has 12 trials, but session 2 with 12 trials"):
        load_subject(root, 1, roi_files=[])


def test_sessions_with_different_trial_counts(nsd):
    root, _ = nsd
    with h5py.File(betas_path(root, 2), "r+") as f:
        data = f["betas"][:4]
        del f["betas"]
        f["betas"] = data
    with pytest.raises(DataError, match=r"betas_session02\.hdf5: 4 trials"):
        load_subject(root, 1, roi_files=[])


def test_subject_without_sessions(nsd):
    root, _ = nsd
    with pytest.raises(DataError, match=r"subj02"):
        load_subject(root, 2)


def test_requested_session_that_does_not_exist(nsd):
    root, _ = nsd
    with pytest.raises(DataError, match=r"betas_session07\.hdf5: session 7 not found"):
        load_subject(root, 1, sessions=[1, 7])


def test_corrupt_hdf5_is_named(nsd):
    root, _ = nsd
    betas_path(root).write_bytes(b"not an hdf5 file at all")
    with pytest.raises(DataError, match=r"betas_session01\.hdf5: cannot read as HDF5"):
        load_subject(root, 1, roi_files=[])


def test_all_voxels_dead(nsd):
    """A session that is constant (or NaN) at every selected voxel names its file, not the betas folder."""
    root, truth = nsd
    with h5py.File(betas_path(root, 2), "r+") as f:
        f["betas"][...] = 0
    n = len(truth["xyz"])
    with pytest.raises(DataError, match=rf"betas_session02\.hdf5: all {n} selected voxels \('nsdgeneral'\) are NaN "
                                        r"or constant over the session's trials"):
        load_subject(root, 1, roi_files=[])


def test_voxels_dead_in_different_sessions_name_those_sessions(nsd):
    """No session is dead as a whole, but together they leave no voxel: the message lists the sessions."""
    root, truth = nsd
    xyz = truth["xyz"]
    half = len(xyz) // 2
    for s, part in ((1, xyz[:half]), (2, xyz[half:])):
        with h5py.File(betas_path(root, s), "r+") as f:
            volume = f["betas"][...]
            volume[:, part[:, 2], part[:, 1], part[:, 0]] = 7
            f["betas"][...] = volume
    with pytest.raises(DataError, match=r"every voxel in 'nsdgeneral' is NaN or constant in one of the sessions "
                                        r"betas_session01\.hdf5, betas_session02\.hdf5"):
        load_subject(root, 1, roi_files=[])


def test_a_subset_of_sessions_recomputes_ncsnr_from_its_trials(tmp_path, synthetic_root, caplog):
    """NSD's ncsnr (from all sessions) does not describe a subset: it is recomputed from the selected trials —
    pooled within-image variance (ddof 1) of the session-z-scored betas against their total variance (NSD's
    formula) — and equals a plain per-image computation from the written betas, averaged or single-trial."""
    truth = write_minimal_nsd(tmp_path, n_sessions=3)
    chosen = [1, 3]
    z = {s + 1: (b - b.mean(0)) / b.std(0) for s, b in enumerate(truth["betas"])}
    trials = np.concatenate([z[s] for s in chosen])
    stims = np.concatenate([truth["stim"][s - 1] for s in chosen])
    ss, dof = 0.0, 0
    for i in np.unique(stims):
        rows = trials[stims == i]
        if len(rows) > 1:
            ss = ss + rows.var(axis=0, ddof=1) * (len(rows) - 1)
            dof += len(rows) - 1
    noise = ss / dof
    total = trials.var(axis=0)
    expected = np.sqrt(np.maximum(0, total - noise)) / np.sqrt(noise)
    with caplog.at_level(logging.INFO):
        averaged = load_subject(tmp_path, 1, sessions=chosen, roi_files=[])
        single = load_subject(tmp_path, 1, sessions=chosen, roi_files=[], average_repeats=False)
    np.testing.assert_allclose(averaged.ncsnr, expected, rtol=1e-4)
    np.testing.assert_allclose(single.ncsnr, expected, rtol=1e-4)
    assert not np.allclose(averaged.ncsnr, truth["ncsnr"], rtol=0.05)
    assert averaged.info["ncsnr"].startswith("recomputed from sessions [1, 3]")
    assert "ncsnr recomputed from the 8 trials of sessions [1, 3]" in caplog.text
    # Every session on disk, named or not: the shipped file.
    for sessions in (None, [1, 2, 3]):
        data = load_subject(tmp_path, 1, sessions=sessions, roi_files=[])
        np.testing.assert_allclose(data.ncsnr, truth["ncsnr"])
        assert data.info["ncsnr"].startswith("shipped")

    # On the synthetic dataset (ncsnr file = the planted SNR), 3 of 5 sessions recover the planted values.
    planted = load_subject(synthetic_root, 1, roi_files=[])
    subset = load_subject(synthetic_root, 1, sessions=[1, 2, 3], roi_files=[])
    real = planted.ncsnr < 100  # the noise-free extra voxels are reported as 1e3
    assert np.corrcoef(planted.ncsnr[real], subset.ncsnr[real])[0, 1] > 0.8
