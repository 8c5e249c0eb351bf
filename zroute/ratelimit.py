"""Limits on what repeated input makes the broker do: log lines, and answers to a peer."""

from __future__ import annotations

import logging
import math
import time
from typing import Callable


class LogLimiter:
    """Log an event at most once per interval for each kind and peer, and at most
    `per_kind` lines of a kind per interval whatever peers it comes from; the next
    line of a kind says how many were left out. `clock` tells the time (the broker's
    core, which has no clock of its own, gives the time of the event it handles).

    The key is never the message's text, which may carry a peer's bytes: a peer
    that varies them would get a line per message."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, per_kind: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.clock = clock
        self.interval = interval
        self.per_kind = per_kind
        self._window_start = -math.inf
        self._logged: set[tuple[str, bytes]] = set()  # (kind, peer) logged in this window
        self._lines: dict[str, int] = {}  # kind -> lines in this window
        self._suppressed: dict[str, int] = {}  # kind -> events left out since its last line

    def warn(self, kind: str, message: str, peer: bytes = b"") -> None:
        self._log(logging.WARNING, kind, message, peer)

    def info(self, kind: str, message: str, peer: bytes = b"") -> None:
        self._log(logging.INFO, kind, message, peer)

    def _log(self, level: int, kind: str, message: str, peer: bytes) -> None:
        now = self.clock()
        if now - self._window_start >= self.interval:
            self._window_start = now
            self._logged.clear()
            self._lines.clear()
        lines = self._lines.get(kind, 0)
        if lines >= self.per_kind or (kind, peer) in self._logged:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._logged.add((kind, peer))
        self._lines[kind] = lines + 1
        repeats = self._suppressed.pop(kind, 0)
        suffix = f" (and {repeats} more like it)" if repeats else ""
        self.logger.log(level, "%s%s", message, suffix)


class PeerLimiter:
    """At most `burst` answers per peer per `interval` seconds, so that a peer cannot
    make the broker send more than it is sent. The caller says what time it is."""

    def __init__(self, interval: float, burst: int = 1, max_peers: int = 10_000) -> None:
        self.interval = interval
        self.burst = burst
        self.max_peers = max_peers
        self._windows: dict[bytes, tuple[float, int]] = {}  # peer -> (window start, answers)

    def allow(self, peer: bytes, now: float) -> bool:
        start, count = self._windows.get(peer, (-math.inf, 0))
        if now - start >= self.interval:
            start, count = now, 0
        if count >= self.burst:
            return False
        if len(self._windows) >= self.max_peers:
            self._windows.clear()  # forgetting costs a few extra answers, not memory
        self._windows[peer] = (start, count + 1)
        return True
