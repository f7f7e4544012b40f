"""Host-to-device copies of blocks on CUDA: from pinned memory, on a stream of their own,
started by the reader thread while the previous block merges.

A copy from ordinary (pageable) host memory is synchronous: the driver stages it through a
pinned buffer of its own and the calling thread waits. Here the rows a reader thread has just
read are copied, a slot at a time, into a few pinned buffers made once, and sent to the device
with ``non_blocking`` on a copy stream; the merging thread's stream waits for those copies
with an event, not the host. A block travels as stored (bfloat16: half the bytes of float32)
and is widened on the device. So one block's reads and copies
overlap the previous block's arithmetic and its copy back, which the writer needs anyway.
Importing this module imports torch; only the torch backend does, on CUDA.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from della_cli.io.dtypes import CODES, torch_dtype

# Pinned host memory: SLOTS buffers of SLOT_BYTES, filled in turn (64 MiB in all, whatever
# the block size: pinned pages count in the process's resident memory, and a block of the
# embedding is 130 MB per input in bfloat16).
SLOT_BYTES = 16 << 20
SLOTS = 4
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
        self._copying = threading.Lock()  # the slots: one copier at a time
        self._slots = [
            torch.empty(SLOT_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(SLOTS)
        ]
        self._slot_copied: list[torch.cuda.Event | None] = [None] * SLOTS
        self._next_slot = 0

    def stage(self, arrays: Sequence[np.ndarray]) -> None:
        """Start copying ``arrays`` to the device (from the reader thread). A device out of
        memory leaves them to ``take``, whose out-of-memory error the engine handles
        (``engine.memory_retry``); the reader thread must not fail for it."""
        if not arrays:
            return
        try:
            tensors, done = self._copy(arrays)
        except torch.OutOfMemoryError:
            return
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
        """Each array to the device on the copy stream, through the pinned slots in turn, and
        the event that marks the end of the copies. A slot is refilled once its last copy is
        done (this thread waits for it, not the merging one)."""
        tensors = []
        with self._copying, torch.cuda.stream(self.stream):
            for raw in arrays:
                raw = np.ascontiguousarray(raw)
                flat = raw.reshape(-1).view(np.uint8)
                on_device = torch.empty(raw.nbytes, dtype=torch.uint8, device=self.device)
                for begin in range(0, raw.nbytes, SLOT_BYTES):
                    end = min(begin + SLOT_BYTES, raw.nbytes)
                    slot = self._next_slot
                    self._next_slot = (slot + 1) % len(self._slots)
                    if self._slot_copied[slot] is not None:
                        self._slot_copied[slot].synchronize()
                    pinned = self._slots[slot][: end - begin]
                    np.copyto(pinned.numpy(), flat[begin:end])
                    on_device[begin:end].copy_(pinned, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(self.stream)
                    self._slot_copied[slot] = copied
                tensors.append(on_device.view(torch_dtype(CODES[raw.dtype])).reshape(raw.shape))
            done = torch.cuda.Event()
            done.record(self.stream)
        return tensors, done
