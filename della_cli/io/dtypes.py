"""safetensors dtype codes, and the numpy and torch arrays that hold them.

Tensor data travels through della as numpy arrays: bfloat16 and float8 as ``ml_dtypes`` types,
so an array says what it holds. The compiled CPU merge needs nothing else, and a CPU merge never
imports torch, whose import alone takes longer than merging a small model. torch is imported
only where a block takes the torch path (CUDA, or a case the compiled pass does not cover);
``to_torch`` and ``from_torch`` cross over without copying.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    import torch

# safetensors code -> (numpy dtype, torch dtype name)
_TYPES: dict[str, tuple[np.dtype, str]] = {
    "F64": (np.dtype(np.float64), "float64"),
    "F32": (np.dtype(np.float32), "float32"),
    "F16": (np.dtype(np.float16), "float16"),
    "BF16": (np.dtype(ml_dtypes.bfloat16), "bfloat16"),
    "F8_E4M3": (np.dtype(ml_dtypes.float8_e4m3fn), "float8_e4m3fn"),
    "F8_E5M2": (np.dtype(ml_dtypes.float8_e5m2), "float8_e5m2"),
    "I64": (np.dtype(np.int64), "int64"),
    "I32": (np.dtype(np.int32), "int32"),
    "I16": (np.dtype(np.int16), "int16"),
    "I8": (np.dtype(np.int8), "int8"),
    "U64": (np.dtype(np.uint64), "uint64"),
    "U32": (np.dtype(np.uint32), "uint32"),
    "U16": (np.dtype(np.uint16), "uint16"),
    "U8": (np.dtype(np.uint8), "uint8"),
    "BOOL": (np.dtype(np.bool_), "bool"),
}
_FLOATING = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# Types numpy cannot hand to torch directly: moved as integers of the same width.
_BITS = {"BF16": "int16", "F8_E4M3": "int8", "F8_E5M2": "int8"}

NUMPY_DTYPES: dict[str, np.dtype] = {code: numpy for code, (numpy, _) in _TYPES.items()}
CODES: dict[np.dtype, str] = {numpy: code for code, numpy in NUMPY_DTYPES.items()}
_CODES_BY_TORCH_NAME = {torch_name: code for code, (_, torch_name) in _TYPES.items()}

# Names users write in recipes and configs, mapped to safetensors codes.
DTYPE_NAMES: dict[str, str] = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
}
CONFIG_NAMES: dict[str, str] = {code: name for name, code in DTYPE_NAMES.items()}


def itemsize(code: str) -> int:
    return NUMPY_DTYPES[code].itemsize


def is_floating(code: str) -> bool:
    return code in _FLOATING


def code_of(array: np.ndarray) -> str | None:
    """The safetensors code of an array's dtype (None for a type safetensors lacks)."""
    return CODES.get(array.dtype)


def torch_dtype(code: str) -> torch.dtype:
    import torch

    return getattr(torch, _TYPES[code][1])


def torch_code(dtype: torch.dtype) -> str | None:
    """The safetensors code of a torch dtype (None for one safetensors lacks)."""
    return _CODES_BY_TORCH_NAME.get(str(dtype).removeprefix("torch."))


def to_torch(array: np.ndarray) -> torch.Tensor:
    """The same memory as a CPU tensor of the same dtype (the array must be writable, as
    torch tensors always are)."""
    import torch

    code = CODES[array.dtype]
    bits = _BITS.get(code)
    if bits is None:
        return torch.from_numpy(array)
    return torch.from_numpy(array.view(bits)).view(torch_dtype(code))


def from_torch(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values as a numpy array of the same dtype, on the CPU, sharing memory where
    the tensor is already a contiguous CPU tensor."""
    import torch

    code = torch_code(tensor.dtype)
    if code is None:
        raise TypeError(f"no safetensors type for {tensor.dtype}")
    flat = tensor.detach().to("cpu").contiguous()
    bits = _BITS.get(code)
    if bits is None:
        return flat.numpy()
    return flat.view(getattr(torch, bits)).numpy().view(NUMPY_DTYPES[code])


def cast(array: np.ndarray, code: str) -> np.ndarray:
    """``array`` in dtype ``code``, rounded as torch rounds (the bytes the torch path always
    wrote); the array itself when it is of that dtype already."""
    if array.dtype == NUMPY_DTYPES[code]:
        return array
    return from_torch(to_torch(np.ascontiguousarray(array)).to(torch_dtype(code)))
