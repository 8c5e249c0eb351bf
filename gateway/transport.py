"""Cutting a connection that costs more than it may."""

from __future__ import annotations

import asyncio
import socket
import struct


def reset(transport: asyncio.BaseTransport) -> None:
    """Close the connection with a reset (linger 0): the kernel drops what it holds for
    the peer too, rather than keep trying to send it to a peer that does not read.
    Whatever waits on the connection (a handler's write) fails at once."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
