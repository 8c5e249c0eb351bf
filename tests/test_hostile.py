"""Hostile input: Hypothesis-generated frame sequences against a live broker (it never
crashes and still serves), names with control characters, and floods of bad messages."""

from __future__ import annotations

import logging

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zroute import protocol as p
from zroute.client import BlockingClient
from tests.broker_memory import MemoryBroker
from tests.support import Stack, wait_until

COMMANDS = [p.READY, p.HEARTBEAT, p.DISCONNECT, p.REQUEST, p.CHUNK, p.END, p.ERROR, p.CANCEL,
            p.STATS, p.DRAIN, p.BATCH, b"\x00", b"\xff"]

# Frames that look like the protocol often enough to get past the first checks.
frame = st.one_of(
    st.binary(max_size=40),
    st.just(p.VERSION),
    st.sampled_from(COMMANDS),
    st.sampled_from([b"generate", b"round_robin", b"direct", b"w1", b"0", b"-5", b"99999999"]),
    st.sampled_from([b"{}", b'{"services": ["generate"], "capacity": 1}', b"[]", b"null"]),
)
message = st.lists(frame, min_size=1, max_size=9)
plausible = st.tuples(st.just(p.VERSION), st.sampled_from(COMMANDS),
                      st.lists(frame, max_size=7)).map(lambda t: [t[0], t[1], *t[2]])
traffic = st.lists(st.tuples(st.booleans(), st.one_of(message, plausible)), min_size=1,
                   max_size=12)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("hostile"))
    broker = stack.broker()
    stack.worker("w1")
    stack.wait_workers("w1")
    context = zmq.Context()
    yield stack, broker, context
    context.destroy(linger=0)
    stack.close()


def dealer(context: zmq.Context, address: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    return sock


def send_hostile(stack: Stack, context: zmq.Context,
                 sequence: list[tuple[bool, list[bytes]]]) -> None:
    """Send each message of `sequence` from a client socket, or from a worker socket if
    its flag is true; return once the broker has read them all. Both sockets close."""
    client_side = dealer(context, stack.frontend)
    worker_side = dealer(context, stack.backend)
    try:
        for to_workers_socket, frames in sequence:
            (worker_side if to_workers_socket else client_side).send_multipart(frames)
        # A STATS round trip on the same client socket proves the broker read all of it.
        client_side.send_multipart(p.encode_stats_request(p.StatsRequest(b"probe")))
        wait_until(lambda: _answered(client_side, b"probe"), 5, "the broker to answer")
    finally:
        client_side.close()
        worker_side.close()


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(traffic)
def test_random_frames_never_crash_the_broker(live, sequence):
    stack, broker, context = live
    send_hostile(stack, context, sequence)
    assert broker.popen.poll() is None


def _answered(sock: zmq.Socket, rid: bytes) -> bool:
    while sock.poll(50):
        for message in p.unbatch(sock.recv_multipart()):
            try:
                reply = p.decode_to_client(message)
            except p.ProtocolError:
                continue
            if isinstance(reply, p.StatsReply) and reply.rid == rid:
                return True
    return False


# A fake worker that registers and goes, and frames that the broker rejects: a sample of
# what the random frames above send.
SAMPLE_TRAFFIC = [
    (True, p.encode_ready(p.Ready("fake", ["generate"], 1))),
    (True, [p.VERSION, p.CHUNK, b"-5"]),
    (True, [b"\xff", b"{}"]),
    (False, [p.VERSION, p.REQUEST, b"99999999"]),
    (False, [p.VERSION, b"\x00", b"generate", b"null"]),
]


@pytest.mark.timeout(60)
def test_broker_still_serves_after_the_random_frames(live):
    stack, broker, context = live
    rejected_before = stack.stats()["broker"]["rejected_frames"]
    send_hostile(stack, context, SAMPLE_TRAFFIC)
    # Fake workers registered by random READYs are gone with their sockets: wait for
    # their eviction, so that round robin has only the real worker left.
    wait_until(lambda: stack.ready_workers() == ["w1"], 10, "fake workers to be evicted")
    with BlockingClient(stack.frontend, timeout=10) as client:
        for _ in range(3):
            assert b"".join(client.request("generate", {"text": "a,b"})) == b"Hello a!\nHello b!\n"
    assert broker.popen.poll() is None
    assert stack.stats()["broker"]["rejected_frames"] > rejected_before


# --- names a peer chooses, and what they make the broker log --------------------------

BAD_NAMES = ["gen\r\nerate", "a\nINFO forged line", "esc\x1b[31m", "nul\x00", "sep\u2028x", "del\x7f"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("field", ["service", "policy", "target"])
def test_a_request_naming_a_control_character_is_refused_naming_the_field(field, name):
    memory = MemoryBroker()
    try:
        fields = {"service": "generate", "policy": "direct", "target": "w1", field: name}
        memory.from_client(b"c1", p.encode_request_to_broker(p.Request(
            b"r1", fields["service"], b"{}", fields["policy"], fields["target"])))
        [reply] = memory.to_client(b"c1")
        assert (reply.rid, reply.code) == (b"r1", p.E_BAD_REQUEST)
        assert f"{field} has a control or unprintable character" in reply.message
    finally:
        memory.close()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_ready_naming_a_control_character_is_refused(name):
    memory = MemoryBroker()
    try:
        for worker_id, services in ((name, ["generate"]), ("w1", ["generate", name])):
            memory.from_worker(b"peer", p.encode_ready(p.Ready(worker_id, services)))
            [refusal] = memory.to_worker(b"peer")
            assert (refusal.rid, refusal.code) == (b"", p.E_BAD_REQUEST)
            assert "has a control or unprintable character" in refusal.message
        assert not memory.core.registry.by_id
    finally:
        memory.close()


def test_names_with_printable_unicode_and_spaces_are_fine():
    frames = p.encode_ready(p.Ready("wörker 1", ["générer"]))
    assert p.decode_from_worker(frames) == p.Ready("wörker 1", ["générer"])


def test_a_service_name_is_measured_in_bytes_when_registered_as_when_requested():
    """A name that a worker may register under can be requested: 127 two-byte characters
    fit in 255 bytes, 128 do not, in a READY as in a REQUEST."""
    fits, too_long = "é" * 127, "é" * 128
    assert p.name_problem(fits) is None
    assert p.name_problem(too_long) == f"is longer than {p.MAX_ID_LENGTH} bytes"
    assert p.decode_from_worker(p.encode_ready(p.Ready("w1", [fits]))).services == [fits]
    request = p.encode_request_to_broker(p.Request(b"r", fits, b""))
    assert p.decode_from_client(request).service == fits
    with pytest.raises(p.ProtocolError, match="READY service name is longer than"):
        p.decode_from_worker(p.encode_ready(p.Ready("w1", [too_long])))
    with pytest.raises(p.ProtocolError, match="service is longer than"):
        p.decode_from_client(p.encode_request_to_broker(p.Request(b"r", too_long, b"")))


def test_many_bad_messages_write_a_bounded_number_of_log_lines(caplog):
    """The limiter keys on the kind of event and the peer, not on the attacker's bytes."""
    memory = MemoryBroker()
    try:
        with caplog.at_level(logging.INFO, logger="zroute.broker"):
            for n in range(2000):  # each with different bytes, from one peer and then many
                peer = b"c1" if n < 1000 else b"c%d" % n
                memory.from_client(peer, [p.VERSION, p.REQUEST, b"r%d" % n, b"x%d" % n])
                memory.from_worker(peer, [p.VERSION, b"\x42", b"%d" % n])
        lines = [r for r in caplog.records if r.name == "zroute.broker"]
        assert 0 < len(lines) <= 10
        assert memory.core.totals["rejected_frames"] == 4000
    finally:
        memory.close()
