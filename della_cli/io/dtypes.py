"""safetensors dtype codes and their torch counterparts."""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        TORCH_DTYPES[_code] = getattr(torch, _name)

CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in TORCH_DTYPES.items()}

# Names users write in recipes and configs, mapped to safetensors codes.
DTYPE_NAMES: dict[str, str] = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
}
CONFIG_NAMES: dict[str, str] = {code: name for name, code in DTYPE_NAMES.items()}


def itemsize(code: str) -> int:
    return torch.empty((), dtype=TORCH_DTYPES[code]).element_size()


def is_floating(code: str) -> bool:
    return TORCH_DTYPES[code].is_floating_point
