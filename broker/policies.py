"""Routing policies. A policy picks one worker from those with room.

A policy is one small class with a `choose` method. The built-in ones are in
POLICIES; a user's are named as module:Class (Broker.policies) and loaded by
the broker when it starts, never because a request names them.
"""

from __future__ import annotations

import inspect
import random as _random
from typing import Iterable, Mapping, Protocol, Sequence

from zroute.loader import LoadError, load_object
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


POLICIES: dict[str, type[Policy]] = {
    "round_robin": RoundRobin,
    "random": Random,
    "least_loaded": LeastLoaded,
    "power_of_two": PowerOfTwo,
}


def is_policy_class(name: str) -> bool:
    """Whether a policy name is a class to load (module:Class), not a built-in name."""
    return ":" in name


def load_policy(spec: str, what: str) -> Policy:
    """An instance of the class named by `spec` (module:Class or path/to/file.py:Class).

    `what` names where the spec came from (e.g. "Broker.policies"), for the error.
    """
    target = load_object(spec, what)
    if not inspect.isclass(target):
        raise LoadError(f"{what} {spec!r} is a {type(target).__name__} object, not a class: "
                        "name the policy class itself")
    if not callable(getattr(target, "choose", None)):
        raise LoadError(f"{what} {spec!r} has no method choose(service, candidates)")
    try:
        return target()
    except Exception as e:
        detail = " ".join(str(e).split())
        raise LoadError(f"{what} {spec!r} cannot be created without arguments: "
                        f"{type(e).__name__}: {detail}") from None


def load_policies(named: Mapping[str, str] | None = None) -> dict[str, Policy]:
    """One instance of each built-in policy and of each class in `named`
    (spec -> where it is named), by the name that requests give."""
    policies: dict[str, Policy] = {name: cls() for name, cls in POLICIES.items()}
    for spec, what in (named or {}).items():
        policies[spec] = load_policy(spec, what)
    return policies


def unknown_policy(name: str, valid: Iterable[str]) -> str:
    return f"unknown routing policy {name!r} (valid: {', '.join(valid)})"
