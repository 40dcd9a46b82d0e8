"""Kill-and-resume: a run killed with SIGKILL and restarted with the same command ends where an
uninterrupted run ends (test metrics to 1e-6 on CPU), keeping the first attempt's files."""
import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from tests.conftest import REPO
from train import ConfigError, resume_checkpoint, train

SETTINGS = ["experiment=demo", "logger=csv", "trainer.max_epochs=6", "trainer.enable_progress_bar=false",
            "callbacks.early_stopping.patience=100", "data.batch_size=64", "optimizer.lr=3e-4"]
KILL = ["+callbacks.kill._target_=tests.kill_callback.SigkillAtEpoch", "+callbacks.kill.epoch=3"]


@pytest.mark.slow  # a killed run resumed end to end; fast: test_resume_checkpoint_only_for_the_same_config
def test_sigkilled_run_resumes_to_the_uninterrupted_result(synthetic_root, make_cfg, tmp_path):
    data = [f"data.root={synthetic_root}", "data.synthetic=null", f"feature_cache_dir={tmp_path / 'cache'}"]
    run = tmp_path / "run"
    command = [sys.executable, "train.py", *SETTINGS, *data, *KILL, "+analyze=[summary]", f"hydra.run.dir={run}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}

    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert not (run / "metrics.json").exists()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["epoch"] == 2  # the last completed epoch before the kill in epoch 3
    rows_before = list(csv.DictReader(open(run / "csv" / "metrics.csv")))

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in (run / "train.log").read_text()
    # The first attempt's log is kept beside the resumed one, which starts at the resumed epoch.
    assert list(csv.DictReader(open(run / "csv" / "metrics.attempt1.csv"))) == rows_before
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    assert {int(r["epoch"]) for r in rows_before if r["val/r_mean"]} == {0, 1, 2}
    assert {int(r["epoch"]) for r in rows if r["val/r_mean"]} == {3, 4, 5}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    # +analyze=[summary] ran as a job of its own on the finished run.
    assert (run / "summary.csv").exists() and "tiny" in (run / "analyze_summary.log").read_text()

    reference = train(make_cfg([*SETTINGS, *data], run_dir=tmp_path / "ref"), tmp_path / "ref")
    resumed = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in ("r_mean", "r2_mean", "nc_r2_mean"):
            assert abs(resumed[split][key] - reference.metrics[split][key]) < 1e-6, (split, key)
    a, b = np.load(run / "voxel_metrics.npz"), np.load(tmp_path / "ref" / "voxel_metrics.npz")
    np.testing.assert_allclose(a["test_r"], b["test_r"], atol=1e-6)
    # Not trivially equal: the tested (best) epoch is one trained after the kill, and the weights
    # of the last epoch match too, so the resumed epochs saw the same batches in the same order.
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    assert best["epoch"] == 5
    last, ref_last = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
                      for d in (run, tmp_path / "ref"))
    assert (last["head.linear.weight"] - ckpt["state_dict"]["head.linear.weight"]).abs().max() > 1e-4
    torch.testing.assert_close(last["head.linear.weight"], ref_last["head.linear.weight"], rtol=0, atol=1e-6)


def test_resume_checkpoint_only_for_the_same_config(make_cfg, tmp_path):
    """The resume decision alone (no training): the last checkpoint of an earlier attempt with the same
    config (logger/resume/analyze aside) is resumed; another config is refused naming the keys; resume=false
    starts afresh."""
    run = tmp_path / "run"
    cfg = make_cfg(SETTINGS, run_dir=run)
    assert resume_checkpoint(cfg, run) is None  # nothing to resume
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    assert resume_checkpoint(cfg, run) == str(run / "checkpoints" / "last.ckpt")
    with open_dict(cfg):
        cfg.logger = {}  # may differ between attempts
    assert resume_checkpoint(cfg, run) == str(run / "checkpoints" / "last.ckpt")
    other = make_cfg([*SETTINGS, "optimizer.lr=1e-2"], run_dir=run)
    with pytest.raises(ConfigError, match="optimizer.lr"):
        resume_checkpoint(other, run)
    assert resume_checkpoint(make_cfg([*SETTINGS, "resume=false"], run_dir=run), run) is None
