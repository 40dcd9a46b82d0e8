"""Wen et al. 2018's accuracy of a video run: r within each test movie, averaged over the movies, offered
next to the pooled r over the whole test set (accuracy.csv / accuracy.json / voxels.npz)."""
import csv
import json
import warnings

import numpy as np
import pytest
import yaml
from rich.console import Console
from scipy.stats import pearsonr

from analyses.jobs.wen2018 import Wen2018Job, Wen2018Options, Wen2018Result, accuracy, read_run
from analyses.methods import stats
from encoders.run_dir import RunDir

N_VOLUMES = 40
STIMULI = ["seg1", "seg2", "seg3", "test1", "test2", "test3"]


def test_pearson_r_by_group_against_scipy():
    rng = np.random.default_rng(0)
    pred, true = rng.normal(size=(90, 5)), rng.normal(size=(90, 5))
    true += 0.5 * pred
    groups = np.repeat(["b", "a", "c"], 30)
    labels, r = stats.pearson_r_by_group(pred, true, groups)
    assert labels.tolist() == ["a", "b", "c"] and r.shape == (3, 5)
    for g, label in enumerate(labels):
        rows = groups == label
        np.testing.assert_allclose(r[g], [pearsonr(pred[rows, v], true[rows, v])[0] for v in range(5)], rtol=1e-10)
    with pytest.raises(ValueError, match="one label per sample"):
        stats.pearson_r_by_group(pred, true, groups[:10])


@pytest.fixture
def video_run_dir(tmp_path):
    """A finished video run's files (written through RunDir, as train.py does): three test movies whose mean
    responses differ while the predictions do not follow them, so pooled and per-movie r differ."""
    rng = np.random.default_rng(1)
    run = RunDir(tmp_path / "run")
    run.write_config(yaml.safe_dump({"data": {"_target_": "datamodules.video.VideoDataModule",
                                              "root": str(tmp_path / "gone"), "subject": 1}}))
    run.write_info({"time_series": True, "backbone": "tiny", "head": "ridge",
                    "data": {"dataset": "video", "stimuli": STIMULI, "n_volumes": N_VOLUMES, "tr": 2.0, "fps": 10.0}})
    n_vox = 60
    ids = np.concatenate([STIMULI.index(m) * N_VOLUMES + np.arange(N_VOLUMES) for m in ("test1", "test2", "test3")])
    signal = rng.normal(size=(len(ids), n_vox))
    offset = np.repeat([-1.5, 0.0, 1.5], N_VOLUMES)[:, None] * rng.uniform(0.5, 1.5, n_vox)  # per-movie baseline
    true = signal + offset + rng.normal(size=signal.shape)
    pred = signal - 0.5 * offset + 0.5 * rng.normal(size=signal.shape)                      # misses it
    run.write_predictions({"test": pred}, {"test": true.astype(np.float32)}, {"test": ids})
    half = np.arange(n_vox) < n_vox // 2
    run.write_voxel_metrics({"test": {"r": np.zeros(n_vox), "nc": np.full(n_vox, 50.0)}},
                            np.stack([np.arange(n_vox), half.astype(int), np.arange(n_vox)], 1),
                            {"cortex_left": half, "cortex_right": ~half})
    run.write_metrics({})
    return run, pred, true


def test_per_movie_accuracy_next_to_the_pooled_one(video_run_dir):
    run, pred, true = video_run_dir
    data = read_run(run)
    assert data.movies.tolist() == ["test1"] * N_VOLUMES + ["test2"] * N_VOLUMES + ["test3"] * N_VOLUMES
    opts = Wen2018Options(n_perm=20, block=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc = accuracy(data, opts)
    # independent: scipy's r per movie, averaged; and over the pooled test set
    per_movie = np.mean([[pearsonr(pred[k * N_VOLUMES:(k + 1) * N_VOLUMES, v], true[k * N_VOLUMES:(k + 1) * N_VOLUMES, v])[0]
                          for v in range(pred.shape[1])] for k in range(3)], axis=0)
    pooled = np.array([pearsonr(pred[:, v], true[:, v])[0] for v in range(pred.shape[1])])
    np.testing.assert_allclose(acc["r_per_movie"], per_movie, rtol=1e-6)
    np.testing.assert_allclose(acc["r"], pooled, rtol=1e-5)
    assert per_movie.mean() > pooled.mean() + 0.2           # the two differ here: the movies' baselines
    summary = acc["summary"]["r_per_movie"]
    assert summary["movies"] == ["test1", "test2", "test3"]
    assert summary["r_mean"] == pytest.approx(per_movie.mean(), rel=1e-6)
    assert list(summary["r_mean_by_movie"]) == ["test1", "test2", "test3"]
    # written next to the pooled r: accuracy.csv, accuracy.json, voxels.npz
    job = Wen2018Job(opts, Console(quiet=True))
    job.write(run, Wen2018Result(data, "t", acc, voxels={k: acc[k] for k in ("r", "p_fdr", "r_per_movie", "r_movies")}))
    out = run.path / "wen2018"
    with open(out / "accuracy.csv") as f:
        rows = {r["roi"]: r for r in csv.DictReader(f)}
    header = list(rows["all"])
    assert header.index("r_per_movie_mean") == header.index("r_se") + 1
    assert float(rows["all"]["r_per_movie_mean"]) == pytest.approx(per_movie.mean(), rel=1e-6)
    assert float(rows["cortex_left"]["r_per_movie_mean"]) == pytest.approx(per_movie[:30].mean(), rel=1e-6)
    assert float(rows["all"]["r_mean"]) == pytest.approx(pooled.mean(), rel=1e-5)
    assert json.loads((out / "accuracy.json").read_text())["r_per_movie"]["r_mean"] == pytest.approx(per_movie.mean())
    voxels = np.load(out / "voxels.npz")
    assert voxels["r_movies"].shape == (3, pred.shape[1])
    assert job.wandb_summary(Wen2018Result(data, "t", acc))["r_per_movie_mean"] == pytest.approx(per_movie.mean())


def test_image_runs_have_no_per_movie_accuracy(video_run_dir):
    run, _, _ = video_run_dir
    info = dict(run.info, time_series=False)
    run.write_info(info)
    data = read_run(RunDir(run.path))
    assert data.movies is None
    acc = accuracy(data, Wen2018Options(n_boot=50))
    assert acc["summary"]["r_per_movie"] is None and np.isnan(acc["r_per_movie"]).all()
