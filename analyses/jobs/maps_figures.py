"""Pictures of brain maps in the dataset's own space (nilearn's plotting, matplotlib Agg; no network).

    plot_map(space, values, voxel_xyz, "maps/test_nc_r2.png", "NC-R² — run", style_for("test_nc_r2"))

* Volumes (``VolumeSpace``): a slice mosaic in subject space (``nilearn.plotting.plot_stat_map``,
  ``display_mode="mosaic"``: sagittal, coronal and axial rows through the extent of the run's voxels), over the
  subject's T1 or mean EPI in that space when the dataset has them (``background``: auto = T1, else mean EPI,
  else none), else on black.
* Surfaces (``SurfaceSpace`` with FreeSurfer's inflated surfaces, e.g. NSD's fsaverage; ``CiftiSpace`` with the
  fsLR surfaces the user gives, ``surfaces={left: lh.surf.gii, right: rh.surf.gii}``): lateral and ventral views of
  both hemispheres (``nilearn.plotting.plot_surf_stat_map``), over sulcal depth when the dataset has it.
* No mesh (a CIFTI run without ``surfaces``, NSD surfaces without their ``surf/`` files): the documented fallback,
  the map's distribution per hemisphere and per ROI (histogram and box plots), with the reason in the title.

Categorical maps (best layer, top concept) are drawn as index + 1 on a discrete colour map with a legend; every
other map on a continuous one (diverging and symmetric around 0 for accuracies and differences).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analyses.jobs.outputs import pyplot, save_figure

DPI = 90
VIEWS = ("lateral", "ventral")


@dataclass(frozen=True)
class MapStyle:
    """How a map is coloured: label (colour bar), cmap, symmetric around 0, fixed vmin / vmax (None: from the data,
    the 99th percentile of |values| for symmetric maps), categories (values are 0-based indices into them),
    neg_log10 (draw −log10 of the values, e.g. of q-values; the file keeps the values)."""

    label: str
    cmap: str = "RdBu_r"
    symmetric: bool = True
    vmin: float | None = None
    vmax: float | None = None
    categories: tuple[str, ...] | None = None
    neg_log10: bool = False


METRIC_STYLES = {
    "nc_r2": MapStyle("NC-R² (R² / noise ceiling)"),
    "r2": MapStyle("R²"),
    "r": MapStyle("Pearson r"),
    "nc": MapStyle("noise ceiling (% of variance)", "viridis", False, 0.0),
}


def style_for(name: str) -> MapStyle:
    """The style of a map named ``<split>_<metric>`` (test_r, test_nc_r2, …) or ``diff_<split>_<metric>``."""
    for suffix in ("nc_r2", "r2", "nc", "r"):
        if name.endswith("_" + suffix) or name == suffix:
            style = METRIC_STYLES[suffix]
            if name.startswith("diff_"):
                return MapStyle(f"difference of {style.label}")
            return style
    return MapStyle(name)


def _limits(values: np.ndarray, style: MapStyle) -> tuple[float | None, float | None]:
    finite = values[np.isfinite(values)]
    if style.categories is not None:
        return 0.5, len(style.categories) + 0.5
    if style.symmetric:
        vmax = style.vmax if style.vmax is not None else (float(np.percentile(np.abs(finite), 99)) if finite.size else 1.0)
        return -(vmax or 1.0), (vmax or 1.0)
    vmin = style.vmin if style.vmin is not None else (float(finite.min()) if finite.size else 0.0)
    vmax = style.vmax if style.vmax is not None else (float(finite.max()) if finite.size else 1.0)
    return vmin, vmax if vmax > vmin else vmin + 1.0


def _cmap(style: MapStyle):
    if style.categories is None:
        return style.cmap
    from matplotlib.colors import ListedColormap

    plt = pyplot()
    base = plt.get_cmap("tab10" if len(style.categories) <= 10 else "tab20")
    return ListedColormap([base(k % base.N) for k in range(len(style.categories))])


def _shown(values: np.ndarray, style: MapStyle) -> np.ndarray:
    """What is drawn: categorical indices as index + 1 (0 and NaN = no voxel), else the values."""
    values = np.asarray(values, dtype=np.float32)
    return values + 1 if style.categories is not None else values


def _legend(fig, style: MapStyle) -> None:
    if style.categories is None:
        return
    from matplotlib.patches import Patch

    cmap = _cmap(style)
    fig.legend(handles=[Patch(color=cmap(k), label=name) for k, name in enumerate(style.categories)],
               loc="lower center", ncol=min(len(style.categories), 6), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.1), title=style.label, title_fontsize=8)


def plot_map(space, values: np.ndarray, voxel_xyz: np.ndarray, path: str | Path, title: str, style: MapStyle,
             surfaces: dict | None = None, background: str = "auto", rois: dict[str, np.ndarray] | None = None) -> Path:
    """Draw a per-voxel map (n_voxels,) of a run in its space to ``path`` (PNG); see the module docstring.

    surfaces: {"left": mesh file, "right": mesh file} (GIFTI or FreeSurfer), for CIFTI runs or to replace a
    dataset's own; background: auto | t1 | mean | none (volumes); rois: {name: bool (n_voxels,)} for the fallback.
    """
    path = Path(path)
    values = np.asarray(values, dtype=np.float64)
    if style.neg_log10:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = -np.log10(np.clip(values, 1e-300, None))
    with warnings.catch_warnings():  # nilearn: NaN outside the voxels becomes 0 (hidden by the threshold)
        warnings.simplefilter("ignore")
        if space.kind == "volume":
            return _plot_volume(space, values, voxel_xyz, path, title, style, background)
        meshes = _meshes(space, surfaces)
        if meshes is None:
            why = ("no surface mesh: set maps.surfaces (train.py) or analysis.surfaces (analyze.py) to "
                   "{left: <lh mesh>, right: <rh mesh>}" if space.kind == "cifti"
                   else f"no surface mesh in {space.describe().get('surface') or 'the dataset'}'s surf/ folder")
            return _plot_distribution(space, values, voxel_xyz, path, f"{title}\n({why})", style, rois)
        return _plot_surfaces(space, values, voxel_xyz, meshes, path, title, style)


def _plot_volume(space, values, voxel_xyz, path: Path, title: str, style: MapStyle, background: str) -> Path:
    import nibabel as nib
    from nilearn import plotting

    plt = pyplot()
    img = space.image(_shown(values, style), voxel_xyz)
    choice = {"auto": ["T1", "mean EPI"], "t1": ["T1"], "mean": ["mean EPI"], "none": []}.get(str(background).lower())
    if choice is None:
        raise ValueError(f"maps.background must be auto, t1, mean or none, got {background!r}")
    bg_name = next((k for k in choice if k in space.anatomy), None)
    bg = str(space.anatomy[bg_name]) if bg_name else None
    xyz = np.asarray(voxel_xyz)[np.isfinite(values)]
    if not len(xyz):
        xyz = np.asarray(voxel_xyz) if len(voxel_xyz) else np.zeros((1, 3), int)
    cuts = {}
    for k, axis in enumerate("xyz"):  # six slices per direction, spread over where the voxels are
        idx = np.unique(np.round(np.percentile(xyz[:, k], np.linspace(8, 92, 6))).astype(int))
        points = np.zeros((len(idx), 3))
        points[:, k] = idx
        cuts[axis] = nib.affines.apply_affine(space.affine, points)[:, k].tolist()
    vmin, vmax = _limits(values, style)
    fig = plt.figure(figsize=(13, 5.2))
    display = plotting.plot_stat_map(
        img, bg_img=bg, display_mode="mosaic", cut_coords=cuts, figure=fig, cmap=_cmap(style),
        symmetric_cbar=style.symmetric and style.categories is None, vmin=vmin, vmax=vmax,
        threshold=0.5 if style.categories is not None else 1e-6, black_bg=False, draw_cross=False, annotate=True,
        colorbar=style.categories is None, title=None, resampling_interpolation="nearest")
    fig.suptitle(f"{title}\n{style.label}" + (f" over the subject's {bg_name}" if bg_name else ""), fontsize=10, y=1.06)
    _legend(fig, style)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    display.close()
    plt.close(fig)
    return path


def _meshes(space, surfaces: dict | None) -> dict | None:
    """{"left": {"mesh": path, "sulc": path or None}, "right": ...}: the user's surfaces, else the space's own;
    ValueError when a given mesh's vertex count does not match the space."""
    from nilearn import surface as nsurf

    if surfaces:
        missing = [h for h in ("left", "right") if not surfaces.get(h)]
        if missing:
            raise ValueError(f"maps.surfaces: give a mesh for both hemispheres (missing {missing}), e.g. "
                             f"{{left: L.inflated.32k_fs_LR.surf.gii, right: R.inflated.32k_fs_LR.surf.gii}}")
        meshes = {h: {"mesh": Path(surfaces[h]), "sulc": None} for h in ("left", "right")}
    elif getattr(space, "meshes", None):
        meshes = {h: {"mesh": space.meshes[h]["inflated"], "sulc": space.meshes[h].get("sulc")} for h in ("left", "right")}
    else:
        return None
    counts = space.n_vertices if isinstance(space.n_vertices, dict) else dict(zip(("left", "right"), space.n_vertices))
    for h, files in meshes.items():
        if not files["mesh"].is_file():
            raise FileNotFoundError(f"{files['mesh']}: surface mesh not found (maps.surfaces.{h})")
        try:
            n = len(nsurf.load_surf_mesh(str(files["mesh"])).coordinates)
        except Exception as err:  # nilearn/nibabel raise several types for unreadable meshes
            raise ValueError(f"{files['mesh']}: cannot read as a surface mesh ({type(err).__name__}: {err})") from None
        if n != counts.get(h):
            raise ValueError(f"{files['mesh']}: {n} vertices, but the run's {h} hemisphere has {counts.get(h)}")
    return meshes


def _plot_surfaces(space, values, voxel_xyz, meshes: dict, path: Path, title: str, style: MapStyle) -> Path:
    from nilearn import plotting
    from nilearn import surface as nsurf

    plt = pyplot()
    grids = space.hemispheres(_shown(values, style), voxel_xyz)
    vmin, vmax = _limits(values, style)
    fig, axes = plt.subplots(len(VIEWS), 2, figsize=(9, 6.5), subplot_kw={"projection": "3d"})
    for j, hemi in enumerate(("left", "right")):
        mesh = nsurf.load_surf_mesh(str(meshes[hemi]["mesh"]))
        sulc = meshes[hemi]["sulc"]
        bg = nsurf.load_surf_data(str(sulc)) if sulc is not None and Path(sulc).is_file() else None
        for i, view in enumerate(VIEWS):
            plotting.plot_surf_stat_map(
                mesh, grids[hemi].astype(np.float64), bg_map=bg, hemi=hemi, view=view, axes=axes[i, j], figure=fig,
                cmap=_cmap(style), vmin=vmin, vmax=vmax, symmetric_cbar=style.symmetric and style.categories is None,
                threshold=0.5 if style.categories is not None else 1e-6,
                colorbar=style.categories is None and i == len(VIEWS) - 1 and j == 1, title=f"{hemi} {view}",
                title_font_size=9)
    fig.suptitle(f"{title}\n{style.label}", fontsize=10)
    _legend(fig, style)
    return save_figure(fig, path, dpi=DPI, bbox_inches="tight", facecolor="white")


def _plot_distribution(space, values, voxel_xyz, path: Path, title: str, style: MapStyle,
                       rois: dict[str, np.ndarray] | None) -> Path:
    """The fallback without a mesh: per hemisphere a histogram of the map, per ROI a box plot."""
    plt = pyplot()
    grids = space.hemispheres(values, voxel_xyz)
    fig, (ax_h, ax_r) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.6]})
    for hemi, grid in grids.items():
        finite = grid[np.isfinite(grid)]
        if finite.size:
            ax_h.hist(finite, bins=40, alpha=0.6, label=f"{hemi} ({finite.size} vertices)")
    ax_h.set_xlabel(style.label if style.categories is None else "index")
    ax_h.set_ylabel("vertices")
    ax_h.legend(fontsize=8, frameon=False)
    rois = {n: m for n, m in (rois or {}).items() if np.isfinite(values[np.asarray(m, bool)]).any()}
    if rois:
        data = [values[np.asarray(m, bool)] for m in rois.values()]
        ax_r.boxplot([d[np.isfinite(d)] for d in data], showfliers=False)
        ax_r.set_xticks(np.arange(1, len(rois) + 1), list(rois), rotation=60, ha="right", fontsize=8)
        ax_r.set_ylabel(style.label)
        ax_r.axhline(0, color="grey", linewidth=0.6)
    else:
        ax_r.set_axis_off()
    for ax in (ax_h, ax_r):
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=DPI, bbox_inches="tight", facecolor="white")
