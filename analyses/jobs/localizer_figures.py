"""The localizer job's figures (matplotlib, Agg backend): each function draws one PNG and returns its path."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from analyses.jobs.outputs import pyplot, save_figure


def plot_counts(rows: list[dict], set_name: str, path: Path, opts) -> Path:
    """% selective units per layer and category (main localizer): solid = the run's weights, dashed = random."""
    plt = pyplot()
    rows = [r for r in rows if r["localizer"] == set_name]
    groups = list(dict.fromkeys((r["backbone"], r["weights"]) for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {}
    for backbone, weights in groups:
        sel = [r for r in rows if (r["backbone"], r["weights"]) == (backbone, weights)]
        layers = list(dict.fromkeys(r["layer"] for r in sel))
        style = "--" if sel[0]["variant"] == "random" else "-"
        for category in dict.fromkeys(r["category"] for r in sel):
            y = [next(r["percent"] for r in sel if r["layer"] == layer and r["category"] == category) for layer in layers]
            colour = colours.setdefault(category, f"C{len(colours) % 10}")
            ax.plot(range(len(layers)), y, style, marker="o", color=colour, label=f"{category} — {backbone} {weights}")
        ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right")
    rule = f"top {opts.top_percent}%" if opts.top_percent is not None else f"t > {opts.t_threshold}"
    ax.set_ylabel(f"% selective units ({rule})")
    ax.set_title(f"category-selective units per layer ({set_name} localizer)", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_comparison(rows: list[dict], ceiling: list[dict], set_name: str, path: Path) -> Path:
    """Noise-corrected tuning and RDM consistency per category: each run's units (main localizer) vs the
    human–human ceiling, with bootstrap CIs."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, measure in zip(axes, ("tuning", "rdm")):
        model = [r for r in rows if r["measure"] == measure and r["localizer"] == set_name]
        hh = [r for r in ceiling if r["measure"] == measure]
        categories = list(dict.fromkeys([r["category"] for r in model] + [r["category"] for r in hh]))
        series = list(dict.fromkeys(f"{r['backbone']} {r['layer']} → sub{r['subject']}" for r in model))
        series += list(dict.fromkeys(f"human sub{r['subject_a']} ↔ sub{r['subject_b']}" for r in hh))
        width = 0.8 / max(len(series), 1)
        for j, name in enumerate(series):
            pick = [r for r in model if f"{r['backbone']} {r['layer']} → sub{r['subject']}" == name] or \
                   [r for r in hh if f"human sub{r['subject_a']} ↔ sub{r['subject_b']}" == name]
            y, lo, hi = [], [], []
            for c in categories:
                r = next((p for p in pick if p["category"] == c), None)
                v = r["score_nc"] if r else np.nan
                y.append(v)
                lo.append(v - r["score_nc_lo"] if r else np.nan)
                hi.append(r["score_nc_hi"] - v if r else np.nan)
            err = np.nan_to_num(np.abs(np.array([lo, hi], dtype=float)))
            ax.bar(np.arange(len(categories)) + j * width, np.nan_to_num(np.array(y, dtype=float)), width, yerr=err,
                   capsize=2, label=name, color="0.4" if name.startswith("human") else f"C{j}")
        ax.set_xticks(np.arange(len(categories)) + 0.4 - width / 2, categories)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel("noise-corrected r (95% CI)")
        ax.set_title("univariate tuning" if measure == "tuning" else "representational geometry (RDM)", fontsize=10)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_lesions(rows: list[dict], path: Path) -> Path:
    """Held-out mean r in each region for each unit subset (random subsets: mean ± SD over draws)."""
    plt = pyplot()
    groups = list(dict.fromkeys((r["run"], r["layer"], r["category"]) for r in rows))
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
    width = 0.8 / len(conditions)
    for j, cond in enumerate(conditions):
        y = [next((r["r_mean"] for r in rows if (r["run"], r["layer"], r["category"]) == g and r["condition"] == cond),
                  np.nan) for g in groups]
        e = [next((r["r_sd"] for r in rows if (r["run"], r["layer"], r["category"]) == g and r["condition"] == cond),
                  np.nan) for g in groups]
        ax.bar(np.arange(len(groups)) + j * width, np.nan_to_num(np.array(y, float)), width,
               yerr=np.nan_to_num(np.array(e, float)), capsize=2, label=cond)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, [f"{c}\n{lay}\n{run[:12]}" for run, lay, c in groups], fontsize=7)
    ax.set_ylabel("test r in the region (mean over voxels)")
    ax.set_title("encoding lesions", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
