"""Wen 2018 analyses end to end: a trained run is loaded back (encoders.trained), and
`analyze.py analysis=wen2018` finds the synthetic dataset's planted category-selective ROIs."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from analyses.methods import categories as cat
from analyses.methods import stats
from analyses.jobs.wen2018 import Wen2018Options, analyse_run, sweep_best_layer
from datamodules.image_folder import category_folder
from datamodules.synthetic_images import write_category_folder
from encoders.run_dir import RunDir
from encoders.trained import load_trained
from tests.conftest import REPO

# Flattened conv maps keep where things are: with them the tiny random CNN separates the six categories.
RUN = ["experiment=demo", "logger=none", "trainer.enable_progress_bar=false", "head=ridge",
       "backbone.pooling=flatten", "backbone.layers=[conv1,conv2,conv3]"]
FLOC_GROUPS = {"face": ["OFA", "FFA-1", "FFA-2", "mTL-faces", "aTL-faces"], "body": ["EBA", "FBA-1", "FBA-2", "mTL-bodies"],
               "place": ["OPA", "PPA", "RSC"], "word": ["OWFA", "VWFA-1", "VWFA-2", "mfs-words", "mTL-words"]}


@pytest.fixture(scope="module")
def trained_run(synthetic_root, tmp_path_factory):
    """A tiny-backbone ridge run on three layers of the shared synthetic dataset."""
    from train import train

    tmp = tmp_path_factory.mktemp("wen2018")
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=[*RUN, f"data.root={synthetic_root}", "data.synthetic=null",
                                 f"feature_cache_dir={tmp / 'cache'}"])
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp / "run")
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    result = train(cfg, tmp / "run")
    GlobalHydra.instance().clear()
    return result.run_dir


def test_load_trained_reproduces_the_run(trained_run):
    rng_before = torch.get_rng_state()
    enc = load_trained(trained_run)
    assert torch.equal(torch.get_rng_state(), rng_before)  # rebuilding with the run's seed leaves the RNG alone
    preds = np.load(trained_run / "predictions.npz")
    assert enc.layers == ["conv1", "conv2", "conv3"] and enc.n_voxels == preds["test_pred"].shape[1]
    assert enc.feature_slices == enc.backbone.feature_slices
    raw = enc.cached_features(preds["test_ids"])
    np.testing.assert_allclose(enc.predict_features(raw), preds["test_pred"], atol=1e-5)
    # from the images themselves, through the rebuilt backbone and its transform
    from datamodules.nsd_files import NSDPaths, StimulusBrick
    info = json.loads((trained_run / "run.json").read_text())
    brick = StimulusBrick(NSDPaths(__import__("pathlib").Path(info["data"]["root"]), 1).stimuli)
    ids = preds["test_ids"][:16]
    np.testing.assert_allclose(enc.predict_images([brick.image(i) for i in ids]), preds["test_pred"][:16], atol=1e-4)
    # the run's own images through RunDir.stimuli(): the same pixels
    np.testing.assert_array_equal(RunDir(trained_run).stimuli().image(int(ids[0])), brick.image(int(ids[0])))
    assert enc.predicts_images and enc.takes_backbone_features and not enc.has_frame_stage


def test_a_head_pt_without_the_saved_transform_still_loads(trained_run, tmp_path):
    """Runs written before head.pt held the whole transform: the standardisation alone (plain z-scoring with
    the saved mean and std, as those runs were trained). This run was trained with the robust clip, which
    the old format does not hold: its predictions differ from the run's by exactly the head applied to
    what the clip removed."""
    copy = Path(shutil.copytree(trained_run, tmp_path / "old"))
    state = torch.load(copy / "head.pt", weights_only=False)
    del state["feature_transform"]
    torch.save(state, copy / "head.pt")
    preds = np.load(copy / "predictions.npz")
    old, new = load_trained(copy), load_trained(trained_run)
    raw = new.cached_features(preds["test_ids"])
    plain = (torch.as_tensor(raw).float() - state["feature_mean"]) / state["feature_std"]
    np.testing.assert_array_equal(old.head_inputs(raw), plain.numpy())
    transform = new.transform
    np.testing.assert_array_equal(new.head_inputs(raw), torch.clamp(plain, transform.lower, transform.upper).numpy())
    removed = (plain - torch.clamp(plain, transform.lower, transform.upper)).numpy()
    assert 0 < (removed != 0).mean() < 0.05                  # a few values of the test images were clipped
    weight = new.model.head.weight.detach().numpy()          # the ridge head: linear
    np.testing.assert_allclose(old.predict_features(raw) - preds["test_pred"], removed @ weight.T, atol=1e-4)


def test_load_trained_refuses_a_different_backbone_and_names_missing_files(trained_run, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("head.pt", "run.json"):
        shutil.copy(trained_run / name, copy / name)
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    config["seed"] = int(config["seed"]) + 1  # a random-init backbone rebuilt with another seed differs
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="weights differ"):
        load_trained(copy)
    (copy / "head.pt").unlink()
    with pytest.raises(FileNotFoundError, match="head.pt"):
        load_trained(copy)


def roi_group_dprime(run_dir, dprime):
    with np.load(run_dir / "voxel_metrics.npz") as f:
        rois = {k[4:]: f[k] for k in f.files if k.startswith("roi_")}
    out = {}
    for group, names in FLOC_GROUPS.items():
        mask = np.zeros(dprime.shape[1], bool)
        for name in names:
            mask |= rois.get(name, False)
        out[group] = np.nanmean(dprime[:, mask], axis=1)
    return out


@pytest.mark.slow  # the CLI end to end; fast: test_wandb_entry_offline runs every analysis through the job
def test_cli_wen2018_finds_the_planted_category_rois(trained_run, tmp_path):
    semantic = tmp_path / "semantic.csv"
    names = ["body", "face", "food", "object", "place", "word"]
    animate = np.array([1, 1, 0, 0, 0, 0])
    matrix = np.where(animate[:, None] == animate[None, :], 0.8, 0.1)
    np.fill_diagonal(matrix, 1.0)
    with open(semantic, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["", *names])
        writer.writerows([[n, *row] for n, row in zip(names, matrix.tolist())])
    proc = subprocess.run(
        [sys.executable, "analyze.py", "analysis=wen2018", f"run_dir={trained_run}", f"paths.data_dir={tmp_path}",
         "analysis.clustering.n_perm_modularity=40",
         f"analysis.semantic.source={semantic}", "analysis.semantic.n_perm_semantic=200"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = trained_run / "wen2018"
    for name in ("accuracy.csv", "accuracy.json", "accuracy.png", "best_layer.csv", "best_layer.png", "dprime.csv",
                 "dprime.png", "categories.json", "similarity.png", "layers_categories.csv", "layers_categories.png",
                 "voxels.npz", "category_maps.npz"):
        assert (out / name).is_file(), name
    voxels = np.load(out / "voxels.npz")
    preds = np.load(trained_run / "predictions.npz")

    # accuracy: FDR-thresholded counts from the bootstrap p-values
    acc = json.loads((out / "accuracy.json").read_text())
    np.testing.assert_allclose(voxels["r"], stats.pearson_r(preds["test_pred"], preds["test_true"]))
    np.testing.assert_allclose(voxels["p"], stats.bootstrap_pvalues(preds["test_pred"], preds["test_true"], n_boot=2000))
    from scipy.stats import false_discovery_control
    assert acc["n_significant"] == int((false_discovery_control(voxels["p"]) < 0.01).sum()) == voxels["significant"].sum()
    assert acc["method"] == "bootstrap" and 0 < acc["n_significant"] < acc["n_voxels"]
    with open(out / "accuracy.csv") as f:
        rows = {r["roi"]: r for r in csv.DictReader(f)}
    assert int(rows["all"]["n_significant"]) == acc["n_significant"]
    assert float(rows["PPA"]["r_mean"]) > 0.4

    # best layer: counts per ROI add up to the ROI's voxels
    with open(out / "best_layer.csv") as f:
        layer_rows = {r["roi"]: r for r in csv.DictReader(f)}
    assert sum(int(layer_rows["all"][f"n_{n}"]) for n in ("conv1", "conv2", "conv3")) == acc["n_voxels"]
    assert voxels["layer_scores"].shape == (3, acc["n_voxels"])

    # virtual fMRI: the planted category-selective ROIs prefer their category
    dprime = voxels["dprime"]
    assert dprime.shape == (6, acc["n_voxels"])
    profiles = roi_group_dprime(trained_run, dprime)
    for group in ("face", "place", "word"):
        assert names[int(np.argmax(profiles[group]))] == group, (group, profiles[group])
    # the tiny random CNN tells bodies from objects only weakly: body is among the top two
    assert "body" in [names[i] for i in np.argsort(-profiles["body"])[:2]], profiles["body"]
    with open(out / "dprime.csv") as f:
        top = {r["roi"]: r["top_category"] for r in csv.DictReader(f)}
    assert top["PPA"] == "place" and top["VWFA-1"] == "word" and top["FFA-1"] == "face"

    # category organisation: the chosen clusters and their Q
    org = json.loads((out / "categories.json").read_text())
    assert org["categories"] == names and org["n_images"] == [50] * 6
    sim = np.array(org["similarity"])
    assert sim.shape == (6, 6) and np.allclose(np.diag(sim), 1)
    labels = np.array(org["clusters"]["labels"])
    assert org["clusters"]["q"] == pytest.approx(cat.signed_modularity(cat.network(sim), labels))
    assert 0 < org["clusters"]["p"] <= 1 and set(org["layers"]) == {"conv1", "conv2", "conv3"}
    assert org["clusters"]["q"] == pytest.approx(max(org["clusters"]["q_by_k"].values()))
    r_sem, p_sem = cat.similarity_correlation(sim, matrix, n_perm=200, seed=0)
    assert (org["semantic"]["r"], org["semantic"]["p"]) == (pytest.approx(r_sem), pytest.approx(p_sem))
    assert (out / "similarity.png").stat().st_size > 1000
    assert "Q=" in proc.stdout and "FFA-1" in proc.stdout
    assert not (trained_run / "wandb").exists()  # wandb=auto: the run did not log to W&B, nor does its analysis


def test_wandb_entry_offline(trained_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    opts = Wen2018Options(n_boot=50, n_per_category=4, n_perm_modularity=3, data_dir=str(tmp_path),
                          out_subdir="wen2018_wandb", wandb="true")
    result = analyse_run(trained_run, opts)
    wandb_dir = result["wandb"]
    assert wandb_dir and "offline-run" in wandb_dir
    assert list(__import__("pathlib").Path(wandb_dir).glob("*.wandb"))


def test_sweep_form_of_the_best_layer(tmp_path):
    """One run per layer; voxel v is best explained by layer v % 3 (planted in the runs' val r)."""
    n_vox = 12
    truth = np.arange(n_vox) % 3
    for k, layer in enumerate(["conv3", "conv1", "conv2"]):  # registry order is conv1, conv2, conv3
        d = tmp_path / f"{k}_tiny_ridge"
        d.mkdir()
        (d / "metrics.json").write_text("{}")
        (d / "run.json").write_text(json.dumps({"backbone": "tiny", "head": "ridge", "layers": [layer],
                                                "data": {"dataset": "synthetic", "subject": 1}}))
        index = int(layer[-1]) - 1
        val_r = np.where(truth == index, 0.6, 0.2) + 0.01 * np.arange(n_vox) / n_vox
        np.savez(d / "voxel_metrics.npz", val_r=val_r, test_r=-val_r, voxel_xyz=np.arange(n_vox * 3).reshape(-1, 3),
                 roi_A=np.arange(n_vox) < 6, roi_B=np.arange(n_vox) >= 6)
    written = sweep_best_layer(sorted(tmp_path.iterdir()), tmp_path, split="val")
    assert [p.name for p in written] == ["wen2018_best_layer_tiny_ridge.csv", "wen2018_best_layer_tiny_ridge.png"]
    with open(written[0]) as f:
        rows = {r["roi"]: r for r in csv.DictReader(f)}
    assert [int(rows["A"][f"n_conv{i}"]) for i in (1, 2, 3)] == [2, 2, 2]
    assert [int(rows["all"][f"n_conv{i}"]) for i in (1, 2, 3)] == [4, 4, 4]


def test_image_folders(tmp_path):
    folder = write_category_folder(tmp_path / "imgs", ["face", "word"], n_per_category=3, size=32, seed=1)
    files, labels, names = category_folder(folder)
    assert names == ["face", "word"] and labels.tolist() == [0, 0, 0, 1, 1, 1]
    stamp = files[0].stat().st_mtime_ns
    assert write_category_folder(tmp_path / "imgs", ["face", "word"], 3, 32, seed=1) == folder
    assert files[0].stat().st_mtime_ns == stamp  # reused, not redrawn
    (tmp_path / "bad" / "face").mkdir(parents=True)
    shutil.copy(files[0], tmp_path / "bad" / "face" / "a.png")
    with pytest.raises(ValueError, match="bad: needs >= 2 category sub-folders"):
        category_folder(tmp_path / "bad")


def test_the_config_file_maps_onto_the_options():
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(config_name="analyze", overrides=["analysis=wen2018", "analysis.significance.method=permutation"])
    GlobalHydra.instance().clear()
    opts = Wen2018Options.from_config(OmegaConf.to_container(cfg.analysis, resolve=True), data_dir="data")
    assert opts.significance == "permutation" and opts.n_boot == 2000 and opts.semantic is None
    with pytest.raises(ValueError, match="unknown wen2018 option"):
        Wen2018Options.from_config({"name": "wen2018", "clustering": {"k_maxx": 3}})


def test_bad_inputs_are_clear_errors_before_anything_is_written(trained_run, tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="predictions.npz: not found"):
        analyse_run(tmp_path)
    assert not (tmp_path / "wen2018").exists()
    for bad, match in ((dict(image_dir=str(tmp_path / "no_images")), "no_images: image folder not found"),
                       (dict(semantic=str(tmp_path / "no.csv")), "no.csv: semantic similarity CSV not found")):
        with pytest.raises(FileNotFoundError, match=match):
            analyse_run(trained_run, Wen2018Options(out_subdir="wen2018_bad", data_dir=str(tmp_path), **bad))
        assert not (trained_run / "wen2018_bad").exists()


def test_semantic_similarity_from_the_runs_clip_text_tower(tmp_path):
    """semantic=clip with a CLIP backbone uses its own text tower (here a tiny random CLIP in its place)."""
    from types import SimpleNamespace

    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from analyses.jobs.wen2018 import semantic_matrix
    from encoders.backbones import get_spec

    torch.manual_seed(0)
    model = CLIP(16, CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
                 CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)).eval()
    enc = SimpleNamespace(backbone=SimpleNamespace(model=model, spec=get_spec("clip_vitb32")))
    names = ["face", "body", "place", "word"]
    matrix, source = semantic_matrix(enc, names, Wen2018Options(semantic="clip", clip_template="{}"))
    with torch.no_grad():
        emb = model.encode_text(open_clip.get_tokenizer("ViT-B-32-quickgelu")(names)).numpy()
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_allclose(matrix, emb @ emb.T, atol=1e-6)
    assert "clip_vitb32" in source
