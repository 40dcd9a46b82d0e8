"""Sweeps: a joblib-launched backbone x head grid with a failing job, an Optuna search, the SLURM launcher.

The joblib sweep runs 3 backbones x 2 heads plus a backbone whose weights file is missing: its two
jobs fail, write failed.json, and every other job still completes; the sweep then exits 1 saying how
many failed, and the summary lists the failures.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from analyses.jobs.base import run_job
from datamodules.synthetic import ensure_synthetic
from tests.conftest import REPO, SMALL_SYNTHETIC

pytestmark = pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema")
SWEEP_DATA = {**SMALL_SYNTHETIC, "n_subjects": 1, "n_shared": 40, "n_unique": 80, "n_sessions": 3}
FAST = ["experiment=demo", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=none"]


@pytest.mark.slow  # a joblib sweep end to end; fast: test_optuna_search_returns_the_validation_metric, test_train.py::test_guarded_*
def test_joblib_sweep_completes_around_a_failing_job(tmp_path, capsys):
    root = ensure_synthetic(tmp_path / "data", **SWEEP_DATA)
    extra = tmp_path / "conf" / "backbone"
    extra.mkdir(parents=True)
    (extra / "broken.yaml").write_text("defaults:\n  - tiny\n  - _self_\nweights_path: /nonexistent/broken_tiny.pt\n")
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         "backbone=tiny,tiny_vit,alexnet,broken", "head=linear,ridge", *FAST,
         f"data.root={root}", "data.synthetic=null", f"feature_cache_dir={tmp_path / 'cache'}",
         f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"hydra.sweep.dir={sweep}",
         f"paths.output_dir={tmp_path / 'outputs'}"],
        cwd=REPO, capture_output=True, text=True, timeout=500,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-4000:]  # after every other job finished: how many failed, and where
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 2 job(s) of the sweep failed (first: ")
    assert f"sweep_dir={sweep}" in proc.stderr and "broken_tiny.pt" in proc.stderr
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr  # the jobs ran in 2 worker processes
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 8
    done = [j for j in jobs if (j / "metrics.json").exists()]
    failed = [j for j in jobs if (j / "failed.json").exists()]
    assert sorted(j.name.split("_", 1)[1] for j in done) == sorted(
        f"{b}_{h}" for b in ("tiny", "tiny_vit", "alexnet") for h in ("linear", "ridge"))
    assert sorted(j.name.split("_", 1)[1] for j in failed) == ["broken_linear", "broken_ridge"]
    for job in done:
        metrics = json.loads((job / "metrics.json").read_text())
        assert np.isfinite(metrics["test"]["r_mean"])
    record = json.loads((failed[0] / "failed.json").read_text())
    assert record["type"] == "WeightsError" and "/nonexistent/broken_tiny.pt" in record["error"]
    assert "backbone=broken" in record["overrides"] and "Traceback" in record["traceback"]

    capsys.readouterr()
    run_job(OmegaConf.create({"analysis": {"name": "summary", "split": "test", "rois": ["FFA-1"]}}), sweep)
    out = capsys.readouterr().out
    assert "2 failed job(s)" in out and "WeightsError" in out and "broken_tiny.pt" in out
    assert all(name in out for name in ("tiny_vit", "alexnet", "ridge"))
    with open(sweep / "summary.csv") as f:
        assert len(f.read().strip().splitlines()) == 1 + 6  # header + the completed runs


def test_optuna_search_returns_the_validation_metric(synthetic_root, tmp_path, monkeypatch):
    """Two trials of conf/hparams_search/optuna.yaml, in this process (the basic launcher)."""
    import train
    sweep = tmp_path / "optuna"
    monkeypatch.setattr(sys, "argv", [
        "train.py", f"--config-path={REPO / 'conf'}", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *FAST, f"data.root={synthetic_root}",
        "data.synthetic=null", f"feature_cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}",
        f"paths.output_dir={tmp_path / 'outputs'}"])
    train.main()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = [json.loads((d / "metrics.json").read_text())["val"]["r_mean"]
              for d in sorted(sweep.iterdir()) if (d / "metrics.json").exists()]
    assert len(trials) == 2
    assert best["best_value"] == pytest.approx(max(trials), abs=1e-12)
    assert {"optimizer.lr", "optimizer.weight_decay", "scheduler.gamma", "data.batch_size"} <= best["best_params"].keys()


def test_experiment_configs_compose(make_cfg):
    cfg = make_cfg(["experiment=backbone_sweep"])
    params = cfg.hydra.sweeper.params
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert params.backbone.split(",") == ["resnet50", "alexnet", "clip_rn50", "clip_vitb32", "dinov2_vitb14",
                                          "siglip_vitb16"]
    assert params.head.split(",") == ["linear", "ridge"]
    cfg = make_cfg(["experiment=clip_msm", "data.root=/nsd"])
    assert cfg.optimized_metric == "val/r2_mean"  # experiments override train.yaml (its _self_ comes first)
    assert cfg.head._target_ == "encoders.heads.RidgeHead" and cfg.data._target_ == "datamodules.nsd.NSDDataModule"
    assert cfg.hydra.sweeper.params.backbone.split(",") == ["clip_rn50", "clip_vitb32", "resnet50", "alexnet"]
    if (REPO / "conf" / "data" / "video.yaml").exists():
        cfg = make_cfg(["experiment=wen2018_video", "data.root=/video"])
        assert cfg.backbone.name == "resnet50" and cfg.head.shuffle_folds is False and cfg.data.name == "video"
    cfg = make_cfg(["trainer=ddp"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu"


def test_submitit_slurm_launcher_writes_a_valid_sbatch_script(make_cfg, tmp_path, monkeypatch):
    """No SLURM here: the real launcher plugin runs until submission, with a stand-in `srun` on PATH
    (submitit checks for it), and the executor it configured writes its sbatch script."""
    import submitit
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    executors = []

    def capture(self, fn, *args):
        executors.append(self)
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    cfg = make_cfg(["hydra/launcher=submitit_slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}", "trainer=ddp",
                    "trainer.devices=4", "hydra.launcher.tasks_per_node=4", "hydra.launcher.gpus_per_node=4",
                    "hydra.launcher.partition=gpu"])
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    assert launcher.launch([["backbone=tiny"]], initial_job_idx=0) == []
    script = executors[0]._executor._make_submission_file_text("python train.py", "0")
    for line in ("--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=240", "--signal=USR2@120"):
        assert f"#SBATCH {line}" in script, script
