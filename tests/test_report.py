"""The sweep report and W&B dashboard on a small synthetic sweep: statistics checked against
independent computations, the page rendered in headless Chromium, W&B offline runs read back."""
import json
import os
import shutil
import subprocess
import sys
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
    # Figures: a bar chart and a scatter per (head, dataset, subject) group, one learning-curve figure.
    assert sorted(f["section"] for f in report.figures) == ["curves", "roi", "roi", "scatter", "scatter"]
    images = [a["src"] for tag, a in page.tags if tag == "img"]
    assert sorted(images) == sorted(f["path"].name for f in report.figures)
    assert all((report.html.parent / src).stat().st_size > 1000 for src in images)
    # Nothing from a server or the network: every src/href is a relative path.
    refs = [a.get(k) for _, a in page.tags for k in ("src", "href") if a.get(k)]
    assert refs and not any(":" in ref or ref.startswith("/") for ref in refs)
    assert all((report.html.parent / ref).exists() for ref in refs)
    assert not [t for t, a in page.tags if t == "link" or (t == "script" and "src" in a)]


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


def test_paired_tests_between_backbones_match_a_direct_computation(report):
    pairs = {(t["a"].name, t["b"].name) for t in report.tests}
    assert pairs == {("0_tiny_linear", "2_tiny_vit_linear"), ("1_tiny_ridge", "3_tiny_vit_ridge")}
    for t in report.tests:
        a, b = t["a"].voxels().values("test", "nc_r2"), t["b"].voxels().values("test", "nc_r2")
        masks = t["a"].rois()
        assert [r["roi"] for r in t["rows"]] == [ALL_VOXELS] + [n for n in report.rois if n in masks]
        for row in t["rows"]:
            sel = np.ones(len(a), bool) if row["roi"] == ALL_VOXELS else masks[row["roi"]]
            d = (a - b)[sel]
            d = d[np.isfinite(d)]
            assert row["n"] == d.size
            if d.size < 2:
                continue
            t_stat = d.mean() / (d.std(ddof=1) / np.sqrt(d.size))
            np.testing.assert_allclose(row["stat"], t_stat, rtol=1e-9)
            np.testing.assert_allclose(row["p"], 2 * stats.t.sf(abs(t_stat), d.size - 1), rtol=1e-6)
            np.testing.assert_allclose(row["diff"], d.mean(), rtol=1e-9, atol=1e-12)
        p = np.array([r["p"] for r in t["rows"]])
        finite = np.isfinite(p)
        np.testing.assert_allclose(np.array([r["q"] for r in t["rows"]])[finite], benjamini_hochberg(p[finite]))
    page = parse(report.html.read_text())
    tables = [a for tag, a in page.tags if tag == "table" and a.get("class") == "tests-table"]
    assert {(a["data-a"], a["data-b"]) for a in tables} == pairs


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
    assert (out / "report.html").exists() and "4 runs, 1 failed jobs, 5 figures" in proc.stdout
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
    for bad, match in ((dict(metric="accuracy"), "analysis.metric"), (dict(test="anova"), "analysis.test"),
                       (dict(scatter=["tiny"]), "analysis.scatter"), (dict(rois=["V1v", "FFA-9"]), "FFA-9"),
                       (dict(split="train"), "analysis.split")):
        with pytest.raises(ValueError, match=match):
            build_report(sweep, out_dir=tmp_path / "bad", progress=False, **bad)
    assert not (tmp_path / "bad").exists()
