"""The weighted-sum kernel (``sum_entries``) of ``weighted_sum``: numba, built from ``rules``.

The inputs arrive as addresses (``pointers``), base first, with their dtypes as kinds
(``weighted_sum.KINDS``): one compilation per output dtype serves every expert count and every
mix of bfloat16 and float32 inputs, and inputs all of one dtype, the common case, get loops of
their own without a branch per input. Each piece of ``PIECE`` entries is merged in a few
branch-free loops that vectorize: the base widened (``rules.widen_row``), each expert's term
added to the float32 sums as its entries are widened (``rules.widen``), then the division, the
lambda, the base and the rounding (``rules.store_row``); the sums stay in L1.
"""

from __future__ import annotations

import numpy as np

from della_cli.backends.cpu import rules
from della_cli.backends.cpu.pointers import pointer_like

try:
    import numba
    from numba.core import types
    from numba.extending import overload
except ImportError:  # pragma: no cover - exercised only where numba is not installed
    numba = None

# Entries merged at a time: their float32 sums (4 KiB) stay in L1 while every expert is added.
PIECE = 1024
BFLOAT16_KIND = 0  # as ``weighted_sum.KINDS``; float32 is 1

if numba is not None:

    def _widen_input(address, stored, index, entries, start, stop, target, halves, singles):
        """Entries ``start:stop`` of input ``index`` (``entries`` long, at ``address``) widened
        into ``target``. ``stored``: every input's kind (int64), or an array of the one dtype
        of every input, so that the common case compiles without a branch per input."""

    @overload(_widen_input, inline="always")
    def _widen_input_impl(address, stored, index, entries, start, stop, target, halves, singles):
        if stored.dtype == types.int64:  # inputs of both kinds

            def widen_either(address, stored, index, entries, start, stop, target, halves, singles):
                if stored[index] == BFLOAT16_KIND:
                    source = numba.carray(pointer_like(address, halves), entries)
                    rules.widen_row(source[start:stop], target)
                else:
                    source = numba.carray(pointer_like(address, singles), entries)
                    rules.widen_row(source[start:stop], target)

            return widen_either

        def widen_one(address, stored, index, entries, start, stop, target, halves, singles):
            rules.widen_row(
                numba.carray(pointer_like(address, stored), entries)[start:stop], target
            )

        return widen_one

    @numba.njit(cache=True, inline="always")
    def _accumulate(source, sums, base, weight, on_deltas, first):
        """``sums`` plus the term of the stored entries ``source`` (see ``_add_term``)."""
        size = sums.shape[0]
        if on_deltas and first:
            for i in range(size):
                sums[i] = np.float32(0.0) + (rules.widen(source[i]) - base[i]) * weight
        elif on_deltas:
            for i in range(size):
                sums[i] = sums[i] + (rules.widen(source[i]) - base[i]) * weight
        elif first:
            for i in range(size):
                sums[i] = np.float32(0.0) + rules.widen(source[i]) * weight
        else:
            for i in range(size):
                sums[i] = sums[i] + rules.widen(source[i]) * weight

    def _add_term(
        address,
        stored,
        index,
        entries,
        start,
        sums,
        base,
        weight,
        on_deltas,
        first,
        halves,
        singles,
    ):
        """Add input ``index``'s term to the piece's ``sums``: (x - base) * w on deltas, else
        x * w, each entry widened as it is read; the ``first`` term is added to +0."""

    @overload(_add_term, inline="always")
    def _add_term_impl(
        address,
        stored,
        index,
        entries,
        start,
        sums,
        base,
        weight,
        on_deltas,
        first,
        halves,
        singles,
    ):
        if stored.dtype == types.int64:  # inputs of both kinds

            def add_either(
                address,
                stored,
                index,
                entries,
                start,
                sums,
                base,
                weight,
                on_deltas,
                first,
                halves,
                singles,
            ):
                stop = start + sums.shape[0]
                if stored[index] == BFLOAT16_KIND:
                    source = numba.carray(pointer_like(address, halves), entries)[start:stop]
                    _accumulate(source, sums, base, weight, on_deltas, first)
                else:
                    source = numba.carray(pointer_like(address, singles), entries)[start:stop]
                    _accumulate(source, sums, base, weight, on_deltas, first)

            return add_either

        def add_one(
            address,
            stored,
            index,
            entries,
            start,
            sums,
            base,
            weight,
            on_deltas,
            first,
            halves,
            singles,
        ):
            source = numba.carray(pointer_like(address, stored), entries)[
                start : start + sums.shape[0]
            ]
            _accumulate(source, sums, base, weight, on_deltas, first)

        return add_one

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def sum_entries(inputs, kinds, weights, on_deltas, divide, divisor, lam, out, flags):
        """The weighted sum of ``out.shape[0]`` entries of the inputs at the addresses
        ``inputs`` (base first, then the experts; of the ``kinds``) into ``out``, rounded to
        its dtype. ``flags[s]`` is set where input ``s`` holds a NaN or an Inf."""
        halves = np.empty(0, dtype=np.uint16)  # the element types of the two kinds
        singles = np.empty(0, dtype=np.float32)
        uniform = True
        for s in range(1, kinds.shape[0]):
            uniform = uniform and kinds[s] == kinds[0]
        # the base of a linear merge is checked on its own, unless it is one of the experts
        check_base = not on_deltas
        for t in range(1, inputs.shape[0]):
            check_base = check_base and inputs[t] != inputs[0]
        settings = (weights, on_deltas, divide, divisor, lam, check_base)
        if uniform and kinds[0] == BFLOAT16_KIND:
            _sum_pieces(inputs, halves, settings, out, flags, halves, singles)
        elif uniform:
            _sum_pieces(inputs, singles, settings, out, flags, halves, singles)
        else:
            _sum_pieces(inputs, kinds, settings, out, flags, halves, singles)

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def _sum_pieces(inputs, stored, settings, out, flags, halves, singles):
        """``sum_entries``, piece by piece (``stored``: as ``_widen_input`` takes it).

        A NaN or an Inf in any input makes the float32 result non-finite wherever it sits
        (every operation propagates it: x - Inf, Inf * w with w = 0, Inf + -Inf, Inf / D,
        Inf * lambda), except the base of a linear merge, which the result does not contain
        and which is checked on its own. So the inputs are searched only in a piece whose
        result is not finite: rare, and then every input is searched, as finite inputs may
        also overflow."""
        weights, on_deltas, divide, divisor, lam, check_base = settings
        entries = out.shape[0]
        reference = np.empty(PIECE, dtype=np.float32)
        total = np.empty(PIECE, dtype=np.float32)
        widened = np.empty(PIECE, dtype=np.float32)
        for start in range(0, entries, PIECE):
            stop = min(start + PIECE, entries)
            size = stop - start
            base, sums, values = reference[:size], total[:size], widened[:size]
            if on_deltas or check_base:
                _widen_input(inputs[0], stored, 0, entries, start, stop, base, halves, singles)
            if inputs.shape[0] == 1:
                for i in range(size):
                    sums[i] = np.float32(0.0)
            for t in range(1, inputs.shape[0]):
                weight = weights[t - 1]
                _add_term(
                    inputs[t],
                    stored,
                    t,
                    entries,
                    start,
                    sums,
                    base,
                    weight,
                    on_deltas,
                    t == 1,
                    halves,
                    singles,
                )
            if divide:
                for i in range(size):
                    sums[i] = sums[i] / divisor
            if on_deltas:
                if lam != np.float32(1.0):
                    for i in range(size):
                        sums[i] = sums[i] * lam
                for i in range(size):
                    sums[i] = base[i] + sums[i]
            if rules.has_nonfinite(sums):
                for s in range(inputs.shape[0]):
                    _widen_input(
                        inputs[s], stored, s, entries, start, stop, values, halves, singles
                    )
                    if rules.has_nonfinite(values):
                        flags[s] = True
            elif check_base and rules.has_nonfinite(base):
                flags[0] = True
            rules.store_row(sums, out[start:stop])
