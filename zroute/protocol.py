"""The zroute wire protocol: pure encoders and decoders, no sockets.

Every message is a list of ZeroMQ frames that starts with the version header
and a one-byte command. docs/PROTOCOL.md describes each frame. The ROUTER
identity frame that ZeroMQ adds on a ROUTER socket is not part of a message:
the caller strips it before decoding and prepends it after encoding.

A frame list that does not parse raises ProtocolError, and only ProtocolError.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from typing import Iterator, Union

import orjson

VERSION = b"ZR2"

# Commands. One byte each; the same byte means the same thing in every direction.
READY = b"\x01"
HEARTBEAT = b"\x02"
DISCONNECT = b"\x03"
REQUEST = b"\x04"
CHUNK = b"\x05"
END = b"\x06"
ERROR = b"\x07"
CANCEL = b"\x08"
STATS = b"\x09"
DRAIN = b"\x0a"
BATCH = b"\x0b"
REPORT = b"\x0c"

COMMAND_NAMES = {
    READY: "READY",
    HEARTBEAT: "HEARTBEAT",
    DISCONNECT: "DISCONNECT",
    REQUEST: "REQUEST",
    CHUNK: "CHUNK",
    END: "END",
    ERROR: "ERROR",
    CANCEL: "CANCEL",
    STATS: "STATS",
    DRAIN: "DRAIN",
    BATCH: "BATCH",
    REPORT: "REPORT",
}

# Stable error codes carried by ERROR frames.
E_NO_WORKERS = "no_workers"
E_NO_SUCH_WORKER = "no_such_worker"
E_BAD_REQUEST = "bad_request"
E_UNKNOWN_POLICY = "unknown_policy"
E_HANDLER = "handler_error"
E_WORKER_LOST = "worker_lost"
E_TIMEOUT = "timeout"
E_QUEUE_FULL = "queue_full"
E_ID_IN_USE = "worker_id_in_use"
E_BROKER_UNREACHABLE = "broker_unreachable"
E_POLICY = "policy_error"  # a routing policy raised or chose no candidate
E_WRONG_ENDPOINT = "wrong_endpoint"  # a worker on the client socket, or a client on the worker one
E_LIMIT = "limit_exceeded"  # a peer's message, registration or share is over a limit
E_SLOW_READER = "slow_reader"  # raised by the client library, never sent
E_CLIENT_CLOSED = "client_closed"  # raised by the client library, never sent
E_AUTH_FAILED = "auth_failed"  # the broker refused the client's keys: raised, never sent
# A worker's answer to a REQUEST over its capacity (it serves several brokers): the broker
# routes the request elsewhere, and never relays this code to a client.
E_WORKER_FULL = "worker_full"

# The codes a worker hands on to its own caller when a call it made fails and its handler
# lets the error through: they say what happened to the request. The others would be
# misread on the way back: worker_full and broker_unreachable speak of a peer's own link
# to its broker (its caller's broker would take the worker for full, its client its broker
# for gone), and a client takes a timeout for its own deadline, though the call's ended.
PASSED_ON = frozenset({E_NO_WORKERS, E_NO_SUCH_WORKER, E_BAD_REQUEST, E_UNKNOWN_POLICY,
                       E_HANDLER, E_WORKER_LOST, E_QUEUE_FULL, E_POLICY, E_LIMIT})

# "direct" is a routing mode too, but it names its worker instead of a policy choosing one.
DIRECT = "direct"
# The policy of a request that names none, and the gateway's (Frontend.routing_mode).
DEFAULT_POLICY = "round_robin"

MAX_ID_LENGTH = 255  # worker ids, service and policy names
MAX_TOKEN = 64  # the secret in a worker's READY
MAX_CLIENT_RID = 255  # request ids chosen by clients
MAX_RID = 1024  # request ids on the worker leg, where the broker extends them
MAX_BATCH = 256  # messages in one BATCH
MAX_READY_BYTES = 1 << 16  # a READY's JSON; Broker.max_services_per_worker bounds it more
MAX_FRAMES = 1024  # frames in one message, header included; a longer one is rejected
# A worker's CHUNK or END gains the worker id frame on its way to the client, which must
# still take it: the broker fails a request whose worker sends a longer one.
MAX_WORKER_REPLY_FRAMES = MAX_FRAMES - 1
MAX_TIMEOUT_MS = 2**63 - 1  # a request's timeout fits a signed 64-bit integer
MAX_REPORT_BYTES = 1 << 16  # a REPORT's counters; a larger one is refused
MAX_INFLIGHT_DIGITS = 9  # a worker's in-flight count in its HEARTBEAT


_RETRY_AFTER = re.compile(r" \(retry after (\d+) s\)$")


def with_retry_after(message: str, seconds: float) -> str:
    """An ERROR message that tells the client when to try again (whole seconds, >= 1)."""
    return f"{message} (retry after {max(1, math.ceil(seconds))} s)"


def retry_after(message: str) -> int | None:
    """The seconds an ERROR message says to wait before trying again, if it says."""
    match = _RETRY_AFTER.search(message)
    return int(match.group(1)) if match else None


def request_token(client: bytes, rid: bytes) -> bytes:
    """The request id a worker sees: unique in the broker, made of the client's routing
    id (length-prefixed) and the client's own rid."""
    return bytes((len(client),)) + client + rid


def split_request_token(token: bytes) -> tuple[bytes, bytes]:
    """The client's routing id and its rid, from a request_token; (b"", token) for a
    token that is not one."""
    size = token[0] if token else 0
    if len(token) <= size + 1:
        return b"", token
    return token[1:size + 1], token[size + 1:]


class ProtocolError(ValueError):
    """A frame list that is not a valid zroute message."""


# --- messages -------------------------------------------------------------


@dataclass(slots=True)
class Request:
    """client -> broker, and broker -> worker (policy and target unused there)."""

    rid: bytes
    service: str
    body: bytes
    policy: str = ""
    target: str = ""
    timeout_ms: int = 0


@dataclass(slots=True)
class Chunk:
    """A part of a reply. worker_id is set on the broker -> client leg only."""

    rid: bytes
    chunks: list[bytes]
    worker_id: str = ""


@dataclass(slots=True)
class End:
    """The last part of a reply; it may carry the final chunks too."""

    rid: bytes
    chunks: list[bytes] = field(default_factory=list)
    worker_id: str = ""


@dataclass(slots=True)
class Error:
    rid: bytes
    code: str
    message: str


@dataclass(slots=True)
class Cancel:
    rid: bytes


@dataclass(slots=True)
class StatsRequest:
    rid: bytes
    service: str = ""  # only the live workers of this service; empty: every worker


@dataclass(slots=True)
class StatsReply:
    rid: bytes
    stats: dict


@dataclass(slots=True)
class Report:
    """client -> broker: the client's cumulative counters, which STATS replies carry."""

    name: str
    counters: dict


@dataclass(slots=True)
class Ready:
    worker_id: str
    services: list[str]
    capacity: int = 0  # 0 means unlimited
    token: str = ""  # a secret the worker process chose, to reclaim its id (docs/PROTOCOL.md)


@dataclass(slots=True)
class Heartbeat:
    """Any message proves liveness.

    From the broker it names the broker's boot id, so that a peer can tell
    that the broker restarted and forgot it. From a worker it may say how many
    requests the worker runs, from every broker (None: it does not say).
    """

    boot_id: bytes = b""
    inflight: int | None = None


@dataclass(slots=True)
class Disconnect:
    pass


@dataclass(slots=True)
class Drain:
    """worker -> broker: send me nothing new, I finish what I hold."""


Message = Union[
    Request, Chunk, End, Error, Cancel, StatsRequest, StatsReply, Report,
    Ready, Heartbeat, Disconnect, Drain,
]
FromWorker = Union[Chunk, End, Heartbeat, Ready, Error, Disconnect, Drain]  # what a worker sends


# --- encoding --------------------------------------------------------------


def encode_request_to_broker(m: Request) -> list[bytes]:
    return [VERSION, REQUEST, m.rid, m.service.encode(), m.policy.encode(),
            m.target.encode(), b"%d" % m.timeout_ms, m.body]


def encode_request_to_worker(m: Request) -> list[bytes]:
    return [VERSION, REQUEST, m.rid, m.service.encode(), m.body]


def encode_reply_from_worker(m: Chunk | End) -> list[bytes]:
    return [VERSION, CHUNK if isinstance(m, Chunk) else END, m.rid, *m.chunks]


def encode_reply_to_client(m: Chunk | End) -> list[bytes]:
    command = CHUNK if isinstance(m, Chunk) else END
    return [VERSION, command, m.rid, m.worker_id.encode(), *m.chunks]


def encode_error(m: Error) -> list[bytes]:
    return [VERSION, ERROR, m.rid, m.code.encode(), m.message.encode()]


def encode_cancel(m: Cancel) -> list[bytes]:
    return [VERSION, CANCEL, m.rid]


def encode_stats_request(m: StatsRequest) -> list[bytes]:
    return [VERSION, STATS, m.rid, m.service.encode()] if m.service else [VERSION, STATS, m.rid]


def encode_stats_reply(m: StatsReply) -> list[bytes]:
    return encode_encoded_stats_reply(m.rid, orjson.dumps(m.stats))


def encode_encoded_stats_reply(rid: bytes, stats: bytes) -> list[bytes]:
    """A STATS reply whose stats are JSON already: one encoding serves many replies."""
    return [VERSION, STATS, rid, stats]


def encode_report(m: Report) -> list[bytes]:
    return [VERSION, REPORT, m.name.encode(), orjson.dumps(m.counters)]


def encode_ready(m: Ready) -> list[bytes]:
    info = {"services": m.services, "capacity": m.capacity, "token": m.token}
    return [VERSION, READY, m.worker_id.encode(), orjson.dumps(info)]


def encode_heartbeat(m: Heartbeat | None = None) -> list[bytes]:
    if m is not None and m.boot_id:
        return [VERSION, HEARTBEAT, m.boot_id]
    if m is not None and m.inflight is not None:
        return [VERSION, HEARTBEAT, b"%d" % m.inflight]
    return [VERSION, HEARTBEAT]


def encode_disconnect(_: Disconnect | None = None) -> list[bytes]:
    return [VERSION, DISCONNECT]


def encode_drain(_: Drain | None = None) -> list[bytes]:
    return [VERSION, DRAIN]


# --- decoding --------------------------------------------------------------


# Names that passed _text's checks. The same few names (services, policies, worker ids)
# come with every request and reply: a lookup costs less than decoding and checking one.
_valid_names: dict[bytes, str] = {}
MAX_VALID_NAMES = 4096  # past this the memory is reset: a peer's made-up names cost it nothing


def name_problem(name: str) -> str | None:
    """Why a name a peer chose (worker id, service, policy...) is refused; None if it is
    not. Its length counts UTF-8 bytes, as on the wire. It goes into log lines, HTTP
    headers and metric labels: a control character (CR, LF, ESC...) or any other
    unprintable one is refused."""
    if not name:
        return "is empty"
    if len(name.encode()) > MAX_ID_LENGTH:
        return _TOO_LONG
    if not name.isprintable():
        return "has a control or unprintable character"
    return None


_TOO_LONG = f"is longer than {MAX_ID_LENGTH} bytes"


def _text(frame: bytes, what: str, *, allow_empty: bool = False) -> str:
    name = _valid_names.get(frame)
    if name is not None:
        return name
    if allow_empty and not frame:
        return ""
    if len(frame) > MAX_ID_LENGTH:  # before decoding: it bounds the work
        raise ProtocolError(f"{what} {_TOO_LONG}")
    try:
        name = frame.decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8") from None
    problem = name_problem(name)
    if problem:
        raise ProtocolError(f"{what} {problem}")
    if len(_valid_names) >= MAX_VALID_NAMES:
        _valid_names.clear()
    _valid_names[frame] = name
    return name


def _json_object(frame: bytes, what: str) -> dict:
    try:
        value = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise ProtocolError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return value


_FRAME_COUNT = struct.Struct(">H")
_FRAME_LENGTH = struct.Struct(">I")
LONE_MESSAGE_FRAMES = 5  # a lone message of more frames travels packed in a BATCH
MAX_BATCH_BYTES = 1 << 16  # a BATCH's packed frame; Broker.max_message_size is no less


def encode_batch(messages: list[list[bytes]]) -> list[bytes]:
    """Several messages for one peer as one, packed in a single frame: taking a frame
    from a socket costs a receiver more than unpacking it does."""
    parts = []
    for message in messages:
        parts.append(_FRAME_COUNT.pack(len(message)))
        for frame in message:
            parts.append(_FRAME_LENGTH.pack(len(frame)))
            parts.append(frame)
    return [VERSION, BATCH, b"".join(parts)]


def packed(messages: list[list[bytes]]) -> Iterator[tuple[int, list[bytes]]]:
    """The ZeroMQ messages that carry `messages` to one peer, in order, each with how
    many of them it carries. A BATCH carries up to MAX_BATCH messages and
    MAX_BATCH_BYTES; a lone message that is short, or too large to pack, goes as itself."""
    group: list[list[bytes]] = []
    size = 0
    for message in messages:
        length = _packed_length(message)
        if group and (len(group) == MAX_BATCH or size + length > MAX_BATCH_BYTES):
            yield len(group), _carrier(group, size)
            group, size = [], 0
        group.append(message)
        size += length
    if group:
        yield len(group), _carrier(group, size)


def _packed_length(message: list[bytes]) -> int:
    return _FRAME_COUNT.size + sum(map(len, message)) + _FRAME_LENGTH.size * len(message)


def _carrier(group: list[list[bytes]], size: int) -> list[bytes]:
    if len(group) == 1 and (len(group[0]) <= LONE_MESSAGE_FRAMES or size > MAX_BATCH_BYTES):
        return group[0]
    return encode_batch(group)


def unbatch(frames: list[bytes]) -> list[list[bytes]]:
    """The messages a BATCH carries, or [frames] for any other message."""
    if len(frames) < 2 or frames[1] != BATCH or frames[0] != VERSION:
        return [frames]
    if len(frames) != 3:
        raise ProtocolError(f"BATCH needs 3 frames, got {len(frames)}")
    if len(frames[2]) > MAX_BATCH_BYTES:  # bounds the work a hostile batch can cause
        raise ProtocolError(f"BATCH is larger than {MAX_BATCH_BYTES} bytes")
    try:
        messages = _unpack(frames[2])
    except struct.error:
        raise ProtocolError("BATCH ends inside a message") from None
    if not 0 < len(messages) <= MAX_BATCH:
        raise ProtocolError(f"BATCH must carry 1 to {MAX_BATCH} messages")
    return messages


def _unpack(payload: bytes) -> list[list[bytes]]:
    messages = []
    end = len(payload)
    position = 0
    while position < end and len(messages) <= MAX_BATCH:
        (count,) = _FRAME_COUNT.unpack_from(payload, position)
        position += 2
        if not 2 <= count <= MAX_FRAMES:
            raise ProtocolError(f"a message in a BATCH has {count} frame(s), "
                                f"not 2 to {MAX_FRAMES}")
        message = []
        for _ in range(count):
            (length,) = _FRAME_LENGTH.unpack_from(payload, position)
            position += 4
            if position + length > end:
                raise ProtocolError("BATCH ends inside a frame")
            message.append(payload[position:position + length])
            position += length
        if message[1] == BATCH:
            raise ProtocolError("BATCH inside a BATCH")
        messages.append(message)
    return messages


def _header(frames: list[bytes]) -> bytes:
    """Check the version and return the command byte."""
    if len(frames) < 2:
        raise ProtocolError(f"message of {len(frames)} frame(s) is too short")
    if frames[0] != VERSION:
        raise ProtocolError(f"unsupported protocol version {frames[0][:16]!r}")
    return frames[1]


def _expect(frames: list[bytes], count: int, *, at_least: bool = False) -> None:
    ok = len(frames) >= count if at_least else len(frames) == count
    if not ok:
        name = COMMAND_NAMES[frames[1]]
        raise ProtocolError(f"{name} needs {count} frames, got {len(frames)}")


def _rid(frame: bytes, limit: int = MAX_RID) -> bytes:
    if not frame or len(frame) > limit:
        raise ProtocolError(f"request id must be 1 to {limit} bytes")
    return frame


def _error(frames: list[bytes]) -> Error:
    """An empty request id means the error is about the peer, not a request."""
    _expect(frames, 5)
    rid = frames[2] and _rid(frames[2])
    return Error(rid, _text(frames[3], "error code"), frames[4].decode(errors="replace"))


def _heartbeat(frames: list[bytes], *, from_broker: bool) -> Heartbeat:
    _expect(frames, 3 if from_broker else 2)
    return Heartbeat(frames[2] if from_broker else b"")


def decode_from_client(frames: list[bytes]) -> Request | Cancel | StatsRequest | Report | Heartbeat:
    """Decode what a client sends to the broker."""
    command = _header(frames)
    if command == REQUEST:
        _expect(frames, 8)
        if not frames[6].isdigit() or len(frames[6]) > 19:
            raise ProtocolError("timeout must be 1 to 19 ASCII digits")
        timeout_ms = int(frames[6])
        if timeout_ms > MAX_TIMEOUT_MS:
            raise ProtocolError(f"timeout is above {MAX_TIMEOUT_MS} ms")
        return Request(_rid(frames[2], MAX_CLIENT_RID), _text(frames[3], "service"), frames[7],
                       _text(frames[4], "policy", allow_empty=True),
                       _text(frames[5], "target", allow_empty=True), timeout_ms)
    if command == CANCEL:
        _expect(frames, 3)
        return Cancel(_rid(frames[2], MAX_CLIENT_RID))
    if command == STATS:
        if len(frames) != 4:
            _expect(frames, 3)
            return StatsRequest(_rid(frames[2], MAX_CLIENT_RID))
        return StatsRequest(_rid(frames[2], MAX_CLIENT_RID), _text(frames[3], "service"))
    if command == HEARTBEAT:
        return _heartbeat(frames, from_broker=False)
    if command == REPORT:
        return _report(frames)
    raise ProtocolError(f"command {command[:4]!r} is not valid from a client")


def _report(frames: list[bytes]) -> Report:
    _expect(frames, 4)
    name = _text(frames[2], "reporter name")
    if len(frames[3]) > MAX_REPORT_BYTES:  # checked before parsing: it bounds the work
        raise ProtocolError(f"REPORT counters are larger than {MAX_REPORT_BYTES} bytes")
    return Report(name, _json_object(frames[3], "REPORT counters"))


def decode_to_client(frames: list[bytes]) -> Chunk | End | Error | StatsReply | Heartbeat:
    """Decode what the broker sends to a client."""
    command = _header(frames)
    if command == CHUNK or command == END:
        _expect(frames, 4, at_least=True)
        cls = Chunk if command == CHUNK else End
        return cls(_rid(frames[2]), frames[4:], _text(frames[3], "worker id"))
    if command == ERROR:
        return _error(frames)
    if command == STATS:
        _expect(frames, 4)
        return StatsReply(_rid(frames[2]), _json_object(frames[3], "stats"))
    if command == HEARTBEAT:
        return _heartbeat(frames, from_broker=True)
    raise ProtocolError(f"command {command[:4]!r} is not valid to a client")


def decode_from_worker(frames: list[bytes]) -> FromWorker:
    """Decode what a worker sends to the broker."""
    command = _header(frames)
    if command == CHUNK or command == END:
        _expect(frames, 3, at_least=True)
        cls = Chunk if command == CHUNK else End
        return cls(_rid(frames[2]), frames[3:])
    if command == HEARTBEAT:
        return _worker_heartbeat(frames)
    if command == READY:
        return _ready(frames)
    if command == ERROR:
        return _error(frames)
    if command == DISCONNECT:
        _expect(frames, 2)
        return Disconnect()
    if command == DRAIN:
        _expect(frames, 2)
        return Drain()
    raise ProtocolError(f"command {command[:4]!r} is not valid from a worker")


def _worker_heartbeat(frames: list[bytes]) -> Heartbeat:
    """A worker's HEARTBEAT, with the count of the requests it runs or without."""
    if len(frames) == 2:
        return Heartbeat()
    _expect(frames, 3)
    if not frames[2].isdigit() or len(frames[2]) > MAX_INFLIGHT_DIGITS:
        raise ProtocolError(f"HEARTBEAT in-flight count must be 1 to {MAX_INFLIGHT_DIGITS} "
                            "ASCII digits")
    return Heartbeat(inflight=int(frames[2]))


def _ready(frames: list[bytes]) -> Ready:
    _expect(frames, 4)
    worker_id = _text(frames[2], "worker id")
    if len(frames[3]) > MAX_READY_BYTES:
        raise ProtocolError(f"READY info is longer than {MAX_READY_BYTES} bytes")
    info = _json_object(frames[3], "READY info")
    services = info.get("services")
    if not isinstance(services, list) or not services or not all(
            isinstance(s, str) for s in services):
        raise ProtocolError("READY services must be a non-empty list of names")
    for service in services:
        problem = name_problem(service)
        if problem:
            raise ProtocolError(f"READY service name {problem}")
    capacity = info.get("capacity", 0)
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
        raise ProtocolError("READY capacity must be an integer >= 0")
    token = info.get("token", "")
    if not isinstance(token, str) or len(token) > MAX_TOKEN:
        raise ProtocolError(f"READY token must be a string of at most {MAX_TOKEN} characters")
    return Ready(worker_id, services, capacity, token)


def decode_to_worker(frames: list[bytes]) -> Request | Cancel | Heartbeat | Disconnect | Error:
    """Decode what the broker sends to a worker."""
    command = _header(frames)
    if command == REQUEST:
        _expect(frames, 5)
        return Request(_rid(frames[2]), _text(frames[3], "service"), frames[4])
    if command == CANCEL:
        _expect(frames, 3)
        return Cancel(_rid(frames[2]))
    if command == HEARTBEAT:
        return _heartbeat(frames, from_broker=True)
    if command == DISCONNECT:
        _expect(frames, 2)
        return Disconnect()
    if command == ERROR:
        return _error(frames)
    raise ProtocolError(f"command {command[:4]!r} is not valid to a worker")
