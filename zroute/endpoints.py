"""The check of a ZeroMQ endpoint, shared by the configuration and the clients, so that
a mistake in an address gets the same one-line explanation wherever it is made."""

from __future__ import annotations

import ipaddress
import re

ENDPOINT_SCHEMES = ("tcp", "ipc", "inproc")


def endpoint_problem(value: str) -> str | None:
    """What is wrong with a ZeroMQ endpoint, and what would be right; None if nothing."""
    scheme, has_scheme, address = value.partition("://")
    if not has_scheme:
        example = f"tcp://{value}" if re.fullmatch(r"[\w.\-*]+:\d+", value) else "tcp://127.0.0.1:5555"
        return (f"{value!r} is not a ZeroMQ endpoint: use tcp://HOST:PORT "
                f"(e.g. {example}) or ipc:///path")
    if scheme not in ENDPOINT_SCHEMES:
        return (f"{value!r} has the scheme {scheme!r}: ZeroMQ endpoints here are "
                "tcp://HOST:PORT, ipc:///path or inproc://name")
    if not address:
        return f"{value!r} names no address after {scheme}://"
    if scheme != "tcp":
        return None
    host, has_port, port = address.rpartition(":")
    if not has_port or not port:
        return f"{value!r} has no port: use tcp://HOST:PORT, e.g. tcp://{address}:5555"
    if not host:
        return f"{value!r} has no host: use tcp://HOST:PORT, e.g. tcp://127.0.0.1{address}"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"{value!r} has the port {port!r}: a port is a number from 1 to 65535"
    return None


def check_endpoint(value: str) -> str:
    """`value` if it is a ZeroMQ endpoint; else ValueError with endpoint_problem's line."""
    problem = endpoint_problem(str(value))
    if problem:
        raise ValueError(problem)
    return value


def is_loopback(endpoint: str) -> bool:
    """Whether only this machine can reach `endpoint`: ipc:// and inproc://, and tcp:// on
    127.0.0.0/8, ::1 or localhost. Any other host name counts as reachable from outside,
    whatever it resolves to now."""
    scheme, _, address = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = address.rpartition(":")[0].removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
