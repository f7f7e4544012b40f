"""The header of one safetensors file, parsed and held to the format's rules.

A header is JSON from a file della did not write, read before any tensor: it must be at least
as strict as the safetensors library (``safetensors.safe_open``), which refuses holes between
tensors, bytes after the last, offsets that do not match a shape, and shapes whose size
overflows. della also refuses a name given twice (the library keeps one silently), control
characters in names, and any dimension larger than the file: a 96-byte header promising
2**62 rows of nothing made ``della verify`` loop over them for hours.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from della_cli.errors import ModelError, shown
from della_cli.io.bounded import MAX_HEADER_BYTES, MIB, MalformedJson, open_regular, parse_json
from della_cli.io.dtypes import NUMPY_DTYPES, is_floating, itemsize

_INT64_MAX = 2**63 - 1
# Control characters in a name would break the one-line error messages that quote it.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


def _unique_keys(path: Path) -> Callable[[list[tuple[str, object]]], dict]:
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

    if CONTROL.search(name):
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


def _check_shape_bounds(bad: Callable[[str], ModelError], shape: list[int], file_size: int) -> None:
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


def _check_contiguous(
    path: Path, infos: Iterable[TensorInfo], data_start: int, file_size: int
) -> None:
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
