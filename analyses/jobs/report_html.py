"""The report page: one self-contained HTML file (inline CSS and script, figures by relative path)."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from urllib.parse import quote

import jinja2

from encoders.run_dir import CONFIG

# On load, every <img> gets data-loaded="1" if it decoded (naturalWidth > 0) and "0" otherwise, and
# <body> data-images-checked="1": a headless browser's DOM dump then tells whether every figure loaded.
TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>brainprobe report — {{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem auto; max-width: 1250px;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; } h2 { font-size: 1.2rem; margin-top: 2rem;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; } h3 { font-size: 1rem; }
.meta { color: #666; font-size: 0.9rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ddd; padding: 0.2rem 0.5rem; text-align: right; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
tr.failed td { background: #fff1f0; } td.sig { font-weight: bold; background: #eef7ee; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; }
.scroll { overflow-x: auto; } .row { display: flex; flex-wrap: wrap; gap: 1rem; } .row figure { max-width: 600px; } .note { font-size: 0.85rem; color: #444; }
pre { font-size: 0.75rem; white-space: pre-wrap; } code { background: #f4f4f4; padding: 0 0.2rem; }
</style>
</head>
<body>
<h1>brainprobe report</h1>
<p class="meta">{{ directory }} · {{ runs|length }} runs{% if failed %}, {{ failed|length }} failed jobs{% endif %}
 · split <code>{{ split }}</code> · generated {{ generated }}</p>

<h2 id="runs">Runs</h2>
<div class="scroll"><table id="runs-table">
<tr><th class="text">run</th><th class="text">backbone</th><th class="text">layers</th><th class="text">head</th>
<th class="text">data</th><th>subject</th><th>{{ split }} r</th><th>{{ split }} R² median</th>
<th>{{ split }} NC-R² median</th><th>{{ split }} NC-R² reliable (n)</th>
<th>voxels</th><th>val r</th><th>epochs</th><th>wall s</th></tr>
{% for r in run_rows %}<tr data-run="{{ r.name }}">
<td class="text"><a href="{{ r.config_href }}">{{ r.name }}</a></td><td class="text">{{ r.backbone }}</td>
<td class="text">{{ r.layers }}</td><td class="text">{{ r.head }}</td><td class="text">{{ r.dataset }}</td>
<td>{{ r.subject }}</td><td>{{ r.r }}</td><td>{{ r.r2 }}</td><td>{{ r.nc_r2 }}</td><td>{{ r.nc_r2_reliable }}</td>
<td>{{ r.voxels }}</td>
<td>{{ r.val_r }}</td><td>{{ r.epochs }}</td><td>{{ r.wall }}</td></tr>
{% endfor %}</table></div>
<p class="note">r: mean over voxels of the Pearson correlation between predicted and measured responses over the
whole {{ split }} split; R² median: median over voxels of the coefficient of determination; NC-R²: R² divided by
each voxel's noise ceiling (NC/100), its median over voxels and its mean over the n reliable voxels, those whose
noise ceiling exceeds the run's threshold (metrics.nc_threshold, % of variance: {{ thresholds }}) — a plain mean
of NC-R² can be dominated by a few voxels with a near-zero noise ceiling. The run name links to its config.yaml.</p>

{% if failed %}<h2 id="failed">Failed jobs</h2>
<div class="scroll"><table id="failed-table">
<tr><th class="text">job</th><th class="text">error type</th><th class="text">error</th><th class="text">overrides</th></tr>
{% for f in failed %}<tr class="failed" data-job="{{ f.name }}"><td class="text">{{ f.name }}</td><td class="text">{{ f.type }}</td>
<td class="text">{{ f.error }}{% if f.traceback %}<details><summary>traceback</summary><pre>{{ f.traceback }}</pre></details>{% endif %}</td><td class="text">{{ f.overrides|join(" ") }}</td></tr>
{% endfor %}</table></div>{% endif %}

{% if runs %}<h2 id="rois">Per ROI: {{ metric_label }}</h2>
<p class="note">Bars: the mean of each voxel's {{ split }} {{ metric_label }} over the ROI's voxels (voxels
with a non-finite score excluded); error bars: ±1 standard error over those voxels (SD/√n). Runs are compared
within a group of the same head, dataset and subject.</p>
{% for fig in figures if fig.section == "roi" %}<figure><img src="{{ fig.src }}" alt="{{ fig.title }}">
<figcaption>{{ fig.title }}: {{ fig.caption }}</figcaption></figure>
{% endfor %}
<details><summary>Table: mean ± SE (n voxels) per ROI and run</summary>
<div class="scroll"><table id="roi-table">
<tr><th class="text">ROI</th>{% for r in run_rows %}<th>{{ r.name }}<br>{{ r.backbone }} / {{ r.head }}</th>{% endfor %}</tr>
{% for roi in roi_rows %}<tr><td class="text">{{ roi.name }}</td>{% for cell in roi.cells %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table></div></details>

<h2 id="tests">Paired tests between backbones</h2>
<p class="note">For every two runs with the same head, dataset and subject and different backbones, per ROI:
{{ test_label }} over the ROI's voxels that both runs scored (matched by voxel coordinates; ROI masks of the
first run), on each voxel's {{ split }} {{ metric_label }}. diff = mean(A − B). q: Benjamini–Hochberg
adjusted p over the ROIs of that pair (bold: q &lt; 0.05).</p>
{% if not tests %}<p class="note">No pair: every group has a single backbone.</p>{% endif %}
{% for t in tests %}<h3>{{ t.a }} (A) vs {{ t.b }} (B) — {{ t.group }}</h3>
<div class="scroll"><table class="tests-table" data-a="{{ t.a_run }}" data-b="{{ t.b_run }}">
<tr><th class="text">ROI</th><th>n</th><th>mean A</th><th>mean B</th><th>diff</th><th>{{ stat_name }}</th><th>p</th><th>q</th></tr>
{% for row in t.rows %}<tr><td class="text">{{ row.roi }}</td><td>{{ row.n }}</td><td>{{ row.mean_a }}</td>
<td>{{ row.mean_b }}</td><td>{{ row.diff }}</td><td>{{ row.stat }}</td><td>{{ row.p }}</td>
<td{% if row.sig %} class="sig"{% endif %}>{{ row.q }}</td></tr>
{% endfor %}</table></div>
{% endfor %}

<h2 id="scatter">Voxel by voxel</h2>
<div class="row">{% for fig in figures if fig.section == "scatter" %}<figure><img src="{{ fig.src }}" alt="{{ fig.title }}">
<figcaption>{{ fig.title }}: {{ fig.caption }}</figcaption></figure>
{% else %}<p class="note">No group has two backbones to compare.</p>{% endfor %}</div>

<h2 id="curves">Learning curves</h2>
{% for fig in figures if fig.section == "curves" %}<figure><img src="{{ fig.src }}" alt="{{ fig.title }}">
<figcaption>{{ fig.caption }}</figcaption></figure>
{% else %}<p class="note">No run has a per-epoch CSV log (closed-form heads have no epochs; runs logged to W&amp;B
keep their curves there).</p>{% endfor %}{% endif %}

<script>
window.addEventListener("load", function () {
  var images = document.querySelectorAll("img");
  for (var i = 0; i < images.length; i++) {
    images[i].setAttribute("data-loaded", images[i].complete && images[i].naturalWidth > 0 ? "1" : "0");
  }
  document.body.setAttribute("data-images-checked", String(images.length));
});
</script>
</body>
</html>
"""


def fmt(value, digits: int = 3) -> str:
    """A number for a table cell ("—" for missing/NaN; p-values in scientific notation when small)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.2e}" if value != 0 and abs(value) < 10 ** -digits else f"{value:.{digits}f}"
    return str(value)


def _href(path: Path, out_dir: Path) -> str:
    return quote(Path(os.path.relpath(path, out_dir)).as_posix())


def render(*, directory: Path, out_dir: Path, runs, failed, figures, roi_stats, tests, rois, split: str,
           metric_label: str, test: str, epochs: dict[str, int | None]) -> str:
    """The report page as a string (see analyses.jobs.report.build_report for the arguments; epochs: run
    name -> number of logged epochs, None without a CSV log)."""
    run_rows = []
    for run in runs:
        m = run.metrics.get(split, {})
        run_rows.append({
            "name": run.name, "config_href": _href(run.file(CONFIG), out_dir), "backbone": run.backbone,
            "layers": ", ".join(run.info.get("layers", [])), "head": run.head, "dataset": run.dataset,
            "subject": run.subject, "r": fmt(m.get("r_mean")), "r2": fmt(m.get("r2_median")),
            "nc_r2": fmt(m.get("nc_r2_median")),
            "nc_r2_reliable": f"{fmt(m.get('nc_r2_mean_reliable'))} ({fmt(m.get('n_reliable'))})",
            "voxels": fmt(m.get("n_voxels")),
            "val_r": fmt(run.metrics.get("val", {}).get("r_mean")), "epochs": fmt(epochs.get(run.name)),
            "wall": fmt(run.info.get("wall_time_s"), 1)})
    roi_rows = []
    for name in ["all voxels", *rois]:
        cells = []
        for run in runs:
            mean, se, n = roi_stats[run.name].get(name, (float("nan"), float("nan"), 0))
            cells.append(f"{fmt(mean)} ± {fmt(se)} ({n})" if n else "—")
        roi_rows.append({"name": name, "cells": cells})
    test_blocks = []
    for t in tests:
        head, dataset, subject = t["group"]
        rows = [{"roi": r["roi"], "n": r["n"], "mean_a": fmt(r["mean_a"]), "mean_b": fmt(r["mean_b"]),
                 "diff": fmt(r["diff"]), "stat": fmt(r["stat"], 2), "p": fmt(r["p"]), "q": fmt(r["q"]),
                 "sig": math.isfinite(r["q"]) and r["q"] < 0.05} for r in t["rows"]]
        test_blocks.append({"a": t["a"].backbone, "b": t["b"].backbone, "a_run": t["a"].name, "b_run": t["b"].name,
                            "group": f"head {head}, {dataset} subject {subject} (runs {t['a'].name} vs {t['b'].name})",
                            "rows": rows})
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE).render(
        title=directory.name, directory=str(directory), runs=runs, failed=failed, split=split,
        thresholds=", ".join(sorted({f"{t:g}" for r in runs
                                     if (t := r.metrics.get(split, {}).get("nc_threshold")) is not None})) or "—",
        generated=time.strftime("%Y-%m-%d %H:%M"), run_rows=run_rows, roi_rows=roi_rows, tests=test_blocks,
        figures=[{**f, "src": _href(f["path"], out_dir)} for f in figures], metric_label=metric_label,
        test_label="paired t-test (scipy.stats.ttest_rel)" if test == "ttest_rel"
        else "Wilcoxon signed-rank test (scipy.stats.wilcoxon)",
        stat_name="t" if test == "ttest_rel" else "W")
