"""The broker driven in memory, for fast tests of its rules.

Messages go in through the broker core's handlers, as its loop would pass them, and what
it would send is read from its outbox. MemoryCore is the core alone, on a clock the test
moves and with the connections the test says are gone; MemoryBroker is the real Broker,
whose sockets are real (inproc) so that a test may also read and send on them as the loop
would.
"""

from __future__ import annotations

import itertools
import time
from typing import Mapping

import zmq

from zroute import protocol as p
from broker.core import BrokerCore
from broker.policies import Policy
from broker.server import Broker
from zroute_cli.config import load_config

_endpoints = itertools.count()


class CoreDriver:
    """Feeds a BrokerCore messages at the time now() says, and takes what it would send."""

    core: BrokerCore

    def now(self) -> float:
        raise NotImplementedError

    # --- in ---------------------------------------------------------------------

    def from_client(self, client: bytes, frames: list[bytes]) -> None:
        self.core.on_client(client, frames, self.now())

    def from_worker(self, worker: bytes, frames: list[bytes]) -> None:
        self.core.on_worker(worker, frames, self.now())

    def register(self, worker_id: str, capacity: int = 0) -> bytes:
        """A worker registers for "generate"; returns its peer identity."""
        peer = worker_id.encode()
        self.from_worker(peer, p.encode_ready(p.Ready(worker_id, ["generate"], capacity)))
        return peer

    def request(self, client: bytes, rid: bytes, policy: str = "", target: str = "",
                body: bytes = b"{}") -> None:
        self.from_client(client, p.encode_request_to_broker(
            p.Request(rid, "generate", body, policy, target, 0)))

    # --- out --------------------------------------------------------------------

    def to_client(self, client: bytes) -> list[p.Message]:
        """What the broker would send to a client (taken from its outbox)."""
        return [p.decode_to_client(m) for m in self.core.to_clients.pop(client, [])]

    def to_worker(self, worker: bytes) -> list[p.Message]:
        return [p.decode_to_worker(m) for m in self.core.to_workers.pop(worker, [])]

    def stats(self) -> dict:
        return self.core.stats(self.now())


class GoneConnections:
    """The sockets' answers, as a test sets them: the peers whose connections are gone."""

    def __init__(self) -> None:
        self.clients: set[bytes] = set()
        self.workers: set[bytes] = set()

    def client_gone(self, client: bytes) -> bool:
        return client in self.clients

    def worker_gone(self, worker: bytes) -> bool:
        return worker in self.workers


class MemoryCore(CoreDriver):
    """A BrokerCore alone: its time is `time`, which only the test moves."""

    def __init__(self, *overrides: str, policies: Mapping[str, Policy] | None = None,
                 start: float = 1000.0) -> None:
        self.time = start
        self.gone = GoneConnections()
        self.core = BrokerCore(load_config(None, list(overrides)).broker, self.gone, start,
                               b"boot-id1", policies)

    def now(self) -> float:
        return self.time

    def tick(self, at: float) -> None:
        """The clock reads `at`: the core's timers run."""
        self.time = at
        self.core.on_tick(at)


class MemoryBroker(CoreDriver):
    """The real Broker on inproc sockets, on the real clock."""

    def __init__(self, policies: Mapping[str, Policy] | None = None, *overrides: str) -> None:
        n = next(_endpoints)
        config = load_config(None, [f"Broker.frontend=inproc://memory-front-{n}",
                                    f"Broker.backend=inproc://memory-back-{n}", *overrides])
        self.context = zmq.Context()
        self.broker = Broker(config.broker, self.context, policies)
        self.core = self.broker.core
        self.peers: list[zmq.Socket] = []  # connected by connect(), closed by close()

    def now(self) -> float:
        return time.monotonic()

    def close(self) -> None:
        for peer in self.peers:
            peer.close(0)
        self.broker.frontend.disable_monitor()
        self.broker.client_disconnects.close(0)
        self.broker.frontend.close(0)
        self.broker.backend.close(0)
        self.context.term()

    def connect(self, sock: zmq.Socket, routing_id: bytes) -> zmq.Socket:
        """A DEALER on the broker's frontend or backend socket, with a known routing id:
        a peer the broker can reach (one it has never heard of cannot be)."""
        dealer = self.context.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.routing_id = routing_id
        dealer.connect(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self.peers.append(dealer)
        return dealer

    def read(self, sock: zmq.Socket) -> None:
        """Let the broker take what waits on one of its sockets, as its loop would."""
        while sock.poll(100):
            self.broker._read(sock)

    def flush(self) -> None:
        """Send what the broker has to send, as its loop would."""
        self.broker._flush(self.now())
