"""The few array operations inspect needs, on numpy (the CPU) or torch (CUDA).

numpy on the CPU: its comparisons, reductions and row sorts ran 5-25 times faster than torch's
on the 2-core reference machine (1M float32 entries: ``==`` 1.4 vs 29 ms, a row sort 6 vs 163
ms), and a CPU inspect then never imports torch. torch where the device is a GPU. Both give the
same sums up to float64 rounding (the tests compare them on the CPU).
"""

from __future__ import annotations

import numpy as np

from della_cli.io.dtypes import NUMPY_DTYPES


class NumpyArrays:
    """Blocks as numpy arrays in host memory."""

    name = "numpy"

    def __init__(self, device: str = "cpu"):
        self.device = device

    def float32(self, array: np.ndarray):
        """Rows as read (any stored float dtype) in float32."""
        return array.astype(np.float32, copy=False)

    def float64(self, array):
        return array.astype(np.float64)

    def keys(self, delta):
        """|δ| as int32 keys that order like the magnitudes (the sign bit cleared), flat."""
        return np.abs(delta).reshape(-1).view(np.int32)

    def bincount(self, values, buckets: int) -> np.ndarray:
        return np.bincount(values, minlength=buckets)

    def nonzero(self, mask):
        return np.flatnonzero(mask)

    def sort_rows(self, rows):
        return np.sort(rows, axis=-1)

    def arange64(self, count: int):
        return np.arange(count, dtype=np.float64)

    def stack(self, arrays):
        return np.stack(arrays)

    def concatenate(self, arrays):
        return np.concatenate(arrays)

    def mean(self, arrays):
        return np.mean(np.stack(arrays), axis=0, dtype=np.float32)

    def any(self, array, axis: int):
        return array.any(axis=axis)

    def sum64(self, array, axis: int | None = None):
        return np.sum(array, axis=axis, dtype=np.float64)

    def count(self, mask) -> int:
        return int(np.count_nonzero(mask))

    def overlaps(self, masks) -> np.ndarray:
        """(T, T) counts of entries two (T, m) masks share (float32 products are exact: a
        block holds fewer than 2^24 entries)."""
        counted = masks.astype(np.float32)
        return (counted @ counted.T).astype(np.float64)

    def host(self, array) -> np.ndarray:
        return np.asarray(array)


class TorchArrays:
    """Blocks as torch tensors on ``device`` (a GPU; the CPU too, which the tests use)."""

    name = "torch"

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def float32(self, array: np.ndarray):
        from della_cli.io.dtypes import to_torch

        if array.dtype == NUMPY_DTYPES["BF16"] or not array.flags.writeable:
            array = np.array(array)  # torch needs writable memory; bfloat16 goes as bits
        return to_torch(array).to(self.device, self.torch.float32)

    def float64(self, tensor):
        return tensor.double()

    def keys(self, delta):
        return delta.abs().reshape(-1).view(self.torch.int32)

    def bincount(self, values, buckets: int) -> np.ndarray:
        return self.torch.bincount(values, minlength=buckets).cpu().numpy()

    def nonzero(self, mask):
        return self.torch.nonzero(mask).reshape(-1)

    def sort_rows(self, rows):
        return self.torch.sort(rows, dim=-1).values

    def arange64(self, count: int):
        return self.torch.arange(count, dtype=self.torch.float64, device=self.device)

    def stack(self, tensors):
        return self.torch.stack(tensors)

    def concatenate(self, tensors):
        return self.torch.cat(tensors)

    def mean(self, tensors):
        return self.torch.stack(tensors).mean(dim=0)

    def any(self, tensor, axis: int):
        return tensor.any(dim=axis)

    def sum64(self, tensor, axis: int | None = None):
        if axis is None:
            return tensor.sum(dtype=self.torch.float64)
        return tensor.sum(dim=axis, dtype=self.torch.float64)

    def count(self, mask) -> int:
        return int(mask.sum())

    def overlaps(self, masks) -> np.ndarray:
        counted = masks.float()
        return (counted @ counted.T).double().cpu().numpy()

    def host(self, tensor) -> np.ndarray:
        return tensor.cpu().numpy()


def arrays_for(device: str) -> NumpyArrays | TorchArrays:
    """numpy on the CPU, torch elsewhere."""
    return NumpyArrays() if device == "cpu" else TorchArrays(device)
