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
td.best { font-weight: bold; background: #fff8e1; }
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

{% if runs %}<h2 id="encoder-table">Encoders × ROIs: {{ metric_label }}</h2>
<p class="note">The sweep as one comparison: per dataset, one row per encoder (backbone{% if names.values()|unique|list|length < runs|length %} and layers{% endif %}, with
the head where several are used), one column per ROI; each cell the mean {{ split }} {{ short_label }} over the
ROI's voxels with its {{ ci_pct }} confidence interval in brackets; rows sorted by the all-voxels value; ★ (bold)
marks the best encoder of each ROI. Also written as <code>encoder_table_&lt;dataset&gt;.csv</code> and
<code>.md</code>.</p>
{% for t in encoder_tables %}<h3>{{ t.dataset }}</h3>
<div class="scroll"><table class="encoder-table" data-dataset="{{ t.dataset }}">
<tr><th class="text">encoder</th><th>subjects</th>{% for roi in t.rois %}<th>{{ roi }}</th>{% endfor %}</tr>
{% for row in t.rows %}<tr data-model="{{ row.model }}"><td class="text">{{ row.model }}</td><td>{{ row.n_subjects }}</td>
{% for cell in row.cells %}<td{% if cell.best %} class="best" data-best="1"{% endif %}>{{ cell.text }}</td>{% endfor %}</tr>
{% endfor %}</table></div>
<p class="note">CI: {{ t.ci }}.</p>
{% endfor %}

<h2 id="rois">Per ROI: {{ metric_label }}</h2>
<p class="note">Bars: the mean of each voxel's {{ split }} {{ metric_label }} over the ROI's voxels (voxels with a
non-finite score excluded); error bars: the {{ ci_pct }} {{ interval_name }} bootstrap interval of that mean over the test
stimuli (unit: {{ resampling.unit }}; {{ resampling.n_boot }} resamples). Runs are compared within a group of the
same head, dataset and subject.</p>
{% for fig in figures if fig.section == "roi" %}<figure><img src="{{ fig.src }}" alt="{{ fig.title }}">
<figcaption>{{ fig.title }}: {{ fig.caption }}</figcaption></figure>
{% endfor %}
<details><summary>Table: mean [{{ ci_pct }} CI] (n voxels) per ROI and run</summary>
<div class="scroll"><table id="roi-table">
<tr><th class="text">ROI</th>{% for r in run_rows %}<th>{{ r.name }}<br>{{ r.backbone }} / {{ r.head }}</th>{% endfor %}</tr>
{% for roi in roi_rows %}<tr><td class="text">{{ roi.name }}</td>{% for cell in roi.cells %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table></div></details>

<h2 id="comparisons">Comparisons between encoders</h2>
<p class="note"><b>Unit of resampling: {{ resampling.unit }}.</b> For every two runs with the same head, dataset
and subject and different encoders, a paired bootstrap over the test stimuli: each of {{ resampling.n_boot }}
resamples (seed {{ resampling.seed }}) draws the test {{ "blocks" if resampling.time_series else "images" }} with
replacement — the same draw for both encoders — recomputes every voxel's score from the runs' saved predictions,
then each ROI's mean and median and their difference A − B. Voxels are never resampled: they are not independent
samples. CI: {{ ci_pct }} {{ interval_name }} interval of the resampled differences{% if resampling.interval == "bca" %}
(bias-corrected and accelerated, the acceleration from leaving each unit out once, as
<code>scipy.stats.bootstrap</code>'s default){% endif %}; p: two-sided, the smallest 1 − level at which that
interval excludes 0 (so p &lt; 0.05 exactly when the 95 % interval excludes 0); q: Benjamini–Hochberg over the ROI ×
pair family of each metric and statistic (bold: q &lt; 0.05). Each run's ROI masks, at the voxels both runs scored.</p>
{% if not comparisons %}<p class="note">No pair: every group has a single encoder (or no saved predictions).</p>{% endif %}
{% for c in comparisons %}<h3>{{ c.a }} (A) vs {{ c.b }} (B) — {{ c.metric_name }} — {{ c.group }}</h3>
<div class="scroll"><table class="comparison-table" data-a="{{ c.a_run }}" data-b="{{ c.b_run }}" data-metric="{{ c.metric }}">
<tr><th class="text">ROI</th><th>voxels</th><th>mean A</th><th>mean B</th><th>Δ mean [{{ ci_pct }} CI]</th><th>p</th><th>q</th>
<th>median A</th><th>median B</th><th>Δ median [{{ ci_pct }} CI]</th><th>p</th><th>q</th></tr>
{% for row in c.rows %}<tr data-roi="{{ row.roi }}"><td class="text">{{ row.roi }}</td><td>{{ row.n_voxels }}</td>
{% for s in row.stats %}<td>{{ s.a }}</td><td>{{ s.b }}</td><td>{{ s.diff }}</td><td>{{ s.p }}</td>
<td{% if s.sig %} class="sig"{% endif %}>{{ s.q }}</td>{% endfor %}</tr>
{% endfor %}</table></div>
{% endfor %}

{% if subject_blocks %}<h2 id="subjects">Across subjects</h2>
<p class="note">The same two encoders (and head) on every subject both were trained on: per subject the
difference of the ROI's mean (and median) score on the full test set, then a t-test of those differences across
subjects (unit: the subject; n = the number of subjects), with a t interval; q: Benjamini–Hochberg over the ROI ×
pair family of each metric and statistic.</p>
{% for c in subject_blocks %}<h3>{{ c.a }} (A) vs {{ c.b }} (B) — {{ c.metric_name }} ({{ c.statistic }}) — {{ c.dataset }}, subjects {{ c.subjects }}</h3>
<div class="scroll"><table class="subject-table">
<tr><th class="text">ROI</th><th>n subjects</th><th>mean Δ [{{ ci_pct }} CI]</th><th>t</th><th>p</th><th>q</th></tr>
{% for row in c.rows %}<tr><td class="text">{{ row.roi }}</td><td>{{ row.n }}</td><td>{{ row.diff }}</td><td>{{ row.t }}</td>
<td>{{ row.p }}</td><td{% if row.sig %} class="sig"{% endif %}>{{ row.q }}</td></tr>
{% endfor %}</table></div>
{% endfor %}{% endif %}

<h2 id="maps">Brain maps</h2>
<p class="note">Every run's {{ split }} {{ metric_label }} voxel by voxel in its dataset's own space (volumes: slice
mosaics in subject space, over the subject's T1 or mean EPI when the dataset has them; surfaces: inflated lateral
and ventral views; without a mesh: the distribution per hemisphere and ROI), and the difference of the two encoders
of each group. The map files themselves are in each run's <code>maps/</code> folder.</p>
<div class="row">{% for fig in figures if fig.section == "maps" %}<figure><img src="{{ fig.src }}" alt="{{ fig.title }}">
<figcaption>{{ fig.title }}: {{ fig.caption }}</figcaption></figure>
{% else %}<p class="note">No brain map (analysis.maps=false, or the runs' data are gone).</p>{% endfor %}</div>

<h2 id="scatter">Voxel by voxel</h2>
<div class="row">{% for fig in figures if fig.section == "scatter" %}<figure><img src="{{ fig.src }}" alt="{{ fig.title }}">
<figcaption>{{ fig.title }}: {{ fig.caption }}</figcaption></figure>
{% else %}<p class="note">No group has two encoders to compare.</p>{% endfor %}</div>

<h2 id="curves">Learning curves</h2>
{% for fig in figures if fig.section == "curves" %}<figure><img src="{{ fig.src }}" alt="{{ fig.title }}">
<figcaption>{{ fig.caption }}</figcaption></figure>
{% else %}<p class="note">No run has a per-epoch CSV log (closed-form heads have no epochs; runs logged to W&amp;B
keep their curves there).</p>{% endfor %}{% endif %}

{% if tables or notes %}<h2 id="files">Tables and notes</h2>
{% if tables %}<p class="note">{% for t in tables %}<a href="{{ t.href }}">{{ t.name }}</a>{% if not loop.last %} · {% endif %}{% endfor %}</p>{% endif %}
{% for note in notes %}<p class="note">note: {{ note }}</p>{% endfor %}{% endif %}

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


def cell_text(cell: dict, star: str = " ★") -> str:
    """An encoder-table cell {"value", "ci_low", "ci_high", "best"}: "0.123 [0.101, 0.145]" (+ the best mark)."""
    if not math.isfinite(cell["value"]):
        return "—"
    ci = f" [{cell['ci_low']:.3f}, {cell['ci_high']:.3f}]" if math.isfinite(cell["ci_low"]) else ""
    return f"{cell['value']:.3f}{ci}" + (star if cell["best"] else "")


def _href(path: Path, out_dir: Path) -> str:
    return quote(Path(os.path.relpath(path, out_dir)).as_posix())


def render(*, directory: Path, out_dir: Path, runs, failed, figures, roi_stats, roi_ci, comparisons, subject_tests,
           encoder_tables, resampling: dict, rois, split: str, metric: str, metric_label: str, short_labels: dict,
           names: dict, tables: list[Path], notes: list[str], epochs: dict[str, int | None]) -> str:
    """The report page as a string (see analyses.jobs.report for the arguments; epochs: run name -> number of
    logged epochs, None without a CSV log)."""
    ci_pct = f"{resampling['ci']:.0%}"
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
            mean, _, n = roi_stats[run.name].get(name, (float("nan"), float("nan"), 0))
            lo, hi = roi_ci.get(run.name, {}).get(name, (float("nan"), float("nan")))
            cells.append(f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}] ({n})" if n else "—")
        roi_rows.append({"name": name, "cells": cells})
    blocks: dict[tuple, dict] = {}
    for r in comparisons:
        key = (r["a"].name, r["b"].name, r["metric"])
        if key not in blocks:
            head, dataset, subject = r["a"].head, r["a"].dataset, r["a"].subject
            blocks[key] = {"a": names.get(r["a"].name, r["a"].backbone), "b": names.get(r["b"].name, r["b"].backbone),
                           "a_run": r["a"].name, "b_run": r["b"].name, "metric": r["metric"],
                           "metric_name": short_labels.get(r["metric"], r["metric"]),
                           "group": f"head {head}, {dataset} subject {subject} (runs {r['a'].name} vs {r['b'].name})",
                           "rows": {}}
        row = blocks[key]["rows"].setdefault(r["roi"], {"roi": r["roi"], "n_voxels": r["n_voxels"], "stats": {}})
        row["stats"][r["statistic"]] = {"a": fmt(r["value_a"]), "b": fmt(r["value_b"]),
                                        "diff": f"{fmt(r['diff'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
                                        "p": fmt(r["p"]), "q": fmt(r["q"]), "sig": math.isfinite(r["q"]) and r["q"] < 0.05}
    empty = {"a": "—", "b": "—", "diff": "—", "p": "—", "q": "—", "sig": False}
    comparison_blocks = [{**b, "rows": [{**row, "stats": [row["stats"].get(s, empty) for s in ("mean", "median")]}
                                        for row in b["rows"].values()]} for b in blocks.values()]
    subject_blocks: dict[tuple, dict] = {}
    for r in subject_tests:
        key = (r["a"], r["b"], r["head"], r["dataset"], r["metric"], r["statistic"])
        block = subject_blocks.setdefault(key, {"a": r["a"], "b": r["b"], "dataset": r["dataset"],
                                                "metric_name": short_labels.get(r["metric"], r["metric"]),
                                                "statistic": r["statistic"], "subjects": ", ".join(r["subjects"]),
                                                "rows": []})
        block["rows"].append({"roi": r["roi"], "n": int(r["n"]), "t": fmt(r["t"], 2), "p": fmt(r["p"]),
                              "diff": f"{fmt(r['diff'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]", "q": fmt(r["q"]),
                              "sig": math.isfinite(r["q"]) and r["q"] < 0.05})
    tables_view = [{**t, "rows": [{**row, "cells": [{**c, "text": cell_text(c)} for c in row["cells"]]}
                                  for row in t["rows"]]} for t in encoder_tables]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE).render(
        title=directory.name, directory=str(directory), runs=runs, failed=failed, split=split,
        thresholds=", ".join(sorted({f"{t:g}" for r in runs
                                     if (t := r.metrics.get(split, {}).get("nc_threshold")) is not None})) or "—",
        generated=time.strftime("%Y-%m-%d %H:%M"), run_rows=run_rows, roi_rows=roi_rows,
        comparisons=comparison_blocks, subject_blocks=list(subject_blocks.values()), encoder_tables=tables_view,
        resampling=resampling, ci_pct=ci_pct,
        interval_name="BCa" if resampling.get("interval") == "bca" else "percentile", names=names, short_label=short_labels.get(metric, metric),
        figures=[{**f, "src": _href(f["path"], out_dir)} for f in figures], metric_label=metric_label,
        tables=[{"name": p.name, "href": _href(p, out_dir)} for p in tables], notes=notes)
