"""glibc's malloc told to keep the memory a merge frees for its next allocation.

torch's operations allocate a fresh result each (arcee_fusion's importance: eight a chunk,
a MiB each at 256K entries). By default glibc gives a freed run at the top of its heap back to
the kernel once it passes a threshold that adapts to the allocations seen, so each chunk's
results were faulted in and zeroed anew: at ~1.1B, arcee_fusion took 158K page faults, half of
them there, most on the merging thread, which bounds the merge. Fixed thresholds
(``mallopt``) keep up to ``TRIM_BYTES`` free at the heap's top and send an allocation of
``MMAP_BYTES`` or more to a mapping of its own, returned at once when freed, as before: the
large buffers of the merge stay off the heap, and what the heap keeps is bounded.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt's parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_BYTES = 64 << 20
MMAP_BYTES = 4 << 20

_done = False


def keep_freed_memory() -> bool:
    """Set glibc's thresholds once per process; whether they are set (False elsewhere than
    glibc, whose allocators are left as they are)."""
    global _done
    if _done:
        return True
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_BYTES)
    )
    return _done
