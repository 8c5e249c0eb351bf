"""Limits on what one peer may cost the broker or a worker, checked in memory."""

from __future__ import annotations

import asyncio
import functools
import math
import time

import orjson
import pytest

from zroute import protocol as p
from broker import core, server
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
    memory.read(broker.frontend)
    [reply] = memory.to_client(b"c1")
    assert (reply.rid, reply.code) == (b"r1", p.E_LIMIT)
    assert memory.core.totals["oversized_messages"] == 1


@pytest.mark.timeout(10)
def test_a_worker_reply_of_too_many_frames_fails_its_request_only(memory):
    broker = memory.broker
    worker = memory.connect(broker.backend, b"w1")
    worker.send_multipart(p.encode_ready(p.Ready("w1", ["generate"])))
    memory.read(broker.backend)
    memory.request(b"c1", b"big")
    memory.request(b"c1", b"small")
    big, small = (m.rid for m in memory.to_worker(b"w1") if type(m) is p.Request)
    worker.send_multipart(p.encode_reply_from_worker(p.Chunk(big, [b"x"] * p.MAX_FRAMES)))
    worker.send_multipart(p.encode_reply_from_worker(p.End(small, [b"fine"])))
    memory.read(broker.backend)
    replies = {m.rid: m for m in memory.to_client(b"c1")}
    assert replies[b"big"].code == p.E_LIMIT
    assert replies[b"small"].chunks == [b"fine"]
    assert p.Cancel(big) in memory.to_worker(b"w1")
    assert memory.core.totals["oversized_messages"] == 1


@pytest.mark.timeout(10)
def test_a_worker_reply_that_relaying_would_make_too_long_fails_its_request_only(memory):
    """1024 frames from a worker would be 1025 to the client, with the worker id: the
    client would refuse that, and the BATCH that carries it with other requests' ENDs."""
    broker = memory.broker
    client = memory.connect(broker.frontend, b"c1")
    worker = memory.connect(broker.backend, b"w1")
    worker.send_multipart(p.encode_ready(p.Ready("w1", ["generate"])))
    memory.read(broker.backend)
    for rid in (b"big", b"small"):
        client.send_multipart(p.encode_request_to_broker(p.Request(rid, "generate", b"{}")))
    memory.read(broker.frontend)
    big, small = (m.rid for m in memory.to_worker(b"w1") if type(m) is p.Request)
    reply = p.encode_reply_from_worker(p.Chunk(big, [b"x"] * (p.MAX_FRAMES - 3)))
    assert len(reply) == p.MAX_FRAMES
    worker.send_multipart(reply)
    worker.send_multipart(p.encode_reply_from_worker(p.End(small, [b"fine"])))
    memory.read(broker.backend)
    memory.flush()
    assert client.poll(5000)
    received = [p.decode_to_client(m) for m in p.unbatch(client.recv_multipart())]
    replies = {m.rid: m for m in received}
    assert replies[b"big"].code == p.E_LIMIT
    assert replies[b"small"].chunks == [b"fine"]
    assert memory.core.totals["oversized_messages"] == 1


@pytest.mark.timeout(10)
def test_one_pass_takes_a_bounded_number_of_messages(memory):
    broker = memory.broker
    client = memory.connect(broker.frontend, b"c1")
    heartbeat = p.encode_heartbeat()
    for _ in range(server.READ_MESSAGES // 100 + 2):  # batches of 100 messages each
        client.send_multipart(p.encode_batch([heartbeat] * 100))
    client.send_multipart(p.encode_stats_request(p.StatsRequest(b"last")))
    assert broker.frontend.poll(1000)
    broker._read(broker.frontend)
    answered = memory.to_client(b"c1")
    assert len(answered) == server.READ_MESSAGES
    memory.read(broker.frontend)
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
        assert not memory.core.registry.by_id and not memory.core.registry.by_service
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
    registry = memory.core.registry
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
        stats = memory.stats()
        assert [w["id"] for w in stats["workers"]] == ["w1", "w2", "w3"]
        assert stats["workers"][1]["state"] == "evicted"
        broker = stats["broker"]
        assert broker["workers_truncated"] is True
        counts = (broker["workers_ready"], broker["workers_live"], broker["workers_departed"])
        assert counts == (4, 4, 1)
    finally:
        memory.close()


# --- overload: the queue ------------------------------------------------------------------


def queue_of_one_busy_worker(*overrides: str) -> tuple[MemoryBroker, bytes]:
    """A broker whose one worker (capacity 1) is busy with a request of client c0."""
    memory = MemoryBroker(None, *overrides)
    worker = memory.register("w1", capacity=1)
    memory.request(b"c0", b"busy")
    return memory, worker


def third_request_refused(memory: MemoryBroker, code: str, key: str) -> None:
    """A client's third request is refused with `code`, and the message names the config
    key; another client's request is taken."""
    for rid in (b"r1", b"r2", b"r3"):
        memory.request(b"greedy", rid)
    [refused] = memory.to_client(b"greedy")
    assert (refused.rid, refused.code) == (b"r3", code)
    assert key in refused.message
    memory.request(b"other", b"r1")
    assert memory.to_client(b"other") == []


def test_a_client_may_fill_only_its_share_of_the_queue():
    memory, _ = queue_of_one_busy_worker("Broker.max_queue_per_client=2")
    try:
        third_request_refused(memory, p.E_QUEUE_FULL, "Broker.max_queue_per_client")
        assert memory.core.queued_by_client == {b"greedy": 2, b"other": 1}
    finally:
        memory.close()


def test_a_queue_that_cannot_drain_in_time_refuses_at_once_and_says_when_to_retry():
    memory, worker = queue_of_one_busy_worker("Broker.queue_timeout=2.5")
    try:
        memory.request(b"c1", b"r1")  # waits: the drain rate is not known yet
        started = time.monotonic()
        rid = memory.to_worker(worker)[-1].rid
        memory.from_worker(worker, p.encode_reply_from_worker(p.End(rid)))  # r1 leaves
        # One request left the queue in the last second: it drains at about 1 a second.
        memory.core.on_tick(started + 1.0)
        rate = memory.core.drain_rates["generate"].rate
        assert 0.5 < rate <= 1.0
        for n in range(2, 6):
            memory.request(b"c1", b"r%d" % n)
        refusals = [m for m in memory.to_client(b"c1") if type(m) is p.Error]
        # r2 and r3 can leave within 2.5 s at that rate; r4 and r5 cannot, and are told so now.
        assert [m.rid for m in refusals] == [b"r4", b"r5"]
        assert {m.code for m in refusals} == {p.E_QUEUE_FULL}
        assert p.retry_after(refusals[0].message) == math.ceil(min(3 / rate, 2.5))
        assert "the queue would take" in refusals[0].message
    finally:
        memory.close()


def ask_stats(memory: MemoryBroker, client: bytes) -> None:
    memory.from_client(client, p.encode_stats_request(p.StatsRequest(b"s")))


def test_a_client_asking_for_stats_in_a_loop_waits_for_one_shared_build():
    memory = MemoryBroker(None, "Broker.stats_interval=60")
    ask = functools.partial(ask_stats, memory)
    try:
        for _ in range(core.FRESH_STATS):
            ask(b"looping")
        assert len(memory.to_client(b"looping")) == core.FRESH_STATS  # answered at once
        ask(b"looping")
        ask(b"looping")
        memory.request(b"c1", b"r1")  # changes the stats after those STATS arrived
        ask(b"other")  # another client's first STATS in the interval: at once
        other = memory.to_client(b"other")[0].stats
        assert memory.to_client(b"looping") == []  # waiting for the next build
        now = time.monotonic()
        memory.core.on_tick(now)
        shared = [m.stats for m in memory.to_client(b"looping")]
        assert len(shared) == 2 and shared[0] == shared[1]  # one build for both
        assert shared[0]["broker"]["requests"] == other["broker"]["requests"]
        ask(b"looping")
        memory.core.on_tick(now + 1)  # within the interval of the last build: still waiting
        assert memory.to_client(b"looping") == []
    finally:
        memory.close()


def test_waiting_stats_are_bounded_per_client_and_share_one_encoding():
    memory = MemoryBroker(None, "Broker.stats_interval=60")
    ask = functools.partial(ask_stats, memory)
    try:
        for _ in range(core.FRESH_STATS + core.MAX_STATS_WAITING_PER_CLIENT + 1):
            ask(b"looping")
        for _ in range(core.FRESH_STATS):
            ask(b"other")
        assert len(memory.to_client(b"other")) == core.FRESH_STATS
        ask(b"other")  # waits, though "looping" has its share waiting
        answered = memory.to_client(b"looping")
        assert len(answered) == core.FRESH_STATS + 1
        assert answered[-1].code == p.E_LIMIT
        memory.core.on_tick(time.monotonic())
        replies = [*memory.core.to_clients[b"looping"],
                   *memory.core.to_clients[b"other"]]
        assert len(replies) == core.MAX_STATS_WAITING_PER_CLIENT + 1
        assert all(reply[3] is replies[0][3] for reply in replies)  # serialized once
        ask(b"looping")  # the build answered the waiting ones: room again
        assert memory.core.stats_waiting == [(b"looping", b"s", "")]
    finally:
        memory.close()


def test_reports_are_refused_past_their_total_bytes_and_counted(memory):
    counters = {"padding": "x" * 60_000}
    for n in range(20):
        memory.from_client(b"g%d" % n, p.encode_report(p.Report(f"g{n}", counters)))
    kept = memory.stats()["gateways"]
    assert len(kept) == (1 << 20) // len(orjson.dumps(counters))
    assert memory.core.totals["reports_refused"] == 20 - len(kept)


def test_retry_after_travels_at_the_end_of_an_error_message():
    assert p.retry_after(p.with_retry_after("busy", 2.1)) == 3
    assert p.retry_after(p.with_retry_after("busy", 0.2)) == 1
    assert p.retry_after("busy (retry after soon)") is None


def test_the_drain_rate_of_a_queue_is_forgotten_once_it_idles():
    memory, worker = queue_of_one_busy_worker()
    try:
        memory.request(b"c1", b"r1")
        rid = memory.to_worker(worker)[-1].rid
        memory.from_worker(worker, p.encode_reply_from_worker(p.End(rid)))
        now = time.monotonic()
        memory.core.on_tick(now + 1)
        assert memory.core.drain_rates["generate"].rate > 0
        memory.core.on_tick(now + 2)  # an interval with nothing waiting or taken
        assert memory.core.drain_rates == {}
    finally:
        memory.close()


def test_a_queue_that_stops_draining_has_no_rate_rather_than_a_decaying_one():
    rate = core.DrainRate(0.0)
    rate.taken = 2
    rate.update(1.0, waiting=True)
    assert rate.wait(4) == 2.0  # 2 a second
    now = 1.0
    for _ in range(20):  # 10 s in which requests wait and none leave
        now += core.DRAIN_RATE_INTERVAL
        assert rate.update(now, waiting=True)
    assert rate.wait(4) == 0.0  # unknown: requests wait rather than being refused
    rate.taken = 1
    rate.update(now + 1.0, waiting=True)
    assert rate.wait(4) == 4.0  # measured again from what drains now


def test_the_retry_after_of_a_slow_queue_is_at_most_the_queue_timeout():
    memory, worker = queue_of_one_busy_worker("Broker.queue_timeout=2.5")
    try:
        memory.request(b"c1", b"r1")
        started = time.monotonic()
        rid = memory.to_worker(worker)[-1].rid
        memory.from_worker(worker, p.encode_reply_from_worker(p.End(rid)))  # r1 leaves
        memory.core._expire_queued(started + 50.0)  # one request left in 50 s
        memory.request(b"c1", b"r2")  # would take 50 s to leave the queue at that rate
        [refused] = [m for m in memory.to_client(b"c1") if type(m) is p.Error]
        assert (refused.rid, refused.code) == (b"r2", p.E_QUEUE_FULL)
        assert p.retry_after(refused.message) == 3  # Broker.queue_timeout, rounded up
    finally:
        memory.close()


def test_a_client_may_hold_only_so_many_requests_in_the_broker():
    memory = MemoryBroker(None, "Broker.max_requests_per_client=2")
    try:
        worker = memory.register("w1")
        third_request_refused(memory, p.E_LIMIT, "Broker.max_requests_per_client")
        for message in memory.to_worker(worker):
            memory.from_worker(worker, p.encode_reply_from_worker(p.End(message.rid)))
        assert memory.core.requests_by_client == {}  # nothing is kept of a client with nothing
    finally:
        memory.close()
