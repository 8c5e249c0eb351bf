"""The broker: a ROUTER for clients, a ROUTER for workers, and the routing between.

A single thread runs a poll loop. Each readable socket is drained in batches
with NOBLOCK, and every send is NOBLOCK, so that no peer can stall the loop:
a peer whose queue is full, or that has gone, fails its own requests only.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import time
from collections import deque
from typing import Any, Callable, Mapping, Sequence

import orjson
import zmq

from zroute import protocol as p
from broker.policies import DEFAULT_POLICY, Policy, load_policies, unknown_policy
from zroute.protocol import DIRECT, request_token
from zroute.ratelimit import LogLimiter, PeerLimiter
from broker.registry import DRAINING, EVICTED, READY, Registry, WorkerInfo
from broker.reports import Reports
from zroute.settings import BrokerSettings
from zroute.unreleased import MARK_BYTES, UnreleasedByPeer
from zroute.zmqio import (TooManyFrames, readable, recv_frames, send_to, send_to_tracked,
                          track_every_message)

log = logging.getLogger("zroute.broker")

# What one pass takes from a socket before it looks at the other, at timers and at what
# it has to send: so many messages (a BATCH counts those it carries), frames or bytes.
DRAIN_MESSAGES = 2000
DRAIN_FRAMES = 20_000
DRAIN_BYTES = 8 << 20
SOCKET_HWM = 10_000  # messages queued per peer; past that a send fails and its request ends
DISCONNECTED = "disconnected"  # the eviction reason of a worker that said goodbye
POLL_MS = 50  # the loop wakes at least this often for timers and stop()
DEADLINE_TICK = 0.05  # deadlines are kept in buckets of this many seconds
FRESH_STATS = 5  # STATS of a client answered at once per Broker.stats_interval
LISTED_WORKERS = 10  # worker ids an unknown direct target's error lists
MAX_STATS_WAITING = 10_000  # STATS waiting for the next shared build, from all clients
MAX_STATS_WAITING_PER_CLIENT = 100  # and from one client
DRAIN_RATE_INTERVAL = 0.5  # seconds over which a queue's drain rate is measured
# What a client that reads may seem to hold: the bytes since the last tracked message to
# it, and the message being sent.
READER_SLACK = MARK_BYTES + p.MAX_BATCH_BYTES
WRONG_ENDPOINT_ANSWERS = 10  # per peer per second, to a peer on the wrong socket or a bad READY


class Request:
    """A request the broker holds, from arrival until its END, ERROR or CANCEL."""

    __slots__ = ("token", "client", "rid", "service", "body", "policy", "target",
                 "worker", "chunks", "retries", "arrived", "queued_at", "deadline_tick")

    def __init__(self, token: bytes, client: bytes, m: p.Request, policy: str, deadline_tick: int):
        self.token = token  # the request id the worker sees
        self.client = client
        self.rid = m.rid
        self.service = m.service
        self.body = m.body
        self.policy = policy
        self.target = m.target
        self.worker: WorkerInfo | None = None
        self.chunks = 0
        self.retries = 0
        self.arrived = time.monotonic()
        self.queued_at: float | None = None
        self.deadline_tick = deadline_tick


class DrainRate:
    """How fast a service's queue drains, in requests a second: averaged over the last
    intervals of DRAIN_RATE_INTERVAL in which requests left the queue; 0 (unknown) until
    measured, and again after an interval in which requests waited and none left, so
    that a rate is never older than the last interval."""

    __slots__ = ("rate", "taken", "since")

    def __init__(self, now: float) -> None:
        self.rate = 0.0
        self.taken = 0  # requests that left the queue for a worker since `since`
        self.since = now

    def update(self, now: float, waiting: bool) -> bool:
        """Close an interval if one has passed; False if nothing waited or left in it
        (the rate says nothing of now: forget it)."""
        elapsed = now - self.since
        if elapsed < DRAIN_RATE_INTERVAL:
            return True
        busy = waiting or self.taken > 0
        if self.taken:
            observed = self.taken / elapsed
            self.rate = (self.rate + observed) / 2 if self.rate else observed
        elif busy:
            self.rate = 0.0  # stalled: what drained before says nothing of when it resumes
        self.taken = 0
        self.since = now
        return busy

    def wait(self, waiting: int) -> float:
        """Seconds until `waiting` requests have left the queue; 0 if not measured yet."""
        return waiting / self.rate if self.rate else 0.0


def count_down(counts: dict[bytes, int], key: bytes, by: int = 1) -> None:
    """`by` fewer for `key`; at zero the key goes, so that clients that left leave nothing."""
    left = counts.pop(key) - by
    if left:
        counts[key] = left


class Broker:
    """Routes requests from clients to workers and streams the replies back.

    `settings` is the `Broker` section of the configuration.
    `policies` are those that requests may name (default: the built-in ones);
    "direct" is always valid besides them.
    """

    def __init__(self, settings: BrokerSettings, context: zmq.Context | None = None,
                 policies: Mapping[str, Policy] | None = None) -> None:
        self.settings = settings
        self.context = context or zmq.Context.instance()
        self.registry = Registry(settings.max_departed_workers)
        self.policies = dict(policies) if policies is not None else load_policies()
        self.requests: dict[bytes, Request] = {}
        self.reports = Reports(settings.heartbeat_interval * settings.heartbeat_misses)
        self.queues: dict[str, deque[Request]] = {}
        self.drain_rates: dict[str, DrainRate] = {}  # of the services with a queue lately
        self.requests_by_client: dict[bytes, int] = {}  # held by the broker, queued or not
        self.queued_by_client: dict[bytes, int] = {}
        # Bodies the broker may still have to send (queued, or on a worker before its
        # first chunk, for a retry), and replies libzmq still holds for each client.
        self.body_bytes = 0
        self.body_bytes_by_client: dict[bytes, int] = {}
        self.reply_bytes = UnreleasedByPeer()
        self.fresh_stats = PeerLimiter(settings.stats_interval, FRESH_STATS)
        self.stats_waiting: list[tuple[bytes, bytes]] = []  # (client, rid) of deferred STATS
        self.stats_waiting_by_client: dict[bytes, int] = {}
        self._next_stats_build = 0.0
        # Deadlines in buckets, so that a finished request is forgotten at once.
        self.deadlines: dict[int, set[bytes]] = {}
        self._checked_tick = int(time.monotonic() / DEADLINE_TICK)
        self.boot_id = os.urandom(8)
        self.started = time.monotonic()
        self.totals = dict.fromkeys(
            ("requests", "completed", "failed", "cancelled", "chunks", "errors", "retries",
             "timeouts", "evictions", "queued", "rejected_frames", "oversized_messages",
             "id_changes", "clients_gone", "reports_refused"), 0)
        self.queue_wait_total = 0.0
        self.drops = LogLimiter(log)
        self.asked_to_register = PeerLimiter(settings.heartbeat_interval)
        self.told_wrong_endpoint = PeerLimiter(1.0, WRONG_ENDPOINT_ANSWERS)
        self.told_bad_ready = PeerLimiter(1.0, WRONG_ENDPOINT_ANSWERS)
        self._stopping = False
        self._next_heartbeat = 0.0
        self.frontend = self._router(settings.frontend)
        track_every_message(self.frontend)
        self.backend = self._router(settings.backend)
        # Tells when a client's connection closes, so that its replies are not delivered
        # to the next peer that connects under its routing id.
        self.client_disconnects = self.frontend.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        # What this pass of the loop will send: socket -> peer -> messages, in order.
        self.outgoing: dict[zmq.Socket, dict[bytes, list[list[bytes]]]] = {
            self.frontend: {}, self.backend: {}}

    # --- sockets and loop ------------------------------------------------

    def _router(self, endpoint: str) -> zmq.Socket:
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # EHOSTUNREACH instead of a silent drop
        sock.setsockopt(zmq.SNDHWM, SOCKET_HWM)
        sock.setsockopt(zmq.RCVHWM, SOCKET_HWM)
        sock.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_size)
        sock.setsockopt(zmq.LINGER, 200)
        sock.bind(endpoint)
        return sock

    def run(self) -> None:
        """Serve until stop() is called."""
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(self.client_disconnects, zmq.POLLIN)
        log.info("broker serving clients on %s, workers on %s",
                 self.settings.frontend, self.settings.backend)
        while not self._stopping:
            for sock, _ in poller.poll(POLL_MS):
                if sock is self.frontend:
                    self._drain(sock, self._on_client)
                elif sock is self.backend:
                    self._drain(sock, self._on_worker)
                else:
                    self._on_client_disconnects()
            self._on_timers(time.monotonic())
            self._flush()
        self._shutdown()

    def stop(self) -> None:
        """Ask the loop to end; safe to call from a signal handler."""
        self._stopping = True

    def _drain(self, sock: zmq.Socket, handle: Callable[[bytes, list[bytes]], None]) -> None:
        messages_left, frames_left, bytes_left = DRAIN_MESSAGES, DRAIN_FRAMES, DRAIN_BYTES
        while messages_left > 0 and frames_left > 0 and bytes_left > 0 and readable(sock):
            try:
                peer, *frames = recv_frames(sock, p.MAX_FRAMES + 1)  # + the routing id
            except TooManyFrames as e:
                self._reject_oversized(sock, e.frames[0], e.frames[1:])
                frames_left -= p.MAX_FRAMES
                continue
            frames_left -= len(frames)
            bytes_left -= sum(map(len, frames))
            try:
                messages = p.unbatch(frames)
            except p.ProtocolError as e:
                self._dropped("malformed", peer, f"dropped a malformed BATCH: {e}")
                continue
            messages_left -= len(messages)
            for message in messages:
                handle(peer, message)

    def _reject_oversized(self, sock: zmq.Socket, peer: bytes, frames: list[bytes]) -> None:
        """A message of more than MAX_FRAMES frames: fail the request it names, if any."""
        rid = frames[2] if len(frames) > 2 and frames[0] == p.VERSION else b""
        if sock is self.frontend:
            problem = self._oversized(peer, p.MAX_FRAMES)
            if 0 < len(rid) <= p.MAX_CLIENT_RID:
                self._reply_error(peer, rid, p.E_LIMIT, f"the broker takes no {problem}")
            return
        worker = self.registry.by_peer.get(peer)
        req = worker.requests.get(rid) if worker is not None else None
        if req is None:
            self._oversized(peer, p.MAX_FRAMES)
        else:
            self._reject_oversized_reply(worker, req, p.MAX_FRAMES)

    def _reject_oversized_reply(self, worker: WorkerInfo, req: Request, most: int) -> None:
        problem = self._oversized(worker.peer, most)
        self._fail(req, p.E_LIMIT, f"worker {worker.worker_id!r} replied with {problem}")

    def _oversized(self, peer: bytes, most: int) -> str:
        """Count and log a message of more than `most` frames; say what it was."""
        self.totals["oversized_messages"] += 1
        problem = f"a message of more than {most} frames"
        self.drops.warn("oversized", f"rejected {problem}", peer)
        return problem

    def _post(self, sock: zmq.Socket, peer: bytes, frames: list[bytes]) -> None:
        """Queue a message; _flush sends it at the end of this pass of the loop."""
        queue = self.outgoing[sock].get(peer)
        if queue is None:
            self.outgoing[sock][peer] = [frames]
        else:
            queue.append(frames)

    def _flush(self) -> None:
        """Send what this pass produced: per peer, one message or BATCHes of them, so
        that committing a message and waking libzmq's I/O thread is paid per batch."""
        while any(self.outgoing.values()):  # a failed send may queue more (CANCELs)
            pending, self.outgoing = self.outgoing, {self.frontend: {}, self.backend: {}}
            for sock, by_peer in pending.items():
                for peer, messages in by_peer.items():
                    self._send_all(sock, peer, messages)

    def _send_all(self, sock: zmq.Socket, peer: bytes, messages: list[list[bytes]]) -> None:
        sent = sent_bytes = 0
        for count, frames in p.packed(messages):
            if not self._send(sock, peer, frames):
                self._undeliverable(sock, peer, messages[sent:])
                return
            sent += count
            if sock is self.frontend:
                sent_bytes += sum(map(len, frames))
                if self._replies_pile_up(peer, sent_bytes):
                    return  # the rest is for the requests that just ended

    def _undeliverable(self, sock: zmq.Socket, peer: bytes, messages: list[list[bytes]]) -> None:
        """A peer is gone or its queue is full: evict the worker, or cancel what the
        client was being sent."""
        if sock is self.backend:
            worker = self.registry.by_peer.get(peer)
            if worker is not None:
                self._evict(worker, "cannot be reached")
            return
        self.drops.warn("unreachable", "a client is gone or not reading; cancelling its requests",
                        peer)
        for frames in messages:
            req = self.requests.get(request_token(peer, frames[2])) if len(frames) > 2 else None
            if req is not None:
                self._finish(req, ok=False, cancel_worker=True)

    def _dropped(self, kind: str, peer: bytes, reason: str) -> None:
        """Count a message that did not parse, and log it (rate-limited)."""
        self.totals["rejected_frames"] += 1
        self.drops.warn(kind, reason, peer)

    def _send(self, sock: zmq.Socket, peer: bytes, frames: list[bytes],
              track: bool = False) -> bool:
        """Send without blocking; False if the peer is gone or its queue is full.
        What a client does not read must be seen in bytes: see zroute/unreleased.py."""
        try:
            if sock is not self.frontend:
                send_to(sock, peer, frames)
                return True
            size = sum(map(len, frames))
            if track or self.reply_bytes.of(peer).wants_tracker(size):
                tracker = send_to_tracked(sock, peer, frames)
            else:
                send_to(sock, peer, frames)
                tracker = None
            self.reply_bytes.add(peer, size, tracker)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return False
            raise

    def _gone(self, sock: zmq.Socket, peer: bytes) -> bool:
        """Whether a peer's connection is gone: it cannot be sent a HEARTBEAT. A peer
        whose queue is full (zmq.Again) is there, only behind: not gone."""
        try:
            send_to(sock, peer, p.encode_heartbeat(p.Heartbeat(self.boot_id)))
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return True
            if e.errno != zmq.EAGAIN:
                raise
        return False

    def _shutdown(self) -> None:
        for req in list(self.requests.values()):
            self._fail(req, p.E_WORKER_LOST, "broker is shutting down")
        self._flush()
        self.frontend.disable_monitor()
        self.client_disconnects.close()
        self.frontend.close()
        self.backend.close()
        log.info("broker stopped")

    # --- clients -----------------------------------------------------------

    def _on_client(self, peer: bytes, frames: list[bytes]) -> None:
        try:
            msg = p.decode_from_client(frames)
        except p.ProtocolError as e:
            if not self._tell_worker_wrong_endpoint(peer, frames):
                self._reject_client_frames(peer, frames, e)
            return
        kind = type(msg)
        if kind is p.Request:
            self._accept(peer, msg)
        elif kind is p.Cancel:
            self._cancel(peer, msg.rid)
        elif kind is p.StatsRequest:
            self._answer_stats(peer, msg.rid)
        elif kind is p.Report:
            self._store_report(peer, msg)
        else:
            self._post(self.frontend, peer, p.encode_heartbeat(p.Heartbeat(self.boot_id)))

    def _on_client_disconnects(self) -> None:
        """Some client's connection closed: end the requests of every client the broker
        can no longer reach, before a peer that takes its routing id can be sent their
        replies. The events name a file descriptor, not a client: the broker asks the
        socket, once per client with requests, whether it can send to it."""
        while self.client_disconnects.poll(0):
            self.client_disconnects.recv_multipart()
        gone: dict[bytes, bool] = {}
        for req in list(self.requests.values()):
            if req.client not in gone:
                gone[req.client] = self._gone(self.frontend, req.client)
            if gone[req.client]:
                self._finish(req, ok=False, cancel_worker=True)
        self.totals["clients_gone"] += sum(gone.values())

    def _reject_client_frames(self, peer: bytes, frames: list[bytes], error: p.ProtocolError) -> None:
        """Answer a malformed request with ERROR if it names a request id; else drop it."""
        self._dropped("malformed", peer, f"dropped a malformed message from a client: {error}")
        if len(frames) >= 3 and frames[0] == p.VERSION and 0 < len(frames[2]) <= p.MAX_CLIENT_RID:
            self._post(self.frontend, peer,
                       p.encode_error(p.Error(frames[2], p.E_BAD_REQUEST, str(error))))

    def _accept(self, client: bytes, m: p.Request) -> None:
        self.totals["requests"] += 1
        policy = m.policy or DEFAULT_POLICY
        error = self._check_routing(policy, m.target)
        if error:
            self._reply_error(client, m.rid, *error)
            return
        token = request_token(client, m.rid)
        if token in self.requests:
            self._reply_error(client, m.rid, p.E_BAD_REQUEST, "request id is already in flight")
            return
        inflight = self.requests_by_client.get(client, 0)
        if inflight >= self.settings.max_requests_per_client:
            self._reply_error(client, m.rid, p.E_LIMIT, f"this client has {inflight} requests in "
                              "flight, its most (Broker.max_requests_per_client)")
            return
        refusal = self._over_bytes(client, len(m.body))
        if refusal:
            self._reply_error(client, m.rid, p.E_LIMIT, refusal)
            return
        self.requests_by_client[client] = inflight + 1
        self._hold_body(client, len(m.body))
        timeout = m.timeout_ms / 1000 if m.timeout_ms else self.settings.request_timeout
        tick = math.ceil((time.monotonic() + timeout) / DEADLINE_TICK)
        req = Request(token, client, m, policy, tick)
        self.requests[token] = req
        self.deadlines.setdefault(tick, set()).add(token)
        self._dispatch(req)

    def _over_bytes(self, client: bytes, size: int) -> str:
        """Why a request of `size` bytes from `client` is over a byte budget; "" if not."""
        settings = self.settings
        if size > settings.max_request_bytes:
            return (f"the request's body is {size} bytes; the broker takes at most "
                    f"{settings.max_request_bytes} (Broker.max_request_bytes)")
        held = self._client_bytes(client)
        if held + size > settings.max_client_bytes:
            return (f"this client holds {held} bytes in the broker (bodies and unread "
                    f"replies); {size} more is over Broker.max_client_bytes "
                    f"({settings.max_client_bytes})")
        # Replies are left out: those of a client that does not read stay in libzmq until
        # it goes, and must not keep everyone else out.
        if self.body_bytes + size > settings.max_buffered_bytes:
            return (f"the broker holds {self.body_bytes} bytes of request bodies; {size} more "
                    f"is over Broker.max_buffered_bytes ({settings.max_buffered_bytes})")
        return ""

    def _client_bytes(self, client: bytes) -> int:
        return self.body_bytes_by_client.get(client, 0) + self.reply_bytes.held(client)

    def _hold_body(self, client: bytes, size: int) -> None:
        if size:
            self.body_bytes += size
            self.body_bytes_by_client[client] = self.body_bytes_by_client.get(client, 0) + size

    def _release_body(self, req: Request) -> None:
        """The broker will not send this body again: it no longer counts."""
        size = len(req.body)
        if size:
            self.body_bytes -= size
            count_down(self.body_bytes_by_client, req.client, size)
            req.body = b""

    def _replies_pile_up(self, client: bytes, just_sent: int) -> bool:
        """Whether a client's replies pile up in the broker unread: over its budget, or,
        while everyone's is spent, over READER_SLACK not counting `just_sent` (bytes sent
        in this pass: a client that reads has not had the time to). Then its requests end
        (their workers stop), so that the pile stops growing."""
        if self.reply_bytes.peers[client].held <= READER_SLACK:
            return False  # at most that, as last measured plus what was sent since
        held = self.reply_bytes.held(client)
        if held <= READER_SLACK or client not in self.requests_by_client:
            return False
        settings = self.settings
        if held + self.body_bytes_by_client.get(client, 0) > settings.max_client_bytes:
            limit = f"Broker.max_client_bytes ({settings.max_client_bytes})"
        elif (self.body_bytes + self.reply_bytes.total > settings.max_buffered_bytes
              and held - just_sent > READER_SLACK):
            limit = (f"{READER_SLACK} while the broker holds more than "
                     f"Broker.max_buffered_bytes ({settings.max_buffered_bytes})")
        else:
            return False
        self.drops.warn("unread replies", f"a client does not read its replies: {held} bytes "
                        f"wait for it; cancelling its requests", client)
        message = f"{held} bytes of replies wait for this client unread, over {limit}"
        for req in [r for r in self.requests.values() if r.client == client]:
            self._fail(req, p.E_LIMIT, message)
        return True

    def _check_routing(self, policy: str, target: str) -> tuple[str, str] | None:
        if policy not in self.policies and policy != DIRECT:
            return p.E_UNKNOWN_POLICY, unknown_policy(policy, [*self.policies, DIRECT])
        if policy == DIRECT and not target:
            return p.E_BAD_REQUEST, "direct routing needs a target worker id"
        return None

    def _reply_error(self, client: bytes, rid: bytes, code: str, message: str) -> None:
        self.totals["errors"] += 1
        self._post(self.frontend, client, p.encode_error(p.Error(rid, code, message)))

    def _cancel(self, client: bytes, rid: bytes) -> None:
        req = self.requests.get(request_token(client, rid))
        if req is None:
            self.drops.info("stray cancel", "CANCEL for a request the broker does not hold", client)
            return
        self.totals["cancelled"] += 1
        self._finish(req, ok=False, cancel_worker=True)

    # --- routing -------------------------------------------------------------

    def _dispatch(self, req: Request) -> None:
        """Send a request to a worker, queue it, or fail it."""
        worker = self._pick(req)
        if worker is not None:
            self._assign(req, worker)

    def _pick(self, req: Request) -> WorkerInfo | None:
        """The worker for `req` now, or None once it is queued or failed."""
        if req.policy == DIRECT:
            worker = self.registry.by_id.get(req.target)
            if worker is None or req.service not in worker.services or worker.state != READY:
                self._fail(req, p.E_NO_SUCH_WORKER,
                           f"no such worker: {req.target!r} serves no {req.service!r} requests "
                           f"({self._workers_of(req.service)})")
                return None
            if worker.has_room:
                return worker
        else:
            candidates = self.registry.available(req.service)
            if candidates:
                return self._choose(req, candidates)
        self._enqueue(req)
        return None

    def _choose(self, req: Request, candidates: Sequence[WorkerInfo]) -> WorkerInfo | None:
        """The policy's choice; a policy that fails (a user's may) fails the request only."""
        try:
            chosen = self.policies[req.policy].choose(req.service, candidates)
        except Exception as e:
            problem = f"raised {type(e).__name__}: {' '.join(str(e).split())}"
        else:
            if any(chosen is worker for worker in candidates):
                return chosen
            problem = f"returned a {type(chosen).__name__}, not one of the workers it was given"
        message = f"routing policy {req.policy!r} {problem}"
        self.drops.warn("policy error", message)
        self._fail(req, p.E_POLICY, message)
        return None

    def _workers_of(self, service: str) -> str:
        """The ids a direct request for `service` may name, the first LISTED_WORKERS."""
        ids = [w.worker_id for w in self.registry.serving(service)]
        if not ids:
            return f"no worker serves {service!r} now"
        more = f", and {len(ids) - LISTED_WORKERS} more" if len(ids) > LISTED_WORKERS else ""
        return f"workers of {service!r}: {', '.join(ids[:LISTED_WORKERS])}{more}"

    def _assign(self, req: Request, worker: WorkerInfo) -> None:
        req.worker = worker
        worker.inflight += 1
        worker.requests[req.token] = req
        self._post(self.backend, worker.peer,
                   p.encode_request_to_worker(p.Request(req.token, req.service, req.body)))

    def _enqueue(self, req: Request) -> None:
        """Wait for a worker with room, or for a first worker (while workers start);
        unless the queue is full, the client has its share of it, or the queue drains
        too slowly for the request to leave it before Broker.queue_timeout."""
        waiting = len(self.queues.get(req.service, ()))
        rate = self.drain_rates.get(req.service)
        wait = rate.wait(waiting + 1) if rate is not None else 0.0
        if waiting >= self.settings.max_queue:
            self._fail_unavailable(req, f"the queue is full: Broker.max_queue is "
                                        f"{self.settings.max_queue}", wait)
        elif self.queued_by_client.get(req.client, 0) >= self.settings.max_queue_per_client:
            self._fail_unavailable(req, "this client has its share of the queue waiting "
                                        "(Broker.max_queue_per_client)", wait)
        elif wait > self.settings.queue_timeout:
            self._fail_unavailable(req, f"the queue would take {wait:.1f} s", wait)
        else:
            self.totals["queued"] += 1
            req.queued_at = time.monotonic()
            self.queues.setdefault(req.service, deque()).append(req)
            self.queued_by_client[req.client] = self.queued_by_client.get(req.client, 0) + 1
            if rate is None:
                self.drain_rates[req.service] = DrainRate(req.queued_at)

    def _dequeue(self, req: Request) -> None:
        if req.queued_at is None:
            return
        self.queue_wait_total += time.monotonic() - req.queued_at
        req.queued_at = None
        queue = self.queues[req.service]
        queue.remove(req)
        if not queue:
            del self.queues[req.service]  # services named by clients must not pile up
        count_down(self.queued_by_client, req.client)

    def _pump(self, service: str) -> None:
        """Dispatch queued requests of a service, oldest first, while workers have room.

        A direct request waits for its own worker; the requests behind it go ahead.
        """
        queue = self.queues.get(service)
        while queue and not self._stopping:
            candidates = self.registry.available(service)
            if not candidates:
                return
            req = next((r for r in queue if r.policy != DIRECT or
                        any(w.worker_id == r.target for w in candidates)), None)
            if req is None:
                return  # only direct requests for busy workers are left
            if req.policy == DIRECT:
                worker = self.registry.by_id[req.target]
            else:
                worker = self._choose(req, candidates)
                if worker is None:
                    continue  # the policy failed, and so did the request: it left the queue
            self._dequeue(req)
            self.drain_rates[service].taken += 1
            self._assign(req, worker)

    # --- request endings ---------------------------------------------------

    def _fail(self, req: Request, code: str, message: str) -> None:
        self._reply_error(req.client, req.rid, code, message)
        self._finish(req, ok=False, cancel_worker=True)

    def _finish(self, req: Request, *, ok: bool, cancel_worker: bool = False) -> None:
        """Forget a request, and free its worker's slot."""
        if self.requests.pop(req.token, None) is None:
            return
        count_down(self.requests_by_client, req.client)
        self._release_body(req)
        bucket = self.deadlines.get(req.deadline_tick)
        if bucket is not None:
            bucket.discard(req.token)
            if not bucket:
                del self.deadlines[req.deadline_tick]
        self._dequeue(req)
        self.totals["completed" if ok else "failed"] += 1
        worker = req.worker
        if worker is None:
            return
        worker.requests.pop(req.token, None)
        worker.inflight -= 1
        if ok:
            worker.completed += 1
            worker.latencies.append(time.monotonic() - req.arrived)
        else:
            worker.failed += 1
        if cancel_worker and worker.state != EVICTED:
            self._post(self.backend, worker.peer, p.encode_cancel(p.Cancel(req.token)))
        for service in worker.services:
            self._pump(service)

    # --- workers -----------------------------------------------------------

    def _on_worker(self, peer: bytes, frames: list[bytes]) -> None:
        try:
            msg = p.decode_from_worker(frames)
        except p.ProtocolError as e:
            if not self._tell_client_wrong_endpoint(peer, frames):
                self._dropped("malformed", peer, f"dropped a malformed message from a worker: {e}")
                if frames[:2] == [p.VERSION, p.READY] and self.told_bad_ready.allow(peer):
                    self._refuse(peer, p.E_BAD_REQUEST, f"READY refused: {e}")
            return
        worker = self.registry.by_peer.get(peer)
        kind = type(msg)
        if kind is p.Ready:
            self._register(peer, worker, msg)
            return
        if worker is None:
            self._ask_to_register(peer)
            return
        worker.last_seen = time.monotonic()
        if kind is p.Chunk or kind is p.End:
            self._relay(worker, msg)
        elif kind is p.Error:
            self._relay_error(worker, msg)
        elif kind is p.Disconnect:
            self._evict(worker, DISCONNECTED)
        elif kind is p.Drain:
            worker.state = DRAINING
            log.info("worker %s is draining with %d in flight", worker.worker_id, worker.inflight)

    def _ask_to_register(self, peer: bytes) -> None:
        """Tell a peer we do not know (it registered with a broker before a restart)
        to register again: once, not for each of the stale messages it had queued."""
        if self.asked_to_register.allow(peer):
            self._post(self.backend, peer, p.encode_disconnect())

    # --- peers on the wrong socket --------------------------------------------

    def _tell_worker_wrong_endpoint(self, peer: bytes, frames: list[bytes]) -> bool:
        """A worker's READY on the client socket: refuse the worker, saying where to go."""
        try:
            is_ready = type(p.decode_from_worker(frames)) is p.Ready
        except p.ProtocolError:
            return False
        if is_ready:
            self._tell_wrong_endpoint(self.frontend, peer, b"", (
                f"{self.settings.frontend} is the broker's client endpoint (Broker.frontend); "
                f"workers connect to Broker.backend ({self.settings.backend})"))
        return is_ready

    def _tell_client_wrong_endpoint(self, peer: bytes, frames: list[bytes]) -> bool:
        """A client's REQUEST or STATS on the worker socket: fail it, saying where to go.
        (A client's HEARTBEAT looks like a worker's: it gets the DISCONNECT a worker
        unknown to the broker gets.)"""
        try:
            msg = p.decode_from_client(frames)
        except p.ProtocolError:
            return False
        if type(msg) is not p.Request and type(msg) is not p.StatsRequest:
            return False
        self._tell_wrong_endpoint(self.backend, peer, msg.rid, (
            f"{self.settings.backend} is the broker's worker endpoint (Broker.backend); "
            f"clients connect to Broker.frontend ({self.settings.frontend})"))
        return True

    def _tell_wrong_endpoint(self, sock: zmq.Socket, peer: bytes, rid: bytes, message: str) -> None:
        self._dropped("wrong endpoint", peer, f"a peer speaks to the wrong socket: {message}")
        if self.told_wrong_endpoint.allow(peer):
            self._post(sock, peer, p.encode_error(p.Error(rid, p.E_WRONG_ENDPOINT, message)))

    def _relay(self, worker: WorkerInfo, msg: p.Chunk | p.End) -> None:
        req = worker.requests.get(msg.rid)
        if req is None:
            self.drops.info("stray reply", f"dropped a reply from {worker.worker_id} for a "
                                           "request it does not hold", worker.peer)
            return
        if len(msg.chunks) + 3 > p.MAX_WORKER_REPLY_FRAMES:  # version, command, rid
            self._reject_oversized_reply(worker, req, p.MAX_WORKER_REPLY_FRAMES)
            return
        if not req.chunks:
            self._release_body(req)  # no retry now: its body will not be sent again
        req.chunks += len(msg.chunks)
        self.totals["chunks"] += len(msg.chunks)
        msg.rid = req.rid
        msg.worker_id = worker.worker_id
        self._post(self.frontend, req.client, p.encode_reply_to_client(msg))
        if type(msg) is p.End:
            self._finish(req, ok=True)

    def _relay_error(self, worker: WorkerInfo, msg: p.Error) -> None:
        req = worker.requests.get(msg.rid)
        if req is None:
            self.drops.info("stray reply", f"dropped an error from {worker.worker_id} for a "
                                           "request it does not hold", worker.peer)
            return
        self._reply_error(req.client, req.rid, msg.code, msg.message)
        self._finish(req, ok=False)

    def _register(self, peer: bytes, known: WorkerInfo | None, msg: p.Ready) -> None:
        most = self.settings.max_services_per_worker
        if len(msg.services) > most:
            self._refuse(peer, p.E_LIMIT,
                         f"READY declares {len(msg.services)} services; the broker takes at "
                         f"most {most} (Broker.max_services_per_worker)")
            return
        holder = self.registry.by_id.get(msg.worker_id)
        if holder is not None and holder.peer != peer:
            if not self._may_take_id(holder, msg.token):
                self._refuse(peer, p.E_ID_IN_USE,
                             f"worker id {msg.worker_id!r} is in use by a live worker")
                return
            self._evict(holder, "replaced by a new registration")
        if known is not None:
            if (known.worker_id, known.services, known.capacity, known.token) == (
                    msg.worker_id, msg.services, msg.capacity, msg.token):
                known.last_seen = time.monotonic()
                return  # a repeated READY changes nothing
            self._evict(known, "registered again with new settings")
        if len(self.registry.by_id) >= self.settings.max_workers:
            self._refuse(peer, p.E_LIMIT, f"the broker has its most live workers, "
                                          f"{self.settings.max_workers} (Broker.max_workers)")
            return
        worker = WorkerInfo(msg.worker_id, peer, msg.services, msg.capacity, msg.token,
                            self._displaced_by(msg))
        self.registry.add(worker)
        log.info("worker %s ready for %s (capacity %s)", worker.worker_id,
                 ", ".join(worker.services), worker.capacity or "unlimited")
        for service in worker.services:
            self._pump(service)

    def _may_take_id(self, holder: WorkerInfo, token: str) -> bool:
        """Whether a READY may take a registered worker's id: the same worker process
        on a new connection may, and so may the worker that the holder took the id from
        while it was away; anyone else only if the holder's connection is gone."""
        if token and token in (holder.token, holder.displaced):
            return True
        return self._gone(self.backend, holder.peer)

    def _displaced_by(self, msg: p.Ready) -> str:
        """The token of the worker process whose id `msg` takes, if another had it last
        (that one may take it back), logged and counted; else empty."""
        previous = self.registry.departed.get(msg.worker_id)
        if previous is None or previous.token == msg.token:
            return ""  # a new id, or the same process on a new connection
        self.totals["id_changes"] += 1
        log.warning("worker id %s changed hands: another worker process registered under it",
                    msg.worker_id)
        return "" if msg.token and msg.token == previous.displaced else previous.token

    def _refuse(self, peer: bytes, code: str, message: str) -> None:
        """Refuse a worker's READY: an ERROR with an empty request id."""
        self.drops.warn("refused", f"refused READY: {message}", peer)
        self._post(self.backend, peer, p.encode_error(p.Error(b"", code, message)))

    def _evict(self, worker: WorkerInfo, reason: str) -> None:
        """Forget a worker; retry its requests that have sent nothing yet."""
        if worker.state == EVICTED:
            return
        self.registry.remove(worker)
        self.totals["evictions"] += 1
        level = logging.INFO if reason == DISCONNECTED else logging.WARNING
        log.log(level, "worker %s evicted: %s (%d in flight)", worker.worker_id, reason,
                worker.inflight)
        for req in list(worker.requests.values()):
            worker.requests.pop(req.token)
            worker.inflight -= 1
            worker.failed += 1
            req.worker = None
            if req.chunks == 0 and req.policy == DIRECT:  # it existed: lost, not "no such"
                self._fail(req, p.E_WORKER_LOST, f"worker {worker.worker_id!r} was lost before "
                                                 f"its first chunk ({reason})")
            elif req.chunks == 0 and req.retries < self.settings.max_retries:
                req.retries += 1
                self.totals["retries"] += 1
                self._dispatch(req)
            else:
                self._fail(req, p.E_WORKER_LOST, f"worker {worker.worker_id!r} was lost mid-request")
        self.registry.remember(worker)

    # --- timers --------------------------------------------------------------

    def _on_timers(self, now: float) -> None:
        current_tick = int(now / DEADLINE_TICK)
        while self._checked_tick < current_tick:
            self._checked_tick += 1
            for token in self.deadlines.pop(self._checked_tick, ()):
                req = self.requests.get(token)
                if req is not None:
                    self.totals["timeouts"] += 1
                    self._fail(req, p.E_TIMEOUT, "request deadline expired")
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.settings.heartbeat_interval
            self._heartbeat(now)
        self._expire_queued(now)
        self._answer_waiting_stats(now)

    def _heartbeat(self, now: float) -> None:
        limit = self.settings.heartbeat_interval * self.settings.heartbeat_misses
        beat = p.encode_heartbeat(p.Heartbeat(self.boot_id))
        for worker in list(self.registry.by_id.values()):
            if now - worker.last_seen > limit:
                self._evict(worker, f"no heartbeat for {now - worker.last_seen:.1f} s")
            else:
                self._post(self.backend, worker.peer, beat)
        for client in self.reply_bytes.measure_all():
            self._mark_sent(client, beat)

    def _mark_sent(self, client: bytes, beat: list[bytes]) -> None:
        """Send a tracked HEARTBEAT after the last bytes sent to a client, so that the broker
        learns when they have left, and forgets the client once it is gone."""
        if not self._send(self.frontend, client, beat, track=True):
            self.reply_bytes.forget(client)

    def _expire_queued(self, now: float) -> None:
        limit = self.settings.queue_timeout
        for queue in list(self.queues.values()):
            while queue and now - queue[0].queued_at >= limit:
                self._fail_unavailable(queue[0], f"waited Broker.queue_timeout: {limit:g} s",
                                       self.drain_rates[queue[0].service].wait(len(queue)))
        for service, rate in list(self.drain_rates.items()):
            if not rate.update(now, service in self.queues):
                del self.drain_rates[service]  # services named by clients must not pile up

    def _fail_unavailable(self, req: Request, detail: str, wait: float = 0.0) -> None:
        if req.policy == DIRECT:
            target = self.registry.by_id.get(req.target)
            if target is None or target.state != READY:
                self._fail(req, p.E_NO_SUCH_WORKER, f"worker {req.target!r} is gone")
                return
        elif not self.registry.serving(req.service):
            self._fail(req, p.E_NO_WORKERS, f"no worker serves {req.service!r} ({detail})")
        else:
            message = f"every worker of {req.service!r} is busy ({detail})"
            if wait:  # advertised no longer than a request would wait in the queue
                message = p.with_retry_after(message, min(wait, self.settings.queue_timeout))
            self._fail(req, p.E_QUEUE_FULL, message)

    # --- stats ---------------------------------------------------------------

    def _store_report(self, peer: bytes, msg: p.Report) -> None:
        size = len(orjson.dumps(msg.counters))  # what it adds to every STATS reply
        problem = self.reports.store(msg.name, msg.counters, size, time.monotonic())
        if problem:
            self.totals["reports_refused"] += 1
            self.drops.warn("report refused", f"ignored the report of {msg.name!r}: {problem}",
                            peer)

    def _answer_stats(self, client: bytes, rid: bytes) -> None:
        """A client's first FRESH_STATS STATS in a Broker.stats_interval are answered at
        once; the next ones wait for the next build, which every waiting STATS shares.
        Every answer shows the state after its STATS arrived, and a client that asks in a
        loop cannot make the broker build stats more than once per interval."""
        if self.fresh_stats.allow(client):
            self._post(self.frontend, client, p.encode_stats_reply(p.StatsReply(rid, self.stats())))
        elif self.stats_waiting_by_client.get(client, 0) >= MAX_STATS_WAITING_PER_CLIENT:
            self._reply_error(client, rid, p.E_LIMIT, f"{MAX_STATS_WAITING_PER_CLIENT} STATS of "
                              "this client are waiting already: ask again later")
        elif len(self.stats_waiting) >= MAX_STATS_WAITING:
            self._reply_error(client, rid, p.E_LIMIT, f"{MAX_STATS_WAITING} STATS are waiting "
                              "already: ask again later")
        else:
            self.stats_waiting.append((client, rid))
            self.stats_waiting_by_client[client] = self.stats_waiting_by_client.get(client, 0) + 1

    def _answer_waiting_stats(self, now: float) -> None:
        if not self.stats_waiting or now < self._next_stats_build:
            return
        self._next_stats_build = now + self.settings.stats_interval
        stats = orjson.dumps(self.stats())  # once for every reply: a build can be MiBs
        waiting, self.stats_waiting = self.stats_waiting, []
        self.stats_waiting_by_client = {}
        for client, rid in waiting:
            self._post(self.frontend, client, p.encode_encoded_stats_reply(rid, stats))

    def stats(self) -> dict:
        now = time.monotonic()
        live, departed = self.registry.by_id, self.registry.departed
        shown = heapq.nsmallest(self.settings.stats_max_workers, [*live, *departed])
        workers = [live[i].stats(now) if i in live else departed[i].stats for i in shown]
        queued_now = {service: len(q) for service, q in self.queues.items() if q}
        queue_depth = sum(queued_now.values())
        return {
            "broker": {
                **self.totals,
                "inflight": len(self.requests) - queue_depth,  # on a worker now
                "queue_depth": queue_depth,
                "queue_depth_by_service": queued_now,
                "queue_wait_s_total": round(self.queue_wait_total, 6),
                "body_bytes": self.body_bytes,
                "reply_bytes": self.reply_bytes.total,
                "uptime_s": round(now - self.started, 3),
                "boot_id": self.boot_id.hex(),
                "workers_ready": sum(w.state == READY for w in live.values()),
                "workers_live": len(live),
                "workers_departed": len(departed),
                "workers_truncated": len(shown) < len(live) + len(departed),
            },
            "workers": workers,  # the first Broker.stats_max_workers by id
            "gateways": self.reports.current(now),
        }
