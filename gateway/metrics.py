"""The gateway's Prometheus metrics: its own requests, and the broker's view on scrape."""

from __future__ import annotations

from typing import Iterator

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

disable_created_metrics()  # the *_created series only double the output

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                   60)

# Broker totals exported as counters: stats key -> (metric name, help).
BROKER_COUNTERS = {
    "requests": ("zroute_broker_requests", "Requests the broker received."),
    "retries": ("zroute_broker_retries", "Requests retried on another worker."),
    "cancelled": ("zroute_broker_cancellations", "Requests cancelled by their client."),
    "evictions": ("zroute_broker_evictions", "Workers evicted (dead, gone or disconnected)."),
    "timeouts": ("zroute_broker_timeouts", "Requests ended by their deadline."),
    "queued": ("zroute_broker_queued", "Requests that waited in a queue."),
}


class BrokerCollector:
    """Exports the last broker stats snapshot; the /metrics handler refreshes it."""

    def __init__(self) -> None:
        self.snapshot: dict | None = None

    def collect(self) -> Iterator[Metric]:
        if self.snapshot is None:
            return
        totals = self.snapshot["broker"]
        for key, (name, doc) in BROKER_COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=totals[key])
        yield GaugeMetricFamily("zroute_broker_queue_depth", "Requests waiting for a worker.",
                                value=totals["queue_depth"])
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


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.broker = BrokerCollector()
        self.registry.register(self.broker)
        self.requests = Counter(
            "zroute_http_requests", "HTTP /generate requests by status, routing policy, worker.",
            ["status", "policy", "worker"], registry=self.registry)
        self.inflight = Gauge("zroute_http_inflight_requests",
                              "HTTP /generate requests being served.", registry=self.registry)
        self.first_chunk = Histogram(
            "zroute_http_time_to_first_chunk_seconds", "From request to the first chunk.",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.duration = Histogram(
            "zroute_http_request_duration_seconds", "From request to the end of the response.",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.disconnects = Counter(
            "zroute_http_client_disconnects", "HTTP clients gone before their response ended.",
            registry=self.registry)
        self.incomplete = Counter(
            "zroute_http_incomplete_responses", "Streams ended by an error after their first chunk.",
            registry=self.registry)

    def observe(self, status: int, policy: str, worker: str, duration: float,
                first_chunk: float | None) -> None:
        self.requests.labels(str(status), policy, worker).inc()
        self.duration.observe(duration)
        if first_chunk is not None:
            self.first_chunk.observe(first_chunk)

    def render(self, broker_stats: dict | None) -> bytes:
        self.broker.snapshot = broker_stats
        return generate_latest(self.registry)

    def summary(self) -> dict:
        """The gateway's counters for /stats."""
        by_status: dict[str, int] = {}
        for metric in self.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    status = sample.labels["status"]
                    by_status[status] = by_status.get(status, 0) + int(sample.value)
        return {
            "requests": sum(by_status.values()),
            "requests_by_status": by_status,
            "inflight": self._value("zroute_http_inflight_requests"),
            "disconnects": self._value("zroute_http_client_disconnects_total"),
            "incomplete": self._value("zroute_http_incomplete_responses_total"),
        }

    def _value(self, sample: str) -> int:
        return int(self.registry.get_sample_value(sample) or 0)
