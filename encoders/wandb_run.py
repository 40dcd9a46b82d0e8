"""This project's Weights & Biases runs: a training run a dashboard can group, filter and compare by, and the
analysis runs that refer to it. Offline unless the W&B-mode rule says online (``encoders.wandb_mode``: never
waiting on a missing network).

    logger=wandb / csv_wandb     -> encoders.wandb_logger.TrainingLogger (conf/logger/wandb.yaml)
    run = init_run(directory=..., project=..., group=..., name=..., job_type="analysis", tags=[...], config={...})
    log_encoder_run(run, RunDir(...))   # summary, per-ROI table, figures of a finished encoder run
    analysis_run(RunDir(...), "wen2018", config={...})   # a job_type="analysis" run referring to the encoder run

A training run (``job_type="train"``) carries the resolved config, nested (``backbone.name``, ``head.alphas``,
``data.subject``, …); the name ``<backbone>[<layers>]-<head>-<dataset>-subj<N>``; the group (conf/logger/wandb.yaml:
``logger.wandb.group``, default the experiment, else the multirun directory's name, else ``<dataset>-subj<N>``);
and at the end the summary ``encoder_summary`` gives (``test/r_mean``, ``test/nc_r2_median``,
``test/roi/FFA-1/nc_r2_mean_reliable``, …, ``n_voxels``, ``n_features``, ``wall_time_s``,
``extraction_images_per_s``), the table ``roi_results``, the image ``figures/roi_bars`` and every PNG the run
directory's ``maps/`` holds (``maps/<name>``). run.json's ``wandb`` records its id, project, group, name, mode
and directory; an analysis never makes a second run of the same encoder: it logs a ``job_type="analysis"`` run
in the encoder run's group whose config names it (``encoder_run.id``).
"""
from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

from encoders.run_dir import RunDir
from encoders.wandb_mode import MODES, PROBE_TIMEOUT_S, effective_mode, mark_unreachable

log = logging.getLogger("brainprobe.wandb")

JOB_TRAIN, JOB_ANALYSIS = "train", "analysis"
# After the server answered the probe, how long wandb.init may take before the run falls back to offline.
INIT_TIMEOUT_S = 30.0
MAPS_DIR = "maps"


# ----------------------------------------------------------------------------- names and groups


def run_name(backbone: str, layers: Sequence[str] | None, head: str, dataset: str, subject) -> str:
    """A training run's display name: ``alexnet[conv5,fc6]-ridge-nsd-subj1``."""
    layer_text = f"[{','.join(str(x) for x in layers)}]" if layers else ""
    return f"{backbone}{layer_text}-{head}-{dataset}-subj{subject}"


def default_group(experiment: str | None, sweep_dir_name: str | None, dataset: str, subject) -> str:
    """The W&B group of a training run when ``logger.wandb.group`` is not set: the experiment's name when one
    is selected, else the multirun (sweep) directory's name, else ``<dataset>-subj<N>`` (a single run)."""
    if experiment and str(experiment) not in ("null", "None"):
        return str(experiment)
    if sweep_dir_name:
        return str(sweep_dir_name)
    return f"{dataset}-subj{subject}"


def run_tags(info: dict) -> list[str]:
    """[backbone, head, dataset, subj<N>] from run.json (as conf/logger/wandb.yaml tags training runs)."""
    data = info.get("data", {})
    return [str(info.get("backbone", "?")), str(info.get("head", "?")), str(data.get("dataset", "?")),
            f"subj{data.get('subject', '?')}"]


def encoder_group(run: RunDir, default: str | None = None) -> str:
    """The group of an encoder run's W&B runs: the one it trained under (run.json, else its config's
    ``logger.wandb.group``), else ``default``, else ``<dataset>-subj<N>``."""
    record = run.wandb or {}
    if record.get("group"):
        return str(record["group"])
    group = ((run.config.get("logger") or {}).get("wandb") or {}).get("group")
    if group:
        return str(group)
    return default or f"{run.dataset}-subj{run.subject}"


def encoder_project(run: RunDir, default: str = "brainprobe") -> str:
    record = run.wandb or {}
    return str(record.get("project") or ((run.config.get("logger") or {}).get("wandb") or {}).get("project") or default)


def encoder_run_name(run: RunDir) -> str:
    info = run.info
    return run_name(run.backbone, info.get("layers"), run.head, run.dataset, run.subject)


# ----------------------------------------------------------------------------- starting a run


def init_run(*, directory: str | os.PathLike, project: str, group: str, name: str, job_type: str,
             tags: Sequence[str] = (), config: dict | None = None, run_id: str | None = None, mode: str | None = None,
             probe_timeout: float = PROBE_TIMEOUT_S, init_timeout: float = INIT_TIMEOUT_S, **init_kwargs):
    """A new W&B run, files under ``directory/wandb``. The mode is ``mode`` or the W&B-mode rule; an online run
    whose server does not answer within ``probe_timeout`` s, or that wandb cannot start within
    ``init_timeout`` s, starts offline instead with one warning line. ``init_kwargs`` go to ``wandb.init``
    (e.g. ``entity``, ``notes``). Returns the ``wandb`` run (its mode: ``run_mode``)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    decision = effective_mode(probe_timeout, mode)  # also removes an empty WANDB_MODE before wandb reads it
    if decision.warning:
        log.warning(decision.warning)
    import wandb

    Path(directory).mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, init_timeout=float(init_timeout))
    kwargs = dict(project=project, dir=str(directory), group=group, name=name, job_type=job_type, tags=list(tags),
                  config=config or {}, id=run_id, reinit="create_new", settings=settings, **init_kwargs)
    try:
        return wandb.init(mode=decision.mode, **kwargs)
    except Exception as err:  # wandb's errors (CommError, AuthenticationError, timeouts) share no useful base
        if decision.mode != "online":
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        reason = f"{type(err).__name__}: {message}" if message else type(err).__name__
        log.warning("W&B could not start an online run (%s); logging offline instead", reason)
        mark_unreachable(decision.url or "", reason)
        return wandb.init(mode="offline", **kwargs)


def run_mode(run) -> str:
    """"online", "offline" or "disabled": the mode a W&B run is in."""
    return MODES.get(str(run.settings.mode), str(run.settings.mode))


def run_record(run) -> dict:
    """What run.json records about a W&B run: id, project, group, name, job_type, mode, dir (its folder)."""
    directory = str(Path(run.dir).parent) if getattr(run, "dir", None) else None
    return {"id": run.id, "project": run.project, "group": run.group, "name": run.name, "job_type": run.job_type,
            "mode": run_mode(run), "dir": directory}


def sync_line(directories: Sequence[str | os.PathLike]) -> str:
    """The one command that uploads offline runs: ``wandb sync DIR [DIR ...]``."""
    return "wandb sync " + " ".join(str(d) for d in directories)


# ----------------------------------------------------------------------------- an encoder run's results


def flat_summary(metrics: dict) -> dict[str, float]:
    """metrics.json -> {"<split>/<key>": value, "<split>/roi/<ROI>/<key>": value} (finite numbers only)."""
    out = {}
    for split, block in metrics.items():
        for key, value in block.items():
            if key != "rois" and _number(value):
                out[f"{split}/{key}"] = value
        for roi, roi_block in block.get("rois", {}).items():
            for key, value in roi_block.items():
                if _number(value):
                    out[f"{split}/roi/{roi}/{key}"] = value
    return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def encoder_summary(run: RunDir) -> dict[str, float]:
    """The W&B summary of a finished encoder run: metrics.json flattened (``flat_summary``) and
    ``n_voxels``, ``n_features``, ``wall_time_s``, ``extraction_images_per_s`` (when it extracted features)."""
    metrics, info = run.metrics, run.info
    extraction = (info.get("features") or {}).get("extraction") or {}
    extra = {"n_voxels": (metrics.get("test") or {}).get("n_voxels"), "n_features": info.get("n_features"),
             "wall_time_s": info.get("wall_time_s"), "extraction_images_per_s": extraction.get("images_per_s")}
    return {**flat_summary(metrics), **{k: v for k, v in extra.items() if _number(v)}}


def roi_rows(metrics: dict) -> tuple[list[str], list[list]]:
    """The per-ROI table: columns split, roi and every number of the ROI blocks; one row per (split, ROI)."""
    keys: list[str] = []
    for block in metrics.values():
        for roi_block in block.get("rois", {}).values():
            keys += [k for k in roi_block if k not in keys]
    rows = [[split, roi, *[roi_block.get(k) for k in keys]]
            for split, block in metrics.items() for roi, roi_block in block.get("rois", {}).items()]
    return ["split", "roi", *keys], rows


def roi_bars_png(metrics: dict, split: str = "test") -> bytes | None:
    """A PNG of per-ROI bars: mean r, and median NC-R² with the mean over the reliable voxels as a dot.
    None when the split has no ROI."""
    block = metrics.get(split) or {}
    rois = block.get("rois") or {}
    if not rois:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(rois)
    x = np.arange(len(names))
    nan = float("nan")

    def values(key):
        return [nan if rois[n].get(key) is None else rois[n][key] for n in names]

    fig, (ax_r, ax_nc) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(names) + 2), 6), sharex=True)
    ax_r.bar(x, values("r_mean"), color="#4c72b0")
    ax_r.set_ylabel(f"{split} r (mean)")
    ax_nc.bar(x, values("nc_r2_median"), color="#55a868", label="median")
    ax_nc.plot(x, values("nc_r2_mean_reliable"), "o", color="k", markersize=4,
               label=f"mean, NC > {block.get('nc_threshold', nan):g}%")
    ax_nc.set_ylabel(f"{split} NC-R²")
    ax_nc.legend(fontsize=8, loc="best")
    for ax in (ax_r, ax_nc):
        ax.axhline(0, color="0.5", linewidth=0.8)
    ax_nc.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def map_pictures(run: RunDir) -> list[Path]:
    """The PNG pictures under the run directory's ``maps/`` (brain maps, written by the maps job), sorted."""
    folder = run.path / MAPS_DIR
    return sorted(folder.rglob("*.png")) if folder.is_dir() else []


def log_encoder_run(wb, run: RunDir) -> None:
    """Log a finished encoder run's results into the W&B run ``wb``: the summary (``encoder_summary``), the
    per-ROI table ``roi_results``, the figure ``figures/roi_bars`` and ``maps/<name>`` for every PNG in maps/."""
    import wandb
    from PIL import Image

    wb.summary.update(encoder_summary(run))
    columns, rows = roi_rows(run.metrics)
    payload = {"roi_results": wandb.Table(columns=columns, data=rows)} if rows else {}
    png = roi_bars_png(run.metrics)
    if png is not None:
        payload["figures/roi_bars"] = wandb.Image(Image.open(io.BytesIO(png)), caption="per-ROI accuracy (test)")
    for path in map_pictures(run):
        payload[f"maps/{path.relative_to(run.path / MAPS_DIR).with_suffix('').as_posix()}"] = wandb.Image(str(path))
    if payload:
        wb.log(payload)


def analysis_run(run: RunDir, job: str, config: dict | None = None, directory: str | os.PathLike | None = None,
                 default_group: str | None = None, mode: str | None = None):
    """A ``job_type="analysis"`` W&B run for ``job`` on the encoder run ``run``: in the encoder run's group, named
    ``<job> · <encoder run name>``, tagged as the encoder run plus the job, its config naming the encoder run
    (``encoder_run``: id, project, group, name, run_dir) beside ``config``. Never a second run of the encoder."""
    record = run.wandb or {}
    name = record.get("name") or encoder_run_name(run)
    return init_run(directory=directory or run.path, project=encoder_project(run), group=encoder_group(run, default_group),
                    name=f"{job} · {name}", job_type=JOB_ANALYSIS, tags=[*run_tags(run.info), job], mode=mode,
                    config={"analysis": job, "encoder_run": {"id": record.get("id"), "project": record.get("project"),
                                                             "group": record.get("group"), "name": name,
                                                             "run_dir": str(run.path)}, **(config or {})})
