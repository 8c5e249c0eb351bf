"""The gateways' Prometheus metrics and /stats counters, and the broker's view on scrape.

Each gateway process counts its own requests (GatewayMetrics) and reports them to the
broker every heartbeat; /stats and /metrics show every gateway's latest report, from
the broker's STATS, so that whichever gateway process answers, the answer is the same
and a counter never goes backwards.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from itertools import accumulate
from typing import Any, Iterator

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.utils import floatToGoString

from zroute.protocol import MAX_REPORT_BYTES

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                   60)

# The path of requests reported by gateways that did not label them with one: all were
# to POST /generate then.
REPORTED_WITHOUT_PATH = "/generate"

# Worker labels a gateway keeps; requests served by any further worker are counted under
# OTHER_WORKERS. Standalone workers take a new random id at each restart: unbounded, the
# labels would grow the metrics, and the report to the broker, for as long as it runs.
MAX_WORKER_LABELS = 100
OTHER_WORKERS = "other"

# Each broker's totals exported as counters, labelled `broker` (its endpoint): stats key ->
# (metric name, help).
BROKER_COUNTERS = {
    "requests": ("zroute_broker_requests", "Requests the broker received."),
    "retries": ("zroute_broker_retries", "Requests retried on another worker."),
    "refusals": ("zroute_broker_refusals",
                 "Requests a worker refused over its capacity (worker_full), routed elsewhere."),
    "cancelled": ("zroute_broker_cancellations", "Requests cancelled by their client."),
    "evictions": ("zroute_broker_evictions", "Workers evicted (dead, gone or disconnected)."),
    "timeouts": ("zroute_broker_timeouts", "Requests ended by their deadline."),
    "queued": ("zroute_broker_queued", "Requests that waited in a queue."),
}
# Each broker's totals by the socket's role (workers or clients), likewise.
BROKER_COUNTERS_BY_ROLE = {
    "auth_failures_by_role": (
        "zroute_broker_auth_failures",
        "Peers refused by CURVE: their key is not in the socket's allowlist."),
    "handshake_failures_by_role": (
        "zroute_broker_handshake_failures",
        "CURVE handshakes that failed before a key was judged: a peer without keys, or "
        "without the broker's public key."),
}


class BrokerCollector:
    """Exports the last broker stats snapshot; the /metrics handler refreshes it."""

    def __init__(self) -> None:
        self.snapshot: dict | None = None

    def collect(self) -> Iterator[Metric]:
        if self.snapshot is None:
            return
        # Per broker, by its endpoint: each broker's counters only grow (until it restarts),
        # where their sum would drop while one does not answer.
        answered = [block for block in self.snapshot["brokers"] if block["reachable"]]
        for key, (name, doc) in BROKER_COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=["broker"])
            for block in answered:
                family.add_metric([block["endpoint"]], block[key])
            yield family
        for key, (name, doc) in BROKER_COUNTERS_BY_ROLE.items():
            family = CounterMetricFamily(name, doc, labels=["broker", "role"])
            for block in answered:
                for role, count in block[key].items():
                    family.add_metric([block["endpoint"], role], count)
            yield family
        depth = GaugeMetricFamily("zroute_broker_queue_depth", "Requests waiting for a worker.",
                                  labels=["broker"])
        for block in answered:
            depth.add_metric([block["endpoint"]], block["queue_depth"])
        yield depth
        up = GaugeMetricFamily("zroute_broker_up", "1 if the broker answered the last scrape's "
                                                   "STATS, else 0.", labels=["broker"])
        for broker in self.snapshot["brokers"]:
            up.add_metric([broker["endpoint"]], int(broker["reachable"]))
        yield up
        workers = GaugeMetricFamily("zroute_workers", "Workers known to the broker, by state.",
                                    labels=["state"])
        inflight = GaugeMetricFamily("zroute_worker_inflight_requests",
                                     "Requests in flight on each live worker.", labels=["worker"])
        states: dict[str, int] = {"ready": 0, "draining": 0, "evicted": 0}
        for worker in self.snapshot["workers"]:
            states[worker["state"]] = states.get(worker["state"], 0) + 1
            if worker["state"] != "evicted":
                inflight.add_metric([worker["id"]], worker["inflight"])
        for state, count in states.items():
            workers.add_metric([state], count)
        yield workers
        yield inflight


class Histogram:
    """Observations counted into buckets, cumulated only when scraped."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict:
        return {"counts": self.counts, "sum": self.sum}

    def load(self, snapshot: Any) -> None:
        """Take the counts of a snapshot(); ValueError if it is not one."""
        counts = _field(snapshot, "counts", list)
        if len(counts) != len(self.counts):
            raise ValueError(f"a histogram needs {len(self.counts)} counts, got {len(counts)}")
        self.counts = [_count(count) for count in counts]
        total = _field(snapshot, "sum", (int, float))
        self.sum = float(total)

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        cumulative = list(accumulate(self.counts))
        buckets = [(floatToGoString(bound), count) for bound, count in zip(self.bounds, cumulative)]
        buckets.append(("+Inf", cumulative[-1]))
        family.add_metric(labels, buckets, self.sum)


class GatewayMetrics:
    """One gateway's counts, kept as plain numbers: prometheus_client's metric objects
    take a lock per update, which costs more than the update itself."""

    def __init__(self) -> None:
        # (status, policy, worker, path): the path of the route; a Call's policy is "-" and
        # its worker "".
        self.requests: Counter[tuple[str, str, str, str]] = Counter()
        self.workers: set[str] = set()  # the worker labels, at most MAX_WORKER_LABELS
        self.inflight = 0
        self.disconnects = 0  # HTTP clients gone before their response ended
        self.incomplete = 0  # streams ended by an error after their first chunk
        self.first_chunk = Histogram(LATENCY_BUCKETS)
        self.duration = Histogram(LATENCY_BUCKETS)

    def observe(self, status: int, policy: str, worker: str, path: str, duration: float,
                first_chunk: float | None) -> None:
        if worker not in self.workers:
            if len(self.workers) < MAX_WORKER_LABELS:
                self.workers.add(worker)
            else:
                worker = OTHER_WORKERS
        self.requests[(str(status), policy, worker, path)] += 1
        self.duration.observe(duration)
        if first_chunk is not None:
            self.first_chunk.observe(first_chunk)

    def snapshot(self) -> dict:
        """The counts as JSON, for the report to the broker (once per heartbeat). One that
        would be over the broker's limit on a report (long worker ids, many statuses and
        policies) counts its requests without their workers: all under OTHER_WORKERS."""
        snapshot = self._snapshot(self.requests)
        if len(orjson.dumps(snapshot)) <= MAX_REPORT_BYTES:
            return snapshot
        without_workers: Counter[tuple[str, str, str, str]] = Counter()
        for (status, policy, _, path), count in self.requests.items():
            without_workers[(status, policy, OTHER_WORKERS, path)] += count
        return self._snapshot(without_workers)

    def _snapshot(self, requests: Counter[tuple[str, str, str, str]]) -> dict:
        return {
            "requests": [[*labels, count] for labels, count in requests.items()],
            "inflight": self.inflight,
            "disconnects": self.disconnects,
            "incomplete": self.incomplete,
            "first_chunk": self.first_chunk.snapshot(),
            "duration": self.duration.snapshot(),
        }

    @classmethod
    def from_snapshot(cls, snapshot: Any) -> GatewayMetrics:
        """A gateway's counts from its report; ValueError if it is not a snapshot()."""
        metrics = cls()
        for entry in _field(snapshot, "requests", list):
            if isinstance(entry, list) and len(entry) == 4:  # reported without a path
                entry = [*entry[:3], REPORTED_WITHOUT_PATH, entry[3]]
            if (not isinstance(entry, list) or len(entry) != 5
                    or not all(isinstance(label, str) for label in entry[:4])):
                raise ValueError(f"{entry!r} is not [status, policy, worker, path, count]")
            metrics.requests[tuple(entry[:4])] += _count(entry[4])
        metrics.inflight = _count(_field(snapshot, "inflight", int))
        metrics.disconnects = _count(_field(snapshot, "disconnects", int))
        metrics.incomplete = _count(_field(snapshot, "incomplete", int))
        metrics.first_chunk.load(_field(snapshot, "first_chunk", dict))
        metrics.duration.load(_field(snapshot, "duration", dict))
        return metrics

    def summary(self) -> dict:
        """The gateway's counters for /stats."""
        by_status: Counter[str] = Counter()
        for (status, *_), count in self.requests.items():
            by_status[status] += count
        return {
            "requests": sum(by_status.values()),
            "requests_by_status": dict(by_status),
            "inflight": self.inflight,
            "disconnects": self.disconnects,
            "incomplete": self.incomplete,
        }


def _field(snapshot: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    value = snapshot.get(key) if isinstance(snapshot, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{key!r} is missing or of the wrong type")
    return value


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def total(summaries: list[dict]) -> dict:
    """The sum of several gateways' summary()."""
    by_status: Counter[str] = Counter()
    for summary in summaries:
        by_status.update(summary["requests_by_status"])
    return {
        "requests": sum(s["requests"] for s in summaries),
        "requests_by_status": dict(by_status),
        **{key: sum(s[key] for s in summaries) for key in ("inflight", "disconnects",
                                                             "incomplete")},
    }


# A gateway's numbers exported as one series each: (family, name, help, attribute).
PER_GATEWAY = (
    (GaugeMetricFamily, "zroute_http_inflight_requests",
     "HTTP requests to the routes being served.", "inflight"),
    (CounterMetricFamily, "zroute_http_client_disconnects",
     "HTTP clients gone before their response ended.", "disconnects"),
    (CounterMetricFamily, "zroute_http_incomplete_responses",
     "Streams ended by an error after their first chunk.", "incomplete"),
)
HISTOGRAMS = (
    ("zroute_http_time_to_first_chunk_seconds", "From request to the first chunk.",
     "first_chunk"),
    ("zroute_http_request_duration_seconds", "From request to the end of the response.",
     "duration"),
)


class GatewaysCollector:
    """Exports every gateway's counts, each series labelled with its gateway's name."""

    def __init__(self) -> None:
        self.gateways: dict[str, GatewayMetrics] = {}

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "zroute_http_requests",
            "HTTP requests to the routes by status, routing policy, worker, path.",
            labels=["gateway", "status", "policy", "worker", "path"])
        for name, metrics in self.gateways.items():
            for labels, count in metrics.requests.items():
                requests.add_metric([name, *labels], count)
        yield requests
        for kind, family_name, doc, attribute in PER_GATEWAY:
            family = kind(family_name, doc, labels=["gateway"])
            for name, metrics in self.gateways.items():
                family.add_metric([name], getattr(metrics, attribute))
            yield family
        for family_name, doc, attribute in HISTOGRAMS:
            family = HistogramMetricFamily(family_name, doc, labels=["gateway"])
            for name, metrics in self.gateways.items():
                getattr(metrics, attribute).add_to(family, [name])
            yield family


class Exporter:
    """The /metrics page: the gateways' counts and the broker's stats."""

    def __init__(self) -> None:
        self.broker = BrokerCollector()
        self.gateways = GatewaysCollector()
        self.registry = CollectorRegistry()
        self.registry.register(self.broker)
        self.registry.register(self.gateways)

    def render(self, broker_stats: dict | None, gateways: dict[str, GatewayMetrics]) -> bytes:
        self.broker.snapshot = broker_stats
        self.gateways.gateways = gateways
        return generate_latest(self.registry)
