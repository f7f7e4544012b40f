"""numba's cache made to forget a kernel when any rule it was built from changes.

numba keeps a compiled kernel on disk under a stamp of the one source file that defines it
(a hash of that file in numba 0.68). The CPU backend's kernels inline their rules from other
modules (``rules.store_row`` into the block kernel, ``select``'s digit choice into
``select_small``, ...), so after an upgrade, or a checkout, that changes ``rules.py`` alone,
numba would load the block kernel compiled with the old rounding and the merge would give
other bytes than the torch reference without a word. Here della's kernels get a stamp of every
source file of this package together: any change to any of them compiles every kernel again
(once; about 10 s, beside the merge: ``warm``). Kernels of other packages keep numba's stamp.

This uses numba's cache locators (``numba.core.caching``), an internal interface; where it
differs (another numba), kernels keep numba's own stamp, as before.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def folder_stamp(folder: Path) -> str:
    """A hash of the names and contents of every Python source in ``folder``, in name order."""
    digest = hashlib.sha256()
    for source in sorted(folder.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def package_stamp() -> str:
    """The CPU backend's ``folder_stamp`` (read once a process: an installed package does not
    change under a running merge)."""
    return folder_stamp(PACKAGE)


def _is_ours(py_file: str) -> bool:
    try:
        return Path(py_file).resolve().parent == PACKAGE
    except (OSError, TypeError, ValueError):
        return False


def _stamped(locator: type) -> type:
    """``locator`` for this package's kernels only, its stamp joined with the package's."""

    class PackageStamped(locator):
        @classmethod
        def from_function(cls, py_func, py_file):
            if not _is_ours(py_file):
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return (super().get_source_stamp(), package_stamp())

    PackageStamped.__name__ = PackageStamped.__qualname__ = f"DellaStamped{locator.__name__}"
    return PackageStamped


def install() -> bool:
    """Put the stamped locators first in numba's list, once; whether they are in place.
    Must run before the first kernel of this package is decorated (``rules`` calls it)."""
    try:
        from numba.core import caching

        locators = caching.CacheImpl._locator_classes
        if any(getattr(c, "_della_stamped", False) for c in locators):
            return True
        ours = []
        for name in ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator"):
            stamped = _stamped(getattr(caching, name))
            stamped._della_stamped = True
            ours.append(stamped)
        locators[:0] = ours
        return True
    except (ImportError, AttributeError, TypeError):  # another numba: its own stamps
        return False
