"""NOD: CIFTI-2/BIDS reader against an independent reading, splits, noise ceiling, synthetic generator,
train.py end to end, and one-line errors for bad input (real CIFTI-2, TSV and JPEG files)."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from nibabel import cifti2
from PIL import Image
from scipy import stats

from datamodules.errors import DataError
from datamodules.nod import NODDataModule, load_nod_subject
from datamodules.fmri_runs import ncsnr_from_repeats
from datamodules.synthetic_nod import ensure_synthetic_nod
from tests.conftest import REPO
from train import train

SMALL = dict(n_subjects=1, n_imagenet_sessions=1, runs_per_session=3, trials_per_run=30, n_coco=20, n_coco_runs=3,
             n_cortex=200, n_subcortical=6, image_size=32, n_dead=4, seed=0)
N_CORTEX = SMALL["n_cortex"]
RESULTS = "derivatives/ciftify/sub-01/results"


@pytest.fixture(scope="module")
def nod_root(tmp_path_factory) -> Path:
    return ensure_synthetic_nod(tmp_path_factory.mktemp("nod") / "nod", **SMALL)


@pytest.fixture
def nod_copy(nod_root, tmp_path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(nod_root, tmp_path / "nod"))


def betas_path(root, run):
    return root / RESULTS / run / f"{run}_beta.dscalar.nii"


def load(root, **kw):
    return load_nod_subject(root, 1, n_cortex=N_CORTEX, **kw)


# --------------------------------------------------------------------------- an independent reading
def read_tsv(path, delimiter="\t"):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def expected_responses(root):
    """name -> mean over runs of the per-run z-scored cortical betas, straight from nibabel + scipy."""
    listed = sorted(read_tsv(root / "stimuli/coco_images.csv", ","), key=lambda r: int(r["num"]))
    coco = [f"coco/{r['img']}" for r in listed]
    trials: dict[str, list] = {}
    for run_dir in sorted((root / RESULTS).glob("ses-*_run-*")):
        img = nib.load(run_dir / f"{run_dir.name}_beta.dscalar.nii")
        cortex = np.isin(img.header.get_axis(1).name, ["CIFTI_STRUCTURE_CORTEX_LEFT", "CIFTI_STRUCTURE_CORTEX_RIGHT"])
        betas = img.get_fdata()[:, cortex]
        ses, task, run = run_dir.name.split("_")
        if task == "task-coco":
            names = coco
        else:
            events = root / f"sub-01/{ses}/func/sub-01_{ses}_{task}_run-{int(run[4:]):02d}_events.tsv"
            names = [r["stim_file"] for r in read_tsv(events)]
        for name, row in zip(names, stats.zscore(betas, axis=0)):
            trials.setdefault(name, []).append(row)
    return {n: np.mean(t, axis=0) for n, t in trials.items()}, {n: len(t) for n, t in trials.items()}


def test_loader_matches_an_independent_reading(nod_root):
    data, images = load(nod_root)
    means, counts = expected_responses(nod_root)
    assert sorted(means) == images.names and len(images) == 20 + 90
    dead = np.isnan(np.stack(list(means.values()))).any(0)
    assert dead.sum() == SMALL["n_dead"]
    np.testing.assert_array_equal(data.voxel_xyz[:, 0], np.flatnonzero(~dead))
    expected = np.stack([means[images.names[i]][~dead] for i in data.stim_ids])
    np.testing.assert_allclose(data.responses, expected, atol=2e-5)
    np.testing.assert_array_equal(data.n_repeats, [counts[images.names[i]] for i in data.stim_ids])
    assert {images.names[i] for i in data.shared_ids} == {n for n in means if n.startswith("coco/")}
    assert set(data.n_repeats[np.isin(data.stim_ids, data.shared_ids)]) == {3}
    # fLoc ROIs: the dlabel values, read with nibabel, at the kept grayordinates
    img = nib.load(nod_root / RESULTS / "ses-floc_task-floc/floc-faces.dlabel.nii")
    key = {name: k for k, (name, _) in img.header.get_axis(0).label[0].items()}["FFA"]
    np.testing.assert_array_equal(data.rois["FFA"], img.get_fdata()[0, :N_CORTEX][~dead] == key)
    assert {"OFA", "FFA", "EBA", "PPA", "VWFA", "floc-places"} <= data.rois.keys()
    # images by id are the files the events name
    i = images.names.index(next(n for n in images.names if n.startswith("imagenet/")))
    np.testing.assert_array_equal(images.image(i), np.asarray(Image.open(nod_root / "stimuli" / images.names[i])))


def test_ncsnr_follows_nsds_definition_and_recovers_the_planted_snr(nod_root):
    rng = np.random.default_rng(0)
    trials = rng.normal(size=(4, 50, 6))
    noise_var = np.array([np.mean([np.var(trials[:, i, v], ddof=1) for i in range(50)]) for v in range(6)])
    expected = np.sqrt(np.clip(1 - noise_var, 0, None)) / np.sqrt(noise_var)
    np.testing.assert_allclose(ncsnr_from_repeats(trials), expected, rtol=1e-5)
    # signal sd 1, noise sd 1/snr, z-scored per repeat: ncsnr ~ snr
    snr = np.array([0.5, 1.0, 2.0])
    signal = rng.normal(size=(4000, 3))
    reps = stats.zscore(signal + rng.normal(size=(10, 4000, 3)) / snr, axis=1)
    np.testing.assert_allclose(ncsnr_from_repeats(reps), snr, rtol=0.05)
    with pytest.raises(ValueError, match="at least 2|>= 2"):
        ncsnr_from_repeats(trials[:1])
    data, _ = load(nod_root)
    with h5py.File(nod_root / "ground_truth.h5") as f:
        planted = f["sub-01/ncsnr"][:][data.voxel_xyz[:, 0]]
    assert stats.pearsonr(data.ncsnr, planted)[0] > 0.6


def test_planted_responses_are_recovered(nod_root):
    data, images = load(nod_root)
    with h5py.File(nod_root / "ground_truth.h5") as f:
        assert [n.decode() for n in f["sub-01/stimulus_names"][:]] == images.names
        signal = f["sub-01/signal"][:][data.stim_ids][:, data.voxel_xyz[:, 0]]
        snr = f["sub-01/ncsnr"][:][data.voxel_xyz[:, 0]]
    r = np.array([stats.pearsonr(signal[:, v], data.responses[:, v])[0] for v in range(signal.shape[1])])
    assert np.median(r) > 0.4 and stats.spearmanr(r, snr)[0] > 0.5


def test_splits_and_the_record(nod_root):
    dm = NODDataModule(str(nod_root), n_cortex=N_CORTEX, seed=3)
    dm.setup()
    ids = dm.split_ids
    assert not (set(ids["train"]) & set(ids["val"])) and not (set(ids["train"]) | set(ids["val"])) & set(ids["test"])
    names = dm.describe()["stimulus_names"]
    assert all(names[i].startswith("coco/") for i in ids["test"]) and len(ids["test"]) == 20
    assert all(names[i].startswith("imagenet/") for s in ("train", "val") for i in ids[s])
    assert len(ids["train"]) + len(ids["val"]) == 90 and len(ids["val"]) == 9
    assert set(dm.n_repeats("test")) == {3} and set(dm.n_repeats("train")) == {1}
    assert dm.targets("test").shape == (20, dm.n_voxels) and np.isfinite(dm.ncsnr()).all()

    random = NODDataModule(str(nod_root), n_cortex=N_CORTEX, seed=3, split="random")
    random.setup()
    r_ids = random.split_ids
    assert len(r_ids["test"]) == round(0.15 * 110) and sum(len(v) for v in r_ids.values()) == 110
    assert {n[:4] for n in np.array(names)[r_ids["test"]]} == {"coco", "imag"}
    again = NODDataModule(str(nod_root), n_cortex=N_CORTEX, seed=3, split="random")
    again.setup()
    assert all(np.array_equal(r_ids[s], again.split_ids[s]) for s in r_ids)
    with pytest.raises(ValueError, match="data.split"):
        NODDataModule(str(nod_root), split="coco_only")


def test_stimulus_source_changes_with_the_image_files(nod_copy):
    dm = NODDataModule(str(nod_copy), n_cortex=N_CORTEX)
    dm.setup()
    before = dm.stimulus_source()
    assert before == dm.stimulus_source()
    path = nod_copy / "stimuli" / dm.describe()["stimulus_names"][5]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert dm.stimulus_source()["files_sha"] != before["files_sha"]


def test_roi_mask_selects_the_union_and_unknown_names_list_the_known(nod_root):
    full, _ = load(nod_root)
    data, _ = load(nod_root, roi_mask=["FFA", "floc-places"])
    xyz = set(full.voxel_xyz[:, 0])
    want = {int(v) for name in ("FFA", "OPA", "PPA", "RSC") for v in full.voxel_xyz[full.rois[name], 0]}
    assert set(data.voxel_xyz[:, 0]) == want and want < xyz
    with pytest.raises(DataError, match=r"no ROI named 'FFB'.*available: \[.*'EBA'.*'FFA'"):
        load(nod_root, roi_mask=["FFB"])


# --------------------------------------------------------------------------- bad input
def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def rewrite_betas(path, data=None, keep_maps=None, keep_columns=None):
    img = nib.load(path)
    maps, bm = img.header.get_axis(0), img.header.get_axis(1)
    data = img.get_fdata() if data is None else data
    if keep_maps is not None:
        data, maps = data[keep_maps], maps[keep_maps]
    if keep_columns is not None:
        data, bm = data[:, keep_columns], bm[keep_columns]
    nib.save(cifti2.Cifti2Image(data.astype(np.float32), header=(maps, bm)), path)


def tree_state(root):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:len(b) - 1500], "truncated"),
    (lambda b: b[:400], "cannot read as CIFTI-2"),
    (lambda b: bytes(np.random.default_rng(0).integers(0, 256, len(b), dtype=np.uint8)), "cannot read as CIFTI-2"),
])
def test_truncated_or_corrupt_cifti(nod_copy, damage, message):
    path = betas_path(nod_copy, "ses-imagenet01_task-imagenet_run-2")
    path.write_bytes(damage(path.read_bytes()))
    state = tree_state(nod_copy)
    with pytest.raises(DataError) as err:
        load(nod_copy)
    assert str(path) in one_line(err) and message in str(err.value)
    assert tree_state(nod_copy) == state  # nothing written or overwritten


def test_betas_with_another_trial_count_than_the_events(nod_copy):
    path = betas_path(nod_copy, "ses-imagenet01_task-imagenet_run-3")
    rewrite_betas(path, keep_maps=slice(0, 29))
    with pytest.raises(DataError) as err:
        load(nod_copy)
    assert one_line(err).startswith(f"{path}: 29 beta maps") and "run-03_events.tsv lists 30 trials" in str(err.value)


def test_wrong_grayordinate_count(nod_root, nod_copy):
    with pytest.raises(DataError, match=r"200 cortical grayordinates \(of 206 columns\), expected data.n_cortex = 300"):
        load_nod_subject(nod_root, 1, n_cortex=300)
    path = betas_path(nod_copy, "ses-coco_task-coco_run-2")
    rewrite_betas(path, keep_columns=np.r_[0:150, 200:206])  # part of the right hemisphere missing
    with pytest.raises(DataError) as err:
        load(nod_copy)
    assert one_line(err).startswith(f"{path}: 150 cortical grayordinates (of 156 columns), expected "
                                    f"data.n_cortex = 200")


def test_rois_in_another_space_are_refused(nod_copy):
    path = nod_copy / RESULTS / "ses-floc_task-floc/floc-words.dlabel.nii"
    img = nib.load(path)
    bm = img.header.get_axis(1)
    vertex = bm.vertex.copy()
    vertex[:5] = vertex[:5][::-1]
    moved = cifti2.BrainModelAxis(bm.name, voxel=bm.voxel, vertex=vertex, affine=bm.affine,
                                  volume_shape=bm.volume_shape, nvertices=bm.nvertices)
    nib.save(cifti2.Cifti2Image(img.get_fdata().astype(np.float32), header=(img.header.get_axis(0), moved)), path)
    with pytest.raises(DataError, match="cortical grayordinates differ"):
        load(nod_copy)


def test_empty_roi_after_nan_removal(nod_root, nod_copy):
    full, _ = load(nod_root)
    vwfa = full.voxel_xyz[full.rois["VWFA"], 0]
    path = betas_path(nod_copy, "ses-imagenet01_task-imagenet_run-1")
    data = nib.load(path).get_fdata()
    data[:, vwfa] = np.nan
    rewrite_betas(path, data=data)
    data, _ = load(nod_copy)  # reporting only: the emptied ROI is left out
    assert "VWFA" not in data.rois and "FFA" in data.rois
    with pytest.raises(DataError) as err:
        load(nod_copy, roi_mask=["FFA", "VWFA"])
    assert "ROI 'VWFA'" in one_line(err) and "floc-words.dlabel.nii" in str(err.value)
    assert "empty after removing" in str(err.value)


@pytest.mark.parametrize("value", [np.nan, 2.0], ids=["nan", "constant"])
def test_dead_run_names_its_file(nod_copy, value):
    """A run whose betas are NaN (or constant) at every grayordinate names its file, not the results folder."""
    path = betas_path(nod_copy, "ses-imagenet01_task-imagenet_run-2")
    rewrite_betas(path, data=np.full(nib.load(path).shape, value))
    with pytest.raises(DataError) as err:
        load(nod_copy)
    assert one_line(err) == (f"{path}: all {N_CORTEX} selected grayordinates are NaN or constant over the run's "
                             f"30 maps")


def test_missing_images(nod_root, nod_copy):
    events = nod_copy / "sub-01/ses-imagenet01/func/sub-01_ses-imagenet01_task-imagenet_run-02_events.tsv"
    row = read_tsv(events)[4]
    (nod_copy / "stimuli" / row["stim_file"]).unlink()
    with pytest.raises(DataError) as err:
        load(nod_copy)
    assert one_line(err).startswith(f"{events}: row 5 stim_file '{row['stim_file']}': image not found")
    shutil.copy(nod_root / "stimuli" / row["stim_file"], nod_copy / "stimuli" / row["stim_file"])
    coco = read_tsv(nod_copy / "stimuli/coco_images.csv", ",")[7]["img"]
    (nod_copy / "stimuli/coco" / coco).unlink()
    with pytest.raises(DataError) as err:
        load(nod_copy)
    assert one_line(err).startswith(f"{nod_copy / 'stimuli/coco_images.csv'}: image '{coco}' (a trial of ")
    assert "not found" in str(err.value)


def test_without_coco_images_csv_the_order_comes_from_the_coco_events(nod_root, nod_copy, caplog):
    """NOD's coco_images.csv lists the 120 COCO images sorted by file name, in beta-map order; without it the
    same order is derived from the COCO events' stim_file names (sorted), said in one warning line."""
    with_csv, images = load(nod_root)
    listed = [r["img"] for r in sorted(read_tsv(nod_root / "stimuli/coco_images.csv", ","), key=lambda r: int(r["num"]))]
    assert listed == sorted(listed)  # as NOD's support file: sorted by file name
    (nod_copy / "stimuli/coco_images.csv").unlink()
    with caplog.at_level("WARNING", logger="datamodules.nod"):
        derived, derived_images = load(nod_copy)
    lines = [r.getMessage() for r in caplog.records if "coco_images.csv not found" in r.getMessage()]
    assert len(lines) == 1 and "sorted order of the 20 COCO images" in lines[0] and "\n" not in lines[0], lines
    assert derived_images.names == images.names
    np.testing.assert_array_equal(derived.stim_ids, with_csv.stim_ids)
    np.testing.assert_array_equal(derived.responses, with_csv.responses)
    np.testing.assert_array_equal(derived.ncsnr, with_csv.ncsnr)
    # it can fail: COCO maps read in another order (here: the events' presentation order) change the responses
    events = sorted((nod_copy / "sub-01/ses-coco/func").glob("*_events.tsv"))
    shown = [r["stim_file"] for r in read_tsv(events[0])]
    assert shown != sorted(shown)
    # an explicitly configured list must exist; COCO runs that show other images are named
    with pytest.raises(DataError, match="elsewhere.csv: file not found"):
        load(nod_copy, coco_images_csv=nod_copy / "elsewhere.csv")
    text = events[1].read_text()
    events[1].write_text(text.replace(Path(shown[0]).name, "000000000000.jpg", 1))
    with pytest.raises(DataError, match=rf"{events[1].name}: its COCO images differ from those of {events[0].name}"):
        load(nod_copy)


def test_missing_events_column_and_session(nod_copy):
    with pytest.raises(DataError, match=r"session imagenet02 not found \(sub-01 has \['imagenet01'\]\)"):
        load(nod_copy, sessions=[2])
    events = nod_copy / "sub-01/ses-imagenet01/func/sub-01_ses-imagenet01_task-imagenet_run-01_events.tsv"
    events.write_text(events.read_text().replace("stim_file", "stimulus"))
    with pytest.raises(DataError, match=f"{events}: column 'stim_file' missing"):
        load(nod_copy)


# --------------------------------------------------------------------------- train.py
FAST = ["backbone=tiny", "trainer=cpu", "trainer.enable_progress_bar=false", "logger=none"]


def test_train_end_to_end_on_nod_files(make_cfg, nod_root, tmp_path):
    cfg = make_cfg(FAST + ["data=nod", f"data.root={nod_root}", f"data.n_cortex={N_CORTEX}", "head=ridge"])
    run = train(cfg, tmp_path / "run").run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["n_voxels"] == N_CORTEX - SMALL["n_dead"]
    assert {"FFA", "PPA", "VWFA"} <= metrics["test"]["rois"].keys()
    assert np.isfinite(metrics["test"]["nc_r2_mean"])
    split = json.loads((run / "split.json").read_text())
    info = json.loads((run / "run.json").read_text())
    names = info["data"]["stimulus_names"]
    assert sorted(names[i] for i in split["test"]) == sorted(f"coco/{r['img']}" for r in read_tsv(
        nod_root / "stimuli/coco_images.csv", ","))
    assert info["data"]["dataset"] == "nod" and info["features"]["cache_status"] == "built"
    voxels = np.load(run / "voxel_metrics.npz")
    assert voxels["voxel_xyz"].shape == (N_CORTEX - SMALL["n_dead"], 1)


def test_demo_nod_generates_its_data_on_first_use(make_cfg, tmp_path):
    root = tmp_path / "data" / "synthetic_nod"
    small = {k: v for k, v in SMALL.items() if k not in ("n_dead",)}
    cfg = make_cfg(["experiment=demo_nod", *FAST, "head=ridge", f"data.root={root}",
                    *[f"++data.generator.{k}={v}" for k, v in small.items()]])
    assert cfg.data.n_cortex == N_CORTEX
    metrics = train(cfg, tmp_path / "run").metrics
    assert (root / "synthetic_nod.json").exists() and (root / "ground_truth.h5").exists()
    assert metrics["test"]["n_voxels"] == N_CORTEX - 4 and metrics["test"]["r_mean"] > 0.1


def test_cli_bad_nod_input_is_one_line_and_exit_2(nod_copy, tmp_path):
    path = betas_path(nod_copy, "ses-coco_task-coco_run-1")
    path.write_bytes(path.read_bytes()[:-1000])
    proc = subprocess.run([sys.executable, "train.py", "data=nod", f"data.root={nod_copy}", f"data.n_cortex={N_CORTEX}",
                           "logger=none", f"hydra.run.dir={tmp_path / 'run'}", f"feature_cache_dir={tmp_path / 'c'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: {path}: cannot read the data matrix")
