"""How many entries a magnitude selection keeps, from the decimals the user wrote.

Plain integer arithmetic, shared by the planner (memory estimates), the torch selection and the
compiled one, so all three agree to the entry.
"""

from __future__ import annotations

import functools
from fractions import Fraction


def fraction_count(fraction: float, numel: int) -> int:
    """⌊fraction·N⌋ on the decimal the user wrote: 0.29 of 100 is 29, where float
    multiplication gives 28.999999999999996 and would keep one entry too few."""
    numerator, denominator = _decimal_ratio(fraction)
    return (numerator * numel) // denominator


@functools.lru_cache(maxsize=256)
def _decimal_ratio(fraction: float) -> tuple[int, int]:
    """The decimal ``repr(fraction)`` as an exact ratio (made once per value: a plan asks for
    each of a mixture-of-experts model's 30,000 tensors)."""
    exact = Fraction(repr(fraction))
    return exact.numerator, exact.denominator


def magnitude_rank_window(numel: int, density: float, gamma: float | None) -> tuple[int, int]:
    """The stable ascending magnitude ranks ``[low, high)`` a trim keeps: TIES (``gamma``
    None) the top ⌊d·N⌋; breadcrumbs the ⌊d·N⌋ (at most) below the ⌊γN⌋ largest."""
    if gamma is None:
        return numel - fraction_count(density, numel), numel
    top_count = fraction_count(gamma, numel)
    keep_count = min(fraction_count(density, numel), numel - top_count)
    return numel - top_count - keep_count, numel - top_count
