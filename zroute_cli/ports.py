"""Local TCP ports: is one free, and if not, which process holds it (from Linux /proc).

`zroute serve` checks every port it needs before it starts anything, so that a second
stack on the same machine stops with one line instead of sharing the first one's ports.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from pathlib import Path

LISTEN = "0A"  # the TCP state in /proc/net/tcp
STOPPING_NAME = b"zroute-stopping"  # the process name of a `zroute serve` that is stopping
PR_SET_NAME = 15


class PortInUse(OSError):
    """A port that a command must listen on is taken; str() says by whom."""

    def __init__(self, message: str, port: int | None = None) -> None:
        super().__init__(message)
        self.port = port


def check_free(host: str, port: int) -> None:
    """Raise PortInUse if something listens on `port`, as a bind without SO_REUSEPORT
    would see it: a listener of any other stack counts, whatever its options."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        return  # not a name we can resolve: the child that binds it will say so
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not a holder
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(in_use_message(port), port) from None
            raise OSError(f"cannot listen on {host or '*'}:{port}: {e.strerror}") from None


def in_use_message(port: int) -> str:
    """'port 8000 is in use by pid 1234 (zroute serve -f config.yaml)', or by
    'another process' where /proc cannot tell (another user's, or not Linux)."""
    pid = _holder(port)
    if pid is None:
        return f"port {port} is in use by another process"
    message = f"port {port} is in use by pid {pid} ({_command(pid)})"
    if _name(pid) == STOPPING_NAME:
        message += (", which is still stopping: wait until it exits, or press Ctrl-C "
                    "again where it runs to stop it at once")
    return message


def held_by_running_zroute(port: int) -> bool:
    """True if a zroute process (or stack) that is not stopping listens on `port`."""
    pid = _holder(port)
    return pid is not None and _is_zroute(pid) and _name(pid) != STOPPING_NAME


def is_free(host: str, port: int) -> bool:
    try:
        check_free(host, port)
    except OSError:
        return False
    return True


def free_port_from(host: str, start: int, exclude: set[int]) -> int | None:
    """The first port from `start` up that nothing listens on and is not in `exclude`."""
    return next((port for port in range(start, 65536)
                 if port not in exclude and is_free(host, port)), None)


def unresolvable(host: str) -> str | None:
    """Why `host` cannot be listened on as a name ('Name or service not known'), or None."""
    try:
        socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return e.strerror or str(e)
    return None


def _holder(port: int) -> int | None:
    """The process listening on `port`, or the `zroute serve` that runs it: the one to stop."""
    pid = listener(port)
    parent = None if pid is None else _parent(pid)
    return parent if parent is not None and _is_zroute_serve(parent) else pid


def mark_stopping() -> None:
    """Name this process `zroute-stopping` (what ps and in_use_message show)."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(STOPPING_NAME), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the message names the process without saying it is stopping


def listener(port: int) -> int | None:
    """The pid of a process with a socket listening on `port`, or None."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd) in inodes:
                    return int(fd_dir.parent.name)
        except OSError:
            continue  # gone, or another user's
    return None


def _listening_inodes(port: int) -> set[str]:
    """'socket:[INODE]' of every socket listening on `port`, as /proc/PID/fd links read."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == LISTEN and int(fields[1].rpartition(":")[2], 16) == port:
                found.add(f"socket:[{fields[9]}]")
    return found


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def _parent(pid: int) -> int | None:
    stat = _read(f"/proc/{pid}/stat")
    fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (name) "
    return int(fields[1]) if len(fields) > 1 else None


def _name(pid: int) -> bytes:
    return _read(f"/proc/{pid}/comm").strip()


def _argv(pid: int) -> list[str]:
    return _read(f"/proc/{pid}/cmdline").decode(errors="replace").split("\0")[:-1]


def _is_zroute(pid: int) -> bool:
    """`zroute ...`, or a component that serve runs as `python -m zroute_cli.broker`."""
    argv = _argv(pid)
    module = argv[2] if argv[1:2] == ["-m"] and len(argv) > 2 else ""
    return (any(Path(arg).name == "zroute" for arg in argv[:2])
            or module.split(".")[0] == "zroute_cli")


def _is_zroute_serve(pid: int) -> bool:
    argv = _argv(pid)
    return any(Path(arg).name == "zroute" and following == "serve"
               for arg, following in zip(argv, argv[1:]))


def _command(pid: int) -> str:
    """The command line as typed: 'zroute serve -f config.yaml', not the interpreter's
    path and the script's."""
    argv = _argv(pid)
    if len(argv) > 1 and Path(argv[0]).name.startswith("python") and not argv[1].startswith("-"):
        argv = argv[1:]  # a script run by its #! line
    if not argv:
        return "unknown command"
    return " ".join([Path(argv[0]).name, *argv[1:]])


def http_url(host: str, port: int, tls: bool = False) -> str:
    """http://host:port (https:// with `tls`), with an IPv6 address in brackets."""
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def local_url(host: str, port: int, tls: bool = False) -> str:
    """A URL that reaches, from this machine, a server listening on host:port."""
    if host in ("", "0.0.0.0"):  # every interface: loopback is one of them
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return http_url(host, port, tls)
