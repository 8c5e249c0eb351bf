"""The broker core end to end: a real `zroute broker` and real `zroute worker` processes
on free ports, driven with the project's Client and BlockingClient."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import time

import orjson
import pytest
import zmq

from zroute import protocol as p
from zroute.client import BlockingClient, BrokerError, Client
from tests.handlers import CANCELLED_LINE, STARTED_LINE
from tests.support import (Stack, all_idle, async_wait_until, free_port, run_zroute, wait_until,
                           workers_by_id)

SEED_BODY = {"text": "world,universe,galaxy"}
SEED_CHUNKS = [b"Hello world!\n", b"Hello universe!\n", b"Hello galaxy!\n"]


def start(stack: Stack, *worker_ids: str, sleep_time: float = 0) -> None:
    """A broker and greeting workers, all registered."""
    stack.broker()
    for worker_id in worker_ids:
        stack.worker(worker_id, sleep_time=sleep_time)
    stack.wait_workers(*worker_ids, timeout=20)


async def collect(stream) -> list[bytes]:
    return [chunk async for chunk in stream]


def run(coro):
    return asyncio.run(coro)


# A test that uses `shared` may be the one that starts it.
SHARED_TIMEOUT = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One broker and several workers for the tests that need no fresh counters:

    w1, w2    the greeting on "generate", sleep_time 0
    slow      the greeting on "slow", sleep_time 0.3
    file      "configured": greeting from a YAML file (-f)
    flag      "configured": the same file, and --Backend.greeting=Hi
    flaky1    tests.handlers:flaky on "flaky"
    flaky2    the same, with Backend.expose_errors
    """
    log_dir = tmp_path_factory.mktemp("shared")
    config = log_dir / "zroute.yaml"
    config.write_text('Backend:\n  greeting: "Howdy"\n  sleep_time: 5\n')
    s = Stack(log_dir)
    try:
        s.broker("--Broker.queue_timeout=0.2")
        s.worker("w1")
        s.worker("w2")
        s.worker("slow", "--service", "slow", sleep_time=0.3)
        s.worker("file", "--service", "configured", "-f", str(config))
        s.worker("flag", "--service", "configured", "-f", str(config), "--Backend.greeting=Hi")
        for worker_id, *extra in (("flaky1",), ("flaky2", "--Backend.expose_errors=true")):
            flaky = s.worker(worker_id, "--handler", "tests.handlers:flaky", "--service", "flaky",
                             *extra)
            flaky.expect(0, traceback=True)  # a handler that fails is logged with its traceback
        # Eight processes start at once: give a loaded machine time.
        s.wait_workers("w1", "w2", "slow", "file", "flag", "flaky1", "flaky2", timeout=40)
        yield s
    finally:
        s.close()


# --- routing policies ---------------------------------------------------------------


@pytest.mark.timeout(30)
def test_round_robin_gives_each_of_three_workers_exactly_a_third(stack):
    start(stack, "w1", "w2", "w3")

    async def main():
        async with Client(stack.frontend) as client:
            served_by = []
            for i in range(30):
                stream = client.round_robin("generate", {"text": f"n{i}"})
                assert await collect(stream) == [f"Hello n{i}!\n".encode()]
                served_by.append(stream.worker_id)
            return served_by

    served_by = run(main())
    # A rotation: each run of three requests visits every worker once, in the same order.
    assert sorted(served_by[:3]) == ["w1", "w2", "w3"]
    assert served_by == served_by[:3] * 10
    stats = stack.stats()
    assert {i: w["completed"] for i, w in workers_by_id(stats).items()} == \
        {"w1": 10, "w2": 10, "w3": 10}
    assert {i: w["failed"] for i, w in workers_by_id(stats).items()} == {"w1": 0, "w2": 0, "w3": 0}
    assert (stats["broker"]["requests"], stats["broker"]["completed"]) == (30, 30)


@pytest.mark.timeout(30)
def test_random_uses_both_workers(stack):
    start(stack, "w1", "w2")

    async def main():
        async with Client(stack.frontend) as client:
            streams = [client.random("generate", {"text": f"r{i}"}) for i in range(100)]
            outputs = await asyncio.gather(*(collect(s) for s in streams))
            assert outputs == [[f"Hello r{i}!\n".encode()] for i in range(100)]
            return [s.worker_id for s in streams]

    served_by = run(main())
    counts = {w: served_by.count(w) for w in ("w1", "w2")}
    assert counts["w1"] > 0 and counts["w2"] > 0
    assert counts["w1"] + counts["w2"] == 100
    # Not a rotation, as round robin's: some worker serves two requests in a row (that
    # none does by chance has a probability of 2 ** -99).
    assert any(a == b for a, b in zip(served_by, served_by[1:])), served_by
    stats = stack.stats()
    assert {i: w["completed"] for i, w in workers_by_id(stats).items()} == counts


@pytest.mark.timeout(30)
def test_direct_reaches_the_named_worker(stack):
    start(stack, "w1", "w2", "w3")
    plan = {"w1": 1, "w2": 4, "w3": 2}

    async def main():
        async with Client(stack.frontend) as client:
            for worker_id, count in plan.items():
                for i in range(count):
                    stream = client.direct("generate", {"text": f"{worker_id}-{i}"}, worker_id)
                    assert await collect(stream) == [f"Hello {worker_id}-{i}!\n".encode()]
                    assert stream.worker_id == worker_id

            with pytest.raises(BrokerError) as caught:
                await collect(client.direct("generate", {"text": "x"}, "ghost-7"))
            assert caught.value.code == p.E_NO_SUCH_WORKER
            assert "'ghost-7'" in caught.value.message

            # A worker that exists but does not serve the service is no such worker either.
            with pytest.raises(BrokerError) as caught:
                await collect(client.direct("other", {"text": "x"}, "w1"))
            assert caught.value.code == p.E_NO_SUCH_WORKER
            assert "'w1'" in caught.value.message

            with pytest.raises(BrokerError) as caught:
                await collect(client.direct("generate", {"text": "x"}, ""))
            assert caught.value.code == p.E_BAD_REQUEST

    run(main())
    stats = stack.stats()
    assert {i: w["completed"] for i, w in workers_by_id(stats).items()} == plan
    # Two requests were held and failed; the third was refused before it was held.
    assert (stats["broker"]["failed"], stats["broker"]["errors"]) == (2, 3)


@SHARED_TIMEOUT
def test_no_workers_and_unknown_policy(shared):
    # A request for a service nobody serves may wait Broker.queue_timeout (0.2 s) for a worker.
    before = shared.stats()["broker"]

    async def main():
        async with Client(shared.frontend) as client:
            with pytest.raises(BrokerError) as caught:
                await collect(client.request("nothing", {"text": "x"}))
            assert caught.value.code == p.E_NO_WORKERS
            assert "'nothing'" in caught.value.message

            with pytest.raises(BrokerError) as caught:
                await collect(client.request("generate", {"text": "x"}, policy="fastest"))
            assert caught.value.code == p.E_UNKNOWN_POLICY
            assert "'fastest'" in caught.value.message

            # Both failures leave the broker serving.
            assert await collect(client.request("generate", {"text": "x"})) == [b"Hello x!\n"]

    run(main())
    after = shared.stats()
    assert after["broker"]["completed"] - before["completed"] == 1
    assert after["broker"]["errors"] - before["errors"] == 2
    assert all_idle(after)


# --- the greeting handler ------------------------------------------------------------


@SHARED_TIMEOUT
def test_seed_output_is_exact(shared):
    async def main():
        async with Client(shared.frontend) as client:
            return await collect(client.request("generate", SEED_BODY))

    assert run(main()) == SEED_CHUNKS


@SHARED_TIMEOUT
def test_chunks_stream_as_they_are_produced(shared):
    async def main():
        async with Client(shared.frontend) as client:
            arrivals = []
            async for chunk in client.request("slow", SEED_BODY):  # sleep_time 0.3 per word
                arrivals.append((time.monotonic(), chunk))
            return arrivals

    arrivals = run(main())
    assert [chunk for _, chunk in arrivals] == SEED_CHUNKS
    first, last = arrivals[0][0], arrivals[-1][0]
    assert first < last - 0.4, f"the first chunk came {last - first:.3f} s before the last"


@SHARED_TIMEOUT
def test_greeting_strips_words_and_skips_empty_ones(shared):
    async def main():
        async with Client(shared.frontend) as client:
            return await collect(client.request("generate", {"text": " a, ,b ,"}))

    assert run(main()) == [b"Hello a!\n", b"Hello b!\n"]


NOT_A_TEXT = 'body must be a JSON object with a string field "text"'
NO_WORDS = '"text" has no words: give comma-separated words, e.g. "a,b"'


@SHARED_TIMEOUT
@pytest.mark.parametrize("body, message", [
    (b"\xff\xfe", "body is neither JSON nor UTF-8 text"),
    ({"words": "a"}, NOT_A_TEXT),
    ({"text": 5}, NOT_A_TEXT),
    (["a", "b"], NOT_A_TEXT),
    ({"text": " , ,"}, NO_WORDS),
    (" , ", NO_WORDS),
], ids=["not-utf8", "no-text", "text-not-string", "a-list", "no-words", "plain-no-words"])
def test_greeting_bad_body_is_bad_request(shared, body, message):
    async def main():
        async with Client(shared.frontend) as client:
            with pytest.raises(BrokerError) as caught:
                await collect(client.request("generate", body))
            return caught.value

    error = run(main())
    assert error.code == p.E_BAD_REQUEST
    assert error.message.startswith(message)


@SHARED_TIMEOUT
def test_the_seeds_calling_forms_work_awaited_streams_and_plain_string_bodies(shared):
    """What a user of the seed (NVIDIA Dynamo's simple pipeline) tries first."""
    async def main():
        async with Client(shared.frontend) as client:
            stream = await client.round_robin("generate", "world,universe,galaxy")
            awaited = [chunk async for chunk in stream]
            iterated = [chunk async for chunk in client.random("generate", " a, ,b ")]
            direct = await (await client.direct("generate", "x", "w2")).read()
            requested = await client.request("generate", b'"y"')  # a JSON string
            return awaited, iterated, direct, await requested.read(), requested.worker_id

    awaited, iterated, direct, requested, worker_id = run(main())
    assert awaited == SEED_CHUNKS
    assert iterated == [b"Hello a!\n", b"Hello b!\n"]
    assert direct == b"Hello x!\n"
    assert (worker_id, requested) in [("w1", b"Hello y!\n"), ("w2", b"Hello y!\n")]


@SHARED_TIMEOUT
def test_a_request_ended_by_its_deadline_names_the_timeout_and_its_value(shared):
    async def main():
        errors = []
        async with Client(shared.frontend, timeout=0.4) as client:
            for options in ({}, {"timeout": 0.3}):
                with pytest.raises(BrokerError) as caught:
                    await client.request("slow", {"text": "a,b,c,d"}, **options).read()
                errors.append((caught.value.code, caught.value.message))
        return errors

    assert run(main()) == [("timeout", "no reply within the client's timeout (0.4 s)"),
                           ("timeout", "no reply within the request's timeout (0.3 s)")]


@SHARED_TIMEOUT
def test_greeting_from_config_file_and_command_line_override(shared):
    async def main():
        async with Client(shared.frontend) as client:
            from_file = await collect(client.direct("configured", {"text": "a,b"}, "file"))
            from_flag = await collect(client.direct("configured", {"text": "a,b"}, "flag"))
            return from_file, from_flag

    from_file, from_flag = run(main())
    # --Backend.sleep_time=0 (from Stack.worker) beats the file's 5 s as well.
    assert from_file == [b"Howdy a!\n", b"Howdy b!\n"]
    assert from_flag == [b"Hi a!\n", b"Hi b!\n"]


# --- concurrency ---------------------------------------------------------------------


@pytest.mark.timeout(45)
def test_200_concurrent_requests(stack):
    sleep_time, count = 0.2, 200
    start(stack, "w1", "w2", sleep_time=sleep_time)

    async def main():
        async with Client(stack.frontend) as client, Client(stack.frontend) as observer:
            began = time.monotonic()
            streams = [client.request("generate", {"text": f"a{i},b{i}"}) for i in range(count)]
            readers = asyncio.gather(*(collect(s) for s in streams))

            # Sample the broker's stats while the requests run.
            peak = {"w1": 0, "w2": 0}
            while not readers.done():
                for w in (await observer.stats())["workers"]:
                    peak[w["id"]] = max(peak[w["id"]], w["inflight"])
                await asyncio.sleep(0.02)
            outputs = await readers
            elapsed = time.monotonic() - began
            return outputs, elapsed, peak, [s.worker_id for s in streams]

    outputs, elapsed, peak, served_by = run(main())
    assert outputs == [[f"Hello a{i}!\n".encode(), f"Hello b{i}!\n".encode()]
                       for i in range(count)]
    serial = count * sleep_time * 2
    assert elapsed < serial / 8, f"{count} requests took {elapsed:.2f} s (serially {serial:.0f} s)"
    assert max(peak.values()) > 1, f"never more than one request at once: {peak}"
    assert served_by.count("w1") == served_by.count("w2") == count // 2

    stats = stack.stats()  # every END was relayed, so the broker is done with them all
    assert all_idle(stats), stats
    assert {i: (w["inflight"], w["completed"], w["failed"])
            for i, w in workers_by_id(stats).items()} == {"w1": (0, 100, 0), "w2": (0, 100, 0)}
    assert (stats["broker"]["completed"], stats["broker"]["failed"]) == (count, 0)
    assert stats["broker"]["chunks"] == 2 * count


# --- handler errors and cancellation ---------------------------------------------------


@SHARED_TIMEOUT
def test_handler_exception_is_handler_error_and_worker_goes_on(shared):
    before = workers_by_id(shared.stats())["flaky1"]

    async def main():
        async with Client(shared.frontend) as client:
            failing = client.direct("flaky", {"fail": "boom 42"}, "flaky1")
            with pytest.raises(BrokerError) as caught:
                await collect(failing)
            after = client.direct("flaky", {"text": "again"}, "flaky1")
            return caught.value, failing.rid, await collect(after), after.worker_id

    error, rid, chunks, worker_id = run(main())
    assert error.code == p.E_HANDLER
    # The exception's text stays in the worker's log, under the request id the client chose.
    request_id, client_rid = re.fullmatch(r"the handler failed on (request=(\S+) client=[0-9a-f]+); "
                                          r"worker flaky1's log has the details",
                                          error.message).groups()
    assert client_rid == rid.decode()
    assert (chunks, worker_id) == ([b"fine again\n"], "flaky1")
    after = workers_by_id(shared.stats())["flaky1"]
    assert after["state"] == "ready"
    assert (after["completed"] - before["completed"], after["failed"] - before["failed"]) == (1, 1)
    flaky1 = next(proc for proc in shared.procs if proc.name == "flaky1")
    log = flaky1.output()
    assert f"worker flaky1: handler failed on {request_id}\nTraceback" in log
    assert "RuntimeError: boom 42" in log


@SHARED_TIMEOUT
def test_with_expose_errors_the_client_gets_the_exception_text(shared):
    async def main():
        async with Client(shared.frontend) as client:
            with pytest.raises(BrokerError) as caught:
                await collect(client.direct("flaky", {"fail": "boom 43"}, "flaky2"))
            return caught.value

    error = run(main())
    assert (error.code, error.message) == (p.E_HANDLER, "RuntimeError: boom 43")


@pytest.mark.timeout(30)
def test_a_worker_without_an_id_gets_a_random_one_that_names_no_host(stack):
    stack.broker()
    stack.start("anonymous", "worker", "--broker", stack.backend)
    ids = wait_until(stack.ready_workers, 10, "the worker to register")
    assert re.fullmatch(r"worker-[0-9a-f]{6}", ids[0])


@SHARED_TIMEOUT
def test_bad_request_messages_still_reach_the_client(shared):
    with BlockingClient(shared.frontend, timeout=10) as client:
        with pytest.raises(BrokerError) as caught:
            list(client.request("generate", {"text": 5}, worker="w1", policy="direct"))
    assert caught.value.code == p.E_BAD_REQUEST
    assert caught.value.message == 'body must be a JSON object with a string field "text"'


def _start_hang_worker(stack: Stack):
    stack.broker()
    worker = stack.worker("w1", "--handler", "tests.handlers:hang", "--service", "hang",
                          "--Backend.drain_timeout=1")
    stack.wait_workers("w1", timeout=20)
    return worker


async def _wait_cancelled(client: Client, worker, marker: str) -> dict:
    await async_wait_until(lambda: CANCELLED_LINE.format(marker=marker) in worker.output(),
                           10, f"the handler of {marker!r} to see CancelledError")

    async def idle():
        stats = await client.stats()
        return stats if all_idle(stats) else None

    return await async_wait_until(idle, 10, "inflight to return to 0")


def _assert_one_cancellation(stats: dict) -> None:
    assert stats["broker"]["cancelled"] == 1
    assert (stats["broker"]["completed"], stats["broker"]["failed"]) == (0, 1)
    w1 = workers_by_id(stats)["w1"]
    assert (w1["state"], w1["inflight"], w1["completed"], w1["failed"]) == ("ready", 0, 0, 1)


@pytest.mark.timeout(30)
def test_break_out_of_async_for_cancels_the_handler(stack):
    worker = _start_hang_worker(stack)

    async def main():
        async with Client(stack.frontend) as client:
            received = []
            async for chunk in client.request("hang", {"marker": "brk"}):
                received.append(chunk)
                break
            assert received == [b"first\n"]
            return await _wait_cancelled(client, worker, "brk")

    _assert_one_cancellation(run(main()))
    assert STARTED_LINE.format(marker="brk") in worker.output()


@pytest.mark.timeout(30)
def test_aclose_cancels_the_handler(stack):
    worker = _start_hang_worker(stack)

    async def main():
        async with Client(stack.frontend) as client:
            stream = client.request("hang", {"marker": "acl"})
            assert await stream.__anext__() == b"first\n"
            await stream.aclose()
            assert stream.done
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
            return await _wait_cancelled(client, worker, "acl")

    _assert_one_cancellation(run(main()))


# --- robustness ------------------------------------------------------------------------


def _random_message(rng: random.Random) -> list[bytes]:
    """Random frames whose first frame is never the protocol version."""
    frames = [rng.randbytes(rng.choice((0, 1, 2, 3, 8, 40, 300))) for _ in range(rng.randint(1, 8))]
    if frames[0] == p.VERSION:
        frames[0] = b"ZR?"
    return frames


@pytest.mark.timeout(40)
def test_garbage_on_both_sockets_leaves_the_broker_serving(stack):
    start(stack, "w1")
    before = stack.stats()["broker"]
    rng = random.Random(20240601)
    V = p.VERSION

    def request(rid, service=b"generate", timeout=b"0"):
        return [V, p.REQUEST, rid, service, b"", b"", timeout, b"{}"]

    # Malformed messages that name a request id are answered with bad_request.
    answered = {
        b"g-chunk": [V, p.CHUNK, b"g-chunk", b"w1", b"x"],  # not a client command
        b"g-text-timeout": request(b"g-text-timeout", timeout=b"soon"),
        b"g-huge-timeout": request(b"g-huge-timeout", timeout=b"1" + b"0" * 400),
        b"g-utf8": request(b"g-utf8", service=b"\xff"),
        b"g-short": [V, p.REQUEST, b"g-short", b"generate"],
        b"g-unknown": [V, b"\x7f", b"g-unknown"],  # no such command
    }
    to_broker_malformed = [
        *answered.values(),
        [b"ZR9", *request(b"g-version")[1:]],  # no answer in an unknown version
        [V],
        [b""],
        *(_random_message(rng) for _ in range(150)),
    ]
    to_broker_valid_but_wrong = [
        [V, p.CANCEL, b"never-sent"],  # a CANCEL for a request the broker does not hold
    ]
    from_worker_malformed = [
        [V, p.READY, b"ghost", b"{not json"],
        [V, p.READY, b"ghost", b'{"services": []}'],
        [V, p.READY, b"ghost", b'{"services": ["generate"], "capacity": true}'],
        [b"ZR0", p.READY, b"ghost", b'{"services": ["generate"]}'],
        [V, p.REQUEST, b"r", b"generate", b"{}"],  # not a worker command
        [V, p.CHUNK],
        *(_random_message(rng) for _ in range(150)),
    ]
    # Replies for requests nobody sent; from a stranger they also earn a DISCONNECT
    # (register again), from a registered worker they are dropped.
    stray_replies = [
        [V, p.CHUNK, b"no-such-request", b"data"],
        [V, p.END, b"no-such-request", b"data"],
        [V, p.ERROR, b"no-such-request", b"handler_error", b"x"],
    ]
    from_stranger = [*stray_replies, [V, p.HEARTBEAT], [V, p.DRAIN]]

    context = zmq.Context.instance()
    client_sock = context.socket(zmq.DEALER)
    stranger = context.socket(zmq.DEALER)
    ghost = context.socket(zmq.DEALER)  # a registered worker that sends stray replies
    try:
        for sock, address in ((client_sock, stack.frontend), (stranger, stack.backend),
                              (ghost, stack.backend)):
            sock.connect(address)
        ghost.send_multipart(p.encode_ready(p.Ready("ghost", ["ghost-service"])))
        stack.wait_workers("ghost", "w1")

        for frames in [*to_broker_malformed, *to_broker_valid_but_wrong]:
            client_sock.send_multipart(frames)
        for frames in [*from_worker_malformed, *from_stranger]:
            stranger.send_multipart(frames)
        for frames in stray_replies:
            ghost.send_multipart(frames)

        rejected = len(to_broker_malformed) + len(from_worker_malformed)
        stack.wait_stats(
            lambda s: s["broker"]["rejected_frames"] - before["rejected_frames"] >= rejected,
            15, f"{rejected} rejected messages")

        replies = {}
        while len(replies) < len(answered) and client_sock.poll(5000):
            for message in p.unbatch(client_sock.recv_multipart()):
                reply = p.decode_to_client(message)
                replies[reply.rid] = reply
        assert not client_sock.poll(200), "an answer to a message that names no request id"
        assert set(replies) == set(answered)
        assert {r.code for r in replies.values()} == {p.E_BAD_REQUEST}
        assert "timeout" in replies[b"g-huge-timeout"].message

        # The broker asks the stranger to register; maybe once for all its messages. It
        # refuses each READY that does not parse, saying why.
        answers = []
        while stranger.poll(5000 if not answers else 200):
            answers.extend(p.unbatch(stranger.recv_multipart()))
        refusals = [p.decode_to_worker(m) for m in answers if m[1] == p.ERROR]
        disconnects = [m for m in answers if m[1] != p.ERROR]
        bad_readies = [m for m in from_worker_malformed if m[:2] == [V, p.READY]]
        assert len(refusals) == len(bad_readies)
        assert {(r.rid, r.code) for r in refusals} == {(b"", p.E_BAD_REQUEST)}
        assert 1 <= len(disconnects) <= len(from_stranger)
        assert disconnects == [[V, p.DISCONNECT]] * len(disconnects)

        stats = stack.stats()
        assert stack.procs[0].alive, "the broker died"
        broker = stats["broker"]
        assert broker["rejected_frames"] - before["rejected_frames"] == rejected
        assert broker["requests"] == before["requests"]  # no garbage was taken for a request
        assert (broker["chunks"], broker["evictions"]) == (before["chunks"], 0)
        assert sorted((w["id"], w["state"]) for w in stats["workers"]) == \
            [("ghost", "ready"), ("w1", "ready")]  # no worker from the garbage

        with BlockingClient(stack.frontend, timeout=10) as client:
            assert list(client.request("generate", SEED_BODY)) == SEED_CHUNKS
        ghost.send_multipart(p.encode_disconnect())
    finally:
        for sock in (client_sock, stranger, ghost):
            sock.close(0)


# --- reports: the gateways' counters in the broker's stats ---------------------------------


@pytest.mark.timeout(30)
def test_the_broker_keeps_each_reporters_latest_counters_and_forgets_the_silent(stack):
    stack.broker("--Broker.heartbeat_interval=0.1")  # a reporter is forgotten after 0.3 s
    counters = {"requests": 0}

    def report() -> dict:
        counters["requests"] += 1
        return dict(counters)

    async def main():
        async with Client(stack.frontend, heartbeat_interval=0.1, report=report,
                          name="gateway-7") as client:
            seen = [(await client.stats())["gateways"]]  # the first report came before it
            # Every heartbeat brings the latest counters.
            later = await async_wait_until(
                lambda: stats_if(client, lambda s: s["gateways"]["gateway-7"]["requests"] > 3))
            seen.append(later["gateways"])
        async with Client(stack.frontend) as observer:  # reports nothing
            gone = await async_wait_until(lambda: stats_if(observer, lambda s: not s["gateways"]))
        return seen, gone

    (first, later), gone = run(main())
    assert list(first) == ["gateway-7"] and first["gateway-7"]["requests"] >= 1
    assert later["gateway-7"]["requests"] > first["gateway-7"]["requests"]
    assert gone["gateways"] == {}


async def stats_if(client: Client, condition) -> dict | None:
    stats = await client.stats()
    return stats if condition(stats) else None


@pytest.mark.timeout(30)
def test_a_report_over_the_size_limit_is_refused_and_nobody_else_notices(stack):
    start(stack, "w1")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(stack.frontend)
    try:
        huge = {"x": "a" * p.MAX_REPORT_BYTES}
        sock.send_multipart([p.VERSION, p.REPORT, b"hostile", orjson.dumps(huge)])
        sock.send_multipart(p.encode_report(p.Report("fine", {"requests": 1})))
        stats = stack.wait_stats(lambda s: s["gateways"], what="the fine report")
        assert stats["gateways"] == {"fine": {"requests": 1}}
        assert stats["broker"]["rejected_frames"] == 1
        with BlockingClient(stack.frontend, timeout=10) as client:
            assert list(client.request("generate", SEED_BODY)) == SEED_CHUNKS
    finally:
        sock.close(0)


# --- BlockingClient and `zroute stats` ----------------------------------------------------


@SHARED_TIMEOUT
def test_blocking_client_request_and_stats(shared):
    with BlockingClient(shared.frontend, timeout=10) as client:
        before = client.stats()
        chunks = client.request("generate", SEED_BODY)
        assert next(chunks) == SEED_CHUNKS[0]  # a generator: chunks come one by one
        assert list(chunks) == SEED_CHUNKS[1:]
        assert list(client.request("generate", {"text": "x"}, policy="direct", worker="w2")) == \
            [b"Hello x!\n"]
        with pytest.raises(BrokerError) as caught:
            list(client.request("generate", {"text": "x"}, policy="direct", worker="nobody"))
        assert caught.value.code == p.E_NO_SUCH_WORKER
        stats = client.stats()

    assert sorted(w["id"] for w in stats["workers"]) == \
        ["file", "flag", "flaky1", "flaky2", "slow", "w1", "w2"]
    assert all(w["state"] == "ready" for w in stats["workers"])
    delta = {key: stats["broker"][key] - before["broker"][key]
             for key in ("requests", "completed", "failed")}
    assert delta == {"requests": 3, "completed": 2, "failed": 1}
    completed = {w["id"]: w["completed"] for w in stats["workers"]}
    completed_before = {w["id"]: w["completed"] for w in before["workers"]}
    assert completed["w2"] - completed_before["w2"] >= 1
    assert completed["w1"] + completed["w2"] - completed_before["w1"] - completed_before["w2"] == 2


@SHARED_TIMEOUT
def test_blocking_client_has_the_policy_shortcuts_and_takes_a_plain_string(shared):
    with BlockingClient(shared.frontend, timeout=10) as client:
        assert list(client.round_robin("generate", "world,universe,galaxy")) == SEED_CHUNKS
        assert list(client.random("generate", {"text": "x"})) == [b"Hello x!\n"]
        assert list(client.direct("generate", "y", "w2")) == [b"Hello y!\n"]


@pytest.mark.timeout(20)
def test_blocking_client_reports_an_unreachable_broker_after_three_heartbeats():
    address = f"tcp://127.0.0.1:{free_port()}"  # nobody there
    with BlockingClient(address) as client:  # timeout 60 s, heartbeat 1 s
        began = time.monotonic()
        with pytest.raises(BrokerError) as caught:
            list(client.request("generate", SEED_BODY))
        elapsed = time.monotonic() - began
    assert (caught.value.code, caught.value.message) == (
        p.E_BROKER_UNREACHABLE, f"no answer from the broker at {address}")
    assert 3.0 <= elapsed < 4.5, f"took {elapsed:.2f} s"  # as the asyncio Client


@pytest.mark.timeout(30)
@pytest.mark.parametrize("signum, exit_code, message", [
    (signal.SIGSTOP, 0, "no answer from the broker at {address}"),  # hangs, connection open
    (signal.SIGKILL, -signal.SIGKILL, "the connection to the broker at {address} closed"),
], ids=["hung", "killed"])
def test_blocking_client_gives_up_on_a_broker_lost_mid_request(stack, signum, exit_code,
                                                               message):
    broker = stack.broker()
    broker.expect(exit_code)
    stack.worker("w1", sleep_time=0.3)
    stack.wait_workers("w1")
    with BlockingClient(stack.frontend, heartbeat_interval=0.2) as client:
        chunks = client.request("generate", {"text": "a,b,c,d,e,f,g,h,i,j"})
        assert next(chunks) == b"Hello a!\n"
        broker.signal(signum)
        lost = time.monotonic()
        try:
            with pytest.raises(BrokerError) as caught:
                list(chunks)
        finally:
            broker.signal(signal.SIGCONT)
        elapsed = time.monotonic() - lost
    assert (caught.value.code, caught.value.message) == (
        p.E_BROKER_UNREACHABLE, message.format(address=stack.frontend))
    assert elapsed < 2.0, f"took {elapsed:.2f} s"  # 3 heartbeats of 0.2 s, not the 60 s timeout


@SHARED_TIMEOUT
def test_blocking_client_timeout_names_the_setting(shared):
    with BlockingClient(shared.frontend, timeout=0.4) as client:
        for options, expected in (
                ({}, "no reply within the client's timeout (0.4 s)"),
                ({"timeout": 0.3}, "no reply within the request's timeout (0.3 s)")):
            with pytest.raises(BrokerError) as caught:
                list(client.request("slow", {"text": "a,b,c,d"}, **options))
            assert (caught.value.code, caught.value.message) == (p.E_TIMEOUT, expected)


@pytest.mark.timeout(30)
def test_stats_command_table_and_json(stack):
    start(stack, "w1", "w2")
    with BlockingClient(stack.frontend, timeout=10) as client:
        for worker_id in ("w1", "w1", "w2"):
            list(client.request("generate", {"text": "x"}, policy="direct", worker=worker_id))

    table = run_zroute("stats", "--broker", stack.frontend)
    assert (table.returncode, table.stderr) == (0, "")
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["WORKER", "SERVICES", "STATE", "INFLIGHT", "CAPACITY",
                                "COMPLETED", "FAILED", "P50", "P99", "SEEN"]
    rows = {line.split()[0]: line.split() for line in lines[1:3]}
    assert rows["w1"][:7] == ["w1", "generate", "ready", "0", "unlimited", "2", "0"]
    assert rows["w2"][:7] == ["w2", "generate", "ready", "0", "unlimited", "1", "0"]
    assert lines[3] == ""
    assert lines[4].startswith("broker: up ")
    assert " requests 3 " in lines[4] and " completed 3 " in lines[4]

    as_json = run_zroute("stats", "--broker", stack.frontend, "--json")
    assert (as_json.returncode, as_json.stderr) == (0, "")
    stats = orjson.loads(as_json.stdout)
    assert {w["id"]: w["completed"] for w in stats["workers"]} == {"w1": 2, "w2": 1}
    assert stats["broker"]["requests"] == 3


@pytest.mark.timeout(20)
def test_stats_command_against_a_dead_address():
    address = f"tcp://127.0.0.1:{free_port()}"
    began = time.monotonic()
    result = run_zroute("stats", "--broker", address, "--timeout", "1", timeout=10)
    elapsed = time.monotonic() - began
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"zroute stats: error: no answer from the broker at {address} within 1 s: is a broker "
        "running? `zroute serve` starts the whole stack, `zroute broker` a broker alone"]
    # It waits its --timeout, not more (the rest is the interpreter starting).
    assert 1.0 <= elapsed < 6.0, f"took {elapsed:.2f} s"


# --- the worker command -----------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("spec, problem", [
    ("worker.greeting", "is invalid: use the form module:attr"),
    (":make_handler", "is invalid: use the form module:attr"),
    ("no_such_module_zr:handler", "cannot be loaded: no module named 'no_such_module_zr'"),
    ("worker.greeting:no_such_name", "cannot be loaded: 'worker.greeting' has no "
                                     "attribute 'no_such_name'"),
    ("worker.greeting:__doc__", ", not callable: a handler is an async generator function"),
    ("tests.handlers:not_a_factory", "called as a factory it returned the int 42; a handler "
                                     "is an async generator function"),
], ids=["no-colon", "no-module", "missing-module", "missing-attribute", "not-callable",
        "factory-returns-non-handler"])
def test_worker_with_a_bad_handler_spec_exits_with_one_line(spec, problem):
    address = f"tcp://127.0.0.1:{free_port()}"  # never reached: the spec fails first
    result = run_zroute("worker", "--broker", address, "--handler", spec, timeout=15)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"zroute worker: error: --handler {spec!r} ")
    assert problem in lines[0]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args, problem", [
    (["broker", "--frontend", "garbage"], "Broker.frontend: 'garbage' is not a ZeroMQ endpoint"),
    (["worker", "--broker", "nope://x"], "Broker.backend: 'nope://x' has the scheme 'nope'"),
    (["gateway", "--broker", "bad"], "Broker.frontend: 'bad' is not a ZeroMQ endpoint"),
    (["stats", "--broker", "bad"], "Broker.frontend: 'bad' is not a ZeroMQ endpoint"),
], ids=["broker", "worker", "gateway", "stats"])
def test_a_bad_endpoint_is_a_one_line_error_that_names_its_key(args, problem):
    if args[0] == "gateway":
        args = [*args, "--port", str(free_port())]
    result = run_zroute(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"zroute {args[0]}: error: {problem}")
