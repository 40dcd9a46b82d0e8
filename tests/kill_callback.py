"""A Lightning callback for the resume test: the run dies by SIGKILL mid-epoch, as a crash would."""
import os
import signal

import lightning as L


class SigkillAtEpoch(L.Callback):
    """SIGKILL this process at batch ``batch`` of epoch ``epoch`` of a fresh run (never of a resumed one)."""

    def __init__(self, epoch: int, batch: int = 1):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.ckpt_path is None and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
