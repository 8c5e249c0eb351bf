"""The counters that clients report (gateways: their requests), kept for STATS.

Each reporter sends its cumulative counters every heartbeat, under its name, so a
restarted gateway replaces its own entry. Bounded: at most MAX_REPORTERS names,
and a name not heard from for `expiry` seconds is forgotten.
"""

from __future__ import annotations

MAX_REPORTERS = 64


class Reports:
    def __init__(self, expiry: float) -> None:
        self.expiry = expiry
        self.latest: dict[str, tuple[float, dict]] = {}  # name -> (received at, counters)

    def store(self, name: str, counters: dict, now: float) -> bool:
        """Keep a reporter's latest counters; False if there is no room for a new one."""
        if name not in self.latest and len(self.latest) >= MAX_REPORTERS:
            self._forget_silent(now)
            if len(self.latest) >= MAX_REPORTERS:
                return False
        self.latest[name] = (now, counters)
        return True

    def current(self, now: float) -> dict[str, dict]:
        """The latest counters of every reporter still heard from, by name."""
        self._forget_silent(now)
        return {name: self.latest[name][1] for name in sorted(self.latest)}

    def _forget_silent(self, now: float) -> None:
        silent = [name for name, (at, _) in self.latest.items() if now - at > self.expiry]
        for name in silent:
            del self.latest[name]
