"""The Python client of the brokers.

    async with Client("tcp://127.0.0.1:5555") as client:
        async for chunk in client.round_robin("generate", {"text": "a,b"}):
            print(chunk.decode(), end="")

One DEALER socket per broker carries any number of concurrent requests, told apart by
request id; with several brokers (`Client(["tcp://b1:5555", "tcp://b2:5555"])`) each
request goes through one of them, and its cancel and replies through that one. Leaving a
stream early (break, aclose(), or dropping it) sends CANCEL, and the worker's handler is
cancelled.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import socket
import time
from collections import deque
from functools import partial
from typing import Any, Callable, Generator, Generic, Iterator, Sequence, TypeVar

import orjson
import zmq
from zmq.utils.monitor import parse_monitor_message

from zroute import protocol as p
from zroute.channel import SOCKET_HWM, Channel, dealer
from zroute.connection import (CONNECTION_EVENTS, HANDSHAKE_FAILURES, ConnectionWatch,
                               handshake_failure, retried, watched_dealer)
from zroute.curve import PeerKeys
from zroute.brokerstats import combine
from zroute.endpoints import check_endpoint
from zroute.zmqio import readable
from zroute.ratelimit import LogLimiter
from zroute.settings import BrokerSettings

log = logging.getLogger("zroute.client")

# The broker's defaults: its client endpoint, a request's deadline, its heartbeat.
DEFAULT_ADDRESS = BrokerSettings.frontend
DEFAULT_TIMEOUT = BrokerSettings.request_timeout
DEFAULT_TIMEOUT_SETTING = "the client's timeout"
REQUEST_TIMEOUT_SETTING = "the request's timeout"  # timeout= given to request()
HEARTBEAT_INTERVAL = BrokerSettings.heartbeat_interval
HEARTBEAT_MISSES = BrokerSettings.heartbeat_misses
MAX_MESSAGE_SIZE = BrokerSettings.max_message_size
DEADLINE_GRACE = 1.0  # the broker ends a request at its deadline; the client waits this much more
# A broker that has not answered a heartbeat this long after it was sent gets no new
# request while another broker has answered: the client heartbeats each broker every
# interval, so a broker that hangs is left within one interval and this margin, while its
# requests wait the full Broker.heartbeat_misses before they go elsewhere. At most half
# an interval, so that a short interval keeps its meaning.
ANSWER_MARGIN_S = 0.1
MAX_BUFFERED_BYTES = 16 << 20  # a stream whose reader falls this far behind is cancelled
SEND_WAIT_MS = 100  # a BlockingClient's send waits this long, then looks at its connection

Body = bytes | str | Any
WorkerId = str | int  # any worker id, by its str(): Dynamo's are integers
Result = TypeVar("Result")  # what request() returns: a Stream or a BlockingStream


class BrokerError(Exception):
    """An ERROR from the broker or a worker, or the client giving up."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def timeout_error(setting: str, seconds: float) -> BrokerError:
    """A request ended by its deadline: the setting that ended it, and its value."""
    return BrokerError(p.E_TIMEOUT, f"no reply within {setting} ({seconds:g} s)")


def reply_error(msg: p.Error, timeout_setting: str, timeout: float) -> BrokerError:
    """A broker's ERROR for a request, as raised. The broker's deadline is the one the
    client gave it, so a timeout names the client's setting."""
    if msg.code == p.E_TIMEOUT:
        return timeout_error(timeout_setting, timeout)
    return BrokerError(msg.code, msg.message)


# The one liveness rule of both clients: heartbeat every interval while requests wait,
# and give up on a broker silent for `heartbeat_misses` intervals (Broker.heartbeat_misses),
# or whose connection closed.

def broker_given_up_at(last_heard: float, heartbeat_interval: float,
                       heartbeat_misses: int) -> float:
    """When a broker last heard from at `last_heard` counts as gone."""
    return last_heard + heartbeat_interval * heartbeat_misses


def silent_broker_error(address: str) -> BrokerError:
    return BrokerError(p.E_BROKER_UNREACHABLE, f"no answer from the broker at {address}")


def closed_connection_error(address: str) -> BrokerError:
    return BrokerError(p.E_BROKER_UNREACHABLE, f"the connection to the broker at {address} closed")


def slow_reader_error() -> BrokerError:
    """How both clients end a stream whose reader fell more than max_buffered_bytes
    behind it (they cancel it too): no reader can make a client buffer without bound."""
    return BrokerError(p.E_SLOW_READER, "the reader fell too far behind the stream")


def fell_behind(unread: int, limit: int) -> bool:
    """Whether a reader that has `unread` bytes waiting when more arrive is too slow.
    Only what it left unread counts, not what just arrived: a chunk that finds nothing
    (or little) waiting passes whatever its size (Broker.max_message_size bounds it
    already), or one large chunk would cut off a reader as fast as can be."""
    return unread > limit


def client_closed_error() -> BrokerError:
    return BrokerError(p.E_CLIENT_CLOSED, "the client was closed")


def no_stats_error(address: str, timeout: float) -> BrokerError:
    return BrokerError(p.E_BROKER_UNREACHABLE,
                       f"no answer from the broker at {address} within {timeout:g} s")


def default_name() -> str:
    """A client's name where none is given: unique among the processes of a cluster."""
    return f"{socket.gethostname()}-{os.getpid()}"


def encode_body(body: Body) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return orjson.dumps(body)


class Reply:
    """The client's side of one request in flight: chunks received, and how it ended.

    The client holds Replies; the caller holds the Stream that reads one. So
    a Stream its reader drops (a `break` out of `async for`) is finalized,
    and its finalizer cancels the request.
    """

    __slots__ = ("client", "rid", "frames", "broker", "tried", "timeout", "timeout_setting",
                 "deadline", "worker_id", "chunks", "buffered", "waiter", "error", "done")

    def __init__(self, client: Client, rid: bytes, timeout: float, timeout_setting: str,
                 frames: list[bytes]) -> None:
        self.client = client
        self.rid = rid
        self.frames: list[bytes] | None = frames  # the REQUEST, to send again elsewhere
        self.broker: BrokerConnection | None = None  # the one that holds it
        self.tried: set[BrokerConnection] = set()
        self.timeout = timeout
        self.timeout_setting = timeout_setting  # named when the deadline ends the request
        self.deadline = time.monotonic() + timeout + DEADLINE_GRACE
        self.worker_id: str | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0  # bytes in chunks
        self.waiter: asyncio.Future | None = None
        self.error: BaseException | None = None
        self.done = False

    def feed(self, chunks: list[bytes], worker_id: str, last: bool) -> None:
        self.worker_id = worker_id
        self.frames = None  # begun: it is never sent again, and its body need not be kept
        if not last and fell_behind(self.buffered, self.client.max_buffered_bytes):
            self.cancel(slow_reader_error())  # after what it holds already
            return
        self.chunks.extend(chunks)
        self.buffered += sum(map(len, chunks))
        if last:
            self.finish(None)
        else:
            self.wake()

    def timed_out(self) -> BrokerError:
        return timeout_error(self.timeout_setting, self.timeout)

    def cancel(self, error: BaseException | None = None) -> None:
        """Stop the request, if it is still going: the broker and the worker are told,
        and the reply ends (with `error`, if one is given)."""
        if not self.done:
            self.client._cancel(self)
            self.finish(error)

    def finish(self, error: BaseException | None) -> None:
        self.done = True
        self.error = error
        self.client._forget(self)
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until something arrives or the reply ends."""
        self.waiter = self.client.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


class Stream:
    """The reply to one request: an async iterator of chunks (bytes).

    `worker_id` names the worker once its first reply has arrived.
    """

    __slots__ = ("_reply",)

    def __init__(self, reply: Reply) -> None:
        self._reply = reply

    @property
    def rid(self) -> bytes:
        return self._reply.rid

    @property
    def worker_id(self) -> str | None:
        return self._reply.worker_id

    @property
    def done(self) -> bool:
        return self._reply.done

    def __aiter__(self) -> Stream:
        return self

    def __await__(self) -> Generator[None, None, Stream]:
        """`stream = await client.round_robin(...)` gives the stream itself: the form
        of clients whose request() is a coroutine."""
        return self
        yield  # a generator function, as __await__ must be; it never suspends

    async def __anext__(self) -> bytes:
        reply = self._reply
        while True:
            if reply.chunks:
                chunk = reply.chunks.popleft()
                reply.buffered -= len(chunk)
                return chunk
            if reply.done:
                if reply.error is not None:
                    raise reply.error
                raise StopAsyncIteration
            await reply.wait()

    async def first(self) -> bytes | None:
        """Wait for the first chunk (or the end) without consuming it."""
        reply = self._reply
        while not reply.chunks and not reply.done:
            await reply.wait()
        if not reply.chunks and reply.error is not None:
            raise reply.error
        return reply.chunks[0] if reply.chunks else None

    @property
    def complete(self) -> bool:
        """True once the reply has ended with its END (not with an error)."""
        return self._reply.done and self._reply.error is None

    async def batch(self) -> list[bytes]:
        """Every chunk that has arrived, waiting for one if none has; [] at the end.

        Chunks that arrive together can then be written together.
        """
        reply = self._reply
        while not reply.chunks:
            if reply.done:
                if reply.error is not None:
                    raise reply.error
                return []
            await reply.wait()
        chunks = list(reply.chunks)
        reply.chunks.clear()
        reply.buffered = 0
        return chunks

    async def read(self) -> bytes:
        """The whole reply, joined."""
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Stop the request: the broker and the worker are told, the stream ends."""
        self._reply.cancel()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        reply = self._reply
        if not reply.done:
            try:
                # Later, not here: a finalizer may run in the middle of a send on the socket.
                reply.client.loop.call_soon(reply.cancel)
            except Exception:
                pass  # the client or its loop is gone already


class PolicyShortcuts(Generic[Result]):
    """What both clients share: `round_robin`, `random` and `direct` (request() with that
    policy), and the making of a REQUEST."""

    timeout: float
    timeout_setting: str
    max_message_size: int
    _ids: Iterator[int]

    def request(self, service: str, body: Body, *, policy: str = "", worker: WorkerId = "",
                timeout: float | None = None) -> Result:
        raise NotImplementedError

    def round_robin(self, service: str, body: Body, **options: Any) -> Result:
        return self.request(service, body, policy="round_robin", **options)

    def random(self, service: str, body: Body, **options: Any) -> Result:
        return self.request(service, body, policy="random", **options)

    def direct(self, service: str, body: Body, worker_id: WorkerId, **options: Any) -> Result:
        return self.request(service, body, policy="direct", worker=worker_id, **options)

    def _new_request(self, service: str, body: Body, policy: str, worker: WorkerId,
                     timeout: float | None) -> tuple[p.Request, float, str]:
        """The REQUEST to send, its timeout, and the setting that timeout comes from."""
        if timeout is None:
            timeout, setting = self.timeout, self.timeout_setting
        else:
            setting = REQUEST_TIMEOUT_SETTING
        encoded = encode_body(body)
        if len(encoded) > self.max_message_size:
            # Sent, it would close the connection (the broker's socket takes no larger
            # frame), and fail every other request on it: refused here, it fails alone.
            raise BrokerError(p.E_LIMIT, f"the body is {len(encoded)} bytes, more than "
                                         f"Broker.max_message_size ({self.max_message_size} "
                                         "bytes)")
        rid = b"%x" % next(self._ids)
        message = p.Request(rid, service, encoded, policy, str(worker), int(timeout * 1000))
        return message, timeout, setting


class BrokerConnection:
    """A Client's connection to one broker: its socket, and what the client knows of
    that broker: when it last heard from it, its boot id, whether it refused the
    client's keys, and the STATS waiting for its answer."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel: Channel | None = None
        self.watch: ConnectionWatch | None = None
        # Heard from since the connection opened: until then it takes no new requests
        # while another broker does.
        self.heard = False
        self.last_heard = 0.0
        self.beat_sent_at = 0.0  # when the client last sent it a heartbeat
        self.boot_id: bytes | None = None
        self.refused: BrokerError | None = None  # why the broker refused this client's keys
        self.stats_waiters: dict[bytes, asyncio.Future] = {}

    def alive(self, heartbeat_interval: float, heartbeat_misses: int) -> bool:
        """False once the broker has been silent for several heartbeats, or its
        connection closed."""
        given_up_at = broker_given_up_at(self.last_heard, heartbeat_interval, heartbeat_misses)
        return self.refused is None and time.monotonic() < given_up_at

    def fresh(self, heartbeat_interval: float) -> bool:
        """It has been heard from on its connection, and since the last heartbeat sent to
        it, unless that heartbeat is too recent to have been answered yet (less than
        ANSWER_MARGIN_S, or half an interval if shorter)."""
        margin = min(ANSWER_MARGIN_S, heartbeat_interval / 2)
        return self.heard and (self.last_heard >= self.beat_sent_at
                               or time.monotonic() < self.beat_sent_at + margin)

    def send(self, frames: list[bytes]) -> None:
        self.channel.send(frames)

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        if self.channel is not None:
            self.channel.close()


class Client(PolicyShortcuts[Stream]):
    """An asyncio client of the brokers' client-facing sockets: `address` is one
    endpoint, or a list of them, one per broker of a deployment.

    It spreads new requests over the live brokers, in turn (a broker is live while its
    connection is up and it answers its heartbeats: one that misses one gets no new
    request while another answers). A request whose broker is lost (its
    connection closes, it falls silent, or it restarted) before the request's first
    chunk is sent again through another live broker, once per broker at most, within
    its deadline; a stream that has begun ends with broker_unreachable. A cancel goes
    to the broker that holds the request.

    `timeout` is the default deadline of a request, and `timeout_setting` what a
    request it ends calls it (the gateway's is "Frontend.request_timeout").

    A client given `report` sends what it returns (a JSON object of cumulative
    counters, at most protocol.MAX_REPORT_BYTES) to every broker with each heartbeat,
    under `name`; the brokers' stats carry every reporter's latest, in "gateways".

    A stream whose reader falls `max_buffered_bytes` behind is cancelled with the
    error slow_reader: a reader cannot make the client buffer without bound. At most
    `receive_hwm` messages from a broker wait for the event loop (then libzmq stops
    reading, and the broker's own limits apply).

    A request whose body is over `max_message_size` (the broker's Broker.max_message_size)
    raises limit_exceeded at once: sent, it would close the connection to the broker.

    A broker with CURVE takes a client with `curve` keys only (PeerKeys.load("keys/
    NAME.key_secret", "keys/broker.key")), and only if its public key is in the broker's
    clients' allowlist; if it is not, the client's requests fail with auth_failed, and its
    log says why.
    """

    def __init__(self, address: str | Sequence[str] = DEFAULT_ADDRESS, *,
                 timeout: float = DEFAULT_TIMEOUT,
                 timeout_setting: str = DEFAULT_TIMEOUT_SETTING,
                 heartbeat_interval: float = HEARTBEAT_INTERVAL,
                 heartbeat_misses: int = HEARTBEAT_MISSES,
                 report: Callable[[], dict] | None = None, name: str = "",
                 context: zmq.Context | None = None,
                 max_buffered_bytes: int = MAX_BUFFERED_BYTES,
                 receive_hwm: int = SOCKET_HWM, curve: PeerKeys | None = None,
                 max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        addresses = [address] if isinstance(address, str) else list(address)
        if not addresses:
            raise ValueError("a client needs at least one broker endpoint")
        self.max_message_size = max_message_size
        self.brokers = [BrokerConnection(check_endpoint(a)) for a in addresses]
        self.address = ", ".join(addresses)  # as messages name the brokers
        self.curve = curve
        self.max_buffered_bytes = max_buffered_bytes
        self.receive_hwm = receive_hwm
        self.timeout = timeout
        self.timeout_setting = timeout_setting
        self.report = report
        self.name = name or default_name()
        self._report_too_large = LogLimiter(log, interval=60.0)
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_misses = heartbeat_misses
        self.context = context or zmq.Context.instance()
        self.replies: dict[bytes, Reply] = {}
        self.resent = 0  # requests sent again through another broker
        self._refused_by_all: BrokerError | None = None  # read per request: kept, not built
        self._ids = itertools.count(1)
        self._turn = itertools.count()
        self._connected = False
        self.closed = False
        self._watchdog: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop
        # Each message type the broker may send, and what handles it: a missing one is a
        # KeyError, never a message mistaken for another.
        self.message_handlers: dict[type, Callable[[BrokerConnection, Any], None]] = {
            p.Chunk: self._on_reply,
            p.End: self._on_reply,
            p.Error: self._on_error,
            p.StatsReply: self._on_stats,
            p.Heartbeat: self._on_heartbeat,
        }

    async def __aenter__(self) -> Client:
        self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def connect(self) -> None:
        """Open the sockets; call it inside the running event loop."""
        self.loop = asyncio.get_running_loop()
        for broker in self.brokers:
            # A broker that dies closes the connection: its requests fail (or go to
            # another broker) at once rather than after the heartbeats it misses.
            sock, broker.watch = watched_dealer(
                self.context, broker.address, partial(self._on_connected, broker),
                partial(self._on_disconnected, broker), partial(self._on_refused, broker),
                self.receive_hwm, self.curve)
            broker.channel = Channel(sock, partial(self._on_message, broker))
            broker.last_heard = time.monotonic()
            self._beat(broker)
        self._connected = True
        self._watchdog = self.loop.create_task(self._watch())

    async def close(self) -> None:
        self.closed = True
        for reply in list(self.replies.values()):
            reply.cancel(client_closed_error())  # a cut stream must not read as complete
        if self._watchdog is not None:
            self._watchdog.cancel()
        for broker in self.brokers:
            broker.close()

    @property
    def broker_alive(self) -> bool:
        """False once every broker has been silent for several heartbeats, or lost."""
        return any(broker.alive(self.heartbeat_interval, self.heartbeat_misses)
                   for broker in self.brokers)

    @property
    def refused(self) -> BrokerError | None:
        """Why the brokers refused this client's keys, once every one has."""
        return self._refused_by_all

    def live_brokers(self) -> list[BrokerConnection]:
        return [broker for broker in self.brokers
                if broker.alive(self.heartbeat_interval, self.heartbeat_misses)]

    # --- requests -------------------------------------------------------------

    def request(self, service: str, body: Body, *, policy: str = "", worker: WorkerId = "",
                timeout: float | None = None) -> Stream:
        """Send a request; the reply streams from the returned Stream.

        `policy` empty means the broker's default. `worker` is the target of
        the "direct" policy. `timeout` (seconds) ends the request if it is not
        done by then.
        """
        self._check_open()
        message, timeout, setting = self._new_request(service, body, policy, worker, timeout)
        reply = Reply(self, message.rid, timeout, setting, p.encode_request_to_broker(message))
        if self._refused_by_all is not None:
            reply.finish(self._refused_by_all)
            return Stream(reply)
        self.replies[message.rid] = reply
        self._send_through(reply, self._next_broker(reply.tried))
        return Stream(reply)

    async def stats(self, timeout: float = 5.0, service: str = "") -> dict:
        """The stats of every broker, combined (zroute/brokerstats.py): the totals, each
        broker's own, and each worker once; with `service`, only the live workers of that
        service (and no gateways' reports). BrokerError if no broker answers."""
        self._check_open()
        answers = await asyncio.gather(*(self._stats_of(broker, timeout, service)
                                         for broker in self.brokers))
        errors = [answer for answer in answers if isinstance(answer, BrokerError)]
        if len(errors) == len(answers):
            raise errors[0]
        return combine([(broker.address, answer if isinstance(answer, dict) else answer.message)
                        for broker, answer in zip(self.brokers, answers)])

    async def _stats_of(self, broker: BrokerConnection, timeout: float,
                        service: str) -> dict | BrokerError:
        """One broker's STATS answer, or why there is none."""
        if broker.refused is not None:
            return broker.refused
        if not broker.alive(self.heartbeat_interval, self.heartbeat_misses):
            return BrokerError(p.E_BROKER_UNREACHABLE, f"the broker at {broker.address} is "
                                                       "unreachable")
        rid = b"s%x" % next(self._ids)
        waiter = self.loop.create_future()
        broker.stats_waiters[rid] = waiter
        broker.send(p.encode_stats_request(p.StatsRequest(rid, service)))
        try:
            return await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            return no_stats_error(broker.address, timeout)
        except BrokerError as e:
            return e
        finally:
            broker.stats_waiters.pop(rid, None)

    # --- plumbing ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise client_closed_error()
        if not self._connected:
            raise RuntimeError("the client is not connected: use `async with Client(...) as "
                               "client`, or call client.connect() in the running event loop")

    def _next_broker(self, tried: set[BrokerConnection]) -> BrokerConnection:
        """The broker for a new request, in turn: among the live ones not tried yet that
        answered their last heartbeat, else those not known to be lost, else any."""
        if len(self.brokers) == 1:
            return self.brokers[0]  # nothing to choose, and this is paid per request
        untried = [broker for broker in self.brokers if broker not in tried] or self.brokers
        live = [broker for broker in untried
                if broker.alive(self.heartbeat_interval, self.heartbeat_misses)]
        choices = [broker for broker in live if broker.fresh(self.heartbeat_interval)] \
            or live or untried
        return choices[next(self._turn) % len(choices)]

    def _send_through(self, reply: Reply, broker: BrokerConnection) -> None:
        reply.broker = broker
        reply.tried.add(broker)
        broker.send(reply.frames)

    def _lost(self, broker: BrokerConnection, error: BrokerError) -> None:
        """A broker is lost (or restarted): its requests go elsewhere or end."""
        for reply in [r for r in self.replies.values() if r.broker is broker]:
            self._move_or_end(reply, error)

    def _move_or_end(self, reply: Reply, error: BrokerError) -> None:
        """A request its broker lost: if it has had no chunk, to another live broker it
        has not tried, within its deadline; else it ends with `error`."""
        broker = reply.broker
        others = [b for b in self.live_brokers() if b not in reply.tried]
        if reply.worker_id is None and others and time.monotonic() < reply.deadline:
            self.resent += 1
            if broker.last_heard != float("-inf"):  # silent, not gone: it may wake
                broker.send(p.encode_cancel(p.Cancel(reply.rid)))
            self._send_through(reply, self._next_broker(reply.tried))
        else:
            reply.finish(error)

    def _cancel(self, reply: Reply) -> None:
        if self.replies.pop(reply.rid, None) is not None and reply.broker is not None:
            reply.broker.send(p.encode_cancel(p.Cancel(reply.rid)))

    def _forget(self, reply: Reply) -> None:
        self.replies.pop(reply.rid, None)

    def _on_message(self, broker: BrokerConnection, frames: list[bytes]) -> None:
        broker.last_heard = time.monotonic()
        broker.heard = True
        try:
            msg = p.decode_to_client(frames)
        except p.ProtocolError:
            return  # not from a zroute broker; nothing to route it to
        self.message_handlers[type(msg)](broker, msg)

    def _reply_from(self, broker: BrokerConnection, rid: bytes) -> Reply | None:
        """The request `rid` if `broker` holds it: a broker it left behind has nothing
        more to say of it."""
        reply = self.replies.get(rid)
        return reply if reply is not None and reply.broker is broker else None

    def _on_reply(self, broker: BrokerConnection, msg: p.Chunk | p.End) -> None:
        reply = self._reply_from(broker, msg.rid)
        if reply is not None:
            reply.feed(msg.chunks, msg.worker_id, type(msg) is p.End)

    def _on_error(self, broker: BrokerConnection, msg: p.Error) -> None:
        reply = self._reply_from(broker, msg.rid)
        if reply is not None:
            error = reply_error(msg, reply.timeout_setting, reply.timeout)
            if msg.code == p.E_BROKER_UNREACHABLE:  # the broker stops: another may serve it
                self._move_or_end(reply, error)
            else:
                reply.finish(error)
        waiter = broker.stats_waiters.get(msg.rid)  # wrong_endpoint answers STATS too
        if waiter is not None and not waiter.done():
            waiter.set_exception(BrokerError(msg.code, msg.message))

    def _on_stats(self, broker: BrokerConnection, msg: p.StatsReply) -> None:
        waiter = broker.stats_waiters.get(msg.rid)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg.stats)

    def _beat(self, broker: BrokerConnection) -> None:
        """A heartbeat, and the counters' report if this client makes one."""
        if broker.refused is not None:
            return  # nothing would carry it: it would wait in the channel for ever
        broker.send(p.encode_heartbeat())
        broker.beat_sent_at = time.monotonic()
        if self.report is None:
            return
        frames = p.encode_report(p.Report(self.name, self.report()))
        if len(frames[-1]) > p.MAX_REPORT_BYTES:
            self._report_too_large.warn("report too large", f"not reporting counters of {len(frames[-1])} bytes "
                                        f"(the broker takes at most {p.MAX_REPORT_BYTES})")
            return
        broker.send(frames)

    def _on_disconnected(self, broker: BrokerConnection) -> None:
        broker.last_heard = float("-inf")  # not alive until the broker speaks again
        broker.heard = False
        self._lost(broker, closed_connection_error(broker.address))

    def _on_connected(self, broker: BrokerConnection) -> None:
        self._beat(broker)  # its answer says it is alive

    def _on_refused(self, broker: BrokerConnection, message: str) -> None:
        """The broker refused this client's keys; libzmq does not try again, so it takes
        no request from now on."""
        log.error("%s", message)
        broker.refused = BrokerError(p.E_AUTH_FAILED, message)
        if all(other.refused for other in self.brokers):
            self._refused_by_all = self.brokers[0].refused
        self._lost(broker, broker.refused)

    def _on_heartbeat(self, broker: BrokerConnection, msg: p.Heartbeat) -> None:
        boot_id = msg.boot_id
        if broker.boot_id is not None and boot_id != broker.boot_id:
            self._lost(broker, BrokerError(p.E_BROKER_UNREACHABLE,
                                           "the broker restarted during the request"))
        broker.boot_id = boot_id

    async def _watch(self) -> None:
        """Heartbeat the brokers; end requests past their deadline, or move those of a
        silent broker."""
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            for broker in self.brokers:
                self._beat(broker)
                if not broker.alive(self.heartbeat_interval, self.heartbeat_misses):
                    broker.heard = False
                    self._lost(broker, broker.refused or silent_broker_error(broker.address))
            now = time.monotonic()
            for reply in [r for r in self.replies.values() if now > r.deadline]:
                reply.cancel(reply.timed_out())


class Unread:
    """What arrived for one request of a BlockingClient that its stream has not read."""

    __slots__ = ("messages", "buffered", "error")

    def __init__(self) -> None:
        self.messages: deque[p.Message] = deque()
        self.buffered = 0  # bytes of the chunks in messages
        self.error: BrokerError | None = None  # the client ended the stream (and cancelled it)

    def add(self, msg: p.Message) -> None:
        self.messages.append(msg)
        self.buffered += chunk_bytes(msg)

    def take(self) -> p.Message:
        msg = self.messages.popleft()
        self.buffered -= chunk_bytes(msg)
        return msg


def chunk_bytes(msg: p.Message) -> int:
    return sum(map(len, msg.chunks)) if isinstance(msg, (p.Chunk, p.End)) else 0


class BlockingStream:
    """The reply to one request of a BlockingClient: an iterator of chunks (bytes), as
    Stream is an async one. `worker_id` names the worker once its first reply has
    arrived. Leaving it early (cancel(), the end of a `with` block, or dropping it)
    cancels the request on the worker. A request whose broker is lost before its first
    reply is sent again through another broker, once per broker at most."""

    def __init__(self, owner: BlockingClient, message: p.Request, timeout: float,
                 timeout_setting: str) -> None:
        self._owner = owner
        self._message = message
        self.worker_id: str | None = None
        self._timeout = timeout
        self._timeout_setting = timeout_setting
        self._deadline = time.monotonic() + timeout + DEADLINE_GRACE
        self._tried: list[BlockingBroker] = []
        self._chunks: deque[bytes] = deque()
        self._error: BrokerError | None = None
        self.done = False
        self.complete = False  # True once the reply has ended with its END
        self._send_through(owner._next_broker(self._tried))

    @property
    def rid(self) -> bytes:
        return self._message.rid

    def _send_through(self, broker: BlockingBroker) -> None:
        self._client = broker
        self._tried.append(broker)
        broker._start_waiting(self.rid)
        self._connection = broker._lost_connections  # the connection it is sent on
        broker._send(p.encode_request_to_broker(self._message))

    def __iter__(self) -> BlockingStream:
        return self

    def __next__(self) -> bytes:
        while not self._chunks:
            if self.done:
                if self._error is not None:
                    raise self._error
                raise StopIteration
            self._receive()
        return self._chunks.popleft()

    def read(self) -> bytes:
        """The whole reply, joined."""
        return b"".join(self)

    def cancel(self) -> None:
        """Stop the request: the broker and the worker are told, the stream ends."""
        self._end(None, cancel=True)

    close = cancel  # as a generator's close()

    def __enter__(self) -> BlockingStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        try:
            self.cancel()
        except Exception:
            pass  # its socket went with the interpreter's end: nothing left to tell

    def _receive(self) -> None:
        """Wait for the next reply of the request, and take it in."""
        try:
            msg = self._client._receive(self.rid, self._deadline, self._timed_out,
                                        self._connection)
        except BrokerError as e:
            if e.code != p.E_BROKER_UNREACHABLE:
                self._end(e, cancel=True)
                raise
            self._move_or_end(e, cancel=True)
            return
        if isinstance(msg, p.Error) and msg.code == p.E_BROKER_UNREACHABLE:  # the broker stops
            self._move_or_end(BrokerError(msg.code, msg.message), cancel=False)
        elif isinstance(msg, p.Error):
            self._end(reply_error(msg, self._timeout_setting, self._timeout), cancel=False)
        else:
            self._take(msg)

    def _take(self, msg: p.Chunk | p.End) -> None:
        self.worker_id = msg.worker_id
        self._chunks.extend(msg.chunks)
        if isinstance(msg, p.End):
            self.complete = True
            self._end(None, cancel=False)

    def _move_or_end(self, error: BrokerError, *, cancel: bool) -> None:
        """The broker lost the request: if it has had no chunk, it goes through another
        broker whose connection is up and that it has not tried; else it ends with
        `error` (raised from the read that ends it), and with a CANCEL if `cancel` (the
        broker may still hold it)."""
        other = self._owner._next_broker(self._tried, live_only=True)
        if self.worker_id is None and other is not None and time.monotonic() < self._deadline:
            self._client._forget(self.rid)
            self._send_through(other)
        else:
            self._end(error, cancel=cancel)

    def _timed_out(self) -> BrokerError:
        return timeout_error(self._timeout_setting, self._timeout)

    def _end(self, error: BrokerError | None, *, cancel: bool) -> None:
        if self.done:
            return
        self.done = True
        self._error = error
        if cancel:
            self._client._cancel(self.rid)
        else:
            self._client._forget(self.rid)


class BlockingClient(PolicyShortcuts[BlockingStream]):
    """A synchronous client for scripts and the REPL: the same calls as Client, and
    streams that are iterators rather than async ones. A stream's replies arrive as it
    is read; several may be open at once. `address` is one broker's endpoint, or a list
    of them: requests go through each in turn (those whose connection is up first), and
    stats() combines every broker's.

    While it waits it heartbeats the broker, and gives up on it as the asyncio Client
    does: after `heartbeat_misses` heartbeats of silence, or when the connection closes.
    A stream left unread while others are read falls behind as in the asyncio Client:
    past `max_buffered_bytes` it is cancelled, and ends with slow_reader. With `curve`
    keys it connects as the asyncio Client does; a broker that refuses them fails its
    requests with auth_failed.
    """

    def __init__(self, address: str | Sequence[str] = DEFAULT_ADDRESS, *,
                 timeout: float = DEFAULT_TIMEOUT,
                 timeout_setting: str = DEFAULT_TIMEOUT_SETTING,
                 heartbeat_interval: float = HEARTBEAT_INTERVAL,
                 heartbeat_misses: int = HEARTBEAT_MISSES,
                 context: zmq.Context | None = None,
                 max_buffered_bytes: int = MAX_BUFFERED_BYTES,
                 curve: PeerKeys | None = None,
                 max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        addresses = [address] if isinstance(address, str) else list(address)
        if not addresses:
            raise ValueError("a client needs at least one broker endpoint")
        self.max_message_size = max_message_size
        self.timeout = timeout
        self.timeout_setting = timeout_setting
        self.brokers = [BlockingBroker(a, heartbeat_interval, heartbeat_misses,
                                       context or zmq.Context.instance(), max_buffered_bytes,
                                       curve) for a in addresses]
        self.address = ", ".join(addresses)  # as messages name the brokers
        self._ids = itertools.count(1)
        self._turn = itertools.count()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self.brokers[0].closed

    def close(self) -> None:
        """Cancel the requests still open (their streams end with `client_closed`), and
        close the sockets."""
        for broker in self.brokers:
            broker.close()

    def request(self, service: str, body: Body, *, policy: str = "", worker: WorkerId = "",
                timeout: float | None = None) -> BlockingStream:
        """Send a request; its reply's chunks are read from the returned stream."""
        self._check_open()
        message, timeout, setting = self._new_request(service, body, policy, worker, timeout)
        return BlockingStream(self, message, timeout, setting)

    def stats(self, timeout: float = 5.0) -> dict:
        """Every broker's stats, combined as the asyncio Client's are; BrokerError if no
        broker answers."""
        self._check_open()
        deadline = time.monotonic() + timeout
        asked = [(broker, broker.ask_stats()) for broker in self.brokers]
        answers: list[tuple[str, dict | str]] = []
        errors = []
        for broker, (rid, connection) in asked:
            try:
                answers.append((broker.address, broker.stats_answer(rid, connection, deadline,
                                                                    timeout)))
            except BrokerError as e:
                errors.append(e)
                answers.append((broker.address, e.message))
        if len(errors) == len(self.brokers):
            raise errors[0]
        return combine(answers)

    def _check_open(self) -> None:
        if self.closed:
            raise client_closed_error()

    def _next_broker(self, tried: list[BlockingBroker],
                     live_only: bool = False) -> BlockingBroker | None:
        """The broker for a request, in turn: among those not tried whose connection is
        up, else (unless `live_only`) any not tried, else any."""
        untried = [broker for broker in self.brokers if broker not in tried]
        live = [broker for broker in untried if broker.connected()]
        choices = live if live_only else (live or untried or self.brokers)
        return choices[next(self._turn) % len(choices)] if choices else None


class BlockingBroker:
    """A BlockingClient's connection to one broker: its socket, the replies that wait to
    be read, and what the client knows of the broker's liveness."""

    def __init__(self, address: str, heartbeat_interval: float, heartbeat_misses: int,
                 context: zmq.Context, max_buffered_bytes: int,
                 curve: PeerKeys | None) -> None:
        self.address = check_endpoint(address)
        self.max_buffered_bytes = max_buffered_bytes
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_misses = heartbeat_misses
        self.curve = curve
        self.sock = dealer(context, address, connect=False, curve=curve)
        self._monitor = self.sock.get_monitor_socket(
            CONNECTION_EVENTS | HANDSHAKE_FAILURES | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sock.sndtimeo = SEND_WAIT_MS
        self._up = False  # its connection is open
        self._handshake_failed: str | None = None  # why the last handshake failed
        self._gave_up = False  # libzmq will not connect again: the broker refused us
        self.sock.connect(address)  # after the monitor, which would miss an earlier connection
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._ids = itertools.count(1)  # of its STATS
        self._replies: dict[bytes, Unread] = {}  # rid -> its replies not yet read
        self._lost_connections = 0  # connections to the broker that closed
        self._last_heard = 0.0
        self._next_beat = 0.0
        self._sending = False
        self._abandoned: list[bytes] = []  # requests to cancel once the socket is free
        self.closed = False

    def close(self) -> None:
        """Cancel the requests still open (their streams end with `client_closed`), and
        close the socket."""
        if self.closed:
            return
        # Those it ended itself (slow_reader) were cancelled then.
        self._abandoned.extend(rid for rid, unread in self._replies.items() if unread.error is None)
        self._replies.clear()
        self._send()
        self.closed = True
        self.sock.disable_monitor()
        self._monitor.close(0)
        self.sock.close()  # with its linger, so that the last CANCELs still leave

    def connected(self) -> bool:
        """Whether its connection is up, as far as the client has looked."""
        self._take_connection_events()
        return self._up and not self._gave_up

    def ask_stats(self) -> tuple[bytes, int]:
        """Send STATS; its rid, and the connection it went on."""
        rid = b"s%x" % next(self._ids)
        self._start_waiting(rid)
        self._send(p.encode_stats_request(p.StatsRequest(rid)))
        return rid, self._lost_connections

    def stats_answer(self, rid: bytes, connection: int, deadline: float, timeout: float) -> dict:
        """The answer to ask_stats(), by `deadline`; BrokerError if none comes."""
        try:
            reply = self._receive(rid, deadline, lambda: no_stats_error(self.address, timeout),
                                  connection)
        finally:
            self._forget(rid)
        if isinstance(reply, p.Error):  # e.g. wrong_endpoint
            raise BrokerError(reply.code, reply.message)
        return reply.stats

    # --- plumbing ---------------------------------------------------------------

    def _send(self, *messages: list[bytes]) -> None:
        """Send `messages`, then the CANCELs of streams dropped meanwhile."""
        self._sending = True
        try:
            for frames in messages:
                self._send_frames(frames)
            while self._abandoned:
                self._send_frames(p.encode_cancel(p.Cancel(self._abandoned.pop())))
        finally:
            self._sending = False

    def _send_frames(self, frames: list[bytes]) -> None:
        """Send one message, waiting while the socket's queue is full; drop it once libzmq
        has given up on the connection (a refused handshake), which leaves the socket
        nothing to send to and a plain send waiting for ever."""
        while True:
            self._take_connection_events()
            if self._gave_up:
                return
            try:
                self.sock.send_multipart(frames)  # waits SEND_WAIT_MS at most
                return
            except zmq.Again:
                continue

    def _cancel(self, rid: bytes) -> None:
        """Tell the broker to stop a request; silent once the client is closed.

        A stream dropped by the garbage collector may be finalized in the middle of a
        send on the socket: its CANCEL then waits for that send to end."""
        unread = self._replies.pop(rid, None)
        if unread is None or unread.error is not None or self.closed:
            return  # nothing to stop, or its CANCEL has gone already
        self._send_cancel(rid)

    def _send_cancel(self, rid: bytes) -> None:
        self._abandoned.append(rid)
        if not self._sending:
            self._send()

    def _forget(self, rid: bytes) -> None:
        self._replies.pop(rid, None)

    def _start_waiting(self, rid: bytes) -> None:
        """Expect replies for `rid`: on the connection there is now, if it closes later."""
        if self.closed:
            raise client_closed_error()
        self._take_connection_events()
        self._replies[rid] = Unread()

    def _receive(self, rid: bytes, deadline: float, expired: Callable[[], BrokerError],
                 connection: int) -> p.Message:
        """The next message for `rid`, sent on the connection numbered `connection`.
        Heartbeats the broker meanwhile; raises expired() at the deadline."""
        if self.closed:
            raise client_closed_error()
        unread = self._replies[rid]
        # Silence counts only while someone waits: nobody heartbeats the broker otherwise.
        self._last_heard = time.monotonic()
        while True:
            if unread.messages:
                return unread.take()
            if unread.error is not None:
                raise unread.error
            if self._handshake_failed:  # before the closing that follows it
                raise BrokerError(p.E_AUTH_FAILED, self._handshake_failed)
            if self._lost_connections != connection:
                raise closed_connection_error(self.address)
            now = time.monotonic()
            if now >= deadline:
                raise expired()
            given_up_at = broker_given_up_at(self._last_heard, self.heartbeat_interval,
                                             self.heartbeat_misses)
            if now >= given_up_at:
                raise silent_broker_error(self.address)
            if now >= self._next_beat:
                self._send(p.encode_heartbeat())
                self._next_beat = now + self.heartbeat_interval
            wake_at = min(deadline, self._next_beat, given_up_at)
            ready = dict(self._poller.poll(math.ceil((wake_at - now) * 1000)))
            if self._monitor in ready:
                self._take_connection_events()
            if self.sock in ready:
                self._take_messages()

    def _take_messages(self) -> None:
        """Hand what arrived to the requests it answers; the rest (late replies,
        heartbeats) only says that the broker is alive."""
        self._last_heard = time.monotonic()
        while readable(self.sock):
            try:
                messages = p.unbatch(self.sock.recv_multipart())
            except p.ProtocolError:
                continue
            for frames in messages:
                try:
                    msg = p.decode_to_client(frames)
                except p.ProtocolError:
                    continue
                unread = self._replies.get(getattr(msg, "rid", None))
                if unread is not None and unread.error is None:
                    self._hand_over(msg, unread)

    def _hand_over(self, msg: p.Message, unread: Unread) -> None:
        """Keep a message for its stream, unless its reader has fallen too far behind."""
        if not isinstance(msg, p.End) and fell_behind(unread.buffered, self.max_buffered_bytes):
            unread.error = slow_reader_error()  # after what it holds already
            self._send_cancel(msg.rid)
        else:
            unread.add(msg)

    def _take_connection_events(self) -> None:
        while self._monitor.poll(0):
            message = parse_monitor_message(self._monitor.recv_multipart())
            event = message["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._lost_connections += 1  # what waited on the closed connection is lost
                self._up = False
            elif event == zmq.EVENT_CONNECTED:
                self._next_beat = 0.0  # at once: its answer says it is alive
                self._up = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake_failed = None
            else:
                self._handshake_failed = handshake_failure(event, message["value"],
                                                           self.address, self.curve is not None)
                self._gave_up |= self._handshake_failed is not None and not retried(event)
