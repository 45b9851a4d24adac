"""A decision's CPU budget (pattern_time_limit) counts the decision's own CPU time: the worker
threads of a network store, busy meanwhile, do not use it up."""

from __future__ import annotations

import gc
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


def test_a_garbage_collection_waits_until_the_decision_is_over() -> None:
    """A full collection of a big heap (a network store's remembered answers) can take longer
    than a budget: it runs after the decision, not inside it. The collection here is made
    slow by a callback that works for 0.2 s of CPU at its start."""
    collections = []

    def slow_start(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])
            until = time.thread_time() + 0.2
            while time.thread_time() < until:
                pass

    thresholds = gc.get_threshold()
    gc.callbacks.append(slow_start)
    gc.set_threshold(10)  # a collection after ten new objects
    try:
        budget = CpuBudget(0.05)
        with budget:
            before = len(collections)
            made = [[n] for n in range(100)]
            inside = len(collections) - before
        after = len(collections)
        made.append([])  # after the block, the collection happens
    finally:
        gc.callbacks.remove(slow_start)
        gc.set_threshold(*thresholds)
    assert inside == 0
    assert len(collections) > after
    assert gc.isenabled()
