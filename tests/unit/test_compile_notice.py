"""The first merge after install waits for numba to compile; it says so, once, and a merge
whose kernels load from the cache says nothing."""

from __future__ import annotations

import numba
import numpy as np

from della_cli.backends.cpu import COMPILE_NOTICE, compile_notice


def test_a_compilation_is_announced_once():
    said: list[str] = []

    @numba.njit
    def double(values):
        return values * 2

    @numba.njit
    def triple(values):
        return values * 3

    with compile_notice(said.append):
        double(np.ones(3))
        triple(np.ones(3))  # a second compilation: no second notice
    assert said == [COMPILE_NOTICE]


def test_kernels_already_compiled_say_nothing():
    @numba.njit
    def halve(values):
        return values / 2

    halve(np.ones(3))
    said: list[str] = []
    with compile_notice(said.append):
        halve(np.ones(3))
    assert said == []


def test_the_notice_is_only_listened_for_while_it_runs():
    said: list[str] = []
    with compile_notice(said.append):
        pass

    @numba.njit
    def negate(values):
        return -values

    negate(np.ones(3))
    assert said == []
