"""The broker's rules, with no sockets and no clock: what the loop in broker/server.py
feeds with what it reads, and whose output it sends.

Events come in as calls, each with the time it happened (`now`, in seconds of a
monotonic clock): a ZeroMQ message from a client or a worker, a tick of the clock, a peer
that a send could not reach, a client connection that closed. What the broker has to
send collects per side and peer, in order, in `to_clients` and `to_workers`; the loop
takes it with take_outgoing(). What only the sockets know, the core asks of the
`Connections` it is given (is a peer's connection gone?) or is told by the loop (what a
send to a client cost, and the tracker that tells when libzmq has let go of it).
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import deque
from typing import Any, Callable, Mapping, Protocol, Sequence

import orjson

from zroute import protocol as p
from broker.policies import Policy, load_policies, unknown_policy
from zroute.protocol import DEFAULT_POLICY, DIRECT, request_token
from zroute.ratelimit import LogLimiter, PeerLimiter
from broker.registry import WORKER_DRAINING, WORKER_EVICTED, WORKER_READY, Registry, WorkerInfo
from broker.reports import Reports
from zroute.settings import CLIENTS, WORKERS, BrokerSettings
from zroute.unreleased import MARK_BYTES, Tracker, UnreleasedByPeer

log = logging.getLogger("zroute.broker")

DISCONNECTED = "disconnected"  # the eviction reason of a worker that said goodbye
DEADLINE_TICK = 0.05  # deadlines are kept in buckets of this many seconds
FRESH_STATS = 5  # STATS of a client answered at once per Broker.stats_interval
LISTED_WORKERS = 10  # worker ids an unknown direct target's error lists
MAX_STATS_WAITING = 10_000  # STATS waiting for the next shared build, from all clients
MAX_STATS_WAITING_PER_CLIENT = 100  # and from one client
UNSERVED = "\n"  # a name no worker can register: the waiting STATS of a service none serves
DRAIN_RATE_INTERVAL = 0.5  # seconds over which a queue's drain rate is measured
# What a client that reads may seem to hold: the bytes since the last tracked message to
# it, and the message being sent.
READER_SLACK = MARK_BYTES + p.MAX_BATCH_BYTES
WRONG_ENDPOINT_ANSWERS = 10  # per peer per second, to a peer on the wrong socket or a bad READY

Outbox = dict[bytes, list[list[bytes]]]  # peer -> its messages, in order


class Connections(Protocol):
    """What only the sockets know: whether a peer's connection is gone, so that it cannot
    be sent anything. A peer whose queue is full is there, only behind: not gone."""

    def client_gone(self, client: bytes) -> bool: ...

    def worker_gone(self, worker: bytes) -> bool: ...


class HeldRequest:
    """A request the broker holds, from arrival until its END, ERROR or CANCEL."""

    __slots__ = ("token", "client", "rid", "service", "body", "policy", "target",
                 "worker", "chunks", "retries", "arrived", "queued_at", "waiting_since",
                 "deadline_tick")

    def __init__(self, token: bytes, client: bytes, m: p.Request, policy: str,
                 arrived: float, deadline_tick: int) -> None:
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
        self.arrived = arrived
        self.queued_at: float | None = None  # since when it is in the queue, if it is
        # Since when it has waited for a worker: first queued, or first refused over a
        # worker's capacity. Broker.queue_timeout counts from then, however often a
        # worker refuses it.
        self.waiting_since: float | None = None
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


class BrokerCore:
    """Routes requests from clients to workers and streams the replies back.

    `settings` is the `Broker` section of the configuration (zroute/settings.py).
    `policies` are those that requests may name (default: the built-in ones);
    "direct" is always valid besides them. `now` is the time it starts, and `boot_id`
    names this run of the broker in its heartbeats (a client that sees it change knows
    the broker restarted).
    """

    def __init__(self, settings: BrokerSettings, connections: Connections, now: float,
                 boot_id: bytes, policies: Mapping[str, Policy] | None = None) -> None:
        self.settings = settings
        self.connections = connections
        self.now = now  # the time of the event being handled
        self.registry = Registry(settings.max_departed_workers)
        self.policies = dict(policies) if policies is not None else load_policies()
        self.requests: dict[bytes, HeldRequest] = {}
        self.reports = Reports(settings.heartbeat_interval * settings.heartbeat_misses)
        self.queues: dict[str, deque[HeldRequest]] = {}
        self.drain_rates: dict[str, DrainRate] = {}  # of the services with a queue lately
        self.requests_by_client: dict[bytes, int] = {}  # held by the broker, queued or not
        self.queued_by_client: dict[bytes, int] = {}
        # Bodies the broker may still have to send (queued, or on a worker before its
        # first chunk, for a retry), and replies libzmq still holds for each client.
        self.body_bytes = 0
        self.body_bytes_by_client: dict[bytes, int] = {}
        self.reply_bytes = UnreleasedByPeer()
        self.fresh_stats = PeerLimiter(settings.stats_interval, FRESH_STATS)
        # (client, rid, service asked about) of deferred STATS
        self.stats_waiting: list[tuple[bytes, bytes, str]] = []
        self.stats_waiting_by_client: dict[bytes, int] = {}
        self._next_stats_build = 0.0
        # Deadlines in buckets, so that a finished request is forgotten at once.
        self.deadlines: dict[int, set[bytes]] = {}
        self._checked_tick = int(now / DEADLINE_TICK)
        self.boot_id = boot_id
        self.started = now
        self.totals = dict.fromkeys(
            ("requests", "completed", "failed", "cancelled", "chunks", "errors", "retries",
             "refusals", "timeouts", "evictions", "queued", "rejected_frames", "oversized_messages",
             "id_changes", "clients_gone", "reports_refused", "auth_failures",
             "handshake_failures"), 0)
        self.auth_failures_by_role = dict.fromkeys((WORKERS, CLIENTS), 0)
        self.handshake_failures_by_role = dict.fromkeys((WORKERS, CLIENTS), 0)
        self.queue_wait_total = 0.0
        self.drops = LogLimiter(log, clock=lambda: self.now)
        self.asked_to_register = PeerLimiter(settings.heartbeat_interval)
        self.told_wrong_endpoint = PeerLimiter(1.0, WRONG_ENDPOINT_ANSWERS)
        self.told_bad_ready = PeerLimiter(1.0, WRONG_ENDPOINT_ANSWERS)
        self.stopping = False
        self._next_heartbeat = 0.0
        # What the broker has to send, until the loop takes it.
        self.to_clients: Outbox = {}
        self.to_workers: Outbox = {}
        # Each message type that a peer may send, and what handles it: a missing one is a
        # KeyError, never a message mistaken for another. A worker's READY is handled
        # apart, since it is the one message that a worker the broker does not know may
        # send.
        self.client_handlers: dict[type, Callable[[bytes, Any], None]] = {
            p.Request: self._accept,
            p.Cancel: self._cancel,
            p.StatsRequest: self._answer_stats,
            p.Report: self._store_report,
            p.Heartbeat: self._answer_heartbeat,
        }
        self.worker_handlers: dict[type, Callable[[WorkerInfo, Any], None]] = {
            p.Chunk: self._relay,
            p.End: self._relay,
            p.Error: self._relay_error,
            p.Heartbeat: self._heard,
            p.Disconnect: self._said_goodbye,
            p.Drain: self._start_draining,
        }

    # --- what the loop takes -------------------------------------------------

    def take_outgoing(self) -> tuple[Outbox, Outbox]:
        """What to send to clients and to workers, per peer in order; the core starts
        collecting anew."""
        to_clients, to_workers = self.to_clients, self.to_workers
        self.to_clients, self.to_workers = {}, {}
        return to_clients, to_workers

    @staticmethod
    def _post(outbox: Outbox, peer: bytes, frames: list[bytes]) -> None:
        queue = outbox.get(peer)
        if queue is None:
            outbox[peer] = [frames]
        else:
            queue.append(frames)

    # --- events from the loop ------------------------------------------------

    def on_client(self, peer: bytes, frames: list[bytes], now: float) -> None:
        """A message from a client (the loop unpacks a BATCH: one call per message)."""
        self.now = now
        try:
            msg = p.decode_from_client(frames)
        except p.ProtocolError as e:
            if not self._tell_worker_wrong_endpoint(peer, frames):
                self._reject_client_frames(peer, frames, e)
            return
        self.client_handlers[type(msg)](peer, msg)

    def on_worker(self, peer: bytes, frames: list[bytes], now: float) -> None:
        """A message from a worker (the loop unpacks a BATCH: one call per message)."""
        self.now = now
        try:
            msg = p.decode_from_worker(frames)
        except p.ProtocolError as e:
            if not self._tell_client_wrong_endpoint(peer, frames):
                self._dropped("malformed", peer, f"dropped a malformed message from a worker: {e}")
                if frames[:2] == [p.VERSION, p.READY] and self.told_bad_ready.allow(peer, now):
                    self._refuse(peer, p.E_BAD_REQUEST, f"READY refused: {e}")
            return
        worker = self.registry.by_peer.get(peer)
        if type(msg) is p.Ready:
            self._register(peer, worker, msg)
        elif worker is None:
            self._ask_to_register(peer)
        else:
            worker.last_seen = now
            self.worker_handlers[type(msg)](worker, msg)

    def malformed_batch(self, peer: bytes, error: p.ProtocolError, now: float) -> None:
        """A BATCH from a client or a worker that does not unpack: dropped, all of it."""
        self.now = now
        self._dropped("malformed", peer, f"dropped a malformed BATCH: {error}")

    def client_oversized(self, peer: bytes, frames: list[bytes], now: float) -> None:
        """A client's message of more than MAX_FRAMES frames (`frames`, its first ones):
        fail the request it names, if any."""
        self.now = now
        problem = self._oversized(peer, p.MAX_FRAMES)
        rid = _named_rid(frames)
        if 0 < len(rid) <= p.MAX_CLIENT_RID:
            self._reply_error(peer, rid, p.E_LIMIT, f"the broker takes no {problem}")

    def worker_oversized(self, peer: bytes, frames: list[bytes], now: float) -> None:
        """A worker's message of more than MAX_FRAMES frames (`frames`, its first ones):
        fail the request it names, if any."""
        self.now = now
        worker = self.registry.by_peer.get(peer)
        req = worker.requests.get(_named_rid(frames)) if worker is not None else None
        if req is None:
            self._oversized(peer, p.MAX_FRAMES)
        else:
            self._reject_oversized_reply(worker, req, p.MAX_FRAMES)

    def on_tick(self, now: float) -> None:
        """Time passed: deadlines, heartbeats and evictions, queue expiry, waiting STATS."""
        self.now = now
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

    def clients_disconnected(self, now: float) -> None:
        """Some client's connection closed: end the requests of every client the broker
        can no longer reach, before a peer that takes its routing id can be sent their
        replies. The sockets tell that a connection closed, not whose: the core asks,
        once per client with requests, whether it is gone."""
        self.now = now
        gone: dict[bytes, bool] = {}
        for req in list(self.requests.values()):
            if req.client not in gone:
                gone[req.client] = self.connections.client_gone(req.client)
            if gone[req.client]:
                self._finish(req, ok=False, cancel_worker=True)
        self.totals["clients_gone"] += sum(gone.values())

    def sent_to_client(self, client: bytes, size: int, tracker: Tracker | None,
                       sent_in_pass: int, now: float) -> bool:
        """The loop sent a client a message of `size` bytes, with a tracker or not
        (unreleased.Unreleased.wants_tracker says which); `sent_in_pass` bytes so far in
        this pass of the loop. Whether the client's replies pile up unread, so that its
        requests ended and the rest of what was for it is not to be sent."""
        self.now = now
        self.reply_bytes.add(client, size, tracker)
        return self._replies_pile_up(client, sent_in_pass)

    def client_unreachable(self, client: bytes, undelivered: list[list[bytes]],
                           now: float) -> None:
        """A client is gone or its queue is full: cancel what it was being sent. A client
        that held no request (one that asked for stats and left, say) costs nothing: not
        worth a warning."""
        self.now = now
        if client in self.requests_by_client:
            self.drops.warn("unreachable", "a client is gone or not reading; cancelling its "
                                           "requests", client)
        else:
            log.debug("a client without requests is gone or not reading")
        self.reply_bytes.send_failed(client)
        for frames in undelivered:
            req = self.requests.get(request_token(client, frames[2])) if len(frames) > 2 else None
            if req is not None:
                self._finish(req, ok=False, cancel_worker=True)

    def worker_unreachable(self, peer: bytes, now: float) -> None:
        """A worker is gone or its queue is full: evict it."""
        self.now = now
        worker = self.registry.by_peer.get(peer)
        if worker is not None:
            self._evict(worker, "cannot be reached")

    def shutdown(self, now: float) -> None:
        """The broker stops: every request it holds fails, and none goes to a worker. They
        fail as with a broker that is lost: a client with another broker sends those that
        have had no chunk through it."""
        self.now = now
        self.stopping = True
        for req in list(self.requests.values()):
            self._fail(req, p.E_BROKER_UNREACHABLE, "the broker is shutting down")

    # --- input that is refused -----------------------------------------------

    def _dropped(self, kind: str, peer: bytes, reason: str) -> None:
        """Count a message that did not parse, and log it (rate-limited)."""
        self.totals["rejected_frames"] += 1
        self.drops.warn(kind, reason, peer)

    def _oversized(self, peer: bytes, most: int) -> str:
        """Count and log a message of more than `most` frames; say what it was."""
        self.totals["oversized_messages"] += 1
        problem = f"a message of more than {most} frames"
        self.drops.warn("oversized", f"rejected {problem}", peer)
        return problem

    def _reject_oversized_reply(self, worker: WorkerInfo, req: HeldRequest, most: int) -> None:
        problem = self._oversized(worker.peer, most)
        self._fail(req, p.E_LIMIT, f"worker {worker.worker_id!r} replied with {problem}")

    def peer_refused(self, role: str, address: str, key: str, now: float) -> None:
        """A peer that CURVE kept out of the socket of `role` (WORKERS or CLIENTS): its
        key is not in that socket's allowlist. Counted, and logged (rate-limited) with
        its address and public key, so that it can be found or let in."""
        self.now = now
        self.totals["auth_failures"] += 1
        self.auth_failures_by_role[role] += 1
        setting = "curve_workers_dir" if role == WORKERS else "curve_clients_dir"
        self.drops.warn("auth failed", (
            f"refused a {role.removesuffix('s')} at {address or 'an unknown address'}: its "
            f"public key {key} is not in Broker.{setting} ({self.settings.allowlist(role)})"),
            address.encode())

    def handshake_failed(self, role: str, problem: str, now: float) -> None:
        """A peer's CURVE handshake with the socket of `role` failed before its key could
        be judged: `problem` says what it lacks. Counted, and logged (rate-limited)."""
        self.now = now
        self.totals["handshake_failures"] += 1
        self.handshake_failures_by_role[role] += 1
        endpoint = "backend" if role == WORKERS else "frontend"
        self.drops.warn("handshake failed", f"a {role.removesuffix('s')} failed its CURVE "
                        f"handshake with Broker.{endpoint}: {problem}", role.encode())

    # --- peers on the wrong socket -------------------------------------------

    def _tell_worker_wrong_endpoint(self, peer: bytes, frames: list[bytes]) -> bool:
        """A worker's READY on the client socket: refuse the worker, saying where to go."""
        try:
            is_ready = type(p.decode_from_worker(frames)) is p.Ready
        except p.ProtocolError:
            return False
        if is_ready:
            self._tell_wrong_endpoint(self.to_clients, peer, b"", (
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
        self._tell_wrong_endpoint(self.to_workers, peer, msg.rid, (
            f"{self.settings.backend} is the broker's worker endpoint (Broker.backend); "
            f"clients connect to Broker.frontend ({self.settings.frontend})"))
        return True

    def _tell_wrong_endpoint(self, outbox: Outbox, peer: bytes, rid: bytes, message: str) -> None:
        self._dropped("wrong endpoint", peer, f"a peer speaks to the wrong socket: {message}")
        if self.told_wrong_endpoint.allow(peer, self.now):
            self._post(outbox, peer, p.encode_error(p.Error(rid, p.E_WRONG_ENDPOINT, message)))

    # --- clients -------------------------------------------------------------

    def _reject_client_frames(self, peer: bytes, frames: list[bytes], error: p.ProtocolError) -> None:
        """Answer a malformed request with ERROR if it names a request id; else drop it."""
        self._dropped("malformed", peer, f"dropped a malformed message from a client: {error}")
        rid = _named_rid(frames)
        if 0 < len(rid) <= p.MAX_CLIENT_RID:
            self._post(self.to_clients, peer,
                       p.encode_error(p.Error(rid, p.E_BAD_REQUEST, str(error))))

    def _answer_heartbeat(self, client: bytes, _: p.Heartbeat) -> None:
        self._post(self.to_clients, client, p.encode_heartbeat(p.Heartbeat(self.boot_id)))

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
        tick = math.ceil((self.now + timeout) / DEADLINE_TICK)
        req = HeldRequest(token, client, m, policy, self.now, tick)
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

    def _release_body(self, req: HeldRequest) -> None:
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
        self._post(self.to_clients, client, p.encode_error(p.Error(rid, code, message)))

    def _cancel(self, client: bytes, msg: p.Cancel) -> None:
        req = self.requests.get(request_token(client, msg.rid))
        if req is None:
            self.drops.info("stray cancel", "CANCEL for a request the broker does not hold", client)
            return
        self.totals["cancelled"] += 1
        self._finish(req, ok=False, cancel_worker=True)

    # --- routing -------------------------------------------------------------

    def _dispatch(self, req: HeldRequest, first: bool = False) -> None:
        """Send a request to a worker, queue it (at the head if `first`), or fail it."""
        worker = self._pick(req, first)
        if worker is not None:
            self._assign(req, worker)

    def _pick(self, req: HeldRequest, first: bool = False) -> WorkerInfo | None:
        """The worker for `req` now, or None once it is queued (at the head if `first`) or
        failed."""
        if req.policy == DIRECT:
            worker = self.registry.by_id.get(req.target)
            if worker is None or req.service not in worker.services or worker.state != WORKER_READY:
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
        self._enqueue(req, first)
        return None

    def _choose(self, req: HeldRequest, candidates: Sequence[WorkerInfo]) -> WorkerInfo | None:
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

    def _assign(self, req: HeldRequest, worker: WorkerInfo) -> None:
        req.worker = worker
        worker.inflight += 1
        worker.requests[req.token] = req
        self._post(self.to_workers, worker.peer,
                   p.encode_request_to_worker(p.Request(req.token, req.service, req.body)))

    def _enqueue(self, req: HeldRequest, first: bool = False) -> None:
        """Wait for a worker with room, or for a first worker (while workers start);
        unless the queue is full, the client has its share of it, or the queue drains
        too slowly for the request to leave it before Broker.queue_timeout. `first`: at
        the head of the queue (a request a worker refused came before those waiting)."""
        waiting = len(self.queues.get(req.service, ()))
        rate = self.drain_rates.get(req.service)
        wait = rate.wait(1 if first else waiting + 1) if rate is not None else 0.0
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
            req.queued_at = self.now
            if req.waiting_since is None:
                req.waiting_since = self.now
            queue = self.queues.setdefault(req.service, deque())
            if first:
                queue.appendleft(req)
            else:
                queue.append(req)
            self.queued_by_client[req.client] = self.queued_by_client.get(req.client, 0) + 1
            if rate is None:
                self.drain_rates[req.service] = DrainRate(self.now)

    def _dequeue(self, req: HeldRequest) -> None:
        if req.queued_at is None:
            return
        self.queue_wait_total += self.now - req.queued_at
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
        while queue and not self.stopping:
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

    # --- request endings -----------------------------------------------------

    def _fail(self, req: HeldRequest, code: str, message: str) -> None:
        self._reply_error(req.client, req.rid, code, message)
        self._finish(req, ok=False, cancel_worker=True)

    def _finish(self, req: HeldRequest, *, ok: bool, cancel_worker: bool = False) -> None:
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
        worker.full = False  # it has a slot free now, if no other broker takes it first
        if ok:
            worker.completed += 1
            worker.latencies.append(self.now - req.arrived)
        else:
            worker.failed += 1
        if cancel_worker and worker.state != WORKER_EVICTED:
            self._post(self.to_workers, worker.peer, p.encode_cancel(p.Cancel(req.token)))
        for service in worker.services:
            self._pump(service)

    # --- workers -------------------------------------------------------------

    def _heard(self, worker: WorkerInfo, msg: p.Heartbeat) -> None:
        """A HEARTBEAT says that the worker is there, as every message does, and may count
        the requests it runs from every broker: the load that policies see, the room
        that other brokers leave it, and whether a worker that refused one over its
        capacity has room again. A HEARTBEAT that counts nothing says nothing of other
        brokers."""
        had_room = worker.has_room
        worker.inflight_elsewhere = max(0, (msg.inflight or 0) - worker.inflight)
        if worker.full and (msg.inflight is None or worker.capacity == 0
                            or msg.inflight < worker.capacity):
            worker.full = False
        if worker.has_room and not had_room:
            for service in worker.services:
                self._pump(service)

    def _said_goodbye(self, worker: WorkerInfo, _: p.Disconnect) -> None:
        self._evict(worker, DISCONNECTED)

    def _start_draining(self, worker: WorkerInfo, _: p.Drain) -> None:
        worker.state = WORKER_DRAINING
        log.info("worker %s is draining with %d in flight", worker.worker_id, worker.inflight)

    def _ask_to_register(self, peer: bytes) -> None:
        """Tell a peer we do not know (it registered with a broker before a restart)
        to register again: once, not for each of the stale messages it had queued."""
        if self.asked_to_register.allow(peer, self.now):
            self._post(self.to_workers, peer, p.encode_disconnect())

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
        self._post(self.to_clients, req.client, p.encode_reply_to_client(msg))
        if type(msg) is p.End:
            self._finish(req, ok=True)

    def _relay_error(self, worker: WorkerInfo, msg: p.Error) -> None:
        req = worker.requests.get(msg.rid)
        if req is None:
            self.drops.info("stray reply", f"dropped an error from {worker.worker_id} for a "
                                           "request it does not hold", worker.peer)
            return
        if msg.code == p.E_WORKER_FULL and not req.chunks:
            self._refused(worker, req)
            return
        self._reply_error(req.client, req.rid, msg.code, msg.message)
        self._finish(req, ok=False)

    def _refused(self, worker: WorkerInfo, req: HeldRequest) -> None:
        """The worker runs its capacity already (other brokers sent it work since its
        last heartbeat): it is full until it says otherwise, and the request goes to
        another worker or waits at the head of the queue, for as long as any queued
        request may wait. The broker sends a worker it takes for full nothing until the
        worker says it has room, so a worker that refuses everything costs one dispatch
        per message it sends, and a request bounces for Broker.queue_timeout at most."""
        worker.requests.pop(req.token)
        worker.inflight -= 1
        worker.full = True
        worker.refusals += 1
        self.totals["refusals"] += 1
        self.drops.info("refused", f"worker {worker.worker_id} refused a request over its "
                        f"capacity ({worker.refusals} so far): other brokers filled it since "
                        "its last heartbeat, or it miscounts", worker.peer)
        req.worker = None
        if req.waiting_since is None:
            req.waiting_since = self.now
        if self.now - req.waiting_since >= self.settings.queue_timeout:
            self._waited_too_long(req, 1)
        else:
            self._dispatch(req, first=True)

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
                known.last_seen = self.now
                return  # a repeated READY changes nothing
            self._evict(known, "registered again with new settings")
        if len(self.registry.by_id) >= self.settings.max_workers:
            self._refuse(peer, p.E_LIMIT, f"the broker has its most live workers, "
                                          f"{self.settings.max_workers} (Broker.max_workers)")
            return
        worker = WorkerInfo(msg.worker_id, peer, msg.services, msg.capacity, msg.token,
                            self._displaced_by(msg), last_seen=self.now)
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
        return self.connections.worker_gone(holder.peer)

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
        self._post(self.to_workers, peer, p.encode_error(p.Error(b"", code, message)))

    def _evict(self, worker: WorkerInfo, reason: str) -> None:
        """Forget a worker; retry its requests that have sent nothing yet."""
        if worker.state == WORKER_EVICTED:
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
        self.registry.remember(worker, self.now)

    # --- timers --------------------------------------------------------------

    def _heartbeat(self, now: float) -> None:
        limit = self.settings.heartbeat_interval * self.settings.heartbeat_misses
        beat = p.encode_heartbeat(p.Heartbeat(self.boot_id))
        for worker in list(self.registry.by_id.values()):
            if now - worker.last_seen > limit:
                self._evict(worker, f"no heartbeat for {now - worker.last_seen:.1f} s")
            else:
                self._post(self.to_workers, worker.peer, beat)
        # A tracked HEARTBEAT after the last bytes sent to a client, so that the broker
        # learns when they have left, and forgets the client once it is gone.
        for client in self.reply_bytes.measure_all():
            self._post(self.to_clients, client, beat)

    def _expire_queued(self, now: float) -> None:
        limit = self.settings.queue_timeout
        for queue in list(self.queues.values()):
            while queue and now - queue[0].waiting_since >= limit:
                self._waited_too_long(queue[0], len(queue))
        for service, rate in list(self.drain_rates.items()):
            if not rate.update(now, service in self.queues):
                del self.drain_rates[service]  # services named by clients must not pile up

    def _waited_too_long(self, req: HeldRequest, waiting: int) -> None:
        """Fail a request that waited Broker.queue_timeout for a worker, `waiting` requests
        of its service being in the queue with it."""
        rate = self.drain_rates.get(req.service)
        limit = self.settings.queue_timeout
        self._fail_unavailable(req, f"waited Broker.queue_timeout: {limit:g} s",
                               rate.wait(waiting) if rate is not None else 0.0)

    def _fail_unavailable(self, req: HeldRequest, detail: str, wait: float) -> None:
        if req.policy == DIRECT:
            target = self.registry.by_id.get(req.target)
            if target is None or target.state != WORKER_READY:
                self._fail(req, p.E_NO_SUCH_WORKER, f"worker {req.target!r} is gone")
                return
        if not self.registry.serving(req.service):
            self._fail(req, p.E_NO_WORKERS, f"no worker serves {req.service!r} ({detail})")
        else:
            message = f"every worker of {req.service!r} is busy ({detail})"
            if wait:  # advertised no longer than a request would wait in the queue
                message = p.with_retry_after(message, min(wait, self.settings.queue_timeout))
            self._fail(req, p.E_QUEUE_FULL, message)

    # --- stats ---------------------------------------------------------------

    def _store_report(self, peer: bytes, msg: p.Report) -> None:
        size = len(orjson.dumps(msg.counters))  # what it adds to every STATS reply
        problem = self.reports.store(msg.name, msg.counters, size, self.now)
        if problem:
            self.totals["reports_refused"] += 1
            self.drops.warn("report refused", f"ignored the report of {msg.name!r}: {problem}",
                            peer)

    def _answer_stats(self, client: bytes, msg: p.StatsRequest) -> None:
        """A client's first FRESH_STATS STATS in a Broker.stats_interval are answered at
        once; the next ones wait for the next build, which every waiting STATS shares.
        Every answer shows the state after its STATS arrived, and a client that asks in a
        loop cannot make the broker build stats more than once per interval."""
        rid = msg.rid
        if self.fresh_stats.allow(client, self.now):
            self._post(self.to_clients, client,
                       p.encode_stats_reply(p.StatsReply(rid, self.stats(self.now, msg.service))))
        elif self.stats_waiting_by_client.get(client, 0) >= MAX_STATS_WAITING_PER_CLIENT:
            self._reply_error(client, rid, p.E_LIMIT, f"{MAX_STATS_WAITING_PER_CLIENT} STATS of "
                              "this client are waiting already: ask again later")
        elif len(self.stats_waiting) >= MAX_STATS_WAITING:
            self._reply_error(client, rid, p.E_LIMIT, f"{MAX_STATS_WAITING} STATS are waiting "
                              "already: ask again later")
        else:
            self.stats_waiting.append((client, rid, msg.service))
            self.stats_waiting_by_client[client] = self.stats_waiting_by_client.get(client, 0) + 1

    def _answer_waiting_stats(self, now: float) -> None:
        if not self.stats_waiting or now < self._next_stats_build:
            return
        self._next_stats_build = now + self.settings.stats_interval
        # Built once for every reply that asks the same (a build can be MiBs): so at most
        # once per service a worker serves, once for all the others, and once whole.
        builds: dict[str, bytes] = {}
        waiting, self.stats_waiting = self.stats_waiting, []
        self.stats_waiting_by_client = {}
        for client, rid, service in waiting:
            if service and service not in self.registry.by_service:
                service = UNSERVED
            stats = builds.get(service)
            if stats is None:
                stats = builds[service] = orjson.dumps(self.stats(now, service))
            self._post(self.to_clients, client, p.encode_encoded_stats_reply(rid, stats))

    def stats(self, now: float, service: str = "") -> dict:
        """What a STATS reply carries, as of `now`: the first Broker.stats_max_workers
        workers by id, departed ones included; or with `service`, those of the live
        workers of that service, and no gateways' reports."""
        live, departed = self.registry.by_id, self.registry.departed
        if service:
            candidates = [w.worker_id for w in self.registry.by_service.get(service, ())]
        else:
            candidates = [*live, *departed]
        shown = heapq.nsmallest(self.settings.stats_max_workers, candidates)
        workers = [live[i].stats(now) if i in live else departed[i].stats for i in shown]
        queued_now = {service: len(q) for service, q in self.queues.items() if q}
        queue_depth = sum(queued_now.values())
        return {
            "broker": {
                **self.totals,
                "inflight": len(self.requests) - queue_depth,  # on a worker now
                "queue_depth": queue_depth,
                "queue_depth_by_service": queued_now,
                "auth_failures_by_role": dict(self.auth_failures_by_role),
                "handshake_failures_by_role": dict(self.handshake_failures_by_role),
                "queue_wait_s_total": round(self.queue_wait_total, 6),
                "body_bytes": self.body_bytes,
                "reply_bytes": self.reply_bytes.total,
                "uptime_s": round(now - self.started, 3),
                "boot_id": self.boot_id.hex(),
                "workers_ready": sum(w.state == WORKER_READY for w in live.values()),
                "workers_live": len(live),
                "workers_departed": len(departed),
                "workers_truncated": len(shown) < len(candidates),
            },
            "workers": workers,
            "gateways": {} if service else self.reports.current(now),
        }


def _named_rid(frames: list[bytes]) -> bytes:
    """The request id a message names in its third frame, whatever else is wrong with
    it; empty if it names none."""
    return frames[2] if len(frames) > 2 and frames[0] == p.VERSION else b""
