"""Batches drawn by index from a split's tensors, held on the training device: no per-item loader.

A split's features (n, n_features), responses (n, n_voxels) and ids (n,) are put on the device once;
batch k holds the rows ``order[k·B:(k+1)·B]``, gathered there with ``index_select``. ``order`` is what a
torch sampler yields — ``RandomSampler`` (EncodingModel re-seeds its generator from (seed, epoch) at
every epoch), ``SequentialSampler``, or under DDP this rank's ``DistributedSampler`` share (Lightning
sets its epoch) — so the batches are exactly those of a ``DataLoader`` over a per-item dataset with the
same sampler (same rows, same order, same values), without one Python call and one collate copy per
item, and without sending the responses over PCIe again every epoch.

``placement="stream"`` is for a split that does not fit on the device: the tensors stay in host memory,
each chunk of ``chunk_batches`` batches is gathered into pinned memory and copied to the device on a
side stream while the previous chunk trains. ``choose_placement`` decides from the free device memory.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import Sampler

PLACEMENTS = ("device", "stream")
# A split may take this share of the device's free memory; the rest is for the head, its gradients,
# the optimizer's moments and the activations.
DEVICE_SHARE = 0.5
CHUNK_BYTES = 256 << 20  # host -> device copies of about this size when streaming


def split_nbytes(*tensors: torch.Tensor) -> int:
    """Bytes the tensors take (what putting the split on the device costs)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def choose_placement(nbytes: int, device: torch.device, share: float = DEVICE_SHARE) -> str:
    """"device" when ``nbytes`` fit in ``share`` of the device's free memory, else "stream".

    On the CPU the tensors already live in host memory (placing them copies nothing): always "device".
    """
    device = torch.device(device)
    if device.type != "cuda":
        return "device"
    free, _total = torch.cuda.mem_get_info(device)
    return "device" if nbytes <= share * free else "stream"


class TensorBatches:
    """An iterable of batches {"x": (b, n_features), "y": (b, n_voxels), "id": (b,) int64}.

    features: (n, n_features) tensor; responses: (n, n_voxels) tensor or array; ids: (n,) ints.
    sampler: yields the row order of one pass (indices into the n rows); its ``set_epoch`` (DDP) and
    ``generator`` (shuffling) stay reachable as ``.sampler``, as on a DataLoader, so Lightning and
    EncodingModel seed it as they would a DataLoader's. batch_size: rows per batch (the last one may be
    smaller, as a DataLoader's with drop_last=False). device: where the batches are delivered.
    placement: "device" (tensors moved there once) or "stream" (kept on the host, copied in chunks of
    ``chunk_batches`` batches; default: about 256 MB a chunk).
    """

    batch_sampler = None  # as a DataLoader given a sampler: Lightning then reads ``sampler``

    def __init__(self, features: torch.Tensor, responses: torch.Tensor | np.ndarray, ids: torch.Tensor | np.ndarray,
                 sampler: Sampler[int], batch_size: int, device: torch.device | str = "cpu",
                 placement: str = "device", chunk_batches: int | None = None):
        responses = torch.as_tensor(responses)
        ids = torch.as_tensor(np.asarray(ids), dtype=torch.int64)
        if not (len(features) == len(responses) == len(ids)):
            raise ValueError(f"TensorBatches: features, responses and ids must have as many rows, got "
                             f"{len(features)}, {len(responses)} and {len(ids)}")
        if placement not in PLACEMENTS:
            raise ValueError(f"TensorBatches: placement must be one of {PLACEMENTS}, got {placement!r}")
        if batch_size < 1:
            raise ValueError(f"TensorBatches: batch_size must be >= 1, got {batch_size}")
        self.sampler, self.batch_size = sampler, int(batch_size)
        self.device, self.placement = torch.device(device), placement
        if placement == "device":
            self.tensors = tuple(t.to(self.device) for t in (features, responses, ids))
        else:
            self.tensors = tuple(t.contiguous() for t in (features, responses, ids))
            row_bytes = split_nbytes(*(t[:1] for t in self.tensors))
            self.chunk_batches = int(chunk_batches or max(1, CHUNK_BYTES // max(1, row_bytes * self.batch_size)))

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size) if isinstance(self.sampler, Sized) else 0

    def __iter__(self) -> Iterator[dict]:
        # A generator: the order is drawn at the first batch, after the epoch's seeding hooks have run.
        order = torch.as_tensor(list(self.sampler), dtype=torch.int64)
        if self.placement == "device":
            yield from _gathered(self.tensors, order.to(self.device), self.batch_size)
        else:
            yield from self._streamed(order)

    def _streamed(self, order: torch.Tensor) -> Iterator[dict]:
        """Chunks gathered on the host (pinned for a GPU), copied ahead of use on a side stream."""
        cuda = self.device.type == "cuda"
        copy_stream = torch.cuda.Stream(self.device) if cuda else None
        chunks = order.split(self.batch_size * self.chunk_batches)

        def load(idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
            host = [torch.empty((len(idx), *t.shape[1:]), dtype=t.dtype, pin_memory=cuda) for t in self.tensors]
            for t, out in zip(self.tensors, host):
                torch.index_select(t, 0, idx, out=out)
            if not cuda:
                return tuple(t.to(self.device) for t in host)
            with torch.cuda.stream(copy_stream):  # the pinned buffers are kept until their copy is done
                return tuple(t.to(self.device, non_blocking=True) for t in host)

        pending = load(chunks[0]) if chunks else None
        for k in range(len(chunks)):
            current = pending
            if cuda:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_stream(copy_stream)
                for t in current:
                    t.record_stream(compute)  # not reused by the allocator before compute is done with it
            x, y, ids = current
            for start in range(0, len(x), self.batch_size):
                rows = slice(start, start + self.batch_size)
                yield {"x": x[rows], "y": y[rows], "id": ids[rows]}
                if start == 0:  # the chunk's first step is queued: copy the next chunk meanwhile
                    pending = load(chunks[k + 1]) if k + 1 < len(chunks) else None


def _gathered(tensors: tuple[torch.Tensor, ...], order: torch.Tensor, batch_size: int) -> Iterator[dict]:
    """Batches of rows ``order`` of (features, responses, ids), on the tensors' device."""
    x, y, ids = tensors
    for idx in order.split(batch_size):
        yield {"x": x.index_select(0, idx), "y": y.index_select(0, idx), "id": ids.index_select(0, idx)}
