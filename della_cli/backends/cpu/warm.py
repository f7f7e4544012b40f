"""Compiling the numba kernels beside a merge instead of in its way (issue 15).

numba compiles a kernel the first time it is called with a new type of arguments and caches
the machine code (``ensure_numba_cache``); after install, the first merge that used the block
kernel and the TIES selection waited about 12 s for that on the 2-core reference machine (and
the weighted sum of task arithmetic and linear a few seconds more). Now
the engine asks first whether the kernels its plan needs are cached (``missing``); if not, a
child process compiles them (``start``, which runs this module) while the merge goes on with
the torch reference, which gives the same bytes (``tests/unit/test_backends.py``), and the
jobs that start after the child has finished load the compiled kernels from the cache.

``python -m della_cli.backends.cpu.warm`` compiles every kernel for bfloat16 and float32
inputs and outputs (the weighted sum is compiled per output dtype: its inputs' dtypes are
arguments), once after install (or as part of an image build), so that no merge runs on the
reference for want of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

from della_cli.backends.cpu import ensure_numba_cache

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, at worst two children compile
    fcntl = None

# Every dtype pair of inputs and output the block kernel takes (``block._KERNEL_VIEWS``).
DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype(np.float32)}
# ``cpu/nearswap`` reads and writes float16 too (``kernels.ENTRYWISE_DTYPES``).
ENTRYWISE_DTYPES = {**DTYPES, "F16": np.dtype(np.float16)}
# Held by the compiling child, so that merges started meanwhile wait for it.
_UID = os.getuid() if hasattr(os, "getuid") else "user"
LOCK = Path(tempfile.gettempdir()) / f"della-numba-compiling-{_UID}.lock"


def missing(
    pairs: set[tuple[str, str]],
    selects: set[str],
    sums: set[str] = frozenset(),
    catalog: set[tuple[str, str]] = frozenset(),
) -> bool:
    """Whether a kernel for any of these (input, output) dtype pairs of the block kernel, of
    the TIES selection of these input dtypes, of the weighted sum into these output dtypes, or
    of these (input, output) pairs of the catalog methods' kernels (``spherical``,
    ``catalog_kernels``), is not in numba's cache."""
    from della_cli.backends.cpu import block, select, select_small, spherical, sum_kernel

    if catalog and catalog_missing(frozenset(catalog)):
        return True

    pairs = {(a, b) for a, b in pairs if a in DTYPES and b in DTYPES}
    selects = {a for a in selects if a in DTYPES}
    merges = _cached_views(block._merge_rows, (0, -2))
    pivots = _cached_views(select._pivots, (0,))
    marks = _cached_views(select._mark, (0,)) & _cached_views(select._count_in_parallel, (0,))
    marks &= _cached_views(select_small._select_experts, (1,))  # (1,): the base's
    views = {name: block._KERNEL_VIEWS[dtype] for name, dtype in DTYPES.items()}
    wanted = {(str(np.dtype(views[a])), str(np.dtype(views[b]))) for a, b in pairs}
    chosen = {(str(np.dtype(views[a])),) for a in selects}
    summed = {(str(np.dtype(views[a])),) for a in sums if a in DTYPES}
    added = _cached_views(sum_kernel.sum_entries, (-2,))
    catalog = {(a, b) for a, b in catalog if a in DTYPES and b in DTYPES}
    combined = {(str(np.dtype(views[a])), str(np.dtype(views[b]))) for a, b in catalog}
    grams = {(str(np.dtype(views[a])),) for a, _ in catalog}
    ready = combined <= _cached_views(spherical._combine_rows, (0, -2)) and grams <= (
        _cached_views(spherical._gram_rows, (0,))
    )
    return not (
        wanted <= merges and chosen <= pivots and chosen <= marks and summed <= added and ready
    )


def catalog_missing(pairs: frozenset) -> bool:
    """Whether a kernel of ``backends.cpu.catalog`` or ``nearswap`` for these (input, output)
    pairs is not in numba's cache: nearswap's passes per pair (float16 too), ``widen`` per input
    dtype, the fusions per output dtype, the rest (float32 only) at all."""
    from della_cli.backends.cpu import block, catalog_kernels, nearswap

    entrywise = {name: str(np.dtype(nearswap.VIEWS[d])) for name, d in ENTRYWISE_DTYPES.items()}
    combined = {(entrywise[a], entrywise[b]) for a, b in pairs if a in entrywise and b in entrywise}
    for kernel in (nearswap._nearswap_span, nearswap._nearswap_spans):
        if not combined <= _cached_views(kernel, (0, -2)):
            return True
    views = {name: str(np.dtype(block._KERNEL_VIEWS[dtype])) for name, dtype in DTYPES.items()}
    pairs = {(a, b) for a, b in pairs if a in views and b in views}
    if not pairs:
        return False  # float16: nearswap alone
    inputs = {(views[a],) for a, _ in pairs}
    outputs = {(views[b],) for _, b in pairs}
    if not inputs <= _cached_views(catalog_kernels.widen, (0,)):
        return True
    for fuse in (catalog_kernels.sce_fuse, catalog_kernels.ram_fuse, catalog_kernels.arcee_fuse):
        if not outputs <= _cached_views(fuse, (-1,)):
            return True
    float32_only = (
        catalog_kernels.subtract_base,
        catalog_kernels.sce_keys,
        catalog_kernels.top_digits,
        catalog_kernels.low_digits,
        catalog_kernels.top_rank_keep,
        catalog_kernels.masked_squares,
        catalog_kernels.ram_counts,
        catalog_kernels.float_keys,
    )
    return any(not _cached_views(kernel, ()) for kernel in float32_only)


def _cached_views(dispatcher, positions: tuple[int, ...]) -> set[tuple[str, ...]]:
    """The element types, at ``positions`` of the arguments, of the signatures numba's cache
    holds for ``dispatcher`` and would load (an index left by other sources is not loaded)."""
    try:
        index = dispatcher._cache._cache_file._load_index()
        return {tuple(str(key[0][p].dtype) for p in positions) for key in index}
    except Exception:  # numba's cache internals: where they differ, compile as before
        return set()


def start(
    pairs: set[tuple[str, str]],
    selects: set[str],
    sums: set[str] = frozenset(),
    catalog: set[tuple[str, str]] = frozenset(),
) -> subprocess.Popen | OtherCompiler:
    """Compile these kernels in a child process of low priority, which outlives the merge if
    it must (the cache is for the next merge too); where another merge's child is compiling
    (it holds ``LOCK``), wait for that one instead of compiling the same kernels twice."""
    if _held(LOCK):
        return OtherCompiler()
    ensure_numba_cache()  # the child inherits the cache folder
    words = [f"{a}:{b}" for a, b in sorted(pairs)] + [f"select:{a}" for a in sorted(selects)]
    words += [f"sum:{a}" for a in sorted(sums)]
    words += [f"catalog:{a}:{b}" for a, b in sorted(catalog)]
    return subprocess.Popen(
        [sys.executable, "-m", "della_cli.backends.cpu.warm", *words],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # an interrupted merge leaves it to finish
    )


class OtherCompiler:
    """Another process's compilation, seen as a child's: ``poll`` is None while it runs."""

    def poll(self) -> int | None:
        return None if _held(LOCK) else 0


def _held(path: Path) -> bool:
    """Whether another process holds the lock at ``path`` (never, where locks are unknown)."""
    if fcntl is None:
        return False
    try:
        with open(path, "a") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(file, fcntl.LOCK_UN)
    except OSError:
        return False
    return False


def warm(
    pairs: set[tuple[str, str]],
    selects: set[str],
    sums: set[str] = frozenset(),
    catalog: set[tuple[str, str]] = frozenset(),
) -> None:
    """Call each kernel once, so that numba compiles and caches it: the block kernel for each
    (input, output) dtype pair, the TIES selection for each input dtype, the weighted sum for
    each output dtype, the catalog methods' kernels for each (input, output) pair."""
    from della_cli.backends.cpu import block, select, select_small, weighted_sum

    for name, out_name in sorted(catalog):
        if name in ENTRYWISE_DTYPES and out_name in ENTRYWISE_DTYPES:
            warm_nearswap(ENTRYWISE_DTYPES[name], ENTRYWISE_DTYPES[out_name])
    catalog = {(a, b) for a, b in catalog if a in DTYPES and b in DTYPES}
    for name, out_name in sorted(catalog):
        warm_catalog(DTYPES[name], DTYPES[out_name])

    rng = np.random.default_rng(0)
    plans = [
        block.ExpertPlan(block.MAGPRUNE, 0.5, 0.1, 1.0, (1, 2, 3)),
        block.ExpertPlan(block.MASK, 1.0, 0.0, 0.5),
    ]
    masks = [np.ones((4, 8), dtype=np.bool_)] * 2

    def inputs(name: str) -> tuple[np.ndarray, np.ndarray]:
        values = rng.standard_normal((2, 4, 8))
        return values[0].astype(DTYPES[name]), values[1].astype(DTYPES[name])

    for name in sorted(sums):
        expert, base = inputs("BF16")
        spec = weighted_sum.WeightedSum((1.0, 0.5), True, True, 0.5)
        weighted_sum.merge_block(base, [expert, expert], spec, DTYPES[name])
    for name in sorted(selects):
        expert, base = inputs(name)
        select.window_keep_mask(expert, base, 3, 20)
        large = rng.standard_normal((2, 4 * select._CHUNK)).astype(DTYPES[name])
        select.window_keep_mask(large[0], large[1], 3, 20)  # counted in parallel: 2+ chunks
        select_small.window_keep_masks([expert, expert], base, [(3, 20), (0, 32)])
    for name, out_name in sorted(pairs):
        expert, base = inputs(name)
        block.merge_block(
            base,
            [expert, expert],
            plans,
            masks,
            start=0,
            rescale=True,
            on_deltas=True,
            consensus=True,
            normalize=True,
            lambda_=1.0,
            out_dtype=DTYPES[out_name],
        )
    for name, out_name in sorted(catalog):
        warm_spherical(DTYPES[name], DTYPES[out_name])


def load(
    pairs: set[tuple[str, str]],
    selects: set[str],
    sums: set[str],
    methods: set[tuple[str, str, str]],
) -> None:
    """Call once, in this process, the cached kernels a merge's jobs run: those ``warm``
    calls for ``pairs``, ``selects`` and ``sums``, and per (catalog method, input, output)
    of ``methods`` that method's own (numba loads a kernel at its first call: 0.3 s for
    model_stock's two, 1.5 s for every catalog kernel of one dtype pair)."""
    warm(pairs, selects, sums)
    for method, name, out_name in sorted(methods):
        if method == "nearswap" and {name, out_name} <= ENTRYWISE_DTYPES.keys():
            warm_nearswap(ENTRYWISE_DTYPES[name], ENTRYWISE_DTYPES[out_name])
        elif {name, out_name} <= DTYPES.keys() and method in SELECTING_METHODS:
            warm_catalog(DTYPES[name], DTYPES[out_name], (method,))
        elif {name, out_name} <= DTYPES.keys() and method in SPHERICAL_METHODS:
            warm_spherical(DTYPES[name], DTYPES[out_name])


# The catalog methods whose kernels ``warm_catalog`` calls, and those ``warm_spherical``'s.
SELECTING_METHODS = ("sce", "ram", "ramplus_tl", "arcee_fusion")
SPHERICAL_METHODS = ("slerp", "nuslerp", "multislerp", "karcher", "model_stock")


def warm_catalog(
    dtype: np.dtype, out_dtype: np.dtype, methods: tuple[str, ...] = SELECTING_METHODS
) -> None:
    """The catalog kernels (``backends.cpu.catalog``) of ``methods`` (sce, ram, ramplus_tl,
    arcee_fusion; default all) on a small block of ``dtype`` inputs written as ``out_dtype``."""
    from della_cli.backends.cpu import arcee, catalog, catalog_select

    rng = np.random.default_rng(0)
    loaded = [rng.standard_normal((4, 8)).astype(dtype) for _ in range(3)]
    out = np.empty((4, 8), dtype=out_dtype)
    if "sce" in methods or "arcee_fusion" in methods:
        radix = np.arange(catalog_select.PARTITION_BELOW, dtype=np.uint32)  # 16-bit digits
        catalog_select.select_kept(radix, [7])
    if "sce" in methods:
        state = catalog.sce_prepare(0.5, lambda: iter([loaded]), 32, (4, 8))
        catalog.sce_apply(state, loaded, out)
    if "ramplus_tl" in methods:
        values = {"epsilon": 1e-5, "r": 0.1, "alpha": 0.2}
        lambdas = catalog.ramplus_tl_prepare(values, lambda: iter([loaded]), 2)
        catalog.ram_apply(lambdas, 1e-5, loaded, out)
    if "ram" in methods:
        catalog.ram_apply(None, 1e-5, loaded, out)
    if "arcee_fusion" in methods:
        state = arcee.arcee_fusion_prepare(lambda: iter([loaded[:2]]), 32, (4, 8))
        arcee.arcee_fusion_apply(state, loaded[:2], 0, out)


def warm_spherical(dtype: np.dtype, out_dtype: np.dtype) -> None:
    """The Gram and weighted-sum kernels of slerp, nuslerp, multislerp, karcher and
    model_stock (``spherical``) for ``dtype`` inputs written as ``out_dtype``."""
    from della_cli.backends.cpu import spherical

    rng = np.random.default_rng(0)
    expert, base = rng.standard_normal((2, 4, 8)).astype(dtype)
    spherical.gram_rows(base, [expert, expert], subtract=True)
    spherical.combine_rows(
        base,
        [expert, expert],
        np.ones((1, 2), dtype=np.float32),
        mode=spherical.SUM,
        subtract=True,
        add_reference=True,
        out_dtype=out_dtype,
    )


def warm_nearswap(dtype: np.dtype, out_dtype: np.dtype) -> None:
    """``cpu/nearswap`` on ``dtype`` inputs written as ``out_dtype``: a block of one span (on
    the calling thread) and one of two (in parallel)."""
    from della_cli.backends.cpu import nearswap

    rng = np.random.default_rng(0)
    for size in (8, nearswap.SPAN + 1):
        base, other = rng.standard_normal((2, size)).astype(dtype)
        nearswap.nearswap_block(base, other, 0.1, out_dtype)


def main(words: list[str]) -> None:
    """``warm.py [IN:OUT ...] [select:IN ...] [sum:OUT ...] [catalog:IN:OUT ...]``; with no
    words, every kernel."""
    if not words:
        words = [f"{a}:{b}" for a in DTYPES for b in DTYPES]
        words += [f"{kind}:{a}" for kind in ("select", "sum") for a in DTYPES]
        words += [f"catalog:{a}:{b}" for a in ENTRYWISE_DTYPES for b in ENTRYWISE_DTYPES]
    pairs = {tuple(w.split(":")) for w in words if ":" in w and w.split(":")[0] in DTYPES}
    selects = {w.split(":")[1] for w in words if w.startswith("select:")}
    sums = {w.split(":")[1] for w in words if w.startswith("sum:")}
    catalog = {tuple(w.split(":")[1:]) for w in words if w.startswith("catalog:")}
    ensure_numba_cache()
    with open(LOCK, "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held while compiling; released at exit
        warm(pairs, selects, sums, catalog)  # type: ignore[arg-type]


if __name__ == "__main__":
    if hasattr(os, "nice"):
        os.nice(10)  # beside a merge: the merge first
    main(sys.argv[1:])
