"""Streaming passes of a frozen backbone over a stimulus loader, with progress (``encoders.progress``).

Where images are preprocessed (``preprocess_on``, train.py's ``preprocess_on``):

- "device" (default in train.py): the loader only reads and decodes (``loader_transform`` gives the
  datamodule ``decode_rgb``), yielding uint8 images — (B, H, W, 3), or a list of (H, W, 3) when their sizes
  differ (NOD's JPEGs) — and ``BatchTransform`` resizes, crops and normalises each batch with tensor ops
  on the extraction device (grouped by image size);
- "cpu": the loader applies the backbone's per-image transform and yields (B, 3, S, S) float32.

On a CPU both give the same pixels (the same torchvision kernels); on CUDA the resize arithmetic differs
(``encoders.preprocess.resize_arithmetic``), so the feature cache keys on it (``pixel_record``).

Overlap: a background thread reads the loader ``prefetch`` batches ahead (its DataLoader workers, if any,
decode in parallel), pins the batches when the device is CUDA and, on a CPU, also runs the batched
preprocessing there, while the main thread runs the backbone. Copies to CUDA are non_blocking, and batch
k's features travel back (into pinned memory, non_blocking) while batch k + 1 is launched: the GPU does not
wait for the caller's work on batch k (e.g. the feature-cache write). Loader errors reach the caller
unchanged; the thread stops when the caller stops early.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from encoders.preprocess import BatchTransform, decode_rgb, resize_arithmetic
from encoders.progress import Progress

PREPROCESS_ON = ("device", "cpu")


@dataclass
class ExtractionStats:
    """What extraction passes did, summed over the passes given the same object: images, seconds (wall time
    of the passes), and waiting_s: the part of it the backbone waited for the loader (reading and decoding
    were the bottleneck)."""

    images: int = 0
    seconds: float = 0.0
    waiting_s: float = 0.0

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.images and self.seconds > 0 else None


def check_preprocess_on(value: str) -> str:
    value = str(value)
    if value not in PREPROCESS_ON:
        raise ValueError(f"preprocess_on must be one of {PREPROCESS_ON}, got {value!r}")
    return value


def loader_transform(backbone, preprocess_on: str = "device") -> Callable[[Any], torch.Tensor]:
    """What a datamodule's loader applies per image: ``decode_rgb`` (uint8 (H, W, 3); the backbone's
    preprocessing then runs batched on the device) or the backbone's per-image transform (float (3, S, S))."""
    return decode_rgb if check_preprocess_on(preprocess_on) == "device" else backbone.transform


def pixel_record(backbone, device: str | torch.device, preprocess_on: str = "device") -> dict:
    """What besides the backbone's own description decides the features' values: the device type the
    backbone runs on (CUDA convolutions, e.g. TF32, differ from the CPU's in the last digits) and the
    arithmetic of the resize (``resize_arithmetic``: the per-image transform resizes on the CPU, the
    batched one on ``device``). The per-image and the batched path on a CPU record the same (they give
    the same pixels); preprocess_on itself is recorded in run.json, not here."""
    device = torch.device(device)
    where = device if check_preprocess_on(preprocess_on) == "device" else torch.device("cpu")
    return {"device": device.type, "resize": resize_arithmetic(backbone.preprocess, where)}


def _pin(batch: Any) -> Any:
    """Tensors of a batch (nested in dicts / lists) in pinned memory."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: _pin(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_pin(v) for v in batch)
    return batch


def _images(batch: Any) -> Any:
    return batch["x"] if isinstance(batch, dict) else batch


def _is_decoded(images: Any) -> bool:
    """uint8 images (B, H, W, 3) or a list of (H, W, 3) (the device path) vs (B, 3, S, S) float (the CPU path)."""
    if isinstance(images, (list, tuple)):
        return True
    return images.dtype == torch.uint8


class _Prefetcher:
    """Batches of ``loader`` read ``depth`` ahead by a background thread, each passed through ``prepare``.

    The loader's iterator (and its worker processes) is made in the calling thread; errors raised while
    reading are raised again, unchanged, where the batch would have been. ``close()`` stops the thread."""

    _END = object()

    def __init__(self, loader, depth: int, prepare: Callable[[Any], Any]):
        self._iterator = iter(loader)
        self._prepare = prepare
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="brainprobe-extract-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # One intra-op thread here: the backbone's forward has the cores, and on a busy machine a parallel
        # torch op over small tensors (collate, pinning) waits for a free core at every call.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for batch in self._iterator:
                if not self._put((True, self._prepare(batch))):
                    return
            self._put((True, self._END))
        except BaseException as err:  # handed to the consumer, which raises it
            self._put((False, err))
        finally:
            torch.set_num_threads(threads)  # torch keeps the last value for threads started later

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        while True:
            ok, item = self._queue.get()
            if not ok:
                raise item
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._iterator = None  # shuts a DataLoader's workers down


def _tensors(images: Any) -> list[torch.Tensor]:
    return list(images) if isinstance(images, (list, tuple)) else [images]


class _Uploader:
    """Copies of pinned batches to a CUDA device on a stream of their own, so that copying batch k + 1
    overlaps the forward of batch k. ``send`` (prefetch thread) -> (tensors on the device, event);
    ``receive`` (main thread) makes the current stream wait for the copy and tells the caching allocator
    the tensors are used there."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def send(self, images: Any) -> tuple[Any, torch.cuda.Event]:
        pinned = _pin(images)
        with torch.cuda.stream(self.stream):
            moved = ([t.to(self.device, non_blocking=True) for t in pinned] if isinstance(pinned, (list, tuple))
                     else pinned.to(self.device, non_blocking=True))
            event = torch.cuda.Event()
            event.record(self.stream)
        return moved, event

    def receive(self, item: tuple[Any, torch.cuda.Event]) -> Any:
        moved, event = item
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in _tensors(moved):
            t.record_stream(current)
        return moved


@torch.no_grad()
def iter_features(backbone: nn.Module, loader: DataLoader, device: str | torch.device = "cpu",
                  description: str = "features", progress: bool = True,
                  total: int | None = None, stats: ExtractionStats | None = None,
                  preprocess_on: str | None = None, prefetch: int = 2) -> Iterator[torch.Tensor]:
    """Yield float32 CPU features (b, n_features) batch by batch, in loader order.

    loader yields images, or dicts with key "x": decoded uint8 images ((B, H, W, 3), or a list of (H, W, 3)),
    preprocessed here by ``BatchTransform(backbone.preprocess)`` on ``device``, or images already transformed
    (b, 3, S, S). preprocess_on ("device" | "cpu", optional) says which the caller expects (e.g. what a cache
    key records): a loader that yields the other is a RuntimeError. prefetch: batches read ahead in a
    background thread (0: everything in this thread). Progress: a bar with images/s and the time left on a
    terminal, a line every ~30 s elsewhere (``encoders.progress``). ``stats`` (if given) adds the images, the
    wall time of this pass and the time the backbone waited for the loader.

    Who does what: the prefetch thread reads the loader (one intra-op thread), and on a CPU also runs the
    batched preprocessing, overlapping the forward; on CUDA it pins each batch and copies it to the device
    on a copy stream, and the main thread runs the preprocessing and the forward on the current stream and
    copies the features back into pinned memory without blocking: batch k is handed out once batch k + 1
    is launched (on a CPU at once). An error raised while reading or preprocessing is raised here, unchanged
    (the same exception object), after the batches read before it; closing this generator early (or an
    error in the caller) stops the prefetch thread and the loader's workers.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    backbone.eval()
    backbone.to(device)
    if total is None:
        total = len(loader.dataset) if hasattr(loader, "dataset") else None
    if preprocess_on is not None:
        check_preprocess_on(preprocess_on)
    batch_transform = None
    if hasattr(backbone, "preprocess"):
        batch_transform = BatchTransform(backbone.preprocess)

    def transform(images):
        if batch_transform is None:
            raise RuntimeError(f"the {description} loader yields decoded uint8 images, but {type(backbone).__name__} "
                               f"has no preprocessing spec (.preprocess) to apply to them")
        return batch_transform(images, device)

    uploader = _Uploader(device) if cuda else None

    def prepare(batch):  # in the prefetch thread -> (decoded?, images ready for the main thread)
        images = _images(batch)
        decoded = _is_decoded(images)
        if preprocess_on is not None and decoded != (preprocess_on == "device"):
            raise RuntimeError(f"the {description} loader yields {'decoded uint8' if decoded else 'transformed'} "
                               f"images, but preprocess_on={preprocess_on!r} was asked for (the datamodule's "
                               f"transform must be encoders.extract.loader_transform(backbone, {preprocess_on!r}))")
        if uploader is not None:
            return decoded, uploader.send(images)
        return False, transform(images) if decoded else images

    prefetcher = _Prefetcher(loader, prefetch, prepare) if prefetch > 0 else None
    source = iter(prefetcher) if prefetcher is not None else (prepare(b) for b in loader)
    pending: tuple[torch.Tensor, Any, int] | None = None
    with Progress(progress) as bar:
        task = bar.add_task(description, total=total, unit="images")
        last = time.perf_counter()

        def finish(item) -> torch.Tensor:
            nonlocal last
            host, event, n = item
            if event is not None:
                event.synchronize()  # the features have reached the host
            if stats is not None:  # the pass's wall time: reading, decoding, the forward, and storing the rows
                now = time.perf_counter()
                stats.images += n
                stats.seconds += now - last
                last = now
            bar.advance(task, n)
            return host

        try:
            while True:
                asked = time.perf_counter()
                try:
                    decoded, images = next(source)
                except StopIteration:
                    break
                except BaseException:  # reading failed: the batches before it are still handed out first
                    if pending is not None:
                        held, pending = pending, None
                        yield finish(held)
                    raise
                if stats is not None:
                    stats.waiting_s += time.perf_counter() - asked
                if uploader is not None:
                    images = uploader.receive(images)
                x = transform(images) if decoded else images.to(device, non_blocking=True)
                out = backbone(x).float()
                if not cuda:  # nothing runs asynchronously: the rows are ready
                    yield finish((out, None, int(x.shape[0])))
                    continue
                host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                host.copy_(out, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                if pending is not None:
                    yield finish(pending)
                pending = (host, event, int(x.shape[0]))
            if pending is not None:
                yield finish(pending)
                pending = None
        finally:
            if prefetcher is not None:
                prefetcher.close()


def extract_features(backbone: nn.Module, loader: DataLoader, device: str | torch.device = "cpu",
                     description: str = "features", progress: bool = True,
                     stats: ExtractionStats | None = None, preprocess_on: str | None = None) -> torch.Tensor:
    """All features of a loader in memory: (n_images, n_features) float32 on the CPU."""
    chunks = list(iter_features(backbone, loader, device, description, progress, stats=stats,
                                preprocess_on=preprocess_on))
    if not chunks:
        raise ValueError(f"extract_features: the {description} loader yielded no images")
    return torch.cat(chunks)
