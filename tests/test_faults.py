"""Failure semantics with real processes: dead workers, broker restarts, drain, deadlines."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import zmq

from zroute import protocol as p
from zroute.client import BlockingClient, BrokerError, Client
from tests.support import all_idle, wait_until

FOUR_WORDS = {"text": "a,b,c,d"}
FOUR_LINES = [b"Hello a!\n", b"Hello b!\n", b"Hello c!\n", b"Hello d!\n"]


def worker_state(stack, worker_id: str) -> str | None:
    for w in stack.stats()["workers"]:
        if w["id"] == worker_id:
            return w["state"]
    return None


async def collect(stream) -> tuple[list[bytes], BaseException | None]:
    """The chunks a stream delivered, and the error that ended it (None if it completed)."""
    chunks = []
    try:
        async for chunk in stream:
            chunks.append(chunk)
    except BrokerError as e:
        return chunks, e
    return chunks, None


@pytest.mark.timeout(60)
def test_kill_one_of_three_workers_with_100_requests_in_flight(stack):
    stack.broker()
    workers = {f"w{i}": stack.worker(f"w{i}", sleep_time=0.5) for i in (1, 2, 3)}
    stack.wait_workers("w1", "w2", "w3")

    async def scenario():
        async with Client(stack.frontend, timeout=30) as client:
            tasks = []
            for _ in range(100):  # arrivals over about 1 s, so some have no chunk yet at the kill
                tasks.append(asyncio.create_task(collect(client.round_robin("generate", FOUR_WORDS))))
                await asyncio.sleep(0.01)
            workers["w2"].kill()
            return await asyncio.wait_for(asyncio.gather(*tasks), 20)

    outcomes = asyncio.run(scenario())
    succeeded = [chunks for chunks, error in outcomes if error is None]
    failed = [(chunks, error) for chunks, error in outcomes if error is not None]
    assert len(succeeded) + len(failed) == 100  # none hung
    assert all(chunks == FOUR_LINES for chunks in succeeded)
    # A request fails only if it had started streaming: the others were retried.
    assert failed, "the killed worker held streaming requests"
    for chunks, error in failed:
        assert error.code == "worker_lost"
        assert 0 < len(chunks) < 4
    stats = stack.stats()
    assert stats["broker"]["retries"] > 0
    assert worker_state(stack, "w2") == "evicted"
    wait_until(lambda: all_idle(stack.stats()), 5, "in-flight to return to 0")


@pytest.mark.timeout(40)
def test_broker_restart_workers_and_clients_come_back(stack):
    broker = stack.broker()
    stack.worker("w1", sleep_time=0.3)
    stack.wait_workers("w1")

    async def scenario():
        async with Client(stack.frontend, timeout=20) as client:
            assert await client.round_robin("generate", {"text": "x"}).read() == b"Hello x!\n"
            in_flight = client.round_robin("generate", {"text": "a,b,c,d,e,f,g,h"})
            assert await in_flight.first() == b"Hello a!\n"
            broker.kill()
            killed = time.monotonic()
            # The closed connection fails the request at once, not after 3 missed heartbeats.
            chunks, error = await asyncio.wait_for(collect(in_flight), 10)
            assert time.monotonic() - killed < 2.0
            assert (error.code, error.message) == (
                "broker_unreachable", f"the connection to the broker at {stack.frontend} closed")
            assert chunks[0] == b"Hello a!\n" and len(chunks) < 8
            assert not client.broker_alive  # a gateway answers 503 at once from here
            broker.popen.wait()
            restarted = stack.broker()
            started = time.monotonic()
            # Serving resumes within 2 s of the broker being back.
            while True:
                try:
                    reply = await client.round_robin("generate", {"text": "y"}, timeout=2).read()
                    break
                except BrokerError:
                    assert time.monotonic() - started < 6
            assert reply == b"Hello y!\n"
            return time.monotonic() - started, restarted

    elapsed, _ = asyncio.run(scenario())
    assert elapsed < 6


@pytest.mark.timeout(30)
def test_sigterm_drains_in_flight_requests(stack):
    stack.broker()
    # After the first chunk, 1.6 s of work remain: time enough to see the draining state.
    draining = stack.worker("w1", sleep_time=0.8)
    stack.wait_workers("w1")

    async def scenario():
        async with Client(stack.frontend, timeout=20) as client:
            streams = [client.direct("generate", {"text": "a,b,c"}, "w1") for _ in range(5)]
            await asyncio.gather(*(s.first() for s in streams))
            draining.signal(signal.SIGTERM)
            # Draining while its requests run; evicted only once they have ended.
            wait_until(lambda: worker_state(stack, "w1") == "draining", 5, "w1 to drain")
            # A draining worker gets no new requests.
            with pytest.raises(BrokerError) as refused:
                await client.direct("generate", {"text": "late"}, "w1").read()
            assert refused.value.code == "no_such_worker"
            return await asyncio.gather(*(s.read() for s in streams))

    replies = asyncio.run(scenario())
    assert replies == [b"Hello a!\nHello b!\nHello c!\n"] * 5  # nothing was cut
    assert draining.popen.wait(10) == 0
    assert worker_state(stack, "w1") == "evicted"


@pytest.mark.timeout(30)
def test_deadline_cancels_the_worker(stack):
    stack.broker()
    worker = stack.worker("w1", sleep_time=5)
    stack.wait_workers("w1")

    async def scenario():
        async with Client(stack.frontend) as client:
            started = time.monotonic()
            with pytest.raises(BrokerError) as ended:
                await client.round_robin("generate", {"text": "slow"}, timeout=0.5).read()
            return ended.value, time.monotonic() - started

    error, elapsed = asyncio.run(scenario())
    assert error.code == "timeout"
    assert 0.5 <= elapsed < 1.5
    wait_until(lambda: "cancelled" in worker.output(), 5, "the worker to see the CANCEL")
    assert stack.stats()["broker"]["timeouts"] == 1
    wait_until(lambda: all_idle(stack.stats()), 5, "in-flight to return to 0")


@pytest.mark.timeout(40)
def test_stopped_worker_is_evicted_and_comes_back(stack):
    stack.broker("--Broker.heartbeat_interval=0.2")
    frozen = stack.worker("w1", "--Broker.heartbeat_interval=0.2")
    stack.worker("w2", "--Broker.heartbeat_interval=0.2")
    stack.wait_workers("w1", "w2")
    frozen.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: worker_state(stack, "w1") == "evicted", 5, "w1 to be evicted")
        with BlockingClient(stack.frontend, timeout=10) as client:
            for _ in range(4):  # never routed to the evicted worker
                assert b"".join(client.request("generate", {"text": "z"})) == b"Hello z!\n"
    finally:
        frozen.signal(signal.SIGCONT)
    wait_until(lambda: worker_state(stack, "w1") == "ready", 10, "w1 to register again")
    assert stack.stats()["broker"]["evictions"] >= 1


@pytest.mark.timeout(30)
def test_restarted_worker_takes_its_id_back(stack):
    broker = stack.broker()
    first = stack.worker("w1")
    stack.wait_workers("w1")
    first.kill()
    first.popen.wait()
    stack.worker("w1")
    started = time.monotonic()
    wait_until(lambda: broker.output().count("worker w1 ready") == 2, 10, "the new w1")
    with BlockingClient(stack.frontend, timeout=10) as client:
        assert b"".join(client.request("generate", {"text": "again"}, policy="direct",
                                       worker="w1")) == b"Hello again!\n"
    assert time.monotonic() - started < 5


@pytest.mark.timeout(30)
def test_direct_request_to_a_gone_worker_is_never_rerouted(stack):
    stack.broker()
    gone = stack.worker("w1")
    stack.worker("w2")
    stack.wait_workers("w1", "w2")
    gone.stop()
    wait_until(lambda: worker_state(stack, "w1") == "evicted", 5, "w1 to leave")
    with BlockingClient(stack.frontend, timeout=10) as client:
        with pytest.raises(BrokerError) as refused:
            list(client.request("generate", {"text": "x"}, policy="direct", worker="w1"))
    assert refused.value.code == "no_such_worker"
    assert "w1" in refused.value.message


@pytest.mark.timeout(30)
def test_ready_with_an_id_of_a_live_worker_is_refused(stack):
    stack.broker()
    stack.worker("w1")
    stack.wait_workers("w1")
    context = zmq.Context()
    impostor = context.socket(zmq.DEALER)
    impostor.linger = 0
    impostor.connect(stack.backend)
    try:
        impostor.send_multipart(p.encode_ready(p.Ready("w1", ["generate"], 0)))
        assert impostor.poll(5000)
        [reply] = [p.decode_to_worker(m) for m in p.unbatch(impostor.recv_multipart())]
        assert isinstance(reply, p.Error) and reply.code == "worker_id_in_use"
        with BlockingClient(stack.frontend, timeout=10) as client:
            assert b"".join(client.request("generate", {"text": "still"})) == b"Hello still!\n"
    finally:
        impostor.close()
        context.term()


@pytest.mark.timeout(30)
def test_oversized_frame_drops_the_peer_not_the_broker(stack):
    stack.broker("--Broker.max_message_size=65536")
    stack.worker("w1")
    stack.wait_workers("w1")
    with BlockingClient(stack.frontend, timeout=10) as big, BlockingClient(stack.frontend, timeout=10) as normal:
        list_error = None
        try:
            list(big.request("generate", {"text": "x" * 100_000}, timeout=1))
        except BrokerError as e:
            list_error = e
        assert list_error is not None  # the broker dropped the connection: no reply came
        assert b"".join(normal.request("generate", {"text": "ok"})) == b"Hello ok!\n"


@pytest.mark.timeout(30)
def test_a_chunk_over_the_brokers_limit_fails_its_request_only(stack):
    """Sent, it would make the broker drop the worker's connection, and with it every
    other stream the worker runs."""
    limit = "--Broker.max_message_size=1048576"
    stack.broker(limit)
    worker = stack.worker("w1", limit, "--handler", "tests.handlers:sized")
    stack.wait_workers("w1")

    async def scenario():
        async with Client(stack.frontend, timeout=10) as client:
            slow = client.round_robin("generate", {"bytes": 10, "seconds": 1})
            await slow.first()  # it runs on the worker
            big = client.round_robin("generate", {"bytes": 1048577})
            return await collect(big), await collect(slow)

    (big_chunks, big_error), slow_reply = asyncio.run(scenario())
    assert big_chunks == [b"start\n"] and big_error.code == "handler_error"
    message = ("the handler yielded a chunk of 1048577 bytes, more than "
               "Broker.max_message_size (1048576 bytes); yield it in smaller pieces")
    assert big_error.message == message
    assert slow_reply == ([b"start\n", b"z" * 10], None)
    assert message in worker.output() and "Traceback" not in worker.output()
    stats = stack.stats()
    assert stats["broker"]["evictions"] == 0 and worker_state(stack, "w1") == "ready"


@pytest.mark.timeout(30)
def test_a_reader_that_falls_behind_is_cut_off_not_buffered(stack):
    stack.broker()
    worker = stack.worker("w1", "--handler", "tests.handlers:forty_mebibytes")
    stack.wait_workers("w1")

    async def scenario():
        async with Client(stack.frontend) as client:
            stream = client.round_robin("generate", {})
            await stream.first()
            deadline = time.monotonic() + 10
            while not stream.done:  # not reading: the chunks pile up in the stream
                assert time.monotonic() < deadline, "the stream was never cut off"
                await asyncio.sleep(0.02)
            return await collect(stream)

    chunks, error = asyncio.run(scenario())
    assert error is not None and error.code == "slow_reader"
    assert 16 <= len(chunks) < 40  # what was buffered is still delivered, then the error
    wait_until(lambda: "cancelled" in worker.output(), 5, "the worker to see the CANCEL")
    wait_until(lambda: all_idle(stack.stats()), 5, "in-flight to return to 0")


@pytest.mark.timeout(30)
def test_a_vanished_client_has_its_requests_cancelled(stack):
    stack.broker()
    worker = stack.worker("w1", "--handler", "tests.handlers:ticks")
    stack.wait_workers("w1")
    context = zmq.Context()
    client = context.socket(zmq.DEALER)
    client.linger = 0
    client.connect(stack.frontend)
    client.send_multipart(p.encode_request_to_broker(p.Request(b"r1", "generate", b"{}")))
    assert client.poll(5000)
    first = p.unbatch(client.recv_multipart())[0]
    assert isinstance(p.decode_to_client(first), p.Chunk)
    client.close()
    context.term()
    wait_until(lambda: "cancelled" in worker.output(), 5, "the worker to see the CANCEL")
    wait_until(lambda: all_idle(stack.stats()), 5, "in-flight to return to 0")


@pytest.mark.timeout(30)
def test_a_handler_yielding_what_json_cannot_carry_fails_its_request_only(stack):
    stack.broker()
    worker = stack.worker("w1", "--handler", "tests.handlers:yields_a_set")
    worker.expect(0, traceback=True)  # it logs each failure with its traceback
    stack.wait_workers("w1")
    with BlockingClient(stack.frontend, timeout=10) as client:
        for _ in range(2):  # and the worker goes on serving
            with pytest.raises(BrokerError) as failed:
                list(client.request("generate", {}))
            assert failed.value.code == "handler_error"
    assert worker_state(stack, "w1") == "ready"
    assert ("TypeError: the handler 'yields_a_set' yielded a set, which is not str, bytes or "
            "a value JSON can carry") in worker.output()


@pytest.mark.timeout(30)
def test_a_second_worker_with_a_live_workers_id_exits_with_one_line(stack):
    stack.broker()
    stack.worker("w1")
    stack.wait_workers("w1")
    twin = stack.worker("w1")
    twin.expect(2)
    assert twin.popen.wait(10) == 2
    errors = [line for line in twin.output().splitlines() if "error: --id" in line]
    assert errors == ["zroute worker: error: --id: worker id 'w1' is in use by a live worker"]
    assert stack.ready_workers() == ["w1"]


@pytest.mark.timeout(30)
def test_a_queued_direct_request_waits_for_its_worker_without_blocking_others(stack):
    stack.broker()
    stack.worker("w1", "--capacity", "1", sleep_time=0.5)
    stack.worker("w2", "--capacity", "1", sleep_time=0.05)
    stack.wait_workers("w1", "w2")

    async def scenario():
        async with Client(stack.frontend) as client:
            busy = client.direct("generate", {"text": "a,b"}, "w1")
            await busy.first()  # w1 is full now
            waiting = client.direct("generate", {"text": "later"}, "w1")
            other = client.round_robin("generate", {"text": "now"})
            assert await other.read() == b"Hello now!\n"
            assert other.worker_id == "w2"
            assert not busy.done  # the request behind the direct one did not wait for w1
            assert not waiting.done
            assert await waiting.read() == b"Hello later!\n"
            assert waiting.worker_id == "w1"
            await busy.read()

    asyncio.run(scenario())
    assert stack.stats()["broker"]["queued"] == 1
