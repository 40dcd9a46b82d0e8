"""Video fMRI (Wen et al. 2018 layout): mp4 and CIFTI-2 files, run preprocessing, features per TR,
the datamodule, the synthetic generator, bad input, and train.py end to end."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr, zscore
from sklearn.decomposition import PCA

from datamodules.errors import DataError
from datamodules.fmri_runs import (RepeatMoments, detrend_polynomial, ncsnr_from_noise_variance, ncsnr_from_repeats,
                                   zscore_time)
from datamodules.hrf import hrf_kernel
from datamodules.synthetic_video import ensure_synthetic_video, generate_video, ground_truth_path, meta_path
from datamodules.video import VideoDataModule
from datamodules.video_features import FeatureReducer
from datamodules.video_files import (VideoPaths, iter_frames, probe_video, read_cortex_series, write_dtseries,
                                     write_mp4)
from tests.conftest import REPO

# A tiny dataset: 3 training segments (2 repeats), 2 test segments (4 repeats), 20 kept volumes of 2 s, 5 fps.
# As released, the runs of the training movies and test1 have 20 + 5 volumes (245 for 240), test2's 20 + 6 (246).
GEN = dict(n_train_segments=3, n_test_segments=2, train_repeats=2, test_repeats=4, n_volumes=20, tr=2.0, fps=5.0,
           frame_size=48, n_cortex=60, n_subcortical=6, n_dead=2, seed=0)
DM = dict(train_segments=3, test_segments=2, train_repeats=2, test_repeats=4, n_volumes=20, tr=2.0, fps=5.0,
          n_cortex=60, frame_stride=2, val_segments=1)
DATA_OVERRIDES = [f"data.{k}={v}" for k, v in DM.items()]


def half_luminance(frames: np.ndarray) -> np.ndarray:
    """The planted regressors of the fixture's 2 noise-free "extra" vertices: the mean of the left and of
    the right half of each frame, uint8 (n, H, W, 3) -> (n, 2)."""
    half = frames.shape[2] // 2
    return np.stack([frames[:, :, :half].mean(axis=(1, 2, 3)), frames[:, :, half:].mean(axis=(1, 2, 3))], axis=1)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    return ensure_synthetic_video(tmp_path_factory.mktemp("video") / "wen", extra_signal_fn=half_luminance, **GEN)


@pytest.fixture(scope="module")
def dm(video_root) -> VideoDataModule:
    module = VideoDataModule(str(video_root), **DM)
    module.setup()
    return module


def copy_of(root: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(root, out)
    return out


# --------------------------------------------------------------------------- file formats
def test_mp4_written_and_decoded_with_pyav(tmp_path):
    levels = (np.arange(25) * 10).astype(np.uint8)
    frames = [np.broadcast_to(np.array([v, 255 - v, 128], np.uint8), (32, 48, 3)).copy() for v in levels]
    path = tmp_path / "clip.mp4"
    assert write_mp4(path, frames, fps=30) == 25
    info = probe_video(path)
    assert (info.n_frames, info.fps, info.width, info.height) == (25, 30.0, 48, 32)
    got = list(iter_frames(path, [20, 3, 7]))
    assert [i for i, _ in got] == [3, 7, 20]
    for i, frame in got:
        assert frame.shape == (32, 48, 3) and frame.dtype == np.uint8
        np.testing.assert_allclose(frame.reshape(-1, 3).mean(0), [levels[i], 255 - levels[i], 128], atol=4)
    assert len(list(iter_frames(path))) == 25
    with pytest.raises(DataError, match="the video has 25 frames; frame 30"):
        list(iter_frames(path, [2, 30]))


def test_dtseries_written_and_read_as_cifti2(tmp_path):
    rng = np.random.default_rng(0)
    mask = np.zeros((3, 3, 3), bool)
    mask[1, :, 1] = True
    data = rng.normal(size=(12, 5 + 4 + 3)).astype(np.float32)
    path = tmp_path / "run_Atlas.dtseries.nii"
    write_dtseries(path, data, 2.0, [("CortexLeft", [0, 2, 3, 5, 6], 8), ("CortexRight", [1, 2, 4, 7], 9)], mask)
    img = nib.load(path)  # nibabel's own view of the file
    assert isinstance(img, nib.Cifti2Image) and img.nifti_header.get_intent()[0] == "ConnDenseSeries"
    assert img.header.get_axis(0).step == 2.0
    cortex, grays = read_cortex_series(path, n_cortex=9, n_volumes=10, timing="first")
    np.testing.assert_array_equal(cortex, img.get_fdata()[:10, :9].astype(np.float32))
    assert list(grays.vertex) == [0, 2, 3, 5, 6, 1, 2, 4, 7]
    assert list(grays.structure[[0, 5]]) == ["CIFTI_STRUCTURE_CORTEX_LEFT", "CIFTI_STRUCTURE_CORTEX_RIGHT"]
    # released timing: a run of n + 5 volumes loses its first 1 and last 4, one of n + 6 its first 2 and last 4
    for n_volumes, first in ((7, 1), (6, 2)):
        cortex, _ = read_cortex_series(path, n_cortex=9, n_volumes=n_volumes)
        np.testing.assert_array_equal(cortex, img.get_fdata()[first:12 - 4, :9].astype(np.float32))
    for n_volumes in (8, 5):  # 0 or 3 lead volumes: not a released run
        with pytest.raises(DataError, match=rf"12 volumes; the released timing \(data.timing=released\) expects "
                                            rf"{n_volumes + 5} or {n_volumes + 6}"):
            read_cortex_series(path, n_cortex=9, n_volumes=n_volumes)
    with pytest.raises(DataError, match=r"9 cortical \(surface\) grayordinates of 12, expected data.n_cortex=59412"):
        read_cortex_series(path, n_cortex=59412, n_volumes=10)
    with pytest.raises(DataError, match="12 volumes, fewer than data.n_volumes=13"):
        read_cortex_series(path, n_cortex=9, n_volumes=13, timing="first")


# --------------------------------------------------------------------------- preprocessing
def test_run_preprocessing_matches_numpy_and_scipy():
    rng = np.random.default_rng(2)
    t = np.arange(60.0)
    x = rng.normal(size=(60, 4)) + 1e-3 * t[:, None] ** 3 - 0.05 * t[:, None] ** 2 + 100
    detrended = detrend_polynomial(x, order=4)
    for j in range(4):
        fit = np.polyval(np.polyfit(t, x[:, j], 4), t)
        np.testing.assert_allclose(detrended[:, j], x[:, j] - fit, atol=1e-8)
    np.testing.assert_allclose(zscore_time(x), zscore(x, axis=0), atol=1e-5)
    assert np.all(zscore_time(np.ones((5, 2))) == 0)
    runs = rng.normal(size=(7, 30, 5))
    moments = RepeatMoments()
    for run in runs:
        moments.add(run)
    np.testing.assert_allclose(moments.mean(), runs.mean(0), atol=1e-6)
    np.testing.assert_allclose(moments.variance(), runs.var(0, ddof=1), atol=1e-12)
    sigma2 = runs.var(0, ddof=1).mean(0)
    expected = np.sqrt(np.clip(1 - sigma2, 0, None)) / np.sqrt(sigma2)  # NSD's ncsnr formula
    np.testing.assert_allclose(ncsnr_from_repeats(runs), expected)
    np.testing.assert_allclose(ncsnr_from_noise_variance(moments.noise_variance()), expected)


def test_ncsnr_recovers_a_planted_snr():
    rng = np.random.default_rng(3)
    snr = np.array([0.25, 0.5, 1.0, 2.0, 4.0])
    signal = rng.normal(size=(2000, 5))
    runs = np.stack([zscore_time(signal + rng.normal(size=signal.shape) / snr) for _ in range(10)])
    np.testing.assert_allclose(ncsnr_from_repeats(runs), snr, rtol=0.1)


def test_feature_reducer_fits_on_training_frames_only_and_matches_sklearn():
    """The plain z-score and PCAs against scikit-learn (the robust floor and clip, the default, are
    tests/test_feature_transform.py's)."""
    rng = np.random.default_rng(4)
    latent = rng.normal(size=(300, 3))
    train = np.concatenate([latent @ rng.normal(size=(3, 10)), latent @ rng.normal(size=(3, 6))], 1) * 5 + 3
    train += 0.01 * rng.normal(size=train.shape)
    other = rng.normal(size=(40, 16)) * 100
    slices = {"a": slice(0, 10), "b": slice(10, 16)}
    reducer = FeatureReducer(slices, variance=0.99, std_floor=None, clip=False).fit(train)
    np.testing.assert_allclose(reducer.mean_, train.mean(0))
    np.testing.assert_allclose(reducer.std_, train.std(0))
    z = (train - train.mean(0)) / train.std(0)
    pa = PCA(0.99, svd_solver="full").fit(z[:, :10])
    pb = PCA(0.99, svd_solver="full").fit(z[:, 10:])
    joint = np.concatenate([pa.transform(z[:, :10]), pb.transform(z[:, 10:])], 1)
    pj = PCA(0.99, svd_solver="full").fit(joint)
    assert reducer.describe()["pca_components"] == {"a": pa.n_components_, "b": pb.n_components_} == {"a": 3, "b": 3}
    assert reducer.n_components_ == pj.n_components_ == 3
    zo = (other - train.mean(0)) / train.std(0)
    expected = pj.transform(np.concatenate([pa.transform(zo[:, :10]), pb.transform(zo[:, 10:])], 1))
    np.testing.assert_allclose(reducer.transform(other), expected, atol=1e-8)
    np.testing.assert_allclose(FeatureReducer(slices, std_floor=None, clip=False).fit(train).transform(other), zo)
    # the robust default: nothing floored here, the held-out frames (100x the training scale) clipped to the
    # training range, the training frames unchanged
    robust = FeatureReducer(slices).fit(train)
    np.testing.assert_allclose(robust.std_, train.std(0))
    np.testing.assert_allclose(robust.transform(other), np.clip(zo, z.min(0), z.max(0)))
    np.testing.assert_allclose(robust.transform(train), z)


# --------------------------------------------------------------------------- generator
def test_generator_layout_ground_truth_and_reuse(video_root, tmp_path):
    paths = VideoPaths(video_root, 1)
    meta = json.loads(meta_path(video_root).read_text())
    assert meta["stimuli"] == ["seg1", "seg2", "seg3", "test1", "test2"]
    for stim, repeats, n_time in (("seg1", 2, 25), ("seg3", 2, 25), ("test1", 4, 25), ("test2", 4, 26)):
        assert all(paths.cifti(stim, r).is_file() for r in range(1, repeats + 1))
        assert not paths.cifti(stim, repeats + 1).exists()
        assert nib.load(paths.cifti(stim, repeats)).shape == (n_time, 66)  # as released: 245 / 246 for 240
        info = probe_video(paths.video(stim))
        assert (info.n_frames, info.fps, info.width) == (200, 5.0, 48)
    img = nib.load(paths.cifti("seg1", 1))
    models = img.header.get_axis(1)
    assert models.surface_mask[:60].all() and not models.surface_mask[60:].any()
    with h5py.File(ground_truth_path(video_root)) as f:
        kind = f["subject1/kind"][:].astype(str)
        assert (kind == "dead").sum() == 2 and f["subject1/signal/test1"].shape == (20, 60)
        assert f["frame_category/seg1"].shape == (200,)
        # the runs are baseline-scaled signal + noise + drift: the kept volumes correlate with the planted signal
        signal = f["subject1/signal/seg1"][:]
    run = np.asarray(img.dataobj)[1:21, :60]
    live = kind != "dead"
    clean, planted = detrend_polynomial(run[:, live], 4), detrend_polynomial(signal[:, live], 4)
    r = [np.corrcoef(clean[:, j], planted[:, j])[0, 1] for j in range(live.sum())]
    assert np.median(r) > 0.4, np.median(r)
    assert np.ptp(run[:, ~live], axis=0).max() == 0
    assert ensure_synthetic_video(video_root, extra_signal_fn=half_luminance, **GEN) == video_root  # reused
    with pytest.raises(ValueError, match="n_volumes: 20 != 21"):
        ensure_synthetic_video(video_root, extra_signal_fn=half_luminance, **{**GEN, "n_volumes": 21})
    with pytest.raises(FileExistsError):
        generate_video(video_root, **GEN)


# --------------------------------------------------------------------------- datamodule
def independent_runs(root: Path, stim: str, repeats: int) -> np.ndarray:
    """(repeats, 20, 60): nibabel read, the released code's trim, numpy polyfit detrend, scipy zscore.

    The released code (MATLAB, 1-based, volumes as columns): ``if size(cii.cdata, 2) == 245, st = 2; else
    st = 3; end; data = cii.cdata(1:59412, st:end-4)``: 245 volumes lose the first and the last 4, 246 the
    first two and the last 4. Here 20 kept volumes stand for 240: 25 and 26 for 245 and 246."""
    t = np.arange(20.0)
    out = []
    for r in range(1, repeats + 1):
        cdata = nib.load(VideoPaths(root, 1).cifti(stim, r)).get_fdata().T  # (grayordinates, volumes) as in MATLAB
        st = 2 if cdata.shape[1] == 25 else 3
        x = cdata[:60, st - 1:cdata.shape[1] - 4].T  # MATLAB's st:end-4, inclusive and 1-based
        assert x.shape == (20, 60)
        fit = np.stack([np.polyval(np.polyfit(t, x[:, j], 4), t) for j in range(60)], 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(zscore(x - fit, axis=0))
    return np.stack(out)


def test_datamodule_matches_an_independent_pipeline(video_root, dm):
    with h5py.File(ground_truth_path(video_root)) as f:
        kind = f["subject1/kind"][:].astype(str)
        snr = f["subject1/snr"][:]
    keep = kind != "dead"
    assert dm.n_voxels == 58 and dm.data.n_dropped == 2
    np.testing.assert_array_equal(dm.data.voxel_xyz[:, 0], np.flatnonzero(keep))
    assert dm.rois["cortex_left"].sum() + dm.rois["cortex_right"].sum() == 58
    # test1's runs have 25 volumes (245 as released), test2's 26 (246): each trimmed by its own length
    test_runs = np.concatenate([independent_runs(video_root, s, 4)[:, :, keep] for s in ("test1", "test2")], axis=1)
    np.testing.assert_allclose(dm.targets("test"), test_runs.mean(0), atol=2e-5)
    np.testing.assert_allclose(dm.ncsnr(), ncsnr_from_repeats(test_runs), rtol=1e-4)
    assert spearmanr(dm.ncsnr(), snr[keep]).statistic > 0.5
    assert dm.describe()["timing"] == "released"
    # whole segments per split, contiguous TRs inside each, ids unique across splits
    assert sorted(sum(dm.split_stimuli.values(), [])) == ["seg1", "seg2", "seg3", "test1", "test2"]
    assert dm.split_stimuli["test"] == ["test1", "test2"] and len(dm.split_stimuli["val"]) == 1
    ids = {s: set(dm.split_ids[s].tolist()) for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert np.all(np.diff(dm.split_ids["val"]) == 1) and dm.split_ids["test"].tolist() == list(range(60, 100))
    assert dm.targets("train").shape == (40, 58) and set(dm.n_repeats("train")) == {2}
    assert set(dm.n_repeats("test")) == {4}


class FakeBackbone:
    """Stands in for a FrozenBackbone: a transform and two layers' column slices."""

    feature_slices = {"first": slice(0, 3), "second": slice(3, 5)}

    @staticmethod
    def transform(frame):
        return torch.from_numpy(frame.astype(np.float32).mean(axis=(0, 1)))


def test_prepare_features_fit_only_on_training_segments(video_root):
    """Features per TR: decoded frames through extract, z-scored with train frames only, HRF, released timing."""
    module = VideoDataModule(str(video_root), **{**DM, "pca_variance": 0.999})
    module.setup()
    seen: dict[str, list] = {}

    def extract(ids, source, make_loader, boost=None):
        batches = list(make_loader(ids))
        seen.setdefault(Path(source["file"]).stem, []).extend(int(i) for b in batches for i in b["id"])
        rgb = torch.cat([b["x"] for b in batches]).double().numpy()
        feats = np.concatenate([rgb, rgb[:, :2] ** 2 / 255], axis=1)
        if boost and Path(source["file"]).stem in boost:
            feats = feats * 50 + 1000  # different val/test movies must not change anything fitted
        return torch.from_numpy(feats), "computed"

    features, info = module.prepare_features(FakeBackbone(), extract)
    assert seen["seg1"] == list(range(0, 200, 2)) and set(seen) == {"seg1", "seg2", "seg3", "test1", "test2"}
    assert {s: tuple(f.shape) for s, f in features.items()} == {
        "train": (40, info["n_features"]), "val": (20, info["n_features"]), "test": (40, info["n_features"])}
    assert info["frame_rate"] == 2.5 and set(info["pca_components"]) == {"first", "second"}
    assert info["timing"] == "released"
    val_test = module.split_stimuli["val"] + module.split_stimuli["test"]
    boosted, _ = module.prepare_features(FakeBackbone(), lambda *a: extract(*a, boost=val_test))
    torch.testing.assert_close(boosted["train"], features["train"])
    assert not torch.allclose(boosted["test"], features["test"])
    # the same pipeline by hand for one training segment (no PCA), every frame: frame rate = srate = 5 Hz
    plain = VideoDataModule(str(video_root), **{**DM, "frame_stride": 1})
    plain.setup()
    plain_features, _ = plain.prepare_features(FakeBackbone(), extract)
    train_frames = np.concatenate([extract(plain.frame_indices(), plain.stimulus_source(s),
                                           lambda ids, s=s: plain.frames_loader(s, ids))[0].numpy()
                                   for s in plain.split_stimuli["train"]])
    first = plain.split_stimuli["train"][0]
    frames = extract(plain.frame_indices(), plain.stimulus_source(first),
                     lambda ids: plain.frames_loader(first, ids))[0].numpy()
    z = (frames - train_frames.mean(0)) / train_frames.std(0)
    # The released code (MATLAB): hrf = spm_hrf(1/srate, [5 16 1 1 6 0 32]); ts = conv2(hrf, X) (the full
    # convolution); ts = ts(4*srate+1 : 4*srate+n_frames, :) (read from 4 s on); ts = ts(srate+1 : 2*srate : end, :)
    # (once per TR, at 1, 3, 5 ... s). In 0-based numpy:
    srate, n_frames = 5, len(z)
    hrf = hrf_kernel("wen", 1 / srate)  # spm_hrf(1/srate, [5 16 1 1 6 0 32]), checked against scipy in test_hrf
    ts = np.stack([np.convolve(hrf, z[:, j]) for j in range(z.shape[1])], axis=1)
    ts = ts[4 * srate:4 * srate + n_frames]
    ts = ts[srate::2 * srate]
    assert ts.shape == (20, z.shape[1])
    t = np.arange(20.0)
    detrended = np.stack([c - np.polyval(np.polyfit(t, c, 4), t) for c in ts.T], 1)  # the runs' filter
    np.testing.assert_allclose(plain_features["train"][:20].numpy(), detrended, atol=1e-5)


class HalfLuminanceBackbone:
    """The fixture's planted regressors as a backbone: per frame, the mean of its left and right halves."""

    feature_slices = None

    @staticmethod
    def transform(frame):
        return torch.from_numpy(half_luminance(frame[None].astype(np.float64))[0])


def best_lags(x: np.ndarray, y: np.ndarray, max_lag: int = 3) -> tuple[int, float, float]:
    """The lag l (in TRs) maximising corr(x[t + l], y[t]); with that r and the best r at any other lag."""
    n = len(x)
    r = {lag: np.corrcoef(x[max(lag, 0):n + min(lag, 0)], y[max(-lag, 0):n - max(lag, 0)])[0, 1]
         for lag in range(-max_lag, max_lag + 1)}
    best = max(r, key=r.get)
    return best, r[best], max(v for k, v in r.items() if k != best)


def planted_lags(video_root: Path, timing: str) -> dict[str, list[tuple[int, float, float]]]:
    """Per movie, per planted vertex: (best lag, its r, the runner-up r) of features vs responses."""
    with h5py.File(ground_truth_path(video_root)) as f:
        kind, column = f["subject1/kind"][:].astype(str), f["subject1/extra_column"][:]
    module = VideoDataModule(str(video_root), **{**DM, "timing": timing})
    module.setup()
    features, _ = module.prepare_features(HalfLuminanceBackbone(), lambda ids, source, make_loader: (
        torch.cat([b["x"] for b in make_loader(ids)]).numpy(), "computed"))
    rows = {int(g): i for i, g in enumerate(module.data.voxel_xyz[:, 0])}
    out = {}
    for split, names in module.split_stimuli.items():
        for k, movie in enumerate(names):
            block = slice(20 * k, 20 * (k + 1))
            x, y = features[split][block].numpy(), module.targets(split)[block]
            out[movie] = [best_lags(x[:, column[v]], y[:, rows[v]]) for v in np.flatnonzero(kind == "extra")]
    return out


def test_planted_regressor_is_recovered_at_lag_0_on_every_movie(video_root):
    """Two noise-free vertices follow the mean luminance of the left / right half of each frame (convolved
    with the HRF and put on the volumes as the released runs have them: 245- and 246-volume runs, volume k at
    5 s + k·TR). The datamodule's features per volume, from the decoded movies at half the frame rate, line up
    with its responses at lag 0 on every movie, train, validation and test (here r 0.92–0.99 at lag 0, at most
    0.69 at any other lag; r stays below 1 because these 40-s movies sit inside the HRF's onset transient, which
    the planted signal has and the z-scored features lack). The earlier timing (first 20 volumes, TR means) does
    not: it is one TR off on the movies whose runs have 25 volumes (245) and right only on test2's 26 (246), so
    this test can fail."""
    lags = planted_lags(video_root, "released")
    assert set(lags) == {"seg1", "seg2", "seg3", "test1", "test2"}
    for movie, per_vertex in lags.items():
        assert len(per_vertex) == 2
        for lag, r, runner_up in per_vertex:
            assert lag == 0 and r > 0.85 and r - runner_up > 0.15, (movie, lag, r, runner_up)
    first = planted_lags(video_root, "first")
    assert {m: sorted({lag for lag, _, _ in v}) for m, v in first.items()} == {
        "seg1": [1], "seg2": [1], "seg3": [1], "test1": [1], "test2": [0]}


# --------------------------------------------------------------------------- end to end
def test_frame_signals_are_recovered_through_the_movies(make_cfg, tmp_path):
    """Vertices that are linear in the tiny backbone's per-frame features (conv1, 16 wide), HRF-convolved
    and put on the released runs' volumes by the generator, are predicted from the decoded movies with mean
    r > 0.9: decoding, frame stride, HRF and volume timing agree (here 0.97; with data.timing=first, the
    first volumes and TR means, 0.65; SPM's HRF instead of Wen's (peak 1 s later) 0.89)."""
    from encoders.backbones import build_backbone
    from train import train

    torch.manual_seed(5)
    backbone = build_backbone("tiny", layers=["conv1"])
    weights = tmp_path / "tiny.pt"
    torch.save(backbone.state_dict(), weights)
    mixing = torch.randn(backbone.n_features, 4, generator=torch.Generator().manual_seed(6))

    @torch.no_grad()
    def tiny_signal(frames):
        return (backbone(torch.stack([backbone.transform(f) for f in frames])) @ mixing).numpy()

    gen = {**GEN, "n_train_segments": 5, "n_volumes": 40, "n_cortex": 40}
    root = generate_video(tmp_path / "planted", extra_signal_fn=tiny_signal, **gen)
    overrides = [f"data.{k}={v}" for k, v in {**DM, "train_segments": 5, "n_volumes": 40, "n_cortex": 40,
                                              "frame_stride": 1}.items()]
    cfg = make_cfg(["data=video", f"data.root={root}", *overrides, "head=ridge",
                    "trainer=cpu", "logger=none", f"backbone.weights_path={weights}", "backbone.layers=[conv1]"])
    result = train(cfg, tmp_path / "run")
    assert result.model.head.estimator.shuffle is False  # the default for a time series: contiguous folds
    with h5py.File(ground_truth_path(root)) as f:
        extra = np.flatnonzero(f["subject1/kind"][:].astype(str) == "extra")
    voxels = np.load(result.run_dir / "voxel_metrics.npz")
    rows = np.flatnonzero(np.isin(voxels["voxel_xyz"][:, 0], extra))
    assert len(rows) == 4
    assert voxels["test_r"][rows].mean() > 0.9 and voxels["test_r"][rows].min() > 0.75, voxels["test_r"][rows]
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["features"]["frame_status"] == {"built": 7} and info["data"]["segments"]["test"] == ["test1", "test2"]


def test_shuffled_cv_folds_are_refused_for_time_series(make_cfg, video_root, synthetic_root):
    from train import ConfigError, build_datamodule

    cfg = make_cfg(["data=video", f"data.root={video_root}", *DATA_OVERRIDES, "head=ridge", "head.shuffle_folds=true"])
    with pytest.raises(ConfigError, match="set head.shuffle_folds=false"):
        build_datamodule(cfg)
    # by default the ridge's folds follow the data: contiguous for a time series, shuffled otherwise
    assert make_cfg(["data=video", f"data.root={video_root}", "head=ridge"]).head.shuffle_folds is False
    assert make_cfg(["experiment=demo_video", "head=ridge"]).head.shuffle_folds is False
    assert make_cfg(["data=synthetic", f"data.root={synthetic_root}", "head=ridge"]).head.shuffle_folds is True
    assert make_cfg(["data=nod", "data.root=/x", "head=ridge"]).head.shuffle_folds is True


# --------------------------------------------------------------------------- bad input
def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _short_video(path: Path) -> None:
    write_mp4(path, [np.zeros((48, 48, 3), np.uint8)] * 150, fps=5)


def _drop_last_volume(path: Path) -> None:
    from nibabel.cifti2 import cifti2_axes
    img = nib.load(path, mmap=False)  # read it all before the file is rewritten
    data = np.array(img.dataobj)[:-1]
    series = img.header.get_axis(0)
    axes = (cifti2_axes.SeriesAxis(series.start, series.step, len(data), series.unit), img.header.get_axis(1))
    out = nib.Cifti2Image(data, header=axes)
    out.nifti_header.set_intent("ConnDenseSeries")
    out.to_filename(str(path))


def _dead_run(path: Path, value: float) -> None:
    """Every grayordinate of a run NaN (value=nan) or constant."""
    img = nib.load(path)
    nib.save(nib.Cifti2Image(np.full(img.shape, value, np.float32), header=img.header), path)


BAD_INPUT = {
    "run that is NaN everywhere": (lambda p: _dead_run(VideoPaths(p, 1).cifti("seg2", 1), np.nan),
                                   r"seg2_1_Atlas.dtseries.nii: all 60 cortical grayordinates are NaN or constant over "
                                   r"the 20 volumes kept"),
    "run that is constant everywhere": (lambda p: _dead_run(VideoPaths(p, 1).cifti("test1", 2), 3.0),
                                        r"test1_2_Atlas.dtseries.nii: all 60 cortical grayordinates are NaN or constant"),
    "truncated CIFTI data": (lambda p: _truncate(VideoPaths(p, 1).cifti("seg2", 2), 0.8),
                             r"seg2_2_Atlas.dtseries.nii: cannot read the data block of shape \(25, 66\)"),
    "corrupt CIFTI header": (lambda p: VideoPaths(p, 1).cifti("test1", 3).write_bytes(b"\x00garbage" * 40),
                             r"test1_3_Atlas.dtseries.nii: not a readable CIFTI-2 file"),
    "video shorter than its fMRI": (lambda p: _short_video(VideoPaths(p, 1).video("seg3")),
                                    r"seg3.mp4: 150 frames = 30.00 s, shorter than its fMRI \(20 volumes x TR 2 s"),
    "missing segment file": (lambda p: VideoPaths(p, 1).cifti("seg1", 2).unlink(),
                             r"seg1_2_Atlas.dtseries.nii: file not found \(seg1 needs 2 repeats"),
    "missing movie": (lambda p: VideoPaths(p, 1).video("test1").unlink(), r"stimuli/test1.mp4: file not found"),
    "run not of a released length": (lambda p: _drop_last_volume(VideoPaths(p, 1).cifti("test1", 2)),
                                     r"test1_2_Atlas.dtseries.nii: 24 volumes; the released timing "
                                     r"\(data.timing=released\) expects 25 or 26 .*data.timing=first"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_naming_the_file(video_root, tmp_path, case):
    damage, message = BAD_INPUT[case]
    root = copy_of(video_root, tmp_path)
    damage(root)
    with pytest.raises(DataError, match=message) as err:
        VideoDataModule(str(root), **DM).setup()
    assert "\n" not in str(err.value) and str(root) in str(err.value)


def test_wrong_grayordinate_count_is_one_line(video_root):
    with pytest.raises(DataError, match=r"seg1_1_Atlas.dtseries.nii: 60 cortical \(surface\) grayordinates of 66, "
                                        r"expected data.n_cortex=59412"):
        VideoDataModule(str(video_root), **{**DM, "n_cortex": 59412}).setup()


def run_train_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.slow  # the CLI end to end; fast: test_frame_signals_are_recovered_through_the_movies, test_bad_input_*
def test_cli_data_video_end_to_end_then_bad_input(video_root, tmp_path):
    """python train.py data=video data.root=... backbone=tiny on files in the real formats; then a truncated
    CIFTI: exit 2, one line, and the first run's files untouched."""
    common = ["data=video", *DATA_OVERRIDES, "backbone=tiny", "trainer=cpu", "trainer.max_epochs=3", "logger=none",
              "trainer.enable_progress_bar=false", f"feature_cache_dir={tmp_path / 'cache'}"]
    run_dir = tmp_path / "run"
    proc = run_train_cli(f"data.root={video_root}", *common, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["n_voxels"] == 58 and np.isfinite(metrics["test"]["r_mean"])
    assert {"cortex_left", "cortex_right"} <= metrics["test"]["rois"].keys()
    before = {p: p.read_bytes() for p in (tmp_path / "cache").iterdir()}

    root = copy_of(video_root, tmp_path)
    _truncate(VideoPaths(root, 1).cifti("test1", 4), 0.7)
    proc = run_train_cli(f"data.root={root}", *common, f"hydra.run.dir={tmp_path / 'bad_run'}")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "test1_4_Atlas.dtseries.nii" in lines[0], proc.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "cache").iterdir()} == before
    assert not (tmp_path / "bad_run" / "metrics.json").exists()
