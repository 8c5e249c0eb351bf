"""The broker's ZeroMQ loop: a ROUTER for clients, a ROUTER for workers, and a
BrokerCore (broker/core.py) that decides what goes where.

A single thread runs a poll loop. Each readable socket is read in batches with NOBLOCK
and what it carries goes to the core; then the timers tick, and what the core produced
is sent. Every send is NOBLOCK, so that no peer can stall the loop: a peer whose queue
is full, or that has gone, is reported to the core, which fails its requests only.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Mapping

import zmq
from zmq.utils.monitor import parse_monitor_message

from zroute import protocol as p
from broker.auth import BrokerAuth
from broker.core import BrokerCore
from broker.policies import Policy
from zroute.curve import CurveError
from zroute.settings import CLIENTS, WORKERS, BrokerSettings
from zroute.zmqio import (TooManyFrames, readable, recv_frames, send_to, send_to_tracked,
                          track_every_message)

log = logging.getLogger("zroute.broker")

# What one pass takes from a socket before it looks at the other, at timers and at what
# it has to send: so many messages (a BATCH counts those it carries), frames or bytes.
READ_MESSAGES = 2000
READ_FRAMES = 20_000
READ_BYTES = 8 << 20
SOCKET_HWM = 10_000  # messages queued per peer; past that a send fails and its request ends
POLL_MS = 50  # the loop wakes at least this often for timers and stop()
RELOAD_KEYS_S = 1.0  # how often the allowlists' directories are looked at for changes
HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
# What a failed CURVE handshake says of the peer (libzmq's monitor gives no address).
HANDSHAKE_PROBLEMS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "it has no CURVE keys",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "the public key it has for the broker is not "
                                           "the broker's",
}
# libzmq may report a client's connection closed a moment before its ROUTER lets go of
# the connection: until then the client does not count as gone. So after a disconnection
# the broker asks again, every RECHECK_GONE_S for RECHECK_GONE_FOR_S, rather than wait for
# an event that will not come while a new peer could take the routing id.
RECHECK_GONE_S = 0.05
RECHECK_GONE_FOR_S = 1.0


def _unreachable(error: zmq.ZMQError) -> bool:
    """Whether a failed send means the peer is gone (EHOSTUNREACH, with ROUTER_MANDATORY)
    or its queue is full (EAGAIN), rather than a fault of the broker's own."""
    return error.errno == zmq.EHOSTUNREACH or error.errno == zmq.EAGAIN


class Broker:
    """Routes requests from clients to workers and streams the replies back.

    `settings` is the `Broker` section of the configuration.
    `policies` are those that requests may name (default: the built-in ones);
    "direct" is always valid besides them.

    With Broker.curve_secret_key, both sockets take CURVE peers whose keys are in their
    allowlists only; the ZAP handler that checks them is the context's (one broker per
    context, then). Without it, an endpoint beyond loopback is refused (CurveError)
    unless Broker.insecure.
    """

    def __init__(self, settings: BrokerSettings, context: zmq.Context | None = None,
                 policies: Mapping[str, Policy] | None = None) -> None:
        self.settings = settings
        self.context = context or zmq.Context.instance()
        self._stopping = False
        self.auth = self._start_auth()  # before the sockets bind: see BrokerAuth
        self._next_reload = 0.0
        try:
            self.frontend = self._router(settings.frontend, CLIENTS)
            self.backend = self._router(settings.backend, WORKERS)
        except BaseException:
            if self.auth is not None:  # its thread holds the context's ZAP endpoint
                self.auth.stop()
            raise
        track_every_message(self.frontend)
        # Tells when a client's connection closes, so that its replies are not delivered
        # to the next peer that connects under its routing id; and, with CURVE, of the
        # handshakes that failed before the ZAP handler had a key to judge.
        curve_events = HANDSHAKE_FAILED if self.auth is not None else 0
        self.client_disconnects = self.frontend.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | curve_events)
        self.worker_handshakes = (self.backend.get_monitor_socket(curve_events)
                                  if curve_events else None)
        self._recheck_gone_until = self._next_gone_check = 0.0
        self.core = BrokerCore(settings, self, time.monotonic(), os.urandom(8), policies)
        self._readers = {self.frontend: (self.core.on_client, self.core.client_oversized),
                         self.backend: (self.core.on_worker, self.core.worker_oversized)}

    def _start_auth(self) -> BrokerAuth | None:
        settings = self.settings
        if not settings.curve_secret_key:
            problem = settings.exposure_problem()
            if problem:
                raise CurveError(problem)
            exposed = settings.exposed_endpoints()
            if exposed:
                log.warning("INSECURE: Broker.insecure is true and the broker has no CURVE "
                            "keys: anyone who reaches %s can register as a worker and receive "
                            "every request, or send requests as any client",
                            " or ".join(exposed))
            return None
        auth = BrokerAuth(self.context, settings)
        auth.start()
        return auth

    def _router(self, endpoint: str, role: str) -> zmq.Socket:
        sock = self.context.socket(zmq.ROUTER)
        if self.auth is not None:
            self.auth.secure(sock, role)
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
        if self.worker_handshakes is not None:
            poller.register(self.worker_handshakes, zmq.POLLIN)
        log.info("broker serving clients on %s, workers on %s%s",
                 self.settings.frontend, self.settings.backend,
                 ", with CURVE" if self.auth is not None else "")
        while not self._stopping:
            for sock, _ in poller.poll(POLL_MS):
                if sock is self.client_disconnects:
                    self._on_client_disconnects()
                elif sock is self.worker_handshakes:
                    self._take_handshake_failures(sock, WORKERS)
                else:
                    self._read(sock)
            now = time.monotonic()
            if self.auth is not None:
                self._watch_keys(now)
            self._recheck_gone_clients(now)
            self.core.on_tick(now)
            self._flush(now)
        self._shutdown()

    def stop(self) -> None:
        """Ask the loop to end; safe to call from a signal handler."""
        self._stopping = True

    def _shutdown(self) -> None:
        now = time.monotonic()
        self.core.shutdown(now)
        self._flush(now)
        self.frontend.disable_monitor()
        self.client_disconnects.close()
        if self.worker_handshakes is not None:
            self.backend.disable_monitor()
            self.worker_handshakes.close()
        self.frontend.close()
        self.backend.close()
        if self.auth is not None:
            self.auth.stop()
        log.info("broker stopped")

    def _watch_keys(self, now: float) -> None:
        """Count the peers that CURVE refused, and take in the allowlists' changes."""
        for refusal in self.auth.take_refusals():
            self.core.peer_refused(refusal.role, refusal.address, refusal.key, now)
        if now >= self._next_reload:
            self._next_reload = now + RELOAD_KEYS_S
            self.auth.reload()

    # --- reading -------------------------------------------------------------

    def _read(self, sock: zmq.Socket) -> None:
        """Pass what waits on a socket to the core, up to one pass's share."""
        handle, handle_oversized = self._readers[sock]
        clock = time.monotonic
        messages_left, frames_left, bytes_left = READ_MESSAGES, READ_FRAMES, READ_BYTES
        while messages_left > 0 and frames_left > 0 and bytes_left > 0 and readable(sock):
            now = clock()
            try:
                peer, *frames = recv_frames(sock, p.MAX_FRAMES + 1)  # + the routing id
            except TooManyFrames as e:
                handle_oversized(e.frames[0], e.frames[1:], now)
                frames_left -= p.MAX_FRAMES
                continue
            frames_left -= len(frames)
            bytes_left -= sum(map(len, frames))
            try:
                messages = p.unbatch(frames)
            except p.ProtocolError as e:
                self.core.malformed_batch(peer, e, now)
                continue
            messages_left -= len(messages)
            for message in messages:
                handle(peer, message, now)

    def _on_client_disconnects(self) -> None:
        self._take_handshake_failures(self.client_disconnects, CLIENTS)
        now = time.monotonic()
        self.core.clients_disconnected(now)
        self._recheck_gone_until = now + RECHECK_GONE_FOR_S
        self._next_gone_check = now + RECHECK_GONE_S

    def _recheck_gone_clients(self, now: float) -> None:
        if now < self._recheck_gone_until and now >= self._next_gone_check:
            self._next_gone_check = now + RECHECK_GONE_S
            self.core.clients_disconnected(now)

    def _take_handshake_failures(self, monitor: zmq.Socket, role: str) -> None:
        """Read a socket's monitor empty, and tell the core of each handshake that
        failed (a failed handshake's closing comes with it: a disconnection too)."""
        while monitor.poll(0):
            event = parse_monitor_message(monitor.recv_multipart())
            if event["event"] == HANDSHAKE_FAILED:
                self.core.handshake_failed(role, HANDSHAKE_PROBLEMS.get(
                    event["value"], "it does not speak ZMTP with CURVE as the broker does"),
                    time.monotonic())

    # --- sending -------------------------------------------------------------

    def _flush(self, now: float) -> None:
        """Send what the core produced: per peer, one message or BATCHes of them, so
        that committing a message and waking libzmq's I/O thread is paid per batch."""
        core = self.core
        while core.to_clients or core.to_workers:  # a failed send may produce more (CANCELs)
            to_clients, to_workers = core.take_outgoing()
            for client, messages in to_clients.items():
                self._send_to_client(client, messages, now)
            for worker, messages in to_workers.items():
                self._send_to_worker(worker, messages, now)

    def _send_to_client(self, client: bytes, messages: list[list[bytes]], now: float) -> None:
        """What a client does not read must be seen in bytes: see zroute/unreleased.py."""
        core, sock = self.core, self.frontend
        sent = sent_bytes = 0
        for count, frames in p.packed(messages):
            size = sum(map(len, frames))
            try:
                if core.reply_bytes.of(client).wants_tracker(size):
                    tracker = send_to_tracked(sock, client, frames)
                else:
                    send_to(sock, client, frames)
                    tracker = None
            except zmq.ZMQError as e:
                if not _unreachable(e):
                    raise
                core.client_unreachable(client, messages[sent:], now)
                return
            sent += count
            sent_bytes += size
            if core.sent_to_client(client, size, tracker, sent_bytes, now):
                return  # the rest is for the requests that just ended

    def _send_to_worker(self, worker: bytes, messages: list[list[bytes]], now: float) -> None:
        for _, frames in p.packed(messages):
            try:
                send_to(self.backend, worker, frames)
            except zmq.ZMQError as e:
                if not _unreachable(e):
                    raise
                self.core.worker_unreachable(worker, now)
                return

    # --- what the core asks of the sockets -----------------------------------

    def client_gone(self, client: bytes) -> bool:
        return self._gone(self.frontend, client)

    def worker_gone(self, worker: bytes) -> bool:
        return self._gone(self.backend, worker)

    def _gone(self, sock: zmq.Socket, peer: bytes) -> bool:
        """Whether a peer's connection is gone: it cannot be sent a HEARTBEAT. A peer
        whose queue is full (zmq.Again) is there, only behind: not gone."""
        try:
            send_to(sock, peer, p.encode_heartbeat(p.Heartbeat(self.core.boot_id)))
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return True
            if e.errno != zmq.EAGAIN:
                raise
        return False
