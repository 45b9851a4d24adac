"""A bound on the CPU time one decision may take, so no pattern can stall the daemon.

A backtracking regular expression can take seconds on a crafted 27-character address, and
any logged-in user chooses the sender. Python's ``re`` cannot be given a step limit, but it
checks for signals every few thousand steps (CPython's _sre, MAYBE_CHECK_SIGNALS), so a
signal handler that raises stops a match that runs too long. The timer counts this process's
CPU time (ITIMER_PROF): a machine that pauses the process does not cut off a healthy match.
That includes other threads (a network store's workers), so when it fires the handler looks
at the deciding thread's own CPU time and, if the decision has not used its budget itself,
sets the timer again for what is left. Automatic garbage collection waits until the block is
over: a full collection of a big heap (remembered answers and decisions) takes longer than a
decision's budget, and is not the decision's doing.

Postfix bounds PCRE with a match limit and then treats the rule as not matching; policyd
answers a temporary failure instead (README "Differences from Postfix"), so a cut-off match
never decides a verdict.
"""

from __future__ import annotations

import gc
import signal
import threading
import time
from types import FrameType, TracebackType


class OutOfTime(Exception):
    """The decision used up its CPU time; raised from inside whatever was running."""


class CpuBudget:
    """``with budget:`` runs its block with at most ``seconds`` of CPU time.

    Only on the main thread (signals are delivered there); elsewhere, and with ``seconds``
    0, the block runs unbounded. Not reentrant: one decision at a time runs on the loop.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._armed = False
        self._installed = False
        self._started = 0.0  # the main thread's CPU time when the block began
        self._collecting = False  # automatic garbage collection was on before the block

    def __enter__(self) -> None:
        if self.seconds <= 0 or threading.current_thread() is not threading.main_thread():
            return
        if not self._installed:
            signal.signal(signal.SIGPROF, self._expired)
            self._installed = True
        self._armed = True
        self._collecting = gc.isenabled()
        gc.disable()
        self._started = time.thread_time()
        signal.setitimer(signal.ITIMER_PROF, self.seconds)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._armed:
            self._armed = False
            signal.setitimer(signal.ITIMER_PROF, 0)
        if self._collecting:
            self._collecting = False
            gc.enable()

    def _expired(self, signum: int, frame: FrameType | None) -> None:
        if not self._armed:  # a late signal after the block ended is ignored
            return
        left = self.seconds - (time.thread_time() - self._started)
        if left > 0:  # the process's other threads used the time, not this decision
            signal.setitimer(signal.ITIMER_PROF, left)
            return
        self._armed = False
        raise OutOfTime
