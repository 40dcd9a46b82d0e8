"""Run an analysis over finished runs.

    python analyze.py analysis=summary sweep_dir=outputs/multirun/2026-01-01_12-00-00
    python analyze.py analysis=wen2018 run_dir=outputs/runs/<run>

``analysis=<name>`` picks conf/analysis/<name>.yaml (its options) and the job ``analyses/jobs/<name>.py``
registers (summary, report, wen2018, clip_msm, brainsail, localizer); only that job's module is imported.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_SILENT", "true")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from analyses.jobs.base import run_job  # noqa: E402
from encoders.hydra_errors import one_line_hydra_errors  # noqa: E402
from encoders.weights import WeightsError  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="analyze")
def main(cfg: DictConfig) -> None:
    target = cfg.sweep_dir or cfg.run_dir
    if target is None:
        print("error: give run_dir=<run directory> or sweep_dir=<multirun directory>", file=sys.stderr)
        sys.exit(2)
    try:
        run_job(cfg, Path(target))
    except (FileNotFoundError, ValueError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    with one_line_hydra_errors():  # analysis=sumary, analysis.foo=1, ...: one error line naming the choices, exit 2
        main()
