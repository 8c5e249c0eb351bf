"""Routing policies. A policy picks one worker from those with room.

Adding a policy is one small class with a `choose` method and one entry in
POLICIES.
"""

from __future__ import annotations

import random as _random
from typing import Protocol, Sequence

from broker.registry import WorkerInfo


class Policy(Protocol):
    def choose(self, service: str, candidates: Sequence[WorkerInfo]) -> WorkerInfo:
        """Pick one of `candidates`, a non-empty list sorted by worker id."""


class RoundRobin:
    """A counter per service over the sorted ids of the workers with room."""

    def __init__(self) -> None:
        self._turn: dict[str, int] = {}

    def choose(self, service: str, candidates: Sequence[WorkerInfo]) -> WorkerInfo:
        turn = self._turn.get(service, 0)
        self._turn[service] = turn + 1
        return candidates[turn % len(candidates)]


class Random:
    def choose(self, service: str, candidates: Sequence[WorkerInfo]) -> WorkerInfo:
        return _random.choice(candidates)


class LeastLoaded:
    """The exact minimum of in-flight / capacity; ties go round robin."""

    def __init__(self) -> None:
        self._tie_breaker = RoundRobin()

    def choose(self, service: str, candidates: Sequence[WorkerInfo]) -> WorkerInfo:
        lowest = min(w.load for w in candidates)
        return self._tie_breaker.choose(service, [w for w in candidates if w.load == lowest])


class PowerOfTwo:
    """Two random choices; the less loaded one wins."""

    def choose(self, service: str, candidates: Sequence[WorkerInfo]) -> WorkerInfo:
        if len(candidates) == 1:
            return candidates[0]
        first, second = _random.sample(candidates, 2)
        return first if first.load <= second.load else second


# "direct" is a routing mode too, but it names its worker instead of choosing one.
DIRECT = "direct"

POLICIES: dict[str, type[Policy]] = {
    "round_robin": RoundRobin,
    "random": Random,
    "least_loaded": LeastLoaded,
    "power_of_two": PowerOfTwo,
}

ROUTING_MODES = (*POLICIES, DIRECT)
DEFAULT_POLICY = "round_robin"
