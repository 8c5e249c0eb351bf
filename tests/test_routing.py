"""Routing end to end: capacity, the broker's queue, the load-aware policies, and what an
operator sees (/metrics, `zroute stats --watch`, JSON logs).

Real `zroute broker`, `zroute worker` and `zroute gateway` processes on free ports, driven
with the project's Client and a real aiohttp client. Nothing is mocked; conditions are
polled, never slept for.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from zroute import protocol as p
from zroute.client import BlockingClient, BrokerError, Client
from tests.support import (ZROUTE, Stack, all_idle, async_wait_until, check_ending, child_env,
                           free_port, wait_until, workers_by_id)

SERVICE = "generate"
HOLD = "tests.handlers:hold"
CLEAR_SCREEN = "\033[H\033[2J"
# A queue of 3 whose requests wait at most 0.5 s.
SMALL_QUEUE = ("--Broker.max_queue=3", "--Broker.queue_timeout=0.5")
QUEUE_FULL = "every worker of 'generate' is busy (the queue is full: Broker.max_queue is 3)"
QUEUE_EXPIRED = "every worker of 'generate' is busy (waited Broker.queue_timeout: 0.5 s)"
# An expired request ends at most this long after its queue timeout (the broker's loop
# wakes every 50 ms), and a rejected one at most this long after it was sent.
MARGIN = 0.3


def run(coro):
    return asyncio.run(coro)


def start(stack: Stack, *worker_ids: str, sleep_time: float = 0, broker_args: tuple = (),
          worker_args: tuple = ()) -> None:
    """A broker and workers, all registered."""
    stack.broker(*broker_args)
    for worker_id in worker_ids:
        stack.worker(worker_id, *worker_args, sleep_time=sleep_time)
    stack.wait_workers(*worker_ids, timeout=20)  # generous: process start-up on a busy machine


def wait_broker(stack: Stack) -> None:
    """Wait until the broker answers a stats request (generous: start-up on a busy machine)."""
    def answers() -> bool:
        try:
            return bool(stack.stats())
        except BrokerError:
            return False
    wait_until(answers, 20, "the broker to answer")


def start_gateway(stack: Stack, *args: str) -> str:
    """A `zroute gateway` on a free port; its base URL."""
    port = free_port()
    stack.start("gateway", "gateway", "--broker", stack.frontend, "--port", str(port), *args)
    return f"http://127.0.0.1:{port}"


async def wait_stats(client: Client, condition, timeout: float = 10.0,
                     what: str = "stats condition") -> dict:
    """Poll the broker's stats through an asyncio Client until `condition(stats)`."""
    async def check():
        stats = await client.stats()
        return stats if condition(stats) else None
    return await async_wait_until(check, timeout, what)


async def wait_healthy(http: aiohttp.ClientSession, url: str, workers: int) -> None:
    async def check():
        try:
            async with http.get(f"{url}/health") as resp:
                return resp.status == 200 and (await resp.json())["workers"] == workers
        except aiohttp.ClientConnectionError:
            return False  # not listening yet
    await async_wait_until(check, 15, f"{url}/health to report {workers} worker(s)")


async def post(http: aiohttp.ClientSession, url: str, body) -> tuple[int, dict, bytes, float]:
    """POST /generate; (status, headers, body, seconds until the whole body was read)."""
    began = time.monotonic()
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(f"{url}/generate", data=data,
                         headers={"Content-Type": "application/json"}) as resp:
        content = await resp.read()
        return resp.status, dict(resp.headers), content, time.monotonic() - began


async def error_of(stream, began: float) -> tuple[str, str, float]:
    """The stream's error: (code, message, seconds from `began` to the error)."""
    with pytest.raises(BrokerError) as caught:
        await stream.read()
    return caught.value.code, caught.value.message, time.monotonic() - began


# --- capacity and the queue -------------------------------------------------------------


@pytest.mark.timeout(30)
def test_capacity_caps_each_worker_and_the_rest_wait_in_the_queue(stack):
    sleep_time, words, count = 0.3, 2, 10
    start(stack, "w1", "w2", sleep_time=sleep_time, worker_args=("--capacity", "2"))

    async def main():
        async with Client(stack.frontend, timeout=20) as client:
            began = time.monotonic()
            streams = [client.round_robin(SERVICE, {"text": f"a{i},b{i}"}) for i in range(count)]
            readers = asyncio.gather(*(s.read() for s in streams))
            samples = []
            while not readers.done():
                samples.append(await client.stats())
                await asyncio.sleep(0.01)
            outputs = await readers
            return outputs, samples, time.monotonic() - began

    outputs, samples, elapsed = run(main())
    assert outputs == [f"Hello a{i}!\nHello b{i}!\n".encode() for i in range(count)]

    # The first stats request left the same socket after the ten requests, so the broker
    # answered it with 4 requests running and 6 waiting.
    first = samples[0]
    assert {i: (w["inflight"], w["capacity"]) for i, w in workers_by_id(first).items()} == \
        {"w1": (2, 2), "w2": (2, 2)}
    assert (first["broker"]["inflight"], first["broker"]["queue_depth"]) == (4, 6)
    assert len(samples) >= 20, f"only {len(samples)} samples in {elapsed:.2f} s"
    for stats in samples:
        assert all(w["inflight"] <= 2 for w in stats["workers"]), stats["workers"]
    depths = [s["broker"]["queue_depth"] for s in samples]
    assert depths == sorted(depths, reverse=True), f"the queue grew without arrivals: {depths}"
    # 10 requests on 4 slots are at least three rounds of one request's work.
    assert elapsed >= 3 * words * sleep_time - 0.05, f"took only {elapsed:.2f} s"

    stats = stack.stats()
    broker = stats["broker"]
    assert (broker["requests"], broker["queued"], broker["completed"], broker["failed"]) == \
        (count, 6, count, 0)
    assert (broker["inflight"], broker["queue_depth"]) == (0, 0)
    assert broker["queue_wait_s_total"] > 0
    assert sum(w["completed"] for w in stats["workers"]) == count
    assert all(w["inflight"] == 0 for w in stats["workers"])


@pytest.mark.timeout(30)
def test_a_full_queue_rejects_at_once_and_a_queued_request_expires(stack):
    start(stack, "w1", sleep_time=0.5, broker_args=SMALL_QUEUE, worker_args=("--capacity", "1"))

    async def main():
        async with Client(stack.frontend, timeout=20) as client:
            busy = client.round_robin(SERVICE, {"text": "a,b,c,d"})  # its only slot for 2 s
            began = time.monotonic()
            waiting = [client.round_robin(SERVICE, {"text": f"q{i}"}) for i in range(5)]
            ends = await asyncio.gather(*(error_of(s, began) for s in waiting))
            busy_still_running = not busy.done
            return ends, busy_still_running, await busy.read(), busy.worker_id

    ends, busy_still_running, output, worker_id = run(main())
    # The broker took them in order: 3 fill the queue, the last 2 overflow it.
    for code, message, elapsed in ends[3:]:
        assert (code, message) == (p.E_QUEUE_FULL, QUEUE_FULL)
        assert elapsed < 0.2, f"an overflowing request took {elapsed:.3f} s to be rejected"
    for code, message, elapsed in ends[:3]:
        assert (code, message) == (p.E_QUEUE_FULL, QUEUE_EXPIRED)
        assert 0.5 <= elapsed < 0.5 + MARGIN, f"a queued request expired after {elapsed:.3f} s"
    assert busy_still_running  # the queue timed out; no slot had come free
    assert (output, worker_id) == (b"Hello a!\nHello b!\nHello c!\nHello d!\n", "w1")

    broker = stack.stats()["broker"]
    assert (broker["requests"], broker["queued"], broker["completed"], broker["failed"],
            broker["errors"]) == (6, 3, 1, 5, 5)
    assert (broker["inflight"], broker["queue_depth"]) == (0, 0)


@pytest.mark.timeout(40)
def test_a_full_queue_over_http_is_503_with_json_and_retry_after(stack):
    start(stack, "w1", sleep_time=0.5, broker_args=SMALL_QUEUE, worker_args=("--capacity", "1"))
    url = start_gateway(stack)

    async def main():
        async with aiohttp.ClientSession() as http, Client(stack.frontend) as client:
            await wait_healthy(http, url, 1)
            busy = asyncio.ensure_future(post(http, url, {"text": "a,b,c,d"}))
            await wait_stats(client, lambda s: workers_by_id(s)["w1"]["inflight"] == 1,
                             what="the first request to occupy w1")
            waiting = await asyncio.gather(*(post(http, url, {"text": f"q{i}"})
                                             for i in range(5)))
            return waiting, await busy

    waiting, busy = run(main())
    rejected, expired = [], []
    for status, headers, body, elapsed in waiting:
        assert status == 503
        assert headers["Content-Type"] == "application/json"
        assert headers["Retry-After"] == "1"
        error = json.loads(body)
        assert error["code"] == p.E_QUEUE_FULL
        assert error["error"] in (QUEUE_FULL, QUEUE_EXPIRED)
        (rejected if error["error"] == QUEUE_FULL else expired).append(elapsed)
    assert (len(rejected), len(expired)) == (2, 3), (rejected, expired)
    assert all(t < 0.25 for t in rejected), f"overflow answered after {rejected} s"
    assert all(0.5 <= t < 0.5 + MARGIN for t in expired), f"queued requests ended after {expired} s"

    status, headers, body, _ = busy
    assert (status, headers["X-Worker-Id"], body) == \
        (200, "w1", b"Hello a!\nHello b!\nHello c!\nHello d!\n")
    broker = stack.stats()["broker"]
    assert (broker["requests"], broker["queued"], broker["completed"], broker["failed"]) == \
        (6, 3, 1, 5)


@pytest.mark.timeout(30)
def test_a_request_waits_in_the_queue_for_the_first_worker(stack):
    stack.broker("--Broker.queue_timeout=20")
    wait_broker(stack)

    async def main():
        async with Client(stack.frontend, timeout=25) as client:
            stream = client.round_robin(SERVICE, {"text": "early,bird"})
            queued = await wait_stats(client, lambda s: s["broker"]["queue_depth"] == 1,
                                      what="the request to be queued")
            stack.worker("w1")  # only now is there a worker
            return queued, await stream.read(), stream.worker_id

    queued, output, worker_id = run(main())
    assert queued["workers"] == []
    assert (output, worker_id) == (b"Hello early!\nHello bird!\n", "w1")
    broker = stack.stats()["broker"]
    assert (broker["requests"], broker["queued"], broker["completed"], broker["failed"]) == \
        (1, 1, 1, 0)
    assert broker["queue_depth"] == 0
    assert broker["queue_wait_s_total"] > 0


@pytest.mark.timeout(30)
def test_with_no_worker_at_all_a_queued_request_ends_with_no_workers(stack):
    stack.broker("--Broker.queue_timeout=0.5")
    wait_broker(stack)

    async def main():
        async with Client(stack.frontend, timeout=10) as client:
            began = time.monotonic()
            return await error_of(client.round_robin(SERVICE, {"text": "anyone"}), began)

    code, message, elapsed = run(main())
    assert (code, message) == (p.E_NO_WORKERS,
                               "no worker serves 'generate' (waited Broker.queue_timeout: 0.5 s)")
    assert 0.5 <= elapsed < 0.5 + MARGIN, f"ended after {elapsed:.3f} s"
    broker = stack.stats()["broker"]
    assert (broker["requests"], broker["queued"], broker["failed"], broker["queue_depth"]) == \
        (1, 1, 1, 0)


# --- policies -------------------------------------------------------------------------------


async def send_while_one_is_busy(stack: Stack, policy: str, rounds: int) -> list[tuple]:
    """Keep one worker busy with a direct request; send `rounds` short requests one after
    another with `policy`. Both ways round. [(busy, idle, [worker of each short request])]"""
    results = []
    async with Client(stack.frontend, timeout=20) as client:
        for busy_id, idle_id in (("w1", "w2"), ("w2", "w1")):
            busy = client.direct(SERVICE, {"text": "long", "seconds": 60}, busy_id)
            assert await busy.first() == b"start long\n"  # it runs on busy_id now
            served_by = []
            for i in range(rounds):
                stream = client.request(SERVICE, {"text": f"s{i}"}, policy=policy)
                assert await stream.read() == f"start s{i}\ndone s{i}\n".encode()
                served_by.append(stream.worker_id)
            results.append((busy_id, idle_id, served_by))
            busy.cancel()
            await wait_stats(client, all_idle, what="the cancelled request to end")
    return results


@pytest.mark.timeout(30)
@pytest.mark.parametrize("policy, rounds", [("least_loaded", 5), ("power_of_two", 20)])
def test_a_load_aware_policy_picks_the_idle_worker(stack, policy, rounds):
    # Unlimited capacity: the busy worker has room, so only the policy keeps requests off it.
    # With two workers, power_of_two's two choices (without replacement) are always both.
    start(stack, "w1", "w2", worker_args=("--handler", HOLD))
    results = run(send_while_one_is_busy(stack, policy, rounds))
    for busy_id, idle_id, served_by in results:
        assert served_by == [idle_id] * rounds, f"{busy_id} busy: {served_by}"

    stats = stack.stats()
    assert {i: (w["completed"], w["failed"], w["inflight"]) for i, w in workers_by_id(stats).items()} == \
        {"w1": (rounds, 1, 0), "w2": (rounds, 1, 0)}
    assert (stats["broker"]["queued"], stats["broker"]["cancelled"]) == (0, 2)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("policy", ["round_robin", "random"])
def test_a_policy_skips_a_full_worker_rather_than_queue_behind_it(stack, policy):
    start(stack, "w1", "w2", worker_args=("--handler", HOLD, "--capacity", "1"))
    results = run(send_while_one_is_busy(stack, policy, 10))
    for busy_id, idle_id, served_by in results:
        assert served_by == [idle_id] * 10, f"{busy_id} full: {served_by}"

    stats = stack.stats()
    assert {i: (w["completed"], w["failed"], w["inflight"]) for i, w in workers_by_id(stats).items()} == \
        {"w1": (10, 1, 0), "w2": (10, 1, 0)}
    assert (stats["broker"]["queued"], stats["broker"]["cancelled"]) == (0, 2)


# --- what an operator sees -----------------------------------------------------------------


def samples_of(families: dict, name: str) -> list:
    return [s for family in families.values() for s in family.samples if s.name == name]


def value_of(families: dict, name: str, **labels: str) -> float:
    matches = [s.value for s in samples_of(families, name)
               if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {matches}"
    return matches[0]


async def metrics_counting(http: aiohttp.ClientSession, url: str, requests: int) -> str | None:
    """/metrics once it counts `requests` HTTP requests: the gateway's counters there are
    those it reported to the broker, which it does every heartbeat (1 s)."""
    async with http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counted = samples_of(families, "zroute_http_request_duration_seconds_count")
    return text if [s.value for s in counted] == [requests] else None


@pytest.mark.timeout(30)
def test_metrics_parse_and_count_the_requests_sent(stack):
    start(stack, "w1", "w2")
    url = start_gateway(stack)

    async def main():
        async with aiohttp.ClientSession() as http:
            await wait_healthy(http, url, 2)
            served_by = []
            for i in range(5):
                status, headers, body, _ = await post(http, url, {"text": f"m{i}"})
                assert (status, body) == (200, f"Hello m{i}!\n".encode())
                served_by.append(headers["X-Worker-Id"])
            for bad in (b"not json", {"text": 5}):
                status, _, _, _ = await post(http, url, bad)
                assert status == 400
            return served_by, await async_wait_until(lambda: metrics_counting(http, url, 7))

    served_by, text = run(main())
    families = {f.name: f for f in text_string_to_metric_families(text)}

    requests = samples_of(families, "zroute_http_requests_total")
    by_status = Counter()
    for s in requests:
        by_status[s.labels["status"]] += s.value
    assert by_status == {"200": 5, "400": 2}
    assert {(s.labels["status"], s.labels["policy"], s.labels["worker"]): s.value
            for s in requests} == {
        **{("200", "round_robin", w): n for w, n in Counter(served_by).items()},
        ("400", "round_robin", ""): 2,
    }
    # The body that is not JSON stops at the gateway; the greeting handler refuses the other.
    assert value_of(families, "zroute_broker_requests_total") == 6
    assert value_of(families, "zroute_http_request_duration_seconds_count") == 7
    assert value_of(families, "zroute_http_request_duration_seconds_bucket", le="+Inf") == 7
    assert value_of(families, "zroute_http_time_to_first_chunk_seconds_count") == 5
    assert value_of(families, "zroute_http_time_to_first_chunk_seconds_bucket", le="+Inf") == 5
    buckets = [s.value for s in samples_of(families, "zroute_http_request_duration_seconds_bucket")]
    assert buckets == sorted(buckets)  # cumulative
    assert value_of(families, "zroute_workers", state="ready") == 2
    assert value_of(families, "zroute_workers", state="evicted") == 0
    assert {s.labels["worker"]: s.value
            for s in samples_of(families, "zroute_worker_inflight_requests")} == {"w1": 0, "w2": 0}
    assert value_of(families, "zroute_http_inflight_requests") == 0
    assert value_of(families, "zroute_broker_queued_total") == 0
    assert value_of(families, "zroute_broker_queue_depth") == 0


class OutputReader:
    """Reads a child's stdout on a thread, so that the test can poll what came so far."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        while data := os.read(fd, 65536):
            with self._lock:
                self.text += data.decode()

    def frames(self) -> list[str]:
        """The complete frames so far: each one is followed by the next one's clear-screen."""
        with self._lock:
            parts = self.text.split(CLEAR_SCREEN)
        return parts[1:-1]


def rows_of(frame: str) -> dict[str, list[str]]:
    lines = frame.splitlines()
    assert lines[0].split() == ["WORKER", "SERVICES", "STATE", "INFLIGHT", "CAPACITY",
                                "COMPLETED", "FAILED", "P50", "P99", "SEEN"], frame
    rows = {}
    for line in lines[1:]:
        if not line:
            break
        rows[line.split()[0]] = line.split()
    return rows


@pytest.mark.timeout(30)
def test_stats_watch_renders_frames_that_follow_the_broker(stack):
    start(stack, "w1", "w2")
    watch = subprocess.Popen([ZROUTE, "stats", "--watch", "--broker", stack.frontend],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    try:
        reader = OutputReader(watch)
        before = wait_until(lambda: reader.frames()[:2], 10, "two frames")
        for frame in before:
            rows = rows_of(frame)
            assert set(rows) == {"w1", "w2"}
            assert [rows[w][2:7] for w in ("w1", "w2")] == [["ready", "0", "unlimited", "0", "0"]] * 2
            assert "requests 0 " in frame.splitlines()[-1]

        with BlockingClient(stack.frontend, timeout=10) as client:
            chunks = list(client.request(SERVICE, {"text": "seen"}, policy="direct", worker="w2"))
        assert chunks == [b"Hello seen!\n"]

        def frame_with_the_request():
            for frame in reader.frames()[len(before):]:
                rows = rows_of(frame)
                if rows["w2"][5] == "1":
                    return frame
            return None
        frame = wait_until(frame_with_the_request, 10, "a frame with w2's completed request")
        rows = rows_of(frame)
        assert rows["w1"][2:7] == ["ready", "0", "unlimited", "0", "0"]
        assert rows["w2"][2:7] == ["ready", "0", "unlimited", "1", "0"]
        assert "requests 1 " in frame.splitlines()[-1]
        assert watch.poll() is None  # still watching
    finally:
        watch.send_signal(signal.SIGINT)  # Ctrl-C, as its user stops it
        watch.wait(10)
    assert watch.stderr.read() == b""
    check_ending("stats --watch", watch.returncode, reader.text)


@pytest.mark.timeout(30)
def test_json_logs_of_worker_broker_and_gateway(stack):
    json_logs = ("--log-format", "json")
    broker = stack.broker(*json_logs)
    worker = stack.worker("w1", *json_logs)
    stack.wait_workers("w1", timeout=20)
    url = start_gateway(stack, *json_logs)
    gateway = stack.procs[-1]

    async def main():
        async with aiohttp.ClientSession() as http:
            await wait_healthy(http, url, 1)
            assert (await post(http, url, {"text": "log"}))[:3:2] == (200, b"Hello log!\n")
            assert (await post(http, url, b"not json"))[0] == 400

    run(main())
    for proc in (gateway, worker, broker):  # stopping writes their last lines too
        assert proc.stop() == 0

    expected = {broker: ("broker", "worker w1 ready for generate"),
                worker: ("w1", "worker=w1 request="),
                gateway: ("gateway", "status=200")}
    for proc, (process, sample) in expected.items():
        lines = proc.output().splitlines()
        assert len(lines) >= 3, proc.output()
        entries = []
        for line in lines:
            entry = json.loads(line)  # every line is one JSON object
            assert isinstance(entry, dict), line
            assert {"process", "level", "message"} <= entry.keys(), line
            assert entry["process"] == process, line
            assert entry["level"] in ("debug", "info", "warning", "error", "critical"), line
            entries.append(entry)
        assert any(sample in e["message"] for e in entries), (sample, lines)
