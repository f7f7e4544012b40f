"""Host-to-device copies of blocks on CUDA: from pinned memory, on a stream of their own,
started by the reader thread while the previous block merges.

A copy from ordinary (pageable) host memory is synchronous: the driver stages it through a
pinned buffer of its own and the calling thread waits. Here the rows a reader thread has just
read are copied into pinned memory from torch's caching host allocator (reused block after
block) and sent to the device with ``non_blocking`` on a copy stream; the merging thread's
stream waits for that copy with an event, not the host. So one block's reads and copies
overlap the previous block's arithmetic and its copy back, which the writer needs anyway.
Importing this module imports torch; only the torch backend does, on CUDA.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from della_cli.io.dtypes import to_torch

# Blocks staged and not yet taken. A staged block is taken by the next ``take`` of the same
# arrays; one that never is (a retry merges other slices) is dropped past this many.
MAX_STAGED = 4


class CudaUploads:
    """Blocks of rows (as stored) copied to ``device`` ahead of their merge."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._staged: OrderedDict[int, tuple[list[np.ndarray], list[torch.Tensor], object]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()

    def stage(self, arrays: Sequence[np.ndarray]) -> None:
        """Start copying ``arrays`` to the device (from the reader thread)."""
        if not arrays:
            return
        tensors, done = self._copy(arrays)
        with self._lock:
            self._staged[id(arrays[0])] = (list(arrays), tensors, done)
            while len(self._staged) > MAX_STAGED:
                self._staged.popitem(last=False)

    def take(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """``arrays`` on the device, as stored: the staged copies if these very arrays were
        staged, else copied now; the calling thread's stream waits for the copy."""
        with self._lock:
            entry = self._staged.pop(id(arrays[0]), None) if arrays else None
        staged = entry is not None and len(entry[0]) == len(arrays)
        if staged and all(a is b for a, b in zip(entry[0], arrays, strict=True)):
            _, tensors, done = entry
        else:
            tensors, done = self._copy(arrays)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        for tensor in tensors:
            tensor.record_stream(current)  # made on the copy stream, used on this one
        return tensors

    def _copy(self, arrays: Sequence[np.ndarray]) -> tuple[list[torch.Tensor], object]:
        """Each array through pinned memory to the device on the copy stream, and the event
        that marks the end of the copies. The pinned buffers go back to torch's host cache
        when dropped, which keeps them until the copies from them are done."""
        tensors = []
        with torch.cuda.stream(self.stream):
            for raw in arrays:
                host = to_torch(np.ascontiguousarray(raw))
                pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
                pinned.copy_(host)
                tensors.append(pinned.to(self.device, non_blocking=True))
            done = torch.cuda.Event()
            done.record(self.stream)
        return tensors, done
