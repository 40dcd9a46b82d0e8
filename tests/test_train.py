"""The spine end to end: data on disk -> frozen backbone -> head -> trained, tested, recorded."""
import json
import subprocess
import sys

import h5py
import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from encoders.backbones import build_backbone
from encoders.heads import LinearHead
from encoders.model import EncodingModel
from tests.conftest import REPO, SMALL_SYNTHETIC
from train import train

FAST = ["experiment=demo", "trainer.max_epochs=8", "trainer.enable_progress_bar=false", "logger=none"]


def data_overrides(root):
    return [f"data.root={root}", "data.synthetic=null"]


def test_backbone_is_bit_identical_after_training_on_images():
    """Images go through the backbone in every training step (BatchNorm included): nothing may move."""
    torch.manual_seed(0)
    backbone = build_backbone("tiny")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    images = torch.randn(24, 3, 64, 64)
    targets = torch.randn(24, 5)
    loader = DataLoader(TensorDataset(images, targets), batch_size=8,
                        collate_fn=lambda items: {"x": torch.stack([i[0] for i in items]),
                                                  "y": torch.stack([i[1] for i in items])})
    model = EncodingModel(LinearHead(backbone.n_features, 5), backbone.n_features, 5, backbone=backbone)
    head_before = model.head.linear.weight.clone()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=loader)
    assert not backbone.training and all(not m.training for m in backbone.modules())
    after = backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, model.head.linear.weight)  # the head did learn


def test_train_writes_the_run_directory(make_cfg, synthetic_root, tmp_path):
    weights = tmp_path / "tiny.pt"
    torch.save(build_backbone("tiny").state_dict(), weights)
    cfg = make_cfg(FAST + data_overrides(synthetic_root) + [f"backbone.weights_path={weights}"])
    result = train(cfg, tmp_path / "run")
    run = result.run_dir
    # Frozen at the run level too: the backbone equals the weights file it was built from.
    saved = torch.load(weights)
    assert all(torch.equal(saved[k], v) for k, v in result.model.backbone.state_dict().items())

    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        block = metrics[split]
        assert {"r_mean", "r2_mean", "nc_r2_mean", "n_voxels", "rois"} <= block.keys()
        assert {"FFA-1", "PPA", "V1v"} <= block["rois"].keys()
        assert block["rois"]["FFA-1"]["n_voxels"] > 0
    assert 0 < metrics["test"]["nc_r2_mean"] <= 1.05
    assert metrics["test"]["r_mean"] > 0.2

    split = json.loads((run / "split.json").read_text())
    train_ids, val_ids, test_ids = (set(split[s]) for s in ("train", "val", "test"))
    assert not (train_ids & test_ids) and not (val_ids & test_ids) and not (train_ids & val_ids)
    assert test_ids == set(range(SMALL_SYNTHETIC["n_shared"]))  # the shared images, all seen by subject 1

    voxels = np.load(run / "voxel_metrics.npz")
    n_vox = metrics["test"]["n_voxels"]
    assert voxels["test_r"].shape == voxels["test_nc"].shape == (n_vox,)
    # The headline summaries, from the per-voxel values kept beside them (threshold from conf/train.yaml).
    test, nc = metrics["test"], voxels["test_nc"]
    reliable = nc > cfg.metrics.nc_threshold
    assert test["nc_threshold"] == 10.0 and test["n_reliable"] == int(reliable.sum()) > 0
    assert test["nc_r2_median"] == pytest.approx(float(np.nanmedian(voxels["test_nc_r2"])), rel=1e-5)
    assert test["nc_r2_mean_reliable"] == pytest.approx(float(np.nanmean(voxels["test_nc_r2"][reliable])), rel=1e-5)
    assert voxels["voxel_xyz"].shape == (n_vox, 3) and voxels["roi_FFA-1"].sum() == metrics["test"]["rois"]["FFA-1"]["n_voxels"]
    np.testing.assert_allclose(np.nanmean(voxels["test_r"]), metrics["test"]["r_mean"], rtol=1e-5)

    preds = np.load(run / "predictions.npz")
    from encoders.metrics import pearson_r
    np.testing.assert_allclose(pearson_r(preds["test_pred"], preds["test_true"]), voxels["test_r"], atol=1e-5)

    info = json.loads((run / "run.json").read_text())
    assert info["backbone"] == "tiny" and info["versions"]["torch"].startswith("2.14")
    assert info["git_commit"] and info["data"]["n_images"]["test"] == len(test_ids)
    assert info["time_series"] is False  # recorded from the datamodule, read back by RunDir.is_time_series
    assert (run / "config.yaml").exists() and (run / "head.pt").exists()
    assert (run / "checkpoints" / "best.ckpt").exists() and (run / "checkpoints" / "last.ckpt").exists()
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    assert not any(k.startswith("backbone.") for k in ckpt["state_dict"])


def test_noise_free_voxels_from_tiny_features_are_recovered(make_cfg, tmp_path):
    """Voxels that are a linear function of the tiny backbone's own features are predicted with r > 0.99."""
    from datamodules.synthetic import generate
    torch.manual_seed(1)
    backbone = build_backbone("tiny")
    weights = tmp_path / "tiny.pt"
    torch.save(backbone.state_dict(), weights)
    mixing = torch.randn(backbone.n_features, 6, generator=torch.Generator().manual_seed(2))

    @torch.no_grad()
    def tiny_signal(images):
        x = torch.stack([backbone.transform(im) for im in images])
        return (backbone(x) @ mixing).numpy()

    root = generate(tmp_path / "planted", n_subjects=1, n_shared=60, n_unique=400, n_sessions=4, image_size=64,
                    volume_shape=(10, 12, 10), seed=3, extra_signal_fn=tiny_signal)
    cfg = make_cfg(["experiment=demo", "trainer.max_epochs=150", "trainer.enable_progress_bar=false", "logger=none",
                    "callbacks.early_stopping.patience=150", "optimizer.lr=1e-2", "optimizer.weight_decay=0",
                    "scheduler.gamma=0.98", f"backbone.weights_path={weights}", *data_overrides(root)])
    result = train(cfg, tmp_path / "run")
    with h5py.File(root / "ground_truth.h5") as f:
        extra_xyz = f["subj01/voxel_xyz"][:][f["subj01/extra"][:]]
    voxels = np.load(result.run_dir / "voxel_metrics.npz")
    rows = [np.flatnonzero((voxels["voxel_xyz"] == xyz).all(1))[0] for xyz in extra_xyz]
    assert len(rows) == 6
    assert voxels["test_r"][rows].min() > 0.99, voxels["test_r"][rows]


def test_shuffled_targets_give_no_accuracy(make_cfg, synthetic_root, tmp_path):
    """Control: with train/val responses permuted across images, test accuracy is at chance."""
    cfg = make_cfg(FAST + data_overrides(synthetic_root) + ["data.shuffle_train_targets=true"])
    metrics = train(cfg, tmp_path / "run").metrics
    assert abs(metrics["test"]["r_mean"]) < 0.05, metrics["test"]["r_mean"]


def test_missing_weights_file_is_one_line(tmp_path):
    from encoders.weights import WeightsError
    with pytest.raises(WeightsError, match=str(tmp_path / "nope.pt")):
        build_backbone("tiny", weights_path=str(tmp_path / "nope.pt"))


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})


def test_cli_train_then_summary(synthetic_root, tmp_path):
    run_dir = tmp_path / "cli_run"
    proc = run_cli("train.py", *FAST, "trainer.max_epochs=3", *data_overrides(synthetic_root),
                   f"hydra.run.dir={run_dir}", f"feature_cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "metrics.json").exists() and (run_dir / ".hydra" / "config.yaml").exists()
    proc = run_cli("analyze.py", "analysis=summary", f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny" in proc.stdout and "linear" in proc.stdout and "FFA-1" in proc.stdout
    assert (run_dir / "summary.csv").exists()


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path):
    proc = run_cli("train.py", "data=nsd", f"data.root={tmp_path / 'no_nsd'}", "logger=none",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "no_nsd" in lines[0] and "file not found" in lines[0]


def test_guarded_records_a_failed_multirun_job_and_is_one_line_otherwise(tmp_path, capsys):
    """train.py's one failure wrapper: in a multirun a failing job leaves failed.json (its error line, type,
    overrides, traceback) and the sweep goes on; in a single run a user error is one line, exit 2."""
    from types import SimpleNamespace

    from hydra.types import RunMode

    from datamodules.errors import DataError
    from encoders.run_dir import find_failed
    from train import guarded

    def fail():
        raise DataError("/nowhere/betas.hdf5: file not found\nmore detail")

    sweep = SimpleNamespace(mode=RunMode.MULTIRUN, overrides=SimpleNamespace(task=["data.subject=3"]))
    assert guarded(fail, sweep, tmp_path / "0_job") is None
    [record] = find_failed(tmp_path)
    assert record["type"] == "DataError" and record["error"] == "/nowhere/betas.hdf5: file not found"
    assert record["overrides"] == ["data.subject=3"] and "Traceback" in record["traceback"]
    assert guarded(lambda: {"test": {}}, sweep, tmp_path / "1_job") == {"test": {}}
    single = SimpleNamespace(mode=RunMode.RUN, overrides=SimpleNamespace(task=[]))
    with pytest.raises(SystemExit) as exit_info:
        guarded(fail, single, tmp_path / "run")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[0] == "error: /nowhere/betas.hdf5: file not found"
    with pytest.raises(ZeroDivisionError):  # not a user error: the traceback, not a one-liner
        guarded(lambda: 1 / 0, single, tmp_path / "run")
