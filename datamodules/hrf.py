"""Canonical haemodynamic response functions, convolution at the frame rate and sampling at the TR.

SPM's double-gamma HRF (``spm_hrf``): with t the time after ``onset`` in seconds,

    h(t) = Γpdf(t; delay/dispersion, scale=dispersion)
           − Γpdf(t; undershoot/undershoot_dispersion, scale=undershoot_dispersion) / ratio,

sampled every ``dt`` seconds over [0, length] and normalised to unit sum. SPM's defaults (delay 6,
undershoot 16, dispersions 1, ratio 6) peak at ≈ 5 s; Wen et al. 2018 used
``gamma.pdf(t, 5) - gamma.pdf(t, 16) / 6``, i.e. delay 5, which peaks at 4 s (``HRF_PRESETS``).

    h = hrf_kernel("wen", dt=0.5)                                # (n_taps,)
    y = convolve_hrf(x, h)                                       # (n_frames, d), causal
    z = sample_at_times(y, frame_rate=2.0, times=5 + 2 * np.arange(240))   # (240, d): y at those seconds
    z = sample_at_tr(y, frame_rate=2.0, tr=2.0, n_volumes=240)   # (n_volumes, d): mean over each TR

Which times pair with which fMRI volumes is ``datamodules.video_timing``'s business (``data.timing``).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.signal import lfilter
from scipy.special import gammaln

HRF_PRESETS: dict[str, dict[str, float]] = {
    "spm": dict(delay=6.0, undershoot=16.0, dispersion=1.0, undershoot_dispersion=1.0, ratio=6.0),
    "wen": dict(delay=5.0, undershoot=16.0, dispersion=1.0, undershoot_dispersion=1.0, ratio=6.0),
}


def gamma_pdf(t: np.ndarray, shape: float, scale: float) -> np.ndarray:
    """Gamma density with ``shape`` and ``scale`` at times t (any shape); 0 for t <= 0 (shape > 1)."""
    t = np.asarray(t, dtype=np.float64)
    out = np.zeros_like(t)
    pos = t > 0
    tp = t[pos]
    out[pos] = np.exp((shape - 1.0) * np.log(tp) - tp / scale - gammaln(shape) - shape * np.log(scale))
    return out


def double_gamma_hrf(dt: float, delay: float = 6.0, undershoot: float = 16.0, dispersion: float = 1.0,
                     undershoot_dispersion: float = 1.0, ratio: float = 6.0, onset: float = 0.0,
                     length: float = 32.0) -> np.ndarray:
    """SPM's double-gamma HRF sampled at t = 0, dt, 2dt, … ≤ length: (n_taps,) float64, unit sum."""
    if dt <= 0 or length <= 0:
        raise ValueError(f"double_gamma_hrf: dt and length must be positive, got dt={dt}, length={length}")
    if min(delay, undershoot, dispersion, undershoot_dispersion, ratio) <= 0:
        raise ValueError("double_gamma_hrf: delay, undershoot, dispersions and ratio must be positive")
    t = np.arange(int(np.floor(length / dt + 1e-9)) + 1) * dt - onset
    h = (gamma_pdf(t, delay / dispersion, dispersion)
         - gamma_pdf(t, undershoot / undershoot_dispersion, undershoot_dispersion) / ratio)
    total = h.sum()
    if not np.isfinite(total) or total == 0:
        raise ValueError(f"double_gamma_hrf: the HRF sums to {total} at dt={dt}; cannot normalise")
    return h / total


def hrf_kernel(hrf: str | Mapping[str, float], dt: float, length: float = 32.0) -> np.ndarray:
    """HRF taps (n_taps,) at spacing dt: a preset name ("spm", "wen") or a dict of double_gamma_hrf parameters."""
    if isinstance(hrf, str):
        if hrf not in HRF_PRESETS:
            raise ValueError(f"unknown HRF {hrf!r}; presets: {', '.join(HRF_PRESETS)}, or a dict of parameters")
        params = dict(HRF_PRESETS[hrf])
    else:
        params = dict(hrf)
    params.setdefault("length", length)
    return double_gamma_hrf(dt, **params)


def convolve_hrf(x: np.ndarray, hrf: np.ndarray, n_out: int | None = None) -> np.ndarray:
    """Causal convolution along time: x (n_frames, d) or (n_frames,), hrf (n_taps,) -> (n_out or n_frames, …) float64.

    y[n] = Σ_k hrf[k] · x[n − k] with x = 0 before the first frame (each run starts from rest) and after
    the last one: ``n_out`` > n_frames continues into the response after the stimulus ends (MATLAB's
    full ``conv``, which Wen et al. 2018 read past the movie's end).
    """
    x = np.asarray(x, dtype=np.float64)
    if n_out is not None and n_out > len(x):
        x = np.concatenate([x, np.zeros((n_out - len(x),) + x.shape[1:])])
    y = lfilter(np.asarray(hrf, dtype=np.float64), [1.0], x, axis=0)
    return y if n_out is None else y[:n_out]


def sample_at_times(y: np.ndarray, frame_rate: float, times: np.ndarray) -> np.ndarray:
    """y at the given times (s): the frame nearest each time (frame j sits at j / frame_rate s, halves round up).

    y (n_frames, …) -> (n_times, …). Raises ValueError when a time falls before the first frame or
    after the last one.
    """
    times = np.asarray(times, dtype=np.float64)
    index = np.floor(times * frame_rate + 0.5 + 1e-9).astype(np.int64)
    if len(index) and (index.min() < 0 or index.max() >= len(y)):
        raise ValueError(f"sample_at_times: times {times.min():g}..{times.max():g} s need frames "
                         f"{index.min()}..{index.max()}, but y has {len(y)} frames at {frame_rate:g} Hz")
    return np.asarray(y)[index]


def sample_at_tr(x: np.ndarray, frame_rate: float, tr: float, n_volumes: int) -> np.ndarray:
    """Mean of x over each volume's acquisition window: (n_frames, d) -> (n_volumes, d) float64.

    Frame j sits at j / frame_rate s; volume i averages the frames in [i·TR, (i+1)·TR) (a boxcar
    anti-aliasing filter before the downsampling). Raises ValueError when the frames do not cover
    n_volumes · TR seconds or a volume gets no frame.
    """
    x = np.asarray(x, dtype=np.float64)
    n_frames = x.shape[0]
    bins = np.floor(np.arange(n_frames) / frame_rate / tr + 1e-9).astype(np.int64)
    if n_frames == 0 or bins[-1] < n_volumes - 1 or n_frames / frame_rate < n_volumes * tr - 1e-6:
        raise ValueError(f"sample_at_tr: {n_frames} frames at {frame_rate:g} Hz cover {n_frames / frame_rate:g} s, "
                         f"fewer than {n_volumes} volumes x TR {tr:g} s")
    keep = bins < n_volumes
    counts = np.bincount(bins[keep], minlength=n_volumes)
    if (counts == 0).any():
        raise ValueError(f"sample_at_tr: frame rate {frame_rate:g} Hz leaves volumes without a frame at TR {tr:g} s")
    sums = np.zeros((n_volumes,) + x.shape[1:])
    np.add.at(sums, bins[keep], x[keep])
    return sums / counts.reshape((-1,) + (1,) * (x.ndim - 1))


def frames_to_volumes(x: np.ndarray, frame_rate: float, tr: float, n_volumes: int,
                      hrf: str | Mapping[str, float] = "wen") -> np.ndarray:
    """Frame-rate time series (n_frames, d) -> HRF-convolved, averaged over each TR (n_volumes, d) float64.

    Volume i is the mean over [i·TR, (i+1)·TR) of the convolved series, with no read offset
    (``data.timing=first``; ``datamodules.video_timing`` has the released timing).
    """
    return sample_at_tr(convolve_hrf(x, hrf_kernel(hrf, 1.0 / frame_rate)), frame_rate, tr, n_volumes)
