"""A decision's CPU budget (pattern_time_limit) counts the decision's own CPU time: the worker
threads of a network store, busy meanwhile, do not use it up."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from policyd.budget import CpuBudget, OutOfTime


def test_a_decision_that_runs_too_long_is_cut_off() -> None:
    with pytest.raises(OutOfTime), CpuBudget(0.05):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pass


def test_other_threads_do_not_use_up_the_budget() -> None:
    stop = threading.Event()

    def burn() -> None:  # CPU without the GIL: hashlib releases it for big buffers
        data = b"x" * (4 << 20)
        while not stop.is_set():
            hashlib.sha256(data).digest()

    worker = threading.Thread(target=burn)
    worker.start()
    began = time.process_time()
    try:
        with CpuBudget(0.05):
            # This thread waits, using no CPU, until the process has used four budgets.
            deadline = time.monotonic() + 20
            while time.process_time() - began < 0.2:
                assert time.monotonic() < deadline, "the other thread got no CPU"
                stop.wait(0.01)
    finally:
        stop.set()
        worker.join()
