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
from zroute.chunks import as_chunk
from zroute.client import BrokerError
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
    """Opens a worker's transport; called again for each new connection, and once per
    broker. The transport
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


def handler_name(handler: Handler) -> str:
    """A handler as an error names it: `the handler 'Backend.lookup'`."""
    return f"the handler {getattr(handler, '__qualname__', handler)!r}"


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


class ChunkTooLarge(Exception):
    """A handler yielded a chunk larger than a broker takes: its request fails alone."""


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


class BrokerSession:
    """The worker's connection to one broker: its transport, what the worker knows of
    that broker's liveness, and the requests that broker sent (their ids are that
    broker's: two brokers may use the same one)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.channel: Transport | None = None
        self.outbox: Outbox | None = None
        self.tasks: dict[bytes, asyncio.Task] = {}
        self.connected = False  # the socket's connection is open (it may not be a broker)
        self.said_waiting = False  # "waiting for a broker" is said once per wait
        # A broker has sent something on the current connection (or, before the first one,
        # nothing has failed yet). A peer that is not a broker accepts and closes
        # connection after connection: those are logged through the worker's drops, not each.
        self.answered = True
        self.last_heard = 0.0
        self.backoff = RECONNECT_MIN_S
        # Why this broker refused the worker (its READY, or its keys), until it takes it;
        # the worker asks again on a new connection from `retry_at`.
        self.refused: p.Error | None = None
        self.retry_at = 0.0
        # The broker heartbeats registered workers only: its first heartbeat after READY
        # says that it has this worker registered, until the connection or registration
        # ends.
        self.registered = False
        # The broker takes the worker for full (it refused one of its requests, or its
        # last HEARTBEAT counted its capacity) until told otherwise: a free slot may be
        # announced to it at once.
        self.owes_room = False

    def send(self, frames: list[bytes]) -> None:
        self.channel.send(frames)

    def push(self) -> None:
        self.channel.flush()

    def abandon_requests(self) -> None:
        """Cancel work the broker has forgotten (it restarted or is gone)."""
        for task in self.tasks.values():
            task.cancel()


class Worker:
    """Registers with every broker, serves requests, heartbeats, reconnects, drains.

    It runs with the `Backend` section's settings, and speaks to each broker of `broker`
    over a BrokerChannel, or over what `transport` opens: a broker stand-in in the same
    process, say (the endpoint then only names it in the worker's log).

    Its capacity holds for the requests of all brokers together: one over it is refused
    with worker_full, which the broker takes as "route it elsewhere", and each HEARTBEAT
    says how many requests it runs, so that each broker sees the others' load."""

    def __init__(self, settings: WorkerSettings, broker: BrokerLink, worker_id: str | int,
                 handlers: dict[str, Handler], *, context: zmq.Context | None = None,
                 transport: TransportFactory | None = None) -> None:
        if not handlers:
            raise ValueError("a worker needs at least one service")
        self.sessions = [BrokerSession(check_endpoint(endpoint)) for endpoint in broker.endpoints]
        self.worker_id = str(worker_id)  # any id, as the clients take it
        self.handlers = handlers
        self.capacity = settings.service_args.capacity
        self.heartbeat_interval = broker.heartbeat_interval
        self.heartbeat_misses = broker.heartbeat_misses
        # The largest chunk a broker takes. Each chunk travels in a frame of its own
        # (encode_reply_from_worker), and the broker's limit (ZeroMQ's MAXMSGSIZE) bounds
        # each frame, so a CHUNK's other frames take none of it; a BATCH packs only
        # messages within MAX_BATCH_BYTES, which the limit is no less than.
        self.max_chunk = broker.max_message_size
        self.drain_timeout = settings.drain_timeout
        self.expose_errors = settings.expose_errors
        self.token = secrets.token_hex(16)  # proves to a broker that a new connection is ours
        self.context = context or zmq.Context.instance()
        self._transport = transport
        self._curve = broker.curve
        # Each message type a broker may send, and what handles it: a missing one is a
        # KeyError, never a message mistaken for another.
        self.message_handlers: dict[type, Callable[[BrokerSession, Any], None]] = {
            p.Request: self._start,
            p.Cancel: self._cancel,
            p.Heartbeat: self._on_heartbeat,
            p.Disconnect: self._on_disconnect,
            p.Error: self._on_error,
        }
        self.served = 0
        self.refusals = 0  # requests refused over capacity
        self.peak_inflight = 0
        self._room_turn = 0  # the broker last told of a free slot: the next one is told next
        self._stopping: asyncio.Event | None = None
        self.refused: p.Error | None = None  # why the brokers refused this worker, if all did
        # Called with the endpoints of the brokers that have the worker registered, each
        # time they change (empty: none has): `zroute worker --ready-file` keeps a file
        # for a readiness probe with it.
        self.on_registered: Callable[[list[str]], None] = lambda endpoints: None
        self._drops = LogLimiter(log)
        # A handler that blocks the loop is reported once heartbeats are due, before the
        # broker evicts the worker for missing them.
        self._watchdog = LoopWatchdog(broker.heartbeat_interval, self._report_blocked_loop)
        self._blocked = LogLimiter(log, interval=BLOCKED_LOG_INTERVAL, per_kind=1)

    def _set_registered(self, session: BrokerSession, registered: bool) -> None:
        if session.registered != registered:
            session.registered = registered
            self.on_registered([s.endpoint for s in self.sessions if s.registered])

    @property
    def inflight(self) -> int:
        """The requests it runs, from every broker."""
        return sum(len(session.tasks) for session in self.sessions)

    # --- life cycle -----------------------------------------------------------

    async def run(self) -> None:
        """Serve until stop(); then drain and disconnect."""
        self._stopping = asyncio.Event()
        self._watchdog.start()
        for session in self.sessions:
            self._connect(session)
        try:
            while not self._stopping.is_set():
                try:
                    await asyncio.wait_for(self._stopping.wait(), self.heartbeat_interval)
                except asyncio.TimeoutError:
                    for session in self.sessions:
                        self._heartbeat(session)
            await self._drain()
        finally:
            self._watchdog.stop()

    def stop(self) -> None:
        """Begin a graceful drain; run() returns when it is done."""
        if self._stopping is not None:
            self._stopping.set()

    def _connect(self, session: BrokerSession) -> None:
        """Open a transport to a broker; READY goes once its connection is up."""
        callbacks = (partial(self._on_message, session), partial(self._on_connected, session),
                     partial(self._on_disconnected, session))
        if self._transport is not None:
            session.channel = self._transport(*callbacks)
        else:
            session.channel = BrokerChannel(self.context, session.endpoint, *callbacks,
                                            curve=self._curve,
                                            on_refused=partial(self._keys_refused, session))
        session.outbox = Outbox(session.send, session.push)
        session.connected = False
        session.last_heard = time.monotonic()

    def _on_connected(self, session: BrokerSession) -> None:
        session.connected = True
        session.said_waiting = False
        session.last_heard = time.monotonic()  # the broker is judged from now on
        if not self._stopping.is_set():
            self._register(session)
        session.answered = False

    def _keys_refused(self, session: BrokerSession, message: str) -> None:
        """A broker refused this worker's keys; libzmq does not try again on that
        connection. As for any refusal."""
        self._refused_by(session, p.Error(b"", p.E_AUTH_FAILED, message), message)

    def _refused_by(self, session: BrokerSession, error: p.Error, said: str) -> None:
        """A broker refused this worker itself, as `said`. With one broker, or once every
        broker has, the worker stops and says why. Until then it serves through the
        others, and asks this one again on a new connection after a growing back-off, as
        it does a broker that falls silent (a worker over Broker.max_workers may fit
        later; one whose id is in use may take it once the holder is gone)."""
        session.refused = error
        self._set_registered(session, False)
        session.abandon_requests()
        if all(other.refused is not None for other in self.sessions):
            log.error("worker %s: %s", self.worker_id, said)
            self.refused = error
            self.stop()
            return
        wait = session.backoff * random.uniform(0.5, 1.5)
        session.retry_at = time.monotonic() + wait
        session.backoff = min(RECONNECT_MAX_S, session.backoff * 2)
        self._drops.warn("refused", f"worker {self.worker_id}: {said}; going on with the "
                         f"other brokers, and asking this one again in {wait:.1f} s",
                         session.endpoint.encode())

    def _on_disconnected(self, session: BrokerSession) -> None:
        """The broker died or stopped: what it sent is lost, so stop working on it now.
        ZeroMQ connects again by itself, and READY goes when it does."""
        session.connected = False
        self._set_registered(session, False)
        if session.refused is not None:
            return  # said already; asked again in its turn
        session.said_waiting = True
        if session.answered:
            cancelled = (f"; cancelled {len(session.tasks)} request(s) in hand"
                         if session.tasks else "")
            log.warning("worker %s: the connection to the broker at %s closed%s; waiting for it",
                        self.worker_id, session.endpoint, cancelled)
        else:
            self._drops.warn("closed unanswered", f"worker {self.worker_id}: the connection to "
                             f"{session.endpoint} closed before a broker answered: is it the "
                             "broker's worker endpoint, Broker.backend?")
        session.abandon_requests()

    def _register(self, session: BrokerSession) -> None:
        services = sorted(self.handlers)
        session.send(p.encode_ready(p.Ready(self.worker_id, services, self.capacity, self.token)))
        message = (f"worker {self.worker_id} registering with {session.endpoint} for "
                   f"{', '.join(services)}")
        if session.answered and session.refused is None:
            log.info(message)
        else:  # the last connection closed unanswered, or was refused: this one may be too
            self._drops.info("registering", message)

    def _beat(self, session: BrokerSession) -> None:
        """A HEARTBEAT that counts the requests the worker runs, from every broker."""
        inflight = self.inflight
        if self.capacity and inflight >= self.capacity:
            session.owes_room = True
        session.send(p.encode_heartbeat(p.Heartbeat(inflight=inflight)))

    def _heartbeat(self, session: BrokerSession) -> None:
        if session.refused is not None:
            if time.monotonic() >= session.retry_at:  # its turn to be asked again
                self._reconnect(session)
            return
        if not session.connected:
            # Nothing to hear from; ZeroMQ keeps trying to connect. Say so once.
            if not session.said_waiting:
                session.said_waiting = True
                log.info("worker %s: waiting for a broker at %s", self.worker_id,
                         session.endpoint)
            return
        silence = time.monotonic() - session.last_heard
        if silence <= self.heartbeat_interval * self.heartbeat_misses:
            self._beat(session)
            return
        # Connected, but silent: a hung broker, or a peer that is not one. A new socket.
        log.warning("worker %s: broker silent for %.1f s at %s; reconnecting", self.worker_id,
                    silence, session.endpoint)
        self._reconnect(session)
        # Wait a jittered, growing while before judging the new connection.
        session.last_heard += session.backoff * random.uniform(0.5, 1.5)
        session.backoff = min(RECONNECT_MAX_S, session.backoff * 2)

    def _reconnect(self, session: BrokerSession) -> None:
        """A new socket to a broker, forgetting the requests it sent on the old one."""
        self._set_registered(session, False)
        session.abandon_requests()
        session.channel.close(0)
        self._connect(session)

    async def _drain(self) -> None:
        """Finish the requests in hand (and any a broker sent before it saw DRAIN),
        heartbeating meanwhile, for at most drain_timeout seconds."""
        log.info("worker %s draining %d request(s)", self.worker_id, self.inflight)
        for session in self.sessions:
            self._set_registered(session, False)
            session.send(p.encode_drain())
        deadline = time.monotonic() + self.drain_timeout
        while self.inflight and time.monotonic() < deadline:
            wait = min(self.heartbeat_interval, deadline - time.monotonic())
            running = [task for session in self.sessions for task in session.tasks.values()]
            await asyncio.wait(running, timeout=wait)
            for session in self.sessions:
                self._beat(session)
        for session in self.sessions:
            for rid, task in list(session.tasks.items()):
                task.cancel()
                session.outbox.end(rid, p.Error(rid, p.E_WORKER_LOST,
                                                "worker stopped before finishing"))
            session.outbox.flush()
            session.send(p.encode_disconnect())
            session.channel.close(linger_ms=200)
        refused = f", refused {self.refusals} over its capacity" if self.refusals else ""
        log.info("worker %s stopped after %d request(s), at most %d at once%s", self.worker_id,
                 self.served, self.peak_inflight, refused)

    def _report_blocked_loop(self, blocked_for: float, task: asyncio.Task | None,
                             frame: FrameType | None) -> None:
        """Say what blocks the event loop, and what to do about it. Runs in the
        watchdog's thread, while the loop is blocked: it reads, and changes nothing."""
        in_flight = [item for session in list(self.sessions)
                     for item in list(session.tasks.items())]
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

    # --- messages ------------------------------------------------------------

    def _on_message(self, session: BrokerSession, frames: list[bytes]) -> None:
        session.last_heard = time.monotonic()
        try:
            msg = p.decode_to_worker(frames)
        except p.ProtocolError as e:
            # A peer that is not a broker (say, the gateway's HTTP port) sends a stream of
            # these: say once in a while what it may be, not once per message.
            self._drops.warn("not zroute", f"worker {self.worker_id} dropped a message that is "
                             f"not zroute's protocol ({e}): is {session.endpoint} the broker's "
                             "worker endpoint, Broker.backend?")
            return
        session.answered = True
        self.message_handlers[type(msg)](session, msg)

    def _cancel(self, session: BrokerSession, msg: p.Cancel) -> None:
        task = session.tasks.get(msg.rid)
        if task is not None:
            task.cancel()

    def _on_heartbeat(self, session: BrokerSession, _: p.Heartbeat) -> None:
        session.backoff = RECONNECT_MIN_S
        if session.refused is not None:  # asked again, it took the worker
            session.refused = None
            log.info("worker %s: registered with the broker at %s", self.worker_id,
                     session.endpoint)
        if not self._stopping.is_set():  # a draining worker takes no new work
            self._set_registered(session, True)

    def _on_disconnect(self, session: BrokerSession, _: p.Disconnect) -> None:
        # The broker does not know us (it restarted): register again, unless leaving.
        self._set_registered(session, False)
        session.abandon_requests()
        if not self._stopping.is_set():
            self._register(session)

    def _on_error(self, session: BrokerSession, msg: p.Error) -> None:
        said = f"the broker at {session.endpoint} refused it: {msg.message}"
        if msg.rid:
            log.error("worker %s: %s", self.worker_id, said)
        else:  # about the worker itself: its id is taken, it is over a limit...
            self._refused_by(session, msg, said)

    def _announce_room(self, ended: BrokerSession) -> None:
        """A slot of `ended`'s request is free, and `ended` knows it from the request's
        end. One other broker that takes the worker for full is told too, with a
        HEARTBEAT that counts the requests the worker runs, so that it sends work again now
        rather than at its next heartbeat: one, in turn, since brokers told together
        would race for the one slot and all but one be refused."""
        ended.owes_room = False
        count = len(self.sessions)
        for step in range(1, count + 1):
            turn = (self._room_turn + step) % count
            session = self.sessions[turn]
            if session.owes_room and session.connected:
                self._room_turn = turn
                session.owes_room = False
                self._beat(session)
                return

    async def _until_broker_reads(self, session: BrokerSession) -> None:
        """Backpressure: a handler that yields faster than the broker takes its replies
        waits here, rather than the replies piling up in the worker's memory."""
        while session.channel.unsent_bytes() > MAX_UNSENT_BYTES:
            await asyncio.sleep(UNSENT_RETRY_S)

    def _check_chunk(self, chunk: bytes) -> None:
        """ChunkTooLarge for a chunk the broker would not take: sent, it would make the
        broker drop this worker's connection, and with it every request the worker runs."""
        if len(chunk) > self.max_chunk:
            raise ChunkTooLarge(f"the handler yielded a chunk of {len(chunk)} bytes, more than "
                                f"Broker.max_message_size ({self.max_chunk} bytes); "
                                "yield it in smaller pieces")

    def _handler_error(self, rid: bytes, error: Exception) -> str:
        """What a client is told of a handler's exception. Its text may hold paths, host
        names or secrets: unless expose_errors, only the request id, which the worker's
        log line (with the traceback) names too."""
        if self.expose_errors:
            return f"{type(error).__name__}: {error}"
        return (f"the handler failed on {request_label(rid)}; "
                f"worker {self.worker_id}'s log has the details")

    def _start(self, session: BrokerSession, msg: p.Request) -> None:
        if msg.rid in session.tasks:
            return
        handler = self.handlers.get(msg.service)
        if handler is None:
            session.outbox.end(msg.rid, p.Error(msg.rid, p.E_BAD_REQUEST,
                                                f"worker serves no {msg.service!r}"))
            return
        inflight = self.inflight
        if self.capacity and inflight >= self.capacity:
            # Other brokers filled it: this broker routes the request elsewhere.
            self.refusals += 1
            session.owes_room = True
            session.outbox.end(msg.rid, p.Error(msg.rid, p.E_WORKER_FULL, (
                f"worker {self.worker_id} runs {inflight} requests, its capacity")))
            return
        self.peak_inflight = max(self.peak_inflight, inflight + 1)
        task = asyncio.get_running_loop().create_task(
            self._serve(session, msg.rid, handler, msg.body))
        session.tasks[msg.rid] = task
        # A callback, not the handler's `finally`: a task cancelled before its first step
        # (its broker gone in the same turn) never runs its body.
        task.add_done_callback(partial(self._ended, session, msg.rid))

    def _ended(self, session: BrokerSession, rid: bytes, task: asyncio.Task) -> None:
        if session.tasks.get(rid) is task:
            del session.tasks[rid]
            self._announce_room(session)

    async def _serve(self, session: BrokerSession, rid: bytes, handler: Handler,
                     body: bytes) -> None:
        started = time.monotonic()
        chunks = 0
        outcome = "ok"
        outbox = session.outbox
        try:
            async for item in handler(decode_body(body)):
                if isinstance(item, str):
                    item = item.encode()
                elif not isinstance(item, bytes):  # a dict, a list...: its JSON text
                    item = as_chunk(item, handler_name(handler))
                self._check_chunk(item)
                outbox.chunk(rid, item)
                chunks += 1
                if session.channel.unsent_bytes() > MAX_UNSENT_BYTES:
                    await self._until_broker_reads(session)
                elif chunks % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # a handler that never awaits must not starve others
            outbox.end(rid)
        except asyncio.CancelledError:
            outcome = "cancelled"
            if rid in outbox.chunks:
                outbox.forget(rid)  # the broker has forgotten the request
        except ChunkTooLarge as e:
            outcome = "chunk too large"
            log.warning("worker %s: %s on %s", self.worker_id, e, request_label(rid))
            outbox.end(rid, p.Error(rid, p.E_HANDLER, str(e)))
        except BadRequest as e:
            outcome = "bad request"
            outbox.end(rid, p.Error(rid, p.E_BAD_REQUEST, str(e)))
        except BrokerError as e:
            # A call the handler made failed, and the handler let the error through: its
            # caller learns the same, as a service between two others passes it on.
            outcome = "call failed"
            code = e.code if e.code in p.PASSED_ON else p.E_HANDLER
            outbox.end(rid, p.Error(rid, code, f"a call it made failed: {e.message}"))
        except Exception as e:
            outcome = "error"
            log.exception("worker %s: handler failed on %s", self.worker_id, request_label(rid))
            outbox.end(rid, p.Error(rid, p.E_HANDLER, self._handler_error(rid, e)))
        finally:
            self.served += 1
            if log.isEnabledFor(logging.INFO):  # the fields cost more than a skipped call
                log.info(outcome, extra=fields(worker=self.worker_id, **request_fields(rid),
                                               chunks=chunks, duration=time.monotonic() - started))
