"""Builders of hostile and malformed inputs for the adversarial tests: raw safetensors bytes
written by hand (so a test controls every byte of the header), tiny model folders, and a
bounded run of the real CLI in a subprocess (so a hang fails the test instead of the suite)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

# tensor name -> (values); float32 (2, 4) tensors, small enough to write by hand
TENSORS = {
    "model.layers.0.mlp.weight": np.arange(8, dtype=np.float32).reshape(2, 4),
    "model.layers.1.mlp.weight": -np.arange(8, dtype=np.float32).reshape(2, 4),
}


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def safetensors_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    """A safetensors file: the 8-byte length, the header (a dict, or raw JSON bytes), data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def tensors_file(tensors: dict[str, np.ndarray]) -> bytes:
    """A valid safetensors file of ``tensors``, laid out in order."""
    header, data = {}, b""
    for name, array in tensors.items():
        dtype = {np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8"}[array.dtype]
        header[name] = entry(dtype, list(array.shape), len(data), len(data) + array.nbytes)
        data += array.tobytes()
    return safetensors_bytes(header, data)


def model_folder(
    folder: Path,
    tensors: dict[str, np.ndarray] | None = None,
    config: dict | str | None = None,
    weights: bytes | None = None,
) -> Path:
    """A model folder with ``model.safetensors`` (``weights`` as given, else ``tensors``) and
    a config.json (a dict, raw text, or the default)."""
    folder.mkdir(parents=True, exist_ok=True)
    if weights is None:
        weights = tensors_file(TENSORS if tensors is None else tensors)
    (folder / "model.safetensors").write_bytes(weights)
    text = config if isinstance(config, str) else json.dumps(config or {"model_type": "toy"})
    (folder / "config.json").write_text(text)
    return folder


def merge_inputs(root: Path, base: Path | None = None) -> tuple[Path, Path]:
    """A base (``base`` if given) and an expert of ``TENSORS``, and a task-arithmetic recipe
    merging them; returns (recipe, base folder)."""
    base = base or model_folder(root / "base")
    expert = model_folder(root / "expert", {k: v + 1 for k, v in TENSORS.items()})
    recipe = root / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(base),
                "models": [{"model": str(expert)}],
            }
        )
    )
    return recipe, base


def della(*args: object, timeout_s: float = 60, cwd: Path | None = None):
    """Run ``della`` in a subprocess, killed after ``timeout_s`` (a hang fails the test)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "della_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=cwd,
        env=environment,
    )
