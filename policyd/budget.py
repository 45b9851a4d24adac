"""A bound on the CPU time one decision may take, so no pattern can stall the daemon.

A backtracking regular expression can take seconds on a crafted 27-character address, and
any logged-in user chooses the sender. Python's ``re`` cannot be given a step limit, but it
checks for signals every few thousand steps (CPython's _sre, MAYBE_CHECK_SIGNALS), so a
signal handler that raises stops a match that runs too long. The timer counts this process's
CPU time (ITIMER_PROF): a machine that pauses the process does not cut off a healthy match.

Postfix bounds PCRE with a match limit and then treats the rule as not matching; policyd
answers a temporary failure instead (README "Differences from Postfix"), so a cut-off match
never decides a verdict.
"""

from __future__ import annotations

import signal
import threading
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

    def __enter__(self) -> None:
        if self.seconds <= 0 or threading.current_thread() is not threading.main_thread():
            return
        if not self._installed:
            signal.signal(signal.SIGPROF, self._expired)
            self._installed = True
        self._armed = True
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

    def _expired(self, signum: int, frame: FrameType | None) -> None:
        if self._armed:  # a late signal after the block ended is ignored
            self._armed = False
            raise OutOfTime
