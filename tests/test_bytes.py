"""Byte budgets: what the broker holds for its clients, and what a worker holds for the
broker, stay bounded in bytes, whatever the peers send or fail to read."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from zroute import protocol as p
from broker.core import READER_SLACK
from tests.broker_memory import MemoryBroker
from tests.support import async_wait_until, wait_until
from worker import runtime
from worker.runtime import Worker
from zroute.settings import WorkerSettings, BrokerLink

KIB = 1024


def refusal(memory: MemoryBroker, client: bytes, rid: bytes, size: int) -> p.Error | None:
    """The ERROR a request of `size` bytes gets at once, if any."""
    memory.request(client, rid, body=b"x" * size)
    errors = [m for m in memory.to_client(client) if type(m) is p.Error and m.rid == rid]
    return errors[0] if errors else None


@pytest.mark.timeout(10)
def test_a_body_over_max_request_bytes_is_refused_at_once_naming_the_key():
    memory = MemoryBroker(None, "Broker.max_request_bytes=1000")
    try:
        memory.register("w1")
        error = refusal(memory, b"c1", b"big", 1001)
        assert error.code == p.E_LIMIT and "Broker.max_request_bytes" in error.message
        assert refusal(memory, b"c1", b"fits", 1000) is None
    finally:
        memory.close()


@pytest.mark.timeout(10)
def test_the_bodies_one_client_holds_are_bounded_and_others_still_get_in():
    memory = MemoryBroker(None, "Broker.max_client_bytes=3000", "Broker.max_buffered_bytes=5000")
    try:  # no worker yet: the requests wait in the queue, their bodies in the broker
        assert refusal(memory, b"c1", b"r1", 1500) is None
        assert refusal(memory, b"c1", b"r2", 1500) is None
        error = refusal(memory, b"c1", b"r3", 1)
        assert error.code == p.E_LIMIT and "Broker.max_client_bytes" in error.message
        assert refusal(memory, b"c2", b"r1", 1500) is None
        error = refusal(memory, b"c3", b"r1", 2001)
        assert error.code == p.E_LIMIT and "Broker.max_buffered_bytes" in error.message
        assert memory.core.body_bytes == 4500
        # Once a worker has sent a first chunk the body cannot be retried: it no longer counts.
        worker = memory.register("w1")
        started = [m.rid for m in memory.to_worker(worker)]
        for rid in started:
            memory.from_worker(worker, p.encode_reply_from_worker(p.Chunk(rid, [b"a"])))
        assert memory.core.body_bytes == 0 and memory.core.body_bytes_by_client == {}
        assert refusal(memory, b"c1", b"r4", 3000) is None
    finally:
        memory.close()


def relay_until_cancelled(memory: MemoryBroker, worker: zmq.Socket, rid: bytes,
                          chunk: bytes, most: int, client: zmq.Socket | None = None) -> int:
    """Relay `chunk` for `rid` from the worker, sending for real (and reading each at
    `client`, if given), until the broker cancels the request or `most` chunks went;
    how many went."""
    broker = memory.broker
    for sent in range(1, most + 1):
        worker.send_multipart(p.encode_reply_from_worker(p.Chunk(rid, [chunk])))
        memory.read(broker.backend)
        memory.flush()
        if client is not None:
            [reply] = [p.decode_to_client(m) for m in p.unbatch(client.recv_multipart())]
            assert reply.chunks == [chunk]
        if rid not in memory.core.requests:
            return sent
    return most


def start_request(memory: MemoryBroker, client: zmq.Socket, worker: zmq.Socket, rid: bytes) -> bytes:
    """A request from `client`, as the worker sees it: its rid there."""
    client.send_multipart(p.encode_request_to_broker(p.Request(rid, "generate", b"{}")))
    memory.read(memory.broker.frontend)
    memory.flush()
    while True:  # past the CANCELs of earlier requests
        for message in p.unbatch(worker.recv_multipart()):
            request = p.decode_to_worker(message)
            if type(request) is p.Request:
                return request.rid


def connect_worker(memory: MemoryBroker) -> zmq.Socket:
    worker = memory.connect(memory.broker.backend, b"w1")
    worker.send_multipart(p.encode_ready(p.Ready("w1", ["generate"])))
    memory.read(memory.broker.backend)
    return worker


@pytest.mark.timeout(20)
def test_once_everyone_s_budget_is_spent_a_client_may_hold_only_what_a_reader_would():
    memory = MemoryBroker(None, "Broker.max_buffered_bytes=1048576")
    broker = memory.broker
    chunk = b"y" * (32 * KIB)
    try:
        worker = connect_worker(memory)
        first = memory.connect(broker.frontend, b"first")  # neither reads
        second = memory.connect(broker.frontend, b"second")
        rid = start_request(memory, first, worker, b"r1")
        sent = relay_until_cancelled(memory, worker, rid, chunk, most=100)
        assert (sent - 1) * len(chunk) < 1024 * KIB <= sent * len(chunk) + 4 * KIB
        # A client that reads gets a burst larger than READER_SLACK in one pass of the
        # loop: it has had no time to read it, and is not cut off.
        reader = memory.connect(broker.frontend, b"reader")
        rid = start_request(memory, reader, worker, b"r1")  # bodies still fit: it is taken
        burst = 2 * READER_SLACK // len(chunk)
        for _ in range(burst):
            worker.send_multipart(p.encode_reply_from_worker(p.Chunk(rid, [chunk])))
        wait_until(lambda: broker.backend.poll(0), 5, "the burst to arrive")
        memory.read(broker.backend)
        memory.flush()
        assert memory.core.requests_by_client == {b"reader": 1}
        received = 0
        while received < burst:
            received += len(p.unbatch(reader.recv_multipart()))
        # A client that does not read is cut off once what it holds from earlier passes
        # is over READER_SLACK.
        rid = start_request(memory, second, worker, b"r1")
        sent = relay_until_cancelled(memory, worker, rid, chunk, most=100)
        assert sent <= READER_SLACK // len(chunk) + 2
        assert memory.core.reply_bytes.held(b"second") <= READER_SLACK + 2 * len(chunk)
    finally:
        memory.close()


@pytest.mark.timeout(20)
def test_a_client_that_does_not_read_its_replies_loses_its_requests_at_its_byte_budget():
    memory = MemoryBroker(None, "Broker.max_client_bytes=1048576")
    broker = memory.broker
    try:
        slow = memory.connect(broker.frontend, b"slow")  # never reads
        reader = memory.connect(broker.frontend, b"reader")
        worker = connect_worker(memory)
        rid = start_request(memory, slow, worker, b"r1")
        chunk = b"y" * (64 * KIB)
        sent = relay_until_cancelled(memory, worker, rid, chunk, most=100)
        # Cancelled once more than its budget waited, not after 10,000 messages (SNDHWM).
        assert (sent - 1) * len(chunk) < 1024 * KIB <= sent * len(chunk) + 4 * KIB
        assert memory.core.reply_bytes.total <= 1024 * KIB + 2 * len(chunk)
        assert p.Cancel(rid) in [p.decode_to_worker(m) for m in p.unbatch(worker.recv_multipart())]
        # A client that reads is never cut off, however much it is sent.
        rid = start_request(memory, reader, worker, b"r1")
        assert relay_until_cancelled(memory, worker, rid, chunk, 40, reader) == 40
        slow.send_multipart(p.encode_request_to_broker(p.Request(b"r2", "generate", b"{}")))
        memory.read(broker.frontend)
        memory.flush()
        errors = {}
        while slow.poll(500):  # the chunks it did not read, then the errors
            for message in p.unbatch(slow.recv_multipart()):
                reply = p.decode_to_client(message)
                if type(reply) is p.Error:
                    errors[reply.rid] = reply
        assert errors[b"r1"].code == errors[b"r2"].code == p.E_LIMIT
        assert "Broker.max_client_bytes" in errors[b"r2"].message
    finally:
        memory.close()


def waiting_for_the_broker(task: asyncio.Task | None) -> bool:
    """Whether the task is suspended in the worker's wait for the broker to read."""
    coroutine = task.get_coro() if task is not None else None
    while coroutine is not None:
        if getattr(coroutine, "cr_code", None) is Worker._until_broker_reads.__code__:
            return True
        coroutine = getattr(coroutine, "cr_await", None)
    return False


@pytest.mark.timeout(30)
def test_a_handler_that_yields_faster_than_the_broker_reads_waits():
    """The worker's replies that the broker does not take stay within MAX_UNSENT_BYTES: the
    handler waits, and goes on once the broker reads."""
    context = zmq.Context()
    broker = context.socket(zmq.ROUTER)
    broker.setsockopt(zmq.RCVHWM, 1)
    broker.bind("inproc://not-reading")
    chunk = b"z" * (64 * KIB)
    total_chunks = 4 * runtime.MAX_UNSENT_BYTES // len(chunk)
    yielded = 0

    async def flood(_request):
        nonlocal yielded
        for _ in range(total_chunks):
            yielded += 1
            yield chunk

    async def main() -> None:
        worker = Worker(WorkerSettings(), BrokerLink("inproc://not-reading"), "w1",
                        {"generate": flood}, context=context)
        serving = asyncio.create_task(worker.run())
        await async_wait_until(lambda: broker.poll(0), 10, "the worker's READY")
        peer, *ready = broker.recv_multipart()
        assert ready[1] == p.READY
        broker.send_multipart([peer, *p.encode_request_to_worker(p.Request(b"r1", "generate", b"{}"))])
        tasks = worker.sessions[0].tasks
        await async_wait_until(lambda: waiting_for_the_broker(tasks.get(b"r1")), 10,
                               "the handler to wait for the broker")
        assert worker.sessions[0].channel.unsent_bytes() > runtime.MAX_UNSENT_BYTES
        assert yielded * len(chunk) <= runtime.MAX_UNSENT_BYTES + 2 * len(chunk)
        ended = False
        while not ended:  # the broker reads: the handler goes on to its END
            if not broker.poll(0):
                await asyncio.sleep(0.001)
                continue
            for message in p.unbatch(broker.recv_multipart()[1:]):
                ended = ended or message[1] == p.END
        assert yielded == total_chunks
        worker.stop()
        await serving

    try:
        asyncio.run(asyncio.wait_for(main(), 25))
    finally:
        broker.close(0)
        context.destroy(0)


@pytest.mark.timeout(10)
def test_the_broker_forgets_the_bytes_of_clients_that_read_them_or_left():
    memory = MemoryBroker()
    broker = memory.broker
    try:
        reader = memory.connect(broker.frontend, b"reader")
        gone = memory.connect(broker.frontend, b"gone")
        for client in (reader, gone):
            client.send_multipart(p.encode_stats_request(p.StatsRequest(b"s")))
        memory.read(broker.frontend)
        memory.flush()  # two small replies: sent without a tracker
        assert set(memory.core.reply_bytes.peers) == {b"reader", b"gone"}
        reader.recv_multipart()
        memory.peers.remove(gone)
        gone.close(0)
        wait_until(lambda: broker.client_gone(b"gone"), 5,
                   "the broker to see that the client is gone")
        memory.core.on_tick(time.monotonic())  # a tracked HEARTBEAT after the reader's bytes
        memory.flush()
        reader.recv_multipart()
        reply_bytes = memory.core.reply_bytes
        wait_until(lambda: reply_bytes.measure_all() == [] and not reply_bytes.peers,
                   5, "the broker to forget both clients")
        assert reply_bytes.total == 0
    finally:
        memory.close()
