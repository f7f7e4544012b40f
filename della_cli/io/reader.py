"""Lazy, validated access to the tensors of a model folder stored as safetensors.

A folder holds either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Headers are read and checked up front (cheap: JSON only), so a
plan can be made from shapes alone; tensor data is read on demand, one tensor at a time, with
positioned reads into a fresh buffer, as a numpy array of the stored dtype (see
``io.dtypes``). Reading instead of memory-mapping keeps the process's resident memory bounded by
the tensors in flight, whatever the model's size.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from della_cli.errors import ModelError, shown
from della_cli.io.bounded import (
    MAX_CONFIG_BYTES,
    MAX_HEADER_BYTES,
    MAX_INDEX_BYTES,
    MIB,
    MalformedJson,
    load_json,
    open_regular,
    parse_json,
    read_bounded,
)
from della_cli.io.buffers import BufferPool, placed, read_offset
from della_cli.io.dtypes import NUMPY_DTYPES, is_floating, itemsize
from della_cli.io.streamed_sum import FileSpan

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_INT64_MAX = 2**63 - 1
# Control characters in a name would break the one-line error messages that quote it.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from a safetensors header."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_floating(self) -> bool:
        return is_floating(self.dtype)

    @property
    def row_bytes(self) -> int:
        """Bytes per row of the tensor seen as (shape[0], -1); a 1-D or 0-D tensor is one row."""
        return self.nbytes // max(self.shape[0], 1) if len(self.shape) > 1 else self.nbytes


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header; raise ModelError naming the file."""
    descriptor = open_regular(path)
    try:
        with os.fdopen(descriptor, "rb") as handle:
            file_size = os.fstat(descriptor).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > MAX_HEADER_BYTES:
                raise ModelError(
                    f"{path}: header length {header_size} is over the {MAX_HEADER_BYTES // MIB} "
                    "MiB limit of safetensors; the file is corrupt or not safetensors"
                )
            if header_size > file_size - 8:
                raise ModelError(
                    f"{path}: header length {header_size} runs past the end of the file "
                    f"({file_size} bytes); the file is truncated or not safetensors"
                )
            raw = handle.read(header_size)
    except OSError as error:
        raise ModelError(f"{path}: cannot read ({error.strerror})") from error
    return parse_header(path, raw, file_size)


def parse_header(path: Path, raw: bytes, file_size: int) -> dict[str, TensorInfo]:
    """Validate the JSON header ``raw`` of a safetensors file of ``file_size`` bytes (read
    from disk, or from the Hub with range requests); raise ModelError naming the file."""
    header_size = len(raw)
    try:
        header = parse_json(raw, path, object_pairs_hook=_unique_keys(path))
    except MalformedJson as error:
        message = str(error).replace(": not valid JSON", ": safetensors header is not valid JSON")
        raise ModelError(message) from error
    if not isinstance(header, dict):
        raise ModelError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ModelError(f"{path}: __metadata__ must map strings to strings; the file is corrupt")
    data_start = 8 + header_size
    infos = {
        name: _tensor_info(path, name, entry, data_start, file_size)
        for name, entry in header.items()
    }
    _check_contiguous(path, infos.values(), data_start, file_size)
    return infos


def _unique_keys(path: Path):
    """A ``json`` object hook refusing a key given twice: safetensors keeps one of the two
    silently, so which tensor a name means would depend on the reader."""

    def build(pairs: list[tuple[str, object]]) -> dict:
        built = dict(pairs)
        if len(built) != len(pairs):
            seen: set[str] = set()
            twice = next(key for key, _ in pairs if key in seen or seen.add(key))
            raise ModelError(f"{path}: the header names {shown(twice)} twice; the file is corrupt")
        return built

    return build


def _tensor_info(path: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    def bad(reason: str) -> ModelError:
        return ModelError(f"{path}: tensor '{name}' {reason}; the file is corrupt")

    if _CONTROL.search(name):
        raise ModelError(f"{path}: tensor name {shown(name)} holds a control character")
    if not isinstance(entry, dict):
        raise bad("has a malformed header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in NUMPY_DTYPES:
        quantized = isinstance(dtype, str) and re.match(r"F[468]_|F4$|E8M0", dtype)
        hint = "; it is a quantized format, which della does not merge" if quantized else ""
        raise ModelError(f"{path}: tensor '{name}' has unsupported dtype {shown(dtype)}{hint}")
    if not (
        isinstance(shape, list) and all(type(d) is int and 0 <= d <= _INT64_MAX for d in shape)
    ):
        raise bad(f"has an invalid shape {shown(shape)} (dimensions are integers in int64)")
    _check_shape_bounds(bad, shape, size)
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise bad(f"has invalid data offsets {shown(offsets)}")
    begin, end = offsets
    expected = math.prod(shape) * itemsize(dtype)
    if end - begin != expected:
        raise bad(f"holds {end - begin} bytes but {dtype} {tuple(shape)} needs {expected}")
    if data_start + end > size:
        raise bad(f"runs past the end of the file ({data_start + end} > {size} bytes)")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin)


def _check_shape_bounds(bad, shape: list[int], file_size: int) -> None:
    """Refuse a shape that no file of ``file_size`` bytes can hold before anything loops over
    it: running products past int64 (the safetensors library refuses those too), and any
    dimension larger than the file itself, which only a tensor of zero elements could have
    (a 96-byte header with shape [2**62, 0] made `verify` loop for hours)."""
    product = 1
    for dimension in shape:
        product *= dimension
        if product > _INT64_MAX:
            raise bad(f"has a shape {shown(shape)} whose size overflows int64")
    largest = max(shape, default=0)
    if largest > file_size:
        raise bad(f"has a dimension of {largest}, larger than the file ({file_size} bytes)")


def _check_contiguous(path: Path, infos: object, data_start: int, file_size: int) -> None:
    """The tensors must tile the data exactly, as the safetensors library requires: no
    overlap, no hole before or between tensors, no byte after the last (hidden or stale
    data that one reader would ignore and another might not)."""
    spans = sorted((info.offset, info.offset + info.nbytes, info.name) for info in infos)
    previous_end, previous = data_start, None
    for begin, end, name in spans:
        if begin < previous_end:
            raise ModelError(f"{path}: tensors '{previous}' and '{name}' overlap; file is corrupt")
        if begin > previous_end:
            where = f"between '{previous}' and" if previous else "before"
            raise ModelError(
                f"{path}: {begin - previous_end} bytes {where} '{name}' belong to no tensor; "
                "the file is corrupt"
            )
        previous_end, previous = end, name
    if previous_end != file_size:
        raise ModelError(
            f"{path}: {file_size - previous_end} bytes after the last tensor belong to no "
            "tensor; the file is corrupt"
        )


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
        if _CONTROL.search(name) or _CONTROL.search(file_name) or not file_name:
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
        self.config = self._read_json("config.json")
        self._handles: dict[Path, int] = {}

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
        offset = read_offset(info.offset + begin)
        buffer = pool.take(count, offset) if pool is not None else placed(count, offset)
        view = memoryview(buffer)
        descriptor = self._descriptor(info.path)
        done = 0
        while done < count:
            got = os.preadv(descriptor, [view[done:]], info.offset + begin + done)
            if got <= 0:
                raise ModelError(f"{info.path}: ended early while reading '{info.name}'")
            done += got
        return buffer.view(NUMPY_DTYPES[info.dtype])

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
