"""Train as train.py does, on a dataset with pure-noise voxels appended: what a head makes of voxels that
carry no signal at all (their test R² should sit just below 0, never far below), beside the planted ones.

    scores = fit_with_noise_voxels(["experiment=demo_video", "backbone=alexnet", "head=ridge"], out_dir)
    scores["planted_r"], scores["planted_r2"], scores["noise_r2"]      # (n_voxels,) test scores
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def fit_with_noise_voxels(overrides: list[str], out_dir: Path, n_noise: int = 100, seed: int = 0) -> dict:
    """Compose the train config with ``overrides``, build the model as train.py does (``build_model``) from a
    datamodule whose responses get ``n_noise`` extra columns of iid N(0, 1) in every split, fit and test it
    (``fit_and_test``). Returns {"planted_r", "planted_r2", "noise_r", "noise_r2"} (test, per voxel) and the
    run.json-style description of the fitted transform ("transform")."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import lightning as L

    import train
    from encoders.run_dir import RunDir
    from tests.conftest import REPO

    out_dir = Path(out_dir)
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["logger=none", "trainer.enable_progress_bar=false", *overrides])
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    build_datamodule, n_planted = train.build_datamodule, {}

    def with_noise_voxels(cfg_):
        dm = build_datamodule(cfg_)
        rng = np.random.default_rng(seed)
        n_planted["n"] = dm.n_voxels
        for split, y in dm._responses.items():  # the datamodule's served responses (datamodules.serving)
            dm._responses[split] = np.concatenate([y, rng.standard_normal((len(y), n_noise)).astype(np.float32)], 1)
        return dm

    train.build_datamodule = with_noise_voxels
    try:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # as train.start_run: the same random-init backbone
        model, dm, features, _ = train.build_model(cfg)
        train.fit_and_test(cfg, model, dm, features, RunDir(out_dir), None)
    finally:
        train.build_datamodule = build_datamodule
        GlobalHydra.instance().clear()
    r, r2 = (model.test_result[k].numpy() for k in ("r", "r2"))
    n = n_planted["n"]
    return {"planted_r": r[:n], "planted_r2": r2[:n], "noise_r": r[n:], "noise_r2": r2[n:],
            "transform": model.transform.describe({s: features.get(s) for s in ("val", "test")})}
