"""Addresses of listening sockets: which port an endpoint is on, and whether two listeners
would take the same port."""

from __future__ import annotations

Address = tuple[str, int]  # (host, port); host "" is every interface
EVERY_INTERFACE = ("", "0.0.0.0", "::")


def tcp_address(endpoint: str) -> Address | None:
    """('host', port) of a ZeroMQ endpoint 'tcp://host:port'; None for other transports."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if not port.isdigit():
        return None
    return ("" if host == "*" else host.strip("[]")), int(port)


def same_listener(first: Address, second: Address) -> bool:
    """Two listening addresses that cannot both be bound: one port, on one host or on
    every host."""
    (host1, port1), (host2, port2) = ((_loopback(host), port) for host, port in (first, second))
    return port1 == port2 and (host1 == host2 or bool({host1, host2} & set(EVERY_INTERFACE)))


def _loopback(host: str) -> str:
    return "127.0.0.1" if host == "localhost" else host
