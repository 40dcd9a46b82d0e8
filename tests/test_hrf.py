"""The canonical HRF against scipy's gamma densities; convolution and TR sampling against plain numpy."""
import numpy as np
import pytest
from scipy.stats import gamma

from datamodules.hrf import (HRF_PRESETS, convolve_hrf, double_gamma_hrf, frames_to_volumes, gamma_pdf, hrf_kernel,
                             sample_at_times, sample_at_tr)
from datamodules.video_timing import kept_volumes, released_times, volume_features


def scipy_double_gamma(t, delay, undershoot, dispersion, undershoot_dispersion, ratio, onset=0.0):
    h = (gamma.pdf(t - onset, delay / dispersion, scale=dispersion)
         - gamma.pdf(t - onset, undershoot / undershoot_dispersion, scale=undershoot_dispersion) / ratio)
    return h / h.sum()


@pytest.mark.parametrize("shape,scale", [(6.0, 1.0), (16.0, 1.0), (5.0, 0.9), (3.5, 2.0)])
def test_gamma_pdf_matches_scipy(shape, scale):
    t = np.linspace(-1, 40, 301)
    np.testing.assert_allclose(gamma_pdf(t, shape, scale), gamma.pdf(t, shape, scale=scale), rtol=1e-10, atol=1e-300)


def test_spm_default_matches_scipy_and_peaks_near_5s():
    dt = 0.1
    t = np.arange(0, 32 + dt / 2, dt)
    h = hrf_kernel("spm", dt)
    np.testing.assert_allclose(h, scipy_double_gamma(t, 6, 16, 1, 1, 6), rtol=1e-9, atol=1e-15)
    assert h.sum() == pytest.approx(1.0)
    assert 4.7 <= t[np.argmax(h)] <= 5.1
    assert h[t > 10].min() < 0  # the undershoot


def test_wen_variant_is_gamma5_minus_gamma16_over_6_and_peaks_at_4s():
    dt = 1 / 30
    h = hrf_kernel("wen", dt)
    t = np.arange(len(h)) * dt
    ref = gamma.pdf(t, 5) - gamma.pdf(t, 16) / 6  # Wen et al. 2018's own expression
    np.testing.assert_allclose(h, ref / ref.sum(), rtol=1e-9, atol=1e-15)
    assert abs(t[np.argmax(h)] - 4.0) < 0.15


def test_custom_parameters_and_onset():
    dt = 0.25
    params = dict(delay=7.0, undershoot=14.0, dispersion=0.8, undershoot_dispersion=1.3, ratio=4.0)
    h = double_gamma_hrf(dt, onset=1.0, length=30.0, **params)
    t = np.arange(0, 30 + dt / 2, dt)
    np.testing.assert_allclose(h, scipy_double_gamma(t, onset=1.0, **params), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(hrf_kernel(params, dt, length=30.0), double_gamma_hrf(dt, length=30.0, **params))
    assert set(HRF_PRESETS) == {"spm", "wen"}
    with pytest.raises(ValueError, match="unknown HRF"):
        hrf_kernel("glover", dt)


def test_convolution_is_causal_numpy_convolve():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3))
    h = hrf_kernel("spm", 0.5)
    y = convolve_hrf(x, h)
    for j in range(3):
        np.testing.assert_allclose(y[:, j], np.convolve(x[:, j], h)[:50], atol=1e-12)
    impulse = np.zeros(80)
    impulse[10] = 1.0
    np.testing.assert_allclose(convolve_hrf(impulse, h)[10:10 + len(h)], h[:70], atol=1e-15)
    assert np.all(convolve_hrf(impulse, h)[:10] == 0)


def test_sample_at_tr_is_the_window_mean():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 2))
    np.testing.assert_allclose(sample_at_tr(x, frame_rate=2.0, tr=2.0, n_volumes=6), x.reshape(6, 4, 2).mean(1))
    # 2.5 frames per TR: frame j (at j / 1.25 s) belongs to volume floor(j / 1.25 / 2)
    y = np.arange(10.0)
    expected = [np.mean([v for j, v in enumerate(y) if int(j / 1.25 / 2 + 1e-9) == i]) for i in range(4)]
    np.testing.assert_allclose(sample_at_tr(y, frame_rate=1.25, tr=2.0, n_volumes=4), expected)
    with pytest.raises(ValueError, match="fewer than 7 volumes"):
        sample_at_tr(x, frame_rate=2.0, tr=2.0, n_volumes=7)


def test_frames_to_volumes_delays_an_event_by_the_hrf_peak():
    fps, tr = 10.0, 1.0
    x = np.zeros(600)
    x[100] = 1.0  # an event at 10 s
    y = frames_to_volumes(x, fps, tr, 60, "wen")
    assert np.argmax(y) == 14  # peak 4 s later, in the volume covering [14, 15) s
    assert y.sum() * fps * tr == pytest.approx(1.0)  # unit-sum HRF: window means x frames per TR
    assert y[:10].max() == 0


def test_full_convolution_and_sampling_at_times():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 2))
    h = hrf_kernel("wen", 0.5)
    y = convolve_hrf(x, h, n_out=50)  # continues after the last frame, as MATLAB's full conv
    for j in range(2):
        np.testing.assert_allclose(y[:, j], np.convolve(x[:, j], h)[:50], atol=1e-12)
    np.testing.assert_array_equal(convolve_hrf(x, h, n_out=20), convolve_hrf(x, h)[:20])
    # nearest frame at 2 Hz: 1.2 s -> frame 2 (1.0 s), 1.25 s -> frame 3 (halves round up), 1.3 s -> frame 3
    np.testing.assert_array_equal(sample_at_times(y, 2.0, [0.0, 1.2, 1.25, 1.3, 24.5]), y[[0, 2, 3, 3, 49]])
    with pytest.raises(ValueError, match="y has 50 frames"):
        sample_at_times(y, 2.0, [25.0])


def test_released_timing_by_hand():
    """Wen et al. 2018's released code: 245 volumes -> drop the first 1 and the last 4; 246 -> the first 2 and
    the last 4; kept volume k <-> the convolved features at 2k + 5 s (read from 4 s on, sampled at 1, 3, 5 … s)."""
    assert kept_volumes(245, 240, "released") == slice(1, 241)
    assert kept_volumes(246, 240, "released") == slice(2, 242)
    assert kept_volumes(246, 240, "first") == slice(0, 240)
    for n_time in (240, 244, 247):
        with pytest.raises(ValueError, match="expects 245 or 246"):
            kept_volumes(n_time, 240, "released")
    with pytest.raises(ValueError, match="data.timing must be one of released, first"):
        kept_volumes(245, 240, "middle")
    np.testing.assert_array_equal(released_times(240, 2.0)[[0, 1, 239]], [5.0, 7.0, 483.0])
    # an event at 10 s peaks 4 s later (Wen's HRF): in the volume whose feature time is 14 s, k = (14 - 5) / 2
    fps, tr = 10.0, 1.0
    x = np.zeros(600)
    x[100] = 1.0
    y = volume_features(x, fps, tr, 60, "wen", "released")  # feature times 5, 6, … s
    assert np.argmax(y) == 9 and released_times(60, tr)[9] == 14.0
    h = hrf_kernel("wen", 1 / fps)
    np.testing.assert_allclose(y, np.convolve(x, h)[(released_times(60, tr) * fps).round().astype(int)], atol=1e-15)
    np.testing.assert_array_equal(volume_features(x, fps, tr, 60, "wen", "first"), frames_to_volumes(x, fps, tr, 60))
