"""`analyze.py analysis=localizer` on two synthetic subjects: selective-unit counts per layer (checked against
scipy on independently computed activations), tuning and RDM comparisons with the human–human ceiling, the
lesion table (its all-units row reproduces the run's own ridge), and bad input."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from analyses.methods.localizer import image_means
from analyses.jobs.base import run_job
from analyses.jobs.localizer import LocalizerOptions, analyse, read_region_trials, read_run, region_masks
from datamodules.image_folder import category_folder, read_image
from tests.conftest import REPO

RUN = ["experiment=demo", "logger=none", "trainer.enable_progress_bar=false", "head=ridge"]
WORD = ["VWFA-1", "VWFA-2"]


@pytest.fixture(scope="module")
def sweep(synthetic_root, tmp_path_factory):
    """Tiny-backbone ridge runs of subjects 1 and 2 in one sweep directory."""
    from train import train

    tmp = tmp_path_factory.mktemp("localizer")
    for subject in (1, 2):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
            cfg = compose(config_name="train", return_hydra_config=True,
                          overrides=[*RUN, f"data.subject={subject}", f"data.root={synthetic_root}", "data.synthetic=null",
                                     f"feature_cache_dir={tmp / 'cache'}"])
        run_dir = tmp / "sweep" / f"{subject - 1}_subject{subject}"
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.num = subject - 1
        HydraConfig.instance().set_config(cfg)
        train(cfg, run_dir)
    GlobalHydra.instance().clear()
    return tmp / "sweep"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(value: str) -> float:
    return float(value) if value != "" else float("nan")


def analyze_cfg(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(config_name="analyze", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


def test_localizer_on_two_synthetic_subjects(sweep, tmp_path):
    cfg = analyze_cfg(["analysis=localizer", f"sweep_dir={sweep}", f"paths.data_dir={tmp_path}",
                       "analysis.n_boot=60", "analysis.lesion_n_random=2"])
    run_job(cfg, sweep)
    out = sweep / "localizer"
    for name in ("unit_counts.csv", "unit_counts.png", "units.npz", "overlap.csv", "comparison.csv", "ceiling.csv",
                 "comparison.png", "lesions.csv", "lesions.png", "localizer.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    runs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())

    # per-layer counts, for the run's weights and a random init; recomputed here with scipy on activations
    # computed independently (the registry's tiny backbone rebuilt with the run's seed, images read afresh)
    counts = read_csv(out / "unit_counts.csv")
    main = [r for r in counts if r["localizer"] == "main" and r["variant"] == "run"]
    assert [r["layer"] for r in main if r["category"] == "word"] == ["conv1", "conv2", "conv3", "embed"]
    assert {r["variant"] for r in counts} == {"run", "random"}
    files, labels, names = category_folder(tmp_path / "localizer" / "synthetic_n40_px64_seed0")
    from encoders.backbones import build_backbone
    torch.manual_seed(0)
    bb = build_backbone("tiny", layers=["conv3", "embed"])
    with torch.no_grad():
        acts = bb.forward_layers(torch.stack([bb.transform(read_image(p)) for p in files]))
    for layer in ("conv3", "embed"):
        a = acts[layer].numpy()
        for c, name in enumerate(names):
            t = scipy.stats.ttest_ind(a[labels == c], a[labels != c], equal_var=False).statistic
            row = next(r for r in main if r["layer"] == layer and r["category"] == name)
            assert int(row["n_selective"]) == int(np.sum(t > 7.0)), (layer, name)
            assert int(row["n_units"]) == a.shape[1]
    assert int(next(r for r in main if r["layer"] == "embed" and r["category"] == "word")["n_selective"]) > 0
    with np.load(out / "units.npz") as f:
        t_embed = f["tiny__random-init (seed 0)__main__embed__word"]
    a = acts["embed"].numpy()
    word = names.index("word")
    np.testing.assert_allclose(t_embed, scipy.stats.ttest_ind(a[labels == word], a[labels != word],
                                                              equal_var=False).statistic, rtol=1e-4)
    overlap = read_csv(out / "overlap.csv")
    assert {r["localizer_b"] for r in overlap} == {"synthetic_seed1"}
    assert all(0 <= num(r["jaccard"]) <= 1 for r in overlap if r["jaccard"])

    # the brain side: the region's trials read back average to the run's own test responses
    run = read_run(runs[0])
    cols = np.flatnonzero(run.rois["VWFA-1"] | run.rois["VWFA-2"])
    ids, values = read_region_trials(run, cols)
    np.testing.assert_allclose(image_means(ids, values, run.test_ids), run.test_true[:, cols], atol=1e-5)

    # comparisons: both subjects, both measures; the human–human ceiling of the planted shared selectivity is high
    comparison = read_csv(out / "comparison.csv")
    word_tuning = [r for r in comparison if r["category"] == "word" and r["measure"] == "tuning" and r["localizer"] == "main"]
    assert {r["subject"] for r in word_tuning} == {"1", "2"}
    for r in word_tuning:
        assert num(r["score_lo"]) <= num(r["score"]) <= num(r["score_hi"])
        assert 0 < num(r["reliability_y"]) <= 1 and int(r["n_images"]) == 150
    ceiling = read_csv(out / "ceiling.csv")
    assert {(r["category"], r["measure"]) for r in ceiling} == {(c, m) for c in ("face", "body", "place", "word")
                                                                for m in ("tuning", "rdm")}
    for r in ceiling:
        if r["measure"] == "tuning":
            assert num(r["score"]) > 0.8 and num(r["score_nc"]) > 0.9, r
            assert num(r["score_lo"]) <= num(r["score"]) <= num(r["score_hi"])

    # lesions: every condition per region; all units = the run's own ridge on those voxels
    lesions = read_csv(out / "lesions.csv")
    assert {r["condition"] for r in lesions} == {"all", "all_but_selective", "selective", "random_k", "all_but_random_k"}
    with np.load(runs[0] / "voxel_metrics.npz") as f:
        run_r = np.nanmean(f["test_r"][cols])
    row = next(r for r in lesions if r["run"] == runs[0].name and r["category"] == "word" and r["condition"] == "all")
    assert num(row["r_mean"]) == pytest.approx(run_r, abs=0.01)
    summary = json.loads((out / "localizer.json").read_text())
    assert [s["name"] for s in summary["localizers"]] == ["main", "synthetic_seed1"]


def test_tmap_regions_and_bad_tmap(sweep, tmp_path):
    run_dir = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())[0]
    run = read_run(run_dir)
    t = np.zeros(len(run.voxel_xyz))
    t[run.rois["FFA-1"]] = 5.0
    np.save(tmp_path / "faces_sub1.npy", t)
    notes = []
    masks = region_masks(run, LocalizerOptions(regions={}, tmaps={"face": str(tmp_path / "faces_sub{subject}.npy")}), notes)
    assert list(masks) == ["face"] and (masks["face"] == run.rois["FFA-1"]).all() and not notes
    np.save(tmp_path / "bad.npy", np.zeros(7))
    with pytest.raises(ValueError, match=r"bad\.npy.*\(7,\)"):
        analyse([run_dir], tmp_path / "out", LocalizerOptions(tmaps={"face": str(tmp_path / "bad.npy")}))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="unknown localizer option"):
        LocalizerOptions.from_config({"name": "localizer", "t_treshold": 3})


@pytest.mark.slow  # the CLI end to end; fast: test_localizer_on_two_synthetic_subjects
def test_cli_single_run(sweep, tmp_path):
    run_dir = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())[0]
    proc = subprocess.run(
        [sys.executable, "analyze.py", "analysis=localizer", f"run_dir={run_dir}", f"paths.data_dir={tmp_path}",
         "analysis.layers=null", "analysis.compare_random=false", "analysis.lesions=false", "analysis.n_boot=20",
         "analysis.synthetic_seeds=[0]", "analysis.out_subdir=loc_cli"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_dir / "loc_cli"
    assert (out / "unit_counts.csv").is_file() and (out / "comparison.csv").is_file()
    assert not (out / "ceiling.csv").exists()  # one subject: no human–human ceiling
    assert "selective units per layer" in proc.stdout
