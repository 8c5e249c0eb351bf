"""Unit tests of zroute.protocol: round trips in every direction, and malformed input."""

from __future__ import annotations

import struct

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zroute import protocol as p
from zroute.protocol import (
    Cancel, Chunk, Disconnect, Drain, End, Error, Heartbeat, ProtocolError, Ready, Report,
    Request, StatsReply, StatsRequest, VERSION,
)

RID = b"\x00rid-\xff"  # request ids are opaque bytes
BOOT = b"\x01\x02\x03\x04\x05\x06\x07\x08"
LONG_TEXT = "x" * p.MAX_ID_LENGTH
READY_INFO = orjson.dumps({"services": ["generate"], "capacity": 2})

DECODERS = {
    "from_client": p.decode_from_client,
    "to_client": p.decode_to_client,
    "from_worker": p.decode_from_worker,
    "to_worker": p.decode_to_worker,
}


def roundtrip(encode, decode, message):
    frames = encode(message)
    assert all(type(frame) is bytes for frame in frames)
    assert frames[0] == VERSION
    return decode(frames)


# --- round trips: client -> broker ---------------------------------------------


@pytest.mark.parametrize("message", [
    Request(RID, "generate", b'{"text": "a,b"}'),
    Request(b"1", "g\u00e9n\u00e9rer", b"", "round_robin", "", 1500),
    Request(b"r" * p.MAX_CLIENT_RID, LONG_TEXT, b"\x00\xff" * 100, "direct", "worker-\u00e9", 0),
    Request(b"x", "s", b"body", "", "w1", 2**40),
], ids=["defaults", "unicode-service-policy-timeout", "longest-ids-binary-body", "target"])
def test_request_client_to_broker(message):
    assert roundtrip(p.encode_request_to_broker, p.decode_from_client, message) == message


def test_cancel_client_to_broker():
    assert roundtrip(p.encode_cancel, p.decode_from_client, Cancel(RID)) == Cancel(RID)


@pytest.mark.parametrize("message", [StatsRequest(b"s1"), StatsRequest(b"s1", "Backend.generate")],
                         ids=["every-worker", "of-one-service"])
def test_stats_request_client_to_broker(message):
    assert roundtrip(p.encode_stats_request, p.decode_from_client, message) == message


@pytest.mark.parametrize("message", [
    Report("gateway-1", {"requests": [["200", "round_robin", "worker-1", 5]], "inflight": 0}),
    Report(LONG_TEXT, {}),
], ids=["counters", "longest-name-empty"])
def test_report_client_to_broker(message):
    assert roundtrip(p.encode_report, p.decode_from_client, message) == message


def test_report_of_exactly_max_report_bytes_is_accepted():
    counters = orjson.dumps({"x": "a" * (p.MAX_REPORT_BYTES - 8)})
    assert len(counters) == p.MAX_REPORT_BYTES
    frames = [VERSION, p.REPORT, b"g", counters]
    assert p.decode_from_client(frames) == Report("g", orjson.loads(counters))


def test_heartbeat_client_to_broker():
    assert p.encode_heartbeat() == [VERSION, p.HEARTBEAT]
    assert p.decode_from_client(p.encode_heartbeat()) == Heartbeat(b"")
    assert p.decode_from_client(p.encode_heartbeat(Heartbeat())) == Heartbeat(b"")


# --- round trips: broker -> client -----------------------------------------------


@pytest.mark.parametrize("cls", [Chunk, End])
@pytest.mark.parametrize("chunks", [[], [b""], [b"Hello world!\n"], [b"a", b"", b"\xff" * 1000]],
                         ids=["none", "empty-chunk", "one", "several"])
def test_reply_broker_to_client(cls, chunks):
    message = cls(RID, list(chunks), "worker-1")
    decoded = roundtrip(p.encode_reply_to_client, p.decode_to_client, message)
    assert type(decoded) is cls
    assert decoded == message
    assert decoded.chunks == chunks


@pytest.mark.parametrize("message", [
    Error(RID, p.E_NO_WORKERS, "no workers for service 'generate'"),
    Error(b"7", p.E_HANDLER, "RuntimeError: caf\u00e9 \u2615"),
    Error(b"7", p.E_TIMEOUT, ""),
    Error(b"", p.E_ID_IN_USE, "about the peer, not a request"),
])
def test_error_broker_to_client(message):
    assert roundtrip(p.encode_error, p.decode_to_client, message) == message


def test_stats_reply_broker_to_client():
    stats = {"broker": {"inflight": 0, "boot_id": "ab"}, "workers": [{"id": "w1", "p50": None}]}
    message = StatsReply(b"s9", stats)
    assert roundtrip(p.encode_stats_reply, p.decode_to_client, message) == message


def test_heartbeat_broker_to_client():
    frames = p.encode_heartbeat(Heartbeat(BOOT))
    assert frames == [VERSION, p.HEARTBEAT, BOOT]
    assert p.decode_to_client(frames) == Heartbeat(BOOT)


# --- round trips: worker -> broker -------------------------------------------------


@pytest.mark.parametrize("message", [
    Ready("w1", ["generate"], 0),
    Ready("w\u00e9-2", ["a", "b", LONG_TEXT], 7),
    Ready(LONG_TEXT, ["generate"], 2**31),
])
def test_ready_worker_to_broker(message):
    assert roundtrip(p.encode_ready, p.decode_from_worker, message) == message


def test_ready_without_capacity_means_unlimited():
    frames = [VERSION, p.READY, b"w1", b'{"services": ["generate"]}']
    assert p.decode_from_worker(frames) == Ready("w1", ["generate"], 0)


def test_heartbeat_worker_to_broker():
    assert p.decode_from_worker(p.encode_heartbeat()) == Heartbeat(b"")


@pytest.mark.parametrize("inflight", [0, 7, 10**p.MAX_INFLIGHT_DIGITS - 1])
def test_a_worker_s_heartbeat_may_say_how_many_requests_it_runs(inflight):
    frames = p.encode_heartbeat(Heartbeat(inflight=inflight))
    assert frames == [VERSION, p.HEARTBEAT, b"%d" % inflight]
    assert p.decode_from_worker(frames) == Heartbeat(inflight=inflight)


def test_disconnect_worker_to_broker():
    assert p.encode_disconnect() == [VERSION, p.DISCONNECT]
    assert roundtrip(p.encode_disconnect, p.decode_from_worker, Disconnect()) == Disconnect()


def test_drain_worker_to_broker():
    assert p.encode_drain() == [VERSION, p.DRAIN]
    assert roundtrip(p.encode_drain, p.decode_from_worker, Drain()) == Drain()


@pytest.mark.parametrize("cls", [Chunk, End])
@pytest.mark.parametrize("chunks", [[], [b""], [b"one"], [b"a", b"\x00", b"c" * 5000]],
                         ids=["none", "empty-chunk", "one", "several"])
def test_reply_worker_to_broker(cls, chunks):
    rid = b"\x03abc" + b"r" * (p.MAX_RID - 4)  # the broker's token: longer than a client rid
    message = cls(rid, list(chunks))
    decoded = roundtrip(p.encode_reply_from_worker, p.decode_from_worker, message)
    assert type(decoded) is cls
    assert decoded == message  # worker_id stays empty on this leg
    assert decoded.worker_id == ""


@pytest.mark.parametrize("message", [
    Error(RID, p.E_HANDLER, "ValueError: bad"),
    Error(RID, p.E_BAD_REQUEST, "body is not JSON"),
    Error(b"t", p.E_WORKER_LOST, "worker stopped before finishing"),
])
def test_error_worker_to_broker(message):
    assert roundtrip(p.encode_error, p.decode_from_worker, message) == message


# --- round trips: broker -> worker ---------------------------------------------------


@pytest.mark.parametrize("message", [
    Request(b"\x05peer1" + RID, "generate", b'{"text": "x"}'),
    Request(b"r" * p.MAX_RID, LONG_TEXT, b""),
])
def test_request_broker_to_worker(message):
    decoded = roundtrip(p.encode_request_to_worker, p.decode_to_worker, message)
    assert decoded == message
    assert (decoded.policy, decoded.target, decoded.timeout_ms) == ("", "", 0)


def test_request_to_worker_drops_routing_fields():
    frames = p.encode_request_to_worker(Request(RID, "s", b"b", "random", "w1", 500))
    assert frames == [VERSION, p.REQUEST, RID, b"s", b"b"]
    assert p.decode_to_worker(frames) == Request(RID, "s", b"b")


def test_cancel_broker_to_worker():
    assert roundtrip(p.encode_cancel, p.decode_to_worker, Cancel(RID)) == Cancel(RID)


def test_heartbeat_broker_to_worker():
    assert roundtrip(p.encode_heartbeat, p.decode_to_worker, Heartbeat(BOOT)) == Heartbeat(BOOT)


def test_disconnect_broker_to_worker():
    assert roundtrip(p.encode_disconnect, p.decode_to_worker, Disconnect()) == Disconnect()


@pytest.mark.parametrize("message", [
    Error(b"", p.E_ID_IN_USE, "worker id 'w1' is in use by a live worker"),
    Error(RID, p.E_BAD_REQUEST, "x"),
])
def test_error_broker_to_worker(message):
    assert roundtrip(p.encode_error, p.decode_to_worker, message) == message


def test_error_message_that_is_not_utf8_is_replaced_not_rejected():
    frames = [VERSION, p.ERROR, b"r", b"handler_error", b"bad \xff byte"]
    for decode in (p.decode_to_client, p.decode_from_worker, p.decode_to_worker):
        assert decode(frames) == Error(b"r", "handler_error", "bad \ufffd byte")


# --- malformed input ----------------------------------------------------------------

V = VERSION


def req(rid=b"r", service=b"s", policy=b"", target=b"", timeout=b"0", body=b"{}"):
    return [V, p.REQUEST, rid, service, policy, target, timeout, body]


def ready(worker_id=b"w1", info=READY_INFO):
    return [V, p.READY, worker_id, info]


def info(**fields):
    return orjson.dumps({"services": ["generate"], **fields})


# Wrong in any direction.
COMMON = [
    ("empty-list", []),
    ("one-frame", [V]),
    ("one-empty-frame", [b""]),
    ("older-version", [b"ZR1", p.HEARTBEAT]),
    ("version-prefix", [b"ZR", p.HEARTBEAT]),
    ("version-extended", [p.VERSION + b"0", p.HEARTBEAT]),
    ("empty-version", [b"", p.HEARTBEAT, BOOT]),
    ("unknown-command", [V, b"\x63", b"r"]),
    ("command-zero", [V, b"\x00"]),
    ("empty-command", [V, b""]),
    ("two-byte-command", [V, p.HEARTBEAT + p.HEARTBEAT]),
]

FROM_CLIENT = COMMON + [
    ("ready-not-from-client", ready()),
    ("chunk-not-from-client", [V, p.CHUNK, b"r", b"w1", b"x"]),
    ("end-not-from-client", [V, p.END, b"r", b"w1"]),
    ("error-not-from-client", [V, p.ERROR, b"r", b"c", b"m"]),
    ("drain-not-from-client", [V, p.DRAIN]),
    ("disconnect-not-from-client", [V, p.DISCONNECT]),
    ("request-missing-body", req()[:7]),
    ("request-missing-most", [V, p.REQUEST, b"r"]),
    ("request-extra-frame", req() + [b"more"]),
    ("request-empty-rid", req(rid=b"")),
    ("request-overlong-rid", req(rid=b"r" * (p.MAX_CLIENT_RID + 1))),
    ("request-empty-service", req(service=b"")),
    ("request-non-utf8-service", req(service=b"gen\xff")),
    ("request-overlong-service", req(service=b"s" * (p.MAX_ID_LENGTH + 1))),
    ("request-non-utf8-policy", req(policy=b"\xc3")),
    ("request-overlong-policy", req(policy=b"p" * (p.MAX_ID_LENGTH + 1))),
    ("request-non-utf8-target", req(target=b"\xfe\xff")),
    ("request-overlong-target", req(target=b"t" * (p.MAX_ID_LENGTH + 1))),
    ("request-timeout-empty", req(timeout=b"")),
    ("request-timeout-text", req(timeout=b"soon")),
    ("request-timeout-float", req(timeout=b"1.5")),
    ("request-timeout-negative", req(timeout=b"-1")),
    ("request-timeout-non-ascii", req(timeout=b"\xd9\xa3")),
    ("request-timeout-huge", req(timeout=b"1" + b"0" * 400)),
    ("request-timeout-too-many-digits", req(timeout=b"9" * 5000)),
    ("request-timeout-space", req(timeout=b" 12")),
    ("request-timeout-plus", req(timeout=b"+3")),
    ("request-timeout-underscore", req(timeout=b"1_0")),
    ("cancel-missing-rid", [V, p.CANCEL]),
    ("cancel-extra-frame", [V, p.CANCEL, b"r", b"x"]),
    ("cancel-empty-rid", [V, p.CANCEL, b""]),
    ("cancel-overlong-rid", [V, p.CANCEL, b"r" * (p.MAX_CLIENT_RID + 1)]),
    ("stats-missing-rid", [V, p.STATS]),
    ("stats-extra-frame", [V, p.STATS, b"r", b"Backend.generate", b"x"]),
    ("stats-empty-service", [V, p.STATS, b"r", b""]),
    ("stats-service-with-newline", [V, p.STATS, b"r", b"a\nb"]),
    ("stats-empty-rid", [V, p.STATS, b""]),
    ("stats-overlong-rid", [V, p.STATS, b"r" * (p.MAX_CLIENT_RID + 1)]),
    ("heartbeat-extra-frame", [V, p.HEARTBEAT, BOOT]),
    ("report-missing-counters", [V, p.REPORT, b"g"]),
    ("report-extra-frame", [V, p.REPORT, b"g", b"{}", b"{}"]),
    ("report-empty-name", [V, p.REPORT, b"", b"{}"]),
    ("report-overlong-name", [V, p.REPORT, b"g" * (p.MAX_ID_LENGTH + 1), b"{}"]),
    ("report-non-utf8-name", [V, p.REPORT, b"\xff", b"{}"]),
    ("report-not-json", [V, p.REPORT, b"g", b"{"]),
    ("report-not-an-object", [V, p.REPORT, b"g", b"[1]"]),
    ("report-over-max-bytes", [V, p.REPORT, b"g",
                               orjson.dumps({"x": "a" * (p.MAX_REPORT_BYTES - 7)})]),
]

TO_CLIENT = COMMON + [
    ("report-not-to-client", [V, p.REPORT, b"g", b"{}"]),
    ("request-not-to-client", req()),
    ("ready-not-to-client", ready()),
    ("cancel-not-to-client", [V, p.CANCEL, b"r"]),
    ("drain-not-to-client", [V, p.DRAIN]),
    ("disconnect-not-to-client", [V, p.DISCONNECT]),
    ("chunk-missing-worker-id", [V, p.CHUNK, b"r"]),
    ("chunk-missing-rid", [V, p.CHUNK]),
    ("chunk-empty-rid", [V, p.CHUNK, b"", b"w1", b"x"]),
    ("chunk-overlong-rid", [V, p.CHUNK, b"r" * (p.MAX_RID + 1), b"w1", b"x"]),
    ("chunk-empty-worker-id", [V, p.CHUNK, b"r", b"", b"x"]),
    ("chunk-non-utf8-worker-id", [V, p.CHUNK, b"r", b"w\xff", b"x"]),
    ("chunk-overlong-worker-id", [V, p.CHUNK, b"r", b"w" * (p.MAX_ID_LENGTH + 1), b"x"]),
    ("end-missing-worker-id", [V, p.END, b"r"]),
    ("end-empty-rid", [V, p.END, b"", b"w1"]),
    ("error-missing-message", [V, p.ERROR, b"r", b"code"]),
    ("error-extra-frame", [V, p.ERROR, b"r", b"code", b"m", b"x"]),
    ("error-empty-code", [V, p.ERROR, b"r", b"", b"m"]),
    ("error-non-utf8-code", [V, p.ERROR, b"r", b"\xff", b"m"]),
    ("error-overlong-rid", [V, p.ERROR, b"r" * (p.MAX_RID + 1), b"code", b"m"]),
    ("stats-not-json", [V, p.STATS, b"s1", b"{not json"]),
    ("stats-non-utf8", [V, p.STATS, b"s1", b"\xff\xfe"]),
    ("stats-json-array", [V, p.STATS, b"s1", b"[1, 2]"]),
    ("stats-json-null", [V, p.STATS, b"s1", b"null"]),
    ("stats-empty", [V, p.STATS, b"s1", b""]),
    ("stats-missing-body", [V, p.STATS, b"s1"]),
    ("stats-extra-frame", [V, p.STATS, b"s1", b"{}", b"{}"]),
    ("stats-empty-rid", [V, p.STATS, b"", b"{}"]),
    ("heartbeat-missing-boot-id", [V, p.HEARTBEAT]),
    ("heartbeat-extra-frame", [V, p.HEARTBEAT, BOOT, b"x"]),
]

FROM_WORKER = COMMON + [
    ("request-not-from-worker", [V, p.REQUEST, b"r", b"s", b"b"]),
    ("cancel-not-from-worker", [V, p.CANCEL, b"r"]),
    ("stats-not-from-worker", [V, p.STATS, b"r"]),
    ("ready-missing-info", [V, p.READY, b"w1"]),
    ("ready-missing-all", [V, p.READY]),
    ("ready-extra-frame", ready() + [b"x"]),
    ("ready-empty-worker-id", ready(worker_id=b"")),
    ("ready-non-utf8-worker-id", ready(worker_id=b"w\xff")),
    ("ready-overlong-worker-id", ready(worker_id=b"w" * (p.MAX_ID_LENGTH + 1))),
    ("ready-info-not-json", ready(info=b"{services")),
    ("ready-info-empty", ready(info=b"")),
    ("ready-info-non-utf8", ready(info=b'{"services": ["\xff"]}')),
    ("ready-info-array", ready(info=b'["generate"]')),
    ("ready-info-string", ready(info=b'"generate"')),
    ("ready-info-number", ready(info=b"3")),
    ("ready-no-services", ready(info=b'{"capacity": 1}')),
    ("ready-empty-services", ready(info=b'{"services": []}')),
    ("ready-services-string", ready(info=b'{"services": "generate"}')),
    ("ready-services-null", ready(info=b'{"services": null}')),
    ("ready-service-empty-name", ready(info=b'{"services": ["generate", ""]}')),
    ("ready-service-not-string", ready(info=b'{"services": [1]}')),
    ("ready-service-overlong", ready(info=orjson.dumps({"services": ["s" * 256]}))),
    ("ready-capacity-negative", ready(info=info(capacity=-1))),
    ("ready-capacity-true", ready(info=info(capacity=True))),
    ("ready-capacity-false", ready(info=info(capacity=False))),
    ("ready-capacity-float", ready(info=info(capacity=1.5))),
    ("ready-capacity-string", ready(info=info(capacity="3"))),
    ("ready-capacity-null", ready(info=info(capacity=None))),
    ("chunk-missing-rid", [V, p.CHUNK]),
    ("chunk-empty-rid", [V, p.CHUNK, b"", b"x"]),
    ("chunk-overlong-rid", [V, p.CHUNK, b"r" * (p.MAX_RID + 1), b"x"]),
    ("end-missing-rid", [V, p.END]),
    ("end-empty-rid", [V, p.END, b""]),
    ("error-missing-message", [V, p.ERROR, b"r", b"code"]),
    ("error-extra-frame", [V, p.ERROR, b"r", b"code", b"m", b"x"]),
    ("error-empty-code", [V, p.ERROR, b"r", b"", b"m"]),
    ("error-overlong-code", [V, p.ERROR, b"r", b"c" * (p.MAX_ID_LENGTH + 1), b"m"]),
    ("heartbeat-inflight-not-digits", [V, p.HEARTBEAT, BOOT]),
    ("heartbeat-inflight-negative", [V, p.HEARTBEAT, b"-1"]),
    ("heartbeat-inflight-empty", [V, p.HEARTBEAT, b""]),
    ("heartbeat-inflight-too-long", [V, p.HEARTBEAT, b"1" * (p.MAX_INFLIGHT_DIGITS + 1)]),
    ("heartbeat-extra-frame", [V, p.HEARTBEAT, b"1", b"x"]),
    ("disconnect-extra-frame", [V, p.DISCONNECT, b""]),
    ("drain-extra-frame", [V, p.DRAIN, b"x"]),
    ("report-not-from-worker", [V, p.REPORT, b"g", b"{}"]),
]

TO_WORKER = COMMON + [
    ("ready-not-to-worker", ready()),
    ("chunk-not-to-worker", [V, p.CHUNK, b"r", b"x"]),
    ("end-not-to-worker", [V, p.END, b"r"]),
    ("stats-not-to-worker", [V, p.STATS, b"r"]),
    ("drain-not-to-worker", [V, p.DRAIN]),
    ("report-not-to-worker", [V, p.REPORT, b"g", b"{}"]),
    ("client-request-not-to-worker", req()),
    ("request-missing-body", [V, p.REQUEST, b"r", b"s"]),
    ("request-extra-frame", [V, p.REQUEST, b"r", b"s", b"b", b"x"]),
    ("request-empty-rid", [V, p.REQUEST, b"", b"s", b"b"]),
    ("request-overlong-rid", [V, p.REQUEST, b"r" * (p.MAX_RID + 1), b"s", b"b"]),
    ("request-empty-service", [V, p.REQUEST, b"r", b"", b"b"]),
    ("request-non-utf8-service", [V, p.REQUEST, b"r", b"\x80", b"b"]),
    ("request-overlong-service", [V, p.REQUEST, b"r", b"s" * (p.MAX_ID_LENGTH + 1), b"b"]),
    ("cancel-missing-rid", [V, p.CANCEL]),
    ("cancel-extra-frame", [V, p.CANCEL, b"r", b"x"]),
    ("cancel-empty-rid", [V, p.CANCEL, b""]),
    ("heartbeat-missing-boot-id", [V, p.HEARTBEAT]),
    ("heartbeat-extra-frame", [V, p.HEARTBEAT, BOOT, b"x"]),
    ("disconnect-extra-frame", [V, p.DISCONNECT, b"x"]),
    ("error-missing-message", [V, p.ERROR, b"r", b"code"]),
    ("error-empty-code", [V, p.ERROR, b"", b"", b"m"]),
]

MALFORMED = [
    pytest.param(direction, frames, id=f"{direction}-{name}")
    for direction, cases in (("from_client", FROM_CLIENT), ("to_client", TO_CLIENT),
                             ("from_worker", FROM_WORKER), ("to_worker", TO_WORKER))
    for name, frames in cases
]


@pytest.mark.parametrize("direction, frames", MALFORMED)
def test_malformed_raises_protocol_error_only(direction, frames):
    with pytest.raises(Exception) as caught:
        DECODERS[direction](list(frames))
    assert type(caught.value) is ProtocolError, repr(caught.value)
    assert str(caught.value)  # a message that says what is wrong


def test_protocol_error_is_a_value_error():
    assert issubclass(ProtocolError, ValueError)


@pytest.mark.parametrize("timeout", [b"0", b"1", b"60000", b"%d" % p.MAX_TIMEOUT_MS])
def test_request_timeout_bounds_accepted(timeout):
    assert p.decode_from_client(req(timeout=timeout)).timeout_ms == int(timeout)


def test_request_timeout_just_over_the_bound_rejected():
    with pytest.raises(ProtocolError, match="timeout"):
        p.decode_from_client(req(timeout=b"%d" % (p.MAX_TIMEOUT_MS + 1)))


@pytest.mark.parametrize("direction, frames, expected", [
    ("from_client", [V, p.CANCEL, b"r" * p.MAX_CLIENT_RID], Cancel(b"r" * p.MAX_CLIENT_RID)),
    ("to_worker", [V, p.CANCEL, b"r" * p.MAX_RID], Cancel(b"r" * p.MAX_RID)),
    ("from_worker", [V, p.END, b"r" * p.MAX_RID], End(b"r" * p.MAX_RID, [])),
    ("to_client", [V, p.END, b"r", b"w" * p.MAX_ID_LENGTH], End(b"r", [], "w" * p.MAX_ID_LENGTH)),
    ("from_worker", ready(worker_id=b"w" * p.MAX_ID_LENGTH),
     Ready("w" * p.MAX_ID_LENGTH, ["generate"], 2)),
])
def test_longest_ids_accepted(direction, frames, expected):
    assert DECODERS[direction](frames) == expected


# --- random input (hypothesis) --------------------------------------------------------

COMMANDS = list(p.COMMAND_NAMES)
INTERESTING = [VERSION, b"", b"0", b"-1", b"12", b"1.5", b"r", b"w1", b"generate", b"{}",
               b"[]", b"null", b"\xff", READY_INFO, b'{"services": ["s"], "capacity": -1}',
               *COMMANDS]
frame = st.one_of(st.binary(max_size=40), st.sampled_from(INTERESTING),
                  st.binary(min_size=250, max_size=1100))
# Mostly well-headed lists, so that the decoders get past the header.
frame_lists = st.one_of(
    st.lists(frame, max_size=10),
    st.builds(lambda command, rest: [VERSION, command, *rest],
              st.sampled_from(COMMANDS), st.lists(frame, max_size=8)),
)
MESSAGE_TYPES = (Request, Chunk, End, Error, Cancel, StatsRequest, StatsReply, Report, Ready,
                 Heartbeat, Disconnect, Drain)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("direction", sorted(DECODERS))
@settings(max_examples=300, deadline=None)
@given(frames=frame_lists)
def test_random_frames_raise_only_protocol_error(direction, frames):
    try:
        message = DECODERS[direction](frames)
    except ProtocolError:
        return
    assert isinstance(message, MESSAGE_TYPES)


# --- BATCH ---------------------------------------------------------------------


def test_batch_round_trip_keeps_every_message_in_order():
    messages = [p.encode_heartbeat(), p.encode_cancel(p.Cancel(b"r1")),
                p.encode_request_to_broker(p.Request(b"r2", "generate", b"{}", "random"))]
    assert p.unbatch(p.encode_batch(messages)) == messages


def test_unbatch_passes_any_other_message_through():
    message = p.encode_cancel(p.Cancel(b"r1"))
    assert p.unbatch(message) == [message]


def _packed_message(*frames: bytes) -> bytes:
    return struct.pack(">H", len(frames)) + b"".join(struct.pack(">I", len(f)) + f
                                                     for f in frames)


HEARTBEAT = _packed_message(V, p.HEARTBEAT)


@pytest.mark.parametrize("frames", [
    [V, p.BATCH],                                             # no payload
    [V, p.BATCH, b""],                                        # carries nothing
    [V, p.BATCH, HEARTBEAT, HEARTBEAT],                       # a frame too many
    [V, p.BATCH, HEARTBEAT[:-1]],                             # a frame cut short
    [V, p.BATCH, HEARTBEAT + b"\x00"],                        # a count cut short
    [V, p.BATCH, HEARTBEAT[:4]],                              # a length cut short
    [V, p.BATCH, _packed_message(V)],                         # a message of one frame
    [V, p.BATCH, _packed_message(V, p.BATCH, b"")],           # nested
    [V, p.BATCH, HEARTBEAT * (p.MAX_BATCH + 1)],              # too many
    [V, p.BATCH, _packed_message(V, p.HEARTBEAT, b"x" * p.MAX_BATCH_BYTES)],  # too large
], ids=["no-payload", "empty", "extra-frame", "cut-frame", "cut-count", "cut-length",
        "one-frame", "nested", "too-many", "too-large"])
def test_malformed_batches_raise_protocol_error(frames):
    with pytest.raises(ProtocolError):
        p.unbatch(frames)


def test_batch_wire_format_is_counted_frames_in_one_frame():
    batch = p.encode_batch([p.encode_heartbeat(), p.encode_cancel(p.Cancel(b"r1"))])
    assert batch == [V, p.BATCH, HEARTBEAT + _packed_message(V, p.CANCEL, b"r1")]


def _carried(messages):
    """Each ZeroMQ message packed() makes, as (count, the messages it carries)."""
    return [(count, p.unbatch(frames)) for count, frames in p.packed(messages)]


def test_packed_sends_a_lone_short_message_as_itself():
    message = p.encode_cancel(p.Cancel(b"r1"))
    assert list(p.packed([message])) == [(1, message)]


def test_packed_packs_a_lone_long_message():
    message = p.encode_request_to_broker(p.Request(b"r1", "generate", b"{}"))
    assert len(message) > p.LONE_MESSAGE_FRAMES
    assert list(p.packed([message])) == [(1, p.encode_batch([message]))]


def test_packed_keeps_order_and_splits_at_max_batch():
    messages = [p.encode_cancel(p.Cancel(b"r%d" % i)) for i in range(p.MAX_BATCH + 3)]
    carried = _carried(messages)
    assert [count for count, _ in carried] == [p.MAX_BATCH, 3]
    assert [m for _, group in carried for m in group] == messages


def test_packed_keeps_each_batch_within_max_batch_bytes():
    body = b"x" * (p.MAX_BATCH_BYTES // 3)
    messages = [p.encode_request_to_worker(p.Request(b"r%d" % i, "generate", body))
                for i in range(7)]
    carried = list(p.packed(messages))
    assert all(len(frames[2]) <= p.MAX_BATCH_BYTES for _, frames in carried)
    assert [count for count, _ in carried] == [2, 2, 2, 1]
    assert [m for _, frames in carried for m in p.unbatch(frames)] == messages


def test_packed_sends_a_message_too_large_to_pack_as_itself():
    small = p.encode_cancel(p.Cancel(b"r1"))
    large = p.encode_request_to_broker(p.Request(b"r2", "generate", b"x" * p.MAX_BATCH_BYTES))
    assert list(p.packed([small, large, small])) == [(1, small), (1, large), (1, small)]


# --- each refusal gives its own reason (peers read it in ERROR bad_request) -----------------


def _request(**fields: bytes) -> list[bytes]:
    frames = dict(rid=b"r1", service=b"generate", policy=b"", target=b"", timeout=b"0",
                  body=b"{}")
    frames.update(fields)
    return [V, p.REQUEST, *frames.values()]


def _ready(info: dict | bytes, worker_id: bytes = b"w1") -> list[bytes]:
    return [V, p.READY, worker_id, info if type(info) is bytes else orjson.dumps(info)]


COMMAND = b"\x42\x43\x44\x45\x46"  # not a command; the reason shows its first 4 bytes

REFUSALS = [
    (p.decode_from_client, [V], "message of 1 frame(s) is too short"),
    (p.decode_from_client, [b"ZR9" + b"v" * 20, p.HEARTBEAT],
     "unsupported protocol version b'ZR9vvvvvvvvvvvvv'"),
    (p.decode_from_client, [V, COMMAND], "command b'BCDE' is not valid from a client"),
    (p.decode_from_worker, [V, COMMAND], "command b'BCDE' is not valid from a worker"),
    (p.decode_to_client, [V, COMMAND], "command b'BCDE' is not valid to a client"),
    (p.decode_to_worker, [V, COMMAND], "command b'BCDE' is not valid to a worker"),
    (p.decode_from_client, [V, p.REQUEST, b"r1"], "REQUEST needs 8 frames, got 3"),
    (p.decode_from_client, _request(timeout=b"1" * 20), "timeout must be 1 to 19 ASCII digits"),
    (p.decode_from_client, _request(timeout=b"-1"), "timeout must be 1 to 19 ASCII digits"),
    (p.decode_from_client, _request(timeout=b"9" * 19),
     "timeout is above 9223372036854775807 ms"),
    (p.decode_from_client, _request(rid=b""), "request id must be 1 to 255 bytes"),
    (p.decode_from_client, _request(rid=b"r" * 256), "request id must be 1 to 255 bytes"),
    (p.decode_from_client, _request(service=b""), "service is empty"),
    (p.decode_from_client, _request(service=b"s" * 256), "service is longer than 255 bytes"),
    (p.decode_from_client, _request(service=b"\xff"), "service is not UTF-8"),
    (p.decode_from_client, _request(service=b"a\nb"),
     "service has a control or unprintable character"),
    (p.decode_from_client, _request(policy=b"a\nb"),
     "policy has a control or unprintable character"),
    (p.decode_from_client, _request(target=b"a\nb"),
     "target has a control or unprintable character"),
    (p.decode_from_client, [V, p.REPORT, b"", b"{}"], "reporter name is empty"),
    (p.decode_from_client, [V, p.REPORT, b"g", b" " * (p.MAX_REPORT_BYTES + 1)],
     "REPORT counters are larger than 65536 bytes"),
    (p.decode_from_client, [V, p.REPORT, b"g", b"{"], "REPORT counters is not JSON"),
    (p.decode_from_client, [V, p.REPORT, b"g", b"[]"], "REPORT counters is not a JSON object"),
    (p.decode_from_worker, _ready({"services": ["s"]}, worker_id=b""), "worker id is empty"),
    (p.decode_from_worker, _ready(b" " * (p.MAX_READY_BYTES + 1)),
     "READY info is longer than 65536 bytes"),
    (p.decode_from_worker, _ready({"services": []}),
     "READY services must be a non-empty list of names"),
    (p.decode_from_worker, _ready({"services": ["a\nb"]}),
     "READY service name has a control or unprintable character"),
    (p.decode_from_worker, _ready({"services": ["s"], "capacity": -1}),
     "READY capacity must be an integer >= 0"),
    (p.decode_from_worker, _ready({"services": ["s"], "token": 5}),
     "READY token must be a string of at most 64 characters"),
    (p.decode_from_worker, _ready({"services": ["s"], "token": "t" * (p.MAX_TOKEN + 1)}),
     "READY token must be a string of at most 64 characters"),
    (p.decode_from_worker, [V, p.ERROR, b"r1", b"", b"boom"], "error code is empty"),
    (p.decode_to_client, [V, p.CHUNK, b"r1", b"", b"a"], "worker id is empty"),
    (p.decode_to_client, [V, p.STATS, b"r1", b"[]"], "stats is not a JSON object"),
    (p.decode_to_worker, [V, p.REQUEST, b"r1", b"", b"{}"], "service is empty"),
    (p.unbatch, [V, p.BATCH], "BATCH needs 3 frames, got 2"),
    (p.unbatch, [V, p.BATCH, b"x" * (p.MAX_BATCH_BYTES + 1)], "BATCH is larger than 65536 bytes"),
    (p.unbatch, [V, p.BATCH, b"\x00"], "BATCH ends inside a message"),
    (p.unbatch, [V, p.BATCH, HEARTBEAT[:-1]], "BATCH ends inside a frame"),
    (p.unbatch, p.encode_batch([[V, p.BATCH, b""]]), "BATCH inside a BATCH"),
    (p.unbatch, [V, p.BATCH, b""], "BATCH must carry 1 to 256 messages"),
    (p.unbatch, [V, p.BATCH, _packed_message(V)],
     "a message in a BATCH has 1 frame(s), not 2 to 1024"),
]


@pytest.mark.parametrize("decode, frames, reason", REFUSALS)
def test_each_refusal_says_what_is_wrong(decode, frames, reason):
    with pytest.raises(ProtocolError) as refused:
        decode(frames)
    assert str(refused.value) == reason


def test_a_heartbeat_from_a_peer_carries_no_boot_id_and_one_from_the_broker_does():
    with pytest.raises(ProtocolError, match="HEARTBEAT needs 2 frames, got 3"):
        p.decode_from_client([V, p.HEARTBEAT, BOOT])
    with pytest.raises(ProtocolError, match="HEARTBEAT in-flight count must be 1 to 9 ASCII"):
        p.decode_from_worker([V, p.HEARTBEAT, BOOT])
    assert p.decode_to_worker([V, p.HEARTBEAT, BOOT]) == Heartbeat(BOOT)


# --- the bounds themselves are allowed ------------------------------------------------------


def test_a_name_of_max_id_length_bytes_and_a_token_of_max_token_are_taken():
    frames = _ready({"services": ["s" * p.MAX_ID_LENGTH], "token": "t" * p.MAX_TOKEN})
    assert p.decode_from_worker(frames) == Ready("w1", ["s" * p.MAX_ID_LENGTH], 0,
                                                 "t" * p.MAX_TOKEN)
    p._valid_names.clear()  # checked afresh, not found among the names known to be valid
    service = b"n" * p.MAX_ID_LENGTH
    assert p.decode_from_client(_request(service=service)).service == service.decode()


def test_a_ready_of_max_ready_bytes_is_taken():
    info = orjson.dumps({"services": ["s"]})
    info = info[:-1] + b" " * (p.MAX_READY_BYTES - len(info)) + b"}"
    assert len(info) == p.MAX_READY_BYTES
    assert p.decode_from_worker(_ready(info)).services == ["s"]


def test_a_batch_of_max_batch_bytes_one_message_or_max_frames_frames_is_taken():
    one = [V, p.HEARTBEAT]
    assert p.unbatch(p.encode_batch([one])) == [one]
    widest = [V, p.CHUNK] + [b""] * (p.MAX_FRAMES - 2)
    assert p.unbatch(p.encode_batch([widest])) == [widest]
    filler = p.MAX_BATCH_BYTES - len(p.encode_batch([[V, p.CHUNK, b""]])[2])
    largest = [V, p.CHUNK, b"x" * filler]
    assert len(p.encode_batch([largest])[2]) == p.MAX_BATCH_BYTES
    assert p.unbatch(p.encode_batch([largest])) == [largest]


def test_packed_fills_a_batch_to_exactly_max_batch_bytes():
    # Two messages whose packed sizes add up to MAX_BATCH_BYTES travel in one BATCH; a
    # byte more and the second goes on its own.
    half = p.MAX_BATCH_BYTES // 2
    overhead = len(p.encode_batch([[V, p.CHUNK, b"r", b""]])[2])
    fitting = [[V, p.CHUNK, b"r", b"x" * (half - overhead)]] * 2
    assert [count for count, _ in p.packed(fitting)] == [2]
    over = [fitting[0], [V, p.CHUNK, b"r", b"x" * (half - overhead + 1)]]
    assert [count for count, _ in p.packed(over)] == [1, 1]


def test_packed_fills_the_batch_after_a_full_one_to_exactly_max_batch_bytes_too():
    half = p.MAX_BATCH_BYTES // 2
    overhead = len(p.encode_batch([[V, p.CHUNK, b"r", b""]])[2])
    fitting = [[V, p.CHUNK, b"r", b"x" * (half - overhead)]] * 2
    messages = [p.encode_heartbeat()] * p.MAX_BATCH + fitting
    assert [count for count, _ in p.packed(messages)] == [p.MAX_BATCH, 2]


def test_packed_sends_a_lone_message_of_lone_message_frames_as_itself_and_a_longer_packed():
    five = [V, p.CHUNK, b"r", b"a", b"b"]
    assert len(five) == p.LONE_MESSAGE_FRAMES
    assert list(p.packed([five])) == [(1, five)]
    six = five + [b"c"]
    assert list(p.packed([six])) == [(1, p.encode_batch([six]))]
    overhead = len(p.encode_batch([six])[2]) - 1  # of six frames, one of them b"c"
    exactly = six[:-1] + [b"c" * (p.MAX_BATCH_BYTES - overhead)]
    assert len(p.encode_batch([exactly])[2]) == p.MAX_BATCH_BYTES
    assert list(p.packed([exactly])) == [(1, p.encode_batch([exactly]))]


def test_a_request_token_splits_back_into_the_client_and_its_rid():
    token = p.request_token(b"client", b"rid")
    assert token == b"\x06clientrid"
    assert p.split_request_token(token) == (b"client", b"rid")
    assert p.split_request_token(p.request_token(b"c", b"r")) == (b"c", b"r")
    assert p.split_request_token(b"") == (b"", b"")
    assert p.split_request_token(b"\x06client") == (b"", b"\x06client")  # no rid: not a token
    assert p.split_request_token(b"\x06clie") == (b"", b"\x06clie")


def test_the_memory_of_valid_names_is_bounded():
    p._valid_names.clear()
    for n in range(p.MAX_VALID_NAMES):
        p.decode_to_worker([V, p.REQUEST, b"r1", b"s%d" % n, b""])
    assert len(p._valid_names) == p.MAX_VALID_NAMES
    assert p._valid_names[b"s0"] == "s0"
    p.decode_to_worker([V, p.REQUEST, b"r1", b"one-more", b""])
    assert p._valid_names == {b"one-more": "one-more"}
