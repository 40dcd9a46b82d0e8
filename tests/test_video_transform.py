"""A video run's encoder owns its whole feature transform: the frame z-score and PCA the datamodule fitted
are saved with the head, so the saved encoder maps the run's own frames to exactly the pre-HRF features
the run was trained on, and its image analyses use that transform (or, for a run saved without it, refuse
in one line)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from analyses.jobs.clip_msm import load_run_encoder
from analyses.jobs.wen2018 import Wen2018Options, analyse_run
from datamodules.synthetic_images import write_category_folder
from datamodules.synthetic_video import ensure_synthetic_video
from datamodules.video_features import FeatureReducer
from datamodules.video_files import iter_frames
from encoders.extract import extract_features
from encoders.run_dir import RunDir
from train import train

GEN = dict(n_train_segments=4, n_test_segments=2, train_repeats=2, test_repeats=3, n_volumes=16, tr=2.0, fps=4.0,
           frame_size=48, n_cortex=40, n_subcortical=4, n_dead=1, seed=3)
DATA = {"train_segments": 4, "test_segments": 2, "train_repeats": 2, "test_repeats": 3, "n_volumes": 16, "tr": 2.0,
        "fps": 4.0, "n_cortex": 40, "frame_stride": 2, "val_segments": 1, "pca_variance": 0.9}


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    """A ridge run on two layers of the tiny CNN, with PCA per layer and across layers."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from tests.conftest import REPO

    tmp = tmp_path_factory.mktemp("video_transform")
    root = ensure_synthetic_video(tmp / "video", **GEN)
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[
            "data=video", f"data.root={root}", *[f"data.{k}={v}" for k, v in DATA.items()], "head=ridge",
            "trainer=cpu", "logger=none", "backbone=tiny", "backbone.layers=[conv2,conv3]",
            f"feature_cache_dir={tmp / 'cache'}"])
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp / "run")
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    train(cfg, tmp / "run")
    GlobalHydra.instance().clear()
    return RunDir(tmp / "run")


def test_saved_encoder_reproduces_the_runs_pre_hrf_features(video_run):
    run = video_run
    enc = run.encoder()
    assert run.is_time_series and enc.has_frame_stage and enc.predicts_images and not enc.takes_backbone_features
    assert run.info["features"]["transform"]["frame_stage"]["n_out"] == enc.n_features
    dm = run.datamodule()  # the run's data again, as its datamodule reads it
    dm.set_transform(enc.backbone.transform)
    # The run's frame features, extracted as training extracted them (same loader, same batches) ...
    raw = {s: extract_features(enc.backbone, dm.frames_loader(s, dm.frame_indices()), "cpu").numpy()
           for s in dm.stimuli}
    # ... and the datamodule's own fit on the training frames (scikit-learn PCA), independent of the encoder.
    reducer = FeatureReducer(enc.backbone.feature_slices, DATA["pca_variance"])
    reducer.fit(np.concatenate([raw[s] for s in dm.split_stimuli["train"]]))
    assert reducer.n_components_ == enc.n_features < enc.backbone.n_features  # the PCAs did reduce
    for movie in dm.stimuli:
        pre_hrf = reducer.transform(raw[movie])
        np.testing.assert_allclose(enc.transform.frame_stage(torch.from_numpy(raw[movie])).numpy(), pre_hrf,
                                   rtol=1e-9, atol=1e-9)
    # From the decoded training frames as images, through the rebuilt backbone and the saved transform.
    movie = dm.split_stimuli["train"][0]
    frames = [f for _, f in iter_frames(dm.paths.video(movie), dm.frame_indices())]
    z = enc.image_inputs(frames)
    expected = (reducer.transform(raw[movie]) - enc.transform.mean.numpy()) / enc.transform.std.numpy()
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(enc.predict_images(frames), enc.predict_standardised(expected), rtol=1e-4, atol=1e-4)
    # The per-TR features (the temporal stage the datamodule applies) through the saved standardisation and
    # head are the run's own test predictions.
    features, _ = dm.prepare_features(enc.backbone, lambda ids, source, make_loader: (
        extract_features(enc.backbone, make_loader(ids), "cpu"), "computed"))
    np.testing.assert_allclose(enc.predict_features(features["test"]), run.predictions("test").pred,
                               rtol=1e-4, atol=1e-4)


def test_video_runs_images_and_image_analyses(video_run, tmp_path):
    run = video_run
    frames = run.stimuli()  # VideoDataModule.open_stimuli: each volume's mid-TR frame
    sample = int(run.split_ids("test")[5])
    movie, index = frames.locate(sample)
    assert movie == "test1" and index == int((5 + 0.5) * DATA["tr"] * DATA["fps"])
    decoded = dict(iter_frames(Path(run.data_config["root"]) / "stimuli" / f"{movie}.mp4", [index]))[index]
    np.testing.assert_array_equal(frames.image(sample), decoded)
    # Virtual fMRI of images through the saved transform (Wen's use of a movie-trained model).
    folder = write_category_folder(tmp_path / "cats", ["face", "place", "word"], 3, 48)
    res = analyse_run(run, Wen2018Options(image_dir=str(folder), n_perm=20, n_perm_modularity=5,
                                          out_subdir="wen2018_test", data_dir=str(tmp_path)))
    assert res["categories"] is not None and res["accuracy"]["method"] == "permutation"
    # Wen's accuracy per test movie, averaged, next to the pooled r (the movies from the run's sample ids)
    assert res["accuracy"]["r_per_movie"]["movies"] == ["test1", "test2"]
    assert np.isfinite(res["accuracy"]["r_per_movie"]["r_mean"])
    assert any("not available for time-series runs" in n for n in res["notes"])
    with pytest.raises(ValueError, match="CLIP-MSM needs a head on the raw CLIP image embedding"):
        load_run_encoder(run)


def test_a_video_run_saved_without_its_transform_refuses_images(video_run, tmp_path):
    import shutil

    old = RunDir(shutil.copytree(video_run.path, tmp_path / "old"))
    state = torch.load(old.file("head.pt"), weights_only=False)
    del state["feature_transform"]
    torch.save(state, old.file("head.pt"))
    enc = old.encoder()
    assert not enc.predicts_images and not enc.has_frame_stage
    with pytest.raises(ValueError, match="saved no frame stage"):
        enc.predict_images([np.zeros((48, 48, 3), np.uint8)])
    res = analyse_run(old, Wen2018Options(n_perm=20, out_subdir="wen2018_old", data_dir=str(tmp_path)))
    assert res["categories"] is None and any("saved no frame stage" in n for n in res["notes"])
