"""Every config group composes; the W&B logger is offline by default and carries the grouping."""
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


def test_wandb_is_offline_without_a_key_and_grouped(make_cfg, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = make_cfg(["logger=wandb", "backbone=alexnet", "head=mlp"])
    assert cfg.logger.wandb.offline is True
    assert cfg.logger.wandb.group == "synthetic"
    assert list(cfg.logger.wandb.tags) == ["alexnet", "mlp", "synthetic", "subj1"]
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
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert make_cfg(["logger=wandb"]).logger.wandb.offline is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert make_cfg(["logger=wandb"]).logger.wandb.offline is True
