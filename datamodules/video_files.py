"""Readers (and a writer) for the Wen et al. 2018 video-fMRI layout: CIFTI-2 dtseries and mp4 stimuli.

Layout under ``root`` (K = segment number, R = repeat)::

    subject{S}/fmri/segK/cifti/segK_R_Atlas.dtseries.nii     training runs (R = 1, 2)
    subject{S}/fmri/testK/cifti/testK_R_Atlas.dtseries.nii   test runs (R = 1 … 10)
    stimuli/segK.mp4, stimuli/testK.mp4                      the movies (30 fps, 8 min each)

A dtseries holds (n_volumes, n_grayordinates) float32; the cortex is the first ``n_cortex``
grayordinates (59412 in the HCP 91k space), which must be exactly the surface grayordinates. As
released, training runs and test1's have 245 volumes, test2–test5's 246; which of them are kept is
``datamodules.video_timing``'s rule (``data.timing``).
Videos are decoded with PyAV (FFmpeg); frames come out as uint8 (H, W, 3) RGB. Every problem
with a file raises ``DataError`` naming it.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import nibabel as nib
import numpy as np
from nibabel.cifti2 import cifti2_axes

from datamodules.errors import DataError
from datamodules.video_timing import kept_volumes


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class VideoPaths:
    """Where one subject's runs and the stimuli live."""

    root: Path
    subject: int
    stimuli_dir: str = "stimuli"

    @property
    def subject_dir(self) -> Path:
        return self.root / f"subject{self.subject}"

    def cifti(self, stimulus: str, repeat: int) -> Path:
        """Run ``repeat`` (1-based) of stimulus ``segK`` / ``testK``."""
        return self.subject_dir / "fmri" / stimulus / "cifti" / f"{stimulus}_{repeat}_Atlas.dtseries.nii"

    def video(self, stimulus: str) -> Path:
        return self.root / self.stimuli_dir / f"{stimulus}.mp4"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# --------------------------------------------------------------------------- CIFTI
@dataclass
class Grayordinates:
    """The cortical grayordinates of a dtseries: structure (n,) str, vertex (n,) surface vertex index."""

    structure: np.ndarray
    vertex: np.ndarray

    def __eq__(self, other) -> bool:
        return (isinstance(other, Grayordinates) and np.array_equal(self.structure, other.structure)
                and np.array_equal(self.vertex, other.vertex))


def _load_cifti(path: Path) -> nib.Cifti2Image:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for a damaged file
        raise DataError(f"{path}: not a readable CIFTI-2 file ({_one_line(err)})") from err
    if not isinstance(img, nib.Cifti2Image):
        raise DataError(f"{path}: not a CIFTI-2 file (nibabel reads it as {type(img).__name__})")
    return img


def cortex_grayordinates(path: str | Path, n_cortex: int) -> tuple[Grayordinates, int]:
    """Check a dtseries' axes and its cortex; returns (cortical grayordinates, n_volumes in the file)."""
    path = Path(path)
    return _check_axes(path, _load_cifti(path), n_cortex)


def _check_axes(path: Path, img: nib.Cifti2Image, n_cortex: int) -> tuple[Grayordinates, int]:
    try:
        series, models = img.header.get_axis(0), img.header.get_axis(1)
    except Exception as err:
        raise DataError(f"{path}: CIFTI-2 header has no readable axes ({_one_line(err)})") from err
    if not isinstance(series, cifti2_axes.SeriesAxis) or not isinstance(models, cifti2_axes.BrainModelAxis):
        raise DataError(f"{path}: expected a dtseries (series x brain models), got axes "
                        f"({type(series).__name__}, {type(models).__name__})")
    surface = models.surface_mask
    n_surface = int(surface.sum())
    if n_surface != n_cortex or not surface[:n_cortex].all():
        raise DataError(f"{path}: {n_surface} cortical (surface) grayordinates of {len(models)}"
                        f"{'' if surface[:n_surface].all() else ' (not the first ones)'}, "
                        f"expected data.n_cortex={n_cortex}")
    return Grayordinates(np.asarray(models.name[:n_cortex]), np.asarray(models.vertex[:n_cortex])), len(series)


def read_cortex_series(path: str | Path, n_cortex: int, n_volumes: int,
                       timing: str = "released") -> tuple[np.ndarray, Grayordinates]:
    """The kept n_volumes volumes of the cortex: (n_volumes, n_cortex) float32, with its grayordinates.

    timing: "released" (drop the first 1 or 2 volumes and the last 4, by the run's length) or "first"
    (the first n_volumes), see ``datamodules.video_timing``.
    """
    path = Path(path)
    img = _load_cifti(path)
    grayordinates, n_time = _check_axes(path, img, n_cortex)
    try:
        keep = kept_volumes(n_time, n_volumes, timing)
    except ValueError as err:
        raise DataError(f"{path}: {err}") from None
    if tuple(img.shape) != (n_time, img.header.get_axis(1).size):
        raise DataError(f"{path}: data shape {tuple(img.shape)} does not match its header's axes")
    try:
        data = np.asarray(img.dataobj[keep, :n_cortex], dtype=np.float32)
    except Exception as err:  # truncated data block
        raise DataError(f"{path}: cannot read the data block of shape {tuple(img.shape)} "
                        f"(truncated or corrupt: {_one_line(err)})") from err
    return data, grayordinates


def write_dtseries(path: str | Path, data: np.ndarray, tr: float, surfaces: Sequence[tuple[str, np.ndarray, int]],
                   volume_mask: np.ndarray | None = None, volume_name: str = "ThalamusLeft") -> None:
    """Write a CIFTI-2 dtseries: data (n_volumes, n_grayordinates) float32.

    surfaces: (structure name e.g. "CortexLeft", vertex indices (n,), n_vertices of the surface), in
    order; then the voxels of volume_mask (bool (X, Y, Z)), if given, as one volume structure.
    """
    models = None
    for name, vertices, n_vertex in surfaces:
        part = cifti2_axes.BrainModelAxis.from_surface(np.asarray(vertices), int(n_vertex), name=name)
        models = part if models is None else models + part
    if volume_mask is not None and volume_mask.any():
        models = models + cifti2_axes.BrainModelAxis.from_mask(volume_mask, name=volume_name, affine=np.eye(4))
    data = np.asarray(data, dtype=np.float32)
    if data.shape[1] != len(models):
        raise ValueError(f"write_dtseries: data has {data.shape[1]} columns for {len(models)} grayordinates")
    series = cifti2_axes.SeriesAxis(start=0.0, step=float(tr), size=data.shape[0], unit="SECOND")
    img = nib.Cifti2Image(data, header=(series, models))
    img.nifti_header.set_intent("ConnDenseSeries")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.to_filename(str(path))


# --------------------------------------------------------------------------- video
@dataclass(frozen=True)
class VideoInfo:
    """n_frames (exact when the container says so, else counted), fps, width, height."""

    n_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.n_frames / self.fps


def _open(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        container = av.open(str(path))
    except Exception as err:
        raise DataError(f"{path}: not a readable video ({_one_line(err)})") from err
    if not container.streams.video:
        container.close()
        raise DataError(f"{path}: no video stream")
    return container


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, frame rate and size of a video's first video stream (without decoding it)."""
    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise DataError(f"{path}: the video stream has no frame rate")
        n_frames = int(stream.frames)
        if n_frames <= 0:  # not in the header: count the packets (no decoding)
            try:
                n_frames = sum(1 for packet in container.demux(stream) if packet.size)
            except Exception as err:
                raise DataError(f"{path}: cannot read the video stream ({_one_line(err)})") from err
        return VideoInfo(n_frames, float(rate), int(stream.codec_context.width), int(stream.codec_context.height))


def iter_frames(path: str | Path, indices: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Decode frames in presentation order: yields (frame index, uint8 (H, W, 3) RGB).

    indices: the 0-based frame indices wanted (any order; yielded ascending), or None for all.
    Raises DataError if the video ends before the last wanted frame or cannot be decoded.
    """
    path = Path(path)
    wanted = None if indices is None else np.unique(np.asarray(list(indices), dtype=np.int64))
    if wanted is not None and len(wanted) == 0:
        return
    last = None if wanted is None else int(wanted[-1])
    k, index = 0, -1
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for index, frame in enumerate(container.decode(stream)):
                if wanted is None or index == wanted[k]:
                    yield index, frame.to_ndarray(format="rgb24")
                    k += 1
                    if last is not None and index >= last:
                        return
        except av.FFmpegError as err:
            raise DataError(f"{path}: video decoding failed at frame {index + 1} ({_one_line(err)})") from err
    if last is not None:
        raise DataError(f"{path}: the video has {index + 1} frames; frame {last} was asked for")


def write_mp4(path: str | Path, frames: Iterable[np.ndarray], fps: float, crf: int = 18) -> int:
    """Encode uint8 (H, W, 3) RGB frames (even H, W) as H.264 mp4 at ``fps``; returns the frame count."""
    from fractions import Fraction

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            if n == 0:
                stream.height, stream.width = frame.shape[:2]
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
            n += 1
        for packet in stream.encode():
            container.mux(packet)
    return n
