"""The counters that clients report (gateways: their requests), kept for STATS.

Each reporter sends its cumulative counters every heartbeat, under its name, so a
restarted gateway replaces its own entry. Bounded: at most MAX_REPORTERS names and
MAX_REPORTS_BYTES of counters in all (every STATS reply carries them all), and a name
not heard from for `expiry` seconds is forgotten.
"""

from __future__ import annotations

MAX_REPORTERS = 64
MAX_REPORTS_BYTES = 1 << 20  # the JSON of every reporter's counters, together


class Reports:
    def __init__(self, expiry: float) -> None:
        self.expiry = expiry
        # name -> (received at, counters, bytes of their JSON)
        self.latest: dict[str, tuple[float, dict, int]] = {}
        self.size = 0  # bytes of the JSON of all counters kept

    def store(self, name: str, counters: dict, size: int, now: float) -> str | None:
        """Keep a reporter's latest counters, `size` bytes of JSON; or say why there is
        no room for them."""
        if self._no_room(name, size):
            self._forget_silent(now)
        problem = self._no_room(name, size)
        if problem is None:
            self._forget(name)
            self.latest[name] = (now, counters, size)
            self.size += size
        return problem

    def current(self, now: float) -> dict[str, dict]:
        """The latest counters of every reporter still heard from, by name."""
        self._forget_silent(now)
        return {name: self.latest[name][1] for name in sorted(self.latest)}

    def _no_room(self, name: str, size: int) -> str | None:
        known = self.latest.get(name)
        if known is None and len(self.latest) >= MAX_REPORTERS:
            return f"{MAX_REPORTERS} reporters are heard from already"
        if self.size - (known[2] if known else 0) + size > MAX_REPORTS_BYTES:
            return f"the reports kept would pass {MAX_REPORTS_BYTES} bytes"
        return None

    def _forget(self, name: str) -> None:
        entry = self.latest.pop(name, None)
        if entry is not None:
            self.size -= entry[2]

    def _forget_silent(self, now: float) -> None:
        silent = [name for name, (at, _, _) in self.latest.items() if now - at > self.expiry]
        for name in silent:
            self._forget(name)
