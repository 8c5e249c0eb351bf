"""The broker's view of its workers: who they are, what they serve, how busy."""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Iterable, NamedTuple

# A worker's state, as stats show it.
WORKER_READY = "ready"  # takes new requests
WORKER_DRAINING = "draining"  # said DRAIN: finishes what it holds, takes nothing new
WORKER_EVICTED = "evicted"  # gone: said goodbye, fell silent, or could not be reached

LATENCY_WINDOW = 1000  # recent request durations kept per worker for percentiles


class WorkerInfo:
    """One registered worker, keyed by its id and by its ZeroMQ routing identity."""

    __slots__ = ("worker_id", "peer", "services", "capacity", "token", "displaced", "state",
                 "inflight", "inflight_elsewhere", "full", "refusals", "completed", "failed",
                 "last_seen", "requests", "latencies")

    def __init__(self, worker_id: str, peer: bytes, services: list[str], capacity: int,
                 token: str = "", displaced: str = "", last_seen: float = 0.0) -> None:
        self.worker_id = worker_id
        self.peer = peer
        self.services = services
        self.capacity = capacity  # 0 means unlimited
        self.token = token  # the worker process's secret: its new connections take the id back
        self.displaced = displaced  # the token of the worker it took the id from while away
        self.state = WORKER_READY
        self.inflight = 0  # from this broker
        # From other brokers, as of the worker's last HEARTBEAT that counted its requests.
        self.inflight_elsewhere = 0
        self.full = False  # it refused a request over its capacity, and has not had room since
        self.refusals = 0
        self.completed = 0
        self.failed = 0
        self.last_seen = last_seen  # when the broker last heard from it
        self.requests: dict[bytes, object] = {}  # broker request key -> request
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    @property
    def has_room(self) -> bool:
        """Room as this broker sees it: its own requests now, the other brokers' as of the
        worker's last heartbeat. What they sent since is the worker's to refuse."""
        return self.state == WORKER_READY and not self.full and (
            self.capacity == 0 or self.inflight + self.inflight_elsewhere < self.capacity)

    @property
    def load(self) -> float:
        """In-flight relative to capacity, from every broker (other brokers' as of the
        worker's last heartbeat); unlimited workers count raw in-flight."""
        inflight = self.inflight + self.inflight_elsewhere
        return inflight / self.capacity if self.capacity else float(inflight)

    def stats(self, now: float) -> dict:
        return {
            "id": self.worker_id,
            "services": self.services,
            "state": self.state,
            "capacity": self.capacity,
            "inflight": self.inflight,
            "inflight_elsewhere": self.inflight_elsewhere,
            "refusals": self.refusals,
            "completed": self.completed,
            "failed": self.failed,
            "last_seen_s": round(now - self.last_seen, 3),
            **latency_percentiles(self.latencies),
        }


def latency_percentiles(samples: Iterable[float]) -> dict[str, float | None]:
    ordered = sorted(samples)

    def at(fraction: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 6)

    return {"latency_p50_s": at(0.50), "latency_p99_s": at(0.99)}


class Departed(NamedTuple):
    """What is kept of a worker that left: its stats, and who may take its id back."""

    stats: dict
    token: str
    displaced: str


class Registry:
    """Live workers by id, by routing identity and by service; and the stats of the
    last `max_departed` workers to leave, as they were when they left."""

    def __init__(self, max_departed: int) -> None:
        self.by_id: dict[str, WorkerInfo] = {}
        self.by_peer: dict[bytes, WorkerInfo] = {}
        self.by_service: dict[str, list[WorkerInfo]] = {}  # sorted by id
        self.departed: OrderedDict[str, Departed] = OrderedDict()
        self.max_departed = max_departed

    def add(self, worker: WorkerInfo) -> None:
        self.departed.pop(worker.worker_id, None)
        self.by_id[worker.worker_id] = worker
        self.by_peer[worker.peer] = worker
        for service in worker.services:
            members = self.by_service.setdefault(service, [])
            members.append(worker)
            members.sort(key=lambda w: w.worker_id)

    def remove(self, worker: WorkerInfo) -> None:
        worker.state = WORKER_EVICTED
        self.by_id.pop(worker.worker_id, None)
        self.by_peer.pop(worker.peer, None)
        for service in worker.services:
            members = self.by_service.get(service, [])
            if worker in members:
                members.remove(worker)
            if not members:
                self.by_service.pop(service, None)

    def remember(self, worker: WorkerInfo, now: float) -> None:
        """Keep a removed worker's stats as of `now`, once its requests have gone
        elsewhere: its stats only, not its requests, latency samples or the rest of its
        state."""
        self.departed[worker.worker_id] = Departed(
            worker.stats(now), worker.token, worker.displaced)
        while len(self.departed) > self.max_departed:
            self.departed.popitem(last=False)

    def serving(self, service: str) -> list[WorkerInfo]:
        """Workers registered for a service that still take new requests."""
        return [w for w in self.by_service.get(service, ()) if w.state == WORKER_READY]

    def available(self, service: str) -> list[WorkerInfo]:
        """Workers of a service with room for one more request."""
        return [w for w in self.by_service.get(service, ()) if w.has_room]
