"""The I/O floor of a merge: read every input byte, write the output's bytes, nothing else.

Run as its own process (``python bench/floor.py OUT_FILE OUT_BYTES INPUT...``) so that it is timed
exactly like the merge tools, Python start-up included. Reads are plain ``readinto`` calls into
one page-aligned 1 MiB buffer; the output is written from the same buffer and fsync'ed before
exit, with the write-back of each 64 MiB started as it is written (``posix_fadvise``), as
della's writer does: the fastest way to get the bytes onto the disk that either tool could use.

Where the buffer sits matters more than it seems. The kernel's copy between the page cache and
a process runs several times slower when the destination lies 1 to 32 bytes past the source
modulo 4 KiB (measured on the 2-core reference machine: 1.6-2.0 GB/s against 10-13 GB/s for
every other offset tried). A ``bytearray`` of 1 MiB or more starts 16 bytes into a page, so it
hits that case on every read from a page boundary: the ~250M model's four inputs (2.17 GB) took
0.9-1.4 s to read into one, and 0.18-0.20 s into a page-aligned buffer. Floors measured before
this change (a 16 MiB ``bytearray``) are not comparable with later ones.
"""

from __future__ import annotations

import mmap
import os
import sys

BUFFER_BYTES = 2**20
WRITEBACK_BYTES = 64 * 2**20


def read_all(paths: list[str], buffer: bytearray | mmap.mmap) -> int:
    view, total = memoryview(buffer), 0
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(view):
                total += count
    return total


def write_bytes(path: str, size: int, buffer: bytearray | mmap.mmap) -> None:
    view = memoryview(buffer)
    with open(path, "wb", buffering=0) as handle:
        written = started = dropped = 0
        while written < size:
            written += handle.write(view[: min(size - written, len(view))])
            if hasattr(os, "posix_fadvise") and written - started >= WRITEBACK_BYTES:
                fadvise = os.posix_fadvise
                fadvise(handle.fileno(), dropped, written - dropped, os.POSIX_FADV_DONTNEED)
                dropped, started = started, written
        os.fsync(handle.fileno())


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: floor.py OUT_FILE OUT_BYTES INPUT...", file=sys.stderr)
        return 2
    out, size, inputs = argv[0], int(argv[1]), argv[2:]
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    buffer = mmap.mmap(-1, BUFFER_BYTES)  # anonymous memory: page-aligned
    read = read_all(inputs, buffer)
    write_bytes(out, size, buffer)
    print(f"read {read} bytes, wrote {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
