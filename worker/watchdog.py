"""A watch on the worker's event loop, for handlers that block it.

A handler that blocks the loop (time.sleep, a blocking client library, a long
computation) stops everything else the worker does: its other requests, and its
heartbeats, so that the broker evicts it after a few missed ones and retries its requests
elsewhere. The worker cannot prevent that; the watch makes it say why, while it happens.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from types import FrameType
from typing import Callable

CHECKS_PER_THRESHOLD = 4  # how often, per threshold, the loop stamps and the thread looks

# What a watchdog's owner is told of a blocked loop: for how long it has been blocked,
# the task that runs (None if it is no task's code) and its innermost frame (if known).
Describe = Callable[[float, "asyncio.Task | None", "FrameType | None"], None]


class LoopWatchdog:
    """A thread that reports an event loop that has not turned for `threshold` seconds,
    once per blocked spell.

    The loop stamps the time with a timer, so that it costs nothing per request. The
    thread only reads and logs: it never sends on the worker's socket (ZeroMQ sockets
    belong to one thread), and never heartbeats for the loop, which would keep a worker
    whose handler is stuck for good registered and sent requests it cannot serve."""

    def __init__(self, threshold: float, report: Describe) -> None:
        self.threshold = threshold
        self.report = report
        self._interval = threshold / CHECKS_PER_THRESHOLD
        self._last_turn = time.monotonic()
        self._stopped = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._timer: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Watch the running loop; call it in that loop."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stamp()
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None:
            self._thread.join(self._interval * 2)

    def _stamp(self) -> None:
        self._last_turn = time.monotonic()
        self._timer = self._loop.call_later(self._interval, self._stamp)

    def _watch(self) -> None:
        reported = False  # this spell has been reported
        while not self._stopped.wait(self._interval):
            blocked_for = time.monotonic() - self._last_turn
            if blocked_for < self.threshold:
                reported = False
            elif not reported:
                reported = True
                self.report(blocked_for, asyncio.current_task(self._loop),
                            sys._current_frames().get(self._loop_thread))


def frame_location(frame: FrameType | None) -> str:
    """`file.py:12 in handler`: where a frame is."""
    if frame is None:
        return "an unknown place"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
