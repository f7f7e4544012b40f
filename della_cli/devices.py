"""The devices a merge runs on, as torch names them.

A merge runs on one device (``cpu``, ``cuda``, ``cuda:N``) or on several: ``--devices
cuda:0,cuda:1``, or ``--device cuda`` on a machine with several GPUs, which means every
visible one. The plan spreads the tensors over them by bytes (``device_plan``). A list of
``cpu`` entries (``cpu,cpu``) runs the torch backend in as many workers on the CPU: it is how
the several-device path is tested on a machine without GPUs.
"""

from __future__ import annotations

import re
from pathlib import Path

from della_cli.errors import UsageError

_DEVICE_NAME = re.compile(r"(cpu|cuda)(:\d+)?")
_CHOICES = "use auto, cpu, cuda or cuda:N, or a list such as cuda:0,cuda:1"


def select_device(name: str) -> str:
    """The device (or comma-separated devices) to merge on, as torch names them: ``auto`` is
    CUDA when available; an explicit CUDA device must exist. A CPU merge never imports torch
    (see ``io.dtypes``): ``auto`` looks for NVIDIA device files before asking torch."""
    name = name.strip()
    if name == "auto":
        return "cuda" if _nvidia_device_files() and _cuda_device_count() else "cpu"
    if "," in name:
        return _select_list(name)
    match = _DEVICE_NAME.fullmatch(name)
    if match is None:
        raise UsageError(f"--device: '{name}' is not a device; {_CHOICES}")
    if match.group(1) == "cpu":
        if match.group(2):
            raise UsageError(f"--device: '{name}' is not supported; {_CHOICES}")
        return name
    count = _cuda_device_count()
    if count == 0:
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if match.group(2) and int(match.group(2)[1:]) >= count:
        raise UsageError(f"--device {name}: only {count} CUDA device(s)")
    return name


def _select_list(names: str) -> str:
    """Several devices: each ``cuda:N`` once (or only ``cpu`` entries, torch workers on the
    CPU); each checked as one device is."""
    entries = [entry.strip() for entry in names.split(",")]
    for entry in entries:
        if _DEVICE_NAME.fullmatch(entry) is None:
            raise UsageError(f"--devices: '{entry}' in '{names}' is not a device; {_CHOICES}")
    if all(entry == "cpu" for entry in entries):
        return ",".join(entries)
    for entry in entries:
        match = _DEVICE_NAME.fullmatch(entry)
        if match is None or match.group(1) != "cuda" or not match.group(2):
            raise UsageError(
                f"--devices: '{entry}' in '{names}' is not a numbered CUDA device; "
                "list devices as cuda:0,cuda:1 (or cpu,cpu)"
            )
    if len(set(entries)) != len(entries):
        raise UsageError(f"--devices: '{names}' names a device twice; list each once")
    count = _cuda_device_count()
    if count == 0:
        raise UsageError(f"--devices {names}: CUDA is not available on this machine")
    for entry in entries:
        if int(entry.split(":")[1]) >= count:
            raise UsageError(f"--devices {names}: there is no {entry}; {count} CUDA device(s)")
    return ",".join(entries)


def merge_devices(device: str) -> list[str]:
    """The torch devices a merge spreads its tensors over: each of a list; ``cuda`` is every
    visible GPU where there are several (``cuda:0``, ``cuda:1``, ...); anything else alone.
    Only ``cuda`` asks torch (a CPU merge never imports it)."""
    device = str(device)
    if "," in device:
        return device.split(",")
    if device == "cuda":
        count = _cuda_device_count()
        if count > 1:
            return [f"cuda:{index}" for index in range(count)]
    return [device]


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def _nvidia_device_files() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*")) or Path("/proc/driver/nvidia").exists()


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
