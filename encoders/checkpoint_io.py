"""Lightning checkpoints written atomically beside their destination (conf/trainer/default.yaml ``plugins``).

Lightning's own save stages the checkpoint in the system temp folder and then copies it into place, so a
disk that fills up during the copy leaves a truncated ``last.ckpt`` (which the next run would try to
resume from) and a stray temp file. Here the checkpoint goes to ``<file>.tmp`` in the same folder and
is renamed into place (``encoders.storage.atomic_write``): the destination is either complete or
untouched, and a refused write is a StorageError naming it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from encoders.storage import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic; remote paths (``s3://`` ...) are left to Lightning."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(checkpoint, f), "checkpoint")
