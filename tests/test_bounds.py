"""Bounds on what one peer may cost the broker, with real processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import orjson
import pytest

from broker.client import Client
from tests.support import REPO_ROOT, child_env

LARGE_WORDS = 500_000
LARGE_REPLIES = 6


def start_steady_load(address: str, rate: float) -> subprocess.Popen:
    load = subprocess.Popen([sys.executable, "-m", "tests.steady_load", address, str(rate)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=child_env(), cwd=REPO_ROOT)
    assert load.stdout.readline() == "running\n"
    return load


def stop_steady_load(load: subprocess.Popen) -> dict:
    """Close the load's stdin, and return what it counted."""
    out, _ = load.communicate("", timeout=30)
    return orjson.loads(out)


@pytest.mark.timeout(120)
def test_large_fast_replies_leave_other_clients_served(stack):
    """Replies of many small chunks yielded without awaiting must not hold the broker
    (or a worker) long enough for anyone else's requests to fail."""
    stack.broker()
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
