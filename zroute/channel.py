"""A DEALER socket driven by the asyncio event loop, without a future per message.

The socket's file descriptor is edge-triggered: it signals when the socket's
state changes, not while messages wait. So every wake-up reads the socket
until it is empty, and every send is followed by a check of the socket's
events, since a send can consume the signal of a message that has arrived.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable

import zmq

from zroute.curve import PeerKeys
from zroute.protocol import MAX_FRAMES, ProtocolError, packed, unbatch
from zroute.unreleased import Unreleased
from zroute.zmqio import (TooManyFrames, readable, recv_frames, send_frames, send_tracked,
                          track_every_message)

READ_BATCH = 500  # messages handled before other tasks get a turn
BACKLOG_RETRY_S = 0.005  # wait before retrying sends the socket refused (HWM)
SOCKET_HWM = 100_000


def dealer(context: zmq.Context, address: str, routing_id: bytes | None = None, *,
           connect: bool = True, receive_hwm: int = SOCKET_HWM,
           curve: PeerKeys | None = None) -> zmq.Socket:
    """A DEALER to `address`; with connect=False the caller connects it (once it has
    attached a monitor, say). `receive_hwm` bounds the messages libzmq queues for the
    event loop: past it, it reads no more from the connection. With `curve`, it
    authenticates with those keys and its traffic is encrypted."""
    sock = context.socket(zmq.DEALER)
    if curve is not None:
        curve.apply(sock)
    sock.setsockopt(zmq.SNDHWM, SOCKET_HWM)
    sock.setsockopt(zmq.RCVHWM, receive_hwm)
    sock.setsockopt(zmq.LINGER, 200)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)  # back within 0.5 s of a broker restart
    if routing_id:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    if connect:
        sock.connect(address)
    return sock


class Channel:
    """Receives into a callback; sends without blocking and without losing a message.

    The messages sent in one turn of the event loop leave together at its end
    (or when flush() is called), packed into as few ZeroMQ messages as BATCH allows,
    so that the cost of committing a message and waking libzmq's I/O thread is
    shared. A send the socket refuses (its queue is at the high-water mark) waits in
    a backlog, in order, and is retried. `unsent_bytes()` says how much is waiting, in
    the channel and in libzmq, so that a producer can wait while the peer does not read.
    """

    def __init__(self, sock: zmq.Socket, on_message: Callable[[list[bytes]], None]) -> None:
        self.sock = sock
        track_every_message(sock)
        self.on_message = on_message
        self.loop = asyncio.get_running_loop()
        self.outgoing: list[list[bytes]] = []
        self.outgoing_bytes = 0
        self.backlog: deque[list[bytes]] = deque()
        self.backlog_bytes = 0
        self.in_libzmq = Unreleased()
        self._flush_scheduled = False
        self._retry_scheduled = False
        self._check_scheduled = False
        self._closed = False
        self.loop.add_reader(sock.getsockopt(zmq.FD), self._read_available)
        self.loop.call_soon(self._read_available)

    def send(self, frames: list[bytes]) -> None:
        if self._closed:
            return
        self.outgoing.append(frames)
        self.outgoing_bytes += sum(map(len, frames))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send what this turn of the loop produced."""
        self._flush_scheduled = False
        if not self.outgoing and not self.backlog:
            return  # sent already by an earlier flush() in this turn
        messages, self.outgoing, self.outgoing_bytes = self.outgoing, [], 0
        for _, frames in packed(messages):
            self.backlog.append(frames)
            self.backlog_bytes += sum(map(len, frames))
        self._flush_backlog()

    def unsent_bytes(self) -> int:
        """Bytes sent on this channel that have not left the process yet (to within
        unreleased.MARK_BYTES)."""
        self.in_libzmq.measure()
        return self.outgoing_bytes + self.backlog_bytes + self.in_libzmq.held

    def _retry(self) -> None:
        self._retry_scheduled = False
        self._flush_backlog()

    def _flush_backlog(self) -> None:
        while self.backlog and not self._closed:
            frames = self.backlog[0]
            size = sum(map(len, frames))
            try:
                if self.in_libzmq.wants_tracker(size):
                    tracker = send_tracked(self.sock, frames)
                else:
                    send_frames(self.sock, frames)
                    tracker = None
            except zmq.Again:
                if not self._retry_scheduled:  # one timer, however many flushes wait
                    self._retry_scheduled = True
                    self.loop.call_later(BACKLOG_RETRY_S, self._retry)
                break
            self.backlog.popleft()
            self.backlog_bytes -= size
            self.in_libzmq.add(size, tracker)
        self.in_libzmq.measure()  # forget what has left, so that the trackers do not pile up
        self.check_soon()

    def check_soon(self) -> None:
        """Look at the socket at the loop's next turn. A send consumes the signal of a
        message that arrived meanwhile: whoever sends on the socket beside the channel
        calls this afterwards."""
        if not self._check_scheduled:
            self._check_scheduled = True
            self.loop.call_soon(self._read_available)

    def _read_available(self) -> None:
        self._check_scheduled = False
        if self._closed:
            return
        sock = self.sock
        for _ in range(READ_BATCH):
            if not readable(sock):
                return
            try:
                frames = recv_frames(sock, MAX_FRAMES)
            except TooManyFrames:
                continue  # the broker sends none: it refuses a worker reply that would grow past it
            try:
                messages = unbatch(frames)
            except ProtocolError:
                messages = [frames]  # the receiver's decoder rejects it, and says why
            for message in messages:
                self.on_message(message)
                if self._closed:
                    return
        self.check_soon()  # more may wait; let other tasks run first

    def close(self, linger_ms: int = 200) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        self.loop.remove_reader(self.sock.getsockopt(zmq.FD))
        self.sock.close(linger_ms)
