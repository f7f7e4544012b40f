"""Model folders stored as ``pytorch_model*.bin`` pickles, read only when the user allows it.

A pickle can run code when it is loaded, so della refuses these folders unless the user passes
``--allow-pickle``, and even then loads them only with torch's weights-only unpickler, which
rebuilds tensors and plain containers and refuses anything else. Files are memory-mapped
(``mmap=True``: only the pickle's small index is read up front) and held one at a time, so a
sharded checkpoint never sits in memory whole; the reader offers the same interface as the
safetensors one, so planning and merging do not know the difference.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import torch

from della_cli.errors import ModelError
from della_cli.io.dtypes import from_torch, torch_code
from della_cli.io.reader import ModelReader, TensorInfo, ensure_inside

PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SINGLE_NAME = "pytorch_model.bin"


def has_only_pickle_weights(folder: Path) -> bool:
    """A folder whose weights are pickles, with no safetensors file beside them."""
    pickled = (folder / PICKLE_SINGLE_NAME).is_file() or (folder / PICKLE_INDEX_NAME).is_file()
    return pickled and not any(folder.glob("*.safetensors"))


def pickle_weight_files(folder: Path, root: Path) -> list[Path]:
    """The pickle files of a folder: the shards its index names, or ``pytorch_model.bin``."""
    index_path = folder / PICKLE_INDEX_NAME
    if not index_path.is_file():
        return [ensure_inside(folder / PICKLE_SINGLE_NAME, root)]
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
        if not all(isinstance(name, str) for name in names):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelError(
            f"{index_path}: not a valid index (needs a weight_map object from tensor names "
            "to file names)"
        ) from error
    files = []
    for name in names:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ModelError(f"{index_path} names '{name}', which is outside the model folder")
        path = folder / name
        if not path.is_file():
            raise ModelError(f"{index_path} names '{name}', which does not exist")
        files.append(ensure_inside(path, root))
    return files


def load_weights_only(path: Path) -> dict[str, torch.Tensor]:
    """One pickle file's state dict through torch's weights-only unpickler, memory-mapped
    where the file is in torch's zip format; anything but a flat dict of tensors is refused."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # The legacy (pre-zip) format cannot be mapped; it is read whole, still one file
            # at a time.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "refused"
        raise ModelError(
            f"{path}: not a plain weights pickle; torch's weights-only loader refused it "
            f"({first_line})"
        ) from error
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise ModelError(f"{path}: cannot be loaded as a torch checkpoint ({error})") from error
    if not isinstance(state, dict):
        raise ModelError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ModelError(f"{path}: entry {name!r} is not a named tensor")
        if torch_code(value.dtype) is None:
            raise ModelError(f"{path}: tensor '{name}' has unsupported dtype {value.dtype}")
    return state


class PickleModelReader(ModelReader):
    """A ``pytorch_model*.bin`` model folder behind the ``ModelReader`` interface."""

    def __init__(self, folder: Path, label: str, root: Path | None = None):
        self.folder = folder
        self.label = label
        self.root = root or folder
        self.tensors: dict[str, TensorInfo] = {}
        for path in pickle_weight_files(folder, self.root):
            state = load_weights_only(path)
            for position, (name, tensor) in enumerate(state.items()):
                code = torch_code(tensor.dtype)
                nbytes = tensor.numel() * tensor.element_size()
                # ``offset`` orders the tensors as the file stores them, for sequential plans.
                info = TensorInfo(name, code, tuple(tensor.shape), path, position, nbytes)
                self.tensors[name] = info
            del state
        self.weight_map = None  # no safetensors index
        self.config = self._read_json("config.json")
        self._handles = {}
        self._open_path: Path | None = None
        self._open_state: dict[str, torch.Tensor] = {}

    def _state_of(self, path: Path) -> dict[str, torch.Tensor]:
        """The state dict of ``path``, keeping only one file open at a time."""
        if path != self._open_path:
            self._open_state = {}
            self._open_state = load_weights_only(path)
            self._open_path = path
        return self._open_state

    def has_row_spans(self, name: str) -> bool:
        """No: a pickle's tensors are not rows of bytes at known places in a file."""
        return False

    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        return from_torch(
            self._state_of(info.path)[name].clone(memory_format=torch.contiguous_format)
        )

    def read_rows(self, name: str, start: int, stop: int, pool: object = None) -> np.ndarray:
        """Rows of a tensor already in memory (``pool``: unused, for the reader interface)."""
        info = self.tensors[name]
        tensor = self._state_of(info.path)[name]
        if tensor.dim() <= 1:
            rows = tensor.reshape(1, -1)
        else:  # explicit lengths: a tensor with no entries cannot infer a -1
            rows = tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:]))
        return from_torch(rows[start:stop].clone(memory_format=torch.contiguous_format))

    def close(self) -> None:
        self._open_state = {}
        self._open_path = None
