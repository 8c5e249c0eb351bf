"""The two Python clients as a user calls them: BlockingClient's streams, the calling
forms of NVIDIA Dynamo's seed, and addresses that are not ZeroMQ endpoints."""

from __future__ import annotations

import asyncio
import gc
import sys

import pytest

from zroute import protocol as p
from zroute.client import BlockingClient, BlockingStream, BrokerError, Client
from zroute.endpoints import endpoint_problem
from zroute.settings import WorkerSettings, BrokerLink
from tests.handlers import CANCELLED_LINE, MEBIBYTE
from tests.support import Stack, async_wait_until, returned_types, wait_until


def start(stack: Stack, *worker_ids: str) -> None:
    stack.broker()
    for worker_id in worker_ids:
        stack.worker(worker_id)
    stack.wait_workers(*worker_ids, timeout=20)


def hang_worker(stack: Stack):
    stack.broker()
    worker = stack.worker("hanger", "--handler", "tests.handlers:hang", "--service", "hang")
    stack.wait_workers("hanger", timeout=20)
    return worker


@pytest.fixture
def unraisable(monkeypatch) -> list:
    """What Python would print as `Exception ignored in: ...`."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    return seen


@pytest.mark.timeout(40)
def test_a_blocking_stream_reads_like_the_async_one(stack):
    start(stack, "w1", "1")
    with BlockingClient(stack.frontend, timeout=10) as client:
        stream = client.direct("generate", {"text": "a,b"}, "w1")
        assert isinstance(stream, BlockingStream) and stream.worker_id is None
        assert next(stream) == b"Hello a!\n"
        assert stream.worker_id == "w1"
        assert stream.read() == b"Hello b!\n"
        assert stream.done and stream.complete
        # Several streams at once, read in any order.
        first = client.round_robin("generate", "x,y")
        second = client.random("generate", "z")
        assert second.read() == b"Hello z!\n"
        assert list(first) == [b"Hello x!\n", b"Hello y!\n"]
        with pytest.raises(BrokerError) as caught:
            client.direct("generate", "x", "nobody").read()
        assert caught.value.code == p.E_NO_SUCH_WORKER
        # Dynamo's worker ids are integers: any id is taken by its str().
        assert client.direct("generate", "n", 1).read() == b"Hello n!\n"


@pytest.mark.timeout(40)
def test_the_async_client_takes_a_worker_id_by_its_str(stack):
    start(stack, "1")

    async def main():
        async with Client(stack.frontend, timeout=10) as client:
            return await client.direct("generate", "n", 1).read()

    assert asyncio.run(main()) == b"Hello n!\n"


@pytest.mark.timeout(40)
def test_leaving_a_blocking_stream_cancels_it_on_the_worker(stack, unraisable):
    worker = hang_worker(stack)
    with BlockingClient(stack.frontend, timeout=10) as client:
        with client.request("hang", {"marker": "with"}) as stream:
            assert next(stream) == b"first\n"
        wait_until(lambda: CANCELLED_LINE.format(marker="with") in worker.output(),
                   what="the end of a with block to cancel the handler")
        assert stream.done and not stream.complete
        stream.cancel()  # again: nothing happens

        for chunk in client.request("hang", {"marker": "dropped"}):
            break  # the stream is dropped: its finalizer cancels it
        wait_until(lambda: CANCELLED_LINE.format(marker="dropped") in worker.output(),
                   what="a dropped stream to cancel the handler")
    assert unraisable == []


@pytest.mark.timeout(40)
def test_a_stream_kept_past_its_client_ends_with_client_closed_and_silently(stack, unraisable):
    worker = hang_worker(stack)
    with BlockingClient(stack.frontend, timeout=10) as client:
        kept = client.request("hang", {"marker": "kept"})
        for chunk in kept:
            break
    # Leaving the client's with block cancelled what it still had open.
    wait_until(lambda: CANCELLED_LINE.format(marker="kept") in worker.output(),
               what="closing the client to cancel the handler")
    with pytest.raises(BrokerError) as caught:
        next(kept)
    assert caught.value.code == p.E_CLIENT_CLOSED
    kept.cancel()
    del kept, chunk
    gc.collect()
    assert unraisable == []



@pytest.mark.timeout(40)
def test_a_blocking_stream_left_unread_ends_with_slow_reader_and_is_cancelled(stack):
    stack.broker()
    worker = stack.worker("flooder", "--handler", "tests.handlers:flood", "--service", "flood")
    stack.wait_workers("flooder", timeout=20)
    limit = 256 << 10
    unread_cancelled = CANCELLED_LINE.format(marker="unread")
    with BlockingClient(stack.frontend, timeout=30, max_buffered_bytes=limit) as client:
        unread = client.request("flood", {"marker": "unread"})
        with client.request("flood", {"marker": "read"}) as read:
            # While this stream is read, the other one's chunks arrive with nobody to read
            # them: past the limit the client cancels it on the worker.
            for count, _ in enumerate(read):
                if count % 16 == 0 and unread_cancelled in worker.output():
                    break
                assert count < 64 << 10, "64 MiB read, and the unread stream still goes"
        buffered = []
        with pytest.raises(BrokerError) as caught:
            buffered.extend(unread)
    assert caught.value.code == p.E_SLOW_READER
    assert limit <= sum(map(len, buffered)) <= limit + (64 << 10)  # one message more at most

@pytest.mark.timeout(40)
def test_an_async_stream_cut_by_closing_its_client_does_not_read_as_complete(stack):
    hang_worker(stack)

    async def main():
        async with Client(stack.frontend, timeout=10) as client:
            stream = client.request("hang", {"marker": "cut"})
            assert await stream.__anext__() == b"first\n"
        assert not stream.complete
        with pytest.raises(BrokerError) as caught:
            await stream.__anext__()
        return caught.value.code

    assert asyncio.run(main()) == p.E_CLIENT_CLOSED


@pytest.mark.parametrize("address", ["localhost:5555", "127.0.0.1:5555", "http://127.0.0.1:5555",
                                     "tcp://127.0.0.1", "tcp://:5555", ""])
def test_both_clients_explain_an_address_that_is_not_an_endpoint(address):
    problem = endpoint_problem(address)
    assert problem
    with pytest.raises(ValueError) as caught:
        BlockingClient(address)
    assert str(caught.value) == problem
    with pytest.raises(ValueError) as caught:
        Client(address)
    assert str(caught.value) == problem


def test_an_endpoint_problem_suggests_the_fix():
    assert endpoint_problem("localhost:5555") == (
        "'localhost:5555' is not a ZeroMQ endpoint: use tcp://HOST:PORT "
        "(e.g. tcp://localhost:5555) or ipc:///path")
    assert endpoint_problem("tcp://127.0.0.1:5555") is None


def test_an_async_client_used_before_connecting_or_after_closing_says_so():
    async def main():
        client = Client()
        with pytest.raises(RuntimeError, match="the client is not connected: use `async with"):
            client.round_robin("generate", "x")
        async with client:
            pass
        with pytest.raises(BrokerError) as caught:
            client.round_robin("generate", "x")
        assert caught.value.code == p.E_CLIENT_CLOSED
        with pytest.raises(BrokerError):
            await client.stats()

    asyncio.run(main())


def test_a_blocking_client_used_after_closing_says_so():
    client = BlockingClient()
    client.close()
    for call in (lambda: client.request("generate", "x"), client.stats):
        with pytest.raises(BrokerError) as caught:
            call()
        assert caught.value.code == p.E_CLIENT_CLOSED


def test_a_worker_checks_its_broker_address_and_takes_any_id():
    from worker.runtime import Worker
    with pytest.raises(ValueError) as caught:
        Worker(WorkerSettings(), BrokerLink("localhost:5556"), "w1", {"generate": None})
    assert str(caught.value) == endpoint_problem("localhost:5556")
    assert Worker(WorkerSettings(), BrokerLink("tcp://127.0.0.1:5556"), 7,
                  {"generate": None}).worker_id == "7"


def test_every_message_the_broker_may_send_a_client_has_a_handler():
    assert set(Client().message_handlers) == returned_types(p.decode_to_client)


@pytest.mark.timeout(40)
def test_a_chunk_over_the_buffer_limit_reaches_a_fast_reader_and_a_slow_one_is_cut(stack):
    """Only bytes a reader leaves unread count against its limit: one chunk larger than
    it passes, a second one that finds it still unread ends the stream."""
    stack.broker()
    stack.worker("sizer", "--handler", "tests.handlers:sized", "--service", "sized")
    stack.worker("flooder", "--handler", "tests.handlers:forty_mebibytes", "--service", "flood")
    stack.wait_workers("sizer", "flooder", timeout=20)
    limit = 256 << 10
    big = {"bytes": 600_000}
    with BlockingClient(stack.frontend, timeout=20, max_buffered_bytes=limit) as client:
        assert list(client.request("sized", big)) == [b"start\n", b"z" * 600_000]

    async def readers() -> tuple[list[bytes], list[bytes]]:
        async with Client(stack.frontend, timeout=20, max_buffered_bytes=limit) as client:
            fast = [chunk async for chunk in client.round_robin("sized", big)]
            slow = client.round_robin("flood", {})  # 1 MiB chunks
            await slow.first()
            await async_wait_until(lambda: slow.done, what="the unread stream to end")
            unread = []
            with pytest.raises(BrokerError) as caught:
                async for chunk in slow:
                    unread.append(chunk)
            assert caught.value.code == p.E_SLOW_READER
            return fast, unread

    fast, unread = asyncio.run(readers())
    assert fast == [b"start\n", b"z" * 600_000]
    assert unread == [MEBIBYTE]  # the second one found the first unread


@pytest.mark.timeout(30)
def test_a_body_over_max_message_size_fails_alone_before_it_is_sent(stack):
    """Sent, it would close the connection, and fail the stream beside it too."""
    stack.broker("--Broker.max_message_size=1048576")
    stack.worker("sizer", "--handler", "tests.handlers:sized", "--service", "sized")
    stack.wait_workers("sizer")
    with BlockingClient(stack.frontend, timeout=10, max_message_size=1 << 20) as client:
        beside = client.request("sized", {"bytes": 10})
        with pytest.raises(BrokerError) as caught:
            client.request("sized", b"x" * ((1 << 20) + 1))
        assert caught.value.code == p.E_LIMIT
        assert caught.value.message == ("the body is 1048577 bytes, more than "
                                        "Broker.max_message_size (1048576 bytes)")
        assert list(beside) == [b"start\n", b"z" * 10]
