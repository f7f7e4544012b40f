"""The device a merge runs on, as torch names it."""

from __future__ import annotations

import re
from pathlib import Path

from della_cli.errors import UsageError

_DEVICE_NAME = re.compile(r"(cpu|cuda)(:\d+)?")


def select_device(name: str) -> str:
    """The device to merge on, as torch names it: ``auto`` is CUDA when available; an explicit
    CUDA device must exist. A CPU merge never imports torch (see ``io.dtypes``): ``auto`` looks
    for NVIDIA device files before asking torch."""
    if name == "auto":
        return "cuda" if _nvidia_device_files() and _cuda_device_count() else "cpu"
    match = _DEVICE_NAME.fullmatch(name)
    if match is None:
        raise UsageError(f"--device: '{name}' is not a device; use auto, cpu, cuda or cuda:N")
    if match.group(1) == "cpu":
        if match.group(2):
            raise UsageError(f"--device: '{name}' is not supported; use auto, cpu, cuda or cuda:N")
        return name
    count = _cuda_device_count()
    if count == 0:
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if match.group(2) and int(match.group(2)[1:]) >= count:
        raise UsageError(f"--device {name}: only {count} CUDA device(s)")
    return name


def _nvidia_device_files() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*")) or Path("/proc/driver/nvidia").exists()


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
