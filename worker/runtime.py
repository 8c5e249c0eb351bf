"""The worker runtime: serve async-generator handlers for the broker.

Each request runs in its own task, so one worker serves many at once. Chunks
that are ready in the same turn of the event loop travel in one message, and
a request's last chunks travel with its END.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from functools import partial
from types import FrameType
from typing import Any, AsyncIterator, Callable, Protocol

import orjson
import zmq

from zroute import protocol as p
from zroute.channel import Channel
from zroute.connection import watched_dealer
from zroute.curve import PeerKeys
from zroute.endpoints import check_endpoint
from zroute.errors import BadRequest  # handlers may import it from here too
from zroute.ratelimit import LogLimiter
from zroute.settings import WorkerSettings, BrokerLink
from worker.watchdog import LoopWatchdog, frame_location
from zroute.logs import fields

log = logging.getLogger("zroute.worker")

Handler = Callable[[Any], AsyncIterator["bytes | str"]]

RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 3.0
# A request's chunks leave as one message once they reach either budget, well within
# the protocol's MAX_FRAMES, so that no message costs the broker long to relay.
REPLY_FRAMES = 256
REPLY_BYTES = p.MAX_BATCH_BYTES
YIELD_EVERY = 256  # chunks a request yields before letting the loop run others
BLOCKED_LOG_INTERVAL = 30.0  # at most one "event loop blocked" warning in this many seconds
LISTED_REQUESTS = 5  # requests a warning names, at most
# Replies not yet taken by the broker, in bytes, past which handlers wait for it to read.
MAX_UNSENT_BYTES = 16 << 20
UNSENT_RETRY_S = 0.005


class Transport(Protocol):
    """What a worker speaks to its broker over. Messages sent in one turn of the event
    loop may wait for flush() (or the end of the turn) to leave."""

    def send(self, frames: list[bytes]) -> None: ...

    def flush(self) -> None: ...

    def unsent_bytes(self) -> int:
        """Bytes sent that have not left the process yet: past MAX_UNSENT_BYTES, handlers
        wait for the broker to read."""

    def close(self, linger_ms: int) -> None: ...


class TransportFactory(Protocol):
    """Opens a worker's transport; called again for each new connection. The transport
    hands every message it receives to `on_message`, and calls `on_connected` and
    `on_disconnected` as its connection to the broker opens and closes."""

    def __call__(self, on_message: Callable[[list[bytes]], None],
                 on_connected: Callable[[], None],
                 on_disconnected: Callable[[], None]) -> Transport: ...


class BrokerChannel(Channel):
    """The transport a worker opens by default: a DEALER to the broker's worker endpoint,
    watched, so that a broker that goes is noticed as its connection closes; with `curve`
    keys, authenticated and encrypted."""

    def __init__(self, context: zmq.Context, address: str,
                 on_message: Callable[[list[bytes]], None], on_connected: Callable[[], None],
                 on_disconnected: Callable[[], None], *, curve: PeerKeys | None = None,
                 on_refused: Callable[[str], None]) -> None:
        sock, self.connection = watched_dealer(context, address, on_connected, on_disconnected,
                                               on_refused, curve=curve)
        super().__init__(sock, on_message)

    def close(self, linger_ms: int = 200) -> None:
        self.connection.close()
        super().close(linger_ms)


def decode_body(body: bytes) -> Any:
    """The request a handler receives: the body decoded as JSON if it parses, else its
    text, so that `client.round_robin("generate", "a,b")` reaches a handler as "a,b"."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return body.decode()
    except UnicodeDecodeError:
        raise BadRequest("body is neither JSON nor UTF-8 text") from None


def request_fields(token: bytes) -> dict[str, str]:
    """A request as the worker's log names it: by the request id its client (a gateway,
    say) chose and logs, and that client's routing id, since ids repeat across clients."""
    client, rid = p.split_request_token(token)
    text = rid.decode(errors="replace")
    readable = text.isprintable() and " " not in text
    return {"request": text if readable else rid.hex(), "client": client.hex()}


def request_label(token: bytes) -> str:
    """request_fields as the text of a log line: `request=2 client=006b8b4567`."""
    return " ".join(f"{key}={value}" for key, value in request_fields(token).items())


class Outbox:
    """Replies waiting for the end of the current event-loop turn.

    `send` queues a message on the channel; `push` sends the channel's queue. Pushing
    at once, rather than at the channel's own turn, saves replies a turn of the loop."""

    def __init__(self, send: Callable[[list[bytes]], None], push: Callable[[], None]) -> None:
        self.send = send
        self.push = push
        self.chunks: dict[bytes, list[bytes]] = {}
        self.sizes: dict[bytes, int] = {}  # rid -> bytes in its pending chunks
        self.endings: dict[bytes, p.Error | None] = {}  # rid -> None for END, or the ERROR
        self._scheduled = False

    def chunk(self, rid: bytes, data: bytes) -> None:
        pending = self.chunks.get(rid)
        if pending is None:
            self.chunks[rid] = pending = []
            self.sizes[rid] = 0
            self._schedule()
        pending.append(data)
        size = self.sizes[rid] + len(data)
        if len(pending) >= REPLY_FRAMES or size >= REPLY_BYTES:
            self.forget(rid)
            self.send(p.encode_reply_from_worker(p.Chunk(rid, pending)))
        else:
            self.sizes[rid] = size

    def forget(self, rid: bytes) -> None:
        """Drop a request's pending chunks."""
        del self.chunks[rid]
        del self.sizes[rid]

    def end(self, rid: bytes, error: p.Error | None = None) -> None:
        self.endings[rid] = error
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        chunks, endings = self.chunks, self.endings
        self.chunks, self.sizes, self.endings = {}, {}, {}
        for rid, data in chunks.items():
            if rid in endings and endings[rid] is None:
                del endings[rid]
                self.send(p.encode_reply_from_worker(p.End(rid, data)))
            else:
                self.send(p.encode_reply_from_worker(p.Chunk(rid, data)))
        for rid, error in endings.items():
            self.send(p.encode_error(error) if error else p.encode_reply_from_worker(p.End(rid)))
        self.push()


class Worker:
    """Registers with the broker, serves requests, heartbeats, reconnects, drains.

    It runs with the `Backend` section's settings, and speaks to the broker at `broker`
    over a BrokerChannel, or over what `transport` opens: a broker stand-in in the same
    process, say (`broker` then only names it in the worker's log)."""

    def __init__(self, settings: WorkerSettings, broker: BrokerLink, worker_id: str | int,
                 handlers: dict[str, Handler], *, context: zmq.Context | None = None,
                 transport: TransportFactory | None = None) -> None:
        if not handlers:
            raise ValueError("a worker needs at least one service")
        self.broker = check_endpoint(broker.endpoint)
        self.worker_id = str(worker_id)  # any id, as the clients take it
        self.handlers = handlers
        self.capacity = settings.service_args.capacity
        self.heartbeat_interval = broker.heartbeat_interval
        self.heartbeat_misses = broker.heartbeat_misses
        self.drain_timeout = settings.drain_timeout
        self.expose_errors = settings.expose_errors
        self.token = secrets.token_hex(16)  # proves to the broker that a new connection is ours
        self.context = context or zmq.Context.instance()
        self._open_transport = transport or partial(
            BrokerChannel, self.context, self.broker, curve=broker.curve,
            on_refused=self._keys_refused)
        self.tasks: dict[bytes, asyncio.Task] = {}
        # Each message type the broker may send, and what handles it: a missing one is a
        # KeyError, never a message mistaken for another.
        self.message_handlers: dict[type, Callable[[Any], None]] = {
            p.Request: self._start,
            p.Cancel: self._cancel,
            p.Heartbeat: self._on_heartbeat,
            p.Disconnect: self._on_disconnect,
            p.Error: self._on_error,
        }
        self.served = 0
        self._channel: Transport | None = None
        self._connected = False  # the socket's connection is open (it may not be a broker)
        self._said_waiting = False  # "waiting for a broker" is said once per wait
        # A broker has sent something on the current connection (or, before the first one,
        # nothing has failed yet). A peer that is not a broker accepts and closes
        # connection after connection: those are logged through _drops, not each.
        self._answered = True
        self._outbox = Outbox(self._send, self._push)
        self._last_heard = 0.0
        self._backoff = RECONNECT_MIN_S
        self._stopping: asyncio.Event | None = None
        self.refused: p.Error | None = None  # why the broker refused this worker, if it did
        self._drops = LogLimiter(log)
        # A handler that blocks the loop is reported once heartbeats are due, before the
        # broker evicts the worker for missing them.
        self._watchdog = LoopWatchdog(broker.heartbeat_interval, self._report_blocked_loop)
        self._blocked = LogLimiter(log, interval=BLOCKED_LOG_INTERVAL, per_kind=1)

    # --- life cycle -----------------------------------------------------------

    async def run(self) -> None:
        """Serve until stop(); then drain and disconnect."""
        self._stopping = asyncio.Event()
        self._watchdog.start()
        self._connect()
        try:
            while not self._stopping.is_set():
                try:
                    await asyncio.wait_for(self._stopping.wait(), self.heartbeat_interval)
                except asyncio.TimeoutError:
                    self._heartbeat()
            await self._drain()
        finally:
            self._watchdog.stop()

    def stop(self) -> None:
        """Begin a graceful drain; run() returns when it is done."""
        if self._stopping is not None:
            self._stopping.set()

    def _connect(self) -> None:
        """Open a transport to the broker; READY goes once its connection is up."""
        self._channel = self._open_transport(self._on_message, self._on_connected,
                                             self._on_disconnected)
        self._connected = False
        self._last_heard = time.monotonic()

    def _on_connected(self) -> None:
        self._connected = True
        self._said_waiting = False
        self._last_heard = time.monotonic()  # the broker is judged from now on
        if not self._stopping.is_set():
            self._register()
        self._answered = False

    def _keys_refused(self, message: str) -> None:
        """The broker refused this worker's keys; libzmq does not try again, and the
        worker stops, as for any refusal."""
        log.error("worker %s: %s", self.worker_id, message)
        self.refused = p.Error(b"", p.E_AUTH_FAILED, message)
        self.stop()

    def _on_disconnected(self) -> None:
        """The broker died or stopped: what it sent is lost, so stop working on it now.
        ZeroMQ connects again by itself, and READY goes when it does."""
        self._connected = False
        if self.refused is not None:
            return  # said already
        self._said_waiting = True
        if self._answered:
            cancelled = f"; cancelled {len(self.tasks)} request(s) in hand" if self.tasks else ""
            log.warning("worker %s: the connection to the broker at %s closed%s; waiting for it",
                        self.worker_id, self.broker, cancelled)
        else:
            self._drops.warn("closed unanswered", f"worker {self.worker_id}: the connection to "
                             f"{self.broker} closed before a broker answered: is it the "
                             "broker's worker endpoint, Broker.backend?")
        self._abandon_requests()

    def _register(self) -> None:
        services = sorted(self.handlers)
        self._send(p.encode_ready(p.Ready(self.worker_id, services, self.capacity, self.token)))
        message = (f"worker {self.worker_id} registering with {self.broker} for "
                   f"{', '.join(services)}")
        if self._answered:
            log.info(message)
        else:  # the last connection closed unanswered: this one may too, in a moment
            self._drops.info("registering", message)

    def _heartbeat(self) -> None:
        if not self._connected:
            # Nothing to hear from; ZeroMQ keeps trying to connect. Say so once.
            if not self._said_waiting:
                self._said_waiting = True
                log.info("worker %s: waiting for a broker at %s", self.worker_id, self.broker)
            return
        silence = time.monotonic() - self._last_heard
        if silence <= self.heartbeat_interval * self.heartbeat_misses:
            self._send(p.encode_heartbeat())
            return
        # Connected, but silent: a hung broker, or a peer that is not one. A new socket.
        log.warning("worker %s: broker silent for %.1f s; reconnecting", self.worker_id, silence)
        self._abandon_requests()
        self._channel.close(0)
        self._connect()
        # Wait a jittered, growing while before judging the new connection.
        self._last_heard += self._backoff * random.uniform(0.5, 1.5)
        self._backoff = min(RECONNECT_MAX_S, self._backoff * 2)

    async def _drain(self) -> None:
        """Finish the requests in hand (and any the broker sent before it saw DRAIN),
        heartbeating meanwhile, for at most drain_timeout seconds."""
        log.info("worker %s draining %d request(s)", self.worker_id, len(self.tasks))
        self._send(p.encode_drain())
        deadline = time.monotonic() + self.drain_timeout
        while self.tasks and time.monotonic() < deadline:
            wait = min(self.heartbeat_interval, deadline - time.monotonic())
            await asyncio.wait(list(self.tasks.values()), timeout=wait)
            self._send(p.encode_heartbeat())
        for rid, task in list(self.tasks.items()):
            task.cancel()
            self._outbox.end(rid, p.Error(rid, p.E_WORKER_LOST, "worker stopped before finishing"))
        self._outbox.flush()
        self._send(p.encode_disconnect())
        self._channel.close(linger_ms=200)
        log.info("worker %s stopped after %d request(s)", self.worker_id, self.served)

    def _report_blocked_loop(self, blocked_for: float, task: asyncio.Task | None,
                             frame: FrameType | None) -> None:
        """Say what blocks the event loop, and what to do about it. Runs in the
        watchdog's thread, while the loop is blocked: it reads, and changes nothing."""
        in_flight = list(self.tasks.items())
        culprit = next((rid for rid, running in in_flight if running is task), None)
        what = f"the handler of {request_label(culprit)}" if culprit else "code outside a handler"
        others = [request_label(rid) for rid, _ in in_flight if rid != culprit]
        if len(others) > LISTED_REQUESTS:
            others[LISTED_REQUESTS:] = [f"and {len(others) - LISTED_REQUESTS} more"]
        also = f"; also in flight: {', '.join(others)}" if others else ""
        self._blocked.warn("blocked", (
            f"worker {self.worker_id}: its event loop has been blocked for {blocked_for:.1f} s "
            f"by {what}, at {frame_location(frame)}{also}. While it is blocked the worker "
            "serves nothing and sends no heartbeat, and the broker evicts it after "
            f"{self.heartbeat_interval * self.heartbeat_misses:g} s and retries its requests "
            "elsewhere. A handler must not block: use await asyncio.sleep(), not time.sleep(), "
            "and run blocking code with await asyncio.to_thread(...)"))

    def _abandon_requests(self) -> None:
        """Cancel work the broker has forgotten (it restarted or is gone)."""
        for task in self.tasks.values():
            task.cancel()

    # --- messages ------------------------------------------------------------

    def _send(self, frames: list[bytes]) -> None:
        self._channel.send(frames)

    def _push(self) -> None:
        self._channel.flush()

    def _on_message(self, frames: list[bytes]) -> None:
        self._last_heard = time.monotonic()
        try:
            msg = p.decode_to_worker(frames)
        except p.ProtocolError as e:
            # A peer that is not a broker (say, the gateway's HTTP port) sends a stream of
            # these: say once in a while what it may be, not once per message.
            self._drops.warn("not zroute", f"worker {self.worker_id} dropped a message that is "
                             f"not zroute's protocol ({e}): is {self.broker} the broker's worker "
                             "endpoint, Broker.backend?")
            return
        self._answered = True
        self.message_handlers[type(msg)](msg)

    def _cancel(self, msg: p.Cancel) -> None:
        task = self.tasks.get(msg.rid)
        if task is not None:
            task.cancel()

    def _on_heartbeat(self, _: p.Heartbeat) -> None:
        self._backoff = RECONNECT_MIN_S

    def _on_disconnect(self, _: p.Disconnect) -> None:
        # The broker does not know us (it restarted): register again, unless leaving.
        self._abandon_requests()
        if not self._stopping.is_set():
            self._register()

    def _on_error(self, msg: p.Error) -> None:
        log.error("worker %s: the broker refused it: %s", self.worker_id, msg.message)
        if not msg.rid:  # about the worker itself: its id is taken, it is over a limit...
            self.refused = msg
            self.stop()

    async def _until_broker_reads(self) -> None:
        """Backpressure: a handler that yields faster than the broker takes its replies
        waits here, rather than the replies piling up in the worker's memory."""
        while self._channel.unsent_bytes() > MAX_UNSENT_BYTES:
            await asyncio.sleep(UNSENT_RETRY_S)

    def _handler_error(self, rid: bytes, error: Exception) -> str:
        """What a client is told of a handler's exception. Its text may hold paths, host
        names or secrets: unless expose_errors, only the request id, which the worker's
        log line (with the traceback) names too."""
        if self.expose_errors:
            return f"{type(error).__name__}: {error}"
        return (f"the handler failed on {request_label(rid)}; "
                f"worker {self.worker_id}'s log has the details")

    def _start(self, msg: p.Request) -> None:
        if msg.rid in self.tasks:
            return
        handler = self.handlers.get(msg.service)
        if handler is None:
            self._outbox.end(msg.rid, p.Error(msg.rid, p.E_BAD_REQUEST,
                                              f"worker serves no {msg.service!r}"))
            return
        self.tasks[msg.rid] = asyncio.get_running_loop().create_task(
            self._serve(msg.rid, handler, msg.body))

    async def _serve(self, rid: bytes, handler: Handler, body: bytes) -> None:
        started = time.monotonic()
        chunks = 0
        outcome = "ok"
        try:
            async for item in handler(decode_body(body)):
                if isinstance(item, str):
                    item = item.encode()
                elif not isinstance(item, bytes):
                    raise TypeError(f"the handler yielded {type(item).__name__}, "
                                    "not str or bytes")
                self._outbox.chunk(rid, item)
                chunks += 1
                if self._channel.unsent_bytes() > MAX_UNSENT_BYTES:
                    await self._until_broker_reads()
                elif chunks % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # a handler that never awaits must not starve others
            self._outbox.end(rid)
        except asyncio.CancelledError:
            outcome = "cancelled"
            if rid in self._outbox.chunks:
                self._outbox.forget(rid)  # the broker has forgotten the request
        except BadRequest as e:
            outcome = "bad request"
            self._outbox.end(rid, p.Error(rid, p.E_BAD_REQUEST, str(e)))
        except Exception as e:
            outcome = "error"
            log.exception("worker %s: handler failed on %s", self.worker_id, request_label(rid))
            self._outbox.end(rid, p.Error(rid, p.E_HANDLER, self._handler_error(rid, e)))
        finally:
            del self.tasks[rid]
            self.served += 1
            if log.isEnabledFor(logging.INFO):  # the fields cost more than a skipped call
                log.info(outcome, extra=fields(worker=self.worker_id, **request_fields(rid),
                                               chunks=chunks, duration=time.monotonic() - started))
