"""DDP: 2 processes on gloo give the single-process per-voxel scores, inside a Hydra multirun.

One subprocess runs `train.py -m trainer=ddp_cpu head=ridge,linear`: Lightning re-launches the
script for rank 1 of each job. The known trap — a child re-running the whole sweep, or recomputing
`${now:}` into a second output directory, or skipping the test — would show as extra directories or
missing metrics. The test split has an odd number of images, so DistributedSampler pads one rank
with a repeated image: counting it would move the per-voxel r by ~0.1, far beyond the tolerance.
The linear job's features are served as batches drawn by index on each rank (its DistributedSampler
share); a second DDP run with the per-item DataLoader (``data.feature_batches=per_item``) must train
the same weights and give the same scores.
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from datamodules.synthetic import ensure_synthetic
from encoders.heads import LinearHead
from encoders.metrics import pearson_r
from encoders.model import EncodingModel
from tests.conftest import REPO, SMALL_SYNTHETIC
from train import train

# 41 test images (odd), 8 val: DistributedSampler pads both splits for 2 ranks.
ODD = {**SMALL_SYNTHETIC, "n_subjects": 1, "n_shared": 41, "n_unique": 81, "n_sessions": 3}
COMMON = ["experiment=demo", "logger=csv", "trainer.max_epochs=3", "trainer.enable_progress_bar=false",
          "data.batch_size=16"]  # several batches per rank and epoch: their order matters


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("odd") / "synthetic_nsd", **ODD)


@pytest.mark.slow  # DDP end to end; fast: test_padding_rows_are_left_out_of_every_rank
def test_ddp_multirun_equals_single_process(odd_root, make_cfg, tmp_path):
    out, cache = tmp_path / "outputs", tmp_path / "cache"
    data = [f"data.root={odd_root}", "data.synthetic=null", f"feature_cache_dir={cache}"]
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "trainer=ddp_cpu", "head=ridge,linear", *COMMON, *data,
         f"paths.output_dir={out}", f"hydra.sweep.dir={out / 'sweep'}"],
        cwd=REPO, capture_output=True, text=True, timeout=400,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    # One directory per job, nothing else (no second directory from a child recomputing ${now:}).
    assert sorted(p.name for p in out.iterdir()) == ["sweep"]
    jobs = sorted(p.name for p in (out / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0_tiny_ridge", "1_tiny_linear"], jobs
    for job in jobs:
        run = out / "sweep" / job
        assert not (run / "failed.json").exists(), (run / "failed.json").read_text()
        assert json.loads((run / "run.json").read_text())["world_size"] == 2
        assert (run / "train_ddp_process_1.log").exists()  # rank 1 ran in this job's directory
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["test"]["n_voxels"] > 0 and np.isfinite(metrics["test"]["r_mean"])  # test not skipped
        # test_r is the trainer's test loop gathered over both ranks; the predictions were made by rank 0
        # alone over the whole split: the same scores, each image counted once.
        voxels, preds = np.load(run / "voxel_metrics.npz"), np.load(run / "predictions.npz")
        assert len(preds["test_ids"]) % 2 == 1
        np.testing.assert_allclose(voxels["test_r"], pearson_r(preds["test_pred"], preds["test_true"]), atol=1e-5)

    # The closed-form head has no training trajectory to differ: its DDP scores equal one process's.
    single = train(make_cfg(["head=ridge", *COMMON, *data]), tmp_path / "single")
    ddp = np.load(out / "sweep" / "0_tiny_ridge" / "voxel_metrics.npz")
    ref = np.load(single.run_dir / "voxel_metrics.npz")
    assert np.isfinite(ref["test_r"]).sum() > 100
    np.testing.assert_allclose(ddp["test_r"], ref["test_r"], atol=1e-5)
    np.testing.assert_allclose(ddp["val_r"], ref["val_r"], atol=1e-5)

    # The linear head trained under DDP from batches drawn by index equals the per-item DataLoader's run.
    per_item = tmp_path / "per_item"
    proc = subprocess.run(
        [sys.executable, "train.py", "trainer=ddp_cpu", "head=linear", "data.feature_batches=per_item", *COMMON,
         *data, f"paths.output_dir={out}", f"hydra.run.dir={per_item}"],
        cwd=REPO, capture_output=True, text=True, timeout=400,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    index_run = out / "sweep" / "1_tiny_linear"
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]["head.linear.weight"]
            for d in (index_run, per_item))
    assert a.abs().max() > 3e-3  # several AdamW steps of lr 1e-3
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for key in ("val_r", "test_r"):
        np.testing.assert_allclose(np.load(index_run / "voxel_metrics.npz")[key],
                                   np.load(per_item / "voxel_metrics.npz")[key], atol=1e-6)


@pytest.mark.parametrize("n,world,shuffle", [(41, 2, False), (7, 3, True), (8, 2, False), (2, 3, False)])
def test_padding_rows_are_left_out_of_every_rank(n, world, shuffle):
    """Against torch's own DistributedSampler: over all ranks, every sample is scored exactly once."""
    kept = []
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=3)
        model = EncodingModel(LinearHead(2, 1), 2, 1)
        model._trainer = SimpleNamespace(test_dataloaders=SimpleNamespace(sampler=sampler))
        indices = torch.tensor(list(sampler))
        for batch in indices.split(4):
            kept += batch[model._whole_split_rows("test", len(batch))].tolist()
    assert sorted(kept) == list(range(n))
