"""Limits on what one peer may cost the broker or a worker, checked in memory."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from broker import protocol as p
from broker import server
from tests.broker_memory import MemoryBroker
from worker.runtime import REPLY_FRAMES, Outbox


@pytest.fixture
def memory():
    broker = MemoryBroker()
    yield broker
    broker.close()


@pytest.mark.timeout(10)
def test_a_client_message_of_too_many_frames_is_refused_with_limit_exceeded(memory):
    broker = memory.broker
    client = memory.connect(broker.frontend, b"c1")
    request = p.encode_request_to_broker(p.Request(b"r1", "generate", b"{}"))
    client.send_multipart(request + [b"x"] * p.MAX_FRAMES)
    memory.drain(broker.frontend)
    [reply] = memory.to_client(b"c1")
    assert (reply.rid, reply.code) == (b"r1", p.E_LIMIT)
    assert broker.totals["oversized_messages"] == 1


@pytest.mark.timeout(10)
def test_a_worker_reply_of_too_many_frames_fails_its_request_only(memory):
    broker = memory.broker
    worker = memory.connect(broker.backend, b"w1")
    worker.send_multipart(p.encode_ready(p.Ready("w1", ["generate"])))
    memory.drain(broker.backend)
    memory.request(b"c1", b"big")
    memory.request(b"c1", b"small")
    big, small = (m.rid for m in memory.to_worker(b"w1") if type(m) is p.Request)
    worker.send_multipart(p.encode_reply_from_worker(p.Chunk(big, [b"x"] * p.MAX_FRAMES)))
    worker.send_multipart(p.encode_reply_from_worker(p.End(small, [b"fine"])))
    memory.drain(broker.backend)
    replies = {m.rid: m for m in memory.to_client(b"c1")}
    assert replies[b"big"].code == p.E_LIMIT
    assert replies[b"small"].chunks == [b"fine"]
    assert p.Cancel(big) in memory.to_worker(b"w1")
    assert broker.totals["oversized_messages"] == 1


@pytest.mark.timeout(10)
def test_one_pass_takes_a_bounded_number_of_messages(memory):
    broker = memory.broker
    client = memory.connect(broker.frontend, b"c1")
    heartbeat = p.encode_heartbeat()
    for _ in range(server.DRAIN_MESSAGES // 100 + 2):  # batches of 100 messages each
        client.send_multipart(p.encode_batch([heartbeat] * 100))
    client.send_multipart(p.encode_stats_request(p.StatsRequest(b"last")))
    assert broker.frontend.poll(1000)
    broker._drain(broker.frontend, broker._on_client)
    answered = memory.to_client(b"c1")
    assert len(answered) == server.DRAIN_MESSAGES
    memory.drain(broker.frontend)
    assert type(memory.to_client(b"c1")[-1]) is p.StatsReply


def test_a_batch_may_not_carry_a_message_of_too_many_frames():
    message = [p.VERSION, p.CHUNK, b"rid"] + [b""] * p.MAX_FRAMES
    with pytest.raises(p.ProtocolError, match="frame"):
        p.unbatch(p.encode_batch([message]))


def outbox_messages(chunks: list[bytes]) -> list[list[bytes]]:
    """What an Outbox sends for one request's chunks and END, yielded in one turn."""
    sent: list[list[bytes]] = []

    async def produce() -> None:
        outbox = Outbox(sent.append, lambda: None)
        for chunk in chunks:
            outbox.chunk(b"r", chunk)
        outbox.end(b"r")
        await asyncio.sleep(0)  # the outbox flushes at the end of the turn

    asyncio.run(produce())
    return sent


def test_the_outbox_sends_a_long_reply_in_bounded_messages():
    sent = outbox_messages([b"word\n"] * (REPLY_FRAMES * 3 + 1))
    assert [len(m) - 3 for m in sent] == [REPLY_FRAMES] * 3 + [1]
    assert [m[1] for m in sent] == [p.CHUNK] * 3 + [p.END]
    half = b"x" * (p.MAX_BATCH_BYTES // 2 + 1)
    assert [len(m) - 3 for m in outbox_messages([half] * 4)] == [2, 2, 0]


def ready(memory: MemoryBroker, worker_id: str, services: list[str]) -> list[p.Message]:
    """A READY from a peer named after the worker; what the broker answers it."""
    peer = worker_id.encode()
    memory.from_worker(peer, p.encode_ready(p.Ready(worker_id, services)))
    return memory.to_worker(peer)


def test_a_ready_with_too_many_services_is_refused():
    memory = MemoryBroker(None, "Broker.max_services_per_worker=3")
    try:
        [refusal] = ready(memory, "w1", ["a", "b", "c", "d"])
        assert (refusal.rid, refusal.code) == (b"", p.E_LIMIT)
        assert "Broker.max_services_per_worker" in refusal.message
        assert not memory.broker.registry.by_id and not memory.broker.registry.by_service
        assert ready(memory, "w1", ["a", "b", "c"]) == []
    finally:
        memory.close()


def test_a_ready_past_the_most_live_workers_is_refused():
    memory = MemoryBroker(None, "Broker.max_workers=2")
    try:
        assert ready(memory, "w1", ["generate"]) == ready(memory, "w2", ["generate"]) == []
        [refusal] = ready(memory, "w3", ["generate"])
        assert (refusal.code, "Broker.max_workers" in refusal.message) == (p.E_LIMIT, True)
        memory.from_worker(b"w1", p.encode_disconnect())
        assert ready(memory, "w3", ["generate"]) == []
    finally:
        memory.close()


def test_a_ready_larger_than_its_limit_is_refused_as_a_bad_request(memory):
    info = orjson.dumps({"services": ["s" * 200] * 400})
    memory.from_worker(b"w1", [p.VERSION, p.READY, b"w1", info])
    [refusal] = memory.to_worker(b"w1")
    assert (refusal.rid, refusal.code) == (b"", p.E_BAD_REQUEST)
    assert "READY info is longer than 65536 bytes" in refusal.message


def test_departed_workers_keep_their_stats_only_and_their_services_are_freed():
    memory = MemoryBroker(None, "Broker.max_departed_workers=5")
    registry = memory.broker.registry
    try:
        for n in range(20):
            ready(memory, f"w{n}", [f"service-{n}-{i}" for i in range(10)])
            memory.from_worker(f"w{n}".encode(), p.encode_disconnect())
        assert not registry.by_id and not registry.by_peer and not registry.by_service
        assert list(registry.departed) == [f"w{n}" for n in range(15, 20)]
        assert all(type(kept.stats) is dict for kept in registry.departed.values())
    finally:
        memory.close()


def test_a_stats_reply_lists_the_first_workers_by_id_and_counts_them_all():
    memory = MemoryBroker(None, "Broker.stats_max_workers=3", "Broker.max_departed_workers=1")
    try:
        for worker_id in ("w5", "w1", "w4", "w3", "w2"):
            ready(memory, worker_id, ["generate"])
        memory.from_worker(b"w2", p.encode_disconnect())
        stats = memory.broker.stats()
        assert [w["id"] for w in stats["workers"]] == ["w1", "w2", "w3"]
        assert stats["workers"][1]["state"] == "evicted"
        broker = stats["broker"]
        assert broker["workers_truncated"] is True
        assert (broker["workers_ready"], broker["workers_live"], broker["workers_departed"]) == (4, 4, 1)
    finally:
        memory.close()
