"""Bounds on what one peer may cost the broker, with real processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import orjson
import pytest

from zroute import protocol as p
from zroute.client import BrokerError, Client
from tests.support import REPO_ROOT, async_wait_until, check_ending, child_env

LARGE_WORDS = 500_000
LARGE_REPLIES = 6


def start_steady_load(address: str, rate: float) -> subprocess.Popen:
    load = subprocess.Popen([sys.executable, "-m", "tests.steady_load", address, str(rate)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(), cwd=REPO_ROOT)
    assert load.stdout.readline() == "running\n"
    return load


def stop_steady_load(load: subprocess.Popen) -> dict:
    """Close the load's stdin, and return what it counted."""
    out, err = load.communicate("", timeout=30)
    check_ending("steady_load", load.returncode, err)
    return orjson.loads(out)


@pytest.mark.timeout(120)
def test_large_fast_replies_leave_other_clients_served(stack):
    """Replies of many small chunks yielded without awaiting must not hold the broker
    (or a worker) long enough for anyone else's requests to fail."""
    stack.broker("--Broker.max_request_bytes=4194304")  # the request names 500,000 words
    for worker_id in ("w1", "w2"):
        stack.worker(worker_id)
    stack.wait_workers("w1", "w2")
    words = ",".join(f"w{i}" for i in range(LARGE_WORDS))
    expected = b"".join(b"Hello w%d!\n" % i for i in range(LARGE_WORDS))

    async def large_replies() -> list[bytes]:
        async with Client(stack.frontend, timeout=60) as client:
            streams = [client.round_robin("generate", {"text": words})
                       for _ in range(LARGE_REPLIES)]
            return await asyncio.gather(*(stream.read() for stream in streams))

    load = start_steady_load(stack.frontend, rate=5)
    try:
        replies = asyncio.run(large_replies())
        # The workers' and the broker's heartbeats must have survived them: keep the
        # load a heartbeat window longer, and make sure it still gets through.
        stack.wait_stats(lambda s: s["broker"]["completed"] >= LARGE_REPLIES + 20, 10,
                         "background requests after the large replies")
    finally:
        outcomes = stop_steady_load(load)
    assert [len(reply) for reply in replies] == [len(expected)] * LARGE_REPLIES
    assert all(reply == expected for reply in replies)
    assert outcomes["failed"] == [] and outcomes["wrong"] == 0
    assert outcomes["completed"] > 0


@pytest.mark.timeout(60)
def test_under_overload_a_request_that_cannot_be_served_in_time_fails_at_once(stack):
    """Requests that the queue could not hand to a worker within Broker.queue_timeout, at
    the rate it drains, get their 503 at once rather than after waiting all of it."""
    stack.broker("--Broker.queue_timeout=1")
    stack.worker("w1", "--capacity", "2", sleep_time=0.05)  # drains about 40 a second
    stack.wait_workers("w1")
    served = 0

    async def timed(client: Client) -> tuple[BrokerError | None, float]:
        nonlocal served
        started = time.monotonic()
        try:
            await client.round_robin("generate", {"text": "x"}).read()
        except BrokerError as e:
            return e, time.monotonic() - started
        served += 1
        return None, time.monotonic() - started

    async def main():
        async with Client(stack.frontend, timeout=10) as client:
            first = [asyncio.create_task(timed(client)) for _ in range(100)]
            # Once 30 are served, the broker has seen the queue drain for over 0.5 s.
            await async_wait_until(lambda: served >= 30, 10, "30 requests served")
            second = await asyncio.gather(*(timed(client) for _ in range(20)))
            await asyncio.gather(*first)
            return second

    second = asyncio.run(main())
    assert all(error is not None and error.code == p.E_QUEUE_FULL for error, _ in second)
    assert all(p.retry_after(error.message) >= 1 for error, _ in second)
    assert max(elapsed for _, elapsed in second) < 0.5
