"""A video run's images: one movie frame per sample (fMRI volume), for the image analyses of a finished run.

    frames = VideoFrames(VideoPaths(root, 1), ["seg1", "test1"], n_volumes=240, tr=2.0, fps=30)
    frames.image(sample_id)        # uint8 (H, W, 3): the frame on screen in the middle of that volume
    frames.locate(sample_id)       # ("test1", frame index)

Sample ids are the video datamodule's: movie position (in ``stimuli`` order) × n_volumes + volume. Kept
volume k of a run is acquired while the movie shows [k·TR, (k+1)·TR) (both timings: the released one
drops the volumes before the movie starts), so its frame is the one at (k + ½)·TR. The response that
volume carries was driven by earlier frames (the haemodynamic delay, modelled by the HRF in the
features per TR); an image analysis treats each such frame as one image.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from datamodules.video_files import VideoPaths, iter_frames


class VideoFrames:
    """A stimulus source over the movies of a video run (``image(sample id)``, ``len()``). Frames are decoded
    a movie at a time (every volume's frame of the movie asked for), and one movie is kept in memory."""

    def __init__(self, paths: VideoPaths, stimuli: Sequence[str], n_volumes: int, tr: float, fps: float):
        self.paths, self.stimuli = paths, list(stimuli)
        self.n_volumes, self.tr, self.fps = int(n_volumes), float(tr), float(fps)
        self._movie: str | None = None
        self._frames: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.stimuli) * self.n_volumes

    def frame_indices(self) -> np.ndarray:
        """The frame index shown in the middle of each volume (n_volumes,)."""
        return np.floor((np.arange(self.n_volumes) + 0.5) * self.tr * self.fps).astype(np.int64)

    def locate(self, sample_id: int) -> tuple[str, int]:
        """(movie, frame index) of a sample id; IndexError outside the run's samples."""
        position, volume = divmod(int(sample_id), self.n_volumes)
        if not 0 <= position < len(self.stimuli):
            raise IndexError(f"sample id {int(sample_id)} is not one of the run's {len(self)} samples")
        return self.stimuli[position], int(self.frame_indices()[volume])

    def image(self, sample_id: int) -> np.ndarray:
        movie, _ = self.locate(sample_id)
        if movie != self._movie:
            frames = dict(iter_frames(self.paths.video(movie), self.frame_indices()))
            self._frames = np.stack([frames[i] for i in self.frame_indices()])
            self._movie = movie
        return self._frames[int(sample_id) % self.n_volumes]
