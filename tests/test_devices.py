"""The GPU paths — ridge on CUDA, mixed precision, DDP on NCCL, the batched preprocessing — and their CPU side.

Tests marked ``gpu`` need CUDA: they are skipped (with the reason) where ``torch.cuda.is_available()`` is
false, so ``pytest -m "not slow"`` passes on any machine; ``pytest -m gpu`` (or benchmarks/device_check.sh)
runs them on a GPU. Tolerances, GPU against CPU:
- ridge: CV scores within 1e-5 (the quadratic term is float32 on both, summed in a different order),
  alphas and weights equal wherever a voxel's best two CV scores are more than that apart;
- train.py with a ridge head on the GPU (features extracted there too): per-voxel test r within 1e-3 of
  the CPU run (median within 1e-4): the features themselves differ at float32 rounding (cuDNN's convolutions);
- batched preprocessing on CUDA: within one grey level (1/255 before normalisation) of the CPU on every
  pixel, off by more than 1e-4 on < 0.5 % of them (BatchTransform's documented float32-separable arithmetic).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from encoders.backbones import build_backbone
from encoders.heads import LinearHead
from encoders.model import EncodingModel
from encoders.ridge import RidgeCV
from tests.conftest import REPO
from tests.test_ridge import ALPHAS, assert_same_fit, make_data
from train import build_trainer, train

gpu = pytest.mark.gpu
RUN = ["experiment=demo", "logger=none", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"]


def data_overrides(root):
    return [f"data.root={root}", "data.synthetic=null"]


# ----------------------------------------------------------------------------- DDP: the backend by device

def test_ddp_on_cpu_uses_gloo(make_cfg):
    trainer = build_trainer(make_cfg(["trainer=ddp_cpu", "logger=none"]))
    assert trainer.strategy._get_process_group_backend() == "gloo"
    assert trainer.strategy.root_device.type == "cpu"


@gpu
def test_ddp_on_gpus_uses_nccl(make_cfg):
    trainer = build_trainer(make_cfg(["trainer=ddp", "trainer.devices=1", "logger=none"]))
    assert trainer.strategy._get_process_group_backend() == "nccl"
    assert trainer.strategy.root_device.type == "cuda"  # where the ridge head is fitted (train.fit_and_test)


@gpu
def test_ddp_run_on_nccl_writes_the_run(synthetic_root, tmp_path):
    """train.py with trainer=ddp on one GPU: the process group is NCCL, metrics are reduced through it."""
    run = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "train.py", *RUN, *data_overrides(synthetic_root), "trainer=ddp", "trainer.devices=1",
         "head=ridge", f"feature_cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = proc.stdout + proc.stderr + "".join(p.read_text() for p in run.glob("*.log"))
    assert "nccl" in logs.lower()
    assert json.loads((run / "run.json").read_text())["world_size"] == 1
    assert np.isfinite(json.loads((run / "metrics.json").read_text())["test"]["r_mean"])
    assert str(np.load(run / "ridge_cv.npz")["device"]).startswith("cuda")


# ----------------------------------------------------------------------------- ridge on CUDA

@gpu
@pytest.mark.parametrize("solver", ["primal", "dual"])
def test_ridge_on_cuda_agrees_with_cpu(solver):
    X, Y = make_data(n=150, d=20 if solver == "primal" else 200, v=400, seed=8)
    cpu = RidgeCV(alphas=ALPHAS, solver=solver, progress=False).fit(X, Y)
    cuda = RidgeCV(alphas=ALPHAS, solver=solver, progress=False, device="cuda").fit(X, Y)
    assert cuda.device_.startswith("cuda") and cuda.voxel_batch_ == 400  # auto: every voxel fits at once
    assert_same_fit(cuda, cpu, "cuda vs cpu", score_atol=1e-5)


@gpu
@pytest.mark.parametrize("solver", ["primal", "dual"])
def test_ridge_batch_on_cuda_stays_within_its_memory_estimate(solver):
    """The CUDA allocator's peak while one batch is solved stays under solve_bytes_per_voxel x batch."""
    from encoders.ridge import _DualSolver, _PrimalSolver, cv_splits
    n, d, vb = (2000, 256, 2048) if solver == "primal" else (300, 1000, 2048)
    g = torch.Generator(device="cuda").manual_seed(0)
    X = torch.randn(n, d, device="cuda", generator=g)
    Y = torch.randn(n, vb, device="cuda", generator=g)
    engine = (_PrimalSolver if solver == "primal" else _DualSolver)(X, cv_splits(5, n))
    alphas = torch.logspace(-2, 5, 10, dtype=torch.float64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    engine.solve(Y, alphas, "r2")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert 0 < peak <= engine.bytes_per_voxel(10, 4) * vb


# ----------------------------------------------------------------------------- mixed precision on CUDA

@gpu
@pytest.mark.filterwarnings("ignore:You are trying to `self.log()`")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_step_on_cuda_autocasts_only_the_backbone(dtype):
    torch.manual_seed(0)
    backbone = build_backbone("tiny")
    head = LinearHead(backbone.n_features, 7)
    model = EncodingModel(head, backbone.n_features, 7, backbone=backbone).cuda()
    images, targets = torch.randn(6, 3, 64, 64, device="cuda"), torch.randn(6, 7, device="cuda")
    with torch.no_grad():
        full = model.features(images)
    with torch.autocast("cuda", dtype=dtype):
        mixed = model.features(images)
        loss = model.training_step({"x": images, "y": targets}, 0)
    assert mixed.dtype == loss.dtype == torch.float32 and torch.isfinite(loss)
    assert 0 < (mixed - full).abs().max() < 0.05 * full.abs().max()  # the backbone ran in reduced precision
    loss.backward()
    assert head.linear.weight.grad is not None and head.linear.weight.grad.dtype == torch.float32


@gpu
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_train_on_gpu_with_mixed_precision(make_cfg, synthetic_root, tmp_path, precision):
    cfg = make_cfg([*RUN, *data_overrides(synthetic_root), "trainer.accelerator=gpu", "features=online",
                    "head=linear", f"precision={precision}"])
    result = train(cfg, tmp_path / "run")
    assert result.model.trainer.precision == precision
    assert result.model.trainer.strategy.root_device.type == "cuda"
    assert np.isfinite(result.metrics["test"]["r_mean"])


@gpu
def test_train_ridge_on_gpu_matches_cpu(make_cfg, synthetic_root, tmp_path):
    runs = {}
    for name, device in (("cpu", "trainer=cpu"), ("gpu", "trainer.accelerator=gpu")):
        cfg = make_cfg([*RUN, *data_overrides(synthetic_root), device, "head=ridge"], run_dir=tmp_path / name)
        train(cfg, tmp_path / name)
        runs[name] = np.load(tmp_path / name / "voxel_metrics.npz")
    assert str(np.load(tmp_path / "gpu" / "ridge_cv.npz")["device"]).startswith("cuda")
    assert str(np.load(tmp_path / "cpu" / "ridge_cv.npz")["device"]) == "cpu"
    diff = np.abs(runs["gpu"]["test_r"] - runs["cpu"]["test_r"])
    assert np.isfinite(diff).sum() > 100
    assert np.nanmax(diff) < 1e-3 and np.nanmedian(diff) < 1e-4


# ----------------------------------------------------------------------------- preprocessing on CUDA

def batch_transform_class():
    """encoders.preprocess.BatchTransform where it exists (issue 18.2), else skip."""
    cls = getattr(importlib.import_module("encoders.preprocess"), "BatchTransform", None)
    if cls is None:
        pytest.skip("encoders.preprocess.BatchTransform is not present on this branch")
    return cls


@gpu
@pytest.mark.parametrize("backbone", ["tiny", "alexnet"])
def test_batch_transform_on_cuda_matches_the_cpu(backbone):
    BatchTransform = batch_transform_class()
    pre = build_backbone(backbone).preprocess
    rng = np.random.default_rng(0)
    # Smooth images (an upsampled coarse grid) as photographs are, plus one of noise; two sizes.
    coarse = rng.integers(0, 256, size=(5, 12, 15, 3)).astype(np.float32)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(0, 3, 1, 2), size=(180, 225),
                                             mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    images = [x for x in smooth.round().clamp(0, 255).to(torch.uint8)]
    images.append(torch.from_numpy(rng.integers(0, 256, size=(150, 140, 3), dtype=np.uint8)))
    cuda = BatchTransform(pre)(images, "cuda").cpu()
    cpu = BatchTransform(pre, float_resize=True)(images, "cpu")
    level = 1 / 255 / min(pre.std)
    diff = (cuda - cpu).abs()
    assert cuda.shape == cpu.shape == (len(images), 3, pre.crop_size, pre.crop_size)
    assert diff.max() <= level + 1e-5
    assert (diff > 1e-4).float().mean() < 0.005
