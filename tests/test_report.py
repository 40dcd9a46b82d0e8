"""The sweep report and W&B dashboard on a small synthetic sweep: statistics checked against
independent computations, the page rendered in headless Chromium, W&B offline runs read back."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from scipy import stats

from analyses.jobs.base import run_group
from analyses.jobs.dashboard import flat_summary, log_report_to_wandb
from encoders.wandb_run import encoder_run_name
from tests.wandb_records import read_offline_run
from analyses.jobs.maps import MapsJob, MapsOptions
from analyses.jobs.report import ALL_VOXELS, build_report
from analyses.methods.stats import paired_test
from analyses.methods.voxels import common_voxels
from encoders.run_dir import RunDir
from tests.conftest import REPO
from train import train

SWEEP_RUNS = [("tiny", "linear"), ("tiny", "ridge"), ("tiny_vit", "linear"), ("tiny_vit", "ridge")]
EPOCHS = 4
FAILED = {"error": "data.root: /nowhere/nsd: file not found", "type": "DataError",
          "overrides": ["backbone=tiny", "head=mlp", "data.root=/nowhere/nsd"],
          "traceback": "Traceback (most recent call last):\n  ...\nDataError: data.root: /nowhere/nsd: file not found"}


def compose_run(overrides, run_dir: Path, num: int):
    """The train config Hydra would give job ``num`` of a multirun writing to ``run_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=overrides)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = num
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def sweep(synthetic_root, tmp_path_factory) -> Path:
    """A multirun-like directory: 4 trained runs (2 backbones × 2 heads) and one failed job."""
    base = tmp_path_factory.mktemp("report")
    sweep_dir = base / "2026-01-01_12-00-00"
    for num, (backbone, head) in enumerate(SWEEP_RUNS):
        run_dir = sweep_dir / f"{num}_{backbone}_{head}"
        cfg = compose_run(["experiment=demo", f"trainer.max_epochs={EPOCHS}", "trainer.enable_progress_bar=false",
                           f"backbone={backbone}", f"head={head}", f"data.root={synthetic_root}",
                           "data.synthetic=null", f"feature_cache_dir={base / 'cache'}"], run_dir, num)
        train(cfg, run_dir)
    GlobalHydra.instance().clear()
    failed = sweep_dir / "4_tiny_mlp"
    failed.mkdir()
    (failed / "failed.json").write_text(json.dumps(FAILED))
    return sweep_dir


@pytest.fixture(scope="module")
def report(sweep):
    return build_report(sweep, progress=False)


class PageParser(HTMLParser):
    """Every start tag as (tag, attrs), and the text of each table row."""

    def __init__(self):
        super().__init__()
        self.tags, self.rows, self._row = [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self._row = []

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.rows.append(" ".join(" ".join(self._row).split()))
            self._row = None

    def handle_data(self, data):
        if self._row is not None:
            self._row.append(data)


def parse(html: str) -> PageParser:
    parser = PageParser()
    parser.feed(html)
    return parser


def test_report_compares_every_run_and_lists_failed_jobs(report, sweep):
    assert report.html == sweep / "report" / "report.html"
    page = parse(report.html.read_text())
    run_rows = {a["data-run"] for tag, a in page.tags if tag == "tr" and "data-run" in a}
    assert run_rows == {f"{i}_{b}_{h}" for i, (b, h) in enumerate(SWEEP_RUNS)}
    assert [a["data-job"] for tag, a in page.tags if "data-job" in a] == ["4_tiny_mlp"]
    assert any(FAILED["error"] in row and "DataError" in row for row in page.rows)
    # Figures: a bar chart and a scatter per (head, dataset, subject) group, one learning-curve figure, a brain
    # map per run and a difference map per group.
    assert sorted(f["section"] for f in report.figures) == ["curves"] + ["maps"] * 6 + ["roi"] * 2 + ["scatter"] * 2
    images = [a["src"] for tag, a in page.tags if tag == "img"]
    assert sorted(images) == sorted(str(f["path"].relative_to(report.out_dir)) for f in report.figures)
    assert all((report.html.parent / src).stat().st_size > 1000 for src in images)
    # Nothing from a server or the network: every src/href is a relative path.
    refs = [a.get(k) for _, a in page.tags for k in ("src", "href") if a.get(k)]
    assert refs and not any(":" in ref or ref.startswith("/") for ref in refs)
    assert all((report.html.parent / ref).exists() for ref in refs)
    assert not [t for t, a in page.tags if t == "link" or (t == "script" and "src" in a)]
    # The unit of resampling is said in the page.
    assert "Unit of resampling: test images (n = 150)." in " ".join(report.html.read_text().split())


def test_roi_means_and_errors_match_metrics_json_and_scipy(report):
    for run in report.runs:
        nc_r2 = run.voxels().values("test", "nc_r2")
        masks = run.rois()
        for roi, (mean, se, n) in report.roi_stats[run.name].items():
            if roi == ALL_VOXELS:
                x, expected = nc_r2, run.metrics["test"]["nc_r2_mean"]
            else:
                x, expected = nc_r2[masks[roi]], run.metrics["test"]["rois"][roi]["nc_r2_mean"]
            x = x[np.isfinite(x)]
            assert n == x.size
            np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-6)  # train.py's own summary
            if n > 1:
                np.testing.assert_allclose(se, stats.sem(x), rtol=1e-10)


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """p_adj(i) = min over j >= i of m·p(j)/j, p sorted ascending (written out, not scipy's)."""
    order = np.argsort(p)
    m = len(p)
    adjusted = np.minimum.accumulate((m * p[order] / np.arange(1, m + 1))[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1)
    return out


def roi_score(run: RunDir, metric: str, roi: str, statistic=np.mean) -> float:
    """An ROI's mean/median per-voxel score recomputed from predictions.npz with scipy (independently), in float64;
    a prediction constant to rounding (var <= 1e-12 · Σp², training's rule) has no r."""
    pr = run.predictions("test")
    pred, true = pr.pred.astype(np.float64), pr.true.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = np.array([stats.pearsonr(pred[:, v], true[:, v])[0] for v in range(true.shape[1])])
    r[((pred - pred.mean(0)) ** 2).sum(0) <= 1e-12 * (pred ** 2).sum(0)] = np.nan
    ss = ((true - pred) ** 2).sum(0) / ((true - true.mean(0)) ** 2).sum(0)
    score = {"r": r, "r2": 1 - ss, "nc_r2": (1 - ss) / (run.voxels().values("test", "nc") / 100)}[metric]
    mask = np.ones(len(score), bool) if roi == ALL_VOXELS else run.rois()[roi]
    x = score[mask]
    return float(statistic(x[np.isfinite(x)]))


def test_paired_comparisons_are_over_test_images_with_fdr_over_the_roi_pair_family(report):
    pairs = {(r["a"].name, r["b"].name) for r in report.comparisons}
    assert pairs == {("0_tiny_linear", "2_tiny_vit_linear"), ("1_tiny_ridge", "3_tiny_vit_ridge")}
    assert {(r["metric"], r["statistic"]) for r in report.comparisons} == \
        {(m, s) for m in ("nc_r2", "r") for s in ("mean", "median")}
    rows = {(r["a"].name, r["roi"], r["metric"], r["statistic"]): r for r in report.comparisons}
    for (a_name, roi, metric, statistic), row in list(rows.items())[:: 7]:
        fn = np.mean if statistic == "mean" else np.median
        assert row["value_a"] == pytest.approx(roi_score(row["a"], metric, roi, fn), abs=2e-5)
        assert row["value_b"] == pytest.approx(roi_score(row["b"], metric, roi, fn), abs=2e-5)
        assert row["diff"] == pytest.approx(row["value_a"] - row["value_b"], abs=1e-12)
        assert row["ci_low"] <= row["ci_high"] and 0 < row["p"] <= 1
        assert (row["p"] < 0.05) == (row["ci_low"] > 0 or row["ci_high"] < 0) or abs(row["p"] - 0.05) < 0.01
    for run in report.runs:  # the observed means are train.py's own (metrics.json); every ROI has a CI
        (row,) = [r for r in report.comparisons if run in (r["a"], r["b"]) and r["roi"] == ALL_VOXELS
                  and (r["metric"], r["statistic"]) == ("r", "mean")]
        assert (row["value_a"] if row["a"] is run else row["value_b"]) == pytest.approx(
            run.metrics["test"]["r_mean"], abs=1e-5)
        assert all(lo < hi for lo, hi in report.roi_ci[run.name].values())
    for family in {(r["metric"], r["statistic"]) for r in report.comparisons}:
        members = [r for r in report.comparisons if (r["metric"], r["statistic"]) == family]
        assert len(members) == 2 * (1 + len(report.rois))  # ROI x pair
        np.testing.assert_allclose([r["q"] for r in members], benjamini_hochberg(np.array([r["p"] for r in members])))
    # tiny beats tiny_vit overall on this dataset (the planted signal is low-level): a clear, significant difference
    overall = rows["1_tiny_ridge", ALL_VOXELS, "nc_r2", "mean"]
    assert overall["ci_low"] > 0 and overall["q"] < 0.05
    page = parse(report.html.read_text())
    tables = [a for tag, a in page.tags if tag == "table" and a.get("class") == "comparison-table"]
    assert {(a["data-a"], a["data-b"]) for a in tables} == pairs and len(tables) == 4
    assert (report.out_dir / "comparisons.csv").read_text().count("\n") == len(report.comparisons) + 1


def test_the_sweep_as_one_encoder_by_roi_table(report):
    (t,) = report.encoder_tables
    assert t["dataset"] == "synthetic" and t["metric"] == "nc_r2" and t["rois"] == [ALL_VOXELS, *report.rois]
    by_model = {row["model"]: row for row in t["rows"]}
    assert set(by_model) == {"tiny / linear", "tiny / ridge", "tiny_vit / linear", "tiny_vit / ridge"}
    runs = {f"{r.backbone} / {r.head}": r for r in report.runs}
    values = np.array([[c["value"] for c in row["cells"]] for row in t["rows"]])
    for row in t["rows"]:
        run = runs[row["model"]]
        assert row["runs"] == [run.name] and row["n_subjects"] == 1
        expected = [run.metrics["test"]["nc_r2_mean"]] + [run.metrics["test"]["rois"][r]["nc_r2_mean"] for r in report.rois]
        np.testing.assert_allclose([c["value"] for c in row["cells"]], expected, atol=2e-5)
        assert all(c["ci_low"] < c["value"] < c["ci_high"] for c in row["cells"][:1])
    assert list(values[:, 0]) == sorted(values[:, 0], reverse=True)  # sorted by the all-voxels value
    best = np.array([[c["best"] for c in row["cells"]] for row in t["rows"]])
    assert (best.sum(0) == 1).all() and np.array_equal(best.argmax(0), np.nanargmax(values, 0))
    md = (report.out_dir / "encoder_table_synthetic.md").read_text()
    assert md.count("**") == 2 * len(t["rois"]) and md.splitlines()[0].startswith("| encoder | all voxels |")
    page = parse(report.html.read_text())
    marked = [a for tag, a in page.tags if tag == "td" and a.get("data-best") == "1"]
    assert len(marked) == len(t["rois"])


def test_across_subjects_with_a_second_subject(report, sweep, tmp_path):
    """Two of the runs copied as a second subject (their predictions perturbed): the per-subject differences
    and their t-test across subjects (= scipy.stats.ttest_rel of the per-subject ROI means)."""
    two = tmp_path / "two_subjects"
    rng = np.random.default_rng(0)
    for name in ("1_tiny_ridge", "3_tiny_vit_ridge"):
        shutil.copytree(sweep / name, two / name)
        copy = two / f"s2_{name}"
        shutil.copytree(sweep / name, copy)
        info = json.loads((copy / "run.json").read_text())
        info["data"]["subject"] = 2
        (copy / "run.json").write_text(json.dumps(info))
        with np.load(copy / "predictions.npz") as f:
            arrays = dict(f)
        arrays["test_pred"] = arrays["test_pred"] + rng.normal(0, 0.5, arrays["test_pred"].shape).astype(np.float32)
        np.savez_compressed(copy / "predictions.npz", **arrays)
    rep = build_report(two, n_boot=200, maps=False, progress=False)
    rows = [r for r in rep.subject_tests if r["metric"] == "r" and r["statistic"] == "mean"]
    assert {(r["a"], r["b"]) for r in rows} == {("tiny", "tiny_vit")} and all(r["n"] == 2 for r in rows)
    runs = {r.name: RunDir(two / r.name) for r in rep.runs}
    for row in rows[:3]:
        a = [roi_score(runs[n], "r", row["roi"]) for n in ("1_tiny_ridge", "s2_1_tiny_ridge")]
        b = [roi_score(runs[n], "r", row["roi"]) for n in ("3_tiny_vit_ridge", "s2_3_tiny_vit_ridge")]
        ref = stats.ttest_rel(a, b)
        assert row["diff"] == pytest.approx(np.mean(np.subtract(a, b)), abs=2e-5)
        assert row["t"] == pytest.approx(ref.statistic, rel=1e-3) and row["p"] == pytest.approx(ref.pvalue, rel=1e-3)
    np.testing.assert_allclose([r["q"] for r in rows], benjamini_hochberg(np.array([r["p"] for r in rows])))
    (t,) = rep.encoder_tables
    assert {row["n_subjects"] for row in t["rows"]} == {2} and "across subjects" in t["ci"]
    assert (rep.out_dir / "subject_comparisons.csv").exists()


def test_maps_written_at_training_and_the_difference_between_encoders(sweep, tmp_path):
    """train.py wrote every run's maps (NIfTI on the ROI files' grid + pictures); analysis=maps over the sweep
    writes the difference of each group's two encoders, A − B at every voxel."""
    import nibabel as nib
    for name in ("0_tiny_linear", "3_tiny_vit_ridge"):
        run = RunDir(sweep / name)
        assert {p.name for p in run.map_files()} == {f"test_{m}.{ext}" for m in ("r", "r2", "nc_r2")
                                                      for ext in ("nii.gz", "png")}
        img = nib.load(run.maps_dir / "test_nc_r2.nii.gz")
        x, y, z = run.voxel_xyz.T
        np.testing.assert_array_equal(np.asarray(img.dataobj)[x, y, z], run.voxels()["test_nc_r2"])
    job = MapsJob(MapsOptions(metrics=["r"], compare_metrics=["nc_r2"], pictures=False, wandb=False))
    job.execute(sweep)
    folder = sweep / "maps" / "0_tiny_linear_minus_2_tiny_vit_linear"
    a, b = RunDir(sweep / "0_tiny_linear"), RunDir(sweep / "2_tiny_vit_linear")
    diff = np.asarray(nib.load(folder / "diff_test_nc_r2.nii.gz").dataobj)[tuple(a.voxel_xyz.T)]
    ia, ib = common_voxels(a.voxel_xyz, b.voxel_xyz)
    expected = np.full(len(a.voxel_xyz), np.nan, np.float32)
    expected[ia] = (a.voxels().values("test", "nc_r2")[ia] - b.voxels().values("test", "nc_r2")[ib]).astype(np.float32)
    np.testing.assert_array_equal(diff, expected)
    assert (sweep / "maps" / "1_tiny_ridge_minus_3_tiny_vit_ridge" / "diff_test_nc_r2.nii.gz").exists()
    assert not (sweep / "maps" / "0_tiny_linear_minus_1_tiny_ridge").exists()  # same encoder: no pair


def test_paired_test_wilcoxon_and_degenerate_inputs():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=40), rng.normal(size=40) + 0.5
    a[3] = np.nan
    row = paired_test(a, b, "wilcoxon")
    ref = stats.wilcoxon(np.delete(a, 3), np.delete(b, 3))
    assert row["n"] == 39 and row["stat"] == pytest.approx(ref.statistic) and row["p"] == pytest.approx(ref.pvalue)
    assert np.isnan(paired_test(a[:1], b[:1])["p"]) and np.isnan(paired_test(b, b)["p"])
    with pytest.raises(ValueError, match="analysis.test"):
        paired_test(a, b, "anova")


def test_common_voxels_matches_by_coordinates():
    rng = np.random.default_rng(1)
    xyz = rng.permutation(np.stack(np.meshgrid(*[np.arange(5)] * 3, indexing="ij"), -1).reshape(-1, 3))
    other = xyz[rng.permutation(len(xyz))[:70]]
    ia, ib = common_voxels(xyz[:100], other)
    expected = {tuple(v) for v in xyz[:100]} & {tuple(v) for v in other}
    assert len(ia) == len(expected) and np.array_equal(xyz[:100][ia], other[ib])
    ia, ib = common_voxels(xyz, xyz)
    assert np.array_equal(ia, np.arange(len(xyz))) and np.array_equal(ib, ia)


def test_learning_curves_come_from_the_lightning_csv_log(sweep):
    import csv
    curve = RunDir(sweep / "0_tiny_linear").learning_curve()
    assert list(curve["epoch"]) == list(range(EPOCHS))
    with open(sweep / "0_tiny_linear" / "csv" / "metrics.csv") as f:
        val_r = [float(r["val/r_mean"]) for r in csv.DictReader(f) if r["val/r_mean"]]
    np.testing.assert_allclose(curve["val/r_mean"], val_r)
    assert np.isfinite(curve["train/loss"]).all() and np.isfinite(curve["val/loss"]).all()
    assert len(RunDir(sweep / "1_tiny_ridge").learning_curve()["epoch"]) == 1  # closed form: one validation, no epochs
    assert RunDir(sweep / "4_tiny_mlp").learning_curve() is None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt-get on first use (as root); skips if that is impossible."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("headless browser test: chromium is not installed and apt-get (as root) is not available "
                    "to install it (apt-get install chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", "chromium"]):
            subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        pytest.skip(f"headless browser test: installing Debian's chromium failed: {detail.strip()[-300:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("headless browser test: apt-get installed chromium but no `chromium` is on PATH")
    return found


def browser(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", *args], capture_output=True, text=True,
                          timeout=120)


def test_report_renders_in_headless_chromium(report, chromium, tmp_path):
    """Opened from file:// with no server: every figure decodes (naturalWidth > 0, set by the page's
    own load handler into data-loaded), and a missing figure is caught."""
    dom = browser(chromium, tmp_path, "--virtual-time-budget=5000", "--dump-dom", report.html.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = parse(dom.stdout)
    body = next(a for tag, a in page.tags if tag == "body")
    images = [a for tag, a in page.tags if tag == "img"]
    assert body.get("data-images-checked") == str(len(report.figures)) == str(len(images))
    assert [a.get("data-loaded") for a in images] == ["1"] * len(images), images
    assert sum(a["src"].startswith("maps/") for a in images) == 6  # the brain maps, decoded by the browser
    assert [a.get("data-dataset") for tag, a in page.tags if a.get("class") == "encoder-table"] == ["synthetic"]
    assert sum(a.get("data-best") == "1" for tag, a in page.tags if tag == "td") == len(report.encoder_tables[0]["rois"])

    # Control: the same page with one figure missing reports exactly that figure as not loaded.
    broken = tmp_path / "broken"
    shutil.copytree(report.out_dir, broken)
    missing = report.figures[0]["path"].name
    (broken / missing).unlink()
    dom = browser(chromium, tmp_path, "--virtual-time-budget=5000", "--dump-dom", (broken / "report.html").as_uri())
    flags = {a["src"]: a.get("data-loaded") for tag, a in parse(dom.stdout).tags if tag == "img"}
    assert flags[missing] == "0" and all(v == "1" for src, v in flags.items() if src != missing)

    shot = tmp_path / "report.png"
    result = browser(chromium, tmp_path, "--window-size=1300,2000", f"--screenshot={shot}", report.html.as_uri())
    assert result.returncode == 0 and shot.stat().st_size > 20_000


def test_wandb_report_refers_to_encoder_runs_and_never_duplicates_them(report, sweep, tmp_path, monkeypatch):
    """The sweep trained without W&B: the first report logs each encoder run once (job_type train, recorded in
    its run.json) and one analysis run; a second report makes only its own analysis run, referring to them."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert all(run.wandb is None for run in report.runs)
    try:
        logged = log_report_to_wandb(report, wandb_dir=tmp_path, progress=False)
        assert logged.mode == "offline" and len(logged.run_dirs) == len(report.runs) + 1 and not logged.referenced
        assert all(d.parent == tmp_path / "wandb" and d.name.startswith("offline-run-") for d in logged.run_dirs)
        assert logged.sync == "wandb sync " + " ".join(str(d) for d in logged.run_dirs)
        by_name = {run.name: run for run in report.runs}
        seen = set()
        for run_dir in logged.run_dirs:
            written = read_offline_run(run_dir)
            summary = written.summary
            assert written.run.run_group == sweep.name
            if written.run.job_type == "analysis":
                assert written.run.display_name == f"report · {sweep.name}"
                images = written.media("images")
                assert len(images) == len(report.figures)
                runs_table = json.loads(next(p for p in written.media("table") if p.name.startswith("runs_")).read_text())
                assert sorted(row[0] for row in runs_table["data"]) == sorted(by_name)
                assert {k.split("/")[1] for k in summary if k.startswith("figures/")} == {f["path"].stem for f in report.figures}
                (table_file,) = [p for p in written.media("table") if p.name.startswith("encoder_table_synthetic")]
                encoder_table = json.loads(table_file.read_text())
                assert encoder_table["columns"][:3] == ["encoder", "n_subjects", "roi"]
                assert len(encoder_table["data"]) == \
                    len(report.encoder_tables[0]["rows"]) * len(report.encoder_tables[0]["rois"])
                assert {k.split("/")[1] for k in summary if k.startswith("tables/")} == {"encoder_table_synthetic",
                                                                                         "comparisons"}
                continue
            source = next(r for r in report.runs if encoder_run_name(r) == written.run.display_name)
            seen.add(source.name)
            assert written.run.job_type == "train" and source.wandb["id"] == written.run.run_id  # recorded in run.json
            assert list(written.run.tags) == [source.backbone, source.head, "synthetic", "subj1"]
            assert written.config["backbone"]["name"] == source.backbone
            assert summary["test/r_mean"] == pytest.approx(source.metrics["test"]["r_mean"])
            assert summary["test/roi/FFA-1/nc_r2_median"] == pytest.approx(source.metrics["test"]["rois"]["FFA-1"]["nc_r2_median"])
            assert set(flat_summary(source.metrics)) <= set(summary)
            table = json.loads(next(p for p in written.media("table") if p.name.startswith("roi_results_")).read_text())
            assert len(table["data"]) == sum(len(block["rois"]) for block in source.metrics.values())
        assert len(seen) == len(by_name)

        again = log_report_to_wandb(build_report(sweep, progress=False), wandb_dir=tmp_path, progress=False)
        assert len(again.run_dirs) == 1 and sorted(again.referenced) == sorted(logged.run_ids[:-1])
        assert read_offline_run(again.run_dirs[0]).run.job_type == "analysis"
    finally:  # the module's other tests see the runs as trained
        for run in report.runs:
            info = json.loads(run.file("run.json").read_text())
            info.pop("wandb", None)
            run.file("run.json").write_text(json.dumps(info))
            run.__dict__.pop("info", None)
    # A run that trained with logger=wandb keeps its group.
    assert run_group({"logger": {"wandb": {"group": "synthetic"}}}, sweep.name) == "synthetic"
    assert run_group({"logger": {"csv": {}}}, sweep.name) == sweep.name


@pytest.mark.slow  # the CLI end to end; fast: build_report and the W&B dashboard above
def test_cli_report_and_its_errors(sweep, tmp_path):
    out = tmp_path / "cli_report"
    proc = subprocess.run([sys.executable, "analyze.py", "analysis=report", f"sweep_dir={sweep}",
                           f"analysis.out_dir={out}", "analysis.scatter=[tiny_vit,tiny]", "analysis.wandb=true",
                           f"analysis.wandb_dir={tmp_path / 'wb'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "report.html").exists() and "4 runs, 1 failed jobs, 11 figures" in proc.stdout
    assert "NC-R² per ROI, synthetic" in proc.stdout and "★" in proc.stdout  # the encoder x ROI table, printed
    assert (out / "scatter_nc_r2_tiny_vit_vs_tiny_linear_synthetic_1.png").exists()  # the pair asked for
    assert "W&B (offline): 5 runs" in proc.stdout and len(list((tmp_path / "wb" / "wandb").glob("offline-run-*"))) == 5
    assert "upload with: wandb sync " in proc.stdout
    # Errors are FileNotFoundError/ValueError, which analyze.py prints as one `error:` line (exit 2);
    # none of them writes anything.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty)):
        build_report(empty, progress=False)
    assert not (empty / "report").exists()
    for bad, match in ((dict(metric="accuracy"), "analysis.metric"), (dict(interval="t"), "analysis.interval"),
                       (dict(n_boot=10), "analysis.n_boot"),
                       (dict(scatter=["tiny"]), "analysis.scatter"), (dict(rois=["V1v", "FFA-9"]), "FFA-9"),
                       (dict(split="train"), "analysis.split")):
        with pytest.raises(ValueError, match=match):
            build_report(sweep, out_dir=tmp_path / "bad", progress=False, **bad)
    assert not (tmp_path / "bad").exists()
