"""Who may register under a worker id: the broker's rules, in memory."""

from __future__ import annotations

import pytest
import zmq

from zroute import protocol as p
from tests.broker_memory import MemoryBroker
from tests.support import free_port, wait_until


@pytest.fixture
def memory():
    broker = MemoryBroker()
    yield broker
    broker.close()


def ready(memory: MemoryBroker, peer: bytes, token: str) -> list[p.Message]:
    """A READY for "w1" from `peer`; what the broker answers it."""
    memory.from_worker(peer, p.encode_ready(p.Ready("w1", ["generate"], 0, token)))
    return memory.to_worker(peer)


def holder(memory: MemoryBroker) -> bytes:
    return memory.core.registry.by_id["w1"].peer


def test_a_worker_process_on_a_new_connection_takes_its_id_from_its_old_one(memory):
    memory.connect(memory.broker.backend, b"old")  # still connected: it answers probes
    assert ready(memory, b"old", "token-a") == []
    assert ready(memory, b"new", "token-a") == []
    assert holder(memory) == b"new"
    assert memory.core.totals["id_changes"] == 0


def test_another_process_is_refused_while_the_holder_is_connected(memory):
    memory.connect(memory.broker.backend, b"live")
    ready(memory, b"live", "token-a")
    [refusal] = ready(memory, b"other", "token-b")
    assert (refusal.rid, refusal.code) == (b"", p.E_ID_IN_USE)
    assert holder(memory) == b"live"


def test_an_id_taken_while_its_worker_was_away_goes_back_to_that_worker(memory):
    broker = memory.broker
    ready(memory, b"real", "token-real")
    memory.from_worker(b"real", p.encode_disconnect())  # its connection dropped, say
    memory.connect(broker.backend, b"impostor")
    assert ready(memory, b"impostor", "token-impostor") == []
    assert memory.core.totals["id_changes"] == 1  # counted, and logged

    # The real worker's process comes back on a new connection: the id is its own again,
    # and the direct requests for it go there, though the impostor is still connected.
    memory.connect(broker.backend, b"real-again")
    assert ready(memory, b"real-again", "token-real") == []
    assert holder(memory) == b"real-again"
    assert memory.core.totals["id_changes"] == 2
    memory.request(b"c1", b"r1", policy="direct", target="w1")
    assert [type(m) for m in memory.to_worker(b"real-again")] == [p.Request]

    # The impostor has no claim on it: refused while the real worker is connected.
    [refusal] = ready(memory, b"impostor", "token-impostor")
    assert refusal.code == p.E_ID_IN_USE


def test_the_token_is_never_shown_in_stats(memory):
    ready(memory, b"w1", "secret-token")
    memory.from_worker(b"w1", p.encode_disconnect())
    ready(memory, b"w2", "other-secret")
    assert b"secret" not in p.encode_stats_reply(p.StatsReply(b"s", memory.stats()))[3]


def wait_for_clients_gone(memory: MemoryBroker) -> None:
    """Let the broker handle client disconnections, as its loop would, until it has seen
    a client go. libzmq may report the disconnection before the ROUTER has dropped the
    connection: until then the client still counts as there."""
    def gone() -> int:
        memory.broker._on_client_disconnects()
        return memory.core.totals["clients_gone"]

    wait_until(gone, 5, "the broker to see the client go")


@pytest.mark.timeout(20)
def test_replies_for_a_client_that_has_gone_are_not_delivered_to_its_successor():
    """A peer that connects with the routing id of a client that dropped (automatic ids
    are sequential) must not receive that client's in-flight replies."""
    memory = MemoryBroker(None, f"Broker.frontend=tcp://127.0.0.1:{free_port()}")
    broker = memory.broker
    try:
        worker = memory.register("w1")
        victim = memory.connect(broker.frontend, b"client-7")
        victim.send_multipart(p.encode_request_to_broker(p.Request(b"r1", "generate", b"{}")))
        [request] = wait_until(lambda: memory.read(broker.frontend) or memory.to_worker(worker),
                               5, "the victim's request to reach the worker")
        victim.close()
        wait_for_clients_gone(memory)
        assert memory.core.totals["clients_gone"] == 1
        assert memory.to_worker(worker) == [p.Cancel(request.rid)]

        def heard() -> list:
            # A new connection under the same id, heartbeating until heard, as a client
            # does. A ROUTER ignores for good a connection whose id it still held when
            # the connection arrived (libzmq may let go of the old one a moment after it
            # reports it gone): then only a new connection is heard.
            successor = memory.connect(broker.frontend, b"client-7")
            for _ in range(10):
                successor.send_multipart(p.encode_heartbeat())
                memory.read(broker.frontend)
                answers = memory.to_client(b"client-7")
                if answers:
                    return answers
            successor.close()
            return []

        answers = wait_until(heard, 5, "the broker to hear the successor")
        assert {type(m) for m in answers} == {p.Heartbeat}
        memory.from_worker(worker, p.encode_reply_from_worker(p.End(request.rid, [b"secret"])))
        assert memory.to_client(b"client-7") == []
    finally:
        memory.close()


@pytest.mark.timeout(20)
def test_a_client_that_stays_keeps_its_requests_when_another_leaves():
    memory = MemoryBroker(None, f"Broker.frontend=tcp://127.0.0.1:{free_port()}")
    broker = memory.broker
    try:
        memory.register("w1")
        staying, leaving = (memory.connect(broker.frontend, name) for name in (b"c1", b"c2"))
        for sock in (staying, leaving):
            sock.send_multipart(p.encode_request_to_broker(p.Request(b"r1", "generate", b"{}")))
        wait_until(lambda: memory.read(broker.frontend) or len(memory.core.requests) == 2, 5,
                   "both requests")
        leaving.close()
        wait_for_clients_gone(memory)
        assert [r.client for r in memory.core.requests.values()] == [b"c1"]
    finally:
        memory.close()


def fill_queue(sock: zmq.Socket, peer: bytes) -> None:
    """Send to `peer` until its queue is at its high-water mark."""
    for _ in range(1_000_000):
        try:
            sock.send_multipart([peer, *p.encode_heartbeat()], zmq.NOBLOCK)
        except zmq.Again:
            return
    raise AssertionError(f"the queue to {peer!r} never filled")


@pytest.mark.timeout(20)
def test_a_client_whose_queue_is_full_keeps_its_requests_when_another_leaves(memory):
    broker = memory.broker
    memory.register("w1")
    busy = memory.connect(broker.frontend, b"busy")
    busy.send_multipart(p.encode_request_to_broker(p.Request(b"r1", "generate", b"{}")))
    wait_until(lambda: memory.read(broker.frontend) or memory.core.requests, 5, "the request")
    memory.request(b"gone", b"r1")  # a client the broker cannot reach
    fill_queue(broker.frontend, b"busy")
    broker._on_client_disconnects()
    assert [r.client for r in memory.core.requests.values()] == [b"busy"]
    assert memory.core.totals["clients_gone"] == 1


def test_a_live_holder_whose_queue_is_full_keeps_its_id(memory):
    memory.connect(memory.broker.backend, b"live")
    ready(memory, b"live", "token-a")
    fill_queue(memory.broker.backend, b"live")
    [refusal] = ready(memory, b"other", "token-b")
    assert refusal.code == p.E_ID_IN_USE
