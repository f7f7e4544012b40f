"""``backends.cpu.shared_work.run_shared``: the first part on the calling thread, the others
on the helpers, results in order, and every helper waited for even where the caller fails."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from della_cli.backends.cpu.shared_work import run_shared


def test_parts_run_on_the_caller_and_the_helpers_in_order():
    def named(index):
        return lambda: (index, threading.current_thread().name)

    with ThreadPoolExecutor(2, thread_name_prefix="helper") as helpers:
        results = run_shared(helpers, [named(i) for i in range(3)])
    assert [index for index, _ in results] == [0, 1, 2]
    assert results[0][1] == threading.current_thread().name
    assert all(name.startswith("helper") for _, name in results[1:])
    assert run_shared(None, [named(0), named(1)]) == [
        (0, threading.current_thread().name),
        (1, threading.current_thread().name),
    ]


def test_a_failing_caller_still_waits_for_its_helpers():
    finished = []

    def slow():
        time.sleep(0.2)
        finished.append(True)

    def fail():
        raise RuntimeError("the caller's part")

    with ThreadPoolExecutor(1) as helpers:
        with pytest.raises(RuntimeError):
            run_shared(helpers, [fail, slow])
        assert finished == [True]  # the helper's part ended before the error came back
