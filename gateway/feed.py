"""GET /stats/stream: the stats as Server-Sent Events, one event per interval.

One poll of the broker feeds every subscriber: while anyone watches, the feed asks the
broker for its stats once per Frontend.stats_feed_interval, encodes the event once, and
hands the same bytes to every subscriber. A subscriber that falls FEED_BACKLOG events
behind (it reads too slowly, or not at all) is dropped, and the number of subscribers is
bounded (Frontend.max_stats_feeds): what a viewer may cost is bounded whatever it does.

The events:
- `history`, first, to each new subscriber: the points of the last HISTORY_S seconds
  (the charts' data), `{"interval_s": ..., "window_s": ..., "points": [...]}`;
- `stats`, once per interval: what GET /stats answers, with `"time"` (Unix seconds) and
  `"point"`, the interval's point (null for the first sample after a pause);
- `unavailable`, once per interval while the broker does not answer:
  `{"error": ..., "code": ..., "time": ...}`.

A point is `{"t", "requests_per_s", "errors_per_s", "latency_p50_s", "latency_p99_s",
"queue_depth", "inflight"}`: the broker's requests and errors (the ERRORs it answered)
per second over the interval, the gateways' HTTP request duration percentiles over the
last LATENCY_WINDOW_S seconds (null when none ended), and the broker's queue depth and
requests on workers at that moment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Awaitable, Callable, Mapping, NamedTuple

import orjson
from aiohttp import web

from gateway.formats import SSE, STREAM_HEADERS, sse_event
from gateway.metrics import LATENCY_BUCKETS, GatewayMetrics
from gateway.transport import reset
from zroute.client import BrokerError
from zroute.ratelimit import LogLimiter

log = logging.getLogger("zroute.gateway")

HISTORY_S = 300.0  # the charts' span: points kept, and sent to each new subscriber
LATENCY_WINDOW_S = 5.0  # gateways report once a heartbeat: percentiles over a few
FEED_BACKLOG = 4  # events a subscriber may have waiting before it is dropped
RECONNECT_MS = 1000  # an EventSource's wait before it reconnects (SSE `retry:`)

# The broker's stats and every gateway's metrics; BrokerError if the broker does not answer.
Source = Callable[[], Awaitable[tuple[dict, dict[str, GatewayMetrics]]]]


class Sample(NamedTuple):
    """What one poll saw, for the points of the polls after it."""

    at: float  # monotonic seconds
    boot_id: str  # the broker's: its counters start again when it restarts
    requests: int
    errors: int
    durations: list[int]  # the gateways' duration histograms, summed


class Subscriber:
    """One viewer: the events that wait for it, at most FEED_BACKLOG of them."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.dropped = False

    def offer(self, event: bytes) -> bool:
        """Queue the event; False if the subscriber is FEED_BACKLOG events behind."""
        if self.events.qsize() >= FEED_BACKLOG:
            return False
        self.events.put_nowait(event)
        return True

    def end(self) -> None:
        self.events.put_nowait(None)


class StatsFeed:
    """The shared poll, its subscribers, and the points of the charts."""

    def __init__(self, source: Source, interval: float, max_subscribers: int,
                 server_headers: Mapping[str, str]) -> None:
        self.source = source
        self.headers = {**server_headers, "Content-Type": SSE, **STREAM_HEADERS}
        self.interval = interval
        self.max_subscribers = max_subscribers
        self.subscribers: dict[Subscriber, web.BaseRequest] = {}
        self.points: deque[dict] = deque(maxlen=max(1, round(HISTORY_S / interval)))
        self.samples: deque[Sample] = deque(maxlen=max(2, round(LATENCY_WINDOW_S / interval) + 1))
        self.latest = b""  # the last stats or unavailable event, while polling
        self.history = b""  # the history event, built again after each new point
        self.polling: asyncio.Task | None = None
        self.closed = False
        self.drops = LogLimiter(log)

    @property
    def full(self) -> bool:
        return len(self.subscribers) >= self.max_subscribers

    async def stream(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one subscriber until it leaves, is dropped, or the gateway stops."""
        response = web.StreamResponse(headers=self.headers)
        if request.version >= (1, 1):
            response.enable_chunked_encoding()
        if request.method == "HEAD" or self.closed:
            return response  # the headers, and no stream
        subscriber = Subscriber()
        self.subscribers[subscriber] = request
        if self.polling is None:
            self.polling = asyncio.get_running_loop().create_task(self._poll())
        try:
            await response.prepare(request)
            await response.write(f"retry: {RECONNECT_MS}\n\n".encode() + self._history()
                                 + self.latest)
            while (event := await subscriber.events.get()) is not None:
                await response.write(event)
        except ConnectionResetError:
            pass  # the viewer left, or was dropped
        finally:
            del self.subscribers[subscriber]
        if not subscriber.dropped and request.transport is not None:
            await response.write_eof()
        return response

    def close(self) -> None:
        """End every subscriber's stream, and take no more: the gateway is stopping."""
        self.closed = True
        for subscriber in self.subscribers:
            subscriber.end()

    async def _poll(self) -> None:
        """Once per interval while anyone watches: one event, for every subscriber."""
        loop = asyncio.get_running_loop()
        try:
            while self.subscribers and not self.closed:
                started = loop.time()
                self.latest = await self._event()
                for subscriber, request in list(self.subscribers.items()):
                    if not subscriber.offer(self.latest):
                        self._drop(subscriber, request)
                await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))
        except Exception:
            # Not left waiting for events that will not come: they reconnect, and the
            # first of them starts a new poll.
            log.exception("the stats feed failed; its viewers are disconnected")
            for subscriber in self.subscribers:
                subscriber.end()
        finally:
            self.polling = None
            self.latest = b""  # stale by the time anyone subscribes again

    def _drop(self, subscriber: Subscriber, request: web.BaseRequest) -> None:
        """A subscriber FEED_BACKLOG events behind: its connection is cut, and what waits
        for it goes with it."""
        self.drops.warn("slow viewer", f"dropped /stats/stream subscribers that fell "
                                       f"{FEED_BACKLOG} events behind")
        subscriber.dropped = True
        if request.transport is not None:
            reset(request.transport)  # its handler's write, waiting for room, fails now
        subscriber.end()

    async def _event(self) -> bytes:
        """The next `stats` event, or `unavailable` if the broker does not answer."""
        try:
            stats, gateways = await self.source()
        except BrokerError as e:
            body = {"error": e.message, "code": e.code, "time": round(time.time(), 3)}
            return sse_event(orjson.dumps(body), "unavailable")
        stats["time"] = round(time.time(), 3)
        stats["point"] = self._point(stats, gateways)
        return sse_event(orjson.dumps(stats), "stats")

    def _point(self, stats: dict, gateways: dict[str, GatewayMetrics]) -> dict | None:
        """This poll's point, from the samples before it; None after a pause longer than
        two intervals (nobody watched), or when the broker restarted."""
        broker = stats["broker"]
        sample = Sample(time.monotonic(), broker["boot_id"], broker["requests"], broker["errors"],
                        summed_durations(gateways))
        if self.samples and (sample.at - self.samples[-1].at > 2 * self.interval
                             or sample.boot_id != self.samples[-1].boot_id):
            self.samples.clear()
        self.samples.append(sample)
        if len(self.samples) < 2:
            return None
        previous, oldest = self.samples[-2], self.samples[0]
        elapsed = sample.at - previous.at
        window = [max(0, now - then) for now, then in zip(sample.durations, oldest.durations)]
        point = {
            "t": stats["time"],
            "requests_per_s": round(max(0, sample.requests - previous.requests) / elapsed, 3),
            "errors_per_s": round(max(0, sample.errors - previous.errors) / elapsed, 3),
            "latency_p50_s": quantile(window, 0.50),
            "latency_p99_s": quantile(window, 0.99),
            "queue_depth": broker["queue_depth"],
            "inflight": broker["inflight"],
        }
        self.points.append(point)
        self.history = b""
        return point

    def _history(self) -> bytes:
        """The history event, encoded once per point however many subscribe."""
        if not self.history:
            body = {"interval_s": self.interval, "window_s": HISTORY_S,
                    "points": list(self.points)}
            self.history = sse_event(orjson.dumps(body), "history")
        return self.history


def summed_durations(gateways: dict[str, GatewayMetrics]) -> list[int]:
    """Every gateway's request-duration histogram counts, bucket by bucket."""
    return [sum(counts) for counts in zip(*(m.duration.counts for m in gateways.values()))]


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile of observations counted in LATENCY_BUCKETS (the last count is
    over the largest bound), interpolated within its bucket as Prometheus's
    histogram_quantile does; None if there are none."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    below = 0
    for index, count in enumerate(counts):
        if count and below + count >= rank:
            if index == len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]  # over the largest bound: at least that
            lower = LATENCY_BUCKETS[index - 1] if index else 0.0
            upper = LATENCY_BUCKETS[index]
            return round(lower + (upper - lower) * (rank - below) / count, 6)
        below += count
    return None
