"""analyze.py analysis=clip_msm end to end: tiny random open_clip CLIP (tiny_clip) + ridge on the synthetic
dataset's embed layer, two subjects. A random CLIP's text tower knows no concepts, so the acceptance test
supplies the concept embeddings T itself (analysis.concept_embeddings): least-squares directions in the
normalised image-embedding space that pick out each category's images, as a trained text tower would.

Those directions must stay inside the space the embeddings span. tiny_clip's embedding is ln_post(x) @ proj
with ln_post 64 wide: LayerNorm removes each token's mean, so the 64-d embeddings span 63 dimensions and the
64th singular value of the image matrix is float32 rounding (8e-7 against 44). Plain least squares
(rcond=None) put most of T into that direction (|T| ~ 1e5): the concept cosines P came out ~1e-6, the
SoftWPMI scores of the concepts differed by ~1e-5, the float32 rounding of the scores, and the hard labels
followed the rounding of the features (on a 2-core machine planted:food went to faces, the first concept,
in both subjects). rcond=1e-6 leaves that direction out: P varies by ~1e-3 over the images and each planted
group's own concept wins by a median score margin of 0.015-0.044 (asserted > 2e-3; before: 1e-5 to 9e-5, and
-4e-6 for food), 1000x the rounding."""
import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.stats
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import train
from analyses.jobs.base import run_job
from tests.conftest import REPO

CONCEPTS = {"faces": "face", "bodies": "body", "places": "place", "words": "word", "food": "food"}
# Enough images and signal that a random 64-d embedding supports category-selective voxels (all in ~10 s).
DATA = dict(n_shared=150, n_unique=900, n_sessions=5, image_size=64, volume_shape=[12, 14, 12], snr_range=[2.0, 4.0])


def _compose(config_name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose(config_name=config_name, return_hydra_config=True, overrides=overrides)


def _train(root: Path, subject: int, run_dir: Path, cache: Path) -> Path:
    synth = [f"data.synthetic.{k}={v}" for k, v in DATA.items() if k in ("n_shared", "n_unique", "n_sessions")]
    synth += [f"+data.synthetic.{k}={v}" for k, v in DATA.items() if k in ("image_size", "volume_shape", "snr_range")]
    cfg = _compose("train", ["backbone=tiny_clip", "head=ridge", "trainer=cpu", "logger=none", f"data.root={root}",
                             f"data.subject={subject}", f"feature_cache_dir={cache}", *synth])
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = subject - 1
    HydraConfig.instance().set_config(cfg)
    train.train(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two tiny_clip + ridge runs (subjects 1 and 2) in one sweep directory, and the test's concept embeddings."""
    base = tmp_path_factory.mktemp("clip_msm")
    root, sweep_dir = base / "synthetic_nsd", base / "sweep"
    runs = [_train(root, s, sweep_dir / f"{s - 1}_tiny_clip_ridge", base / "cache") for s in (1, 2)]
    GlobalHydra.instance().clear()
    from encoders.trained import load_trained

    with h5py.File(root / "ground_truth.h5", "r") as f:
        image_category = f["image_category"][:]
        categories = [c.decode() for c in f["categories"][:]]
    feats, labels = [], []
    for run in runs:
        split = json.loads((run / "split.json").read_text())
        ids = np.unique(np.concatenate([split[k] for k in ("train", "val", "test")]))
        feats.append(load_trained(run).cached_features(ids))
        labels.append(image_category[ids])
    I, labels = np.concatenate(feats), np.concatenate(labels)
    I = I / np.linalg.norm(I, axis=1, keepdims=True)
    Y = np.stack([labels == categories.index(c) for c in CONCEPTS.values()], axis=1).astype(float)
    T = np.linalg.lstsq(I, Y - Y.mean(0), rcond=1e-6)[0].T  # (5 concepts, 64), in the embeddings' span (module doc)
    np.save(base / "T.npy", T)
    return {"dir": sweep_dir, "runs": runs, "T": base / "T.npy", "root": root, "image_category": image_category,
            "categories": categories}


def _analyse(target: Path, *overrides: str):
    cfg = _compose("analyze", ["analysis=clip_msm", f"run_dir={target}", *overrides])
    GlobalHydra.instance().clear()
    run_job(cfg, target)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_clip_msm_assigns_each_planted_roi_its_concept(sweep):
    _analyse(sweep["dir"], f"analysis.concept_embeddings={sweep['T']}", "analysis.similarity_args.soft_wpmi.top_k=20",
             "analysis.training_curve.sizes=[0.25,1.0]", "analysis.compare=[wpmi]")
    expected = {"planted:face": "faces", "planted:body": "bodies", "planted:place": "places", "planted:word": "words",
                "planted:food": "food", "FFA-1": "faces", "EBA": "bodies", "PPA": "places", "VWFA-1": "words"}
    localizer = {}
    for run in sweep["runs"]:
        out = run / "clip_msm"
        rois = {r["roi"]: r for r in _rows(out / "roi_labels.csv")}
        for roi, concept in expected.items():
            assert rois[roi]["top_concept"] == concept, (run.name, roi, rois[roi])
            assert rois[roi]["expected_concept"] == concept
        assert float(rois["planted:place"]["expected_share"]) > 0.8
        with np.load(out / "scores.npz") as f:
            S, labels, scores = f["S"], f["labels"], f["scores"]
            np.testing.assert_allclose(S.sum(0), 1, atol=1e-5)
            np.testing.assert_array_equal(labels, scores.argmax(1))
            probe_ids, xyz = f["probe_ids"], f["voxel_xyz"]
        # decided by the data, not by float32 rounding (module doc): the planted groups' own concept leads the
        # best other concept by a median SoftWPMI margin far above the scores' rounding (~1e-5)
        with h5py.File(sweep["root"] / "ground_truth.h5", "r") as g:
            subject = json.loads((run / "split.json").read_text())["subject"]
            gt_row = {tuple(v): i for i, v in enumerate(g[f"subj{subject:02d}/voxel_xyz"][:])}
            preferred = g[f"subj{subject:02d}/preferred_category"][:][[gt_row[tuple(v)] for v in xyz]]
        for c, category in enumerate(CONCEPTS.values()):
            rows = preferred == sweep["categories"].index(category)
            margin = scores[rows, c] - np.delete(scores[rows], c, axis=1).max(1)
            assert np.median(margin) > 2e-3, (run.name, category, np.median(margin))
        # the top images of the planted ROIs show their categories (Fig. 4B): each ROI at least one of its 3,
        # >= 60% over all (chance 1/6; the random embedding confuses some bodies and faces)
        top_rows = _rows(out / "top_images.csv")
        hits = []
        for category in CONCEPTS.values():
            top = [int(r["image"]) for r in top_rows if r["roi"] == f"planted:{category}"]
            assert len(top) == 3 and set(top) <= set(probe_ids.tolist())
            hits.append(sweep["image_category"][top] == sweep["categories"].index(category))
            assert hits[-1].any(), (category, sweep["image_category"][top])
        assert np.mean(hits) >= 0.6, hits
        loc = _rows(out / "localizer.csv")
        assert [r["concept"] for r in loc] == list(CONCEPTS)
        assert all(float(r["r_msm"]) > 0.3 and float(r["r_hard"]) > 0.2 for r in loc), loc
        localizer[run] = json.loads((out / "summary.json").read_text())["localizer"]  # full precision
        assert localizer[run]["faces"]["r_msm"] == pytest.approx(float(loc[0]["r_msm"]), rel=1e-5)
        # training-size curve: more images, better; the full-size refit reproduces the run's own ridge
        curve = [r for r in _rows(out / "training_curve.csv") if r["roi"] == "all"]
        assert [int(r["n_train_images"]) for r in curve] == [int(round(0.25 * int(curve[1]["n_train_images"]))),
                                                              int(curve[1]["n_train_images"])]
        assert float(curve[0]["r2_mean"]) < float(curve[1]["r2_mean"])
        test_r2 = json.loads((run / "metrics.json").read_text())["test"]["r2_mean"]
        assert float(curve[1]["r2_mean"]) == pytest.approx(test_r2, abs=1e-4)
        assert {r["similarity"] for r in _rows(out / "similarities.csv")} == {"soft_wpmi", "wpmi"}
        for name in ("label_histograms.png", "top_images.png", "semantic_maps.png", "localizer.png",
                     "training_curve.png", "summary.json"):
            assert (out / name).stat().st_size > 0
    # paired test over subjects: scipy's ttest_rel on the per-subject correlations
    paired = _rows(sweep["dir"] / "clip_msm_localizer_paired_tiny_clip_ridge_synthetic.csv")
    for i, row in enumerate(paired):
        msm = [localizer[run][row["concept"]]["r_msm"] for run in sweep["runs"]]
        hard = [localizer[run][row["concept"]]["r_hard"] for run in sweep["runs"]]
        t, p = scipy.stats.ttest_rel(msm, hard)
        assert row["concept"] == list(CONCEPTS)[i] and int(row["n_subjects"]) == 2
        assert float(row["t"]) == pytest.approx(t, rel=1e-4) and float(row["p"]) == pytest.approx(p, rel=1e-4)
    assert (sweep["dir"] / "clip_msm_training_curve.png").is_file()


def test_text_tower_templates_and_folder_probe(sweep, tmp_path):
    """Without a file, T comes from the run's own CLIP text tower; the probe may be any image folder."""
    from PIL import Image

    from datamodules.nsd_files import StimulusBrick
    from encoders.text import TextEncoder
    from encoders.trained import load_trained

    brick = StimulusBrick(sweep["root"] / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5")
    folder = tmp_path / "probe"
    for i in range(24):
        (folder / f"cat{sweep['image_category'][i]}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(brick.image(i)).save(folder / f"cat{sweep['image_category'][i]}" / f"{i:03d}.png")
    run = sweep["runs"][0]
    _analyse(run, f"analysis.probe={folder}", "analysis.similarity_args.soft_wpmi.top_k=5",
             "analysis.training_curve.sizes=[]", 'analysis.templates=["a photo of {}.","{}"]',
             "analysis.out_subdir=clip_msm_text", "analysis.localizer_rois=[planted:face,planted:place]")
    out = run / "clip_msm_text"
    enc = load_trained(run)
    expected = TextEncoder.from_backbone(enc.backbone).encode(list(CONCEPTS), ["a photo of {}.", "{}"])
    with np.load(out / "scores.npz") as f:
        np.testing.assert_allclose(f["concept_embeddings"], expected, atol=1e-6)
        assert len(f["probe_files"]) == 24 and f["S"].shape == (5, enc.n_voxels)
        S, xyz = f["S"], f["voxel_xyz"]
    # the synthetic localizer: planted face contrast (mean signal of face images - of the others), correlated
    # with the faces S map over the voxels of the planted face and place groups
    with h5py.File(sweep["root"] / "ground_truth.h5", "r") as g:
        gt_xyz = [tuple(v) for v in g["subj01/voxel_xyz"][:]]
        rows = [gt_xyz.index(tuple(v)) for v in xyz]
        signal, preferred = g["subj01/signal"][:][:, rows], g["subj01/preferred_category"][:][rows]
    face = sweep["image_category"] == 0
    contrast = signal[face].mean(0) - signal[~face].mean(0)
    mask = np.isin(preferred, [0, 2])
    r_faces = float(_rows(out / "localizer.csv")[0]["r_msm"])
    assert r_faces == pytest.approx(scipy.stats.pearsonr(S[0, mask], contrast[mask])[0], abs=1e-5)
    assert all(Path(r["image"]).parent.parent == folder for r in _rows(out / "top_images.csv"))
    assert not (out / "training_curve.csv").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_probe_images"] == 24 and "text tower" in summary["concept_embeddings"]


def test_bad_concept_embeddings_name_the_file_and_write_nothing(sweep, tmp_path):
    bad = tmp_path / "T_bad.npy"
    np.save(bad, np.zeros((3, 64)))
    run = sweep["runs"][0]
    with pytest.raises(ValueError, match=r"T_bad\.npy.*\(3, 64\).*5 concepts"):
        _analyse(run, f"analysis.concept_embeddings={bad}", "analysis.out_subdir=clip_msm_bad")
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        _analyse(run, f"analysis.concept_embeddings={tmp_path / 'nope.npy'}", "analysis.out_subdir=clip_msm_bad")
    with pytest.raises(ValueError, match="top_k=100"):  # 24 probe images < CLIP-Dissect's top_k
        folder = tmp_path / "few"
        folder.mkdir()
        from PIL import Image
        for i in range(4):
            Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
        _analyse(run, f"analysis.probe={folder}", f"analysis.concept_embeddings={sweep['T']}",
                 "analysis.out_subdir=clip_msm_bad")
    assert not (run / "clip_msm_bad").exists()
