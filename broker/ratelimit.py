"""Log a repeated message once, then at most once per interval with a count."""

from __future__ import annotations

import logging
import time

MAX_KEYS = 1000  # distinct messages remembered before the memory is reset


class LogLimiter:
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
