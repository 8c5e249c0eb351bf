"""The worker runtime as a handler's author and an operator see it: its log lines, and
what it does when its event loop blocks or its broker goes. Real processes throughout."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import threading
import time

import pytest

from zroute import protocol as p
from zroute.client import BlockingClient, BrokerError
from tests.handlers import CANCELLED_LINE
from tests.http_support import http, start_gateway, wait_healthy
from tests.support import (Stack, async_wait_until, free_port, returned_types, run_zroute,
                           wait_until)
from worker.runtime import Worker
from zroute.settings import WorkerSettings, BrokerLink


@pytest.mark.timeout(60)
def test_the_worker_logs_a_request_under_the_id_the_gateway_logs(stack: Stack):
    stack.broker()
    worker = stack.worker("w1")
    gateway = start_gateway(stack)
    wait_healthy(gateway, 1)
    for text in ("a", "b", "c"):
        assert http("POST", f"{gateway.url}/generate", b'{"text": "%s"}' % text.encode()).status == 200

    # Each process writes its line once it is done with the request, which may be just
    # after the client has its reply.
    def three(pattern: str, proc) -> list | None:
        found = re.findall(pattern, proc.output())
        return found if len(found) == 3 else None

    gateway_ids = wait_until(lambda: three(r"INFO request=(\S+) policy=", gateway.proc),
                             what="the gateway's three request lines")
    served = wait_until(lambda: three(r"INFO worker=w1 request=(\S+) client=([0-9a-f]+) chunks=1 ",
                                      worker), what="the worker's three request lines")
    assert [rid for rid, _ in served] == gateway_ids
    assert len({client for _, client in served}) == 1  # one gateway, one client id


def hang_worker(stack: Stack, *args: str):
    worker = stack.worker("hanger", "--handler", "tests.handlers:hang", "--service", "hang", *args)
    stack.wait_workers("hanger", timeout=20)
    return worker


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum, exit_code", [
    (signal.SIGKILL, -signal.SIGKILL),
    # the broker tells its clients it stops (broker_unreachable), and its workers CANCEL
    (signal.SIGTERM, 0),
], ids=["killed", "stopped"])
def test_a_worker_stops_its_work_as_soon_as_the_broker_goes_and_comes_back_to_it(
        stack, signum, exit_code):
    broker = stack.broker()
    worker = hang_worker(stack)
    with BlockingClient(stack.frontend, timeout=30) as client:
        stream = client.request("hang", {"marker": "lost"})
        assert next(stream) == b"first\n"
        broker.expect(exit_code)
        broker.signal(signum)
        lost = time.monotonic()
        wait_until(lambda: CANCELLED_LINE.format(marker="lost") in worker.output(), 10,
                   "the worker to cancel the handler")
        elapsed = time.monotonic() - lost
        with pytest.raises(BrokerError) as caught:
            stream.read()
    assert caught.value.code == p.E_BROKER_UNREACHABLE
    # At once, not after three missed heartbeats (3 s).
    assert elapsed < 2.0, f"took {elapsed:.2f} s"
    assert f"the connection to the broker at {stack.backend} closed" in worker.output()
    broker.wait()
    stack.broker()
    stack.wait_workers("hanger", timeout=5)
    assert "broker silent" not in worker.output()


@pytest.mark.timeout(60)
def test_a_worker_started_before_its_broker_says_once_that_it_waits(stack):
    fast = "--Broker.heartbeat_interval=0.2"  # silence would be reported every 0.6 s
    worker = stack.worker("early", fast)
    waiting = f"worker early: waiting for a broker at {stack.backend}"
    wait_until(lambda: waiting in worker.output(), 10, "the worker to say that it waits")
    stack.broker(fast)
    stack.wait_workers("early", timeout=20)
    output = worker.output()
    assert output.count(waiting) == 1 and "broker silent" not in output, output


@pytest.mark.timeout(30)
def test_a_worker_pointed_at_a_port_that_is_not_a_broker_logs_a_few_lines_not_one_per_try(
        stack):
    accepted = []

    def accept_and_close(listener: socket.socket) -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # the test closed the listener
            connection.close()
            accepted.append(connection)

    with socket.create_server(("127.0.0.1", 0)) as listener:
        threading.Thread(target=accept_and_close, args=(listener,), daemon=True).start()
        address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        worker = stack.start("lost", "worker", "--broker", address, "--id", "lost")
        # Each try connects, sends READY and is closed on, at least every 0.5 s.
        wait_until(lambda: len(accepted) >= 10, 15, "the worker to try ten connections")
        lines = worker.output().splitlines()
    assert len(lines) <= 6, "\n".join(lines)
    assert any("closed before a broker answered" in line for line in lines), lines


@pytest.mark.timeout(60)
def test_a_worker_s_ready_file_exists_exactly_while_a_broker_has_it_registered(stack, tmp_path):
    ready = tmp_path / "ready"
    ready.write_text("")  # left by a process before this one
    worker = stack.worker("w1", "--ready-file", str(ready))
    wait_until(lambda: "waiting for a broker" in worker.output(), 10, "the worker to wait")
    assert not ready.exists()
    broker = stack.broker()
    wait_until(ready.exists, 10, "the ready file")
    assert ready.read_text() == f"{stack.backend}\n"
    assert stack.ready_workers() == ["w1"]
    broker.kill()
    wait_until(lambda: not ready.exists(), 5, "the ready file to go with the broker")
    stack.broker()
    wait_until(ready.exists, 10, "the ready file, with the broker back")
    worker.stop()
    assert not ready.exists()


@pytest.mark.timeout(60)
def test_a_worker_of_two_brokers_is_ready_while_either_has_it_registered(stack, tmp_path):
    ready = tmp_path / "ready"
    first = stack.broker()
    other = f"tcp://127.0.0.1:{free_port()}"
    second = stack.start("broker-2", "broker", "--frontend", f"tcp://127.0.0.1:{free_port()}",
                         "--backend", other)
    stack.start("w1", "worker", "--broker", stack.backend, "--broker", other,
                "--id", "w1", "--ready-file", str(ready))

    def registered_with() -> set[str]:
        return set(ready.read_text().split()) if ready.exists() else set()

    wait_until(lambda: registered_with() == {stack.backend, other}, 10, "both in the ready file")
    first.kill()
    wait_until(lambda: registered_with() == {other}, 10, "the first broker to leave the file")
    second.kill()
    wait_until(lambda: not ready.exists(), 10, "the ready file to go with the second broker")


@pytest.mark.timeout(30)
def test_a_worker_whose_ready_file_cannot_be_made_says_so_and_does_not_start(tmp_path):
    missing = tmp_path / "missing" / "ready"
    result = run_zroute("worker", "--ready-file", str(missing))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"zroute worker: error: --ready-file {str(missing)!r}: "
                                     f"the directory {str(missing.parent)!r} does not exist")


class RecordingTransport:
    """A transport that keeps what its worker sends, and delivers what the test sends it:
    the broker's side of the worker's transport, in the same process."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self.opened = 0
        self.closed = False
        self.deliver = None

    def open(self, on_message, on_connected, on_disconnected) -> RecordingTransport:
        self.opened += 1
        self.deliver = on_message
        asyncio.get_running_loop().call_soon(on_connected)
        return self

    def send(self, frames: list[bytes]) -> None:
        self.sent.append(frames)

    def flush(self) -> None:
        pass

    def unsent_bytes(self) -> int:
        return 0

    def close(self, linger_ms: int) -> None:
        self.closed = True

    def received(self) -> list[p.Message]:
        return [p.decode_from_worker(frames) for frames in self.sent]


async def shout(request):
    for word in request["text"].split(","):
        yield word.upper()


@pytest.mark.timeout(10)
def test_a_worker_given_a_transport_registers_serves_and_leaves_over_it():
    transport = RecordingTransport()

    async def main() -> None:
        worker = Worker(WorkerSettings(), BrokerLink("tcp://127.0.0.1:5556"), "w1",
                        {"shout": shout}, transport=transport.open)
        serving = asyncio.create_task(worker.run())
        await async_wait_until(transport.received, what="the worker's READY")
        assert transport.received()[0] == p.Ready("w1", ["shout"], 0, worker.token)
        transport.deliver(p.encode_request_to_worker(p.Request(b"r1", "shout", b'{"text": "a,b"}')))
        await async_wait_until(lambda: p.End(b"r1", [b"A", b"B"]) in transport.received(),
                               what="the reply's END")
        worker.stop()
        await serving

    asyncio.run(main())
    assert (transport.opened, transport.closed) == (1, True)
    assert type(transport.received()[-1]) is p.Disconnect


@pytest.mark.timeout(10)
def test_a_worker_opens_a_new_transport_when_its_broker_falls_silent():
    transport = RecordingTransport()  # it never answers

    async def main() -> None:
        worker = Worker(WorkerSettings(), BrokerLink("tcp://127.0.0.1:5556", heartbeat_interval=0.05),
                        "w1", {"shout": shout}, transport=transport.open)
        serving = asyncio.create_task(worker.run())
        await async_wait_until(lambda: transport.opened == 2, what="a second transport")
        assert transport.closed  # the first one, before the second opened
        worker.stop()
        await serving

    asyncio.run(main())


def test_every_message_the_broker_may_send_a_worker_has_a_handler():
    worker = Worker(WorkerSettings(), BrokerLink("tcp://127.0.0.1:5556"), "w1", {"shout": shout})
    assert set(worker.message_handlers) == returned_types(p.decode_to_worker)


async def held(request):
    yield "start"
    await asyncio.sleep(float(request["seconds"]))
    yield "done"


@pytest.mark.timeout(10)
def test_a_worker_of_two_brokers_refuses_one_over_its_capacity_and_says_when_it_has_room():
    first, second = RecordingTransport(), RecordingTransport()
    transports = iter([first, second])

    def open_next(*callbacks) -> RecordingTransport:
        return next(transports).open(*callbacks)

    async def main() -> None:
        worker = Worker(WorkerSettings(service_args=WorkerSettings.ServiceArgs(capacity=1)),
                        BrokerLink(("tcp://127.0.0.1:5556", "tcp://127.0.0.1:5558")), "w1",
                        {"held": held}, transport=open_next)
        serving = asyncio.create_task(worker.run())
        await async_wait_until(lambda: first.received() and second.received(), what="READYs")
        first.deliver(p.encode_request_to_worker(p.Request(b"r1", "held", b'{"seconds": 0.2}')))
        second.deliver(p.encode_request_to_worker(p.Request(b"r1", "held", b'{"seconds": 0}')))
        await async_wait_until(lambda: p.End(b"r1", [b"done"]) in first.received(),
                               what="the first broker's request to end")
        refusal, room = second.received()[1:3]
        assert (type(refusal), refusal.rid, refusal.code) == (p.Error, b"r1", p.E_WORKER_FULL)
        assert room == p.Heartbeat(inflight=0)  # at once, not at the next heartbeat
        worker.stop()
        await serving

    asyncio.run(main())


@pytest.mark.timeout(10)
def test_a_free_slot_is_announced_to_one_refused_broker_at_a_time_in_turn():
    first, second, third = RecordingTransport(), RecordingTransport(), RecordingTransport()
    transports = iter([first, second, third])

    def open_next(*callbacks) -> RecordingTransport:
        return next(transports).open(*callbacks)

    def heartbeats(transport: RecordingTransport) -> list:
        return [m for m in transport.received() if type(m) is p.Heartbeat]

    def request(transport: RecordingTransport, seconds: float) -> None:
        body = b'{"seconds": %g}' % seconds
        transport.deliver(p.encode_request_to_worker(p.Request(b"r1", "held", body)))

    async def main() -> None:
        endpoints = ("tcp://127.0.0.1:5556", "tcp://127.0.0.1:5558", "tcp://127.0.0.1:5560")
        worker = Worker(WorkerSettings(service_args=WorkerSettings.ServiceArgs(capacity=1)),
                        BrokerLink(endpoints, heartbeat_interval=100), "w1",
                        {"held": held}, transport=open_next)
        serving = asyncio.create_task(worker.run())
        await async_wait_until(lambda: all(t.received() for t in (first, second, third)),
                               what="READYs")
        request(first, 0.1)
        request(second, 0)  # refused, and so is the third's
        request(third, 0)
        await async_wait_until(lambda: heartbeats(second) or heartbeats(third),
                               what="a free slot announced")
        assert (heartbeats(second), heartbeats(third)) == ([p.Heartbeat(inflight=0)], [])
        request(second, 0.05)  # the broker told takes the slot; at its end, the other's turn
        await async_wait_until(lambda: heartbeats(third), what="the slot announced again")
        assert len(heartbeats(second)) == 1 and heartbeats(first) == []
        worker.stop()
        await serving

    asyncio.run(main())


@pytest.mark.timeout(10)
def test_a_request_cancelled_before_its_handler_starts_leaves_the_worker_free_to_stop():
    transport = RecordingTransport()

    async def main() -> None:
        worker = Worker(WorkerSettings(), BrokerLink("tcp://127.0.0.1:5556"), "w1",
                        {"held": held}, transport=transport.open)
        serving = asyncio.create_task(worker.run())
        await async_wait_until(transport.received, what="the worker's READY")
        # The request and the closing of its broker's connection in one turn of the loop.
        transport.deliver(p.encode_request_to_worker(p.Request(b"r1", "held", b'{"seconds": 9}')))
        worker._on_disconnected(worker.sessions[0])
        await async_wait_until(lambda: worker.inflight == 0, 2, "the request to be forgotten")
        worker.stop()
        await asyncio.wait_for(serving, 2)  # no request left to drain

    asyncio.run(main())
