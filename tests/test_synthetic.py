"""Tests of the synthetic NSD-layout generator (tiny sizes, each test fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io
from scipy import ndimage

from datamodules import synthetic as syn
from datamodules.synthetic_images import CATEGORIES, SKIN_TONES, draw_image

REPO = Path(__file__).resolve().parents[1]
# X, Y, Z all different so that a swapped axis order shows up in the shapes too.
TINY = dict(n_subjects=2, n_shared=12, n_unique=24, n_repeats=3, n_sessions=3, image_size=48,
            volume_shape=(10, 12, 11), seed=3)
T = (12 + 24) * 3 // 3
N_STIM = 12 + 2 * 24
ROI_FILES = list(syn.ROI_LABELS)


def extra_fn(images: np.ndarray) -> np.ndarray:
    """Two image statistics: mean red, mean of the top half. (n, H, W, 3) uint8 -> (n, 2)."""
    x = images.astype(np.float64)
    return np.stack([x[..., 0].mean((1, 2)), x[:, : x.shape[1] // 2].mean((1, 2, 3))], axis=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return syn.generate(tmp_path_factory.mktemp("synth") / "nsd", extra_signal_fn=extra_fn, **TINY)


@pytest.fixture(scope="module")
def design(data):
    return scipy.io.loadmat(syn.expdesign_path(data))


def roi(data: Path, s: int, name: str) -> np.ndarray:
    return np.asarray(nib.load(syn.roi_path(data, s, name)).dataobj)


def gt_subject(data: Path, s: int) -> dict:
    with h5py.File(syn.ground_truth_path(data), "r") as f:
        return {k: v[()] for k, v in f[syn.subject_name(s)].items()}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "datamodules.synthetic", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def tiny_cli_args(out: Path, seed: int = 3) -> list[str]:
    return ["--out", str(out), "--n-subjects", "1", "--n-shared", "6", "--n-unique", "12", "--n-repeats", "2",
            "--n-sessions", "2", "--image-size", "32", "--volume", "10", "12", "11", "--seed", str(seed)]


# --------------------------------------------------------------------------- layout
def test_stimuli_file(data):
    with h5py.File(data / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5", "r") as f:
        d = f["imgBrick"]
        assert d.shape == (N_STIM, 48, 48, 3) and d.dtype == np.uint8
        assert d.chunks == (1, 48, 48, 3) and d.compression == "gzip"
        assert d[0].std() > 0


def test_expdesign_file(data, design):
    assert (data / "nsddata/experiments/nsd/nsd_expdesign.mat").is_file()
    assert design["masterordering"].shape == (1, 3 * T) and design["masterordering"].dtype == np.float64
    assert design["subjectim"].shape == (2, 36) and design["subjectim"].dtype == np.float64
    assert design["sharedix"].shape == (1, 12) and design["sharedix"].dtype == np.float64


@pytest.mark.parametrize("s", [1, 2])
def test_roi_and_ctab_files(data, s):
    for name, labels in syn.ROI_LABELS.items():
        img = nib.load(data / f"nsddata/ppdata/subj{s:02d}/func1pt8mm/roi/{name}.nii.gz")
        assert img.shape == (10, 12, 11) and img.get_data_dtype() == np.int16
        np.testing.assert_allclose(img.affine, np.diag([1.8, 1.8, 1.8, 1.0]))
        vol = np.asarray(img.dataobj)
        assert set(np.unique(vol)) <= set(range(-1, len(labels) + 1))
        ctab = (data / f"nsddata/freesurfer/subj{s:02d}/label/{name}.mgz.ctab").read_text().splitlines()
        assert ctab[0] == "  0 Unknown"
        assert ctab[1:] == [f"  {k} {n}" for k, n in enumerate(labels, start=1)]
    assert "  1 nsdgeneral" in (data / f"nsddata/freesurfer/subj{s:02d}/label/nsdgeneral.mgz.ctab").read_text()


@pytest.mark.parametrize("s", [1, 2])
def test_betas_and_ncsnr_files(data, s):
    folder = data / f"nsddata_betas/ppdata/subj{s:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    for n in range(1, 4):
        with h5py.File(folder / f"betas_session{n:02d}.hdf5", "r") as f:
            assert f["betas"].shape == (T, 11, 12, 10) and f["betas"].dtype == np.int16
    img = nib.load(folder / "ncsnr.nii.gz")
    assert img.shape == (10, 12, 11) and img.get_data_dtype() == np.float32
    assert not (folder / "betas_session04.hdf5").exists()


def test_ground_truth_file(data):
    with h5py.File(data / "ground_truth.h5", "r") as f:
        assert [c.decode() for c in f["categories"][()]] == list(CATEGORIES)
        assert f["image_category"].shape == (N_STIM,)
        assert f.attrs["trials_per_session"] == T and f.attrs["beta_scale"] == 300
        assert f.attrs["seed"] == 3 and tuple(f.attrs["volume_shape"]) == (10, 12, 11)
        for s in (1, 2):
            g = f[f"subj{s:02d}"]
            n_vox = int((roi(data, s, "nsdgeneral") == 1).sum())
            assert g["voxel_xyz"].shape == (n_vox, 3)
            assert g["signal"].shape == (N_STIM, n_vox) and g["signal"].dtype == np.float32
            for k in ("noise_sd", "ncsnr", "preferred_category", "dead", "extra"):
                assert g[k].shape == (n_vox,), k
            assert g["dead"].dtype == bool and g["extra"].dtype == bool
    meta = json.loads((data / "synthetic.json").read_text())
    assert meta["n_shared"] == 12 and meta["volume_shape"] == [10, 12, 11]


# --------------------------------------------------------------------------- anatomy
@pytest.mark.parametrize("s", [1, 2])
def test_roi_geometry(data, s):
    nsd = roi(data, s, "nsdgeneral")
    brain = nsd >= 0
    assert 0.3 <= (nsd == 1).sum() / brain.sum() <= 0.4
    gt = gt_subject(data, s)
    np.testing.assert_array_equal(gt["voxel_xyz"], np.argwhere(nsd == 1))
    taken = np.zeros(nsd.shape, bool)
    for name in ROI_FILES[1:]:
        vol = roi(data, s, name)
        np.testing.assert_array_equal(vol >= 0, brain)
        assert not (taken & (vol > 0)).any(), f"{name} overlaps an earlier ROI"
        assert (nsd[vol > 0] == 1).all(), f"{name} leaves nsdgeneral"
        taken |= vol > 0
        for k in np.unique(vol[vol > 0]):
            assert ndimage.label(vol == k)[1] == 1, f"{name} label {k} is not contiguous"


@pytest.mark.parametrize("seed", [0, 1])
def test_default_volume_plants_required_rois(seed):
    rng = np.random.default_rng(seed)
    brain = syn.make_brain_mask(rng, (18, 22, 18))
    vols = syn.place_rois(rng, brain, syn.make_nsdgeneral(rng, brain))
    required = {"prf-visualrois": syn.ROI_LABELS["prf-visualrois"]}
    for name in ROI_FILES[2:]:
        required[name] = [n for n in syn.ROI_LABELS[name] if n in syn.REQUIRED_FLOC]
    for name, labels in required.items():
        for label in labels:
            k = syn.ROI_LABELS[name].index(label) + 1
            assert (vols[name] == k).sum() >= 10, (name, label)


# --------------------------------------------------------------------------- design
def test_design_consistency(design):
    mo, sim, shared = design["masterordering"], design["subjectim"], design["sharedix"]
    counts = np.bincount(mo[0].astype(int), minlength=37)[1:]
    assert (counts == 3).all()
    np.testing.assert_array_equal(sim[0, :12], sim[1, :12])
    np.testing.assert_array_equal(shared[0], sim[0, :12])
    assert len(np.intersect1d(sim[0, 12:], sim[1, 12:])) == 0
    assert sorted(np.concatenate([shared[0], sim[0, 12:], sim[1, 12:]])) == list(range(1, N_STIM + 1))


def test_trial_stimuli_follows_spec_formula(design):
    mo, sim = design["masterordering"], design["subjectim"]
    got = syn.trial_stimuli(mo, sim, subject=2, session=3, n_sessions=3)
    want = [int(sim[1, int(mo[0, 2 * T + t]) - 1]) - 1 for t in range(T)]
    assert got.tolist() == want


def test_indivisible_trials_rejected(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        syn.generate(tmp_path / "x", **{**TINY, "n_sessions": 5})
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- planted signals
@pytest.mark.parametrize("s", [1, 2])
def test_axis_reversal_on_noise_free_extra_voxels(data, design, s):
    gt = gt_subject(data, s)
    extra = np.flatnonzero(gt["extra"])
    assert len(extra) == 2
    assert (gt["noise_sd"][extra] == 0).all() and (gt["ncsnr"][extra] >= 100).all()
    for n in range(1, 4):
        stim = syn.trial_stimuli(design["masterordering"], design["subjectim"], s, n, 3)
        with h5py.File(syn.betas_path(data, s, n), "r") as f:
            betas = f["betas"][()]
        for v in extra:
            x, y, z = gt["voxel_xyz"][v]
            want = np.rint(gt["signal"][stim, v].astype(np.float64) * 300)
            np.testing.assert_allclose(betas[:, z, y, x], want, atol=1)


def test_extra_signals_are_standardised_fn_outputs(data):
    with h5py.File(syn.stimuli_path(data), "r") as f:
        ref = extra_fn(f["imgBrick"][()])
    ref = (ref - ref.mean(0)) / ref.std(0)
    gt = gt_subject(data, 1)
    np.testing.assert_allclose(gt["signal"][:, gt["extra"]], ref, atol=1e-5)


@pytest.mark.parametrize("s", [1, 2])
def test_dead_voxels(data, s):
    gt = gt_subject(data, s)
    dead = np.flatnonzero(gt["dead"])
    assert len(dead) == 5 and (gt["ncsnr"][dead] == 0).all()
    x, y, z = gt["voxel_xyz"][dead].T
    for name in ROI_FILES[1:]:
        assert (roi(data, s, name)[x, y, z] == 0).all()
    for n in range(1, 4):
        with h5py.File(syn.betas_path(data, s, n), "r") as f:
            assert (f["betas"][()][:, z, y, x] == 0).all()


@pytest.mark.parametrize("s", [1, 2])
def test_signals_standardised_and_selective(data, s):
    gt = gt_subject(data, s)
    live = ~gt["dead"]
    sig = gt["signal"][:, live].astype(np.float64)
    np.testing.assert_allclose(sig.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(sig.std(0), 1, atol=1e-3)
    with h5py.File(syn.ground_truth_path(data), "r") as f:
        cats = f["image_category"][()]
    for c in range(len(CATEGORIES)):
        vox = np.flatnonzero(gt["preferred_category"] == c)
        for v in vox:
            means = [gt["signal"][cats == k, v].mean() for k in range(len(CATEGORIES))]
            assert int(np.argmax(means)) == c
    floc = roi(data, s, "floc-faces")[tuple(gt["voxel_xyz"].T)] > 0
    assert (gt["preferred_category"][floc] == CATEGORIES.index("face")).all() and floc.any()


@pytest.mark.parametrize("s", [1, 2])
def test_ncsnr_file_and_empirical_snr(data, design, s):
    gt = gt_subject(data, s)
    x, y, z = gt["voxel_xyz"].T
    ncsnr_vol = np.asarray(nib.load(syn.betas_dir(data, s) / "ncsnr.nii.gz").dataobj)
    np.testing.assert_allclose(ncsnr_vol[x, y, z], gt["ncsnr"], rtol=1e-6)
    assert (ncsnr_vol[roi(data, s, "nsdgeneral") != 1] == 0).all()
    # empirical ncsnr from repeats, after removing each session's mean (the session offsets)
    betas, stim = [], []
    for n in range(1, 4):
        with h5py.File(syn.betas_path(data, s, n), "r") as f:
            b = f["betas"][()][:, z, y, x] / 300.0
        betas.append(b - b.mean(0))
        stim.append(syn.trial_stimuli(design["masterordering"], design["subjectim"], s, n, 3))
    betas, stim = np.concatenate(betas), np.concatenate(stim)
    reps = np.stack([betas[stim == i] for i in np.unique(stim)])  # (n_img, 3, n_vox)
    noise_var = reps.var(1, ddof=1).mean(0)
    signal_var = np.maximum(reps.mean(1).var(0) - noise_var / 3, 0)
    ok = ~gt["dead"] & ~gt["extra"]
    emp = np.sqrt(signal_var[ok] / noise_var[ok])
    planted = gt["ncsnr"][ok]
    np.testing.assert_allclose(gt["noise_sd"][ok], 1 / planted, rtol=1e-5)
    assert np.corrcoef(emp, planted)[0, 1] > 0.5
    assert 0.6 < np.median(emp / planted) < 1.5


# --------------------------------------------------------------------------- images
def test_same_seed_identical_and_other_seed_differs(tmp_path):
    small = {**TINY, "n_subjects": 1, "image_size": 32}
    a = syn.generate(tmp_path / "a", **small)
    b = syn.generate(tmp_path / "b", **small)
    c = syn.generate(tmp_path / "c", **{**small, "seed": 4})
    for n in range(1, 4):
        with h5py.File(syn.betas_path(a, 1, n)) as fa, h5py.File(syn.betas_path(b, 1, n)) as fb, \
                h5py.File(syn.betas_path(c, 1, n)) as fc:
            np.testing.assert_array_equal(fa["betas"][()], fb["betas"][()])
            assert not np.array_equal(fa["betas"][()], fc["betas"][()])
    with h5py.File(syn.stimuli_path(a)) as fa, h5py.File(syn.stimuli_path(b)) as fb:
        np.testing.assert_array_equal(fa["imgBrick"][()], fb["imgBrick"][()])
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs between runs with the same seed"


def _image_stats(img: np.ndarray) -> np.ndarray:
    """Low-level statistics: channel means on a 3x3 grid, luminance sd, edge energy."""
    x = img.astype(np.float64) / 255
    g = x.mean(-1)
    grid = [x[i::3, j::3].mean((0, 1)) for i in range(3) for j in range(3)]
    edges = np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean()
    return np.concatenate(grid + [[g.std(), edges]])


def _cues(img: np.ndarray) -> dict[str, float]:
    """Category cues: paper (bright, unsaturated), blue sky on top, skin-toned and white (plate) pixels."""
    x = img.astype(np.float64) / 255
    mx = x.max(-1)
    sat = (mx - x.min(-1)) / np.maximum(mx, 1e-3)
    top = x[: len(x) // 3]
    skin = np.linalg.norm(img[..., None, :].astype(float) - SKIN_TONES, axis=-1).min(-1) < 30
    return {"word": x.mean() - sat.mean(), "place": (top[..., 2] - top[..., 0]).mean(),
            "face": skin.mean(), "food": ((sat < 0.12) & (mx > 0.75)).mean()}


def test_categories_visibly_differ():
    rng = np.random.default_rng(0)
    images = {c: [draw_image(c, rng, 64) for _ in range(30)] for c in CATEGORIES}
    feats = {c: np.stack([_image_stats(im) for im in ims]) for c, ims in images.items()}
    for c, f in feats.items():
        assert f.std(0).mean() > 0.01, f"{c} images are all alike"
    # each category's hallmark is strongest in that category
    cues = {c: {k: np.mean([_cues(im)[k] for im in ims]) for k in ("word", "place", "face", "food")}
            for c, ims in images.items()}
    for k in ("word", "place", "face", "food"):
        rivals = [c for c in CATEGORIES if c not in (k, "word" if k == "food" else k)]  # paper is white too
        assert all(cues[k][k] > cues[c][k] for c in rivals), (k, cues)
    # nearest-centroid on standardised statistics (train on half, test on the other) beats chance (1/6) clearly
    allf = np.concatenate(list(feats.values()))
    feats = {c: (f - allf.mean(0)) / allf.std(0) for c, f in feats.items()}
    cent = {c: f[::2].mean(0) for c, f in feats.items()}
    hits = [min(cent, key=lambda k: np.linalg.norm(x - cent[k])) == c for c, f in feats.items() for x in f[1::2]]
    assert np.mean(hits) > 1 / 3


@pytest.mark.parametrize("size", [32, 425])
def test_draw_image_shape(size):
    for c in CATEGORIES:
        img = draw_image(c, np.random.default_rng(1), size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8


# --------------------------------------------------------------------------- atomic / CLI
def test_cli_generate_refuse_reuse_force(tmp_path):
    out = tmp_path / "cli"
    r = run_cli(*tiny_cli_args(out))
    assert r.returncode == 0, r.stderr
    assert "images" in r.stdout and (out / "synthetic.json").is_file()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    r = run_cli(*tiny_cli_args(out))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0]

    r = run_cli(*tiny_cli_args(out), "--if-missing")
    assert r.returncode == 0 and "using existing" in r.stdout

    r = run_cli(*tiny_cli_args(out, seed=9), "--if-missing")
    assert r.returncode == 2 and "seed" in r.stderr and str(out) in r.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    r = run_cli(*tiny_cli_args(out, seed=9), "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]


def test_cli_if_missing_generates(tmp_path):
    r = run_cli(*tiny_cli_args(tmp_path / "new"), "--if-missing")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "new" / "synthetic.json").is_file()


def test_ensure_synthetic(tmp_path):
    small = {**TINY, "n_subjects": 1, "image_size": 32}
    out = syn.ensure_synthetic(tmp_path / "e", **small)
    stamp = (out / "synthetic.json").stat().st_mtime_ns
    assert syn.ensure_synthetic(out, **small) == out
    assert (out / "synthetic.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="n_unique") as e:
        syn.ensure_synthetic(out, **{**small, "n_unique": 30})
    assert str(out) in str(e.value)


def test_generate_refuses_nonempty_dir(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="busy"):
        syn.generate(out, **TINY)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_generation_leaves_nothing(tmp_path):
    def boom(images):
        raise RuntimeError("boom")

    stale = tmp_path / "d.tmp-999999999"  # left over by a killed generation (no such pid)
    stale.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        syn.generate(tmp_path / "d", extra_signal_fn=boom, **{**TINY, "n_subjects": 1, "image_size": 32})
    assert list(tmp_path.iterdir()) == []


def test_generate_into_empty_dir_and_force(tmp_path):
    small = {**TINY, "n_subjects": 1, "image_size": 32}
    out = tmp_path / "empty"
    out.mkdir()
    syn.generate(out, **small)
    assert (out / "synthetic.json").is_file()
    syn.generate(out, force=True, **{**small, "seed": 5})
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 5
    assert sorted(os.listdir(tmp_path)) == ["empty"]
