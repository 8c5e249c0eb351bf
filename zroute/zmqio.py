"""Multipart send and receive without pyzmq's per-frame overhead.

pyzmq's send_multipart and recv_multipart combine enum flags for every frame
(`SNDMORE | flags`, `getsockopt(RCVMORE)`), and Python's enum arithmetic costs
more than the send itself (docs/BENCHMARKS.md has the figures). These call the
socket's compiled methods with integer flags.

Both never block: send raises zmq.Again when the peer's queue is full (libzmq
checks the high-water mark on a message's first frame only, so a message is
never cut in half), and recv raises zmq.Again when nothing is waiting: ask
readable() first, since raising Again (an exception and an enum) costs more.
"""

from __future__ import annotations

import zmq
from zmq.backend import Socket as _CompiledSocket

_MORE = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_send = _CompiledSocket.send
_recv = _CompiledSocket.recv
_get = _CompiledSocket.get


def send_frames(sock: zmq.Socket, frames: list[bytes]) -> None:
    for frame in frames[:-1]:
        _send(sock, frame, _MORE)
    _send(sock, frames[-1], _LAST)


def send_to(sock: zmq.Socket, peer: bytes, frames: list[bytes]) -> None:
    """Send on a ROUTER: the peer's routing identity, then the message."""
    _send(sock, peer, _MORE)
    send_frames(sock, frames)


def track_every_message(sock: zmq.Socket) -> None:
    """pyzmq copies a frame shorter than the socket's copy_threshold and gives it a tracker
    that is done at once: send_tracked's frames must not be copied."""
    sock.copy_threshold = 0


def send_tracked(sock: zmq.Socket, frames: list[bytes]) -> zmq.MessageTracker:
    """send_frames, and a tracker that is done once libzmq has let go of the message
    (written it to the connection, or dropped it with the connection). The socket must
    have been passed to track_every_message."""
    for frame in frames[:-1]:
        _send(sock, frame, _MORE)
    return _send(sock, frames[-1], _LAST, copy=False, track=True)


def send_to_tracked(sock: zmq.Socket, peer: bytes, frames: list[bytes]) -> zmq.MessageTracker:
    _send(sock, peer, _MORE)
    return send_tracked(sock, frames)


def readable(sock: zmq.Socket) -> bool:
    """Whether a message waits. Cheaper than a recv that raises zmq.Again, and like
    it, it resets the edge-triggered file descriptor of the socket."""
    return bool(_get(sock, _EVENTS) & _POLLIN)


class TooManyFrames(Exception):
    """A message had more frames than the receiver takes; `frames` are its first ones."""

    def __init__(self, frames: list[bytes]) -> None:
        super().__init__(f"a message of more than {len(frames)} frames")
        self.frames = frames


def recv_frames(sock: zmq.Socket, max_frames: int) -> list[bytes]:
    """One message. Past `max_frames` the rest of it is read and thrown away, which
    costs far less than handling it, and TooManyFrames is raised."""
    frames = [_recv(sock, _LAST)]
    room = max_frames - 1  # counted down: cheaper than len(frames) for every frame
    while _get(sock, _RCVMORE):
        if not room:
            _discard_rest(sock)
            raise TooManyFrames(frames)
        room -= 1
        frames.append(_recv(sock, _LAST))
    return frames


def _discard_rest(sock: zmq.Socket) -> None:
    while _get(sock, _RCVMORE):
        _recv(sock, _LAST)
