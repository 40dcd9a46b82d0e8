"""Test-wide settings (never touch the network) and shared fixtures."""
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import open_dict  # noqa: E402

import train  # noqa: E402,F401  (registers the config resolvers, e.g. ${wandb_group:...})

REPO = Path(__file__).resolve().parents[1]

# Small enough for 2 CPU cores, large enough for stable statistics (150 test images).
SMALL_SYNTHETIC = dict(n_subjects=2, n_shared=150, n_unique=300, n_sessions=5, image_size=64,
                       volume_shape=(12, 14, 12), seed=0)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are skipped, with the reason, where CUDA is not available."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic NSD-layout dataset shared by the tests that only read it."""
    from datamodules.synthetic import ensure_synthetic
    return ensure_synthetic(tmp_path_factory.mktemp("data") / "synthetic_nsd", **SMALL_SYNTHETIC)


@pytest.fixture
def make_cfg(tmp_path):
    """compose(overrides) -> the train config as Hydra would give it, with outputs under tmp_path."""

    def _make(overrides=(), run_dir: Path | None = None):
        GlobalHydra.instance().clear()
        overrides = [f"feature_cache_dir={tmp_path / 'feature_cache'}", *overrides]
        with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
            cfg = compose(config_name="train", return_hydra_config=True, overrides=overrides)
        run_dir = run_dir or tmp_path / "run"
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _make
    GlobalHydra.instance().clear()
