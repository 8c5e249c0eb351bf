"""A socket's connection to the broker, watched with a ZeroMQ socket monitor.

A broker that dies or stops closes its connections: whoever waits on one hears of it at
once, rather than after the heartbeats it misses. Both the asyncio client and the worker
runtime watch their socket this way.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from zroute.channel import SOCKET_HWM, Channel, dealer

CONNECTION_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED


class ConnectionWatch:
    """Calls `on_connected` when the socket's connection opens, `on_disconnected` when it
    closes; in the running event loop, as a Channel calls its receiver."""

    def __init__(self, sock: zmq.Socket, on_connected: Callable[[], None],
                 on_disconnected: Callable[[], None]) -> None:
        self.sock = sock
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected
        self._events = Channel(sock.get_monitor_socket(CONNECTION_EVENTS), self._on_event)

    def _on_event(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)["event"]
        if event == zmq.EVENT_DISCONNECTED:
            self.on_disconnected()
        elif event == zmq.EVENT_CONNECTED:
            self.on_connected()

    def close(self) -> None:
        """Stop watching; before the socket itself is closed."""
        self.sock.disable_monitor()
        self._events.close(linger_ms=0)


def watched_dealer(context: zmq.Context, address: str, on_connected: Callable[[], None],
                   on_disconnected: Callable[[], None],
                   receive_hwm: int = SOCKET_HWM) -> tuple[zmq.Socket, ConnectionWatch]:
    """A DEALER connected to `address`, watched from before it connects: a connection
    that opened before its monitor would never be reported.

    libzmq reports no connection events for inproc://, whose connection is there as soon
    as it is made: `on_connected` is called for it at the loop's next turn, once the caller
    has what it needs to send."""
    sock = dealer(context, address, connect=False, receive_hwm=receive_hwm)
    watch = ConnectionWatch(sock, on_connected, on_disconnected)
    sock.connect(address)
    if address.startswith("inproc://"):
        asyncio.get_running_loop().call_soon(on_connected)
    return sock, watch
