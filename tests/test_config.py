"""Every config group composes; the W&B logger carries a predictable, overridable group."""
from pathlib import Path

import pytest
from hydra.utils import instantiate

REPO = Path(__file__).resolve().parents[1]
BACKBONE_FILES = sorted(p.stem for p in (REPO / "conf/backbone").glob("*.yaml"))
FAMILY_FILES = ("timm", "open_clip", "torchvision", "custom")
BACKBONES = [b for b in BACKBONE_FILES if b not in (*FAMILY_FILES, "base")]  # the presets


def test_backbone_configs_match_the_registry():
    from encoders.backbones import FAMILIES, list_backbones
    assert set(BACKBONES) == set(list_backbones()) and set(FAMILY_FILES) == set(FAMILIES)
    assert set(BACKBONE_FILES) == {*BACKBONES, *FAMILY_FILES, "base"}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_composes(make_cfg, backbone):
    cfg = make_cfg([f"backbone={backbone}", "data=nsd", "data.root=/somewhere"])
    assert cfg.backbone.name == backbone
    assert cfg.backbone.pretrained == (backbone not in ("tiny", "tiny_vit", "tiny_clip"))
    assert make_cfg([f"backbone={backbone}", "experiment=demo"]).backbone.pretrained is False


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_heads_are_partials_completed_at_run_time(make_cfg, head):
    cfg = make_cfg([f"head={head}"])
    module = instantiate(cfg.head)(n_features=7, n_voxels=3)
    import torch
    assert module(torch.zeros(2, 7)).shape == (2, 3)


def test_wandb_group_is_predictable_and_overridable(make_cfg, monkeypatch):
    """The group: logger.wandb.group when set, else the experiment, else the multirun directory's name, else
    <dataset>-subj<N>. (The mode is decided when the run starts: encoders.wandb_mode, tests/test_wandb.py.)"""
    cfg = make_cfg(["logger=wandb", "backbone=alexnet", "head=mlp"])
    assert cfg.logger.wandb._target_ == "encoders.wandb_logger.TrainingLogger"
    assert cfg.logger.wandb.group == "synthetic-subj1"
    assert list(cfg.logger.wandb.tags) == ["alexnet", "mlp", "synthetic", "subj1"]  # (resolved while its Hydra config is set)
    assert make_cfg(["logger=wandb", "data.subject=2"]).logger.wandb.group == "synthetic-subj2"
    assert make_cfg(["logger=wandb", "experiment=demo"]).logger.wandb.group == "demo"
    assert make_cfg(["logger=wandb", "logger.wandb.group=mine"]).logger.wandb.group == "mine"
    assert cfg.logger.wandb.job_type == "train" and cfg.logger.wandb.name is None
    both = make_cfg(["logger=csv_wandb"]).logger
    assert set(both) == {"csv", "wandb"}
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write
    swept = make_cfg(["logger=wandb"])
    with read_write(swept.hydra), open_dict(swept.hydra):
        swept.hydra.mode = RunMode.MULTIRUN
        swept.hydra.sweep.dir = "/tmp/sweeps/2026-01-01_00-00-00"
    HydraConfig.instance().set_config(swept)
    assert swept.logger.wandb.group == "2026-01-01_00-00-00"  # every job of a sweep in one group