"""Peak bytes of the tensors a block of torch code allocates, counted per storage (CPU or any device).

``with LiveTensorBytes() as m: ...`` then ``m.peak``: the most bytes held at once by storages that ops inside
the block created (views and in-place ops add nothing), from the moment each op returns until its last tensor
is freed. Tensors made before the block are not counted; library workspaces that never become tensors
(BLAS, LAPACK) are not either.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [live tensors, nbytes]
        self.known: set[int] = set()          # storages that existed before (inputs): never counted
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                self.known.add(t.untyped_storage().data_ptr())
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.known and key not in self.live:
                continue
            entry = self.live.setdefault(key, [0, storage.nbytes()])
            if entry[0] == 0:
                self.current += entry[1]
                self.peak = max(self.peak, self.current)
            entry[0] += 1
            weakref.finalize(t, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]
