"""``analyze.py analysis=brainsail`` end to end on a synthetic run with a ViT backbone (tiny open_clip CLIP)."""
import csv
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from analyses.methods import attribution as attr
from analyses.jobs.brainsail import BrainSAILOptions, analyse_run, load_captions
from tests.conftest import REPO
from train import train

RUN = ["experiment=demo", "trainer.enable_progress_bar=false", "logger=none", "backbone=tiny_clip", "head=ridge",
       "backbone.layers=[embed]", "backbone.normalize=true"]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # the CLI end to end; fast: test_nod_analyses.py runs the BrainSAIL job
def test_brainsail_writes_overlays_and_tables(make_cfg, synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    train(make_cfg(RUN + [f"data.root={synthetic_root}", "data.synthetic=null"]), run_dir)
    # A "depth" file whose maps are the images' luminance: its correlates must equal the luminance ones.
    with h5py.File(synthetic_root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5", "r") as f:
        images = f["imgBrick"][:]
    depth = tmp_path / "depth.h5"
    with h5py.File(depth, "w") as f:
        f["depth"] = attr.luminance(images).astype(np.float32)

    proc = subprocess.run(
        [sys.executable, "analyze.py", "analysis=brainsail", f"run_dir={run_dir}", "analysis.max_images=12",
         "analysis.distill.n_views=5", "analysis.top_k=3", "analysis.rois=[FFA-1,PPA]", "analysis.voxels=[0]",
         f"analysis.compare_runs=[{run_dir}]", f"analysis.properties.depth={depth}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_dir / "brainsail"
    columns = ["FFA-1", "PPA", "voxel0"]
    for col in columns:
        for sub in ("overlays", "compare"):
            with Image.open(out / sub / f"{col}.png") as im:
                assert im.size[0] > 300
    summary = json.loads((out / "brainsail.json").read_text())
    assert summary["columns"] == columns and summary["n_images"] == 12
    dense = next(iter(summary["dense"].values()))
    assert dense["method"] == "naclip" and dense["grid"] == 8 and dense["unit_norm_patches"] is True

    # The maps and the predicted responses belong to the run's first 12 test images, in split order.
    arrays = np.load(out / "maps.npz")
    split = json.loads((run_dir / "split.json").read_text())
    assert arrays["ids"].tolist() == [str(i) for i in split["test"][:12]]
    assert arrays["maps_0"].shape == (12, 3, 8, 8) and np.isfinite(arrays["maps_0"]).all()
    np.testing.assert_allclose(arrays["maps_1"], arrays["maps_0"])
    preds = np.load(run_dir / "predictions.npz")
    rows = [int(np.flatnonzero(preds["test_ids"] == i)[0]) for i in split["test"][:12]]
    with np.load(run_dir / "voxel_metrics.npz") as f:
        ffa = f["roi_FFA-1"]
    np.testing.assert_allclose(arrays["predicted"][:, 0], preds["test_pred"][rows][:, ffa].mean(1), atol=1e-4)
    np.testing.assert_allclose(arrays["predicted"][:, 2], preds["test_pred"][rows][:, 0], atol=1e-4)

    table = {r["column"]: r for r in read_csv(out / "rois.csv")}
    assert list(table) == columns
    top = np.argsort(-arrays["predicted"][:, 0], kind="stable")[:3]
    assert table["FFA-1"]["top_ids"] == " ".join(str(split["test"][i]) for i in top)
    assert all(float(r["agreement_r"]) == pytest.approx(1.0) for r in table.values())   # a run against itself
    assert all(r["caption_category"] in ("face", "body", "scene", "food", "word") for r in table.values())
    props = read_csv(out / "properties.csv")
    by = {(r["column"], r["property"]): r for r in props}
    assert len(props) == 9
    for col in columns:
        assert float(by[(col, "depth")]["r_mean"]) == pytest.approx(float(by[(col, "luminance")]["r_mean"]), abs=1e-5)
        assert int(by[(col, "saturation")]["n_images"]) == 12
    caps = read_csv(out / "captions.csv")
    assert len(caps) == 3 * 5
    assert sum(int(r["n_top_images"]) for r in caps if r["column"] == "PPA") == 3

    # Bad input: one clear error before anything is written; earlier outputs stay as they were.
    stamp = (out / "maps.npz").stat().st_mtime_ns
    with pytest.raises(FileNotFoundError, match="nope.h5: depth file not found"):
        analyse_run(run_dir, BrainSAILOptions(max_images=2, n_views=2, depth=str(tmp_path / "nope.h5")))
    with pytest.raises(ValueError, match="no ROI"):
        analyse_run(run_dir, BrainSAILOptions(rois=["NOPE"]))
    assert (out / "maps.npz").stat().st_mtime_ns == stamp


def test_options_and_caption_files(tmp_path):
    caps = load_captions("brainsail")
    assert list(caps) == ["face", "body", "scene", "food", "word"]
    assert [len(v) for v in caps.values()] == [9, 10, 12, 14, 9] and "A photo of a person's face" in caps["face"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("face: A photo of a face\n")
    with pytest.raises(ValueError, match="bad.yaml: expected a mapping"):
        load_captions(bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml: caption file not found"):
        load_captions("nope")
    opts = BrainSAILOptions.from_config({"name": "brainsail", "dense": {"method": "maskclip", "sigma": 10},
                                         "distill": {"n_views": 3}, "properties": {"depth": None}, "top_k": 2})
    assert (opts.method, opts.sigma, opts.n_views, opts.top_k) == ("maskclip", 10, 3, 2)
    with pytest.raises(ValueError, match="analysis.dense.method"):
        BrainSAILOptions.from_config({"dense": {"method": "gradcam"}})
    with pytest.raises(ValueError, match="analysis.distill.shift: unknown"):
        BrainSAILOptions.from_config({"distill": {"shift": 3}})
