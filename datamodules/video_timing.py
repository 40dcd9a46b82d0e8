"""How the fMRI volumes of a movie run line up with the movie's frames (video fMRI, ``data.timing``).

``released`` (the default) follows Wen et al. 2018's released processing code (CC0):

* Volumes: the runs of the training movies and of test1 have 245 volumes, those of test2–test5 246;
  the code drops the first 1 (245) or the first 2 (246) and the last 4 of every run, keeping 240.
  Here: the ``n_volumes`` volumes that end 4 before the run's last (``TRAILING_VOLUMES``); a run must
  have n_volumes + 5 or n_volumes + 6 volumes (1 or 2 lead volumes, ``LEAD_VOLUMES``), anything else
  is an error rather than a silent shift.
* Features: frame features (30 fps) are convolved with the HRF, the convolved series is read from
  4 s on (``ts(4*srate+1 : 4*srate+n_frames)``) and sampled once per TR at 1, 3, 5 … s
  (``ts(srate+1 : 2*srate : end)``). So kept volume k pairs with the convolved features at
  ``FEATURE_OFFSET_S`` + k·TR = 2k + 5 s, the last few read past the movie's end (the full
  convolution: the HRF's tail after the last frame). With a frame stride the nearest decoded frame
  stands in for each of those times.

``first`` (this project's behaviour before the released timing was adopted): keep the first
``n_volumes`` volumes of every run (a run with fewer is an error); volume i pairs with the mean of the
convolved features over [i·TR, (i+1)·TR), with no read offset.

    sl = kept_volumes(n_time=246, n_volumes=240, timing="released")       # slice(2, 242)
    x = volume_features(frames, frame_rate=2.0, tr=2.0, n_volumes=240, hrf="wen", timing="released")
    t = released_times(240, tr=2.0)                                      # 5, 7, …, 483 s
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from datamodules.hrf import convolve_hrf, frames_to_volumes, hrf_kernel, sample_at_times

TIMINGS = ("released", "first")
TRAILING_VOLUMES = 4        # volumes after the movie, dropped
LEAD_VOLUMES = (1, 2)       # volumes before it, dropped: 245-volume runs 1, 246-volume runs 2
FEATURE_OFFSET_S = 5.0      # kept volume k <-> convolved features at FEATURE_OFFSET_S + k * TR


def check_timing(timing: str) -> str:
    if timing not in TIMINGS:
        raise ValueError(f"data.timing must be one of {', '.join(TIMINGS)}, got {timing!r}")
    return timing


def kept_volumes(n_time: int, n_volumes: int, timing: str) -> slice:
    """The volumes of an n_time-volume run that are kept, as a slice; ValueError (without the file's
    name: the caller adds it) when the run's length does not fit the timing."""
    if check_timing(timing) == "first":
        if n_time < n_volumes:
            raise ValueError(f"{n_time} volumes, fewer than data.n_volumes={n_volumes}")
        return slice(0, n_volumes)
    lead = n_time - TRAILING_VOLUMES - n_volumes
    if lead not in LEAD_VOLUMES:
        expected = " or ".join(str(n_volumes + k + TRAILING_VOLUMES) for k in LEAD_VOLUMES)
        raise ValueError(f"{n_time} volumes; the released timing (data.timing=released) expects {expected} "
                         f"(drops the first {' or '.join(map(str, LEAD_VOLUMES))} and the last {TRAILING_VOLUMES}, "
                         f"keeping data.n_volumes={n_volumes}); data.timing=first keeps the first n_volumes")
    return slice(lead, lead + n_volumes)


def released_times(n_volumes: int, tr: float, first: int = 0) -> np.ndarray:
    """Seconds into the convolved feature series that volumes first … n_volumes − 1 pair with:
    FEATURE_OFFSET_S + k·TR (k may start negative, for volumes before the kept ones)."""
    return FEATURE_OFFSET_S + float(tr) * np.arange(int(first), int(n_volumes), dtype=np.float64)


def convolved_at(x: np.ndarray, frame_rate: float, times: np.ndarray,
                 hrf: str | Mapping[str, float] = "wen") -> np.ndarray:
    """The HRF-convolved frame series at the given times (nearest frame), past its end too.

    x (n_frames, …) at ``frame_rate`` Hz, frame j at j / frame_rate s -> (n_times, …) float64; times
    before 0 give 0 (the response at rest before the first frame).
    """
    times = np.asarray(times, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros((len(times),) + x.shape[1:])
    valid = times >= 0
    if valid.any():
        n_out = max(len(x), int(np.floor(times[valid].max() * frame_rate + 0.5 + 1e-9)) + 1)
        y = convolve_hrf(x, hrf_kernel(hrf, 1.0 / frame_rate), n_out=n_out)
        out[valid] = sample_at_times(y, frame_rate, times[valid])
    return out


def volume_features(x: np.ndarray, frame_rate: float, tr: float, n_volumes: int,
                    hrf: str | Mapping[str, float] = "wen", timing: str = "released") -> np.ndarray:
    """Frame-rate features (n_frames, d) -> features per kept volume (n_volumes, d) float64, per ``timing``."""
    if check_timing(timing) == "first":
        return frames_to_volumes(x, frame_rate, tr, n_volumes, hrf)
    return convolved_at(x, frame_rate, released_times(n_volumes, tr), hrf)
