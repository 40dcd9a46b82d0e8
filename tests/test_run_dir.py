"""RunDir owns the run directory's layout both ways: what it writes reads back, in the documented files."""
import json

import numpy as np
import pytest
import yaml

from encoders.run_dir import RunDir, find_failed, find_runs, require_runs


def write_small_run(path, time_series=None, target="datamodules.nsd.NSDDataModule"):
    run = RunDir(path)
    run.write_config(yaml.safe_dump({"seed": 3, "data": {"_target_": target, "root": "/nowhere", "subject": 2,
                                                          "synthetic": {"seed": 0}}}))
    per_split = {s: {"r": np.array([0.1, 0.2, np.nan]), "r2": np.zeros(3), "nc": np.full(3, 50.0),
                     "nc_r2": np.ones(3)} for s in ("val", "test")}
    run.write_metrics({"test": {"r_mean": 0.15, "rois": {"A": {"r_mean": 0.1}}}})
    run.write_voxel_metrics(per_split, np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0]]),
                            {"A": np.array([True, False, False]), "B": np.array([False, True, True])})
    run.write_split(3, 2, {"train": np.array([5, 6]), "val": np.array([7]), "test": np.array([1, 2, 3])})
    run.write_predictions({"test": np.ones((3, 3))}, {"test": np.zeros((3, 3))}, {"test": np.array([1, 2, 3])})
    info = {"backbone": "tiny", "head": "ridge", "data": {"dataset": "nsd", "subject": 2}}
    if time_series is not None:
        info["time_series"] = time_series
    run.write_info(info)
    return run


def test_what_is_written_reads_back(tmp_path):
    write_small_run(tmp_path / "run")
    run = RunDir(tmp_path / "run")  # a fresh reader
    assert run.is_run and run.config["seed"] == 3 and run.metrics["test"]["r_mean"] == 0.15
    assert (run.backbone, run.head, run.dataset, run.subject) == ("tiny", "ridge", "nsd", 2)
    np.testing.assert_array_equal(run.split_ids("test"), [1, 2, 3])
    assert run.split["seed"] == 3 and run.split["subject"] == 2
    assert set(run.rois()) == {"A", "B"} and run.rois(["B"])["B"].tolist() == [False, True, True]
    with pytest.raises(ValueError, match=r"voxel_metrics.npz: no ROI \['C'\]"):
        run.rois(["C"])
    np.testing.assert_allclose(run.voxels().values("test", "r")[:2], [0.1, 0.2], rtol=1e-6)
    assert run.voxels().get("train", "r") is None and run.voxel_xyz.shape == (3, 3)
    preds = run.predictions("test")
    assert preds.pred.dtype == np.float32 and preds.ids.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="split 'val'"):
        run.predictions("val")
    # the datamodule's arguments, without what train.py consumes before instantiating it
    assert run.datamodule_arguments() == {"root": "/nowhere", "subject": 2}
    (tmp_path / "run" / "predictions.npz").unlink()
    with pytest.raises(FileNotFoundError, match="predictions.npz: not found"):
        RunDir(tmp_path / "run").predictions("test")


def test_time_series_is_recorded_or_asked_of_the_datamodule_class(tmp_path):
    assert write_small_run(tmp_path / "a", time_series=True).is_time_series
    assert not write_small_run(tmp_path / "b", time_series=False).is_time_series
    # a run written before the flag: the class in its config answers (never inferred from run.json's keys)
    assert RunDir(write_small_run(tmp_path / "c", target="datamodules.video.VideoDataModule").path).is_time_series
    assert not RunDir(write_small_run(tmp_path / "d").path).is_time_series
    bad = write_small_run(tmp_path / "e", target="datamodules.nowhere.Nothing")
    with pytest.raises(ValueError, match="cannot be imported"):
        bad.is_time_series


def test_find_runs_and_failed_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    write_small_run(sweep / "0_a")
    write_small_run(sweep / "deeper" / "1_b")
    RunDir(sweep / "2_c").write_failure({"error": "boom", "type": "DataError", "overrides": ["x=1"]})
    done = write_small_run(sweep / "3_d")
    done.write_failure({"error": "an earlier attempt", "type": "X", "overrides": []})  # beside metrics.json
    runs = find_runs(sweep)
    assert [r.name for r in runs] == ["0_a", "3_d", "deeper/1_b"]
    assert [r.name for r in find_runs(sweep / "0_a")] == ["0_a"]
    failed = find_failed(sweep)
    assert [(f["dir"].name, f["error"]) for f in failed] == [("2_c", "boom")]
    done.clear_failure()
    assert not (done.path / "failed.json").exists()
    (sweep / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no run directories"):
        require_runs(sweep / "empty")
    assert json.loads((sweep / "0_a" / "split.json").read_text())["id_base"] == 0
