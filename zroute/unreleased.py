"""Bytes sent that libzmq still holds, per peer.

libzmq counts a peer's queue in messages, not bytes, and says nothing of a message once
it is sent. So a message now and then goes with a tracker (zmqio.send_tracked), done once
libzmq has let go of it. libzmq lets go of one peer's messages in order, so once a
tracked message is done, everything sent to that peer before it has left the process too.
A tracked send costs more than a plain one (pyzmq frees the frame in a thread of its own),
so a peer's messages are tracked only once MARK_BYTES have been sent since the last
tracked one: what libzmq holds is known to within MARK_BYTES.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

MARK_BYTES = 64 << 10


class Tracker(Protocol):
    """What is needed of a zmq.MessageTracker."""

    @property
    def done(self) -> bool:
        """Whether libzmq has let go of the message."""


class Unreleased:
    """One peer's bytes that libzmq holds."""

    __slots__ = ("sent", "marked", "released", "held", "marks", "mark_due")

    def __init__(self) -> None:
        self.sent = 0  # bytes sent to the peer since it was first sent something
        self.marked = 0  # of those, bytes sent up to the last tracked message
        self.released = 0  # of those, bytes libzmq has let go of
        self.held = 0  # sent - released, when last measured
        self.marks: deque[tuple[Tracker, int]] = deque()  # (tracker, sent by then)
        self.mark_due = False  # the next message goes with a tracker, whatever its size

    def wants_tracker(self, size: int) -> bool:
        """Whether the next message, of `size` bytes, should be sent with a tracker."""
        return self.mark_due or self.sent + size - self.marked >= MARK_BYTES

    def add(self, size: int, tracker: Tracker | None) -> None:
        self.sent += size
        self.held += size
        if tracker is not None:
            self.marked = self.sent
            self.marks.append((tracker, self.sent))
            self.mark_due = False

    def measure(self) -> int:
        """Measure what libzmq holds now (at most); returns the change since last measured."""
        marks = self.marks
        while marks and marks[0][0].done:
            self.released = marks.popleft()[1]
        before, self.held = self.held, self.sent - self.released
        return self.held - before

    @property
    def unmarked(self) -> bool:
        """Whether bytes were sent after the last tracked message: until one is tracked
        after them, they count as held."""
        return self.sent > self.marked


class UnreleasedByPeer:
    """Unreleased for each peer that has any, and their sum."""

    def __init__(self) -> None:
        self.peers: dict[bytes, Unreleased] = {}
        self.total = 0  # as last measured

    def of(self, peer: bytes) -> Unreleased:
        unreleased = self.peers.get(peer)
        if unreleased is None:
            self.peers[peer] = unreleased = Unreleased()
        return unreleased

    def add(self, peer: bytes, size: int, tracker: Tracker | None) -> None:
        self.of(peer).add(size, tracker)
        self.total += size

    def held(self, peer: bytes) -> int:
        """What libzmq holds for `peer` now."""
        unreleased = self.peers.get(peer)
        if unreleased is None:
            return 0
        self.total += unreleased.measure()
        if not unreleased.held:
            del self.peers[peer]  # peers that are gone must not pile up
        return unreleased.held

    def forget(self, peer: bytes) -> None:
        """A peer that is gone: libzmq has dropped what it held for it."""
        unreleased = self.peers.pop(peer, None)
        if unreleased is not None:
            self.total -= unreleased.held

    def measure_all(self) -> list[bytes]:
        """Measure every peer; the ones whose last bytes no tracked message follows. The
        next message to each of those goes with a tracker: send them one (a HEARTBEAT)."""
        for peer in list(self.peers):
            self.held(peer)
        unmarked = [peer for peer, unreleased in self.peers.items()
                    if unreleased.unmarked and not unreleased.marks]
        for peer in unmarked:
            self.peers[peer].mark_due = True
        return unmarked

    def send_failed(self, peer: bytes) -> None:
        """A send to `peer` failed: it is gone, or its queue is full. If a tracked
        message was due, nothing will tell when its last bytes leave: forget them (those
        of a peer that is gone, libzmq has dropped)."""
        unreleased = self.peers.get(peer)
        if unreleased is not None and unreleased.mark_due:
            self.forget(peer)
