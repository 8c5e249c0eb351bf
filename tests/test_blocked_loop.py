"""A handler that blocks the worker's event loop: the worker says so, and a request sent
to that worker by name is told that its worker was lost, not that there is none."""

from __future__ import annotations

import re
import time

import pytest

from zroute import protocol as p
from zroute.client import BlockingClient, BrokerError
from tests.broker_memory import MemoryBroker
from tests.support import Stack


@pytest.fixture
def memory():
    broker = MemoryBroker()
    yield broker
    broker.close()


def test_a_direct_request_whose_worker_is_evicted_before_its_first_chunk_is_worker_lost(memory):
    worker = memory.register("slowpoke")
    memory.request(b"c1", b"r1", policy="direct", target="slowpoke")
    assert [type(m) for m in memory.to_worker(worker)] == [p.Request]
    memory.core.on_tick(time.monotonic() + 10)  # ten seconds of silence
    [error] = memory.to_client(b"c1")
    assert (error.code, error.message) == (
        p.E_WORKER_LOST, "worker 'slowpoke' was lost before its first chunk (no heartbeat for 10.0 s)")


@pytest.mark.timeout(60)
def test_a_handler_that_blocks_the_loop_is_named_in_a_warning(stack: Stack):
    fast = "--Broker.heartbeat_interval=0.3"  # evicted after 0.9 s of silence
    stack.broker(fast)
    worker = stack.worker("slowpoke", fast, "--handler", "tests.handlers:blocks")
    stack.wait_workers("slowpoke")
    with BlockingClient(stack.frontend, timeout=20) as client:
        stream = client.direct("generate", {"seconds": 2}, "slowpoke")
        with pytest.raises(BrokerError) as caught:
            stream.read()
        assert caught.value.code == p.E_WORKER_LOST
        assert caught.value.message.startswith("worker 'slowpoke' was lost before its first chunk")
        stack.wait_workers("slowpoke", timeout=10)  # back once its loop turns again
        assert client.direct("generate", {"seconds": 0}, "slowpoke").read() == b"done\n"

    warnings = re.findall(r"WARNING (worker slowpoke: its event loop has been blocked .*)",
                          worker.output())
    assert len(warnings) == 1, worker.output()  # one spell, one warning
    assert re.match(r"worker slowpoke: its event loop has been blocked for \d\.\d s by the "
                    rf"handler of request={stream.rid.decode()} client=[0-9a-f]+, at \S+handlers.py:"
                    r"\d+ in blocks\. ", warnings[0]), warnings[0]
    assert "await asyncio.to_thread(...)" in warnings[0]
