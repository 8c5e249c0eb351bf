"""Limits on what repeated input makes the broker do: log lines, and answers to a peer."""

from __future__ import annotations

import logging
import math
import time

MAX_KEYS = 1000  # distinct messages remembered before the memory is reset


class LogLimiter:
    """Log a repeated message once, then at most once per interval with a count."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, message: str) -> None:
        self._log(logging.WARNING, message)

    def info(self, message: str) -> None:
        self._log(logging.INFO, message)

    def _log(self, level: int, message: str) -> None:
        now = time.monotonic()
        last = self._last.get(message)
        if last is not None and now - last < self.interval:
            self._suppressed[message] = self._suppressed.get(message, 0) + 1
            return
        if len(self._last) >= MAX_KEYS:
            self._last.clear()
            self._suppressed.clear()
        self._last[message] = now
        repeats = self._suppressed.pop(message, 0)
        suffix = f" (and {repeats} more like it)" if repeats else ""
        self.logger.log(level, "%s%s", message, suffix)


class PeerLimiter:
    """At most `burst` answers per peer per `interval` seconds, so that a peer cannot
    make the broker send more than it is sent."""

    def __init__(self, interval: float, burst: int = 1, max_peers: int = 10_000) -> None:
        self.interval = interval
        self.burst = burst
        self.max_peers = max_peers
        self._windows: dict[bytes, tuple[float, int]] = {}  # peer -> (window start, answers)

    def allow(self, peer: bytes) -> bool:
        now = time.monotonic()
        start, count = self._windows.get(peer, (-math.inf, 0))
        if now - start >= self.interval:
            start, count = now, 0
        if count >= self.burst:
            return False
        if len(self._windows) >= self.max_peers:
            self._windows.clear()  # forgetting costs a few extra answers, not memory
        self._windows[peer] = (start, count + 1)
        return True
