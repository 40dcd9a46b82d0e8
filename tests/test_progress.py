"""Progress off a terminal: one line per task at most every `interval` seconds (a fake clock, no timing),
a closing line only for a task that printed; the long steps report through it."""
import io

import numpy as np
import pytest
import torch

from encoders.progress import INTERVAL_ENV, Progress, duration, progress_interval, track


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_at_most_every_interval_then_a_closing_line():
    clock, out = FakeClock(), io.StringIO()
    with Progress(stream=out, interval=30, clock=clock) as progress:
        task = progress.add_task("features alexnet", total=1000, unit="images")
        for _ in range(100):            # 10 images per 1.3 s: 130 s in all
            clock.now += 1.3
            progress.advance(task, 10)
    lines = out.getvalue().splitlines()
    # one line at each of the first advances at or after 30, 60, 90, 120 s (not the last, which completes the task)
    assert len(lines) == 5, lines
    assert lines[0].startswith("features alexnet: 240/1,000 images (24%), 7.7 images/s, ")
    assert "1m39s left" in lines[0]
    assert lines[-1] == "features alexnet: done, 1,000 images in 2m10s (7.7 images/s)"


def test_short_steps_and_disabled_progress_print_nothing():
    clock, out = FakeClock(), io.StringIO()
    with Progress(stream=out, interval=30, clock=clock) as progress:
        task = progress.add_task("ridge fit", total=10, unit="voxels")
        for _ in range(10):
            clock.now += 2.9         # 29 s in all
            progress.advance(task)
    with Progress(False, stream=out, interval=0, clock=clock) as progress:
        task = progress.add_task("bootstrap", total=10)
        clock.now += 100
        progress.advance(task, 5)
    assert out.getvalue() == ""


def test_track_counts_units_per_item_and_tasks_without_total():
    clock, out = FakeClock(), io.StringIO()
    seen = []
    items = range(0, 10_000, 4096)
    with Progress(stream=out, interval=1, clock=clock) as progress:
        task = progress.add_task("stream", unit="batches")
        clock.now += 5
        progress.advance(task, 3)
    assert out.getvalue().splitlines()[0] == "stream: 3 batches, 0.6 batches/s (5.0s so far)"
    # track() on stdout: items come back in order, the units counted by size()
    for start in track(items, "ridge fit", total=10_000, unit="voxels", size=lambda s: min(4096, 10_000 - s)):
        seen.append(start)
    assert seen == [0, 4096, 8192]


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert progress_interval() == 2.5
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match=INTERVAL_ENV):
        progress_interval()
    assert [duration(s) for s in (0.84, 42, 185, 3720)] == ["0.8s", "42s", "3m05s", "1h02m"]


def test_ridge_fit_reports_its_voxel_batches(monkeypatch, capsys):
    """Off a terminal (pytest captures stdout) with a 0 s interval, the fit prints a line per voxel batch but
    the last, and a closing line; the fit itself is unchanged."""
    from encoders.ridge import RidgeCV

    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((60, 8)), rng.standard_normal((60, 50))
    monkeypatch.setenv(INTERVAL_ENV, "0")
    quiet = RidgeCV(alphas=[1.0, 10.0], cv=3, voxel_batch=20, progress=False).fit(X, Y)
    assert capsys.readouterr().out == ""
    loud = RidgeCV(alphas=[1.0, 10.0], cv=3, voxel_batch=20).fit(X, Y)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" voxels")[0] for line in lines] == [
        "ridge fit (2 alphas, 3 folds): 20/50", "ridge fit (2 alphas, 3 folds): 40/50",
        "ridge fit (2 alphas, 3 folds): done, 50"]
    np.testing.assert_array_equal(quiet.coef_, loud.coef_)


def test_extraction_reports_and_measures(monkeypatch, capsys):
    from torch.utils.data import DataLoader

    from encoders.extract import ExtractionStats, extract_features

    monkeypatch.setenv(INTERVAL_ENV, "0")
    backbone = torch.nn.Flatten()
    loader = DataLoader(torch.zeros(10, 3, 2, 2), batch_size=4)
    stats = ExtractionStats()
    feats = extract_features(backbone, loader, description="features toy", stats=stats)
    assert feats.shape == (10, 12) and stats.images == 10 and stats.seconds > 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("features toy: 4/10 images (40%)") and lines[-1].startswith("features toy: done, 10 images")
