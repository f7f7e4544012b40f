"""numba's cache forgets della's kernels when any source of the CPU backend changes
(``backends.cpu.cache_stamp``): a kernel inlines its rules from other modules, and numba's own
stamp covers only the file that defines it."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("numba")

from della_cli.backends.cpu import cache_stamp

KERNEL_MODULES = (
    "bits",
    "rules",
    "block",
    "select",
    "select_small",
    "sum_kernel",
    "spherical",
    "catalog_kernels",
    "nearswap",
)


def test_the_stamp_changes_with_any_source_of_the_package_and_nothing_else(tmp_path):
    for source in cache_stamp.PACKAGE.glob("*.py"):
        shutil.copy(source, tmp_path / source.name)
    first = cache_stamp.folder_stamp(tmp_path)
    assert cache_stamp.folder_stamp(tmp_path) == first
    (tmp_path / "notes.txt").write_text("not a source")
    assert cache_stamp.folder_stamp(tmp_path) == first
    rules = tmp_path / "rules.py"
    rules.write_text(rules.read_text() + "\n# a changed rule\n")
    assert cache_stamp.folder_stamp(tmp_path) != first
    (tmp_path / "new_kernel.py").write_text("")
    assert len({first, cache_stamp.folder_stamp(tmp_path)}) == 2
    assert cache_stamp.package_stamp() == cache_stamp.folder_stamp(cache_stamp.PACKAGE)


def test_every_cached_kernel_of_the_package_carries_the_package_stamp():
    from numba.core.dispatcher import Dispatcher

    kernels = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"della_cli.backends.cpu.{name}")
        for value in vars(module).values():
            if isinstance(value, Dispatcher) and value._cache._enabled:
                kernels.append(value)
    assert len(kernels) >= 20
    for kernel in kernels:
        locator = kernel._cache._impl._locator
        assert getattr(type(locator), "_della_stamped", False), kernel.py_func.__qualname__
        assert locator.get_source_stamp()[1] == cache_stamp.package_stamp()


def test_other_packages_kernels_keep_numbas_stamp(tmp_path):
    """A kernel outside the package is left to numba's own locators."""
    assert cache_stamp.install()
    from numba.core import caching

    ours = [c for c in caching.CacheImpl._locator_classes if getattr(c, "_della_stamped", 0)]
    assert len(ours) == 3
    elsewhere = tmp_path / "kernel.py"
    elsewhere.write_text("def f():\n    return 1\n")
    assert all(c.from_function(lambda: 1, str(elsewhere)) is None for c in ours)


PROBE = textwrap.dedent(
    """
    import sys
    import numpy as np
    from della_cli.backends.cpu import cache_stamp
    if sys.argv[1] == "changed":  # as if a rule the kernel inlines had been edited
        cache_stamp.package_stamp = lambda: "a changed rule"
    from della_cli.backends.cpu import catalog_kernels, warm
    cached = warm._cached_views(catalog_kernels.store, (1,))
    target = np.zeros(4, dtype=np.uint16)
    catalog_kernels.store(np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32), target)
    print(len(cached), target.tolist())
    """
)


def test_a_kernel_cached_under_other_sources_is_compiled_again(tmp_path):
    """Run in children that share a cache folder: the kernel is loaded from the cache while
    the package is the same, and compiled again (not loaded) once its sources differ."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}

    def probe(which: str) -> tuple[int, str]:
        result = subprocess.run(
            [sys.executable, "-c", PROBE, which],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=True,
        )
        cached, stored = result.stdout.strip().split(" ", 1)
        return int(cached), stored

    bf16 = "[16256, 49152, 16128, 16448]"  # 1, -2, 0.5, 3 as bfloat16 bits
    assert probe("same") == (0, bf16)  # compiled, and saved
    assert probe("same") == (1, bf16)  # loaded
    assert probe("changed") == (0, bf16)  # not loaded: compiled again
    assert Path(tmp_path / "cache").is_dir()
