"""train.py's W&B logger: Lightning's WandbLogger whose run starts through ``encoders.wandb_run.init_run``
(bounded wait, offline fallback, the resolved config, a readable name) and ends with the encoder's results.

    logger=wandb | csv_wandb      (conf/logger/wandb.yaml: _target_ encoders.wandb_logger.TrainingLogger)
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from encoders.run_dir import RunDir
from encoders.wandb_mode import PROBE_TIMEOUT_S
from encoders.wandb_run import INIT_TIMEOUT_S, JOB_TRAIN, init_run, log_encoder_run, run_mode, run_record, sync_line


class TrainingLogger(WandbLogger):
    """Lightning's WandbLogger for train.py (conf/logger/wandb.yaml), whose run starts through ``init_run``
    (bounded wait, offline fallback) when train.py calls ``start(config, name)`` — or, used on its own, when
    Lightning first asks for the experiment. ``finish_run(run_dir)`` logs the encoder's results and ends it.

    group: ``logger.wandb.group`` (the config resolves its default, see ``default_group``); name: None = the
    name train.py passes (``run_name``); probe_timeout, init_timeout: seconds (see ``init_run``); other keyword
    arguments (``entity``, ``notes``, …) go to ``wandb.init``.
    """

    def __init__(self, project: str = "brainprobe", save_dir: str = ".", group: str | None = None,
                 name: str | None = None, tags: Sequence[str] = (), job_type: str = JOB_TRAIN,
                 probe_timeout: float = PROBE_TIMEOUT_S, init_timeout: float = INIT_TIMEOUT_S,
                 log_model: bool | str = False, **kwargs):
        super().__init__(name=name, save_dir=save_dir, project=project, log_model=log_model, **kwargs)
        self.group, self.tags, self.job_type = group, list(tags or ()), job_type
        self.init_kwargs = dict(kwargs)  # e.g. +logger.wandb.entity=team: passed on to wandb.init
        self.probe_timeout, self.init_timeout = float(probe_timeout), float(init_timeout)

    @rank_zero_only
    def start(self, config: dict | None = None, name: str | None = None) -> None:
        """Start the W&B run (global rank 0; once) with the run's resolved ``config`` and display ``name``."""
        if self._experiment is not None:
            return
        self._experiment = init_run(directory=self._save_dir or ".", project=self._project, group=self.group,
                                    name=self._name or name, job_type=self.job_type, tags=self.tags, config=config,
                                    run_id=self._id, probe_timeout=self.probe_timeout, init_timeout=self.init_timeout,
                                    **self.init_kwargs)
        if getattr(self._experiment, "define_metric", None):  # as Lightning's WandbLogger: the trainer's step axis
            self._experiment.define_metric("trainer/global_step")
            self._experiment.define_metric("*", step_metric="trainer/global_step", step_sync=True)

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self.start()
        return self._experiment

    def record(self) -> dict | None:
        """run.json's ``wandb`` entry (None before the run started, and on ranks > 0)."""
        return run_record(self._experiment) if self._experiment is not None and rank_zero_only.rank == 0 else None

    @rank_zero_only
    def finish_run(self, run_dir: str | os.PathLike) -> str | None:
        """Log the finished run's results (``log_encoder_run``) and end the W&B run. Returns the ``wandb sync``
        line that uploads it when it ran offline, else None."""
        wb = self.experiment
        log_encoder_run(wb, RunDir(run_dir))
        mode = run_mode(wb)
        directory = Path(wb.dir).parent
        wb.finish()
        return sync_line([directory]) if mode == "offline" else None

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status == "failed" and self._experiment is not None:
            self._experiment.finish(exit_code=1)
