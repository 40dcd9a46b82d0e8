"""``analyze.py analysis=maps``: every run's brain maps in its dataset's own space, and the difference between two
encoders (options in conf/analysis/maps.yaml).

    python analyze.py analysis=maps run_dir=DIR | sweep_dir=DIR
    python analyze.py analysis=maps sweep_dir=DIR 'analysis.compare=[[0_tiny_ridge,1_tiny_vit_ridge]]'

Per run, under ``<run>/maps/`` (``RunDir.write_maps``, the space from the run's datamodule class): one map per
metric, ``<split>_<metric>`` (test_r, test_r2, test_nc_r2), as ``<name>.nii.gz`` (NSD volumes, the synthetic data),
``{lh,rh}.<name>.mgh`` (NSD surfaces) or ``<name>.dscalar.nii`` (NOD, video), NaN outside the run's voxels, and its
picture ``<name>.png`` (``maps_figures``). train.py writes the same at the end of every run (``write_training_maps``,
the ``maps:`` section of conf/train.yaml). Over a sweep, for every two runs of a comparison group with different
encoders (``compare: auto``) or the pairs named: ``<sweep>/maps/<A>_minus_<B>/diff_<split>_<metric>.*`` = A − B at
the voxels both runs scored, in A's space, with its picture.

Analyses with per-voxel results write theirs through ``write_job_maps`` (wen2018: best layer, FDR q; clip_msm:
top concept and its share) into the same folder.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analyses.jobs.base import Job, JobOptions
from analyses.jobs.encoder_pairs import comparison_groups, encoder_pairs
from analyses.jobs.maps_figures import MapStyle, plot_map, style_for
from analyses.methods.voxels import common_voxels
from encoders.run_dir import RunDir, write_maps

log = logging.getLogger(__name__)

METRICS = ("r", "r2", "nc_r2", "nc")
BACKGROUNDS = ("auto", "t1", "mean", "none")


@dataclass
class MapsOptions(JobOptions):
    """conf/analysis/maps.yaml (and the ``maps:`` section of conf/train.yaml: split, metrics, pictures,
    surfaces, background)."""

    JOB = "maps"
    split: str = "test"
    metrics: list[str] = field(default_factory=lambda: ["r", "r2", "nc_r2"])
    pictures: bool = True
    surfaces: dict | None = None
    background: str = "auto"
    compare: str | list | None = "auto"
    compare_metrics: list[str] = field(default_factory=lambda: ["nc_r2", "r"])
    wandb: str | bool = "auto"
    out_subdir: str = "maps"

    def check(self) -> None:
        for key in ("metrics", "compare_metrics"):
            bad = [m for m in getattr(self, key) or [] if m not in METRICS]
            if bad:
                raise ValueError(f"analysis.{key}: {bad} not in {list(METRICS)}")
        if str(self.background).lower() not in BACKGROUNDS:
            raise ValueError(f"analysis.background must be one of {list(BACKGROUNDS)}, got {self.background!r}")
        if self.surfaces is not None and (not isinstance(self.surfaces, Mapping)
                                          or set(self.surfaces) != {"left", "right"}):
            raise ValueError("analysis.surfaces: give {left: <lh mesh>, right: <rh mesh>} (GIFTI or FreeSurfer)")
        if isinstance(self.compare, str) and self.compare not in ("auto", "none"):
            raise ValueError(f"analysis.compare must be auto, none or a list of [run A, run B] pairs, got {self.compare!r}")
        if isinstance(self.compare, (list, tuple)) and any(not isinstance(p, (list, tuple)) or len(p) != 2
                                                            for p in self.compare):
            raise ValueError(f"analysis.compare: every entry must be a pair [run A, run B], got {self.compare}")


def metric_maps(run: RunDir, split: str, metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """{"<split>_<metric>": (n_voxels,)} from the run's voxel_metrics.npz."""
    return {f"{split}_{m}": run.voxels().values(split, m) for m in metrics}


def draw(run_space, maps: Mapping[str, np.ndarray], voxel_xyz: np.ndarray, folder: Path, title: str,
         styles: Mapping[str, MapStyle] | None = None, surfaces: dict | None = None, background: str = "auto",
         rois: dict | None = None) -> list[Path]:
    """A picture ``<folder>/<name>.png`` of every map (style from ``styles`` or by name)."""
    return [plot_map(run_space, values, voxel_xyz, folder / f"{name}.png", title, (styles or {}).get(name) or style_for(name),
                     surfaces=surfaces, background=background, rois=rois) for name, values in maps.items()]


def run_title(run: RunDir) -> str:
    layers = ",".join(str(x) for x in run.info.get("layers", []))
    return f"{run.backbone} [{layers}] / {run.head} — {run.dataset} subject {run.subject} ({run.name})"


def write_run_maps(run: RunDir, options: MapsOptions, space=None) -> list[Path]:
    """The run's metric maps and their pictures under ``<run>/<out_subdir>/``."""
    space = space or run.brain_space()
    maps = metric_maps(run, options.split, options.metrics)
    folder = run.path / options.out_subdir
    files = write_maps(folder, space, run.voxel_xyz, maps)
    if options.pictures:
        files += draw(space, maps, run.voxel_xyz, folder, run_title(run), surfaces=options.surfaces,
                      background=options.background, rois=run.rois())
    return files


def write_training_maps(run: RunDir, section: Mapping | None) -> list[Path]:
    """What train.py calls at the end of a run: the ``maps:`` section of its config (``enabled``, split, metrics,
    pictures, surfaces, background). A run is complete without its maps, so a failure here is a warning naming
    the cause and the command that writes them later, never a failed run."""
    section = dict(section or {})
    if not section.pop("enabled", True):
        return []
    try:
        options = MapsOptions.from_config(section)
        files = write_run_maps(run, options)
    except Exception as err:  # noqa: BLE001 - the run itself is written; only its maps are missing
        log.warning("brain maps not written (%s: %s); write them with: python analyze.py analysis=maps run_dir=%s",
                    type(err).__name__, err, run.path)
        return []
    log.info("brain maps: %d files in %s", len(files), run.path / options.out_subdir)
    return files


def write_job_maps(run: RunDir, maps: Mapping[str, np.ndarray], styles: Mapping[str, MapStyle] | None = None,
                   pictures: bool = True) -> tuple[list[Path], list[str]]:
    """An analysis's per-voxel results {name: (n_voxels,)} as maps (+ pictures) in ``<run>/maps/``.

    Returns (files, notes): when the run's space cannot be found (its dataset moved), nothing is written and the
    note says why, so the analysis itself goes on."""
    try:
        space = run.brain_space()
        files = run.write_maps(dict(maps), space)
        if pictures:
            files += draw(space, maps, run.voxel_xyz, run.maps_dir, run_title(run), styles, rois=run.rois())
    except (FileNotFoundError, ValueError) as err:
        return [], [f"brain maps not written: {err}"]
    return files, []


def wen2018_maps(voxels: Mapping[str, np.ndarray], layers: Sequence[str] | None, q: float
                 ) -> tuple[dict[str, np.ndarray], dict[str, MapStyle]]:
    """Wen 2018's per-voxel results as maps: ``wen2018_q`` (the Benjamini–Hochberg q of each voxel's accuracy,
    pictured as −log10 q) and, for runs on ≥ 2 layers, ``wen2018_best_layer`` (0-based index into ``layers``,
    NaN where no layer scored)."""
    maps = {"wen2018_q": np.asarray(voxels["p_fdr"], np.float64)}
    styles = {"wen2018_q": MapStyle(f"−log10 FDR q (significant: > {-np.log10(q):.1f})", "magma", False, 0.0,
                                    neg_log10=True)}
    if layers is not None and "best_layer" in voxels:
        best = np.asarray(voxels["best_layer"], np.float64)
        maps["wen2018_best_layer"] = np.where(best >= 0, best, np.nan)
        styles["wen2018_best_layer"] = MapStyle("best layer", categories=tuple(str(x) for x in layers))
    return maps, styles


def clip_msm_maps(S: np.ndarray, labels: np.ndarray, concepts: Sequence[str]
                  ) -> tuple[dict[str, np.ndarray], dict[str, MapStyle]]:
    """CLIP-MSM's per-voxel results as maps: ``clip_msm_top_concept`` (0-based index into ``concepts`` of each
    voxel's hard label) and ``clip_msm_top_share`` (that concept's share of the voxel's multi-semantic map S,
    (n_concepts, n_voxels) softmax over concepts)."""
    labels = np.asarray(labels, np.int64)
    share = np.asarray(S, np.float64)[labels, np.arange(len(labels))]
    return ({"clip_msm_top_concept": labels.astype(np.float64), "clip_msm_top_share": share},
            {"clip_msm_top_concept": MapStyle("top concept", categories=tuple(str(c) for c in concepts)),
             "clip_msm_top_share": MapStyle("share of the top concept (softmax over concepts)", "viridis", False,
                                            1.0 / max(len(concepts), 1), 1.0)})


# ----------------------------------------------------------------------------- differences between encoders


def pairs_to_compare(runs: Sequence[RunDir], compare) -> list[tuple[RunDir, RunDir]]:
    """``compare``: "auto" (every two runs of a comparison group with different encoders), "none"/None, or
    [[A, B], ...] naming runs by their name in the sweep or their directory. ValueError for an unknown run."""
    if compare in (None, "none") or compare == []:
        return []
    if compare == "auto":
        return [pair for members in comparison_groups(runs).values() for pair in encoder_pairs(members)]
    by_name = {run.name: run for run in runs} | {str(run.path): run for run in runs}
    out = []
    for a, b in compare:
        pair = []
        for ref in (a, b):
            run = by_name.get(str(ref)) or by_name.get(str(Path(ref).resolve()))
            if run is None:
                if not (Path(ref) / "metrics.json").is_file():
                    raise ValueError(f"analysis.compare: no run {ref!r} (the sweep has {sorted(r.name for r in runs)})")
                run = RunDir(ref)
            pair.append(run)
        out.append(tuple(pair))
    return out


def difference_maps(a: RunDir, b: RunDir, split: str, metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """{"diff_<split>_<metric>": (n_voxels of a,)} = a − b at the voxels both scored (matched by coordinates),
    NaN at a's other voxels."""
    ia, ib = common_voxels(a.voxel_xyz, b.voxel_xyz)
    out = {}
    for m in metrics:
        diff = np.full(a.voxels().n_voxels, np.nan)
        diff[ia] = a.voxels().values(split, m)[ia] - b.voxels().values(split, m)[ib]
        out[f"diff_{split}_{m}"] = diff
    return out


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


class MapsJob(Job):
    """Brain maps of every run (per run), then the differences between encoders (over the sweep)."""

    name = "maps"
    Options = MapsOptions

    def compute(self, run: RunDir) -> dict:
        try:
            space = run.brain_space()
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"{run.path}: cannot find the run's brain space: {err}") from None
        return {"space": space}

    def write(self, run: RunDir, result: dict) -> list[Path]:
        return write_run_maps(run, self.options, result["space"])

    def show(self, run: RunDir, result: dict) -> None:
        d = result["space"].describe()
        self.console.print(f"space: {d['kind']} ({d['source']})")

    def combine(self, results: list[tuple[RunDir, dict]]) -> list[dict] | None:
        o = self.options
        runs = [run for run, _ in results]
        spaces = {run.name: r["space"] for run, r in results}
        out = []
        for a, b in pairs_to_compare(runs, o.compare):
            space = spaces.get(a.name) or a.brain_space()
            other = spaces.get(b.name) or b.brain_space()
            if not space.same_grid(other):
                self.notes([f"{a.name} vs {b.name}: not in the same space ({space.describe()['source']} vs "
                            f"{other.describe()['source']}); no difference map"])
                continue
            out.append({"a": a, "b": b, "space": space, "maps": difference_maps(a, b, o.split, o.compare_metrics)})
        return out or None

    def write_combined(self, combined: list[dict], target: Path) -> list[Path]:
        o = self.options
        files = []
        for item in combined:
            a, b = item["a"], item["b"]
            folder = target / o.out_subdir / f"{_slug(a.name)}_minus_{_slug(b.name)}"
            files += write_maps(folder, item["space"], a.voxel_xyz, item["maps"])
            if o.pictures:
                files += draw(item["space"], item["maps"], a.voxel_xyz, folder,
                              f"{a.backbone} ({a.name}) − {b.backbone} ({b.name})", surfaces=o.surfaces,
                              background=o.background, rois=a.rois())
        return files
