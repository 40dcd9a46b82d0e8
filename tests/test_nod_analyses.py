"""A NOD run's image analyses read its images through the run's own datamodule: they work, and give the
same results, after the run's feature cache is deleted."""
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from rich.console import Console

from analyses.jobs.brainsail import BrainSAILOptions
from analyses.jobs.brainsail import analyse_run as brainsail_run
from analyses.jobs.clip_msm import ClipMSMOptions
from analyses.jobs.clip_msm import analyse_run as clip_msm_run
from analyses.jobs.wen2018 import Wen2018Options
from analyses.jobs.wen2018 import analyse_run as wen2018_run
from datamodules.nod import load_nod_subject
from datamodules.synthetic_images import write_category_folder
from datamodules.synthetic_nod import ensure_synthetic_nod
from encoders.run_dir import RunDir
from tests.conftest import REPO
from train import train

SMALL = dict(n_subjects=1, n_imagenet_sessions=1, runs_per_session=4, trials_per_run=30, n_coco=20, n_coco_runs=3,
             n_cortex=150, n_subcortical=6, image_size=32, n_dead=4, seed=1)
FAST = ["trainer=cpu", "trainer.enable_progress_bar=false", "logger=none", "head=ridge", "data=nod",
        f"data.n_cortex={SMALL['n_cortex']}"]


@pytest.fixture(scope="module")
def nod_root(tmp_path_factory) -> Path:
    return ensure_synthetic_nod(tmp_path_factory.mktemp("nod") / "nod", **SMALL)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def clip_msm_options(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(config_name="analyze", overrides=["analysis=clip_msm", *overrides])
    GlobalHydra.instance().clear()
    return ClipMSMOptions.from_config(OmegaConf.to_container(cfg.analysis, resolve=True))


def test_nod_run_stimuli_and_image_analyses_without_its_feature_cache(make_cfg, nod_root, tmp_path):
    cache = tmp_path / "cache"
    embed = train(make_cfg([*FAST, f"data.root={nod_root}", "backbone=tiny_clip", "backbone.layers=[embed]",
                            "backbone.normalize=true", f"feature_cache_dir={cache}"]), tmp_path / "embed").run_dir
    layers = train(make_cfg([*FAST, f"data.root={nod_root}", "backbone=tiny", "backbone.layers=[conv2,conv3]",
                             f"feature_cache_dir={cache}"], run_dir=tmp_path / "layers"), tmp_path / "layers").run_dir

    # The run's stimuli come from NODDataModule.open_stimuli: the subject's list, as the loader reads it.
    run = RunDir(embed)
    _, files = load_nod_subject(nod_root, 1, n_cortex=SMALL["n_cortex"])
    stimuli = run.stimuli()
    assert stimuli.names == files.names and len(stimuli) == 4 * 30 + 20
    for i in (0, len(files) - 1):
        np.testing.assert_array_equal(stimuli.image(i), files.image(i))

    # Every analysis once with the cache, once without: the same results.
    clip_opts = clip_msm_options("analysis.training_curve.sizes=[1.0]", "analysis.similarity_args.soft_wpmi.top_k=20")
    wen_opts = dict(n_boot=50, n_perm_modularity=20, n_perm_semantic=50, data_dir=str(tmp_path),
                    image_dir=str(write_category_folder(tmp_path / "cats", ["face", "place", "word"], 4, 32)))
    sail = dict(max_images=4, n_views=2, top_k=2, captions=None)
    before = {"clip": clip_msm_run(embed, clip_opts, Console(quiet=True)),
              "wen": wen2018_run(layers, Wen2018Options(out_subdir="wen_cached", **wen_opts))}
    assert RunDir(layers).feature_cache_file is not None
    shutil.rmtree(cache)
    assert RunDir(layers).feature_cache_file is None and RunDir(embed).feature_cache_file is None

    clip_opts.out_subdir = "clip_msm_nocache"
    after = {"clip": clip_msm_run(embed, clip_opts, Console(quiet=True)),
             "wen": wen2018_run(layers, Wen2018Options(out_subdir="wen_nocache", **wen_opts))}
    scores = [np.load(embed / sub / "scores.npz")["scores"] for sub in ("clip_msm", "clip_msm_nocache")]
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-4, atol=1e-5)
    assert after["clip"]["summary"]["n_probe_images"] == len(files)
    assert not after["wen"]["notes"] or not any("not available" in n for n in after["wen"]["notes"]), after["wen"]["notes"]
    best = [rows(layers / sub / "best_layer.csv") for sub in ("wen_cached", "wen_nocache")]
    assert best[1] == best[0] and int(best[1][0]["n_voxels"]) == SMALL["n_cortex"] - SMALL["n_dead"]
    assert before["wen"]["categories"]["n_voxels"] == after["wen"]["categories"]["n_voxels"]

    res = brainsail_run(embed, BrainSAILOptions(**sail))  # its images: the run's test split, read from NOD's files
    assert res["summary"]["n_images"] == 4 and (embed / "brainsail" / "maps.npz").is_file()
    names = np.load(embed / "brainsail" / "maps.npz")["ids"]
    test_ids = RunDir(embed).split_ids("test")[:4]
    assert names.tolist() == [str(i) for i in test_ids]
    assert all(files.names[i].startswith("coco/") for i in test_ids)
