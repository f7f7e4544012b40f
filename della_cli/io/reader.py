"""Lazy, validated access to the tensors of a model folder stored as safetensors.

A folder holds either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Headers are read and checked up front (cheap: JSON only), so a
plan can be made from shapes alone; tensor data is read on demand, one tensor at a time, with
positioned reads into a fresh buffer, as a numpy array of the stored dtype (see
``io.dtypes``). The engine's blocks, read into a pool, are mapped where they lie in the page
cache instead (``io.mapped``), a mapping per block released with it. Either way the process's
resident memory stays bounded by the tensors in flight, whatever the model's size.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from della_cli.errors import ModelError, shown
from della_cli.io.bounded import (
    MAX_CONFIG_BYTES,
    MAX_INDEX_BYTES,
    MalformedJson,
    load_json,
    open_regular,
    parse_json,
    read_bounded,
)
from della_cli.io.buffers import BufferPool, placed, read_offset
from della_cli.io.dtypes import NUMPY_DTYPES, itemsize
from della_cli.io.header import CONTROL, TensorInfo, parse_header, read_header
from della_cli.io.mapped import AVAILABLE as MAPPING
from della_cli.io.mapped import MAP_MIN_BYTES, FileTooShort, mapped_bytes
from della_cli.io.streamed_sum import FileSpan

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _check_config_fields(path: Path, config: dict) -> None:
    """The config fields della reads, checked for their type where they are read from (a
    ``text_config`` that is a string crashed the plan, ``architectures: 5`` the report)."""
    for key in ("text_config", "quantization_config"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise ModelError(f"{path}: {key} must be an object, got {shown(config[key])}")
    if config.get("model_type") is not None and not isinstance(config["model_type"], str):
        raise ModelError(f"{path}: model_type must be a string, got {shown(config['model_type'])}")
    architectures = config.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        raise ModelError(
            f"{path}: architectures must be a list of names, got {shown(architectures)}"
        )


def combine_shards(
    folder: Path,
    shards: list[tuple[str, dict[str, TensorInfo]]],
    weight_map: dict[str, str] | None,
) -> tuple[dict[str, TensorInfo], list[str]]:
    """The model's tensors from its shards' headers, one per name, and a line per name that
    more than one shard holds (for ``della verify``).

    A name in two shards is taken from the shard the index names, as transformers does, not
    from whichever was read last; every name the index lists must be in the shard it names.
    Without an index for it, a name in two shards is ambiguous and refused. A model with no
    tensor at all is refused: it is no model to merge or to publish."""
    index_path = folder / INDEX_NAME
    tensors: dict[str, TensorInfo] = {}
    found_in: dict[str, str] = {}  # tensor name -> the file name (as indexed) it is taken from
    shadowed: list[str] = []
    for file_name, shard in shards:
        for name, info in shard.items():
            if name not in tensors:
                tensors[name], found_in[name] = info, file_name
                continue
            indexed = (weight_map or {}).get(name)
            if indexed not in (found_in[name], file_name):
                raise ModelError(
                    f"{folder}: tensor '{name}' is in both {found_in[name]} and {file_name}, "
                    "and no index says which; the model is corrupt"
                )
            shadowed.append(
                f"'{name}' is in both {found_in[name]} and {file_name}; the index names {indexed}"
            )
            if indexed == file_name:
                tensors[name], found_in[name] = info, file_name
    if weight_map is not None:
        missing = sorted(
            name for name, file_name in weight_map.items() if found_in.get(name) != file_name
        )
        if missing:
            raise ModelError(
                f"{index_path}: names {len(missing)} tensor(s) absent from the shards it "
                f"gives for them, first '{missing[0]}' ({weight_map[missing[0]]})"
            )
    if not tensors:
        raise ModelError(f"{folder}: holds no tensors; there is nothing to merge or verify")
    return tensors, shadowed


def ensure_inside(path: Path, root: Path) -> Path:
    """``path`` resolved, refusing a symlink (or anything) that leads outside ``root``: della
    reads no file beyond the model folders it was given."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ModelError(f"{path} leads outside its model folder (to {resolved}); refusing it")
    return resolved


def _confined(folder: Path, relative: str, what: str, root: Path | None = None) -> Path:
    """Resolve ``relative`` inside ``folder``, refusing anything that leaves it (or ``root``,
    a wider folder some layouts keep their files in, such as a Hub cache entry)."""
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise ModelError(f"{what} names '{relative}', which is outside the model folder")
    try:
        resolved = (folder / candidate).resolve()
        if not resolved.is_relative_to((root or folder).resolve()):
            raise ModelError(f"{what} names '{relative}', which leads outside the model folder")
        if not resolved.exists():
            raise ModelError(f"{what} names '{relative}', which does not exist")
    except OSError as error:  # a name too long, a loop of links: no answer but an error
        raise ModelError(f"{what} names {shown(relative)}, which cannot be opened") from error
    return resolved


def read_weight_map(folder: Path) -> dict[str, str] | None:
    """The weight map of a sharded model's index (tensor name -> file name); None without one."""
    index_path = folder / INDEX_NAME
    if not index_path.exists():
        return None
    invalid = ModelError(
        f"{index_path}: not a valid index (needs a weight_map object from tensor names to "
        "file names)"
    )
    try:
        index = parse_json(read_bounded(index_path, MAX_INDEX_BYTES, "an index"), index_path)
    except MalformedJson as error:
        raise invalid from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(file_name, str) for file_name in weight_map.values()
    ):
        raise invalid
    for name, file_name in weight_map.items():
        if CONTROL.search(name) or CONTROL.search(file_name) or not file_name:
            raise ModelError(
                f"{index_path}: weight_map entry {shown(name)}: {shown(file_name)} holds a "
                "control character or an empty file name; the index is corrupt"
            )
    return weight_map


def weight_files(
    folder: Path, root: Path | None = None
) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a model folder and, if sharded, the index's weight map."""
    root = root or folder
    index_path = folder / INDEX_NAME
    weight_map = read_weight_map(folder)
    if weight_map is not None:
        names = sorted(set(weight_map.values()))
        ensure_inside(index_path, root)
        return [_confined(folder, name, str(index_path), root) for name in names], weight_map
    if (folder / SINGLE_NAME).exists():  # read_header refuses it unless it is a regular file
        return [ensure_inside(folder / SINGLE_NAME, root)], None
    singles = sorted(folder.glob("*.safetensors"))
    if len(singles) == 1:
        return [ensure_inside(singles[0], root)], None
    if list(folder.glob("pytorch_model*.bin")) or (folder / "model.pt").exists():
        raise ModelError(
            f"{folder}: has only pickle weights (pytorch_model*.bin); pass --allow-pickle to "
            "load them with torch's weights-only loader, or convert them to safetensors, e.g. "
            "with transformers' save_pretrained(safe_serialization=True)"
        )
    raise ModelError(f"{folder}: no model.safetensors or {INDEX_NAME} found")


class ModelReader:
    """One input model folder: its tensors' headers and lazy reads of their data."""

    def __init__(
        self,
        folder: Path,
        label: str,
        root: Path | None = None,
        headers: dict[str, tuple[bytes, int]] | None = None,
    ):
        """``root``: the folder every file must resolve into (default ``folder``).
        ``headers``: each weight file's raw header and size, read elsewhere (from the Hub,
        without downloading the file): such a reader plans but cannot read tensor data."""
        self.folder = folder
        self.label = label
        self.root = root or folder
        if not folder.is_dir():
            raise ModelError(f"model '{label}': {folder} is not a folder")
        if headers is None:
            files, weight_map = weight_files(folder, self.root)
            # files follow the index's sorted file names (they may resolve to other names)
            names = sorted(set(weight_map.values())) if weight_map else [f.name for f in files]
            shards = [(name, read_header(path)) for name, path in zip(names, files, strict=True)]
        else:
            weight_map = read_weight_map(folder)
            shards = [
                (name, parse_header(folder / name, raw, size))
                for name, (raw, size) in headers.items()
            ]
        self.tensors, self.shadowed = combine_shards(folder, shards, weight_map)
        # The index's file of each tensor (None without an index), as read once here.
        self.weight_map = weight_map
        self.config = self._read_json("config.json")
        self._handles: dict[Path, int] = {}
        self._maps = MAPPING  # cleared where the file system refuses a mapping

    def _read_json(self, name: str) -> dict | None:
        path = self.folder / name
        if not path.exists():
            return None
        ensure_inside(path, self.root)
        value = load_json(path, MAX_CONFIG_BYTES, "a config")
        if not isinstance(value, dict):
            raise ModelError(f"{path}: expected a JSON object")
        _check_config_fields(path, value)
        return value

    def has_row_spans(self, name: str) -> bool:
        """Whether the rows of ``name`` lie in a file as ``read_rows`` returns them, so that a
        kernel may read them there itself (``row_span``, ``io.streamed_sum``); a dequantized
        weight's, a pickle's or an adapted weight's do not."""
        return True

    def computes(self, name: str) -> bool:
        """Whether the rows of ``name`` are computed rather than read as stored (a model with
        a LoRA adapter merged in, ``io.lora``): they arrive in float32, and have no span in a
        file."""
        return False

    def read(self, name: str) -> np.ndarray:
        """Read one tensor into a new array of its stored dtype and shape."""
        info = self.tensors[name]
        return self._read_bytes(info, 0, info.nbytes).reshape(info.shape)

    def read_rows(
        self, name: str, start: int, stop: int, pool: BufferPool | None = None
    ) -> np.ndarray:
        """Rows ``start:stop`` of a tensor seen as (shape[0], -1) (a 1-D or 0-D tensor is one
        row), read without touching the rest of it: rows are contiguous in the file. With a
        ``pool``, into one of its buffers."""
        info = self.tensors[name]
        if len(info.shape) <= 1:
            return self.read(name).reshape(1, -1)[start:stop]
        row_length = math.prod(info.shape[1:])
        if info.nbytes == 0:  # no rows, or rows of nothing: no bytes to read
            return np.empty((stop - start, row_length), dtype=NUMPY_DTYPES[info.dtype])
        row_bytes = info.row_bytes
        flat = self._read_bytes(info, start * row_bytes, (stop - start) * row_bytes, pool)
        return flat.reshape(stop - start, row_length)

    def row_span(self, name: str, start: int) -> FileSpan:
        """Where row ``start`` of a tensor (seen as in ``read_rows``) begins in its file, for a
        reader that reads the rows itself (``io.streamed_sum``)."""
        info = self.tensors[name]
        offset = info.offset + start * info.row_bytes
        return FileSpan(self._descriptor(info.path), offset, info.dtype, info.path, name)

    def _read_bytes(
        self, info: TensorInfo, begin: int, count: int, pool: BufferPool | None = None
    ) -> np.ndarray:
        descriptor = self._descriptor(info.path)
        if pool is not None and self._maps_block(info, begin, count, pool):
            try:
                mapped = mapped_bytes(descriptor, info.offset + begin, count)
            except FileTooShort:
                raise ModelError(f"{info.path}: ended early while reading '{info.name}'") from None
            if mapped is not None:
                return mapped.view(NUMPY_DTYPES[info.dtype])
            self._maps = False  # copied from now on
        offset = read_offset(info.offset + begin)
        buffer = pool.take(count, offset) if pool is not None else placed(count, offset)
        view = memoryview(buffer)
        done = 0
        while done < count:
            got = os.preadv(descriptor, [view[done:]], info.offset + begin + done)
            if got <= 0:
                raise ModelError(f"{info.path}: ended early while reading '{info.name}'")
            done += got
        return buffer.view(NUMPY_DTYPES[info.dtype])

    def _maps_block(self, info: TensorInfo, begin: int, count: int, pool: BufferPool) -> bool:
        """Whether a block read into ``pool`` is mapped rather than copied: enough bytes to
        gain, aligned to their dtype in the file (as the kernels take them), and placed where
        the pool's copies out of it are fast (``BufferPool.maps_well``)."""
        offset = info.offset + begin
        return (
            self._maps
            and count >= MAP_MIN_BYTES
            and offset % itemsize(info.dtype) == 0
            and pool.maps_well(offset)
        )

    def _descriptor(self, path: Path) -> int:
        """The open file ``path``; threads may ask at once, and all get the same descriptor."""
        descriptor = self._handles.get(path)
        if descriptor is None:
            opened = open_regular(path)
            descriptor = self._handles.setdefault(path, opened)
            if descriptor != opened:  # another thread opened it first
                os.close(opened)
        return descriptor

    def close(self) -> None:
        for descriptor in self._handles.values():
            os.close(descriptor)
        self._handles.clear()
