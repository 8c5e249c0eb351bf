"""A socket's connection to the broker, watched with a ZeroMQ socket monitor.

A broker that dies or stops closes its connections: whoever waits on one hears of it at
once, rather than after the heartbeats it misses. Both the asyncio client and the worker
runtime watch their socket this way.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from zroute.channel import SOCKET_HWM, Channel, dealer
from zroute.curve import PeerKeys
from zroute.ratelimit import LogLimiter

log = logging.getLogger("zroute.connection")

CONNECTION_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
# A handshake that failed without a reason is tried again by libzmq, and logged at most
# once in this many seconds.
HANDSHAKE_LOG_INTERVAL = 30.0
handshake_log = LogLimiter(log, interval=HANDSHAKE_LOG_INTERVAL)


def handshake_failure(event: int, value: int, address: str, curve: bool) -> str | None:
    """What a failed handshake with the broker at `address` means, and what to do; None
    for a failure that says nothing of keys (a peer that is not a broker: the caller
    hears of the connection's closing)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"the broker at {address} refused this process's CURVE key: add its public "
                "key to the broker's allowlist (Broker.curve_workers_dir for a worker, "
                "Broker.curve_clients_dir for a client)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and \
            value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        mine = "this process has CURVE keys and the broker has none" if curve else \
            "the broker asks for CURVE keys and this process has none"
        return (f"the broker at {address} and this process disagree: {mine} (a worker's key "
                "is Backend.curve_key, a gateway's Frontend.curve_key, the broker's "
                "Broker.curve_secret_key)")
    if curve:
        return (f"the CURVE handshake with the broker at {address} failed: is "
                "Broker.curve_public_key the broker's public key?")
    return None


def retried(event: int) -> bool:
    """Whether libzmq connects again after a handshake that failed so: it gives up for
    good on a refusal or a protocol error, and retries a connection that just closed."""
    return event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class ConnectionWatch:
    """Calls `on_connected` when the socket's connection opens, `on_disconnected` when it
    closes; in the running event loop, as a Channel calls its receiver. A handshake that
    libzmq will not try again (the broker refused the keys, or the two sides disagree on
    CURVE) calls `on_refused` with what it means, and then `on_disconnected`."""

    def __init__(self, sock: zmq.Socket, on_connected: Callable[[], None],
                 on_disconnected: Callable[[], None], on_refused: Callable[[str], None],
                 address: str, curve: bool) -> None:
        self.sock = sock
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected
        self.on_refused = on_refused
        self.address = address
        self.curve = curve
        self._events = Channel(sock.get_monitor_socket(CONNECTION_EVENTS | HANDSHAKE_FAILURES),
                               self._on_event)

    def _on_event(self, frames: list[bytes]) -> None:
        message = parse_monitor_message(frames)
        event = message["event"]
        if event == zmq.EVENT_DISCONNECTED:
            self.on_disconnected()
        elif event == zmq.EVENT_CONNECTED:
            self.on_connected()
        else:
            problem = handshake_failure(event, message["value"], self.address, self.curve)
            if problem is None:
                return
            if retried(event):
                handshake_log.warn("handshake failed", f"{problem}; trying again")
            else:
                self.on_refused(problem)

    def close(self) -> None:
        """Stop watching; before the socket itself is closed."""
        self.sock.disable_monitor()
        self._events.close(linger_ms=0)


def watched_dealer(context: zmq.Context, address: str, on_connected: Callable[[], None],
                   on_disconnected: Callable[[], None], on_refused: Callable[[str], None],
                   receive_hwm: int = SOCKET_HWM,
                   curve: PeerKeys | None = None) -> tuple[zmq.Socket, ConnectionWatch]:
    """A DEALER connected to `address`, watched from before it connects: a connection
    that opened before its monitor would never be reported.

    libzmq reports no connection events for inproc://, whose connection is there as soon
    as it is made: `on_connected` is called for it at the loop's next turn, once the caller
    has what it needs to send."""
    sock = dealer(context, address, connect=False, receive_hwm=receive_hwm, curve=curve)
    watch = ConnectionWatch(sock, on_connected, on_disconnected, on_refused, address,
                            curve is not None)
    sock.connect(address)
    if address.startswith("inproc://"):
        asyncio.get_running_loop().call_soon(on_connected)
    return sock, watch
